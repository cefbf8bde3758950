import Glibc
import RemusCore
import RemusSim

/// `remusd bench --epoch-rate`: the whole pipeline in one process, as fast as it goes. A stepped
/// simulated guest (no vCPU threads: it is dirtied between checkpoints by stepping on the loop
/// thread, so it costs no CPU while the pipeline runs), the primary's capture, seal and
/// `RecordWriter` over loopback TCP (plaintext), and the backup's `CheckpointReceiver` (read,
/// decode, verify, stage) handing each complete checkpoint to a committer thread that commits it
/// to a `SimReplica` and writes the ACK back, as BackupDaemon's reader and loop do.
///
/// Each thread reads its own CPU clock (CLOCK_THREAD_CPUTIME_ID) after each checkpoint, so a
/// round's CPU per checkpoint is what that side's work costs whatever the other threads got of
/// the machine's cores; the wall-clock rate is what two shared cores give.
package enum EpochRateBenchmark {
    /// One round: `checkpoints` checkpoints from the first one's step to the last one's ACK.
    package struct Round: Sendable {
        package var checkpoints: Int
        package var wallNs: UInt64
        package var pages: Int
        package var wireBytes: Int
        /// Per-thread CPU over the round (ns): the primary's loop split into stepping the guest
        /// (not part of the pipeline), the pause (suspend, harvest, capture, state, resume) and
        /// the seal; its writer; the backup's reader split into the socket reads and the rest
        /// (decode, verify, stage), and the committer (commit to the replica, write the ACK).
        package var stepNs: UInt64 = 0
        package var captureNs: UInt64 = 0
        package var sealNs: UInt64 = 0
        package var writeNs: UInt64 = 0
        package var readNs: UInt64 = 0
        package var stageNs: UInt64 = 0
        package var commitNs: UInt64 = 0
        /// Wall time the backup's reader spent waiting for commits (ns).
        package var readerWaitNs: UInt64 = 0

        package var primaryNs: UInt64 { captureNs + sealNs + writeNs }
        package var backupNs: UInt64 { readNs + stageNs + commitNs }
    }

    /// How the backup's reader hands a complete checkpoint to the committer.
    package enum Handoff: String, Sendable {
        /// As BackupDaemon: the reader waits until the commit is done before it reads on.
        case waitForCommit = "reader waits for each commit"
    }

    /// - Parameters:
    ///   - dirtyPages: pages dirtied per checkpoint (the guest is stepped until its dirty set reaches it).
    ///   - checkpoints: checkpoints per round.
    ///   - rounds: rounds measured (after one warm-up round and the first full checkpoint).
    ///   - stepLimitNs: longest the guest may be stepped towards `dirtyPages` before the run fails
    ///     (a working set smaller than `dirtyPages` never gets there).
    package static func run(dirtyPages: Int, checkpoints: Int, rounds: Int, memoryBytes: UInt64 = 1 << 30,
                            stepLimitNs: UInt64 = 10_000_000_000) throws -> [Round] {
        let clock = SystemClock()
        var config = SimConfig(memoryBytes: memoryBytes, vcpus: 2, seed: 1)
        config.dirtyRateLimit = 0
        let guest = try SimGuest(config: config, clock: clock, nic: nil, name: "epoch-rate", autoRun: false)
        defer { guest.shutdown() }
        let d = guest.descriptor
        let header = StreamHeader(features: [], pageSize: UInt32(d.pageSize), backend: d.backend, role: .primary,
                                  guestUUID: d.uuid, guestName: d.name, senderVersion: remusdVersion)

        let probe = Probe()
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let backupDone = Gate<String?>()
        startThread(name: "bench-backup-reader") {
            do {
                try serveBackup(try listener.accept(), probe: probe, clock: clock)
                backupDone.open(with: nil)
            } catch {
                probe.fail("backup: \(error)")
                backupDone.open(with: "\(error)")
            }
        }
        let channel = try TCPChannel.connect(to: listener.endpoint, deadline: .after(milliseconds: 5000))
        try RecordWriter.writePreamble(header: header, config: try guest.domainConfig(), to: channel)
        startThread(name: "bench-ack-reader") {
            let reader = StreamReader(channel: channel, direction: .backupToPrimary)
            do {
                while let event = try reader.next() {
                    if case .ack(let ack) = event { probe.acked(ack.epoch) }
                }
            } catch {
                probe.fail("ACK reader: \(error)")
            }
        }

        // Two arenas: the loop captures into one while the writer ships the other (as the
        // primary's engine does). The first checkpoint carries every page.
        let fullArena = StagingArena(pageSize: d.pageSize, capacityPages: Int(d.pageCount))
        let arenas = [StagingArena(pageSize: d.pageSize, capacityPages: max(dirtyPages * 4, 1024)),
                      StagingArena(pageSize: d.pageSize, capacityPages: max(dirtyPages * 4, 1024))]
        let shipper = BenchShipper(channel: channel, pageSize: d.pageSize, probe: probe, arenas: arenas)

        try guest.startDirtyLogging()
        var bitmap = DirtyBitmap(pageCount: d.pageCount)
        var epoch: Epoch = 0
        func checkpoint(into arena: StagingArena) throws {
            epoch += 1
            let t0 = threadCPUNanoseconds()
            try guest.suspend()
            try guest.harvestDirty(into: &bitmap)
            arena.reset(epoch: epoch, kind: .checkpoint)
            try guest.capturePages(bitmap, into: arena)
            let state = try guest.captureState(clock: clock)
            try guest.resume()
            let t1 = threadCPUNanoseconds()
            arena.seal()
            let t2 = threadCPUNanoseconds()
            bitmap.clearAll()
            probe.captured(epoch, pages: arena.count, captureNs: t1 - t0, sealNs: t2 - t1)
            shipper.enqueue(arena, state: state)
        }
        defer {
            shipper.stop()
            channel.shutdown()
            listener.shutdown()
            _ = backupDone.wait()
        }
        try checkpoint(into: fullArena)
        try probe.waitForAck(epoch)
        shipper.forget(fullArena)

        var results: [Round] = []
        for round in 0...rounds {
            let first = epoch + 1
            let start = monotonicNanoseconds()
            for _ in 0..<checkpoints {
                let s0 = threadCPUNanoseconds()
                let deadline = monotonicNanoseconds() + stepLimitNs
                while bitmap.count < dirtyPages {
                    guest.stepAll(ops: UInt64(max(dirtyPages / 8, 16)))
                    try guest.harvestDirty(into: &bitmap)
                    guard monotonicNanoseconds() < deadline else {
                        throw ProtocolError("the simulated guest dirtied only \(bitmap.count) of the \(dirtyPages) pages asked for in \(stepLimitNs / 1_000_000) ms of stepping (its working set may be smaller); nothing was measured — lower --dirty-pages")
                    }
                }
                probe.stepped(epoch + 1, ns: threadCPUNanoseconds() - s0)
                try checkpoint(into: shipper.takeFree())
            }
            try probe.waitForAck(epoch)
            let wall = monotonicNanoseconds() - start
            if round > 0 { results.append(probe.round(first...epoch, wallNs: wall)) }  // round 0 warms up
        }
        return results
    }

    /// The backup: its header, the primary's hello, then the receiver's loop, each complete
    /// checkpoint committed by a committer thread that writes the ACK.
    private static func serveBackup(_ tcp: TCPChannel, probe: Probe, clock: SystemClock) throws {
        let channel = CountingChannel(tcp)
        try RecordWriter.writeHeader(StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .backup,
                                                  guestUUID: .zero, guestName: "", senderVersion: remusdVersion), to: channel)
        let receiver = CheckpointReceiver(channel: channel)
        let (header, config, _) = try receiver.readHello()
        let replica = SimReplica(clock: clock)
        try replica.configure(header: header, config: config)
        receiver.accepted(pageSize: header.pageSize, guestBytes: try BackendFactory.declaredGuestBytes(header, config))
        let committer = BenchCommitter(replica: replica, channel: channel, pageSize: Int(header.pageSize), probe: probe)
        defer { committer.stop() }
        try receiver.receive(
            deltaBases: { replica },
            began: { _ in },
            complete: { end, staged in
                // Recorded before the hand-over: the ACK may reach the primary before this
                // thread runs again.
                probe.staged(end.epoch, readerCPU: threadCPUNanoseconds(), readCPU: channel.readCPUNs)
                return committer.commit(staged, epoch: end.epoch)
            },
            activity: {},
            streamEnd: { _ in })
    }
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID), ns.
package func threadCPUNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// What each thread of the benchmark reports, per epoch, under one lock.
private final class Probe: @unchecked Sendable {  // state guarded by monitor
    private let monitor = MonitorLock()
    /// The last epoch the primary saw acknowledged, the writer recorded and the committer
    /// recorded: a round's figures are read once all three reached its last epoch (an ACK can
    /// arrive before the thread that sent it records its figures).
    private var ackedEpoch: Epoch = 0, writtenEpoch: Epoch = 0, committedEpoch: Epoch = 0
    private var failure: String?
    private struct PerEpoch { var pages = 0, bytes = 0, step: UInt64 = 0, capture: UInt64 = 0, seal: UInt64 = 0, write: UInt64 = 0,
                              readerCPU: UInt64 = 0, readCPU: UInt64 = 0, wait: UInt64 = 0, commit: UInt64 = 0 }
    private var epochs: [Epoch: PerEpoch] = [:]

    func fail(_ why: String) { monitor.withLock { if failure == nil { failure = why }; monitor.broadcast() } }
    func acked(_ epoch: Epoch) { monitor.withLock { ackedEpoch = max(ackedEpoch, epoch); monitor.broadcast() } }
    func stepped(_ epoch: Epoch, ns: UInt64) { monitor.withLock { epochs[epoch, default: .init()].step = ns } }
    func captured(_ epoch: Epoch, pages: Int, captureNs: UInt64, sealNs: UInt64) {
        monitor.withLock { epochs[epoch, default: .init()].pages = pages; epochs[epoch]!.capture = captureNs; epochs[epoch]!.seal = sealNs }
    }
    func written(_ epoch: Epoch, bytes: Int, cpuNs: UInt64) {
        monitor.withLock { epochs[epoch, default: .init()].bytes = bytes; epochs[epoch]!.write = cpuNs; writtenEpoch = epoch; monitor.broadcast() }
    }
    /// The reader's cumulative thread CPU and socket-read CPU when `epoch` was complete.
    func staged(_ epoch: Epoch, readerCPU: UInt64, readCPU: UInt64) {
        monitor.withLock { epochs[epoch, default: .init()].readerCPU = readerCPU; epochs[epoch]!.readCPU = readCPU }
    }
    /// The committer's CPU for `epoch`, and how long the reader waited for it (hand-over to done).
    func committed(_ epoch: Epoch, cpuNs: UInt64, readerWaitNs: UInt64) {
        monitor.withLock {
            epochs[epoch, default: .init()].commit = cpuNs
            epochs[epoch]!.wait = readerWaitNs
            committedEpoch = epoch
            monitor.broadcast()
        }
    }

    /// Waits (60 s at most) for the ACK of `epoch`; throws what a thread reported failing.
    func waitForAck(_ epoch: Epoch) throws {
        let deadline = monotonicNanoseconds() + 60_000_000_000
        try monitor.withLock { () throws in
            while min(ackedEpoch, writtenEpoch, committedEpoch) < epoch && failure == nil {
                guard monitor.wait(untilMonotonic: deadline) else {
                    throw ProtocolError("the epoch-rate benchmark's checkpoint \(epoch) was not acknowledged within 60 s (last ACK: \(ackedEpoch))")
                }
            }
            if let failure { throw ProtocolError("the epoch-rate benchmark failed: \(failure)") }
        }
    }

    func round(_ range: ClosedRange<Epoch>, wallNs: UInt64) -> EpochRateBenchmark.Round {
        monitor.withLock {
            var r = EpochRateBenchmark.Round(checkpoints: range.count, wallNs: wallNs, pages: 0, wireBytes: 0)
            let before = epochs[range.lowerBound - 1]!, last = epochs[range.upperBound]!
            let reader = last.readerCPU - before.readerCPU
            r.readNs = last.readCPU - before.readCPU
            r.stageNs = reader - r.readNs
            for e in range {
                let p = epochs[e]!
                r.pages += p.pages
                r.wireBytes += p.bytes
                r.stepNs += p.step
                r.captureNs += p.capture
                r.sealNs += p.seal
                r.writeNs += p.write
                r.commitNs += p.commit
                r.readerWaitNs += p.wait
            }
            return r
        }
    }
}

/// The primary's writer thread: ships each captured arena, then gives it back to the loop.
private final class BenchShipper: @unchecked Sendable {  // state guarded by monitor
    private let monitor = MonitorLock()
    private var queue: [(StagingArena, GuestState)] = []
    private var free: [StagingArena]
    private var stopped = false

    init(channel: any ByteChannel, pageSize: Int, probe: Probe, arenas: [StagingArena]) {
        free = arenas
        startThread(name: "bench-writer") { [self] in
            let writer = RecordWriter(channel: channel, pageSize: pageSize)
            while let (arena, state) = next() {
                let t0 = threadCPUNanoseconds()
                do {
                    let bytes = try writer.writeCheckpoint(arena, state: state)
                    probe.written(arena.epoch, bytes: bytes, cpuNs: threadCPUNanoseconds() - t0)
                } catch {
                    probe.fail("writer: \(error)")
                    return
                }
                monitor.withLock { free.append(arena); monitor.broadcast() }
            }
        }
    }

    private func next() -> (StagingArena, GuestState)? {
        monitor.withLock {
            while queue.isEmpty && !stopped { monitor.wait(untilMonotonic: nil) }
            return stopped ? nil : queue.removeFirst()
        }
    }

    func enqueue(_ arena: StagingArena, state: GuestState) { monitor.withLock { queue.append((arena, state)); monitor.broadcast() } }
    /// An arena that is not to come back to the free list (the first, full checkpoint's).
    func forget(_ arena: StagingArena) { monitor.withLock { free.removeAll { $0 === arena } } }
    func takeFree() -> StagingArena {
        monitor.withLock {
            while free.isEmpty { monitor.wait(untilMonotonic: nil) }
            return free.removeFirst()
        }
    }
    func stop() { monitor.withLock { stopped = true; monitor.broadcast() } }
}

/// The backup's committer thread: commits what the reader hands it, then writes the ACK.
private final class BenchCommitter: @unchecked Sendable {  // state guarded by monitor
    private let monitor = MonitorLock()
    /// The checkpoint handed over, its epoch, when (monotonic ns), and the reader's gate.
    private var pending: (StagedCheckpoint, Epoch, UInt64, Gate<Bool>)?
    private var stopped = false

    init(replica: SimReplica, channel: any ByteChannel, pageSize: Int, probe: Probe) {
        startThread(name: "bench-committer") { [self] in
            let ackWriter = RecordWriter(channel: channel, pageSize: pageSize)
            while let (staged, epoch, handedAt, done) = next() {
                let t0 = threadCPUNanoseconds()
                do {
                    try staged.commit(to: replica)
                    try ackWriter.write(Ack(epoch: epoch, backupMonotonicNs: monotonicNanoseconds()))
                } catch {
                    probe.fail("committer: \(error)")
                    done.open(with: false)
                    return
                }
                probe.committed(epoch, cpuNs: threadCPUNanoseconds() - t0, readerWaitNs: monotonicNanoseconds() - handedAt)
                done.open(with: true)
            }
        }
    }

    private func next() -> (StagedCheckpoint, Epoch, UInt64, Gate<Bool>)? {
        monitor.withLock {
            while pending == nil && !stopped { monitor.wait(untilMonotonic: nil) }
            return pending.take()
        }
    }

    /// Hands `staged` over and waits until it is committed (BackupDaemon's reader does the same).
    func commit(_ staged: StagedCheckpoint, epoch: Epoch) -> Bool {
        let done = Gate<Bool>()
        monitor.withLock { pending = (staged, epoch, monotonicNanoseconds(), done); monitor.broadcast() }
        return done.wait()
    }

    func stop() { monitor.withLock { stopped = true; monitor.broadcast() } }
}

/// A channel that counts the CPU its reads take on the reading thread (the kernel's copy out of
/// the socket), so the reader's CPU splits into reading and the rest.
final class CountingChannel: ByteChannel, @unchecked Sendable {  // readCPUNs: the reader thread only
    private let inner: any ByteChannel
    private(set) var readCPUNs: UInt64 = 0
    init(_ inner: any ByteChannel) { self.inner = inner }
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let t0 = threadCPUNanoseconds()
        defer { readCPUNs += threadCPUNanoseconds() - t0 }
        return try inner.read(into: buffer)
    }
    func write(segments: UnsafeMutableBufferPointer<iovec>) throws { try inner.write(segments: segments) }
    func shutdown() { inner.shutdown() }
    func shutdownWrite() { inner.shutdownWrite() }
    var peer: String { inner.peer }
}
