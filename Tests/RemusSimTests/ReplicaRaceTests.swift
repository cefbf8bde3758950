import RemusCore
import RemusSystem
@testable import RemusSim
import Synchronization
import Testing

// The backup's reader thread copies delta bases out of the replica while its loop thread may
// discard the replica (a planned stop, a new primary): the read must finish before the memory is
// unmapped, or find no image at all. Under ThreadSanitizer: bash scripts/tsan/replica-race.sh runs
// the same race (`swift test --sanitize=thread` cannot build RemusCore with Swift 6.3.1: the
// compiler aborts with "Invalid bitcast").

/// A counter the reader threads share.
private final class Counter: Sendable {
    let value = Atomic<Int>(0)
}

@Suite("SimReplica page reads racing a discard")
struct ReplicaRaceTests {
    @Test("Page reads on two threads race a discard on a third: every read sees a whole page or nothing, never freed memory")
    func discardWaitsForPageReadsInProgress() throws {
        let config = smallConfig()
        let pageCount = Int(config.pageCount)
        for round in 0..<20 {
            let clock = ManualClock()
            let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
            let replica = SimReplica(clock: clock, autoRunOnActivation: false)
            let loop = try CheckpointLoop(primary: guest, replica: replica, clock: clock)
            guest.stepAll(ops: 2_000)
            try loop.checkpoint()
            // What every populated page holds: the readers compare against it.
            let expected = (0..<pageCount).map { pfn in
                replica.committedCopy(PFN(pfn)).map { bytes in bytes.withUnsafeBytes { PageHash.page($0, pfn: PFN(pfn)) } }
            }
            let reads = Counter()
            let wrong = Counter()
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
            // Discard while both readers are busy.
            let deadline = SystemHostClock().monotonicNs() + 10_000_000_000
            while reads.value.load(ordering: .relaxed) < 2_000 && SystemHostClock().monotonicNs() < deadline {}
            replica.discard()
            for reader in readers { reader.join() }
            #expect(reads.value.load(ordering: .relaxed) >= 2_000, "round \(round): the readers did not get going")
            #expect(wrong.value.load(ordering: .relaxed) == 0, "round \(round): a read saw a page that was neither committed nor absent")
            #expect(replica.committedCopy(0) == nil)
        }
    }
}
