// The simulated NIC's output buffer: an in-process queue with the epoch barriers of OutputBuffer.

import RemusCore
import Synchronization
import RemusSystem

/// Where released packets go: an observer socket, a recorder in a test.
public protocol PacketSink: AnyObject, Sendable {
    /// Receives released packets in emission order, each exactly once. Called by one thread at a
    /// time and never with the output buffer's lock held.
    func deliver(_ packets: [SimPacket])
}

/// Holds back the simulated guest's packets until the backup committed the epoch that emitted
/// them (invariant I1), with exactly the epoch protocol documented on `OutputBuffer`.
///
/// vCPU threads call `emit` in the middle of an op; ops never straddle a suspend, so every packet
/// lands on the same side of `closeEpoch` as the vCPU state captured for that checkpoint.
///
/// Delivery happens outside the lock: whichever thread finds the outbox idle delivers until it
/// is empty, so packets reach the sink in order even when `release` and pass-through `emit` race.
/// A `release` may therefore return while another thread is still delivering its packets.
public final class SimOutputBuffer: OutputBuffer, Sendable {
    private struct ClosedEpoch {
        var epoch: Epoch
        var packets: [SimPacket]
    }

    private struct State {
        var open: [SimPacket] = []
        var closed: [ClosedEpoch] = []
        var lastClosed: Epoch?
        var holding: Bool
        var heldCount = 0
        var outbox: [SimPacket] = []
        var delivering = false
        var drops: UInt64 = 0
        var overlimits: UInt64 = 0
        var delivered: UInt64 = 0
    }

    /// Where released packets go.
    public let sink: any PacketSink
    /// Most packets held at once; a packet emitted into a full buffer is dropped and counted.
    public let maxHeldPackets: Int
    private let state: Mutex<State>

    /// - Parameters:
    ///   - sink: receives released packets.
    ///   - maxHeldPackets: most packets held back at once (default 1 Mi).
    ///   - holding: whether output is held from the start (default true; false = pass through
    ///     until `hold()`).
    public init(sink: any PacketSink, maxHeldPackets: Int = 1 << 20, holding: Bool = true) {
        self.sink = sink
        self.maxHeldPackets = maxHeldPackets
        state = Mutex(State(holding: holding))
    }

    /// Called by the guest's NIC for each packet, in the emitting op. Holds it in the open epoch, or
    /// delivers it at once when not holding.
    public func emit(_ packet: SimPacket) {
        let deliverNow = state.withLock { s -> Bool in
            if s.holding {
                if s.heldCount >= maxHeldPackets {
                    s.drops += 1
                    s.overlimits += 1
                } else {
                    s.open.append(packet)
                    s.heldCount += 1
                }
                return false
            }
            s.outbox.append(packet)
            return claimDelivery(&s)
        }
        if deliverNow { drainOutbox() }
    }

    public func closeEpoch(_ epoch: Epoch) throws {
        try state.withLock { s throws(SimError) in
            if let last = s.lastClosed, epoch <= last { throw .epochOutOfOrder(epoch: epoch, lastClosed: last) }
            s.lastClosed = epoch
            if s.holding {
                s.closed.append(ClosedEpoch(epoch: epoch, packets: s.open))
                s.open.removeAll(keepingCapacity: true)
            }
        }
    }

    public func release(through epoch: Epoch) throws {
        let deliverNow = state.withLock { s -> Bool in
            let n = s.closed.prefix { $0.epoch <= epoch }.count
            guard n > 0 else { return false }
            for closed in s.closed[..<n] {
                s.outbox.append(contentsOf: closed.packets)
                s.heldCount -= closed.packets.count
            }
            s.closed.removeFirst(n)
            return claimDelivery(&s)
        }
        if deliverNow { drainOutbox() }
    }

    public func releaseAll() throws {
        let deliverNow = state.withLock { s -> Bool in
            for closed in s.closed { s.outbox.append(contentsOf: closed.packets) }
            s.outbox.append(contentsOf: s.open)
            s.closed.removeAll()
            s.open.removeAll(keepingCapacity: true)
            s.heldCount = 0
            s.holding = false
            return claimDelivery(&s)
        }
        if deliverNow { drainOutbox() }
    }

    public func hold() throws {
        state.withLock { $0.holding = true }
    }

    public func statistics() throws -> OutputStatistics {
        state.withLock { s in
            OutputStatistics(
                heldPackets: UInt64(s.heldCount), heldBytes: UInt64(s.heldCount * SimPacket.wireSize),
                drops: s.drops, overlimits: s.overlimits)
        }
    }

    /// Packets handed to the sink since start.
    public var deliveredCount: UInt64 { state.withLock { $0.delivered } }

    /// The closed epochs still held, oldest first, with their packet counts.
    public var heldEpochs: [(epoch: Epoch, packets: Int)] {
        state.withLock { s in s.closed.map { ($0.epoch, $0.packets.count) } }
    }

    /// Whether output is being held back (false between `releaseAll` and `hold`).
    public var isHolding: Bool { state.withLock { $0.holding } }

    /// Makes the caller the deliverer if nobody is; the lock is held.
    private func claimDelivery(_ s: inout State) -> Bool {
        guard !s.outbox.isEmpty, !s.delivering else { return false }
        s.delivering = true
        return true
    }

    /// Delivers the outbox in batches until it is empty; only the claimed deliverer calls this.
    private func drainOutbox() {
        while true {
            let batch = state.withLock { s -> [SimPacket] in
                if s.outbox.isEmpty {
                    s.delivering = false
                    return []
                }
                let batch = s.outbox
                s.outbox = []
                s.delivered += UInt64(batch.count)
                return batch
            }
            if batch.isEmpty { return }
            sink.deliver(batch)
        }
    }
}

/// A sink that keeps every delivered packet and lets a thread wait for a count: for tests and for
/// an in-process observer.
///
/// `@unchecked Sendable`: `packets` is only touched with `lock` held.
public final class SimPacketRecorder: PacketSink, @unchecked Sendable {
    private let lock = MonitorLock()
    private var packets: [SimPacket] = []

    public init() {}

    public func deliver(_ batch: [SimPacket]) {
        lock.withLock {
            packets.append(contentsOf: batch)
            lock.broadcast()
        }
    }

    /// Every packet delivered so far, in delivery order.
    public var received: [SimPacket] { lock.withLock { packets } }

    /// Number of packets delivered so far.
    public var count: Int { lock.withLock { packets.count } }

    /// Waits until at least `count` packets have arrived or `timeoutNs` of real time passed.
    /// Returns whether the count was reached.
    public func wait(forCount count: Int, timeoutNs: UInt64) -> Bool {
        let deadline = SystemHostClock().monotonicNs() &+ timeoutNs
        return lock.withLock {
            while packets.count < count {
                let now = SystemHostClock().monotonicNs()
                if now >= deadline { return false }
                lock.wait(nanoseconds: deadline - now)
            }
            return true
        }
    }

    /// Forgets every packet received so far.
    public func removeAll() { lock.withLock { packets.removeAll() } }
}
