import Testing

@testable import RemusRuntime

/// The time left that the synchronisation's progress bar shows (#14: right within 20 %).
@Suite struct SyncETATests {
    private static let second: UInt64 = 1_000_000_000

    /// Within a millisecond of `expected` (the estimate is computed in floating point).
    private func near(_ value: UInt64?, _ expected: UInt64) -> Bool {
        guard let value else { return false }
        return (value > expected ? value - expected : expected - value) < 1_000_000
    }

    /// Records progress every 100 ms at `pagesPerSecond` from `from` pages for `seconds`;
    /// returns the time after the last sample.
    private func run(_ eta: inout SyncETA, from: Int, pagesPerSecond: Int, seconds: Int, total: Int, start: UInt64) -> (UInt64, Int) {
        var now = start
        var sent = from
        for _ in 0..<(seconds * 10) {
            now += Self.second / 10
            sent = min(total, sent + pagesPerSecond / 10)
            eta.record(sent: sent, total: total, at: now)
        }
        return (now, sent)
    }

    @Test func aSteadyRoundIsEstimatedExactly() {
        var eta = SyncETA()
        eta.record(sent: 0, total: 10_000, at: 0)
        #expect(eta.remainingNs(now: 0) == nil, "no rate before any progress")
        let (now, sent) = run(&eta, from: 0, pagesPerSecond: 1_000, seconds: 2, total: 10_000, start: 0)
        #expect(sent == 2_000)
        #expect(near(eta.remainingNs(now: now), 8 * Self.second))
        // Half a second later without a sample: half a second less.
        #expect(near(eta.remainingNs(now: now + Self.second / 2), 8 * Self.second - Self.second / 2))
    }

    /// The start of a round is slow (connection set-up, the library mapping memory): the estimate
    /// follows the rate of the last seconds, so by a quarter of the round it is within 20 %.
    @Test func aSlowStartDoesNotSkewTheEstimateOnceTheRoundRunsFaster() throws {
        var eta = SyncETA()
        let total = 40_000
        eta.record(sent: 0, total: total, at: 0)
        var (now, sent) = run(&eta, from: 0, pagesPerSecond: 500, seconds: 2, total: total, start: 0)
        (now, sent) = run(&eta, from: sent, pagesPerSecond: 4_000, seconds: 3, total: total, start: now)
        #expect(sent == 13_000)
        let truth = Double(total - sent) / 4_000 * Double(Self.second)
        let left = Double(try #require(eta.remainingNs(now: now)))
        #expect(abs(left - truth) / truth < 0.2, "said \(left / 1e9) s, \(truth / 1e9) s left")
        // The whole round's average (13 000 pages in 5 s) would have said 10.4 s: 54 % off.
        let average = Double(total - sent) / (13_000.0 / 5) * Double(Self.second)
        #expect(abs(average - truth) / truth > 0.2)
    }

    @Test func aRoundThatStartsAgainStartsTheEstimateAgain() {
        var eta = SyncETA()
        eta.record(sent: 0, total: 1_000, at: 0)
        eta.record(sent: 500, total: 1_000, at: Self.second)
        #expect(near(eta.remainingNs(now: Self.second), Self.second))
        eta.record(sent: 0, total: 1_000, at: 2 * Self.second)
        #expect(eta.remainingNs(now: 2 * Self.second) == nil)
        eta.record(sent: 100, total: 1_000, at: 3 * Self.second)
        #expect(near(eta.remainingNs(now: 3 * Self.second), 9 * Self.second))
    }

    @Test func theBarSaysTheTimeLeftUntilTheRoundIsDone() {
        #expect(progressBar(250, 1_000, remainingNs: 3_460_000_000) == "[#####...............] 25 % (250/1000 pages), about 3.5 s left")
        #expect(progressBar(250, 1_000, remainingNs: 42_400_000_000) == "[#####...............] 25 % (250/1000 pages), about 42 s left")
        #expect(progressBar(250, 1_000, remainingNs: 125 * Self.second) == "[#####...............] 25 % (250/1000 pages), about 2 min 5 s left")
        #expect(progressBar(250, 1_000) == "[#####...............] 25 % (250/1000 pages)")
        #expect(progressBar(1_000, 1_000, remainingNs: 0) == "[####################] 100 % (1000/1000 pages)")
    }
}
