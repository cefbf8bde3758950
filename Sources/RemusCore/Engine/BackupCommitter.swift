/// The backup's side of the loop as a sans-I/O state machine: stage each checkpoint whole, commit
/// it only once verified, acknowledge only what is committed, and take over only after fencing.
///
/// The shell decodes and validates the stream (StreamDecoder, CheckpointValidator) and stages
/// content; this machine decides what happens with whole checkpoints and with silence.
///
/// Invariants it keeps:
/// - I1/I2: `.sendAck(N)` only after `onCommitted(N)`: an ACK means complete, verified and applied.
/// - I2: a checkpoint is committed only from `onCheckpointComplete`; anything else discards staging.
/// - I7: `.activate` only after `onFenced(success: true)` (or a planned switchover, where the
///   primary itself handed over).
public struct BackupCommitter: Sendable {
    public enum State: Equatable, Sendable {
        /// Waiting for a primary to connect.
        case listening
        /// A primary is connected and streaming; `committed` is the last committed epoch (0: none).
        case receiving(committed: Epoch)
        /// The primary is lost; fencing it before taking over (attempt number, from 1).
        case fencing(committed: Epoch, attempt: Int)
        /// Fencing is not configured: waiting for the operator (`remusd failover --activate`).
        case awaitingOperator(committed: Epoch)
        /// Resuming the guest from `committed`.
        case activating(committed: Epoch)
        /// The guest runs here now.
        case active(from: Epoch)
        /// Protection ended without activation (planned stop, or nothing to activate).
        case stopped(String)
    }

    /// How the backup may make sure the primary is off before taking over (I7).
    public enum FencePolicy: Equatable, Sendable {
        /// Run the operator's fence (command, or the drill's local fence); take over on success.
        case fence
        /// Never take over on silence alone; wait for the operator.
        case operatorOnly
        /// Take over without fencing (xl's behaviour; risks split brain).
        case unsafeNoFence
    }

    public enum Directive: Equatable, Sendable {
        /// Throw away the partly staged checkpoint.
        case discardStaged
        /// Apply the staged, verified checkpoint to the replica; report `onCommitted`.
        case commit(Epoch)
        /// Tell the primary `epoch` is committed.
        case sendAck(Epoch)
        /// Send a heartbeat with this sequence number.
        case sendHeartbeat(UInt64)
        /// Drop the connection to the primary.
        case closeConnection
        /// Make sure the primary is off; report `onFenced`.
        case fencePrimary
        /// Resume the guest from the last committed checkpoint; report `onActivated`.
        case activate(Epoch)
        /// Throw the replica away.
        case discardReplica
        /// Call `onTick` no later than this monotonic time.
        case scheduleTick(at: UInt64)
        /// Tell the operator.
        case report(String)
    }

    public let settings: ProtectionSettings
    public let fencePolicy: FencePolicy
    public private(set) var state: State = .listening
    /// When anything was last heard from the primary (monotonic ns).
    public private(set) var lastHeardAt: UInt64 = 0
    /// When the primary was found lost (monotonic ns), for detection and activation times.
    public private(set) var lossDetectedAt: UInt64?
    /// Whether a checkpoint was partly received when the primary was found lost (it was dropped).
    public private(set) var lostWhileStaging = false
    private var lastHeartbeatAt: UInt64 = 0
    private var heartbeatSequence: UInt64 = 0
    /// The checkpoint being staged, if any.
    private var staging: CheckpointBegin?
    /// Whether a primary's connection is open.
    public private(set) var connected = false
    /// Whether a fence is running now (its outcome is not known yet).
    public private(set) var fenceInFlight = false

    public init(settings: ProtectionSettings, fencePolicy: FencePolicy) {
        self.settings = settings
        self.fencePolicy = fencePolicy
    }

    /// The last committed epoch (0: none).
    public var committedEpoch: Epoch {
        switch state {
        case .listening, .stopped: return 0
        case .receiving(let c), .fencing(let c, _), .awaitingOperator(let c), .activating(let c): return c
        case .active(let from): return from
        }
    }

    // MARK: - Events

    /// Whether a primary may connect now (the shell refuses the connection otherwise).
    public var acceptsPrimary: Bool {
        switch state {
        case .listening, .stopped: return true
        case .receiving: return !connected
        // A primary that reconnects while we fence it is alive: take it back (it held its output),
        // unless a fence is running right now and may be switching it off.
        case .fencing: return !fenceInFlight
        case .awaitingOperator, .activating, .active: return false
        }
    }

    /// A primary connected and its stream header was accepted (the replica was configured anew:
    /// a new stream starts from a full synchronisation, so the old image no longer counts).
    public mutating func onPrimaryConnected(now: UInt64) -> [Directive] {
        precondition(acceptsPrimary, "primary connected in state \(state)")
        var out: [Directive] = []
        if case .fencing(let committed, _) = state {
            out.append(.report("the primary came back before it was fenced: fencing called off, checkpoint \(committed) superseded, resynchronising"))
        }
        lossDetectedAt = nil
        lostWhileStaging = false
        state = .receiving(committed: 0)
        connected = true
        staging = nil
        lastHeardAt = now
        lastHeartbeatAt = now
        return out + [.scheduleTick(at: now + settings.heartbeatNs)]
    }

    /// Bytes arrived from the primary.
    public mutating func onPeerActivity(now: UInt64) -> [Directive] {
        lastHeardAt = max(lastHeardAt, now)
        return []
    }

    /// CHECKPOINT_BEGIN was accepted by the validator.
    public mutating func onCheckpointBegan(_ begin: CheckpointBegin, now: UInt64) -> [Directive] {
        lastHeardAt = now
        guard case .receiving = state else { return [.discardStaged] }
        staging = begin
        return []
    }

    /// CHECKPOINT_END arrived and the validator verified count, digest and epoch; content staged.
    public mutating func onCheckpointComplete(_ end: CheckpointEnd, now: UInt64) -> [Directive] {
        lastHeardAt = now
        guard case .receiving = state, let begin = staging, begin.epoch == end.epoch else {
            staging = nil
            return [.discardStaged]
        }
        return [.commit(end.epoch)]
    }

    /// The replica applied `epoch`.
    public mutating func onCommitted(_ epoch: Epoch, now: UInt64) -> [Directive] {
        guard case .receiving = state, let begin = staging, begin.epoch == epoch else {
            preconditionFailure("committed \(epoch) in state \(state) staging \(String(describing: staging))")
        }
        staging = nil
        switch begin.kind {
        case .precopy:
            // Pre-copy pages build the image but are no checkpoint: nothing to acknowledge.
            return []
        case .checkpoint:
            state = .receiving(committed: epoch)
            return [.sendAck(epoch)]
        case .final:
            // A planned switchover: the primary stopped its guest and handed it over.
            state = .activating(committed: epoch)
            return [.sendAck(epoch), .report("final checkpoint \(epoch) committed; taking over as planned"), .activate(epoch)]
        }
    }

    /// Committing failed (the backend threw); the replica kept the previous checkpoint.
    public mutating func onCommitFailed(_ epoch: Epoch, reason: String, now: UInt64) -> [Directive] {
        staging = nil
        return [.closeConnection, .report("could not apply checkpoint \(epoch): \(reason); the replica keeps checkpoint \(committedEpoch); dropping the connection so the primary resynchronises")]
    }

    /// The stream was rejected (garbage, corruption, out of order). The replica keeps its last
    /// committed checkpoint; the primary is not assumed dead, the connection is dropped.
    public mutating func onStreamRejected(_ description: String, now: UInt64) -> [Directive] {
        staging = nil
        guard case .receiving(let committed) = state else { return [] }
        connected = false
        // The primary may well be alive (a bad link, a bad release): give it the timeout to
        // reconnect before counting it as lost (onTick).
        return [
            .discardStaged, .closeConnection,
            .report("rejected the primary's stream: \(description); the replica keeps checkpoint \(committed); waiting \(settings.timeoutNs / 1_000_000) ms for the primary to reconnect"),
        ]
    }

    /// The primary ended the stream on purpose.
    public mutating func onStreamEnd(_ end: StreamEnd, now: UInt64) -> [Directive] {
        guard case .receiving(let committed) = state else {
            // After a final checkpoint we already took over: just say goodbye.
            connected = false
            return [.closeConnection]
        }
        staging = nil
        connected = false
        switch end.reason {
        case .plannedStop:
            state = .stopped("protection stopped by the primary's operator")
            return [.discardStaged, .closeConnection, .discardReplica, .report("the primary stopped protection; the replica was discarded and will not be activated")]
        case .switchover:
            guard committed > 0 else {
                state = .stopped("switchover requested before any checkpoint was committed")
                return [.discardStaged, .closeConnection, .discardReplica, .report("the primary asked for a switchover but no checkpoint was committed; nothing to activate")]
            }
            state = .activating(committed: committed)
            return [.discardStaged, .closeConnection, .report("planned switchover: activating checkpoint \(committed)"), .activate(committed)]
        case .shutdown, .error:
            return [.discardStaged, .closeConnection, .report("the primary ended the stream (\(end.reason): \(end.message))")]
                + primaryLost(committed: committed, reason: "it ended its stream: \(end.message)", now: now)
        }
    }

    /// The connection closed or failed.
    public mutating func onConnectionLost(reason: String, now: UInt64) -> [Directive] {
        let wasStaging = staging != nil
        staging = nil
        guard case .receiving(let committed) = state, connected else { return [] }
        connected = false
        return [.discardStaged, .closeConnection] + primaryLost(committed: committed, reason: "connection lost: \(reason)", now: now, wasStaging: wasStaging)
    }

    /// Time passed.
    public mutating func onTick(now: UInt64) -> [Directive] {
        switch state {
        case .receiving(let committed):
            if now >= lastHeardAt + settings.timeoutNs {
                let wasStaging = staging != nil
                staging = nil
                connected = false
                let ms = (now - lastHeardAt) / 1_000_000
                return [.discardStaged, .closeConnection]
                    + primaryLost(committed: committed, reason: "nothing heard for \(ms) ms", now: now, wasStaging: wasStaging)
            }
            var out: [Directive] = []
            if connected && now >= lastHeartbeatAt + settings.heartbeatNs {
                heartbeatSequence += 1
                lastHeartbeatAt = now
                out.append(.sendHeartbeat(heartbeatSequence))
            }
            out.append(.scheduleTick(at: min(lastHeartbeatAt + settings.heartbeatNs, lastHeardAt + settings.timeoutNs)))
            return out
        case .fencing(let committed, let attempt):
            // A failed fence is retried every heartbeat interval; the guest stays down meanwhile.
            guard !fenceInFlight else { return [] }
            state = .fencing(committed: committed, attempt: attempt + 1)
            fenceInFlight = true
            return [.fencePrimary]
        case .listening, .awaitingOperator, .activating, .active, .stopped:
            return []
        }
    }

    /// The fence finished.
    public mutating func onFenced(success: Bool, detail: String, now: UInt64) -> [Directive] {
        guard case .fencing(let committed, let attempt) = state else { return [] }
        fenceInFlight = false
        guard success else {
            // Said once, then every 20th attempt: a lease running out takes a few seconds of retries.
            let say = attempt == 1 || attempt % 20 == 0
            return (say ? [.report("fencing the primary failed (attempt \(attempt)): \(detail); the guest stays down here until fencing succeeds; retrying every heartbeat")] : [])
                + [.scheduleTick(at: now + settings.heartbeatNs)]
        }
        state = .activating(committed: committed)
        return [.report("primary fenced (\(detail)); activating checkpoint \(committed)"), .activate(committed)]
    }

    /// The operator says the primary is off (`remusd failover --activate`).
    public mutating func onOperatorActivate(now: UInt64) -> [Directive] {
        switch state {
        case .awaitingOperator(let committed), .fencing(let committed, _):
            state = .activating(committed: committed)
            return [.report("activation confirmed by the operator; activating checkpoint \(committed)"), .activate(committed)]
        default:
            return [.report("nothing to activate in state \(state)")]
        }
    }

    /// The guest runs here now.
    public mutating func onActivated(now: UInt64) -> [Directive] {
        guard case .activating(let committed) = state else { preconditionFailure("activated in state \(state)") }
        state = .active(from: committed)
        return [.report("guest resumed from checkpoint \(committed)")]
    }

    // MARK: - Helpers

    private mutating func primaryLost(committed: Epoch, reason: String, now: UInt64, wasStaging: Bool = false) -> [Directive] {
        lossDetectedAt = now
        lostWhileStaging = wasStaging
        guard committed > 0 else {
            state = .stopped("primary lost before the first checkpoint was committed")
            return [.discardReplica, .report("primary lost (\(reason)) before any checkpoint was committed: nothing to take over; the replica was discarded")]
        }
        switch fencePolicy {
        case .fence:
            state = .fencing(committed: committed, attempt: 1)
            fenceInFlight = true
            return [.report("primary lost (\(reason)); fencing it before taking over checkpoint \(committed)"), .fencePrimary]
        case .unsafeNoFence:
            state = .activating(committed: committed)
            return [.report("primary lost (\(reason)); activating checkpoint \(committed) WITHOUT fencing (--unsafe-no-fence)"), .activate(committed)]
        case .operatorOnly:
            state = .awaitingOperator(committed: committed)
            return [.report("primary lost (\(reason)); no fence is configured, so this backup will not activate by itself: make sure the primary is off, then run 'remusd failover --activate'")]
        }
    }
}
