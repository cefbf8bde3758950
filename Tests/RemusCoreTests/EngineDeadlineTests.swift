import RemusCore
import Testing

private let ms: UInt64 = 1_000_000
private let settings = ProtectionSettings(
    intervalNs: 100 * ms, heartbeatNs: 50 * ms, timeoutNs: 300 * ms,
    maxPrecopyRounds: 3, precopyTargetPages: 10, maxUnacknowledged: 3, maxShipping: 2,
    retryNs: 200 * ms, maxRetryNs: 1_000 * ms, fenceGraceNs: 1_000 * ms,
    connectTimeoutNs: 500 * ms, fenceTimeoutNs: 2_000 * ms)

/// An engine the shell wakes at its `nextDeadline`.
protocol TickDriven {
    associatedtype Directive
    var nextDeadline: UInt64? { get }
    mutating func onTick(now: UInt64) -> [Directive]
}

extension PrimaryEngine: TickDriven {}
extension BackupCommitter: TickDriven {}

/// Does what the shell's event loop does while no event comes: fires `onTick` at exactly each
/// `nextDeadline` (never before `start`) up to and including `end`; returns every directive.
func runTicks<E: TickDriven>(_ engine: inout E, from start: UInt64, through end: UInt64) -> [E.Directive] {
    var out: [E.Directive] = []
    var now = start
    var ticks = 0
    while let due = engine.nextDeadline, max(due, now) <= end {
        now = max(due, now)
        out += engine.onTick(now: now)
        ticks += 1
        precondition(ticks < 100_000, "the deadline does not move forward")
    }
    return out
}

/// An engine in `.protecting` with checkpoint 1 captured, shipped and acknowledged at t = 1 s.
private func protectingEngine() -> (PrimaryEngine, UInt64) {
    var e = PrimaryEngine(settings: settings)
    let t: UInt64 = 1_000 * ms
    _ = e.start(now: t)
    _ = e.onConnected(now: t)
    _ = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: t)
    _ = e.onCheckpointCaptured(1, now: t)
    _ = e.onCheckpointShipped(1, now: t)
    _ = e.onAck(1, now: t)
    return (e, t)
}

private func receivingCommitter(_ policy: BackupCommitter.FencePolicy, committed: Epoch, at t: UInt64) -> BackupCommitter {
    var c = BackupCommitter(settings: settings, fencePolicy: policy)
    _ = c.onPrimaryConnected(now: t)
    for epoch in 1...committed {
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: epoch, kind: .checkpoint), now: t)
        _ = c.onCheckpointComplete(CheckpointEnd(epoch: epoch, recordCount: 0, digest: 0, payloadBytes: 0), now: t)
        _ = c.onCommitted(epoch, now: t)
    }
    return c
}

@Suite("Engine deadlines")
struct EngineDeadlineTests {
    // MARK: - Primary

    /// The hang `remusd stop` against a frozen backup hit: the heartbeat tick the loop had pending
    /// fired first, and the stop's timeout was lost. Now the deadline is the state's.
    @Test func aStopWhileAHeartbeatTickIsPendingClosesAfterTheTimeout() {
        var (e, t) = protectingEngine()
        let heartbeatDue = try! #require(e.nextDeadline)
        t += 1 * ms
        #expect(t < heartbeatDue, "the heartbeat tick is still pending when the stop comes")
        _ = e.stop(reason: .plannedStop, now: t)
        #expect(e.nextDeadline == t + settings.timeoutNs)
        // The pending heartbeat tick fires first: harmless, the stop's deadline stays.
        #expect(e.onTick(now: heartbeatDue) == [])
        #expect(e.nextDeadline == t + settings.timeoutNs)
        // The backup is frozen: nothing arrives. Ticks at the deadline only, as the shell gives them.
        let d = runTicks(&e, from: heartbeatDue, through: t + settings.timeoutNs)
        #expect(d == [.closeConnection])
        #expect(e.state == .stopped)
        #expect(e.nextDeadline == nil)
    }

    @Test func aStopEndsNoEarlierThanTheTimeoutWhenTheBackupNeverCloses() {
        var (e, t) = protectingEngine()
        t += 7 * ms
        _ = e.stop(reason: .plannedStop, now: t)
        #expect(runTicks(&e, from: t, through: t + settings.timeoutNs - 1) == [])
        guard case .stopping = e.state else { Issue.record("state \(e.state)"); return }
        #expect(e.onTick(now: t + settings.timeoutNs) == [.closeConnection])
    }

    @Test func aSwitchoverWhoseBackupNeverClosesEndsWithinTheTimeout() {
        var (e, t) = protectingEngine()
        _ = e.switchover(now: t)
        _ = e.onCheckpointCaptured(2, now: t)
        _ = e.onCheckpointShipped(2, now: t)
        t += 2 * ms
        _ = e.onAck(2, now: t)
        #expect(e.state == .stopping(.switchover, since: t))
        #expect(runTicks(&e, from: t, through: t + settings.timeoutNs) == [.closeConnection])
        #expect(e.state == .stopped)
    }

    @Test func aConnectAttemptThatNeverAnswersCountsAsFailedAtItsDeadline() {
        var e = PrimaryEngine(settings: settings)
        #expect(e.start(now: 0) == [.connect])
        #expect(e.nextDeadline == settings.connectTimeoutNs)
        #expect(e.onTick(now: settings.connectTimeoutNs - 1) == [], "an early tick changes nothing")
        let d = e.onTick(now: settings.connectTimeoutNs)
        #expect(d.first == .closeConnection, "the shell abandons the attempt: its late result is ignored")
        #expect(d.contains(.releaseAllOutput), "never protected yet: the guest runs unprotected meanwhile")
        guard case .degraded(let reason, let retryAt, nil) = e.state else { Issue.record("state \(e.state)"); return }
        #expect(reason.contains("500 ms"))
        #expect(retryAt == settings.connectTimeoutNs + settings.retryNs)
        // The abandoned attempt connecting after all changes nothing (the shell drops it anyway).
        #expect(e.onConnected(now: retryAt - 1) == [])
        #expect(e.onTick(now: retryAt).contains(.connect))
        #expect(e.nextDeadline == retryAt + settings.connectTimeoutNs)
    }

    @Test func aConnectTimeoutAfterALostBackupKeepsTheHeldOutputAndItsGrace() {
        var (e, t) = protectingEngine()
        _ = e.onConnectionLost(reason: "reset", now: t)
        let held = t
        let d = runTicks(&e, from: t, through: t + settings.retryNs + settings.connectTimeoutNs)
        #expect(d.contains(.connect))
        #expect(d.contains(.closeConnection), "the silent attempt was abandoned")
        #expect(!d.contains(.releaseAllOutput), "the fence grace is not over yet")
        #expect(e.outputHeldSince == held)
        t = held + settings.fenceGraceNs
        #expect(runTicks(&e, from: t - 1, through: t).contains(.releaseAllOutput))
        #expect(e.outputHeldSince == nil)
    }

    @Test func aStalledPrimaryDoesNotGiveUpOnAHealthyBackup() {
        var (e, t) = protectingEngine()
        _ = runTicks(&e, from: t, through: t + 40 * ms)
        // This process did not run for 5 s (SIGSTOP): its first tick comes far past its deadline.
        t += 5_000 * ms
        let d = e.onTick(now: t)
        #expect(!d.contains(.closeConnection), "its own stall is no evidence of the backup's silence")
        guard case .protecting = e.state else { Issue.record("state \(e.state)"); return }
        // The backup's answers queued meanwhile arrive and keep it going.
        _ = e.onPeerActivity(now: t + 1 * ms)
        // A backup that really stays silent is still found lost, one timeout after the stall.
        let later = runTicks(&e, from: t + 1 * ms, through: t + 1 * ms + settings.timeoutNs)
        #expect(later.contains(.closeConnection))
        guard case .degraded = e.state else { Issue.record("state \(e.state)"); return }
    }

    @Test func aBlockedCheckpointIsNoDeadlineThatSpinsTheLoop() {
        var (e, t) = protectingEngine()
        // Checkpoints 2 and 3 fill both arenas; the next one is due but cannot start.
        for epoch: Epoch in 2...3 {
            t += 100 * ms
            _ = e.onPeerActivity(now: t)
            #expect(e.onTick(now: t).contains(.checkpoint(epoch, .checkpoint)))
            _ = e.onCheckpointCaptured(epoch, now: t)
        }
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)
        let deadline = try! #require(e.nextDeadline)
        #expect(deadline > t, "a due but blocked checkpoint must not ask for a tick now")
        // Freeing an arena takes the checkpoint at once, without a tick.
        #expect(e.onCheckpointShipped(2, now: t).contains(.checkpoint(4, .checkpoint)))
    }

    // MARK: - Backup

    @Test func aFenceThatNeverReportsCountsAsFailedAndIsRetried() {
        var c = receivingCommitter(.fence, committed: 2, at: 0)
        _ = c.onConnectionLost(reason: "EOF", now: 10 * ms)
        #expect(c.fenceInFlight)
        #expect(c.nextDeadline == 10 * ms + settings.fenceTimeoutNs)
        #expect(!c.acceptsPrimary)
        let d = runTicks(&c, from: 10 * ms, through: 10 * ms + settings.fenceTimeoutNs)
        #expect(d.contains(.fencePrimary))
        #expect(d.contains { if case .report(let r) = $0 { r.contains("did not finish within 2000 ms") } else { false } })
        #expect(!d.contains { if case .activate = $0 { true } else { false } })
        #expect(c.state == .fencing(committed: 2, attempt: 2, fence: .running(deadline: 10 * ms + 2 * settings.fenceTimeoutNs)))
        // The replica was prepared meanwhile; the retry succeeds.
        _ = c.onPrepared(success: true, detail: "ready", now: 20 * ms)
        #expect(c.onFenced(success: true, detail: "off", now: 3_000 * ms).contains(.activate(2)))
    }

    @Test func aFailedFenceWaitsAHeartbeatBeforeTheNextAttempt() {
        var c = receivingCommitter(.fence, committed: 1, at: 0)
        _ = c.onConnectionLost(reason: "EOF", now: 0)
        _ = c.onFenced(success: false, detail: "exit 1", now: 5 * ms)
        _ = c.onPrepared(success: true, detail: "ready", now: 5 * ms)
        #expect(c.acceptsPrimary, "no fence runs: a primary that comes back is taken back")
        #expect(c.nextDeadline == 55 * ms)
        #expect(c.onTick(now: 54 * ms) == [], "an early tick does not start a fence early")
        #expect(c.onFenced(success: true, detail: "late", now: 54 * ms) == [], "no fence runs: nothing to report")
        #expect(c.onTick(now: 55 * ms) == [.fencePrimary])
    }

    /// `kill -STOP` of the backup for longer than the timeout, then `kill -CONT`: the first tick
    /// comes before the reader delivers the STREAM_END queued in the socket.
    @Test func aStalledBackupReadsTheQueuedStreamEndInsteadOfTakingOver() {
        var c = receivingCommitter(.unsafeNoFence, committed: 3, at: 0)
        _ = runTicks(&c, from: 0, through: 120 * ms)
        let stalledUntil: UInt64 = 2_000 * ms
        let d = c.onTick(now: stalledUntil)
        #expect(!d.contains { if case .activate = $0 { true } else { false } }, "its own stall is not the primary's silence")
        #expect(!d.contains(.closeConnection))
        #expect(c.state == .receiving(committed: 3, connected: true))
        let end = c.onStreamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 3, message: ""), now: stalledUntil + 1 * ms)
        #expect(end.contains(.discardReplica))
        guard case .stopped = c.state else { Issue.record("state \(c.state)"); return }
    }

    @Test func aStalledBackupStillFindsASilentPrimaryLostOneTimeoutLater() {
        var c = receivingCommitter(.unsafeNoFence, committed: 3, at: 0)
        let stalledUntil: UInt64 = 2_000 * ms
        _ = c.onTick(now: stalledUntil)
        #expect(runTicks(&c, from: stalledUntil, through: stalledUntil + settings.timeoutNs - 1).allSatisfy {
            if case .activate = $0 { false } else { true }
        })
        #expect(c.onTick(now: stalledUntil + settings.timeoutNs).contains(.activate(3)))
        #expect(c.lossDetectedAt == stalledUntil + settings.timeoutNs)
    }

    // MARK: - Every state, random events

    /// Random event sequences, ticks at exactly `nextDeadline` interleaved (as the shell does):
    /// every state that waits has a deadline, a tick at the deadline moves it forward, and every
    /// state is visited.
    @Test func everyWaitingPrimaryStateHasADeadline() {
        var visited = Set<String>()
        for seed in 1...150 {
            var h = PrimaryHarness(seed: UInt64(seed))
            for _ in 0..<400 { h.step() }
            visited.formUnion(h.visited)
            if !h.problems.isEmpty {
                Issue.record("seed \(seed): \(h.problems.prefix(3).joined(separator: "; "))")
                break
            }
        }
        let all: Set = ["idle", "connecting", "synchronizing", "protecting", "degraded", "switchingOver", "handedOff", "selfFenced", "stopping", "stopped"]
        #expect(visited == all, "not visited: \(all.subtracting(visited))")
    }

    @Test func everyWaitingBackupStateHasADeadline() {
        var visited = Set<String>()
        for seed in 1...150 {
            var h = BackupHarness(seed: UInt64(seed))
            for _ in 0..<400 { h.step() }
            visited.formUnion(h.visited)
            if !h.problems.isEmpty {
                Issue.record("seed \(seed): \(h.problems.prefix(3).joined(separator: "; "))")
                break
            }
        }
        let all: Set = ["listening", "receiving", "fencing", "awaitingOperator", "activating", "active", "stopped"]
        #expect(visited == all, "not visited: \(all.subtracting(visited))")
    }
}

// MARK: - Harnesses: a shell in miniature

private func kind(_ s: PrimaryEngine.State) -> String {
    switch s {
    case .idle: "idle"
    case .connecting: "connecting"
    case .synchronizing: "synchronizing"
    case .protecting: "protecting"
    case .degraded: "degraded"
    case .switchingOver: "switchingOver"
    case .handedOff: "handedOff"
    case .selfFenced: "selfFenced"
    case .stopping: "stopping"
    case .stopped: "stopped"
    }
}

private func kind(_ s: BackupCommitter.State) -> String {
    switch s {
    case .listening: "listening"
    case .receiving: "receiving"
    case .fencing: "fencing"
    case .awaitingOperator: "awaitingOperator"
    case .activating: "activating"
    case .active: "active"
    case .stopped: "stopped"
    }
}

/// Executes a primary engine's directives the way PrimaryProtection does (capture at once,
/// shipping and the backup's answers later, in order), with random events in between.
private struct PrimaryHarness {
    var e = PrimaryEngine(settings: settings)
    var rng: SplitMix64
    var now: UInt64 = 1_000 * ms
    var connectPending = false
    var connected = false
    var precopyRound: Int?
    var toShip: [Epoch] = []
    var unacknowledged: [Epoch] = []
    var visited: Set<String> = ["idle"]
    var problems: [String] = []

    init(seed: UInt64) {
        rng = SplitMix64(seed: seed)
        run { $0.start(now: $1) }
    }

    mutating func chance(_ percent: UInt64) -> Bool { rng.next() % 100 < percent }

    /// Calls the engine, then carries out what it asks.
    mutating func run(_ call: (inout PrimaryEngine, UInt64) -> [PrimaryEngine.Directive]) {
        var queue = call(&e, now)
        visited.insert(kind(e.state))
        while !queue.isEmpty {
            let directive = queue.removeFirst()
            switch directive {
            case .connect:
                connectPending = true
            case .precopyRound(let round):
                precopyRound = round
            case .checkpoint(let epoch, _):
                // The shell captures at once, on the loop thread.
                let roll = rng.next() % 100
                if roll < 8 {
                    queue += e.onCaptureDeferred(epoch, pages: 50_000, limit: 1_000, now: now)
                } else if roll < 10 {
                    queue += e.onCaptureFailed(epoch, reason: "backend threw", now: now)
                } else {
                    queue += e.onCheckpointCaptured(epoch, pauseNs: (rng.next() % 60) * ms, pages: 1_000, now: now)
                }
                visited.insert(kind(e.state))
            case .ship(let epoch):
                if connected { toShip.append(epoch) }
            case .closeConnection:
                connectPending = false
                connected = false
                precopyRound = nil
                toShip = []
                unacknowledged = []
            default:
                break
            }
        }
        check()
    }

    mutating func check() {
        switch e.state {
        case .connecting, .degraded, .synchronizing, .protecting, .switchingOver, .stopping:
            if e.nextDeadline == nil { problems.append("no deadline in \(e.state)") }
        case .idle, .stopped, .handedOff, .selfFenced:
            break
        }
    }

    mutating func step() {
        switch e.state {
        case .stopped, .handedOff, .selfFenced:
            // An end state: another run of protection.
            if chance(10) {
                e = PrimaryEngine(settings: settings)
                connectPending = false; connected = false; precopyRound = nil; toShip = []; unacknowledged = []
                run { $0.start(now: $1) }
                return
            }
        default: break
        }
        let roll = rng.next() % 100
        if roll < 40 {
            // The loop wakes at the deadline (or, with none, some time later for an extra tick).
            let due = e.nextDeadline ?? now + (rng.next() % 200) * ms
            now = max(now, due)
            let before = now
            run { $0.onTick(now: $1) }
            if let next = e.nextDeadline, next <= before { problems.append("after a tick at \(before) the deadline is still \(next) in \(e.state)") }
            return
        }
        now += (rng.next() % 20) * ms
        switch roll {
        case 40..<45:
            run { $0.onTick(now: $1) }  // an extra tick before any deadline
        case 45..<55 where connectPending:
            connectPending = false
            if chance(70) {
                connected = true
                run { $0.onConnected(now: $1) }
            } else {
                run { $0.onConnectionLost(reason: "refused", now: $1) }
            }
        case 55..<62 where connected && precopyRound != nil:
            let round = precopyRound!
            precopyRound = nil
            let remaining = chance(50) ? 5 : 500
            run { $0.onPrecopyRoundShipped(round: round, remainingDirty: remaining, now: $1) }
        case 62..<72 where connected && !toShip.isEmpty:
            let epoch = toShip.removeFirst()
            unacknowledged.append(epoch)
            run { $0.onCheckpointShipped(epoch, now: $1) }
        case 72..<82 where connected && !unacknowledged.isEmpty && chance(80):
            let epoch = unacknowledged[Int(rng.next() % UInt64(unacknowledged.count))]
            unacknowledged.removeAll { $0 <= epoch }
            run { $0.onAck(epoch, now: $1) }
        case 82..<90 where connected:
            run { $0.onPeerActivity(now: $1) }
        case 90..<93 where connected:
            connected = false
            run { $0.onConnectionLost(reason: "reset", now: $1) }
        case 93..<95:
            run { $0.stop(reason: .plannedStop, now: $1) }
        case 95..<97:
            run { $0.switchover(now: $1) }
        case 97:
            run { $0.onOutputPressure(dropped: 3, now: $1) }
        case 98:
            if chance(20) { run { $0.onWitnessLost(reason: "lease", now: $1) } }
        case 99:
            if chance(20) { run { $0.onGuestLost(reason: "destroyed", now: $1) } }
        default:
            break
        }
    }
}

/// Executes a backup committer's directives the way BackupDaemon does (commit and activation at
/// once, a fence reporting later), with a random primary on the other side.
private struct BackupHarness {
    var c: BackupCommitter
    var rng: SplitMix64
    var now: UInt64 = 1_000 * ms
    var connected = false
    var nextEpoch: Epoch = 1
    var staging: CheckpointBegin?
    var fenceRunning = false
    var visited: Set<String> = ["listening"]
    var problems: [String] = []

    init(seed: UInt64) {
        rng = SplitMix64(seed: seed)
        c = BackupCommitter(settings: settings, fencePolicy: Self.policy(rng.next()))
    }

    static func policy(_ r: UInt64) -> BackupCommitter.FencePolicy {
        [.fence, .fence, .operatorOnly, .unsafeNoFence][Int(r % 4)]
    }

    mutating func chance(_ percent: UInt64) -> Bool { rng.next() % 100 < percent }

    mutating func run(_ call: (inout BackupCommitter, UInt64) -> [BackupCommitter.Directive]) {
        var queue = call(&c, now)
        visited.insert(kind(c.state))
        while !queue.isEmpty {
            switch queue.removeFirst() {
            case .commit(let epoch):
                queue += chance(95) ? c.onCommitted(epoch, now: now) : c.onCommitFailed(epoch, reason: "disk", now: now)
            case .activate:
                visited.insert(kind(c.state))
                queue += c.onActivated(now: now)
            case .fencePrimary:
                fenceRunning = true  // a new run: the shell ignores the old one's report
            case .closeConnection:
                connected = false
                staging = nil
            default:
                break
            }
            visited.insert(kind(c.state))
        }
        switch c.state {
        case .receiving, .fencing:
            if c.nextDeadline == nil { problems.append("no deadline in \(c.state)") }
        default:
            break
        }
    }

    mutating func step() {
        if case .active = c.state, chance(10) {
            c = BackupCommitter(settings: settings, fencePolicy: Self.policy(rng.next()))
            connected = false; staging = nil; fenceRunning = false
            return
        }
        let roll = rng.next() % 100
        if roll < 40 {
            let due = c.nextDeadline ?? now + (rng.next() % 200) * ms
            now = max(now, due)
            let before = now
            run { $0.onTick(now: $1) }
            if let next = c.nextDeadline, next <= before { problems.append("after a tick at \(before) the deadline is still \(next) in \(c.state)") }
            return
        }
        now += (rng.next() % 20) * ms
        switch roll {
        case 40..<48 where !connected && c.acceptsPrimary:
            connected = true
            staging = nil
            fenceRunning = false
            run { $0.onPrimaryConnected(now: $1) }
        case 48..<60 where connected && staging == nil:
            let kind: CheckpointKind = chance(3) ? .final : (chance(20) ? .precopy : .checkpoint)
            let begin = CheckpointBegin(epoch: kind == .precopy ? 0 : nextEpoch, kind: kind)
            if kind != .precopy { nextEpoch += 1 }
            staging = begin
            run { $0.onCheckpointBegan(begin, now: $1) }
        case 60..<72 where connected && staging != nil:
            let begin = staging!
            staging = nil
            let epoch = chance(95) ? begin.epoch : begin.epoch + 7
            run { $0.onCheckpointComplete(CheckpointEnd(epoch: epoch, recordCount: 0, digest: 0, payloadBytes: 0), now: $1) }
        case 72..<80 where connected:
            run { $0.onPeerActivity(now: $1) }
        case 80..<84 where connected:
            connected = false
            let reason: StreamEndReason = [.plannedStop, .switchover, .shutdown, .error][Int(rng.next() % 4)]
            let end = StreamEnd(reason: reason, lastEpoch: nextEpoch - 1, message: "")
            run { $0.onStreamEnd(end, now: $1) }
        case 84..<87 where connected:
            connected = false
            run { $0.onStreamRejected("CRC32C mismatch", now: $1) }
        case 87..<91 where connected:
            connected = false
            run { $0.onConnectionLost(reason: "EOF", now: $1) }
        case 91..<97 where fenceRunning:
            fenceRunning = false
            let ok = chance(40)
            run { $0.onFenced(success: ok, detail: ok ? "off" : "exit 1", now: $1) }
        case 97..<99:
            run { $0.onOperatorActivate(now: $1) }
        default:
            break
        }
    }
}
