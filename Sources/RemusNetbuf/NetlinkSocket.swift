import CNetlink
import Glibc

/// One rtnetlink socket (`struct nl_sock *`), connected on creation and freed in `deinit`.
///
/// A netlink socket talks to the network namespace of the thread that created it, for its whole
/// life. Calls block for one kernel round trip each: use the socket from one dedicated thread at a
/// time (it is deliberately not `Sendable`), never from the Swift concurrency pool.
public final class NetlinkSocket {
    /// The libnl handle; owned, freed in `deinit`.
    let handle: OpaquePointer
    /// The qdisc dump used for statistics, refilled on demand (`refreshedQdiscCache()`).
    private var qdiscCache: OpaquePointer?

    /// Opens and connects an rtnetlink socket in the calling thread's network namespace.
    public init() throws(NetlinkError) {
        guard let sock = nl_socket_alloc() else {
            throw NetlinkError(call: "nl_socket_alloc", code: NLE_NOMEM)
        }
        let rc = nl_connect(sock, NETLINK_ROUTE)
        if rc < 0 {
            nl_socket_free(sock)
            throw NetlinkError(call: "nl_connect(NETLINK_ROUTE)", code: rc)
        }
        handle = sock
    }

    deinit {
        if let qdiscCache { nl_cache_free(qdiscCache) }
        // nl_socket_free closes the file descriptor as well.
        nl_socket_free(handle)
    }

    // MARK: Links

    /// What RemusNetbuf needs to know about a network interface.
    public struct Link: Equatable, Sendable {
        /// The kernel's interface index.
        public var index: Int32
        /// The interface name (≤ 15 bytes).
        public var name: String
        /// The rtnl_link kind (`"ifb"`, `"veth"`, …); nil for devices without one (physical NICs, lo).
        public var kind: String?
        /// IFLA_IFALIAS, nil if unset.
        public var alias: String?
        /// Whether IFF_UP is set.
        public var isUp: Bool
        /// Maximum transmission unit, bytes.
        public var mtu: UInt32
        /// Packets the interface transmitted (for an ifb: packets redirected through it).
        public var txPackets: UInt64
        /// Packets the interface received.
        public var rxPackets: UInt64
    }

    /// Looks one interface up by name; nil if it does not exist.
    public func link(named name: String) throws(NetlinkError) -> Link? {
        try fetchLink(index: 0, name: name)
    }

    /// Looks one interface up by index; nil if it does not exist.
    public func link(index: Int32) throws(NetlinkError) -> Link? {
        try fetchLink(index: index, name: nil)
    }

    private func fetchLink(index: Int32, name: String?) throws(NetlinkError) -> Link? {
        var raw: OpaquePointer?
        let rc: Int32
        if let name {
            rc = rtnl_link_get_kernel(handle, 0, name, &raw)
        } else {
            rc = rtnl_link_get_kernel(handle, index, nil, &raw)
        }
        if rc < 0 {
            let error = NetlinkError(call: "rtnl_link_get_kernel(\(name ?? String(index)))", code: rc)
            if error.isNotFound { return nil }
            throw error
        }
        guard let raw else { return nil }
        defer { rtnl_link_put(raw) }
        return Self.describe(link: raw)
    }

    /// Every interface in this namespace, in kernel order.
    public func links() throws(NetlinkError) -> [Link] {
        var cache: OpaquePointer?
        try nlCheck("rtnl_link_alloc_cache", rtnl_link_alloc_cache(handle, AF_UNSPEC, &cache))
        guard let cache else { return [] }
        defer { nl_cache_free(cache) }
        var result: [Link] = []
        var object = nl_cache_get_first(cache)
        while let current = object {
            // SAFETY: every object in a link cache is a struct rtnl_link (libnl's cache type).
            result.append(Self.describe(link: current))
            object = nl_cache_get_next(current)
        }
        return result
    }

    private static func describe(link: OpaquePointer) -> Link {
        Link(
            index: rtnl_link_get_ifindex(link),
            name: string(rtnl_link_get_name(link)) ?? "",
            kind: string(rtnl_link_get_type(link)),
            alias: string(rtnl_link_get_ifalias(link)),
            isUp: rtnl_link_get_flags(link) & UInt32(IFF_UP) != 0,
            mtu: rtnl_link_get_mtu(link),
            txPackets: rtnl_link_get_stat(link, RTNL_LINK_TX_PACKETS),
            rxPackets: rtnl_link_get_stat(link, RTNL_LINK_RX_PACKETS)
        )
    }

    /// Creates an interface of `kind` (no kind-specific attributes) and brings it up, with the
    /// given MTU in bytes (the kind's default when nil). Fails with `isAlreadyExisting` if the
    /// name is taken.
    public func addLink(name: String, kind: String, mtu: UInt32? = nil) throws(NetlinkError) {
        guard let link = rtnl_link_alloc() else { throw NetlinkError(call: "rtnl_link_alloc", code: NLE_NOMEM) }
        defer { rtnl_link_put(link) }
        rtnl_link_set_name(link, name)
        if let mtu { rtnl_link_set_mtu(link, mtu) }
        try nlCheck("rtnl_link_set_type(\(kind))", rtnl_link_set_type(link, kind))
        rtnl_link_set_flags(link, UInt32(IFF_UP))
        try nlCheck("rtnl_link_add(\(name) type \(kind))", rtnl_link_add(handle, link, NLM_F_CREATE | NLM_F_EXCL))
    }

    /// Sets (or with nil clears) an interface's alias text (IFLA_IFALIAS, ≤ 255 bytes).
    public func setAlias(index: Int32, _ alias: String?) throws(NetlinkError) {
        try changeLink(index: index, what: "alias") { rtnl_link_set_ifalias($0, alias ?? "") }
    }

    /// Sets an interface's MTU, bytes.
    public func setMTU(index: Int32, _ mtu: UInt32) throws(NetlinkError) {
        try changeLink(index: index, what: "mtu \(mtu)") { rtnl_link_set_mtu($0, mtu) }
    }

    /// Sets IFF_UP on an interface.
    public func setUp(index: Int32) throws(NetlinkError) {
        try changeLink(index: index, what: "up") { rtnl_link_set_flags($0, UInt32(IFF_UP)) }
    }

    private func changeLink(index: Int32, what: String, _ edit: (OpaquePointer) -> Void) throws(NetlinkError) {
        guard let original = rtnl_link_alloc(), let changes = rtnl_link_alloc() else {
            throw NetlinkError(call: "rtnl_link_alloc", code: NLE_NOMEM)
        }
        defer { rtnl_link_put(original); rtnl_link_put(changes) }
        rtnl_link_set_ifindex(original, index)
        edit(changes)
        try nlCheck("rtnl_link_change(ifindex \(index), \(what))", rtnl_link_change(handle, original, changes, 0))
    }

    /// Deletes an interface by index (its qdiscs and filters go with it).
    public func deleteLink(index: Int32) throws(NetlinkError) {
        guard let link = rtnl_link_alloc() else { throw NetlinkError(call: "rtnl_link_alloc", code: NLE_NOMEM) }
        defer { rtnl_link_put(link) }
        rtnl_link_set_ifindex(link, index)
        try nlCheck("rtnl_link_delete(ifindex \(index))", rtnl_link_delete(handle, link))
    }

    /// Creates a veth pair, both ends in this socket's namespace (for tests and fixtures).
    package func addVethPair(_ name: String, peer: String) throws(NetlinkError) {
        // Not rtnl_link_veth_add: it moves the peer into the namespace of a *process*, which is
        // not the namespace of a thread that unshared its own.
        guard let link = rtnl_link_veth_alloc() else { throw NetlinkError(call: "rtnl_link_veth_alloc", code: NLE_NOMEM) }
        defer { rtnl_link_put(link) }
        rtnl_link_set_name(link, name)
        guard let peerLink = rtnl_link_veth_get_peer(link) else { throw NetlinkError(call: "rtnl_link_veth_get_peer", code: NLE_NOMEM) }
        defer { rtnl_link_put(peerLink) }
        rtnl_link_set_name(peerLink, peer)
        try nlCheck("rtnl_link_add(veth \(name) peer \(peer))", rtnl_link_add(handle, link, NLM_F_CREATE | NLM_F_EXCL))
    }

    // MARK: Queueing disciplines

    /// A qdisc as dumped by the kernel, with its counters.
    public struct Qdisc: Equatable, Sendable {
        public var ifindex: Int32
        public var kind: String
        /// tc handle (`major << 16 | minor`), e.g. 0xFFFF0000 for the ingress qdisc.
        public var handle: UInt32
        /// tc parent handle: `TC_H_ROOT`, `TC_H_INGRESS`, or a class.
        public var parent: UInt32
        /// Packets queued now.
        public var queueLength: UInt64
        /// Bytes queued now.
        public var backlogBytes: UInt64
        /// Packets dropped since the qdisc was created.
        public var drops: UInt64
        /// Times the qdisc reported "over limit" since it was created.
        public var overlimits: UInt64
        /// Packets that left the qdisc since it was created.
        public var sentPackets: UInt64
    }

    /// Refills the shared qdisc dump (one kernel dump of every qdisc in the namespace).
    private func refreshedQdiscCache() throws(NetlinkError) -> OpaquePointer {
        if let qdiscCache {
            try nlCheck("nl_cache_refill(qdisc)", nl_cache_refill(handle, qdiscCache))
            return qdiscCache
        }
        var cache: OpaquePointer?
        try nlCheck("rtnl_qdisc_alloc_cache", rtnl_qdisc_alloc_cache(handle, &cache))
        guard let cache else { throw NetlinkError(call: "rtnl_qdisc_alloc_cache", code: NLE_NOMEM) }
        qdiscCache = cache
        return cache
    }

    /// Every qdisc in the namespace, or only those on `ifindex`; one kernel dump.
    public func qdiscs(ifindex: Int32? = nil) throws(NetlinkError) -> [Qdisc] {
        let cache = try refreshedQdiscCache()
        var result: [Qdisc] = []
        var object = nl_cache_get_first(cache)
        while let current = object {
            // SAFETY: every object in a qdisc cache is a struct rtnl_qdisc, which begins with the
            // generic struct rtnl_tc header that the rtnl_tc_* accessors read.
            let index = rtnl_tc_get_ifindex(current)
            if ifindex == nil || ifindex == index {
                result.append(Qdisc(
                    ifindex: index,
                    kind: string(rtnl_tc_get_kind(current)) ?? "",
                    handle: rtnl_tc_get_handle(current),
                    parent: rtnl_tc_get_parent(current),
                    queueLength: rtnl_tc_get_stat(current, RTNL_TC_QLEN),
                    backlogBytes: rtnl_tc_get_stat(current, RTNL_TC_BACKLOG),
                    drops: rtnl_tc_get_stat(current, RTNL_TC_DROPS),
                    overlimits: rtnl_tc_get_stat(current, RTNL_TC_OVERLIMITS),
                    sentPackets: rtnl_tc_get_stat(current, RTNL_TC_PACKETS)
                ))
            }
            object = nl_cache_get_next(current)
        }
        return result
    }

    /// Adds the ingress qdisc (`ffff:`) to an interface.
    public func addIngressQdisc(ifindex: Int32) throws(NetlinkError) {
        try withQdisc(ifindex: ifindex, parent: TC_H_INGRESS, handle: TCHandle.ingress, kind: "ingress") { q throws(NetlinkError) in
            try nlCheck("rtnl_qdisc_add(ingress, ifindex \(ifindex))", rtnl_qdisc_add(handle, q, NLM_F_CREATE | NLM_F_EXCL))
        }
    }

    /// Deletes the ingress qdisc of an interface, and every filter attached to it.
    public func deleteIngressQdisc(ifindex: Int32) throws(NetlinkError) {
        try withQdisc(ifindex: ifindex, parent: TC_H_INGRESS, handle: TCHandle.ingress, kind: "ingress") { q throws(NetlinkError) in
            try nlCheck("rtnl_qdisc_delete(ingress, ifindex \(ifindex))", rtnl_qdisc_delete(handle, q))
        }
    }

    /// Adds a `plug` qdisc as the root qdisc of an interface, holding up to `limitBytes` bytes.
    /// A new plug holds everything until the first release (the kernel starts it throttled).
    public func addPlugQdisc(ifindex: Int32, limitBytes: Int32) throws(NetlinkError) {
        try withQdisc(ifindex: ifindex, parent: TC_H_ROOT, handle: TCHandle.plugRoot, kind: "plug") { q throws(NetlinkError) in
            try nlCheck("rtnl_qdisc_plug_set_limit", rtnl_qdisc_plug_set_limit(q, limitBytes))
            try nlCheck("rtnl_qdisc_add(plug, ifindex \(ifindex))", rtnl_qdisc_add(handle, q, NLM_F_CREATE | NLM_F_EXCL))
        }
    }

    /// Allocates a configured qdisc object, runs `body`, releases it.
    @discardableResult
    func withQdisc<R>(
        ifindex: Int32, parent: UInt32, handle tcHandle: UInt32, kind: String,
        _ body: (OpaquePointer) throws(NetlinkError) -> R
    ) throws(NetlinkError) -> R {
        guard let q = rtnl_qdisc_alloc() else { throw NetlinkError(call: "rtnl_qdisc_alloc", code: NLE_NOMEM) }
        defer { rtnl_qdisc_put(q) }
        // SAFETY: struct rtnl_qdisc begins with struct rtnl_tc (libnl's TC_CAST), so the same
        // pointer is valid for the rtnl_tc_* setters.
        rtnl_tc_set_ifindex(q, ifindex)
        rtnl_tc_set_parent(q, parent)
        rtnl_tc_set_handle(q, tcHandle)
        try nlCheck("rtnl_tc_set_kind(\(kind))", rtnl_tc_set_kind(q, kind))
        return try body(q)
    }

    // MARK: Filters

    /// A classifier as dumped by the kernel.
    public struct Filter: Equatable, Sendable {
        public var ifindex: Int32
        public var parent: UInt32
        public var kind: String
        /// tc priority ("pref").
        public var priority: UInt16
        /// Ethernet protocol matched, host byte order (`ETH_P_ALL` is 3).
        public var ethProtocol: UInt16
        public var handle: UInt32
        /// For a u32 node whose first action is `mirred`: the target interface index.
        public var mirredTarget: Int32?
        /// For a u32 node whose first action is `mirred`: `TCA_EGRESS_REDIR` (1), …
        public var mirredAction: Int32?
    }

    /// The filters attached under `parent` (e.g. the ingress qdisc, `ffff:`) of an interface.
    public func filters(ifindex: Int32, parent: UInt32) throws(NetlinkError) -> [Filter] {
        var cache: OpaquePointer?
        try nlCheck("rtnl_cls_alloc_cache(ifindex \(ifindex))", rtnl_cls_alloc_cache(handle, ifindex, parent, &cache))
        guard let cache else { return [] }
        defer { nl_cache_free(cache) }
        var result: [Filter] = []
        var object = nl_cache_get_first(cache)
        while let current = object {
            // SAFETY: every object in a classifier cache is a struct rtnl_cls (an rtnl_tc).
            let kind = string(rtnl_tc_get_kind(current)) ?? ""
            var target: Int32?
            var action: Int32?
            if kind == "u32", let act = rtnl_u32_get_action(current),
               string(rtnl_tc_get_kind(act)) == "mirred" {
                target = Int32(bitPattern: rtnl_mirred_get_ifindex(act))
                action = rtnl_mirred_get_action(act)
            }
            result.append(Filter(
                ifindex: rtnl_tc_get_ifindex(current),
                parent: rtnl_tc_get_parent(current),
                kind: kind,
                priority: rtnl_cls_get_prio(current),
                ethProtocol: rtnl_cls_get_protocol(current),
                handle: rtnl_tc_get_handle(current),
                mirredTarget: target,
                mirredAction: action
            ))
            object = nl_cache_get_next(current)
        }
        return result
    }

    /// Adds, under the ingress qdisc of `ifindex`, a u32 filter for every protocol (`ETH_P_ALL`,
    /// `match u32 0 0`) whose action is `mirred egress redirect` to `target`, at `priority`.
    public func addRedirectAllFilter(ifindex: Int32, target: Int32, priority: UInt16) throws(NetlinkError) {
        guard let cls = rtnl_cls_alloc() else { throw NetlinkError(call: "rtnl_cls_alloc", code: NLE_NOMEM) }
        defer { rtnl_cls_put(cls) }
        guard let act = rtnl_act_alloc() else { throw NetlinkError(call: "rtnl_act_alloc", code: NLE_NOMEM) }
        // rtnl_u32_add_action takes its own reference.
        defer { rtnl_act_put(act) }

        // SAFETY: struct rtnl_cls and struct rtnl_act both begin with struct rtnl_tc.
        rtnl_tc_set_ifindex(cls, ifindex)
        rtnl_tc_set_parent(cls, TCHandle.ingress)
        try nlCheck("rtnl_tc_set_kind(u32)", rtnl_tc_set_kind(cls, "u32"))
        rtnl_cls_set_prio(cls, priority)
        rtnl_cls_set_protocol(cls, UInt16(ETH_P_ALL))
        // One key: the first 32 bits AND 0 == 0, which every packet matches. TERMINAL makes the
        // kernel run the actions on a match instead of following a (nonexistent) link.
        try nlCheck("rtnl_u32_add_key_uint32", rtnl_u32_add_key_uint32(cls, 0, 0, 0, 0))
        try nlCheck("rtnl_u32_set_cls_terminal", rtnl_u32_set_cls_terminal(cls))

        try nlCheck("rtnl_tc_set_kind(mirred)", rtnl_tc_set_kind(act, "mirred"))
        try nlCheck("rtnl_mirred_set_action", rtnl_mirred_set_action(act, TCA_EGRESS_REDIR))
        try nlCheck("rtnl_mirred_set_policy", rtnl_mirred_set_policy(act, TC_ACT_STOLEN))
        try nlCheck("rtnl_mirred_set_ifindex", rtnl_mirred_set_ifindex(act, UInt32(bitPattern: target)))
        try nlCheck("rtnl_u32_add_action", rtnl_u32_add_action(cls, act))

        try nlCheck(
            "rtnl_cls_add(u32 ingress ifindex \(ifindex) → mirred ifindex \(target))",
            rtnl_cls_add(handle, cls, NLM_F_CREATE | NLM_F_EXCL))
    }

    /// Deletes every filter of `kind` at `priority` under `parent` of an interface.
    public func deleteFilters(ifindex: Int32, parent: UInt32, priority: UInt16, ethProtocol: UInt16, kind: String) throws(NetlinkError) {
        guard let cls = rtnl_cls_alloc() else { throw NetlinkError(call: "rtnl_cls_alloc", code: NLE_NOMEM) }
        defer { rtnl_cls_put(cls) }
        rtnl_tc_set_ifindex(cls, ifindex)
        rtnl_tc_set_parent(cls, parent)
        try nlCheck("rtnl_tc_set_kind(\(kind))", rtnl_tc_set_kind(cls, kind))
        rtnl_cls_set_prio(cls, priority)
        rtnl_cls_set_protocol(cls, ethProtocol)
        try nlCheck("rtnl_cls_delete(\(kind) prio \(priority) ifindex \(ifindex))", rtnl_cls_delete(handle, cls, 0))
    }
}

/// tc handles used by RemusNetbuf.
public enum TCHandle {
    /// The ingress qdisc's handle, `ffff:`; its filters hang under this parent.
    public static let ingress: UInt32 = 0xFFFF_0000
    /// The handle given to our root plug qdisc, `1:`.
    public static let plugRoot: UInt32 = 0x0001_0000
}

/// A C string from libnl (possibly NULL) as a Swift string.
@inline(__always)
func string(_ pointer: UnsafeMutablePointer<CChar>?) -> String? {
    pointer.map { String(cString: $0) }
}

@inline(__always)
func string(_ pointer: UnsafePointer<CChar>?) -> String? {
    pointer.map { String(cString: $0) }
}
