import Glibc
import RemusCore
@testable import RemusRuntime  // CheckpointReceiver, StagedCheckpoint, RecordWriter
import RemusSim
import Testing

// The backup stages a checkpoint in arenas of StagedCheckpoint.chunkPages pages. A checkpoint of
// more pages spans several of them and must still be applied as one checkpoint (I2): the replica
// used to take every full arena but the last as a pre-copy round, and refused those after the
// first committed checkpoint ("pre-copy pages (epoch 2) after a committed checkpoint").

/// The bytes of a stream, read back in uneven pieces. `@unchecked Sendable`: used by one thread.
private final class BytesChannel: ByteChannel, @unchecked Sendable {
    let peer = "bytes"
    private let bytes: [UInt8]
    private var at = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, bytes.count - at, 200_003)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<(at + n)])) }
        at += n
        return n
    }
    func write(segments: UnsafeMutableBufferPointer<iovec>) throws { Issue.record("the receiver wrote to the primary") }
    func shutdown() {}
    func shutdownWrite() {}
}

/// A simulated primary whose checkpoints dirty most of its 40,960 pages.
private final class BusyPrimary {
    let guest: SimGuest
    let header: StreamHeader
    private var dirty: DirtyBitmap
    let arena: StagingArena

    init() throws {
        var config = SimConfig(memoryBytes: 160 << 20, vcpus: 1, seed: 23)
        config.workingSetFraction = 1
        config.hotSetFraction = 1
        guest = try SimGuest(config: config, clock: SystemClock(), nic: nil, name: "busy", autoRun: false)
        let d = guest.descriptor
        header = StreamHeader(features: [], pageSize: UInt32(d.pageSize), backend: .simulated, role: .primary,
                              guestUUID: d.uuid, guestName: d.name, senderVersion: "test")
        dirty = DirtyBitmap(pageCount: d.pageCount)
        arena = StagingArena(pageSize: d.pageSize, capacityPages: Int(d.pageCount))
        try guest.startDirtyLogging()
    }

    /// Runs the workload, then captures checkpoint `epoch` into `arena`; returns its state.
    func capture(_ epoch: Epoch, ops: UInt64) throws -> GuestState {
        guest.stepAll(ops: ops)
        try guest.suspend()
        defer { try? guest.resume() }
        try guest.harvestDirty(into: &dirty)
        arena.reset(epoch: epoch, kind: .checkpoint)
        try guest.capturePages(dirty, into: arena)
        dirty.clearAll()
        return try guest.captureState(clock: SystemClock())
    }
}

/// Receives `bytes` into `replica` the way the backup does, committing each complete checkpoint;
/// returns the epochs committed.
private func receive(_ bytes: [UInt8], into replica: SimReplica) throws -> [Epoch] {
    let receiver = CheckpointReceiver(channel: BytesChannel(bytes), offeredFeatures: [])
    let (header, config, _) = try receiver.readHello()
    try replica.configure(header: header, config: config)
    receiver.accepted(pageSize: header.pageSize, guestBytes: try SimConfig(config).memoryBytes)
    var committed: [Epoch] = []
    try receiver.receive(
        deltaBases: { replica },
        began: { _ in },
        complete: { end, staged in
            do {
                try staged.commit(to: replica)
                committed.append(end.epoch)
                return true
            } catch {
                Issue.record("checkpoint \(end.epoch) (\(staged.pageCount) pages) was not applied: \(error)")
                return false
            }
        },
        activity: {},
        streamEnd: { _ in })
    return committed
}

@Suite("Checkpoints larger than one staging arena of the backup")
struct LargeCheckpointTests {
    @Test("Checkpoints of more than 16,384 pages are committed whole, each as one checkpoint, and the replica equals the primary")
    func checkpointsSpanningArenasCommitAsOne() throws {
        let primary = try BusyPrimary()
        let out = RecordingChannel()
        try RecordWriter.writePreamble(header: primary.header, config: try primary.guest.domainConfig(), disks: [], to: out)
        let writer = RecordWriter(channel: out, pageSize: Int(primary.header.pageSize))
        var sizes: [Int] = []
        for epoch in Epoch(1)...3 {
            let state = try primary.capture(epoch, ops: 150_000)
            sizes.append(primary.arena.count)
            try writer.writeCheckpoint(primary.arena, state: state)
        }
        #expect(sizes.allSatisfy { $0 > StagedCheckpoint.chunkPages }, "checkpoint sizes \(sizes): the test needs each to span arenas")

        let replica = SimReplica(clock: SystemClock(), autoRunOnActivation: false)
        let committed = try receive(out.bytes, into: replica)
        #expect(committed == [1, 2, 3])
        #expect(replica.committedEpoch == 3)
        #expect(replica.memoryDigest() == (try primary.guest.memoryDigest()), "the replica's memory differs from the primary's")
    }

    @Test("A checkpoint rejected in its second arena changes nothing: the replica keeps the previous checkpoint")
    func aCheckpointRejectedMidwayLeavesThePreviousIntact() throws {
        let primary = try BusyPrimary()
        let replica = SimReplica(clock: SystemClock(), autoRunOnActivation: false)
        try replica.configure(header: primary.header, config: try primary.guest.domainConfig())
        try replica.commit(primary.arena, state: try primary.capture(1, ops: 150_000))
        let digest = try #require(replica.memoryDigest())
        let committedState = replica.committedState

        // Checkpoint 2 split like the backup stages it; its second arena ends with a page past
        // the guest's memory.
        let state = try primary.capture(2, ops: 150_000)
        let pages = primary.arena
        let chunk = StagedCheckpoint.chunkPages
        #expect(pages.count > chunk)
        let first = StagingArena(pageSize: pages.pageSize, capacityPages: chunk)
        let second = StagingArena(pageSize: pages.pageSize, capacityPages: pages.count - chunk + 1)
        for arena in [first, second] { arena.reset(epoch: 2, kind: .checkpoint) }
        for index in 0..<pages.count {
            let entry = pages.entry(index)
            let arena = index < chunk ? first : second
            let destination = arena.append(pfn: entry.pfn, encoding: entry.encoding)
            if entry.encoding == .raw { destination!.copyMemory(from: pages.pageData(index)) }
        }
        second.append(pfn: primary.guest.descriptor.pageCount, encoding: .zero)

        #expect(throws: SimError.self) { try replica.commit([first, second], state: state) }
        #expect(replica.committedEpoch == 1)
        #expect(replica.committedState == committedState)
        #expect(replica.memoryDigest() == digest, "pages of the rejected checkpoint's first arena were applied")

        // The same checkpoint without the bad page commits whole.
        let good = StagingArena(pageSize: pages.pageSize, capacityPages: pages.count - chunk)
        good.reset(epoch: 2, kind: .checkpoint)
        for index in chunk..<pages.count {
            let entry = pages.entry(index)
            let destination = good.append(pfn: entry.pfn, encoding: entry.encoding)
            if entry.encoding == .raw { destination!.copyMemory(from: pages.pageData(index)) }
        }
        try replica.commit([first, good], state: state)
        #expect(replica.committedEpoch == 2)
        #expect(replica.memoryDigest() == (try primary.guest.memoryDigest()))
    }
}
