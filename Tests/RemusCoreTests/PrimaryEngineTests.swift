import RemusCore
import Testing

private let ms: UInt64 = 1_000_000
private let settings = ProtectionSettings(
    intervalNs: 100 * ms, heartbeatNs: 50 * ms, timeoutNs: 300 * ms,
    maxPrecopyRounds: 3, precopyTargetPages: 10, maxUnacknowledged: 3, maxShipping: 2)

/// Drives an engine to `.protecting` with checkpoint 1 captured and shipped at t = 1 s.
private func protectingEngine() -> (PrimaryEngine, UInt64) {
    var e = PrimaryEngine(settings: settings)
    var t: UInt64 = 1_000 * ms
    _ = e.start(now: t)
    _ = e.onConnected(now: t)
    let d = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: t)
    #expect(d.contains(.checkpoint(1, .checkpoint)))
    _ = e.onCheckpointCaptured(1, now: t)
    t += 1 * ms
    _ = e.onCheckpointShipped(1, now: t)
    return (e, t)
}

@Suite("Primary engine")
struct PrimaryEngineTests {
    @Test func startConnectsThenPrecopiesWithDirtyLogging() {
        var e = PrimaryEngine(settings: settings)
        #expect(e.start(now: 0) == [.connect])
        let d = e.onConnected(now: 5)
        #expect(d.starts(with: [.startDirtyLogging, .precopyRound(1)]))
        #expect(e.state == .synchronizing(round: 1, outputHeldSince: nil))
    }

    @Test func precopyContinuesWhileDirtySetIsLargeAndStopsAtRoundLimit() {
        var e = PrimaryEngine(settings: settings)
        _ = e.start(now: 0)
        _ = e.onConnected(now: 0)
        #expect(e.onPrecopyRoundShipped(round: 1, remainingDirty: 500, now: 1) == [.precopyRound(2)])
        #expect(e.onPrecopyRoundShipped(round: 2, remainingDirty: 500, now: 2) == [.precopyRound(3)])
        // Round 3 is the last one allowed: a guest that never converges still gets protected.
        let d = e.onPrecopyRoundShipped(round: 3, remainingDirty: 500, now: 3)
        #expect(d.contains(.checkpoint(1, .checkpoint)))
        #expect(d.first == .holdOutput, "output must be held before the first checkpoint closes its epoch")
        #expect(e.state == .protecting(switchoverPending: false, outputHeldSince: nil))
    }

    @Test func precopyStopsEarlyWhenConverged() {
        var e = PrimaryEngine(settings: settings)
        _ = e.start(now: 0)
        _ = e.onConnected(now: 0)
        let d = e.onPrecopyRoundShipped(round: 1, remainingDirty: 10, now: 1)
        #expect(d.contains(.checkpoint(1, .checkpoint)))
    }

    @Test func staleRoundReportIsIgnored() {
        var e = PrimaryEngine(settings: settings)
        _ = e.start(now: 0)
        _ = e.onConnected(now: 0)
        #expect(e.onPrecopyRoundShipped(round: 7, remainingDirty: 0, now: 1) == [])
        #expect(e.state == .synchronizing(round: 1, outputHeldSince: nil))
    }

    @Test func capturedCheckpointIsShipped() {
        var e = PrimaryEngine(settings: settings)
        _ = e.start(now: 0)
        _ = e.onConnected(now: 0)
        _ = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: 0)
        #expect(e.onCheckpointCaptured(1, now: 0) == [.ship(1)])
    }

    @Test func checkpointsFollowTheInterval() {
        var (e, t) = protectingEngine()
        // Not yet due.
        #expect(!e.onTick(now: t + 10 * ms).contains(.checkpoint(2, .checkpoint)))
        t = 1_000 * ms + 100 * ms
        #expect(e.onTick(now: t).contains(.checkpoint(2, .checkpoint)))
    }

    @Test func outputIsReleasedOnlyByAckAndInOrder() {
        var (e, t) = protectingEngine()
        t += 100 * ms
        _ = e.onTick(now: t)
        _ = e.onCheckpointCaptured(2, now: t)
        _ = e.onCheckpointShipped(2, now: t)
        // Heartbeats, ticks and shipping never release output (I1).
        for step in 1...5 {
            let d = e.onTick(now: t + UInt64(step) * ms)
            #expect(!d.contains { if case .releaseOutput = $0 { true } else { false } })
        }
        #expect(e.onAck(1, now: t + 6 * ms).first == .releaseOutput(through: 1))
        // A coalesced ACK covers both epochs; a repeated or older ACK releases nothing more.
        #expect(e.onAck(2, now: t + 7 * ms).first == .releaseOutput(through: 2))
        #expect(e.onAck(2, now: t + 8 * ms) == [])
        #expect(e.onAck(1, now: t + 9 * ms) == [])
        #expect(e.acknowledgedEpoch == 2)
    }

    @Test func ackOfAnUnsentEpochGivesUpProtection() {
        var (e, t) = protectingEngine()
        t += 1 * ms
        let d = e.onAck(5, now: t)
        #expect(d.contains(.closeConnection))
        guard case .degraded = e.state else { Issue.record("state \(e.state)"); return }
    }

    @Test func anAckMayOvertakeTheReportThatItsCheckpointWentOut() {
        var (e, t) = protectingEngine()
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)
        _ = e.onCheckpointCaptured(2, now: t)
        // The writer thread has not reported checkpoint 2 shipped yet, but its ACK is here.
        let d = e.onAck(2, now: t + 1)
        #expect(d.first == .releaseOutput(through: 2))
        #expect(e.state == .protecting(switchoverPending: false, outputHeldSince: nil))
        #expect(e.onCheckpointShipped(2, now: t + 2) == [])
    }

    @Test func checkpointsWaitWhileTooManyAreUnacknowledged() {
        var (e, t) = protectingEngine()
        // maxUnacknowledged = 3: epochs 2 and 3 go out, then the engine waits for an ACK.
        for epoch: Epoch in 2...3 {
            t += 100 * ms
            _ = e.onPeerActivity(now: t)  // the backup is alive but acknowledges nothing new
            #expect(e.onTick(now: t).contains(.checkpoint(epoch, .checkpoint)))
            _ = e.onCheckpointCaptured(epoch, now: t)
            _ = e.onCheckpointShipped(epoch, now: t)
        }
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        #expect(!e.onTick(now: t).contains(.checkpoint(4, .checkpoint)))
        // The ACK frees a slot and the overdue checkpoint is taken at once.
        let d = e.onAck(2, now: t + 1 * ms)
        #expect(d.contains(.releaseOutput(through: 2)))
        #expect(d.contains(.checkpoint(4, .checkpoint)))
    }

    @Test func checkpointsWaitForAFreeStagingArena() {
        var (e, t) = protectingEngine()
        _ = e.onAck(1, now: t)
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)  // checkpoint 2 captured, not shipped
        _ = e.onCheckpointCaptured(2, now: t)
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)  // checkpoint 3: second arena
        _ = e.onCheckpointCaptured(3, now: t)
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        #expect(!e.onTick(now: t).contains(.checkpoint(4, .checkpoint)), "both arenas are busy shipping")
        #expect(e.onCheckpointShipped(2, now: t).contains(.checkpoint(4, .checkpoint)))
    }

    @Test func heartbeatsGoOutAtTheHeartbeatInterval() {
        var (e, t) = protectingEngine()
        t = 1_000 * ms + 50 * ms
        _ = e.onPeerActivity(now: t)
        #expect(e.onTick(now: t).contains(.sendHeartbeat(1)))
        #expect(!e.onTick(now: t + 10 * ms).contains(.sendHeartbeat(2)))
        #expect(e.onTick(now: t + 50 * ms).contains(.sendHeartbeat(2)))
    }

    @Test func silenceBeyondTheTimeoutDegradesButHoldsOutputForTheFenceGrace() {
        var (e, t) = protectingEngine()
        let lastHeard = e.lastHeardAt
        // Heartbeats and checkpoints at their deadlines, as the shell ticks; the backup says nothing.
        #expect(!runTicks(&e, from: t, through: lastHeard + 299 * ms).contains(.closeConnection))
        let lost = lastHeard + 300 * ms
        let d = runTicks(&e, from: lastHeard + 299 * ms, through: lost)
        #expect(d.contains(.closeConnection))
        #expect(!d.contains(.releaseAllOutput), "the backup may be fencing us: unacknowledged output stays held")
        guard case .degraded(let reason, _, _) = e.state else { Issue.record("state \(e.state)"); return }
        #expect(reason.contains("300 ms"))
        // Reconnection attempts fail; once the grace is over the output flows unprotected.
        t = lost
        var released = false
        while t < lost + settings.fenceGraceNs + 1_000 * ms && !released {
            t += 10 * ms
            let out = e.onTick(now: t)
            if out.contains(.connect) { _ = e.onConnectionLost(reason: "refused", now: t) }
            if out.contains(.releaseAllOutput) {
                released = true
                #expect(t >= lost + settings.fenceGraceNs)
            }
        }
        #expect(released)
    }

    @Test func aBackupThatTakesUsBackCoversTheHeldOutput() {
        var (e, t) = protectingEngine()
        _ = e.onConnectionLost(reason: "reset by peer", now: t)
        t += settings.retryNs
        #expect(e.onTick(now: t).contains(.connect))
        _ = e.onConnected(now: t)
        let first = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: t)
        #expect(!first.contains(.releaseAllOutput))
        _ = e.onCheckpointCaptured(2, now: t)
        _ = e.onCheckpointShipped(2, now: t)
        #expect(e.onAck(2, now: t).first == .releaseOutput(through: 2), "the new stream's first ACK releases what was held")
        #expect(e.outputHeldSince == nil)
    }

    @Test func theEarlierLossesGraceEndingDuringANewStreamReleasesOnlyWhatCameBeforeIt() {
        // The drill's kill points found it: a backup lost, a new stream up within the fence grace,
        // its checkpoints taken but not yet acknowledged when the grace of the first loss ends.
        // Releasing everything there (and letting output pass from then on) broke I1: the new
        // backup took over at a checkpoint older than output the outside world had seen.
        var (e, lost, t) = reconnectedEngine()
        _ = e.onAck(2, now: t)  // covers epochs 1 and 2: the held output went out with it
        for epoch: Epoch in 3...4 {
            t += settings.intervalNs
            _ = e.onPeerActivity(now: t)
            #expect(e.onTick(now: t).contains(.checkpoint(epoch, .checkpoint)))
            _ = e.onCheckpointCaptured(epoch, now: t)
            _ = e.onCheckpointShipped(epoch, now: t)
        }
        // Nothing was held from before the stream any more: the grace's end releases nothing.
        let quiet = runGrace(&e, lost: lost, from: t)
        #expect(!quiet.contains(.releaseAllOutput))
        #expect(quiet.allSatisfy { if case .releaseOutput = $0 { return false } else { return true } }, "\(quiet)")

        // Again, with the grace ending before the new stream's first ACK.
        var (f, lost2, u) = reconnectedEngine()
        let d = runGrace(&f, lost: lost2, from: u)
        #expect(!d.contains(.releaseAllOutput), "the new stream's epochs must stay held: \(d)")
        #expect(d.contains(.releaseOutput(through: 1)), "what came before the stream (epoch 1) goes out: \(d)")
        #expect(f.onAck(2, now: lost2 + settings.fenceGraceNs + 1).first == .releaseOutput(through: 2))
    }

    /// An engine that lost its backup right after checkpoint 1 and reconnected: checkpoint 2, the
    /// new stream's first, captured and shipped, not acknowledged. With when it lost and `now`.
    private func reconnectedEngine() -> (PrimaryEngine, lost: UInt64, now: UInt64) {
        var (e, t) = protectingEngine()
        let lost = t
        _ = e.onConnectionLost(reason: "reset by peer", now: lost)
        t += settings.retryNs
        #expect(e.onTick(now: t).contains(.connect))
        _ = e.onConnected(now: t)
        _ = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: t)
        _ = e.onCheckpointCaptured(2, now: t)
        _ = e.onCheckpointShipped(2, now: t)
        return (e, lost, t)
    }

    /// Ticks an engine whose backup answers every heartbeat, from `from` to just past the fence
    /// grace of a loss at `lost`; the directives.
    private func runGrace(_ e: inout PrimaryEngine, lost: UInt64, from: UInt64) -> [PrimaryEngine.Directive] {
        var out: [PrimaryEngine.Directive] = []
        var t = from
        while t <= lost + settings.fenceGraceNs + 10 * ms {
            t += 10 * ms
            _ = e.onPeerActivity(now: t)
            out += e.onTick(now: t)
        }
        return out
    }

    @Test func closedConnectionDegradesAtOnceAndRetriesWithBackoff() {
        var (e, t) = protectingEngine()
        let d = e.onConnectionLost(reason: "reset by peer", now: t)
        #expect(d.contains(.closeConnection))
        guard case .degraded(_, let retryAt, _) = e.state else { Issue.record("state \(e.state)"); return }
        #expect(retryAt == t + settings.retryNs)
        #expect(e.nextDeadline == retryAt)
        #expect(e.onTick(now: retryAt - 1) == [])
        #expect(e.onTick(now: retryAt).contains(.connect))
        // The second failure doubles the delay.
        t = retryAt
        _ = e.onConnectionLost(reason: "refused", now: t)
        guard case .degraded(_, let retry2, _) = e.state else { Issue.record("state \(e.state)"); return }
        #expect(retry2 == t + 2 * settings.retryNs)
    }

    @Test func reconnectionResynchronisesAndContinuesEpochNumbers() {
        var (e, t) = protectingEngine()
        _ = e.onConnectionLost(reason: "reset", now: t)
        t += settings.retryNs
        _ = e.onTick(now: t)
        let d = e.onConnected(now: t)
        #expect(d.contains(.precopyRound(1)))
        let first = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: t)
        #expect(first.contains(.holdOutput))
        #expect(first.contains(.checkpoint(2, .checkpoint)), "epochs keep increasing across connections")
        // An ACK from the old stream's numbering is not accepted as covering the new stream.
        #expect(e.onAck(1, now: t).contains(.closeConnection))
    }

    @Test func captureFailureDegrades() {
        var (e, t) = protectingEngine()
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)
        let d = e.onCaptureFailed(2, reason: "guest vanished", now: t)
        #expect(d.contains(.closeConnection))
        guard case .degraded = e.state else { Issue.record("state \(e.state)"); return }
    }

    @Test func aVanishedGuestEndsTheStreamWithAnErrorAndKeepsOutputHeld() {
        var (e, t) = protectingEngine()
        _ = e.onAck(1, now: t)
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        let due = e.onTick(now: t)
        #expect(due.contains(.checkpoint(2, .checkpoint)))
        // Checkpoint 2 fails because the domain is gone: the backup must take over from 1.
        let d = e.onGuestLost(reason: "domain destroyed", now: t)
        #expect(d.first == .sendStreamEnd(.error, lastEpoch: 1), "the failed checkpoint 2 never completed")
        #expect(!d.contains(.releaseAllOutput), "output of epochs the backup may not have must stay held")
        #expect(!d.contains { if case .releaseOutput = $0 { return true } else { return false } })
        #expect(e.state == .stopped)
        t += 10_000 * ms
        #expect(e.onTick(now: t) == [], "a stopped engine neither reconnects nor releases")
    }

    @Test func plannedStopSendsStreamEndWithTheLastCapturedEpoch() {
        var (e, t) = protectingEngine()
        _ = e.onAck(1, now: t)
        t += 1
        let d = e.stop(reason: .plannedStop, now: t)
        #expect(d.first == .sendStreamEnd(.plannedStop, lastEpoch: 1))
        #expect(e.state == .stopping(.plannedStop, since: t))
        _ = e.onConnectionLost(reason: "closed", now: t)
        #expect(e.state == .stopped)
    }

    @Test func eventsAfterStopChangeNothing() {
        var (e, t) = protectingEngine()
        _ = e.stop(reason: .plannedStop, now: t)
        _ = e.onConnectionLost(reason: "closed", now: t)
        t += 10_000 * ms
        #expect(e.onTick(now: t) == [])
        #expect(e.onAck(1, now: t) == [])
        #expect(e.state == .stopped)
    }
}
