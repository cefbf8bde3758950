/// Why setting up, driving or removing a network output buffer failed. Every message says what
/// happened, what stayed safe, and what to do next.
public enum NetbufError: Error, CustomStringConvertible, Sendable {
    /// The guest interface does not exist in this network namespace.
    case interfaceNotFound(String)
    /// The interface cannot be buffered (loopback, one of our own ifb devices, …).
    case unsuitableInterface(String, reason: String)
    /// The same interface was given twice.
    case duplicateInterface(String)
    /// The ingress qdisc of the interface already carries filters we did not create; they could
    /// divert packets before ours sees them.
    case foreignIngressFilters(interface: String, count: Int)
    /// The interface has a `clsact` qdisc, which RemusNetbuf does not share.
    case clsactPresent(String)
    /// The kernel has no `plug` qdisc (module sch_plug missing).
    case plugUnavailable(interface: String, NetlinkError)
    /// The caller lacks CAP_NET_ADMIN.
    case permissionDenied(NetlinkError)
    /// The byte limit does not fit the kernel's field (1 … 2^31-1 bytes).
    case invalidLimit(Int)
    /// A setup step failed; everything set up so far was removed again.
    case setupFailed(interface: String, step: String, NetlinkError)
    /// A teardown or cleanup step failed.
    case cleanupFailed(interface: String, step: String, NetlinkError)
    /// An epoch command (barrier, release) failed on one interface.
    case epochCommandFailed(interface: String, ifb: String, command: String, epoch: UInt64?, NetlinkError)
    /// `closeEpoch` was called with an epoch not above the last closed one.
    case epochNotIncreasing(closing: UInt64, lastClosed: UInt64)
    /// No buffer is set up for the interface (no ifb device with our name, or no plug on it).
    case notSetUp(String)
    /// The buffer was torn down; it no longer holds or releases anything.
    case tornDown
    /// A netlink call failed outside setup, epochs and cleanup (e.g. reading statistics).
    case netlink(NetlinkError)

    public var description: String {
        switch self {
        case .interfaceNotFound(let name):
            return "network interface '\(name)' does not exist in this network namespace; nothing was changed. "
                + "Check the name with 'ip link' (a Xen guest's interface is vif<domid>.<n>)."
        case .unsuitableInterface(let name, let reason):
            return "cannot buffer the output of '\(name)': \(reason); nothing was changed. Give the guest's own interface."
        case .duplicateInterface(let name):
            return "interface '\(name)' was given twice; nothing was changed. Name each guest interface once."
        case .foreignIngressFilters(let name, let count):
            return "interface '\(name)' already has \(count) ingress filter(s) that remusd did not create; they could pass "
                + "packets around the output buffer, so nothing was changed. Inspect them with "
                + "'tc filter show dev \(name) ingress' and remove them before protecting this guest."
        case .clsactPresent(let name):
            return "interface '\(name)' has a clsact qdisc; remusd needs its own ingress qdisc there, so nothing was "
                + "changed. Remove it ('tc qdisc del dev \(name) clsact') or its user first."
        case .plugUnavailable(let name, let error):
            return "the kernel has no 'plug' qdisc (\(error.message)), so the output of '\(name)' cannot be buffered; "
                + "the partial setup was removed and guest traffic flows unbuffered as before. Load it with "
                + "'modprobe sch_plug' (CONFIG_NET_SCH_PLUG) and retry."
        case .permissionDenied(let error):
            return "not allowed to change network configuration (\(error.description)); nothing was changed. "
                + "Run remusd as root or with CAP_NET_ADMIN."
        case .invalidLimit(let limit):
            return "buffer limit \(limit) bytes is out of range (1 … 2147483647); nothing was changed."
        case .setupFailed(let name, let step, let error):
            return "setting up the output buffer for '\(name)' failed while \(step): \(error.description); "
                + "the partial setup was removed and guest traffic flows unbuffered as before. "
                + "If it persists, run 'remusd netbuf cleanup \(name)' and check 'dmesg'."
        case .cleanupFailed(let name, let step, let error):
            return "removing the output buffer of '\(name)' failed while \(step): \(error.description); "
                + "held packets stay held (none is released by a failed cleanup). Retry 'remusd netbuf cleanup \(name)'; "
                + "inspect with 'tc filter show dev \(name) ingress' and 'ip link show type ifb'."
        case .epochCommandFailed(let name, let ifb, let command, let epoch, let error):
            let which = epoch.map { " for epoch \($0)" } ?? ""
            return "\(command)\(which) on '\(name)' (plug on \(ifb)) failed: \(error.description); output of that "
                + "interface stays held and leaves with a later acknowledged epoch, never early. If this repeats, stop "
                + "protection and run 'remusd netbuf cleanup \(name)'."
        case .epochNotIncreasing(let closing, let last):
            return "closeEpoch(\(closing)) after epoch \(last) was already closed: epochs must increase; no barrier was "
                + "inserted and held output stays held. This is a bug in the caller."
        case .notSetUp(let name):
            return "no output buffer is set up for '\(name)' (no \(NetbufNaming.ifbPrefix)<ifindex> ifb with a plug qdisc); "
                + "nothing was changed. Set one up with 'remusd netbuf setup \(name)'."
        case .tornDown:
            return "this output buffer was torn down; it no longer holds or releases output. Create a new one."
        case .netlink(let error):
            return error.description
        }
    }
}
