// ThreadSanitizer harness: the same race as ReplicaRaceTests (page reads on two threads racing a
// discard), built by hand because swift-frontend 6.3.1 crashes compiling RemusCore with
// -sanitize=thread ("Invalid bitcast"): RemusCore is linked uninstrumented, RemusSim and this
// harness instrumented.
import Glibc
import RemusCore
import RemusSystem
@testable import RemusSim
import Synchronization

final class Counter: Sendable { let value = Atomic<Int>(0) }

struct Clock: HostClock {
    func monotonicNs() -> UInt64 { var t = timespec(); clock_gettime(CLOCK_MONOTONIC, &t); return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec) }
    func wallNs() -> Int64 { Int64(monotonicNs()) }
}

let config: SimConfig = { var c = SimConfig(memoryBytes: 16 << 20, vcpus: 2, seed: 7); c.workingSetFraction = 0.25; c.opRateLimit = 0; return c }()
let pageCount = Int(config.pageCount)
var failures = 0
for round in 0..<20 {
    let clock = Clock()
    let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
    let replica = SimReplica(clock: clock, autoRunOnActivation: false)
    var bitmap = DirtyBitmap(pageCount: config.pageCount)
    let arena = StagingArena(pageSize: config.pageSize, capacityPages: pageCount)
    let d = guest.descriptor
    try replica.configure(header: StreamHeader(features: [], pageSize: UInt32(d.pageSize), backend: .simulated, role: .primary,
                                               guestUUID: d.uuid, guestName: d.name, senderVersion: "tsan"), config: try guest.domainConfig())
    try guest.startDirtyLogging()
    guest.stepAll(ops: 2_000)
    try guest.suspend()
    try guest.harvestDirty(into: &bitmap)
    arena.reset(epoch: 1, kind: .checkpoint)
    try guest.capturePages(bitmap, into: arena)
    let state = try guest.captureState(clock: clock)
    try guest.resume()
    try replica.commit(arena, state: state)
    let expected = (0..<pageCount).map { pfn in replica.withCommittedPage(PFN(pfn)) { $0.map { PageHash.page($0, pfn: PFN(pfn)) } } }
    let reads = Counter(), wrong = Counter()
    var readers: [JoinableThread] = []
    for reader in 0..<2 {
        readers.append(try JoinableThread(name: "page-reader") {
            var pfn = reader * 977
            var copy = [UInt8](repeating: 0, count: config.pageSize)
            for _ in 0..<2_000_000 {
                pfn = (pfn + 131) % pageCount
                let seen = replica.withCommittedPage(PFN(pfn)) { page -> Bool in
                    guard let page else { return false }
                    copy.withUnsafeMutableBytes { $0.copyMemory(from: page) }
                    return true
                }
                reads.value.add(1, ordering: .relaxed)
                if seen, copy.withUnsafeBytes({ PageHash.page($0, pfn: PFN(pfn)) }) != expected[pfn] { wrong.value.add(1, ordering: .relaxed) }
                if !seen && expected[pfn] != nil { return }
            }
        })
    }
    let deadline = clock.monotonicNs() + 10_000_000_000
    while reads.value.load(ordering: .relaxed) < 2_000 && clock.monotonicNs() < deadline {}
    replica.discard()
    for r in readers { r.join() }
    if wrong.value.load(ordering: .relaxed) != 0 || reads.value.load(ordering: .relaxed) < 2_000 { failures += 1; print("round \(round) failed") }
}
print(failures == 0 ? "replica race: 20 rounds passed" : "replica race: \(failures) rounds FAILED")
exit(failures == 0 ? 0 : 1)
