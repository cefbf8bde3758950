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
///   primary itself handed over). What does not let the guest run — `.prepareActivation`:
///   closing the restore stream, the domain built paused, devices plumbed — starts the moment the
///   loss is detected and runs while the fence does; `.activate` then only lets the guest run.
/// - I9: with disks, `.commit(N)` makes checkpoint N's disk operations durable in the redo log
///   before its memory is applied (so the ACK that follows covers both); `.applyDisk(N)` — the
///   redo log onto the disk images — comes only after `onCommitted(N)`, never before memory N is
///   complete; `.activate(N)` only once `onDiskApplied(N)` reported the images at N.
///
/// Deadlines are part of the state: `nextDeadline` is derived from it alone and read by the shell
/// after every event and tick; receiving and fencing always have one.
public struct BackupCommitter: Sendable {
    public enum State: Equatable, Sendable {
        /// Waiting for a primary to connect.
        case listening
        /// A primary streams; `committed` is the last committed epoch (0: none). `connected` is
        /// false after its stream was rejected: it gets one timeout to reconnect.
        case receiving(committed: Epoch, connected: Bool)
        /// The primary is lost; fencing it before taking over (attempt number, from 1).
        case fencing(committed: Epoch, attempt: Int, fence: Fence)
        /// Fencing is not configured: waiting for the operator (`remusd failover --activate`).
        case awaitingOperator(committed: Epoch)
        /// Resuming the guest from `committed`.
        case activating(committed: Epoch)
        /// The guest runs here now.
        case active(from: Epoch)
        /// Protection ended without activation (planned stop, or nothing to activate).
        case stopped(String)
    }

    /// Where the current fencing attempt stands.
    public enum Fence: Equatable, Sendable {
        /// The fence runs; without a report by `deadline` it counts as failed.
        case running(deadline: UInt64)
        /// The last fence failed; the next attempt starts at `retryAt`.
        case failed(retryAt: UInt64)
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
        /// Apply the staged, verified checkpoint: its disk operations into the redo log, durably
        /// (fdatasync), then its memory to the replica; report `onCommitted`.
        case commit(Epoch)
        /// Apply the committed epoch's disk operations from the redo log to the disk images,
        /// durably, and persist "applied = epoch"; report `onDiskApplied` or `onDiskApplyFailed`.
        case applyDisk(Epoch)
        /// Tell the primary `epoch` is committed.
        case sendAck(Epoch)
        /// Send a heartbeat with this sequence number.
        case sendHeartbeat(UInt64)
        /// Drop the connection to the primary.
        case closeConnection
        /// Make sure the primary is off; report `onFenced`.
        case fencePrimary
        /// Build the replica of checkpoint `Epoch` up to the point of running it, without letting
        /// it run (the fence may still fail); report `onPrepared`. No commit comes after it.
        case prepareActivation(Epoch)
        /// Let the guest run from the last committed checkpoint (prepared or not: an unprepared
        /// replica is built first); report `onActivated`.
        case activate(Epoch)
        /// Throw the replica away.
        case discardReplica
        /// Tell the operator.
        case report(String)
    }

    public let settings: ProtectionSettings
    public let fencePolicy: FencePolicy
    public private(set) var state: State = .listening
    /// When anything was last heard from the primary (monotonic ns).
    public private(set) var lastHeardAt: UInt64 = 0
    /// Start of the window in which the primary's silence counts: `lastHeardAt`, or later when
    /// this process itself was stalled (see `noticeStall`).
    private var silenceSince: UInt64 = 0
    /// When the primary was found lost (monotonic ns), for detection and activation times.
    public private(set) var lossDetectedAt: UInt64?
    /// Whether a checkpoint was partly received when the primary was found lost (it was dropped).
    public private(set) var lostWhileStaging = false
    private var lastHeartbeatAt: UInt64 = 0
    private var heartbeatSequence: UInt64 = 0
    /// The checkpoint being staged, if any (only while receiving). Dropping it drops its commit.
    private var staging: CheckpointBegin? {
        didSet { if staging == nil { committing = false } }
    }
    /// Whether the current stream replicates disks (DISKS negotiated and disks described).
    public private(set) var replicatesDisks = false
    /// The committed epoch whose disk operations are logged but not yet applied to the images.
    public private(set) var diskApplyPending: Epoch?
    /// An activation waits for `diskApplyPending` to be applied first (I9).
    private var activationWaitsForDisk = false
    /// `.commit` was asked for and its outcome is not known yet. The reader waits for it and
    /// reads nothing meanwhile, so the primary's silence does not count until it is known (the
    /// disk commit's fdatasync can take a while on a loaded host; the primary is not to blame).
    public private(set) var committing = false

    /// Where the preparation of the replica for activation stands (`.prepareActivation`).
    public enum Preparation: Equatable, Sendable {
        /// None asked for (no loss yet, or a policy that activates at once).
        case none
        /// Running since the loss was detected, alongside the fence.
        case running
        /// The replica is ready to run (at `at`, monotonic ns).
        case ready(at: UInt64)
        /// It failed; `.activate` builds the replica the ordinary way (and says why if it fails too).
        case failed(String)
    }
    /// The preparation of the replica for the takeover now under way.
    public private(set) var preparation = Preparation.none
    /// An activation (fence succeeded) waits for the preparation to finish.
    private var activationWaitsForPreparation = false
    /// When the fence that allowed the takeover succeeded (monotonic ns); nil before.
    public private(set) var fencedAt: UInt64?

    /// Whether a primary's connection is open.
    public var connected: Bool {
        if case .receiving(_, true) = state { return true }
        return false
    }

    /// Whether a fence is running now (its outcome is not known yet).
    public var fenceInFlight: Bool {
        if case .fencing(_, _, .running) = state { return true }
        return false
    }

    public init(settings: ProtectionSettings, fencePolicy: FencePolicy) {
        self.settings = settings
        self.fencePolicy = fencePolicy
    }

    /// The last committed epoch (0: none).
    public var committedEpoch: Epoch {
        switch state {
        case .listening, .stopped: return 0
        case .receiving(let c, _), .fencing(let c, _, _), .awaitingOperator(let c), .activating(let c): return c
        case .active(let from): return from
        }
    }

    /// When the committer needs `onTick` next (monotonic ns), derived from the state alone; nil
    /// when it waits for nothing that time ends (listening, waiting for the operator — on purpose:
    /// only a human may decide then —, activating, active, stopped). A tick at or after it moves it
    /// forward; an early or extra tick changes nothing.
    public var nextDeadline: UInt64? {
        switch state {
        case .receiving(_, let connected):
            return earliest(connected ? lastHeartbeatAt + settings.heartbeatNs : nil, committing && connected ? nil : silenceSince + settings.timeoutNs)
        case .fencing(_, _, .running(let deadline)):
            return deadline
        case .fencing(_, _, .failed(let retryAt)):
            return retryAt
        case .listening, .awaitingOperator, .activating, .active, .stopped:
            return nil
        }
    }

    // MARK: - Events

    /// Whether a primary may connect now (the shell refuses the connection otherwise).
    public var acceptsPrimary: Bool {
        switch state {
        case .listening, .stopped: return true
        case .receiving(_, let connected): return !connected
        // A primary that reconnects while we fence it is alive: take it back (it held its output),
        // unless a fence is running right now and may be switching it off, or the replica is
        // being prepared (the new stream replaces it once that is done; the primary retries).
        case .fencing: return !fenceInFlight && preparation != .running
        case .awaitingOperator, .activating, .active: return false
        }
    }

    /// A primary connected and its stream header was accepted (the replica was configured anew:
    /// a new stream starts from a full synchronisation, so the old image no longer counts).
    /// - Parameter disks: whether the stream replicates disks (their operations come inside the
    ///   checkpoints and must be applied with them).
    public mutating func onPrimaryConnected(now: UInt64, disks: Bool = false) -> [Directive] {
        precondition(acceptsPrimary, "primary connected in state \(state)")
        var out: [Directive] = []
        if case .fencing(let committed, _, _) = state {
            out.append(.report("the primary came back before it was fenced: fencing called off, checkpoint \(committed) superseded, resynchronising"))
        }
        lossDetectedAt = nil
        lostWhileStaging = false
        fencedAt = nil
        preparation = .none
        activationWaitsForPreparation = false
        state = .receiving(committed: 0, connected: true)
        staging = nil
        replicatesDisks = disks
        activationWaitsForDisk = false
        committing = false
        lastHeardAt = now
        silenceSince = now
        lastHeartbeatAt = now
        return out
    }

    /// The shell drops the open connection because the same primary (identity and guest)
    /// connected again: its old connection is dead on its side. The partial checkpoint goes; the
    /// committed one stays until the new stream replaces it (`onPrimaryConnected`).
    public mutating func onConnectionReplaced(now: UInt64) -> [Directive] {
        guard case .receiving(let committed, true) = state else { return [] }
        staging = nil
        state = .receiving(committed: committed, connected: false)
        return [.discardStaged, .closeConnection, .report("the primary connected again; dropping its previous connection")]
    }

    /// The operator drops what this backup holds (`remusd failover --discard`): the connection,
    /// the staged and the committed checkpoints. Afterwards any primary it serves may connect.
    /// Refused once the guest runs here.
    public mutating func onOperatorDiscard(now: UInt64) -> [Directive] {
        switch state {
        case .receiving, .fencing, .awaitingOperator, .stopped, .listening:
            let held = committedEpoch
            staging = nil
            lossDetectedAt = nil
            state = .stopped("discarded by the operator")
            return [.discardStaged, .closeConnection, .discardReplica,
                    .report("the operator discarded this backup's image (checkpoint \(held)); any primary this backup serves may connect now")]
        case .activating, .active:
            return [.report("nothing discarded: the guest runs here (state \(state)); stop it with 'remusd stop'")]
        }
    }

    /// Bytes arrived from the primary.
    public mutating func onPeerActivity(now: UInt64) -> [Directive] {
        heard(now)
        return []
    }

    /// CHECKPOINT_BEGIN was accepted by the validator.
    public mutating func onCheckpointBegan(_ begin: CheckpointBegin, now: UInt64) -> [Directive] {
        heard(now)
        guard case .receiving = state else { return [.discardStaged] }
        staging = begin
        return []
    }

    /// CHECKPOINT_END arrived and the validator verified count, digest and epoch; content staged.
    public mutating func onCheckpointComplete(_ end: CheckpointEnd, now: UInt64) -> [Directive] {
        heard(now)
        guard case .receiving = state, let begin = staging, begin.epoch == end.epoch else {
            staging = nil
            return [.discardStaged]
        }
        committing = true  // `staging` stays set until the outcome: its didSet must not clear this
        return [.commit(end.epoch)]
    }

    /// The replica applied `epoch`.
    public mutating func onCommitted(_ epoch: Epoch, now: UInt64) -> [Directive] {
        guard case .receiving(_, let connected) = state, let begin = staging, begin.epoch == epoch else {
            preconditionFailure("committed \(epoch) in state \(state) staging \(String(describing: staging))")
        }
        commitFinished(now)
        staging = nil
        // Memory `epoch` is complete and applied: only now may its disk operations reach the images.
        let apply: [Directive] = replicatesDisks ? [.applyDisk(epoch)] : []
        if replicatesDisks { diskApplyPending = epoch }
        switch begin.kind {
        case .precopy:
            // Pre-copy rounds build the image but are no checkpoint: nothing to acknowledge.
            return apply
        case .checkpoint:
            state = .receiving(committed: epoch, connected: connected)
            return [.sendAck(epoch)] + apply
        case .final:
            // A planned switchover: the primary stopped its guest and handed it over.
            state = .activating(committed: epoch)
            return [.sendAck(epoch)] + apply + [.report("final checkpoint \(epoch) committed; taking over as planned")] + activate(epoch)
        }
    }

    /// The disk images hold `epoch`'s operations, durably.
    public mutating func onDiskApplied(_ epoch: Epoch, now: UInt64) -> [Directive] {
        guard diskApplyPending == epoch else { return [] }
        diskApplyPending = nil
        guard activationWaitsForDisk, case .activating(let committed) = state else { return [] }
        activationWaitsForDisk = false
        return activate(committed)
    }

    /// Applying `epoch`'s disk operations failed: the images are not at the committed checkpoint,
    /// so the replica must not be activated until they are (the redo log keeps the operations).
    public mutating func onDiskApplyFailed(_ epoch: Epoch, reason: String, now: UInt64) -> [Directive] {
        guard diskApplyPending == epoch else { return [] }
        let problem = "could not apply the disk writes of checkpoint \(epoch) to the disk images: \(reason)"
        switch state {
        case .receiving(let committed, let connected):
            // The primary is alive: drop it; it reconnects and resynchronises memory and disks.
            state = .receiving(committed: committed, connected: false)
            staging = nil
            return (connected ? [.discardStaged, .closeConnection] : [])
                + [.report("\(problem); dropping the primary's connection so it resynchronises; its guest keeps running there")]
        case .activating(let committed), .fencing(let committed, _, _), .awaitingOperator(let committed):
            // The primary is gone: only a human can repair the images; the redo log still holds the writes.
            activationWaitsForDisk = false
            state = .awaitingOperator(committed: committed)
            return [.report("\(problem); NOT taking over: fix the disk image, then 'remusd failover --activate' applies the redo log again and activates checkpoint \(committed)")]
        case .listening, .active, .stopped:
            return [.report(problem)]
        }
    }

    /// Committing failed (the backend threw); the replica kept the previous checkpoint.
    public mutating func onCommitFailed(_ epoch: Epoch, reason: String, now: UInt64) -> [Directive] {
        commitFinished(now)
        staging = nil
        return [.closeConnection, .report("could not apply checkpoint \(epoch): \(reason); the replica keeps checkpoint \(committedEpoch); dropping the connection so the primary resynchronises")]
    }

    /// The stream was rejected (garbage, corruption, out of order). The replica keeps its last
    /// committed checkpoint; the primary is not assumed dead, the connection is dropped.
    public mutating func onStreamRejected(_ description: String, now: UInt64) -> [Directive] {
        staging = nil
        guard case .receiving(let committed, _) = state else { return [] }
        // The primary may well be alive (a bad link, a bad release): give it the timeout to
        // reconnect before counting it as lost (onTick).
        state = .receiving(committed: committed, connected: false)
        return [
            .discardStaged, .closeConnection,
            .report("rejected the primary's stream: \(description); the replica keeps checkpoint \(committed); waiting \(settings.timeoutNs / 1_000_000) ms for the primary to reconnect"),
        ]
    }

    /// The primary ended the stream on purpose.
    public mutating func onStreamEnd(_ end: StreamEnd, now: UInt64) -> [Directive] {
        guard case .receiving(let committed, _) = state else {
            // After a final checkpoint we already took over: just say goodbye.
            return [.closeConnection]
        }
        staging = nil
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
            return [.discardStaged, .closeConnection, .report("planned switchover: activating checkpoint \(committed)")] + activate(committed)
        case .shutdown, .error:
            return [.discardStaged, .closeConnection, .report("the primary ended the stream (\(end.reason): \(end.message))")]
                + primaryLost(committed: committed, reason: "it ended its stream: \(end.message)", now: now)
        }
    }

    /// The connection closed or failed.
    public mutating func onConnectionLost(reason: String, now: UInt64) -> [Directive] {
        let wasStaging = staging != nil
        staging = nil
        guard case .receiving(let committed, true) = state else { return [] }
        return [.discardStaged, .closeConnection] + primaryLost(committed: committed, reason: "connection lost: \(reason)", now: now, wasStaging: wasStaging)
    }

    /// Time passed. The shell calls this at `nextDeadline`; an early or extra call is harmless.
    public mutating func onTick(now: UInt64) -> [Directive] {
        noticeStall(now: now)
        switch state {
        case .receiving(let committed, let connected):
            if !(committing && connected) && now >= silenceSince + settings.timeoutNs {
                let wasStaging = staging != nil
                staging = nil
                let ms = (now - lastHeardAt) / 1_000_000
                return [.discardStaged, .closeConnection]
                    + primaryLost(committed: committed, reason: "nothing heard for \(ms) ms", now: now, wasStaging: wasStaging)
            }
            guard connected && now >= lastHeartbeatAt + settings.heartbeatNs else { return [] }
            heartbeatSequence += 1
            lastHeartbeatAt = now
            return [.sendHeartbeat(heartbeatSequence)]
        case .fencing(let committed, let attempt, .running(let deadline)):
            guard now >= deadline else { return [] }
            // No report within the fence timeout: counted as failed and tried again at once (the
            // shell ignores whatever the abandoned attempt reports later).
            state = .fencing(committed: committed, attempt: attempt + 1, fence: .running(deadline: now + settings.fenceTimeoutNs))
            return [.report("fencing the primary did not finish within \(settings.fenceTimeoutNs / 1_000_000) ms (attempt \(attempt)); counted as failed; the guest stays down here; retrying"), .fencePrimary]
        case .fencing(let committed, let attempt, .failed(let retryAt)):
            // A failed fence is retried every heartbeat interval; the guest stays down meanwhile.
            guard now >= retryAt else { return [] }
            state = .fencing(committed: committed, attempt: attempt + 1, fence: .running(deadline: now + settings.fenceTimeoutNs))
            return [.fencePrimary]
        case .listening, .awaitingOperator, .activating, .active, .stopped:
            return []
        }
    }

    /// The fence finished.
    public mutating func onFenced(success: Bool, detail: String, now: UInt64) -> [Directive] {
        // A report with no fence running belongs to an attempt already counted as failed.
        guard case .fencing(let committed, let attempt, .running) = state else { return [] }
        guard success else {
            state = .fencing(committed: committed, attempt: attempt, fence: .failed(retryAt: now + settings.heartbeatNs))
            // Said once, then every 20th attempt: a lease running out takes a few seconds of retries.
            let say = attempt == 1 || attempt % 20 == 0
            return say ? [.report("fencing the primary failed (attempt \(attempt)): \(detail); the guest stays down here until fencing succeeds; retrying every heartbeat")] : []
        }
        state = .activating(committed: committed)
        fencedAt = now
        return [.report("primary fenced (\(detail)); activating checkpoint \(committed)")] + activate(committed)
    }

    /// The replica is ready to run (`success`), or its preparation failed (`detail` says why).
    public mutating func onPrepared(success: Bool, detail: String, now: UInt64) -> [Directive] {
        guard preparation == .running else { return [] }
        preparation = success ? .ready(at: now) : .failed(detail)
        let said: [Directive] = success ? [] : [.report("preparing the replica for the takeover failed: \(detail); it is built again when the guest is activated")]
        guard activationWaitsForPreparation, case .activating(let committed) = state else { return said }
        activationWaitsForPreparation = false
        return said + activate(committed)
    }

    /// The operator says the primary is off (`remusd failover --activate`).
    public mutating func onOperatorActivate(now: UInt64) -> [Directive] {
        switch state {
        case .awaitingOperator(let committed), .fencing(let committed, _, _):
            state = .activating(committed: committed)
            // A failed apply is retried from the redo log first (its operations are idempotent).
            let retry: [Directive] = diskApplyPending.map { [.applyDisk($0)] } ?? []
            return [.report("activation confirmed by the operator; activating checkpoint \(committed)")] + retry + activate(committed)
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

    /// `.activate(committed)`, or nothing yet while the disk images are still being brought to
    /// `committed` (`onDiskApplied` emits it then; I9: the guest never resumes on older disks) or
    /// the replica is still being prepared (`onPrepared` emits it then).
    private mutating func activate(_ committed: Epoch) -> [Directive] {
        guard diskApplyPending == nil else {
            activationWaitsForDisk = true
            return [.report("waiting for the disk writes of checkpoint \(diskApplyPending ?? 0) to reach the disk images before activating")]
        }
        guard preparation != .running else {
            activationWaitsForPreparation = true
            return []
        }
        return [.activate(committed)]
    }

    /// The commit's outcome is known: the reader reads again, and the primary's silence counts
    /// from now (what it sent meanwhile waits unread in our socket).
    private mutating func commitFinished(_ now: UInt64) {
        guard committing else { return }
        committing = false
        silenceSince = max(silenceSince, now)
    }

    /// Something came from the primary: its silence ends here.
    private mutating func heard(_ now: UInt64) {
        lastHeardAt = max(lastHeardAt, now)
        silenceSince = max(silenceSince, now)
    }

    /// A tick arriving more than a heartbeat after the deadline this state asked for means this
    /// process did not run meanwhile (SIGSTOP, a stalled host, a long commit on the loop thread):
    /// that time is no evidence against the primary, whose records may sit unread in our socket.
    /// The silence window restarts now, which gives the reader a full timeout to deliver them
    /// (a STREAM_END of a planned stop must not turn into a takeover).
    private mutating func noticeStall(now: UInt64) {
        guard case .receiving = state, let due = nextDeadline, now > due + settings.heartbeatNs else { return }
        silenceSince = max(silenceSince, now)
    }

    private mutating func primaryLost(committed: Epoch, reason: String, now: UInt64, wasStaging: Bool = false) -> [Directive] {
        lossDetectedAt = now
        lostWhileStaging = wasStaging
        guard committed > 0 else {
            state = .stopped("primary lost before the first checkpoint was committed")
            return [.discardReplica, .report("primary lost (\(reason)) before any checkpoint was committed: nothing to take over; the replica was discarded")]
        }
        switch fencePolicy {
        case .fence:
            state = .fencing(committed: committed, attempt: 1, fence: .running(deadline: now + settings.fenceTimeoutNs))
            // Everything that does not let the guest run starts now, in parallel with the fence.
            preparation = .running
            return [.report("primary lost (\(reason)); fencing it before taking over checkpoint \(committed); preparing the replica meanwhile"),
                    .fencePrimary, .prepareActivation(committed)]
        case .unsafeNoFence:
            state = .activating(committed: committed)
            return [.report("primary lost (\(reason)); activating checkpoint \(committed) WITHOUT fencing (--unsafe-no-fence)")] + activate(committed)
        case .operatorOnly:
            state = .awaitingOperator(committed: committed)
            return [.report("primary lost (\(reason)); no fence is configured, so this backup will not activate by itself: make sure the primary is off, then run 'remusd failover --activate'")]
        }
    }
}
