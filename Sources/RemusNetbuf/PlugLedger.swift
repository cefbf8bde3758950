import RemusCore

/// A command to the kernel's plug qdisc (`struct tc_plug_qopt.action`).
public enum PlugCommand: String, Sendable, CaseIterable {
    /// `TCQ_PLUG_BUFFER`: insert a barrier. Packets queued so far form the closed epoch; later
    /// packets the next one. Also starts holding again after `releaseIndefinite`.
    case buffer
    /// `TCQ_PLUG_RELEASE_ONE`: let out the packets of the closed epoch.
    case releaseOne = "release-one"
    /// `TCQ_PLUG_RELEASE_INDEFINITE`: let everything out and stop holding.
    case releaseIndefinite = "release-indefinite"
}

/// Maps the engine's epochs onto the kernel plug's barriers, for one plug.
///
/// The kernel's plug remembers exactly **one** closed epoch (`pkts_last_epoch` in
/// net/sched/sch_plug.c): a second `TCQ_PLUG_BUFFER` before `TCQ_PLUG_RELEASE_ONE` overwrites
/// that count, and the next release then lets out a wrong number of packets — possibly output of
/// an epoch the backup has not acknowledged. So when the engine closes epoch N+1 while epoch N is
/// still unacknowledged, no barrier is sent: epoch N+1's output joins the next barrier and leaves
/// with a later acknowledgement. Output may leave later than its ACK, never earlier (invariant I1).
///
/// State only advances after the kernel accepted a command (`send` returned), so a failed command
/// is retried by the next call and a failure can delay output but never release it early.
public struct PlugLedger: Equatable, Sendable {
    /// Whether the plug holds output (false between `releaseAll` and `hold`). A new plug holds.
    public private(set) var holding = true
    /// The engine epoch whose end is the kernel's one closed, unreleased barrier.
    public private(set) var pendingBarrier: Epoch?
    /// Highest epoch closed by the engine.
    public private(set) var closedThrough: Epoch = 0
    /// Highest epoch acknowledged by the backup (capped at `closedThrough`).
    public private(set) var acknowledgedThrough: Epoch = 0
    /// Highest epoch whose output has been let out.
    public private(set) var releasedThrough: Epoch = 0

    public init() {}

    /// The engine closed `epoch` (the guest is suspended): insert a barrier unless the kernel's
    /// one slot is taken by an unacknowledged epoch, in which case `epoch` joins the next barrier.
    public mutating func close(_ epoch: Epoch, send: (PlugCommand) throws -> Void) throws {
        guard epoch > closedThrough else {
            throw NetbufError.epochNotIncreasing(closing: epoch, lastClosed: closedThrough)
        }
        closedThrough = epoch
        guard holding else {
            // Nothing is held: the output of this epoch has already left.
            releasedThrough = epoch
            acknowledgedThrough = max(acknowledgedThrough, epoch)
            return
        }
        try releaseIfAcknowledged(send)
        if pendingBarrier == nil {
            try send(.buffer)
            pendingBarrier = epoch
        }
    }

    /// The backup acknowledged every epoch up to `epoch`: release the barrier it covers, if any.
    public mutating func acknowledge(through epoch: Epoch, send: (PlugCommand) throws -> Void) throws {
        acknowledgedThrough = max(acknowledgedThrough, min(epoch, closedThrough))
        guard holding else { return }
        try releaseIfAcknowledged(send)
    }

    /// Let everything out and stop holding.
    public mutating func releaseAll(send: (PlugCommand) throws -> Void) throws {
        try send(.releaseIndefinite)
        holding = false
        pendingBarrier = nil
        releasedThrough = closedThrough
        acknowledgedThrough = max(acknowledgedThrough, closedThrough)
    }

    /// Start holding again; output from now on belongs to the next epoch closed.
    public mutating func hold(send: (PlugCommand) throws -> Void) throws {
        guard !holding else { return }
        try send(.buffer)
        holding = true
    }

    private mutating func releaseIfAcknowledged(_ send: (PlugCommand) throws -> Void) throws {
        if let barrier = pendingBarrier, acknowledgedThrough >= barrier {
            try send(.releaseOne)
            pendingBarrier = nil
            releasedThrough = barrier
        }
    }
}
