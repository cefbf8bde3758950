import CNetlink

/// The root plug qdisc of one ifb device, ready to receive commands: a preconfigured
/// `struct rtnl_qdisc *` (owned, released in `deinit`) so that a command costs one message and
/// one kernel round trip.
final class PlugQdisc {
    /// The ifb device's index.
    let ifindex: Int32
    private let qdisc: OpaquePointer

    init(ifindex: Int32) throws(NetlinkError) {
        guard let q = rtnl_qdisc_alloc() else { throw NetlinkError(call: "rtnl_qdisc_alloc", code: NLE_NOMEM) }
        // SAFETY: struct rtnl_qdisc begins with struct rtnl_tc (libnl's TC_CAST).
        rtnl_tc_set_ifindex(q, ifindex)
        rtnl_tc_set_parent(q, TC_H_ROOT)
        rtnl_tc_set_handle(q, TCHandle.plugRoot)
        let rc = rtnl_tc_set_kind(q, "plug")
        if rc < 0 {
            rtnl_qdisc_put(q)
            throw NetlinkError(call: "rtnl_tc_set_kind(plug)", code: rc)
        }
        self.ifindex = ifindex
        self.qdisc = q
    }

    deinit { rtnl_qdisc_put(qdisc) }

    /// Sends one command and waits for the kernel's acknowledgement. An `RTM_NEWQDISC` without
    /// `NLM_F_CREATE` for the existing qdisc reaches sch_plug's `change` handler.
    func send(_ command: PlugCommand, on socket: NetlinkSocket) throws(NetlinkError) {
        let setRC: Int32
        switch command {
        case .buffer: setRC = rtnl_qdisc_plug_buffer(qdisc)
        case .releaseOne: setRC = rtnl_qdisc_plug_release_one(qdisc)
        case .releaseIndefinite: setRC = rtnl_qdisc_plug_release_indefinite(qdisc)
        }
        try nlCheck("rtnl_qdisc_plug_\(command)", setRC)
        try nlCheck("rtnl_qdisc_add(plug \(command), ifindex \(ifindex))", rtnl_qdisc_add(socket.handle, qdisc, NLM_F_REQUEST))
    }

    /// Changes the byte limit of the running plug.
    func setLimit(_ limitBytes: Int32, on socket: NetlinkSocket) throws(NetlinkError) {
        try nlCheck("rtnl_qdisc_plug_set_limit", rtnl_qdisc_plug_set_limit(qdisc, limitBytes))
        try nlCheck("rtnl_qdisc_add(plug limit, ifindex \(ifindex))", rtnl_qdisc_add(socket.handle, qdisc, NLM_F_REQUEST))
    }
}
