import RemusCore
@testable import RemusSim
import Testing

@Suite("Guest clock across failover (I4)")
struct ClockTests {
    @Test func monotonicContinuesFromTheCheckpointPlusElapsedTimeAtMost() throws {
        let config = smallConfig()
        let primaryClock = ManualClock(monotonicNs: 100 * secondNs)
        let primary = try SimGuest(config: config, clock: primaryClock, nic: nil, autoRun: false)
        primaryClock.advance(7 * secondNs)
        // Another host: another boot time, the same wall clock.
        let backupClock = ManualClock(monotonicNs: 3 * secondNs, wallNs: primaryClock.wallNs())
        primary.stepAll(ops: 1_000)
        let replica = SimReplica(clock: backupClock, autoRunOnActivation: false)
        let loop = try CheckpointLoop(primary: primary, replica: replica, clock: primaryClock)
        try loop.checkpoint(commit: false)
        let captured = try primary.captureState(clock: primaryClock).clock
        #expect(captured.guestMonotonicNs == 7 * secondNs)

        // Shipping takes 2 ms, then the backup commits; the primary dies; detection takes 300 ms.
        primaryClock.advance(2_000_000)
        backupClock.advance(2_000_000)
        try replica.commit(loop.arena, state: try primary.captureState(clock: primaryClock))
        let committed = try #require(replica.committedState).clock
        backupClock.advance(300_000_000)
        try replica.activate(clock: backupClock)
        let guest = try #require(replica.activatedGuest)
        let first = guest.clockNow()
        let elapsedSinceCommit: UInt64 = 300_000_000
        #expect(first.guestMonotonicNs == committed.guestMonotonicNs + elapsedSinceCommit)

        let verifier = SimVerifier(config: config)
        let report = verifier.verifyClock(before: committed, firstAfter: first.guestMonotonicNs, realElapsedNs: elapsedSinceCommit)
        #expect(report.passed, "\(report)")
        #expect(report.counter("advanceNs") == elapsedSinceCommit)

        // Wall time: the guest's offset to its host's wall clock is kept (here 0).
        #expect(first.guestWallNs == backupClock.wallNs())
        // It keeps running with the backup host's clock.
        backupClock.advance(1_000)
        #expect(guest.clockNow().guestMonotonicNs == first.guestMonotonicNs + 1_000)
    }

    @Test func wallTimeNeverReadsEarlierThanTheCheckpoint() throws {
        let checkpoint = ClockState(
            guestMonotonicNs: 50, guestWallNs: 2_000_000_000_000, tscKHz: 0, hostMonotonicNs: 10,
            hostWallNs: 2_000_000_000_000)
        // The backup's wall clock is a second behind the primary's.
        let clock = GuestClock.resumed(
            from: checkpoint, committedAtHostNs: 1_000, hostMonotonicNs: 1_500, hostWallNs: 1_999_000_000_000)
        let now = clock.reading(hostMonotonicNs: 1_500, hostWallNs: 1_999_000_000_000)
        #expect(now.guestMonotonicNs == 550)
        #expect(now.guestWallNs == 2_000_000_000_000)
        // A backup clock that reads before the commit (another clock source) gives no jump backwards.
        let odd = GuestClock.resumed(from: checkpoint, committedAtHostNs: 9_000, hostMonotonicNs: 10, hostWallNs: 0)
        #expect(odd.reading(hostMonotonicNs: 10, hostWallNs: 0).guestMonotonicNs == 50)
    }

    @Test func theClockCheckCanFail() {
        let verifier = SimVerifier(config: smallConfig())
        let before = ClockState(guestMonotonicNs: 1_000_000, guestWallNs: 0, tscKHz: 0, hostMonotonicNs: 0, hostWallNs: 0)
        let backwards = verifier.verifyClock(before: before, firstAfter: 999_999, realElapsedNs: 10)
        #expect(!backwards.passed)
        #expect(backwards.mismatches.first?.contains("backwards by 1 ns") == true)
        let leap = verifier.verifyClock(before: before, firstAfter: 1_000_000 + 500, realElapsedNs: 100)
        #expect(!leap.passed)
        #expect(verifier.verifyClock(before: before, firstAfter: 1_000_000 + 500, realElapsedNs: 100, toleranceNs: 400).passed)
    }

    @Test func theBootClockStartsAtZero() throws {
        let host = ManualClock(monotonicNs: 42 * secondNs)
        let guest = try SimGuest(config: smallConfig(), clock: host, nic: nil, autoRun: false)
        #expect(guest.clockNow().guestMonotonicNs == 0)
        host.advance(5)
        #expect(guest.clockNow().guestMonotonicNs == 5)
        #expect(try guest.captureState(clock: host).clock.hostMonotonicNs == 42 * secondNs + 5)
    }
}
