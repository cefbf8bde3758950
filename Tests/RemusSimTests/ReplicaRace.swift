import Glibc
import RemusCore
import RemusSystem
@testable import RemusSim
import Synchronization

// The backup's reader thread copies delta bases out of the replica while its loop thread may
// discard the replica (a planned stop, a new primary): the read must finish before the memory is
// unmapped, or find no image at all. One scenario, run by ReplicaRaceTests and, under
// ThreadSanitizer, by scripts/tsan/replica-race.sh (which compiles this file with a small main:
// `swift test --sanitize=thread` cannot build RemusCore with Swift 6.3.1, the compiler aborts
// with "Invalid bitcast"). It imports no test framework for that reason.

/// A counter the reader threads share.
private final class RaceCounter: Sendable {
    let value = Atomic<Int>(0)
}

private struct RaceClock: HostClock {
    func monotonicNs() -> UInt64 { monotonicNanoseconds() }
    func wallNs() -> Int64 { Int64(monotonicNanoseconds()) }
}

/// Page reads on two threads race a discard on a third, `rounds` times. Returns what went wrong
/// (empty: every read saw a whole committed page or nothing, never freed or foreign memory).
func raceReplicaReadsAgainstDiscard(rounds: Int) throws -> [String] {
    let config: SimConfig = {
        var c = SimConfig(memoryBytes: 16 << 20, vcpus: 2, seed: 7)
        c.workingSetFraction = 0.25
        c.opRateLimit = 0
        return c
    }()
    let pageCount = Int(config.pageCount)
    var failures: [String] = []
    for round in 0..<rounds {
        let clock = RaceClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        let arena = StagingArena(pageSize: config.pageSize, capacityPages: pageCount)
        let d = guest.descriptor
        try replica.configure(header: StreamHeader(features: [], pageSize: UInt32(d.pageSize), backend: .simulated, role: .primary,
                                                   guestUUID: d.uuid, guestName: d.name, senderVersion: "race"), config: try guest.domainConfig())
        try guest.startDirtyLogging()
        guest.stepAll(ops: 2_000)
        try guest.suspend()
        try guest.harvestDirty(into: &bitmap)
        arena.reset(epoch: 1, kind: .checkpoint)
        try guest.capturePages(bitmap, into: arena)
        let state = try guest.captureState(clock: clock)
        try guest.resume()
        try replica.commit(arena, state: state)
        // What every populated page holds: the readers compare against it.
        let expected = (0..<pageCount).map { pfn in replica.withCommittedPage(PFN(pfn)) { $0.map { PageHash.page($0, pfn: PFN(pfn)) } } }
        let reads = RaceCounter()
        let wrong = RaceCounter()
        var readers: [JoinableThread] = []
        for reader in 0..<2 {
            readers.append(try JoinableThread(name: "page-reader") {
                var pfn = reader * 977
                var copy = [UInt8](repeating: 0, count: config.pageSize)
                // Bounded: the discard comes long before the last of these reads.
                for _ in 0..<2_000_000 {
                    pfn = (pfn + 131) % pageCount
                    let seen = replica.withCommittedPage(PFN(pfn)) { page -> Bool in
                        guard let page else { return false }
                        copy.withUnsafeMutableBytes { $0.copyMemory(from: page) }
                        return true
                    }
                    reads.value.add(1, ordering: .relaxed)
                    if seen, copy.withUnsafeBytes({ PageHash.page($0, pfn: PFN(pfn)) }) != expected[pfn] {
                        wrong.value.add(1, ordering: .relaxed)
                    }
                    // Once discarded, every page reads as nothing.
                    if !seen && expected[pfn] != nil { return }
                }
            })
        }
        // Discard while both readers are busy (a deadline in case they never get going).
        let deadline = Deadline.after(seconds: 10)
        while reads.value.load(ordering: .relaxed) < 2_000 && deadline.remainingNs > 0 {}
        replica.discard()
        for reader in readers { reader.join() }
        if reads.value.load(ordering: .relaxed) < 2_000 { failures.append("round \(round): the readers did not get going") }
        if wrong.value.load(ordering: .relaxed) != 0 { failures.append("round \(round): a read saw a page that was neither committed nor absent") }
        if replica.withCommittedPage(0, { $0 != nil }) { failures.append("round \(round): the discarded replica still has pages") }
    }
    return failures
}
