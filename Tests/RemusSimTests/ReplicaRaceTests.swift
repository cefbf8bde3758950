import Testing

@Suite("SimReplica page reads racing a discard")
struct ReplicaRaceTests {
    @Test("Page reads on two threads race a discard on a third: every read sees a whole page or nothing, never freed memory")
    func discardWaitsForPageReadsInProgress() throws {
        let failures = try raceReplicaReadsAgainstDiscard(rounds: 20)
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }
}
