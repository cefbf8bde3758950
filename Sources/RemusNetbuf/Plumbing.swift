import CNetlink

/// One guest interface whose output is redirected into a plug qdisc.
///
/// Guest egress is host ingress on the guest's interface (a Xen `vifD.N`, a tap or a veth), and
/// Linux cannot queue on ingress. So: an `ingress` qdisc on the guest interface, a u32 filter that
/// matches every protocol and redirects (`mirred egress redirect`) to an `ifb` device, and a
/// `plug` qdisc as the ifb's root. The ifb hands released packets back to the guest interface's
/// receive path, where bridging or routing continues as if nothing had happened.
public struct NetbufAttachment: Equatable, Sendable {
    /// The guest interface's name.
    public var interface: String
    /// The guest interface's index.
    public var interfaceIndex: Int32
    /// Our ifb device's name, `rb-<interfaceIndex>`.
    public var ifbName: String
    /// Our ifb device's index.
    public var ifbIndex: Int32
    /// Whether we created the guest's ingress qdisc (teardown then deletes it; otherwise only our
    /// filter is removed).
    public var ownsIngressQdisc: Bool
}

/// What a cleanup removed, one human-readable line per kernel object.
public struct CleanupReport: Equatable, Sendable, CustomStringConvertible {
    /// One line per object removed, in the order removed.
    public var removed: [String] = []
    /// Packets that were held in removed plugs and were discarded, not released: they may belong
    /// to epochs the backup never acknowledged.
    public var discardedPackets: UInt64 = 0

    public init() {}

    /// True if nothing of ours was found.
    public var isEmpty: Bool { removed.isEmpty }

    public var description: String {
        if removed.isEmpty { return "no remusd output buffer found; nothing to remove" }
        var lines = removed
        if discardedPackets > 0 {
            lines.append("\(discardedPackets) held packet(s) were discarded, not released (they may belong to "
                + "epochs the backup never acknowledged)")
        }
        return lines.joined(separator: "\n")
    }

    mutating func merge(_ other: CleanupReport) {
        removed += other.removed
        discardedPackets += other.discardedPackets
    }
}

/// Builds and removes the kernel objects of an output buffer, all through rtnetlink.
public enum NetbufPlumbing {
    /// What sits at the root of the ifb device.
    package enum Queue: Sendable {
        /// A `plug` qdisc holding up to this many bytes.
        case plug(limitBytes: Int32)
        /// The ifb's default qdisc (tests of the redirect on kernels without sch_plug).
        case passThrough
    }

    /// Default byte limit of a plug: 10 MiB per interface, as Xen's remus-netbuf-setup.
    public static let defaultLimitBytes = 10 * 1024 * 1024

    /// Checks a byte limit against the kernel's 31-bit field.
    public static func validatedLimit(_ limitBytes: Int) throws(NetbufError) -> Int32 {
        guard limitBytes >= 1, limitBytes <= Int(Int32.max) else { throw .invalidLimit(limitBytes) }
        return Int32(limitBytes)
    }

    /// Sets up the buffer for one guest interface: removes leftovers of an earlier run first,
    /// then creates `rb-<ifindex>` (ifb, up), its root plug, the ingress qdisc (if absent) and the
    /// redirect filter. On failure everything created is removed again.
    ///
    /// - Returns: the attachment and what leftovers were removed first.
    public static func attach(
        interface: String, limitBytes: Int, socket: NetlinkSocket
    ) throws(NetbufError) -> (NetbufAttachment, leftovers: CleanupReport) {
        try attach(interface: interface, queue: .plug(limitBytes: validatedLimit(limitBytes)), socket: socket)
    }

    package static func attach(
        interface: String, queue: Queue, socket: NetlinkSocket
    ) throws(NetbufError) -> (NetbufAttachment, leftovers: CleanupReport) {
        let guest = try lookUpGuest(interface, socket: socket)
        let leftovers = try cleanup(guestIndex: guest.index, guestName: guest.name, socket: socket)

        // Only an ingress qdisc without filters can be shared: any filter ahead of ours could
        // divert packets around the buffer.
        let existing = try wrap(interface, "reading its qdiscs") { () throws(NetlinkError) in
            try socket.qdiscs(ifindex: guest.index).first { $0.parent == TC_H_INGRESS }
        }
        if let existing {
            if existing.kind != "ingress" { throw .clsactPresent(interface) }
            let filters = try wrap(interface, "reading its ingress filters") { () throws(NetlinkError) in
                try socket.filters(ifindex: guest.index, parent: TCHandle.ingress)
            }
            if !filters.isEmpty { throw .foreignIngressFilters(interface: interface, count: filterCount(filters)) }
        }
        let ownsIngress = existing == nil
        let ifbName = NetbufNaming.ifbName(forGuestIfindex: guest.index)

        // Same MTU as the guest interface, so that nothing the guest may send is too big for it.
        try step(interface, "creating ifb device \(ifbName)", socket) { () throws(NetlinkError) in
            try socket.addLink(name: ifbName, kind: "ifb", mtu: guest.mtu)
        }
        guard let ifb = try step(interface, "reading back \(ifbName)", socket, { () throws(NetlinkError) in
            try socket.link(named: ifbName)
        }) else {
            rollBack(guest, socket: socket)
            throw NetbufError.setupFailed(interface: interface, step: "reading back \(ifbName)",
                                          NetlinkError(call: "rtnl_link_get_kernel(\(ifbName))", code: NLE_OBJ_NOTFOUND))
        }
        let record = NetbufNaming.AliasRecord(guestName: guest.name, ownsIngressQdisc: ownsIngress)
        try step(interface, "labelling \(ifbName)", socket) { () throws(NetlinkError) in
            try socket.setAlias(index: ifb.index, record.text)
        }
        if case .plug(let limit) = queue {
            do {
                try socket.addPlugQdisc(ifindex: ifb.index, limitBytes: limit)
            } catch {
                rollBack(guest, socket: socket)
                if error.isNotFound || error.isNotSupported { throw NetbufError.plugUnavailable(interface: interface, error) }
                if error.isPermissionDenied { throw NetbufError.permissionDenied(error) }
                throw NetbufError.setupFailed(interface: interface, step: "adding the plug qdisc to \(ifbName)", error)
            }
        }
        if ownsIngress {
            try step(interface, "adding the ingress qdisc", socket) { () throws(NetlinkError) in
                try socket.addIngressQdisc(ifindex: guest.index)
            }
        }
        try step(interface, "adding the redirect filter to \(ifbName)", socket) { () throws(NetlinkError) in
            try socket.addRedirectAllFilter(ifindex: guest.index, target: ifb.index, priority: NetbufNaming.filterPriority)
        }
        let attachment = NetbufAttachment(
            interface: guest.name, interfaceIndex: guest.index,
            ifbName: ifbName, ifbIndex: ifb.index, ownsIngressQdisc: ownsIngress)
        return (attachment, leftovers)
    }

    /// Finds the buffer an earlier `attach` left in the kernel for `interface` (the one-shot CLI
    /// operations use this: the plug's state lives in the kernel).
    public static func find(interface: String, socket: NetlinkSocket) throws(NetbufError) -> NetbufAttachment {
        let guest = try lookUpGuest(interface, socket: socket)
        let ifbName = NetbufNaming.ifbName(forGuestIfindex: guest.index)
        guard let ifb = try wrap(interface, "looking up \(ifbName)", { () throws(NetlinkError) in
            try socket.link(named: ifbName)
        }), ifb.kind == "ifb" else { throw .notSetUp(interface) }
        let record = NetbufNaming.AliasRecord(parsing: ifb.alias)
        return NetbufAttachment(
            interface: guest.name, interfaceIndex: guest.index, ifbName: ifbName, ifbIndex: ifb.index,
            ownsIngressQdisc: record?.ownsIngressQdisc ?? true)
    }

    /// Sends one raw command to the plug of an attachment (the CLI's one-shot operations; the
    /// epoch bookkeeping of `PlugOutputBuffer` is bypassed).
    public static func send(_ command: PlugCommand, to attachment: NetbufAttachment, socket: NetlinkSocket) throws(NetbufError) {
        do {
            try PlugQdisc(ifindex: attachment.ifbIndex).send(command, on: socket)
        } catch {
            if error.isPermissionDenied { throw .permissionDenied(error) }
            if error.isNotFound { throw .notSetUp(attachment.interface) }
            throw .epochCommandFailed(interface: attachment.interface, ifb: attachment.ifbName,
                                      command: command.rawValue, epoch: nil, error)
        }
    }

    /// Removes our buffer from one interface, restoring it as it was before setup: the redirect
    /// filter, the ingress qdisc if we created it, and the ifb device (held packets are discarded).
    /// Idempotent: finding nothing is success. `interface` may also be one of our ifb names
    /// (`rb-12`), or the name of a guest interface that no longer exists (its ifb is found through
    /// the alias).
    @discardableResult
    public static func cleanup(interface: String, socket: NetlinkSocket) throws(NetbufError) -> CleanupReport {
        if let index = NetbufNaming.guestIfindex(fromIFBName: interface) {
            let guest = try wrapCleanup(interface, "looking up ifindex \(index)") { () throws(NetlinkError) in
                try socket.link(index: index)
            }
            return try cleanup(guestIndex: index, guestName: guest?.name ?? interface, socket: socket)
        }
        if let guest = try wrapCleanup(interface, "looking it up", { () throws(NetlinkError) in
            try socket.link(named: interface)
        }) {
            return try cleanup(guestIndex: guest.index, guestName: guest.name, socket: socket)
        }
        // The guest interface is gone (a destroyed Xen domain): look for ifbs whose alias names it.
        var report = CleanupReport()
        let orphans = try wrapCleanup(interface, "listing interfaces") { () throws(NetlinkError) in
            try socket.links().filter {
                $0.kind == "ifb" && NetbufNaming.guestIfindex(fromIFBName: $0.name) != nil
                    && NetbufNaming.AliasRecord(parsing: $0.alias)?.guestName == interface
            }
        }
        for ifb in orphans {
            report.merge(try cleanup(guestIndex: NetbufNaming.guestIfindex(fromIFBName: ifb.name)!, guestName: interface, socket: socket))
        }
        return report
    }

    /// Removes every buffer of ours in this network namespace: each `rb-<n>` ifb device with its
    /// guest interface's filter and ingress qdisc, and our filter on any interface whose ifb is
    /// already gone. Idempotent.
    @discardableResult
    public static func cleanupAll(socket: NetlinkSocket) throws(NetbufError) -> CleanupReport {
        var report = CleanupReport()
        let links = try wrapCleanup("all interfaces", "listing interfaces") { () throws(NetlinkError) in
            try socket.links()
        }
        var guests = Set<Int32>()
        for link in links where link.kind == "ifb" {
            if let index = NetbufNaming.guestIfindex(fromIFBName: link.name) { guests.insert(index) }
        }
        // Interfaces carrying our filter whose ifb was deleted by hand.
        let ingressIndices = try wrapCleanup("all interfaces", "listing qdiscs") { () throws(NetlinkError) in
            try socket.qdiscs().filter { $0.kind == "ingress" }.map(\.ifindex)
        }
        for index in ingressIndices where !guests.contains(index) {
            let filters = try wrapCleanup("ifindex \(index)", "reading ingress filters") { () throws(NetlinkError) in
                try socket.filters(ifindex: index, parent: TCHandle.ingress)
            }
            if filters.contains(where: isOurs) { guests.insert(index) }
        }
        for index in guests.sorted() {
            let name = links.first { $0.index == index }?.name ?? NetbufNaming.ifbName(forGuestIfindex: index)
            report.merge(try cleanup(guestIndex: index, guestName: name, socket: socket))
        }
        return report
    }

    /// Removes our objects for the guest interface with index `guestIndex` (which may no longer
    /// exist). Order: stop the redirect first, then delete the ifb and its plug.
    static func cleanup(guestIndex: Int32, guestName: String, socket: NetlinkSocket) throws(NetbufError) -> CleanupReport {
        var report = CleanupReport()
        let ifbName = NetbufNaming.ifbName(forGuestIfindex: guestIndex)
        // Ours: an ifb with our name whose alias is ours, or unset (a crash right after creating it).
        let ifb = try wrapCleanup(guestName, "looking up \(ifbName)") { () throws(NetlinkError) in
            try socket.link(named: ifbName).flatMap { link in
                link.kind == "ifb" && ((link.alias ?? "").isEmpty || NetbufNaming.AliasRecord(parsing: link.alias) != nil) ? link : nil
            }
        }
        let record = NetbufNaming.AliasRecord(parsing: ifb?.alias)

        let guestExists = try wrapCleanup(guestName, "looking it up") { () throws(NetlinkError) in
            try socket.link(index: guestIndex) != nil
        }
        if guestExists {
            let ingress = try wrapCleanup(guestName, "reading its qdiscs") { () throws(NetlinkError) in
                try socket.qdiscs(ifindex: guestIndex).first { $0.parent == TC_H_INGRESS && $0.kind == "ingress" }
            }
            if ingress != nil {
                let filters = try wrapCleanup(guestName, "reading its ingress filters") { () throws(NetlinkError) in
                    try socket.filters(ifindex: guestIndex, parent: TCHandle.ingress)
                }
                let ours = filters.filter(isOurs)
                if !ours.isEmpty {
                    try ignoringNotFound(guestName, "removing our ingress filter") { () throws(NetlinkError) in
                        try socket.deleteFilters(ifindex: guestIndex, parent: TCHandle.ingress,
                                                 priority: NetbufNaming.filterPriority,
                                                 ethProtocol: UInt16(ETH_P_ALL), kind: "u32")
                    }
                    report.removed.append("removed filter pref \(NetbufNaming.filterPriority) (u32, all protocols → mirred "
                        + "redirect) from \(guestName) ingress")
                }
                // Delete the ingress qdisc if it is ours: the alias says so, or (ifb gone) we found
                // our filter on it. Never while other filters remain.
                let evidence = record.map(\.ownsIngressQdisc) ?? !ours.isEmpty
                if evidence {
                    let remaining = try wrapCleanup(guestName, "reading its ingress filters") { () throws(NetlinkError) in
                        try socket.filters(ifindex: guestIndex, parent: TCHandle.ingress)
                    }
                    if remaining.isEmpty {
                        try ignoringNotFound(guestName, "removing the ingress qdisc") { () throws(NetlinkError) in
                            try socket.deleteIngressQdisc(ifindex: guestIndex)
                        }
                        report.removed.append("removed ingress qdisc ffff: from \(guestName)")
                    }
                }
            }
        }
        if let ifb {
            let held = try wrapCleanup(guestName, "reading \(ifbName)'s plug") { () throws(NetlinkError) in
                try socket.qdiscs(ifindex: ifb.index).first { $0.kind == "plug" }?.queueLength ?? 0
            }
            try ignoringNotFound(guestName, "deleting \(ifbName)") { () throws(NetlinkError) in
                try socket.deleteLink(index: ifb.index)
            }
            report.removed.append("deleted ifb device \(ifbName) (with its plug qdisc)")
            report.discardedPackets += held
        }
        return report
    }

    /// Whether a dumped filter is our redirect filter.
    static func isOurs(_ filter: NetlinkSocket.Filter) -> Bool {
        filter.kind == "u32" && filter.priority == NetbufNaming.filterPriority
    }

    /// A u32 filter shows up as several dump entries (hash table, node); count priorities.
    static func filterCount(_ filters: [NetlinkSocket.Filter]) -> Int {
        Set(filters.map { "\($0.kind)/\($0.priority)/\($0.ethProtocol)" }).count
    }

    static func lookUpGuest(_ interface: String, socket: NetlinkSocket) throws(NetbufError) -> NetlinkSocket.Link {
        guard !interface.isEmpty, interface.utf8.count <= 15 else {
            throw .unsuitableInterface(interface, reason: "interface names are 1 to 15 bytes")
        }
        let found: NetlinkSocket.Link?
        do { found = try socket.link(named: interface) } catch {
            if error.isPermissionDenied { throw .permissionDenied(error) }
            throw .netlink(error)
        }
        guard let guest = found else { throw .interfaceNotFound(interface) }
        if guest.name == "lo" { throw .unsuitableInterface(interface, reason: "it is the loopback interface") }
        if guest.kind == "ifb", NetbufNaming.guestIfindex(fromIFBName: guest.name) != nil {
            throw .unsuitableInterface(interface, reason: "it is one of remusd's own ifb devices")
        }
        return guest
    }

    private static func rollBack(_ guest: NetlinkSocket.Link, socket: NetlinkSocket) {
        // Best effort: the error that got us here is the one worth reporting.
        _ = try? cleanup(guestIndex: guest.index, guestName: guest.name, socket: socket)
    }

    /// Runs one setup step; on failure removes the partial setup and throws `setupFailed`.
    @discardableResult
    private static func step<R>(
        _ interface: String, _ what: String, _ socket: NetlinkSocket, _ body: () throws(NetlinkError) -> R
    ) throws(NetbufError) -> R {
        do { return try body() } catch {
            if let guest = try? socket.link(named: interface) { rollBack(guest, socket: socket) }
            if error.isPermissionDenied { throw .permissionDenied(error) }
            throw .setupFailed(interface: interface, step: what, error)
        }
    }

    private static func wrap<R>(_ interface: String, _ what: String, _ body: () throws(NetlinkError) -> R) throws(NetbufError) -> R {
        do { return try body() } catch {
            if error.isPermissionDenied { throw .permissionDenied(error) }
            throw .setupFailed(interface: interface, step: what, error)
        }
    }

    private static func wrapCleanup<R>(_ interface: String, _ what: String, _ body: () throws(NetlinkError) -> R) throws(NetbufError) -> R {
        do { return try body() } catch {
            if error.isPermissionDenied { throw .permissionDenied(error) }
            throw .cleanupFailed(interface: interface, step: what, error)
        }
    }

    /// A delete that finds the object already gone has done its job (idempotent cleanup; another
    /// cleanup may race with us).
    private static func ignoringNotFound(_ interface: String, _ what: String, _ body: () throws(NetlinkError) -> Void) throws(NetbufError) {
        do { try body() } catch {
            if error.isNotFound { return }
            if error.isPermissionDenied { throw .permissionDenied(error) }
            throw .cleanupFailed(interface: interface, step: what, error)
        }
    }
}
