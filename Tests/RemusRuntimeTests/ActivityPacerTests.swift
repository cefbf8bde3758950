import Testing

@testable import RemusRuntime

/// The backup's reader notes the primary's liveness for the loop at most once per interval
/// (a twentieth of the timeout, at most 50 ms), not once per read.
@Suite struct ActivityPacerTests {
    @Test func theFirstNoteGoesAtOnceThenOnePerInterval() {
        let pacer = ActivityPacer(everyNs: 50)
        #expect(pacer.due(at: 1_000))
        #expect(!pacer.due(at: 1_010))
        #expect(!pacer.due(at: 1_049))
        #expect(pacer.due(at: 1_050))
        #expect(!pacer.due(at: 1_099))
        #expect(pacer.due(at: 5_000), "after a quiet spell the next note goes at once")
    }

    /// A read every millisecond for a second, with the interval of a 1 s timeout (50 ms): 20
    /// notes, where there were 1 000; the loop never goes longer than the interval without one.
    @Test func readsEveryMillisecondGiveANoteEveryInterval() {
        let pacer = ActivityPacer(everyNs: 50_000_000)
        var noted: [UInt64] = []
        for ms in UInt64(0)..<1_000 where pacer.due(at: ms * 1_000_000) { noted.append(ms) }
        #expect(noted.count == 20)
        #expect(zip(noted, noted.dropFirst()).allSatisfy { $1 - $0 == 50 })
    }
}
