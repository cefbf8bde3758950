import Glibc
import RemusCore
import RemusXen  // XenReplica.defaultFeedBoundBytes

/// `remusd bench --library-stream`: a hypervisor library's stream through remusd, as in a Xen
/// guest's first synchronisation, in one process. The primary's `RecordWriter` ships the live
/// phase in the pieces `CheckpointShipper` uses (pre-copy rounds of OPAQUE_PAYLOAD records) and a
/// first checkpoint, over loopback TCP (plaintext), to the backup's `CheckpointReceiver` (read,
/// decode, verify, stage); a committer thread commits each verified piece to a streaming replica
/// that queues it for a feeder thread, which writes it into a pipe, as `XenReplica` feeds libxl's
/// restore; a drain thread reads the pipe, as libxl's restore helper does.
///
/// What it measures is what remusd adds between the library on the primary and the library on
/// the backup: the wall time until the last byte came out of the pipe, and each thread's CPU.
package enum LibraryStreamBenchmark {
    package struct Sample: Sendable {
        /// Stream bytes shipped (the live phase and the first checkpoint's).
        package var bytes: Int
        /// First write to the last byte read out of the backup's pipe.
        package var wallNs: UInt64
        /// Thread CPU: the primary's writer; the backup's reader split into socket reads and the
        /// rest (decode, verify, stage); the committer (commit, ACK); the feeder (pipe writes);
        /// the drain (pipe reads: the restore helper's share, not remusd's).
        package var writerNs: UInt64 = 0
        package var readNs: UInt64 = 0
        package var stageNs: UInt64 = 0
        package var commitNs: UInt64 = 0
        package var feedNs: UInt64 = 0
        package var drainNs: UInt64 = 0

        package var remusdNs: UInt64 { writerNs + readNs + stageNs + commitNs + feedNs }
    }

    /// The live phase's piece size, as `CheckpointShipper` asks the library for.
    static let pieceBytes = 4 * RecordWriter.opaqueChunkBytes

    /// - Parameters:
    ///   - bytes: stream bytes per sample (the live phase; the first checkpoint adds 1 MiB).
    ///   - samples: samples measured, after one warm-up sample.
    ///   - verify: the drain checks that the bytes out of the pipe are the bytes the primary
    ///     shipped, in order (a checksum on the drain thread; for tests, not for measuring).
    ///   - splice: the feeder hands the pipe the arrays' pages (`PipeFeeder`, as XenReplica
    ///     does); false: it copies them in with `write`.
    package static func run(bytes: Int, samples: Int, verify: Bool = false, splice: Bool = true) throws -> [Sample] {
        // Not all alike, so nothing on the way can shortcut them.
        var rng = SplitMix64(seed: 7)
        let piece = [UInt8](unsafeUninitializedCapacity: pieceBytes) { buffer, count in
            let raw = UnsafeMutableRawBufferPointer(buffer)
            for i in stride(from: 0, to: pieceBytes, by: 8) { raw.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
            count = pieceBytes
        }
        var results: [Sample] = []
        for round in 0...samples {
            let sample = try one(bytes: bytes, piece: piece, verify: verify, splice: splice)
            if round > 0 { results.append(sample) }  // round 0 warms up
        }
        return results
    }

    private static func one(bytes: Int, piece: [UInt8], verify: Bool, splice: Bool) throws -> Sample {
        let checkpointBytes = 1 << 20
        let total = bytes + checkpointBytes
        let header = StreamHeader(features: [], pageSize: 4096, backend: .xen, role: .primary,
                                  guestUUID: GuestUUID(high: 1, low: 2), guestName: "bench", senderVersion: remusdVersion)
        let config = DomainConfig(format: .libxlJSON,
                                  bytes: Array(#"{"c_info":{"type":"pv","name":"bench"},"b_info":{"max_memkb":\#(max(total >> 10, 65536) * 2)}}"#.utf8))
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.shutdown() }
        // What the restore pipe must give: the pieces in order, then the checkpoint's bytes.
        var expected: UInt32 = 0
        if verify {
            var left = bytes
            piece.withUnsafeBytes { raw in
                while left > 0 {
                    let n = min(raw.count, left)
                    expected = CRC32C.extend(expected, UnsafeRawBufferPointer(rebasing: raw[..<n]))
                    left -= n
                }
                expected = CRC32C.extend(expected, UnsafeRawBufferPointer(rebasing: raw[..<checkpointBytes]))
            }
        }
        let replica = try PipeReplica(expecting: total, checksum: verify ? expected : nil, splice: splice)
        let backup = Gate<Result<(UInt64, UInt64, UInt64), ProtocolError>>()
        startThread(name: "bench-backup-reader") {
            do {
                backup.open(with: .success(try serveBackup(try listener.accept(), replica: replica)))
            } catch {
                replica.fail("backup: \(error)")
                backup.open(with: .failure(ProtocolError("\(error)")))
            }
        }
        let channel = try TCPChannel.connect(to: listener.endpoint, deadline: .after(milliseconds: 5000))
        defer { channel.shutdown() }
        try RecordWriter.writePreamble(header: header, config: config, to: channel)
        let writer = RecordWriter(channel: channel, pageSize: 4096)

        let start = monotonicNanoseconds()
        let cpu0 = threadCPUNanoseconds()
        var sent = 0
        while sent < bytes {
            let n = min(piece.count, bytes - sent)
            try writer.writePrecopyStream(n == piece.count ? piece : Array(piece[..<n]))
            sent += n
        }
        let arena = StagingArena(pageSize: 4096, capacityPages: 1)
        arena.reset(epoch: 1, kind: .checkpoint)
        let state = GuestState(vcpus: [], devices: [],
                               clock: ClockState(guestMonotonicNs: 0, guestWallNs: 0, tscKHz: 0, hostMonotonicNs: 0, hostWallNs: 0),
                               layout: MemoryLayout(generation: 0, ranges: []), stream: Array(piece[..<checkpointBytes]))
        _ = try writer.writeCheckpoint(arena, state: state)
        let writerNs = threadCPUNanoseconds() - cpu0
        try replica.waitUntilDrained(deadline: .after(seconds: 60))
        let wall = monotonicNanoseconds() - start
        channel.shutdown()
        let (read, stage, commit) = try backup.wait().get()
        let (feed, drain) = replica.stop()
        try replica.verifyChecksum()
        return Sample(bytes: total, wallNs: wall, writerNs: writerNs, readNs: read, stageNs: stage, commitNs: commit,
                      feedNs: feed, drainNs: drain)
    }

    /// The backup's reader and committer (until the primary closes); returns their CPU: socket
    /// reads, the rest of the reader, the committer.
    private static func serveBackup(_ tcp: TCPChannel, replica: PipeReplica) throws -> (UInt64, UInt64, UInt64) {
        let channel = CountingChannel(tcp)
        try RecordWriter.writeHeader(StreamHeader(features: [], pageSize: 4096, backend: .xen, role: .backup,
                                                  guestUUID: .zero, guestName: "", senderVersion: remusdVersion), to: channel)
        let receiver = CheckpointReceiver(channel: channel)
        let (header, config, _) = try receiver.readHello()
        try replica.configure(header: header, config: config)
        receiver.accepted(pageSize: header.pageSize, guestBytes: try BackendFactory.declaredGuestBytes(header, config))
        let committer = StreamCommitter(replica: replica, channel: channel)
        defer { committer.stop() }
        let cpu0 = threadCPUNanoseconds()
        // Returns when the primary closes after the last checkpoint: the end of the sample.
        try receiver.receive(
            deltaBases: { nil },
            began: { _ in },
            complete: { end, staged in
                guard committer.commit(staged, epoch: end.epoch) else { return false }
                // As BackupDaemon's reader: read on only once the feed is within its bound.
                if let behind = replica.waitForFeedRoom(until: monotonicNanoseconds() + 60_000_000_000) {
                    throw ProtocolError("the bench's feed stayed full for 60 s: \(behind)")
                }
                return true
            },
            activity: {},
            streamEnd: { _ in })
        let reader = threadCPUNanoseconds() - cpu0
        return (channel.readCPUNs, reader - min(reader, channel.readCPUNs), committer.cpuNs)
    }
}

/// A streaming replica whose committed bytes a feeder thread writes into a pipe, drained by a
/// thread that reads it as libxl's restore helper would (bounded like `XenFeedQueue`).
private final class PipeReplica: StreamingReplica, FeedBoundedReplica, @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var queue: [[UInt8]] = []
    private var queued = 0
    private var drained = 0
    private let expected: Int
    /// The CRC32C the drained bytes must have (nil: not checked), and theirs so far.
    private let checksum: UInt32?
    /// Whether the feeder splices (`PipeFeeder`) or writes.
    private let splice: Bool
    private var drainedChecksum: UInt32 = 0
    private var failure: String?
    private var stopped = false
    private var feedNs: UInt64 = 0, drainNs: UInt64 = 0
    private let fds: (read: Int32, write: Int32)
    private let drainDone = Gate<Void>()

    init(expecting bytes: Int, checksum: UInt32?, splice: Bool) throws {
        self.splice = splice
        var p: [Int32] = [-1, -1]
        guard pipe(&p) == 0 else { throw ProtocolError("pipe failed: \(String(cString: strerror(errno)))") }
        _ = fcntl(p[1], 1031, Int32(1 << 20))  // F_SETPIPE_SZ, as XenReplica
        fds = (p[0], p[1])
        expected = bytes
        self.checksum = checksum
        startThread(name: "bench-feed") { [self] in feed() }
        startThread(name: "bench-drain") { [self] in drain() }
    }

    func configure(header: StreamHeader, config: DomainConfig) throws {}
    func activate(clock: any HostClock) throws -> ActivatedGuest { throw ProtocolError("a benchmark's replica is never activated") }
    func discard() {}

    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws {
        monitor.withLock {
            queue.append(bytes)
            queued += bytes.count
            monitor.broadcast()
        }
    }

    func waitForFeedRoom(until deadlineNs: UInt64) -> String? {
        monitor.withLock {
            while queued > XenReplica.defaultFeedBoundBytes && failure == nil && monotonicNanoseconds() < deadlineNs { monitor.wait(untilMonotonic: deadlineNs) }
            return queued > XenReplica.defaultFeedBoundBytes && failure == nil ? "\(queued) bytes queued" : nil
        }
    }

    func fail(_ why: String) { monitor.withLock { if failure == nil { failure = why }; monitor.broadcast() } }

    private func feed() {
        let feeder = PipeFeeder(fd: fds.write, splice: splice)
        let cpu0 = threadCPUNanoseconds()
        defer {
            monitor.withLock { feedNs = threadCPUNanoseconds() - cpu0 }
            close(fds.write)
            // The arrays the feeder keeps may hold the drain's last bytes.
            withExtendedLifetime(feeder) { drainDone.wait() }
        }
        while true {
            let next: [UInt8]? = monitor.withLock {
                while queue.isEmpty && !stopped && failure == nil { monitor.wait(untilMonotonic: nil) }
                return queue.isEmpty ? nil : queue.removeFirst()
            }
            guard let bytes = next else { return }
            var feedError: SystemError?
            do throws(SystemError) { try feeder.feed(bytes) } catch { feedError = error }
            monitor.withLock { queued -= bytes.count; monitor.broadcast() }
            if let feedError { fail("writing the pipe failed: \(feedError)"); return }
        }
    }

    private func drain() {
        let cpu0 = threadCPUNanoseconds()
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer {
            buffer.deallocate()
            close(fds.read)
            monitor.withLock { drainNs = threadCPUNanoseconds() - cpu0; monitor.broadcast() }
            drainDone.open(with: ())
        }
        while true {
            let n = read(fds.read, buffer, 1 << 20)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            if checksum != nil { drainedChecksum = CRC32C.extend(drainedChecksum, UnsafeRawBufferPointer(start: buffer, count: n)) }
            monitor.withLock { drained += n; monitor.broadcast() }
        }
    }

    func waitUntilDrained(deadline: Deadline) throws {
        try monitor.withLock { () throws in
            while drained < expected && failure == nil {
                guard monitor.wait(untilMonotonic: deadline.monotonicNs) else {
                    throw ProtocolError("the bench's pipe gave \(drained) of \(expected) bytes within its deadline")
                }
            }
            if let failure { throw ProtocolError("the library-stream benchmark failed: \(failure)") }
        }
    }

    /// Throws unless the drained bytes have the checksum asked for (call after `stop`).
    func verifyChecksum() throws {
        guard let checksum else { return }
        let got = monitor.withLock { drainedChecksum }
        guard got == checksum else {
            throw ProtocolError("the bytes out of the backup's restore pipe are not the ones the primary shipped (CRC32C \(got), want \(checksum))")
        }
    }

    /// Ends the feeder (which closes the pipe, ending the drain); returns their CPU.
    func stop() -> (UInt64, UInt64) {
        monitor.withLock { stopped = true; monitor.broadcast() }
        drainDone.wait()
        return monitor.withLock { (feedNs, drainNs) }
    }
}

/// The backup's committer thread for a streaming replica: commits what the reader hands it,
/// then writes the ACK (as BackupDaemon's loop).
private final class StreamCommitter: @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var pending: (StagedCheckpoint, Epoch, Gate<Bool>)?
    private var stopped = false
    private var cpu: UInt64 = 0

    init(replica: PipeReplica, channel: any ByteChannel) {
        startThread(name: "bench-committer") { [self] in
            let ackWriter = RecordWriter(channel: channel, pageSize: 4096)
            while let (staged, epoch, done) = next() {
                let t0 = threadCPUNanoseconds()
                var ok = true
                do {
                    try staged.commit(to: replica)
                    if epoch > 0 { try ackWriter.write(Ack(epoch: epoch, backupMonotonicNs: monotonicNanoseconds())) }
                } catch {
                    ok = false
                }
                monitor.withLock { cpu += threadCPUNanoseconds() - t0 }
                done.open(with: ok)
                if !ok { return }
            }
        }
    }

    var cpuNs: UInt64 { monitor.withLock { cpu } }

    private func next() -> (StagedCheckpoint, Epoch, Gate<Bool>)? {
        monitor.withLock {
            while pending == nil && !stopped { monitor.wait(untilMonotonic: nil) }
            return pending.take()
        }
    }

    /// Hands `staged` over and waits until it is committed.
    func commit(_ staged: StagedCheckpoint, epoch: Epoch) -> Bool {
        let done = Gate<Bool>()
        monitor.withLock { pending = (staged, epoch, done); monitor.broadcast() }
        return done.wait()
    }

    func stop() { monitor.withLock { stopped = true; monitor.broadcast() } }
}
