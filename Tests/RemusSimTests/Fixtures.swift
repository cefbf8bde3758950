// Shared test fixtures: a hand-driven host clock, small guests, a checkpoint loop.

import Glibc
import RemusCore
@testable import RemusSim
import Synchronization

/// A host clock that moves only when a test says so.
final class ManualClock: HostClock, Sendable {
    private let monotonic: Atomic<UInt64>
    private let wall: Atomic<Int64>

    init(monotonicNs: UInt64 = 5_000_000_000, wallNs: Int64 = 1_700_000_000_000_000_000) {
        monotonic = Atomic(monotonicNs)
        wall = Atomic(wallNs)
    }

    func monotonicNs() -> UInt64 { monotonic.load(ordering: .relaxed) }
    func wallNs() -> Int64 { wall.load(ordering: .relaxed) }

    /// Moves both clocks forward by `ns`.
    func advance(_ ns: UInt64) {
        monotonic.add(ns, ordering: .relaxed)
        wall.add(Int64(ns), ordering: .relaxed)
    }
}

/// A small guest: 16 MiB, 2 vCPUs, a quarter of memory in the working set, frequent packets and
/// ballooning, so that every feature shows up within a few thousand ops; no op-rate limit.
func smallConfig(seed: UInt64 = 7, vcpus: Int = 2) -> SimConfig {
    var c = SimConfig(memoryBytes: 16 << 20, vcpus: vcpus, seed: seed)
    c.workingSetFraction = 0.25
    c.hotSetFraction = 0.1
    c.hotProbability = 0.8
    c.packetEveryStores = 16
    c.balloonPeriod = 500
    c.opRateLimit = 0  // tests drive time with ManualClock; a running guest runs free
    return c
}

func header(for guest: SimGuest) -> StreamHeader {
    StreamHeader(
        features: [], pageSize: UInt32(guest.descriptor.pageSize), backend: .simulated, role: .primary,
        guestUUID: guest.descriptor.uuid, guestName: guest.descriptor.name, senderVersion: "remusd test")
}

/// What the runtime does for one checkpoint, in order: suspend, harvest, capture, close the output
/// epoch, resume, then (as if the backup ACKed) commit on the replica and release the output.
final class CheckpointLoop {
    let primary: SimGuest
    let replica: SimReplica
    let clock: any HostClock
    var bitmap: DirtyBitmap
    let arena: StagingArena
    var epoch: Epoch = 0
    var lastState: GuestState?

    init(primary: SimGuest, replica: SimReplica, clock: any HostClock) throws {
        self.primary = primary
        self.replica = replica
        self.clock = clock
        bitmap = DirtyBitmap(pageCount: primary.descriptor.pageCount)
        arena = StagingArena(pageSize: primary.descriptor.pageSize, capacityPages: Int(primary.descriptor.pageCount))
        try replica.configure(header: header(for: primary), config: try primary.domainConfig())
        try primary.startDirtyLogging()
    }

    /// Captures the next checkpoint; commits it unless `commit` is false; releases its output when
    /// committed and `release` (the primary got the ACK). Returns the captured state.
    @discardableResult
    func checkpoint(commit: Bool = true, release: Bool = true) throws -> GuestState {
        epoch += 1
        try primary.suspend()
        try primary.harvestDirty(into: &bitmap)
        arena.reset(epoch: epoch, kind: .checkpoint)
        try primary.capturePages(bitmap, into: arena)
        let state = try primary.captureState(clock: clock)
        try primary.nic?.closeEpoch(epoch)
        bitmap.clearAll()
        try primary.resume()
        if commit {
            try replica.commit(arena, state: state)
            if release { try primary.nic?.release(through: epoch) }
            lastState = state
        }
        return state
    }
}

/// Lets real time pass so that a misbehaving vCPU would have a chance to show it. Never used to
/// wait for something to happen: correctness never depends on how long this lasts.
func observationWindow(ms: Int = 20) {
    var t = timespec(tv_sec: 0, tv_nsec: ms * 1_000_000)
    nanosleep(&t, nil)
}

/// A copy of every page and its populated-ness, the naive oracle for dirty logging.
struct MemoryShadow {
    var bytes: [UInt8]
    var absent: [Bool]
    let pageSize: Int

    init(_ memory: GuestMemory) {
        let size = memory.pageSize
        pageSize = size
        var copy = [UInt8](repeating: 0, count: memory.byteCount)
        copy.withUnsafeMutableBytes { shadow in
            for pfn in 0..<memory.pageCount {
                memory.copyPage(pfn, to: UnsafeMutableRawBufferPointer(rebasing: shadow[Int(pfn) * size..<Int(pfn + 1) * size]))
            }
        }
        bytes = copy
        absent = (0..<memory.pageCount).map { memory.absent.test($0) }
    }

    /// PFNs whose content or populated-ness differs from `memory` now.
    func changedPages(_ memory: GuestMemory) -> [PFN] {
        bytes.withUnsafeBytes { shadow in
            (0..<memory.pageCount).filter { pfn in
                absent[Int(pfn)] != memory.absent.test(pfn)
                    || memcmp(shadow.baseAddress! + Int(pfn) * pageSize, memory.pageBytes(pfn).baseAddress!, pageSize) != 0
            }
        }
    }
}

let secondNs: UInt64 = 1_000_000_000

extension SimReplica {
    /// A copy of a committed page (nil when not populated or no image is held).
    func committedCopy(_ pfn: PFN) -> [UInt8]? { withCommittedPage(pfn) { $0.map { Array($0) } } }
}
