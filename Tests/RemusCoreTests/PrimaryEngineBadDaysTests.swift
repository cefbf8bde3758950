import RemusCore
import Testing

private let ms: UInt64 = 1_000_000

private func engine(_ policy: OverloadPolicy = .throttle, maxPauseMs: UInt64 = 20) -> (PrimaryEngine, UInt64) {
    var e = PrimaryEngine(settings: ProtectionSettings(
        intervalNs: 100 * ms, heartbeatNs: 50 * ms, timeoutNs: 300 * ms, maxPauseNs: maxPauseMs * ms, overload: policy))
    let t: UInt64 = 1_000 * ms
    _ = e.start(now: t)
    _ = e.onConnected(now: t)
    _ = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: t)
    _ = e.onCheckpointCaptured(1, pauseNs: 1 * ms, pages: 100, now: t)
    _ = e.onCheckpointShipped(1, now: t)
    _ = e.onAck(1, now: t)
    return (e, t)
}

/// Takes checkpoint `epoch` at `t` with the given pause; returns the directives of the capture report.
private func checkpoint(_ e: inout PrimaryEngine, _ epoch: Epoch, at t: UInt64, pauseMs: UInt64, pages: Int) -> [PrimaryEngine.Directive] {
    _ = e.onPeerActivity(now: t)
    #expect(e.onTick(now: t).contains(.checkpoint(epoch, .checkpoint)))
    let d = e.onCheckpointCaptured(epoch, pauseNs: pauseMs * ms, pages: pages, now: t)
    _ = e.onCheckpointShipped(epoch, now: t)
    _ = e.onAck(epoch, now: t)
    return d
}

@Suite("Primary engine on bad days")
struct PrimaryEngineBadDaysTests {
    @Test func throttlePolicyHalvesTheGuestSpeedWhileThePauseIsOverTheBound() {
        var (e, t) = engine(.throttle)
        t += 100 * ms
        #expect(checkpoint(&e, 2, at: t, pauseMs: 40, pages: 4000).contains(.throttleGuest(percent: 50)))
        t += 100 * ms
        #expect(checkpoint(&e, 3, at: t, pauseMs: 30, pages: 3000).contains(.throttleGuest(percent: 25)))
        // Ten calm checkpoints in a row give speed back, one step at a time.
        var restored = false
        for epoch: Epoch in 4...13 {
            t += 100 * ms
            if checkpoint(&e, epoch, at: t, pauseMs: 1, pages: 100).contains(.throttleGuest(percent: 50)) { restored = true }
        }
        #expect(restored)
    }

    @Test func degradePolicyLengthensEpochsAndSaysSo() {
        var (e, t) = engine(.degrade)
        t += 100 * ms
        let d = checkpoint(&e, 2, at: t, pauseMs: 40, pages: 4000)
        #expect(d.contains { if case .report(.degraded(let text)) = $0 { text.contains("200 ms") } else { false } })
        // The next checkpoint is due after 200 ms, not 100.
        _ = e.onPeerActivity(now: t + 150 * ms)
        #expect(!e.onTick(now: t + 150 * ms).contains(.checkpoint(3, .checkpoint)))
        _ = e.onPeerActivity(now: t + 200 * ms)
        #expect(e.onTick(now: t + 200 * ms).contains(.checkpoint(3, .checkpoint)))
    }

    @Test func abortPolicyEndsProtectionAndLeavesTheGuestRunning() {
        var (e, t) = engine(.abort)
        t += 100 * ms
        let d = checkpoint(&e, 2, at: t, pauseMs: 40, pages: 4000)
        #expect(d.contains(.sendStreamEnd(.plannedStop, lastEpoch: 2)))
        #expect(d.contains(.releaseAllOutput))
        #expect(!d.contains(.stopGuest))
        #expect(e.state == .stopping(.plannedStop, since: t))
    }

    @Test func aDirtySetOverThePauseBoundIsDeferredNotCaptured() {
        var (e, t) = engine(.throttle)
        t += 100 * ms
        _ = checkpoint(&e, 2, at: t, pauseMs: 10, pages: 1000)  // 10 µs per page measured
        #expect(e.capturePageLimit < 10_000)
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        #expect(e.onTick(now: t).contains(.checkpoint(3, .checkpoint)))
        let d = e.onCaptureDeferred(3, pages: 50_000, limit: e.capturePageLimit, now: t)
        #expect(d.contains(.throttleGuest(percent: 50)))
        #expect(e.capturedEpoch == 2, "the deferred checkpoint's epoch is taken again next time")
        #expect(e.capturePageLimit == .max, "never deferred twice in a row: the dirty set only grows while waiting")
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        #expect(e.onTick(now: t).contains(.checkpoint(3, .checkpoint)))
        _ = e.onCheckpointCaptured(3, pauseNs: 60 * ms, pages: 6000, now: t)
        #expect(e.capturePageLimit < .max, "after a capture the bound applies again")
    }

    @Test func switchoverTakesAFinalCheckpointAndStopsTheGuestOnlyAfterItsAck() {
        var (e, t) = engine()
        t += 10 * ms
        let d = e.switchover(now: t)
        #expect(d == [.checkpoint(2, .final)])
        #expect(e.state == .switchingOver(final: 2, outputHeldSince: nil))
        #expect(e.onCheckpointCaptured(2, pauseNs: 1 * ms, pages: 10, now: t) == [.ship(2)])
        _ = e.onCheckpointShipped(2, now: t)
        // No further checkpoint while the guest is handed over.
        _ = e.onPeerActivity(now: t + 200 * ms)
        #expect(!e.onTick(now: t + 200 * ms).contains { if case .checkpoint = $0 { true } else { false } })
        let done = e.onAck(2, now: t + 201 * ms)
        #expect(done.first == .releaseOutput(through: 2))
        #expect(done.contains(.stopGuest))
        #expect(done.contains(.sendStreamEnd(.switchover, lastEpoch: 2)))
        #expect(!done.contains(.releaseAllOutput), "nothing after the final checkpoint is released twice or at all")
    }

    @Test func switchoverWithoutAnAckLeavesTheGuestSuspendedAndReleasesNothing() {
        var (e, t) = engine()
        _ = e.switchover(now: t)
        _ = e.onCheckpointCaptured(2, now: t)
        _ = e.onCheckpointShipped(2, now: t)
        // The backup falls silent; the shell ticks at each deadline until it counts as lost.
        let d = runTicks(&e, from: t, through: t + 400 * ms)
        t += 400 * ms
        #expect(d.contains(.closeConnection))
        #expect(!d.contains(.releaseAllOutput))
        #expect(!d.contains { if case .releaseOutput = $0 { true } else { false } })
        guard case .handedOff(let text) = e.state else { Issue.record("state \(e.state)"); return }
        #expect(text.contains("must not be resumed"))
        // It never reconnects or resumes by itself.
        #expect(e.onTick(now: t + 10_000 * ms) == [])
    }

    @Test func switchoverWaitsForAFreeArena() {
        var (e, t) = engine()
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)  // checkpoint 2 captured
        _ = e.onCheckpointCaptured(2, now: t)
        t += 100 * ms
        _ = e.onPeerActivity(now: t)
        _ = e.onTick(now: t)  // checkpoint 3: both arenas shipping
        _ = e.onCheckpointCaptured(3, now: t)
        #expect(e.switchover(now: t) == [])
        #expect(e.onCheckpointShipped(2, now: t).contains(.checkpoint(4, .final)))
    }
}

@Suite("Primary engine and the witness")
struct PrimaryEngineWitnessTests {
    @Test func losingTheWitnessPausesTheGuestAndHoldsOutput() {
        var e = PrimaryEngine(settings: ProtectionSettings())
        _ = e.start(now: 0)
        _ = e.onConnected(now: 0)
        _ = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: 0)
        let d = e.onWitnessLost(reason: "etcd unreachable for 2.5 s", now: 1)
        #expect(d.contains(.pauseGuest))
        #expect(d.contains(.holdOutput))
        #expect(!d.contains(.releaseAllOutput))
        guard case .selfFenced = e.state else { Issue.record("state \(e.state)"); return }
        // Nothing afterwards releases output or resumes protection by itself.
        #expect(e.onTick(now: 10_000_000_000) == [])
        #expect(e.onAck(1, now: 10_000_000_001) == [])
        // The operator may end it; the guest stays paused, nothing is released.
        let stop = e.stop(reason: .plannedStop, now: 10_000_000_002)
        #expect(!stop.contains(.releaseAllOutput))
        #expect(e.state == .stopped)
    }
}

@Suite("Primary engine and a full output buffer")
struct PrimaryEngineOutputPressureTests {
    @Test func aFullOutputBufferBringsTheNextCheckpointForward() {
        var e = PrimaryEngine(settings: ProtectionSettings(intervalNs: 100_000_000))
        _ = e.start(now: 0)
        _ = e.onConnected(now: 0)
        _ = e.onPrecopyRoundShipped(round: 1, remainingDirty: 0, now: 0)
        _ = e.onCheckpointCaptured(1, now: 0)
        _ = e.onCheckpointShipped(1, now: 1)
        _ = e.onAck(1, now: 2)
        // 10 ms into a 100 ms interval: not due, but the buffer dropped packets.
        _ = e.onPeerActivity(now: 10_000_000)
        #expect(!e.onTick(now: 10_000_000).contains(.checkpoint(2, .checkpoint)))
        let d = e.onOutputPressure(dropped: 14, now: 10_000_001)
        #expect(d.contains(.checkpoint(2, .checkpoint)))
        #expect(d.contains { if case .report(.overload(let t)) = $0 { t.contains("14 packets were dropped") } else { false } })
    }
}
