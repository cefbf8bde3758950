/// Holds back everything a guest sends to the outside world until the backup has committed the
/// epoch that sent it (invariant I1). Implemented by the plug-qdisc buffer (RemusNetbuf) for real
/// interfaces and by an in-process queue for the simulated guest's NIC.
///
/// The epoch protocol:
/// - Output emitted before `closeEpoch(N)` and after `closeEpoch(N-1)` belongs to epoch N.
///   The runtime calls `closeEpoch(N)` while the guest is suspended for checkpoint N.
/// - `release(through: N)` lets out every closed epoch ≤ N not yet released, in order, each
///   exactly once (a coalesced ACK covers several epochs).
/// - `releaseAll()` stops buffering altogether (protection stopped or the backup lost).
/// - `hold()` starts buffering again after `releaseAll()`; output emitted from then on belongs to
///   the next epoch closed.
public protocol OutputBuffer: AnyObject {
    /// Inserts a barrier: output so far belongs to `epoch`, later output to the next epoch.
    func closeEpoch(_ epoch: Epoch) throws
    /// Releases every closed epoch ≤ `epoch` not yet released, in order.
    func release(through epoch: Epoch) throws
    /// Releases everything held and stops holding output back.
    func releaseAll() throws
    /// Starts holding output back again (after `releaseAll`).
    func hold() throws
    /// Counters read once per epoch.
    func statistics() throws -> OutputStatistics
}

/// What an output buffer holds and what it lost.
public struct OutputStatistics: Equatable, Sendable {
    /// Packets held back right now.
    public var heldPackets: UInt64
    /// Bytes held back right now.
    public var heldBytes: UInt64
    /// Packets dropped because the buffer was full, since start.
    public var drops: UInt64
    /// Times the byte limit was hit, since start.
    public var overlimits: UInt64
    public init(heldPackets: UInt64 = 0, heldBytes: UInt64 = 0, drops: UInt64 = 0, overlimits: UInt64 = 0) {
        self.heldPackets = heldPackets
        self.heldBytes = heldBytes
        self.drops = drops
        self.overlimits = overlimits
    }
}
