import RemusCore
import Testing

/// A clock that returns the given readings in order (then stays at the last one).
private final class ScriptedClock: HostClock, @unchecked Sendable {  // used by one test thread
    private var readings: [UInt64]
    init(_ readings: [UInt64]) { self.readings = readings }
    func monotonicNs() -> UInt64 { readings.count > 1 ? readings.removeFirst() : readings[0] }
    func wallNs() -> Int64 { 0 }
}

@Suite struct PauseSplitTests {
    @Test("The pause splits at the suspend call's return and the capture's end; the parts add up to the whole")
    func splitsAtTheBoundaries() {
        // Xen's order: the suspend callback (event channel, SHUTDOWN_suspend) takes 3 ms,
        // reading xc_domain_save's checkpoint 41 ms, xc_domain_resume 2 ms.
        let clock = ScriptedClock([1_000_000, 4_000_000, 45_000_000, 47_000_000])
        var stopwatch = PauseStopwatch(clock: clock)
        #expect(stopwatch.startNs == 1_000_000)
        stopwatch.suspended()
        stopwatch.captured()
        let split = stopwatch.resumed()
        #expect(split == PauseSplit(suspendNs: 3_000_000, captureNs: 41_000_000, resumeNs: 2_000_000))
        #expect(split.totalNs == 46_000_000)
    }

    @Test("A suspend that failed counts all its time as suspend; a capture that failed half-way ends at the resume call")
    func missingBoundariesFallOnTheNextOne() {
        // The suspend threw: neither boundary was reached; the whole pause is suspend.
        let failedSuspend = PauseStopwatch(clock: ScriptedClock([10, 30])).resumed()
        #expect(failedSuspend == PauseSplit(suspendNs: 20, captureNs: 0, resumeNs: 0))
        // Suspended, then the capture threw before its end was marked: marked when the resume begins.
        let clock = ScriptedClock([100, 150, 400, 420])
        var stopwatch = PauseStopwatch(clock: clock)
        stopwatch.suspended()
        stopwatch.captured()  // the shell marks it on the way out, failure or not
        #expect(stopwatch.resumed() == PauseSplit(suspendNs: 50, captureNs: 250, resumeNs: 20))
    }

    @Test("A final checkpoint leaves the guest suspended: no resume, the part is what was left after the capture")
    func finalCheckpointHasNoResume() {
        let clock = ScriptedClock([0, 7, 19, 19])
        var stopwatch = PauseStopwatch(clock: clock)
        stopwatch.suspended()
        stopwatch.captured()
        #expect(stopwatch.resumed() == PauseSplit(suspendNs: 7, captureNs: 12, resumeNs: 0))
    }
}
