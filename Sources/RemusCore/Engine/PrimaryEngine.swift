/// The primary's epoch loop as a sans-I/O state machine.
///
/// Each input is a `mutating func on…` that returns directives for the shell (the runtime) to
/// carry out in order. The engine never reads a clock, sleeps or does I/O: `now` (monotonic
/// nanoseconds) comes in with every event, so a test can drive it event by event.
///
/// Invariants it keeps:
/// - I1: output of epoch N is released only by `.releaseOutput(through: N)`, emitted only for an ACK
///   of N (or `.releaseAllOutput` once protection is given up, when nothing protects it anyway).
/// - I6: a checkpoint is started only when a staging arena is free; the guest is never held
///   suspended waiting for the network.
///
/// Deadlines are part of the state: `nextDeadline` is derived from it alone, and the shell reads
/// it after every event and tick. Every state that waits for something (connecting, stopping, a
/// switchover, a lost backup) has one, so nothing the engine waits for can be forgotten.
public struct PrimaryEngine: Sendable {
    /// Where the loop stands. `outputHeldSince` (monotonic ns) in a payload: output has been held
    /// since then although no backup acknowledges it (the backup was lost; the fence grace runs
    /// from it), nil when every held epoch belongs to the current stream.
    public enum State: Equatable, Sendable {
        /// Not started.
        case idle
        /// Connecting to the backup (attempt number, from 1) since `since`; the attempt counts as
        /// failed at `since + connectTimeoutNs`.
        case connecting(attempt: Int, since: UInt64, outputHeldSince: UInt64?)
        /// Live pre-copy of the initial synchronisation: round number, from 1.
        case synchronizing(round: Int, outputHeldSince: UInt64?)
        /// Taking and shipping checkpoints; `switchoverPending`: a planned switchover waits for a
        /// free staging arena to take its final checkpoint.
        case protecting(switchoverPending: Bool, outputHeldSince: UInt64?)
        /// The backup is lost: the guest runs on; a reconnection is due at `retryAt`. Output stays
        /// held until the fence grace after `outputHeldSince` ends, then flows unprotected.
        case degraded(reason: String, retryAt: UInt64, outputHeldSince: UInt64?)
        /// Planned switchover: the guest stays suspended after the final checkpoint `final` until
        /// the backup acknowledges it (or the backup's silence hands it off).
        case switchingOver(final: Epoch, outputHeldSince: UInt64?)
        /// The switchover's outcome is unknown (no ACK of the final checkpoint): the guest stays
        /// suspended here; the backup takes over (from the final checkpoint, or after fencing from
        /// the one before). It must not be resumed here.
        case handedOff(String)
        /// The witness lease could not be renewed in time: output stays held and the guest paused,
        /// because the backup may hold the key and run the guest now.
        case selfFenced(String)
        /// A planned end since `since`: STREAM_END sent, waiting for the backup to close its
        /// side; at `since + timeoutNs` this side closes anyway.
        case stopping(StreamEndReason, since: UInt64)
        /// Done.
        case stopped
    }

    /// What the shell must do.
    public enum Directive: Equatable, Sendable {
        /// Open a connection to the backup; report `onConnected` or `onConnectionLost`.
        case connect
        /// Start the backend's dirty logging (every populated page counts as dirty first); a
        /// streaming backend starts its library's stream from the beginning instead.
        case startDirtyLogging
        /// Harvest and copy the dirty set while the guest runs, ship it as a pre-copy round; report
        /// `onPrecopyRoundShipped`.
        case precopyRound(Int)
        /// Suspend the guest, harvest, capture pages and state into a free arena, close output epoch
        /// `epoch`, resume (not for `.final`: the guest stays suspended for the hand-over); report
        /// `onCheckpointCaptured`, `onCaptureDeferred` (dirty set over `capturePageLimit`: resumed
        /// without capturing, dirty pages kept) or `onCaptureFailed`.
        case checkpoint(Epoch, CheckpointKind)
        /// Slow the guest to this share of its speed (100: full speed).
        case throttleGuest(percent: Int)
        /// The guest was handed over: stop it here for good.
        case stopGuest
        /// Self-fence: pause the guest (it must not run or emit anything while another copy may).
        case pauseGuest
        /// Write the captured checkpoint to the backup; report `onCheckpointShipped`.
        case ship(Epoch)
        /// Let out held output of every epoch up to and including this one.
        case releaseOutput(through: Epoch)
        /// Let out everything and stop holding output back.
        case releaseAllOutput
        /// Start holding output back again.
        case holdOutput
        /// Send a heartbeat with this sequence number.
        case sendHeartbeat(UInt64)
        /// Send STREAM_END and close the connection once written.
        case sendStreamEnd(StreamEndReason, lastEpoch: Epoch)
        /// Drop the connection (and any checkpoint not yet written), or abandon the attempt to
        /// open one: whatever that attempt reports later is ignored.
        case closeConnection
        /// Tell the operator (log and status).
        case report(Report)
    }

    /// Things the operator must hear about.
    public enum Report: Equatable, Sendable {
        case protecting(firstEpoch: Epoch)
        case degraded(String)
        case overload(String)
        case switchedOver(Epoch)
        case handOffUnknown(String)
        case selfFenced(String)
        case stopped(StreamEndReason)
        /// The guest vanished from this host; the backup takes over.
        case guestLost(String)
        /// The fence grace of an earlier loss ended while a new stream protects the guest: the
        /// output held from before that stream went out; the stream's own epochs stay held.
        case earlierOutputReleased(String)
    }

    public let settings: ProtectionSettings
    public private(set) var state: State = .idle
    /// Highest epoch captured.
    public private(set) var capturedEpoch: Epoch = 0
    /// Highest epoch written to the connection.
    public private(set) var shippedEpoch: Epoch = 0
    /// Highest epoch the backup acknowledged as committed.
    public private(set) var acknowledgedEpoch: Epoch = 0
    /// Checkpoints captured and not yet written.
    public private(set) var shipping: Int = 0
    /// When the last checkpoint was taken (monotonic ns).
    public private(set) var lastCheckpointAt: UInt64 = 0
    /// When anything was last heard from the backup (monotonic ns).
    public private(set) var lastHeardAt: UInt64 = 0
    /// Start of the window in which the backup's silence counts: `lastHeardAt`, or later when this
    /// process itself was stalled (see `noticeStall`).
    private var silenceSince: UInt64 = 0
    /// When a heartbeat was last sent.
    private var lastHeartbeatAt: UInt64 = 0
    private var heartbeatSequence: UInt64 = 0
    /// The first epoch of the current connection; ACKs below it belong to an old stream.
    private var streamFirstEpoch: Epoch = 1
    /// Current reconnection delay.
    private var retryDelay: UInt64
    /// Guest speed the throttle policy asks for, percent.
    public private(set) var speedPercent = 100
    /// Interval multiplier of the degrade policy (1…16).
    public private(set) var intervalScale: UInt64 = 1
    /// Measured capture cost, nanoseconds per page (moving average; 0 until measured).
    public private(set) var nsPerPage: Double = 0
    /// Most pages a checkpoint may capture within the pause bound (the shell defers above it).
    /// Never twice in a row: deferring lets the dirty set grow, so a checkpoint postponed once is
    /// taken next time whatever its size (the policy keeps the epochs after it small).
    public var capturePageLimit: Int {
        guard settings.maxPauseNs > 0, nsPerPage > 0, !deferredLast else { return .max }
        return max(Int(Double(settings.maxPauseNs) / nsPerPage), 64)
    }
    /// Checkpoints in a row that stayed well inside the pause bound (to relax a policy).
    private var calmStreak = 0
    /// The last checkpoint attempt was deferred.
    private var deferredLast = false

    public init(settings: ProtectionSettings) {
        self.settings = settings
        retryDelay = settings.retryNs
    }

    /// Checkpoints captured and not acknowledged.
    public var unacknowledged: Int { Int(capturedEpoch - min(acknowledgedEpoch, capturedEpoch)) }

    /// Since when output has been held although no backup acknowledges it (the backup was lost;
    /// the fence grace runs from here); nil when there is no such output.
    public var outputHeldSince: UInt64? {
        switch state {
        case .connecting(_, _, let held), .synchronizing(_, let held), .protecting(_, let held),
             .degraded(_, _, let held), .switchingOver(_, let held):
            return held
        case .idle, .handedOff, .selfFenced, .stopping, .stopped:
            return nil
        }
    }

    // MARK: - Deadlines

    /// When the engine needs `onTick` next (monotonic ns), derived from the state alone; nil when
    /// it waits for nothing that time can end (idle, stopped, handed off, self-fenced). The shell
    /// reads it after every event and every tick and wakes the engine then; a tick at or after it
    /// moves it forward, and a tick before it (or an extra one) changes nothing.
    public var nextDeadline: UInt64? {
        switch state {
        case .idle, .stopped, .handedOff, .selfFenced:
            return nil
        case .connecting(_, let since, let held):
            return earliest(since + settings.connectTimeoutNs, graceEnd(held))
        case .degraded(_, let retryAt, let held):
            return earliest(retryAt, graceEnd(held))
        case .synchronizing(_, let held), .switchingOver(_, let held):
            return earliest(heartbeatDue, silenceDeadline, graceEnd(held))
        case .protecting(_, let held):
            // A checkpoint blocked on arenas or ACKs is taken by the event that frees the slot, so
            // its (past) due time is no deadline: it would only spin the loop.
            return earliest(heartbeatDue, silenceDeadline, graceEnd(held), mayCheckpoint ? checkpointDue : nil)
        case .stopping(_, let since):
            return since + settings.timeoutNs
        }
    }

    private var heartbeatDue: UInt64 { lastHeartbeatAt + settings.heartbeatNs }
    private var silenceDeadline: UInt64 { silenceSince + settings.timeoutNs }
    private var checkpointDue: UInt64 { lastCheckpointAt + settings.intervalNs * intervalScale }
    private func graceEnd(_ held: UInt64?) -> UInt64? { held.map { $0 + settings.fenceGraceNs } }

    // MARK: - Events

    /// Begin protecting: connect to the backup.
    public mutating func start(now: UInt64) -> [Directive] {
        guard case .idle = state else { preconditionFailure("start in state \(state)") }
        state = .connecting(attempt: 1, since: now, outputHeldSince: nil)
        return [.connect]
    }

    /// The connection is up and the backup's stream header was accepted.
    public mutating func onConnected(now: UInt64) -> [Directive] {
        guard case .connecting(_, _, let held) = state else { return [] }
        lastHeardAt = now
        silenceSince = now
        lastHeartbeatAt = now
        retryDelay = settings.retryNs
        shipping = 0
        // A new stream restarts the backup's image: its first checkpoint is the next epoch.
        streamFirstEpoch = capturedEpoch + 1
        acknowledgedEpoch = capturedEpoch
        shippedEpoch = capturedEpoch
        state = .synchronizing(round: 1, outputHeldSince: held)
        return [.startDirtyLogging, .precopyRound(1)]
    }

    /// A pre-copy round was written; `remainingDirty` pages were dirtied meanwhile.
    public mutating func onPrecopyRoundShipped(round: Int, remainingDirty: Int, now: UInt64) -> [Directive] {
        guard case .synchronizing(let current, let held) = state, current == round else { return [] }
        if remainingDirty > settings.precopyTargetPages && round < settings.maxPrecopyRounds {
            state = .synchronizing(round: round + 1, outputHeldSince: held)
            return [.precopyRound(round + 1)]
        }
        // Converged, or out of rounds: the first consistent checkpoint bounds the pause itself (I6),
        // so a busy guest never keeps the synchronisation going forever.
        state = .protecting(switchoverPending: false, outputHeldSince: held)
        // Output emitted from now on belongs to the first checkpoint of this stream.
        return [.holdOutput] + takeCheckpoint(now: now) + [.report(.protecting(firstEpoch: capturedEpoch))]
    }

    /// Checkpoint `epoch` is in a staging arena and the guest runs again.
    public mutating func onCheckpointCaptured(_ epoch: Epoch, pauseNs: UInt64 = 0, pages: Int = 0, now: UInt64) -> [Directive] {
        guard isConnectedState else { return [] }
        precondition(epoch == capturedEpoch, "captured epoch \(epoch) but expected \(capturedEpoch) in state \(state)")
        deferredLast = false
        if pages > 0 {
            let sample = Double(pauseNs) / Double(pages)
            nsPerPage = nsPerPage == 0 ? sample : 0.8 * nsPerPage + 0.2 * sample
        }
        var out: [Directive] = [.ship(epoch)]
        if case .switchingOver = state { return out }
        if settings.maxPauseNs > 0 && pauseNs > settings.maxPauseNs {
            out += overloaded("checkpoint \(epoch) paused the guest \(pauseNs / 1_000_000) ms for \(pages) pages, over the \(settings.maxPauseNs / 1_000_000) ms bound", now: now)
        } else if settings.maxPauseNs == 0 || pauseNs < settings.maxPauseNs / 2 {
            out += relax()
        }
        return out
    }

    /// The dirty set (`pages`) was over `capturePageLimit` or the staging area: the shell resumed
    /// the guest without capturing; the dirty pages wait for the next checkpoint.
    public mutating func onCaptureDeferred(_ epoch: Epoch, pages: Int, limit: Int, now: UInt64) -> [Directive] {
        guard isConnectedState, epoch == capturedEpoch else { return [] }
        capturedEpoch -= 1
        shipping -= 1
        deferredLast = true
        if case .switchingOver = state {
            // A final checkpoint must be taken; it may pause longer than the bound, once.
            return [.report(.overload("the final checkpoint needs \(pages) pages; retrying"))] + takeFinal(now: now)
        }
        return overloaded("checkpoint \(epoch) would copy \(pages) dirty pages, over the \(limit) that fit the pause bound; deferred", now: now)
    }

    /// Capturing checkpoint `epoch` failed (the backend threw). The guest was resumed by the shell.
    public mutating func onCaptureFailed(_ epoch: Epoch, reason: String, now: UInt64) -> [Directive] {
        shipping = max(shipping - 1, 0)
        return giveUpProtection(reason: "capturing checkpoint \(epoch) failed: \(reason)", now: now)
    }

    /// Checkpoint `epoch` was written to the connection; its arena is free again.
    public mutating func onCheckpointShipped(_ epoch: Epoch, now: UInt64) -> [Directive] {
        guard isConnectedState else { return [] }
        precondition(epoch > shippedEpoch && epoch <= capturedEpoch, "shipped \(epoch) out of order in state \(state)")
        shippedEpoch = epoch
        shipping -= 1
        return dueSwitchover(now: now) + dueCheckpoint(now: now)
    }

    /// The backup committed `epoch` and everything before it.
    public mutating func onAck(_ epoch: Epoch, now: UInt64) -> [Directive] {
        heard(now)
        guard isConnectedState else { return [] }
        // An ACK may overtake the writer's report that the checkpoint went out (two threads post
        // to the loop), so it is checked against what was captured, not what was reported shipped.
        guard epoch >= streamFirstEpoch, epoch <= capturedEpoch else {
            return giveUpProtection(
                reason: "the backup acknowledged epoch \(epoch), which was never sent (captured up to \(capturedEpoch)); it is not following this stream",
                now: now)
        }
        guard epoch > acknowledgedEpoch else { return [] }
        acknowledgedEpoch = epoch
        if case .switchingOver(let final, _) = state, epoch == final {
            // The backup holds the final state and runs the guest now: everything up to it goes
            // out, the guest here is stopped for good, nothing is released twice. The backup gets
            // one timeout to close its side.
            state = .stopping(.switchover, since: now)
            return [.releaseOutput(through: final), .stopGuest, .sendStreamEnd(.switchover, lastEpoch: final), .report(.switchedOver(final))]
        }
        // Output held since the backup was lost belongs to epochs up to this one: it is covered now.
        clearOutputHeldSince()
        return [.releaseOutput(through: epoch)] + dueCheckpoint(now: now)
    }

    /// Anything at all arrived from the backup (a heartbeat, bytes of a record).
    public mutating func onPeerActivity(now: UInt64) -> [Directive] {
        heard(now)
        return []
    }

    /// The connection closed, failed, or could not be opened.
    public mutating func onConnectionLost(reason: String, now: UInt64) -> [Directive] {
        switch state {
        case .connecting(let attempt, _, let held):
            return connectFailed(attempt: attempt, reason: reason, outputHeldSince: held, now: now)
        case .synchronizing, .protecting, .switchingOver:
            return giveUpProtection(reason: "connection to the backup lost: \(reason)", now: now)
        case .stopping:
            state = .stopped
            return []
        case .idle, .degraded, .stopped, .handedOff, .selfFenced:
            return []
        }
    }

    /// Time passed. The shell calls this at `nextDeadline`; an early or extra call is harmless.
    public mutating func onTick(now: UInt64) -> [Directive] {
        noticeStall(now: now)
        switch state {
        case .synchronizing, .protecting, .switchingOver:
            var out = graceExpired(now: now)
            if now >= silenceDeadline {
                let ms = (now - lastHeardAt) / 1_000_000
                return out + giveUpProtection(
                    reason: "backup stopped answering after epoch \(acknowledgedEpoch) (nothing heard for \(ms) ms)", now: now)
            }
            if now >= heartbeatDue {
                heartbeatSequence += 1
                lastHeartbeatAt = now
                out.append(.sendHeartbeat(heartbeatSequence))
            }
            return out + dueCheckpoint(now: now)
        case .degraded(_, let retryAt, _):
            let released = graceExpired(now: now)
            guard now >= retryAt else { return released }
            state = .connecting(attempt: 2, since: now, outputHeldSince: outputHeldSince)
            return released + [.connect]
        case .connecting(let attempt, let since, _):
            let released = graceExpired(now: now)
            guard now >= since + settings.connectTimeoutNs else { return released }
            // The attempt counts as failed, exactly as if it had reported so; the shell abandons
            // it, so a late connection from it is closed unused.
            let reason = "no connection and stream header within \(settings.connectTimeoutNs / 1_000_000) ms"
            return released + [.closeConnection]
                + connectFailed(attempt: attempt, reason: reason, outputHeldSince: outputHeldSince, now: now)
        case .stopping(_, let since):
            // The backup did not close its side in time: close ours.
            guard now >= since + settings.timeoutNs else { return [] }
            state = .stopped
            return [.closeConnection]
        case .idle, .stopped, .handedOff, .selfFenced:
            return []
        }
    }

    /// The operator ends protection on purpose (planned stop: the backup discards its image).
    public mutating func stop(reason: StreamEndReason, now: UInt64) -> [Directive] {
        switch state {
        case .synchronizing, .protecting:
            // The backup gets one timeout to close its side (nextDeadline), then this side closes.
            state = .stopping(reason, since: now)
            // Every captured checkpoint is queued ahead of STREAM_END, so the last one sent is the last captured.
            let last = capturedEpoch >= streamFirstEpoch ? capturedEpoch : 0
            return [.sendStreamEnd(reason, lastEpoch: last), .releaseAllOutput, .report(.stopped(reason))]
        case .idle, .connecting, .degraded:
            state = .stopped
            return [.releaseAllOutput, .closeConnection, .report(.stopped(reason))]
        case .handedOff, .selfFenced:
            // The guest stays paused and its output held: another copy may be the active one.
            state = .stopped
            return [.closeConnection, .report(.stopped(reason))]
        case .switchingOver, .stopping, .stopped:
            return [.report(.handOffUnknown("no stop now: state \(state)"))]
        }
    }

    /// The guest no longer exists on this host (its domain was destroyed or crashed): the
    /// backup must take over from its last committed checkpoint. Held output stays held (it
    /// belongs to epochs the backup may never have committed) and the stream ends with an error,
    /// which a backup treats as the loss of the primary.
    public mutating func onGuestLost(reason: String, now: UInt64) -> [Directive] {
        let connected = isConnectedState
        // The checkpoint being taken when the guest vanished never completed; every one before
        // it is queued ahead of STREAM_END.
        let last = capturedEpoch > streamFirstEpoch ? capturedEpoch - 1 : 0
        state = .stopped
        return (connected ? [.sendStreamEnd(.error, lastEpoch: last)] : [.closeConnection])
            + [.report(.guestLost(reason))]
    }

    /// The witness lease ran out (renewals failed past its deadline): the backup may hold the key
    /// and be running the guest. Stop everything that could make two active copies.
    public mutating func onWitnessLost(reason: String, now: UInt64) -> [Directive] {
        switch state {
        case .selfFenced, .stopped, .handedOff: return []
        default: break
        }
        let text = "the witness lease could not be renewed (\(reason)); SELF-FENCED: the guest is paused here and its output held, because the backup may now hold the witness and run the guest; check which host holds the witness key before doing anything"
        state = .selfFenced(text)
        return [.closeConnection, .holdOutput, .pauseGuest, .report(.selfFenced(text))]
    }

    /// The output buffer overflowed (the held output hit its limit and packets were dropped):
    /// take the next checkpoint now rather than at the interval, so what is held is acknowledged
    /// and released sooner.
    public mutating func onOutputPressure(dropped: UInt64, now: UInt64) -> [Directive] {
        guard case .protecting = state else { return [] }
        var out: [Directive] = [.report(.overload("the output buffer is full: \(dropped) packets were dropped since the last check (the guest's TCP retransmits them); taking checkpoints early"))]
        if mayCheckpoint { out += takeCheckpoint(now: now) }
        return out
    }

    /// A planned switchover: a final checkpoint with the guest left suspended, handed to the
    /// backup once it acknowledges it.
    public mutating func switchover(now: UInt64) -> [Directive] {
        guard case .protecting(_, let held) = state else {
            return [.report(.handOffUnknown("a switchover needs an established protection (state: \(state)); nothing was changed"))]
        }
        state = .protecting(switchoverPending: true, outputHeldSince: held)
        return dueSwitchover(now: now)
    }

    // MARK: - Overload (I6)

    private mutating func overloaded(_ why: String, now: UInt64) -> [Directive] {
        calmStreak = 0
        switch settings.overload {
        case .throttle:
            guard speedPercent > 1 else { return [.report(.overload("\(why); the guest already runs at 1 % speed"))] }
            speedPercent = max(speedPercent / 2, 1)
            return [.throttleGuest(percent: speedPercent), .report(.overload("\(why); throttling the guest to \(speedPercent) % speed"))]
        case .degrade:
            guard intervalScale < 16 else { return [.report(.overload("\(why); epochs are already 16× longer"))] }
            intervalScale *= 2
            return [.report(.degraded("\(why); epochs lengthened to \(settings.intervalNs * intervalScale / 1_000_000) ms: protection continues with more output latency (DEGRADED)"))]
        case .abort:
            state = .stopping(.plannedStop, since: now)
            let last = capturedEpoch >= streamFirstEpoch ? capturedEpoch : 0
            return [.sendStreamEnd(.plannedStop, lastEpoch: last), .releaseAllOutput,
                    .report(.overload("\(why); protection ABORTED (--on-overload abort): the guest keeps running here, unprotected; the backup discards its image"))]
        }
    }

    /// After ten calm checkpoints in a row, undo one step of the policy.
    private mutating func relax() -> [Directive] {
        calmStreak += 1
        guard calmStreak >= 10 else { return [] }
        calmStreak = 0
        if speedPercent < 100 {
            speedPercent = min(speedPercent * 2, 100)
            return [.throttleGuest(percent: speedPercent)]
        }
        if intervalScale > 1 { intervalScale /= 2 }
        return []
    }

    private mutating func dueSwitchover(now: UInt64) -> [Directive] {
        guard case .protecting(true, _) = state, shipping < settings.maxShipping else { return [] }
        return takeFinal(now: now)
    }

    private mutating func takeFinal(now: UInt64) -> [Directive] {
        capturedEpoch += 1
        shipping += 1
        lastCheckpointAt = now
        state = .switchingOver(final: capturedEpoch, outputHeldSince: outputHeldSince)
        return [.checkpoint(capturedEpoch, .final)]
    }

    // MARK: - Helpers

    private var isConnectedState: Bool {
        switch state {
        case .synchronizing, .protecting, .switchingOver: return true
        default: return false
        }
    }

    /// Something came from the backup: its silence ends here.
    private mutating func heard(_ now: UInt64) {
        lastHeardAt = max(lastHeardAt, now)
        silenceSince = max(silenceSince, now)
    }

    /// A tick arriving more than a heartbeat after the deadline this state asked for means this
    /// process did not run meanwhile (SIGSTOP, a stalled host, a loop busy elsewhere): that time is
    /// no evidence that the backup went silent. The silence window restarts now, which also gives
    /// the reader thread a full timeout to deliver what is queued in the socket.
    private mutating func noticeStall(now: UInt64) {
        guard let due = nextDeadline, now > due + settings.heartbeatNs else { return }
        silenceSince = max(silenceSince, now)
    }

    /// Whether a regular checkpoint may start now (a free arena, room for one more unacknowledged,
    /// no switchover waiting for the arena).
    private var mayCheckpoint: Bool {
        guard case .protecting(false, _) = state else { return false }
        return shipping < settings.maxShipping && unacknowledged < settings.maxUnacknowledged
    }

    /// A checkpoint if one is due and allowed.
    private mutating func dueCheckpoint(now: UInt64) -> [Directive] {
        guard mayCheckpoint, now >= checkpointDue else { return [] }
        return takeCheckpoint(now: now)
    }

    private mutating func takeCheckpoint(now: UInt64) -> [Directive] {
        capturedEpoch += 1
        shipping += 1
        lastCheckpointAt = now
        return [.checkpoint(capturedEpoch, .checkpoint)]
    }

    /// A connection attempt failed (reported, or past its deadline): retry with backoff.
    private mutating func connectFailed(attempt: Int, reason: String, outputHeldSince held: UInt64?, now: UInt64) -> [Directive] {
        let retryAt = now + retryDelay
        retryDelay = min(retryDelay * 2, settings.maxRetryNs)
        state = .degraded(reason: reason, retryAt: retryAt, outputHeldSince: held)
        if attempt == 1 && capturedEpoch == 0 {
            // Never protected yet: keep trying, but say the guest runs unprotected meanwhile.
            return [.releaseAllOutput, .report(.degraded("cannot reach the backup (\(reason)); the guest runs unprotected; retrying"))]
        }
        return []
    }

    private mutating func giveUpProtection(reason: String, now: UInt64) -> [Directive] {
        if case .switchingOver(let final, _) = state {
            // The backup may have committed the final checkpoint and be running the guest: it
            // must never run here again. Output stays held; the backup's takeover covers it.
            let text = "\(reason) during the switchover: no acknowledgement of final checkpoint \(final); the guest stays SUSPENDED here and must not be resumed — the backup takes over (from checkpoint \(final), or after fencing this host from \(acknowledgedEpoch))"
            state = .handedOff(text)
            return [.closeConnection, .report(.handOffUnknown(text))]
        }
        let retryAt = now + retryDelay
        retryDelay = min(retryDelay * 2, settings.maxRetryNs)
        shipping = 0
        // The backup may be fencing us right now: keep what it never committed held for the fence
        // grace while reconnecting; a backup that takes us back resynchronises and then covers it.
        let heldSince = outputHeldSince ?? now
        state = .degraded(reason: reason, retryAt: retryAt, outputHeldSince: heldSince)
        return [
            .closeConnection,
            .report(.degraded("\(reason); the guest keeps running on this host; its output stays held for up to \(settings.fenceGraceNs / 1_000_000) ms while reconnecting, then flows unprotected (DEGRADED)")),
        ]
    }

    /// Releases held output once the fence grace is over: all of it while no checkpoint of a
    /// stream protects the guest (the output buffer then lets output pass until the next stream's
    /// first checkpoint holds it again); once a new stream takes checkpoints, only the epochs
    /// before its first one (I1: its backup may take over from any checkpoint it committed, so
    /// output of the stream's epochs waits for their ACKs as always).
    private mutating func graceExpired(now: UInt64) -> [Directive] {
        guard let since = outputHeldSince, now >= since + settings.fenceGraceNs else { return [] }
        clearOutputHeldSince()
        let grace = "\(settings.fenceGraceNs / 1_000_000) ms"
        switch state {
        case .protecting, .switchingOver:
            let before = streamFirstEpoch - 1
            return [.releaseOutput(through: before), .report(.earlierOutputReleased(
                "no backup took this guest back within the fence grace (\(grace)) of the earlier loss: the output held from before this stream (epochs up to \(before)) went out; this stream's epochs are released by its ACKs"))]
        default:
            return [.releaseAllOutput, .report(.degraded("no backup took this guest back within the fence grace (\(grace)): its output now flows unprotected; protection is DEGRADED; still reconnecting"))]
        }
    }

    /// No output is held any more that the current stream does not cover (acknowledged, or let out).
    private mutating func clearOutputHeldSince() {
        switch state {
        case .connecting(let attempt, let since, _): state = .connecting(attempt: attempt, since: since, outputHeldSince: nil)
        case .synchronizing(let round, _): state = .synchronizing(round: round, outputHeldSince: nil)
        case .protecting(let pending, _): state = .protecting(switchoverPending: pending, outputHeldSince: nil)
        case .degraded(let reason, let retryAt, _): state = .degraded(reason: reason, retryAt: retryAt, outputHeldSince: nil)
        case .switchingOver(let final, _): state = .switchingOver(final: final, outputHeldSince: nil)
        case .idle, .handedOff, .selfFenced, .stopping, .stopped: break
        }
    }
}

/// The earliest of some optional times; nil when there is none.
func earliest(_ times: UInt64?...) -> UInt64? {
    times.compactMap { $0 }.min()
}
