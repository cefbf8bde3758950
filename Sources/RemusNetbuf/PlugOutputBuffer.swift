import CNetlink
import Glibc
import RemusCore
import RemusSystem
import Synchronization

/// Counters of one interface's plug, read from the kernel.
public struct InterfaceBufferStatistics: Equatable, Sendable {
    /// The guest interface.
    public var interface: String
    /// Its ifb device, where the plug sits.
    public var ifb: String
    /// Packets held (or released and not yet sent) right now.
    public var heldPackets: UInt64
    /// Bytes held right now.
    public var heldBytes: UInt64
    /// Packets the plug dropped because its byte limit was reached, since setup.
    public var drops: UInt64
    /// The qdisc's overlimit counter since setup (sch_plug counts a full buffer as drops).
    public var overlimits: UInt64
    /// Drops since the previous read: non-zero means the buffer overflowed in between and guest
    /// packets were lost (never released early).
    public var newDrops: UInt64
    /// The byte limit of the plug.
    public var limitBytes: Int

    /// A sentence for the log when the buffer overflowed since the previous read, nil otherwise.
    public var overflowMessage: String? {
        guard newDrops > 0 else { return nil }
        return "output buffer of \(interface) (\(ifb)) overflowed: \(newDrops) packet(s) dropped since the last read "
            + "(limit \(limitBytes) bytes, \(drops) in total); nothing was released early, but the guest lost those "
            + "packets (TCP resends them). Raise the limit or shorten the epoch."
    }
}

/// Network output buffering for one guest, with one plug qdisc per guest interface (RemusCore's
/// `OutputBuffer`; see `Docs/netbuf.md`).
///
/// Creating it sets up every interface (removing leftovers of a crashed run first) and starts
/// holding output at once: output before the first `closeEpoch` belongs to the first epoch.
/// Each epoch operation fans out to every interface's plug, one netlink round trip each; the
/// calls block, so make them from a dedicated thread. `teardown()` (or `deinit`) removes
/// everything and restores the interfaces; packets still held then are discarded, not released —
/// call `releaseAll()` first on a clean stop.
public final class PlugOutputBuffer: OutputBuffer, Sendable {
    /// One entry per guest interface, in the order given.
    public let attachments: [NetbufAttachment]
    /// Leftovers of an earlier run that setup removed first.
    public let leftoversRemoved: CleanupReport
    /// Byte limit of each interface's plug.
    public let limitBytes: Int

    private struct Plug {
        var attachment: NetbufAttachment
        var qdisc: PlugQdisc
        var ledger = PlugLedger()
        var lastDrops: UInt64 = 0
    }

    private struct State {
        var socket: NetlinkSocket
        var plugs: [Plug]
        var tornDown = false
    }

    // The socket and the libnl objects are not thread-safe: every use goes through this lock.
    private let state: Mutex<State>

    /// Sets up buffering for `interfaces` of one guest, each with a plug of `limitBytes` bytes.
    /// On failure nothing stays set up.
    ///
    /// - Parameters:
    ///   - interfaces: the guest's interfaces in this network namespace (`vif3.0`, `tap0`, a veth).
    ///   - limitBytes: bytes each plug may hold before it drops (default 10 MiB).
    public init(interfaces: [String], limitBytes: Int = NetbufPlumbing.defaultLimitBytes) throws(NetbufError) {
        let limit = try NetbufPlumbing.validatedLimit(limitBytes)
        var seen = Set<String>()
        for name in interfaces where !seen.insert(name).inserted { throw .duplicateInterface(name) }
        let socket: NetlinkSocket
        do { socket = try NetlinkSocket() } catch { throw .netlink(error) }

        var plugs: [Plug] = []
        var leftovers = CleanupReport()
        do throws(NetbufError) {
            for name in interfaces {
                let (attachment, removed) = try NetbufPlumbing.attach(interface: name, queue: .plug(limitBytes: limit), socket: socket)
                leftovers.merge(removed)
                let qdisc: PlugQdisc
                do throws(NetlinkError) { qdisc = try PlugQdisc(ifindex: attachment.ifbIndex) } catch {
                    _ = try? NetbufPlumbing.cleanup(interface: name, socket: socket)
                    throw NetbufError.setupFailed(interface: name, step: "preparing plug commands", error)
                }
                plugs.append(Plug(attachment: attachment, qdisc: qdisc))
            }
        } catch {
            for plug in plugs.reversed() {
                _ = try? NetbufPlumbing.cleanup(
                    guestIndex: plug.attachment.interfaceIndex, guestName: plug.attachment.interface, socket: socket)
            }
            throw error
        }
        self.attachments = plugs.map(\.attachment)
        self.leftoversRemoved = leftovers
        self.limitBytes = limitBytes
        self.state = Mutex(State(socket: socket, plugs: plugs))
    }

    deinit {
        _ = try? teardown()
    }

    // MARK: OutputBuffer

    /// Inserts the barrier that ends `epoch` on every interface. Call while the guest is suspended.
    public func closeEpoch(_ epoch: Epoch) throws(NetbufError) {
        try fanOut(epoch: epoch) { ledger, send in try ledger.close(epoch, send: send) }
    }

    /// Releases every closed epoch ≤ `epoch` that the kernel can tell apart (see `PlugLedger`).
    public func release(through epoch: Epoch) throws(NetbufError) {
        try fanOut(epoch: epoch) { ledger, send in try ledger.acknowledge(through: epoch, send: send) }
    }

    /// Releases everything held and stops holding.
    public func releaseAll() throws(NetbufError) {
        try fanOut(epoch: nil) { ledger, send in try ledger.releaseAll(send: send) }
    }

    /// Starts holding again after `releaseAll`.
    public func hold() throws(NetbufError) {
        // Packets still queued from the unplugged period would not be counted by the kernel's
        // next epoch and would shift every later release by their number (late, never early).
        // Give them a moment to drain before the barrier.
        waitForDrain(deadlineNanoseconds: 100_000_000)
        try fanOut(epoch: nil) { ledger, send in try ledger.hold(send: send) }
    }

    /// Held packets and bytes, drops and overlimits, summed over the interfaces.
    public func statistics() throws(NetbufError) -> OutputStatistics {
        var total = OutputStatistics()
        for entry in try interfaceStatistics() {
            total.heldPackets += entry.heldPackets
            total.heldBytes += entry.heldBytes
            total.drops += entry.drops
            total.overlimits += entry.overlimits
        }
        return total
    }

    /// Counters per interface, from one qdisc dump; `newDrops` counts since the previous call.
    public func interfaceStatistics() throws(NetbufError) -> [InterfaceBufferStatistics] {
        try state.withLock { state throws(NetbufError) -> [InterfaceBufferStatistics] in
            guard !state.tornDown else { throw NetbufError.tornDown }
            let qdiscs: [NetlinkSocket.Qdisc]
            do throws(NetlinkError) { qdiscs = try state.socket.qdiscs() } catch { throw NetbufError.netlink(error) }
            var result: [InterfaceBufferStatistics] = []
            for index in state.plugs.indices {
                let attachment = state.plugs[index].attachment
                guard let plug = qdiscs.first(where: { $0.ifindex == attachment.ifbIndex && $0.kind == "plug" }) else {
                    throw NetbufError.notSetUp(attachment.interface)
                }
                let newDrops = plug.drops &- state.plugs[index].lastDrops
                state.plugs[index].lastDrops = plug.drops
                result.append(InterfaceBufferStatistics(
                    interface: attachment.interface, ifb: attachment.ifbName,
                    heldPackets: plug.queueLength, heldBytes: plug.backlogBytes,
                    drops: plug.drops, overlimits: plug.overlimits, newDrops: newDrops, limitBytes: limitBytes))
            }
            return result
        }
    }

    /// Each interface's epoch bookkeeping (for logs and tests).
    public func ledgers() -> [PlugLedger] {
        state.withLock { state in state.plugs.map(\.ledger) }
    }

    /// Removes every interface's buffer and restores the interfaces; held packets are discarded.
    /// Idempotent.
    @discardableResult
    public func teardown() throws(NetbufError) -> CleanupReport {
        try state.withLock { state throws(NetbufError) -> CleanupReport in
            guard !state.tornDown else { return CleanupReport() }
            var report = CleanupReport()
            var firstError: NetbufError?
            for plug in state.plugs.reversed() {
                do throws(NetbufError) {
                    report.merge(try NetbufPlumbing.cleanup(
                        guestIndex: plug.attachment.interfaceIndex, guestName: plug.attachment.interface, socket: state.socket))
                } catch {
                    firstError = firstError ?? error
                }
            }
            if let firstError { throw firstError }
            state.tornDown = true
            return report
        }
    }

    // MARK: Fan-out

    /// Applies one ledger operation to every interface. Every interface is tried even if one
    /// fails, so the others stay in step; the first failure is thrown afterwards.
    private func fanOut(
        epoch: Epoch?, _ operation: (inout PlugLedger, (PlugCommand) throws -> Void) throws -> Void
    ) throws(NetbufError) {
        try state.withLock { state throws(NetbufError) in
            guard !state.tornDown else { throw NetbufError.tornDown }
            var firstError: NetbufError?
            let socket = state.socket
            for index in state.plugs.indices {
                let plug = state.plugs[index]
                do {
                    try operation(&state.plugs[index].ledger) { command in
                        do throws(NetlinkError) { try plug.qdisc.send(command, on: socket) } catch {
                            throw NetbufError.epochCommandFailed(
                                interface: plug.attachment.interface, ifb: plug.attachment.ifbName,
                                command: command.rawValue, epoch: epoch, error)
                        }
                    }
                } catch let error as NetbufError {
                    firstError = firstError ?? error
                } catch {
                    preconditionFailure("ledger operations throw NetbufError only, got \(error)")
                }
            }
            if let firstError { throw firstError }
        }
    }

    private func waitForDrain(deadlineNanoseconds: UInt64) {
        let start = monotonicNanoseconds()
        while monotonicNanoseconds() - start < deadlineNanoseconds {
            let queued: UInt64? = state.withLock { state in
                guard !state.tornDown, let qdiscs = try? state.socket.qdiscs() else { return nil }
                let ifbs = Set(state.plugs.map(\.attachment.ifbIndex))
                return qdiscs.filter { ifbs.contains($0.ifindex) && $0.kind == "plug" }.reduce(0) { $0 + $1.queueLength }
            }
            guard let queued, queued > 0 else { return }
            usleep(1_000)
        }
    }
}
