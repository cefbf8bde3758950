// Allocations on the pause path: suspend → harvest → copy into the staging arena → state → resume,
// on a 1 GiB simulated guest. Run at two dirty-set sizes: if the count per checkpoint does not grow
// with the pages captured, nothing is allocated per page (STYLE.md: the hot path allocates nothing
// per page). State records (vCPUs, devices, layout) are allocated once per checkpoint.
import CMallocCounter
import Glibc
import RemusCore
import RemusSim

struct Clock: HostClock {
    func monotonicNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
    func wallNs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

let probe = remus_bench_allocations()
let boxed: [Int] = Array(repeating: 1, count: Int(CommandLine.arguments.count + 10))
precondition(remus_bench_allocations() > probe && !boxed.isEmpty, "the malloc interposer is not in effect")

let clock = Clock()
let guest = try SimGuest(config: SimConfig(memoryBytes: 1 << 30, vcpus: 2, seed: 3), clock: clock, nic: nil, name: "bench", autoRun: false)
try guest.startDirtyLogging()
var bitmap = DirtyBitmap(pageCount: guest.descriptor.pageCount)
try guest.harvestDirty(into: &bitmap)
bitmap.clearAll()
let arena = StagingArena(pageSize: 4096, capacityPages: 65536)

/// Allocations of one pause with about `pages` dirty pages (the workload runs outside the count).
@MainActor func pauseAllocations(pages: Int, epoch: Epoch) throws -> (allocations: UInt64, captured: Int) {
    var dirty = 0
    while dirty < pages {
        guest.stepAll(ops: UInt64(max(pages / 8, 16)))
        try guest.harvestDirty(into: &bitmap)
        dirty = bitmap.count
    }
    let before = remus_bench_allocations()
    try guest.suspend()
    try guest.harvestDirty(into: &bitmap)
    arena.reset(epoch: epoch, kind: .checkpoint)
    try guest.capturePages(bitmap, into: arena)
    let state = try guest.captureState(clock: clock)
    try guest.resume()
    let count = remus_bench_allocations() - before
    withExtendedLifetime(state) {}
    bitmap.clearAll()
    return (UInt64(count), arena.count)
}

print("| dirty pages (target) | pages captured (median) | allocations per checkpoint (median) | allocations per page |")
print("| ---: | ---: | ---: | ---: |")
var epoch: Epoch = 1
var perCheckpoint: [Int: UInt64] = [:]
for target in [100, 1000, 8000] {
    var counts: [UInt64] = []
    var captured: [Int] = []
    for _ in 0..<15 {
        let r = try pauseAllocations(pages: target, epoch: epoch)
        epoch += 1
        counts.append(r.allocations)
        captured.append(r.captured)
    }
    let median = counts.sorted()[counts.count / 2]
    let pages = captured.sorted()[captured.count / 2]
    perCheckpoint[target] = median
    let perPage = Double(median) / Double(max(pages, 1))
    print("| \(target) | \(pages) | \(median) | \((perPage * 1000).rounded() / 1000) |")
}
let growth = Int64(perCheckpoint[8000]!) - Int64(perCheckpoint[100]!)
print("\nallocations per checkpoint grow by \(growth) from 100 to 8000 dirty pages: \(growth <= 0 ? "nothing is allocated per page" : "SOMETHING IS ALLOCATED PER PAGE")")
