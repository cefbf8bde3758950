import Glibc
@testable import RemusCore  // CRC32C, to re-seal a corrupted record the way a careful forger would
@testable import RemusRuntime
import Testing

// A hypervisor library's own stream (Xen: libxl v2 around libxenguest's records) travels inside
// remusd's checkpoints as OPAQUE_PAYLOAD records. These tests send one through RecordWriter and
// CheckpointReceiver and hold the backup to what the replica must see: every byte, in order, in
// the pieces and with the flags the primary sent, and nothing of a checkpoint that did not arrive
// whole and verified.

/// `count` bytes that are not all alike, from `seed`.
private func noise(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { raw in
        var i = 0
        while i + 8 <= raw.count {
            raw.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self)
            i += 8
        }
        let last = rng.next()
        for k in 0..<(raw.count - i) { raw[i + k] = UInt8(truncatingIfNeeded: last >> (8 * UInt64(k))) }
    }
    return out
}

/// A streaming replica that keeps every `commitStream` call.
private final class StreamLog: StreamingReplica {
    struct Commit: Equatable {
        var bytes: [UInt8]
        var checkpoint: Bool
    }

    private(set) var commits: [Commit] = []

    func configure(header: StreamHeader, config: DomainConfig) throws {}
    func activate(clock: any HostClock) throws -> ActivatedGuest {
        Issue.record("activate on a replica that only receives")
        return .underHypervisor
    }
    func discard() {}
    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws {
        commits.append(Commit(bytes: bytes, checkpoint: checkpoint))
    }
}

/// What the tests' primary sends: libxl's stream in two pre-copy rounds and three checkpoints.
private enum Session {
    /// The first round spans two OPAQUE_PAYLOAD chunks by one byte.
    static let precopyRounds: [[UInt8]] = [noise(RecordWriter.opaqueChunkBytes + 1, seed: 11), noise(40, seed: 12)]
    /// Checkpoint 1 carries no stream bytes; checkpoint 2 spans four chunks; checkpoint 3 is small.
    static let checkpointStreams: [[UInt8]] = [[], noise((3 << 20) + 5, seed: 13), noise(17, seed: 14)]
    static let header = StreamHeader(features: [], pageSize: 4096, backend: .xen, role: .primary,
                                     guestUUID: GuestUUID(high: 0x1234, low: 0x5678), guestName: "pv-guest", senderVersion: "test")
    static let config = DomainConfig(format: .libxlJSON, bytes: Array(#"{"c_info":{"type":"pv","name":"pv-guest"},"b_info":{"max_memkb":65536}}"#.utf8))
    static let end = StreamEnd(reason: .shutdown, lastEpoch: 3, message: "host maintenance")

    /// What a backup that received everything hands its replica, call by call.
    static let expectedCommits: [StreamLog.Commit] =
        precopyRounds.map { StreamLog.Commit(bytes: $0, checkpoint: false) }
        + checkpointStreams.map { StreamLog.Commit(bytes: $0, checkpoint: true) }

    /// Writes the session as the primary does: preamble, pre-copy rounds, checkpoints (a staging
    /// arena without pages; the state carries the stream), STREAM_END. `mark` runs after each part.
    static func write(to channel: any ByteChannel, mark: (String) -> Void = { _ in }) throws {
        try RecordWriter.writePreamble(header: header, config: config, to: channel)
        mark("preamble")
        let writer = RecordWriter(channel: channel, pageSize: Int(header.pageSize))
        for (i, round) in precopyRounds.enumerated() {
            try writer.writePrecopyStream(round)
            mark("pre-copy \(i + 1)")
        }
        let arena = StagingArena(pageSize: Int(header.pageSize), capacityPages: 1)
        for (i, stream) in checkpointStreams.enumerated() {
            let epoch = Epoch(i + 1)
            arena.reset(epoch: epoch, kind: .checkpoint)
            let clock = ClockState(guestMonotonicNs: epoch * 1_000_000_000, guestWallNs: 1_750_000_000_000_000_000, tscKHz: 2_100_000,
                                   hostMonotonicNs: 77_000_000_000 + epoch, hostWallNs: 1_750_000_000_500_000_000)
            let layout = RemusCore.MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: 65536)])
            try writer.writeCheckpoint(arena, state: GuestState(vcpus: [], devices: [], clock: clock, layout: layout, stream: stream))
            mark("checkpoint \(epoch)")
        }
        try writer.write(end)
        mark("end")
    }

    /// The session's bytes as written, and the byte count after each part.
    static let recorded: (bytes: [UInt8], marks: [String: Int]) = {
        let channel = RecordingChannel()
        var marks: [String: Int] = [:]
        do {
            try write(to: channel) { marks[$0] = channel.bytes.count }
        } catch {
            preconditionFailure("writing the session into memory failed: \(error)")
        }
        return (channel.bytes, marks)
    }()
}


/// A connection that hands out `bytes` in reads of seeded random sizes and then reports the
/// peer gone: a primary that stopped at a chosen byte, without threads.
private final class ReplayChannel: ByteChannel, @unchecked Sendable {  // used by one thread
    let peer = "replay"
    private let bytes: [UInt8]
    private var at = 0
    private var rng: SplitMix64

    init(_ bytes: [UInt8], seed: UInt64) {
        self.bytes = bytes
        rng = SplitMix64(seed: seed)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, bytes.count - at, Int(rng.next() % 300_000) + 1)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<(at + n)])) }
        at += n
        return n
    }
    func write(segments: UnsafeMutableBufferPointer<iovec>) throws {
        Issue.record("the backup's receiver wrote to the primary")
    }
    func shutdown() {}
    func shutdownWrite() {}
}

/// A connected socketpair as the primary's and the backup's channels. Each end gives up after
/// 20 s without progress (SO_RCVTIMEO/SO_SNDTIMEO), so a stuck peer fails the test, never hangs it.
private func socketPair() throws -> (primary: TCPChannel, backup: TCPChannel) {
    var fds: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
        throw SystemError(call: "socketpair", errno: errno)
    }
    var limit = timeval(tv_sec: 20, tv_usec: 0)
    let size = socklen_t(Swift.MemoryLayout<timeval>.size)
    for fd in fds {
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, size)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, size)
    }
    return (TCPChannel(adopting: fds[0], peer: "primary end"), TCPChannel(adopting: fds[1], peer: "backup end"))
}

/// The outcome of work on another thread, awaited with a deadline.
private final class Outcome: @unchecked Sendable {  // `result` guarded by `monitor`
    private let monitor = MonitorLock()
    private var result: Result<Void, any Error>?

    func set(_ r: Result<Void, any Error>) { monitor.withLock { result = r; monitor.broadcast() } }

    /// The result, or nil when none came within `seconds`.
    func wait(seconds: UInt64) -> Result<Void, any Error>? {
        let deadline = SystemClock().monotonicNs() + seconds * 1_000_000_000
        return monitor.withLock {
            while result == nil && SystemClock().monotonicNs() < deadline { monitor.wait(untilMonotonic: deadline) }
            return result
        }
    }
}

/// Runs the primary's `body` on a thread of its own, then closes its direction (FIN).
private func primaryThread(_ channel: TCPChannel, _ body: @escaping @Sendable (TCPChannel) throws -> Void) -> Outcome {
    let outcome = Outcome()
    startThread(name: "test-primary") {
        let result = Result { try body(channel) }
        channel.shutdownWrite()
        outcome.set(result)
    }
    return outcome
}

/// Reads (and drops) what is left until the peer closes, so a primary still writing never
/// meets a closed socket (EPIPE).
private func drain(_ channel: any ByteChannel) {
    var scrap = [UInt8](repeating: 0, count: 1 << 16)
    while ((try? scrap.withUnsafeMutableBytes { try channel.read(into: $0) }) ?? 0) > 0 {}
}

/// What the backup's side saw.
private struct Received {
    var header: StreamHeader?
    var config: DomainConfig?
    var begins: [CheckpointBegin] = []
    var commits: [StreamLog.Commit] = []
    var streamEnd: StreamEnd?
    /// What `readHello` or `receive` threw; nil when `receive` returned.
    var error: (any Error)?
}

/// The backup's reader as BackupDaemon drives it, committing each complete checkpoint at once.
private func receive(from channel: any ByteChannel) -> Received {
    var r = Received()
    let replica = StreamLog()
    let receiver = CheckpointReceiver(channel: channel)
    do {
        let (header, config, _) = try receiver.readHello()
        r.header = header
        r.config = config
        try replica.configure(header: header, config: config)
        receiver.accepted(pageSize: header.pageSize, guestBytes: 1 << 30)
        try receiver.receive(
            deltaBases: { nil },  // a streaming replica holds no pages to decode deltas against
            began: { r.begins.append($0) },
            complete: { _, staged in
                do {
                    try staged.commit(to: replica)
                    return true
                } catch {
                    Issue.record("commit failed: \(error)")
                    return false
                }
            },
            activity: {},
            streamEnd: { r.streamEnd = $0 })
    } catch {
        r.error = error
    }
    r.commits = replica.commits
    return r
}

/// Nil when `got` equals `want` call for call and byte for byte; otherwise where they differ
/// (the arrays are megabytes: never print them whole).
private func difference(_ got: [StreamLog.Commit], _ want: [StreamLog.Commit]) -> String? {
    func shape(_ c: [StreamLog.Commit]) -> String { c.map { "\($0.bytes.count)\($0.checkpoint ? "c" : "p")" }.joined(separator: " ") }
    guard got.count == want.count else { return "\(got.count) commits [\(shape(got))], want \(want.count) [\(shape(want))]" }
    for (i, (g, w)) in zip(got, want).enumerated() {
        guard g.checkpoint == w.checkpoint else { return "commit \(i): checkpoint \(g.checkpoint), want \(w.checkpoint)" }
        guard g.bytes.count == w.bytes.count else { return "commit \(i): \(g.bytes.count) bytes, want \(w.bytes.count)" }
        let same = g.bytes.withUnsafeBytes { a in w.bytes.withUnsafeBytes { b in a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }
        if !same, let at = g.bytes.indices.first(where: { g.bytes[$0] != w.bytes[$0] }) {
            return "commit \(i): byte \(at) is \(g.bytes[at]), want \(w.bytes[at])"
        }
    }
    return nil
}

/// An OPAQUE_PAYLOAD record as found on the wire.
private struct OpaqueRecord: Equatable {
    var epoch: Epoch
    var stream: OpaqueStream
    var sequence: UInt32
    var count: Int
    /// Stream offset of the record header.
    var offset: Int
}

/// The session's OPAQUE_PAYLOAD records and the offsets of all its records, decoded with the codec.
private func wireLayout(_ bytes: [UInt8]) throws -> (opaque: [OpaqueRecord], recordOffsets: [Int]) {
    var decoder = StreamDecoder()
    var epoch: Epoch = 0
    var opaque: [OpaqueRecord] = []
    var offsets: [Int] = []
    try bytes.withUnsafeBytes { raw in
        try decoder.feed(raw) { item in
            guard case .record(let record) = item else { return }
            offsets.append(Int(record.offset))
            switch record.content {
            case .checkpointBegin(let begin): epoch = begin.epoch
            case .opaquePayload(let p):
                opaque.append(OpaqueRecord(epoch: epoch, stream: p.stream, sequence: p.sequence, count: p.bytes.count, offset: Int(record.offset)))
            default: break
            }
        }
    }
    try decoder.finish()
    return (opaque, offsets)
}

@Suite("A hypervisor library's stream inside checkpoints")
struct OpaqueStreamTests {
    @Test("Over a socketpair the replica gets every stream byte, split and flagged as the primary sent it")
    func streamArrivesWholeAndInOrder() throws {
        let (primary, backup) = try socketPair()
        let writing = primaryThread(primary) { try Session.write(to: $0) }
        let received = receive(from: backup)
        drain(backup)
        let written = writing.wait(seconds: 30)
        #expect(written != nil, "the primary's thread did not finish within 30 s")
        if case .failure(let error) = written { Issue.record("the primary failed: \(error)") }

        #expect(received.error == nil, "\(received.error.map { "\($0)" } ?? "")")
        #expect(received.header?.backend == .xen)
        #expect(received.config == Session.config)
        #expect(received.begins.map(\.epoch) == [0, 0, 1, 2, 3])
        #expect(received.begins.map(\.kind) == [.precopy, .precopy, .checkpoint, .checkpoint, .checkpoint])
        #expect(difference(received.commits, Session.expectedCommits) == nil, "\(difference(received.commits, Session.expectedCommits) ?? "")")
        let concatenation = [StreamLog.Commit(bytes: received.commits.flatMap(\.bytes), checkpoint: true)]
        let sent = [StreamLog.Commit(bytes: Session.expectedCommits.flatMap(\.bytes), checkpoint: true)]
        #expect(difference(concatenation, sent) == nil, "the concatenation is libxl's stream: \(difference(concatenation, sent) ?? "")")
        #expect(received.streamEnd == Session.end)
    }

    @Test("On the wire: 1 MiB chunks of stream .libxl, numbered across rounds and checkpoints, none for an empty stream")
    func chunksOnTheWire() throws {
        let layout = try wireLayout(Session.recorded.bytes).opaque
        let mib = RecordWriter.opaqueChunkBytes
        #expect(mib == 1 << 20)
        #expect(layout.map(\.epoch) == [0, 0, 0, 2, 2, 2, 2, 3])
        #expect(layout.map(\.count) == [mib, 1, 40, mib, mib, mib, 5, 17])
        #expect(layout.map(\.sequence) == Array(0..<8))
        #expect(layout.allSatisfy { $0.stream == .libxl })
    }

    @Test("A connection cut anywhere inside checkpoint 3 leaves the replica with exactly checkpoints 1 and 2")
    func cutInsideTheLastCheckpoint() throws {
        let (bytes, marks) = Session.recorded
        let start = try #require(marks["checkpoint 2"])
        let stop = try #require(marks["checkpoint 3"])
        let boundaries = Set(try wireLayout(bytes).recordOffsets)
        // Checkpoint 3 is BEGIN, CLOCK, MEMORY_LAYOUT, OPAQUE_PAYLOAD, END: four boundaries inside it.
        #expect(boundaries.filter { ((start + 1)..<stop).contains($0) }.count == 4)
        let expected = Array(Session.expectedCommits.prefix(4))
        for cut in (start + 1)..<stop {
            let received = receive(from: ReplayChannel(Array(bytes[..<cut]), seed: UInt64(cut)))
            let wrong = difference(received.commits, expected)
            #expect(wrong == nil, "cut at \(cut): \(wrong ?? "")")
            #expect(received.streamEnd == nil, "cut at \(cut)")
            let ending: String?
            if boundaries.contains(cut) {
                // Closed between two records: the reader ends as for any closed connection.
                ending = received.error.map { "cut at \(cut) (a record boundary): receive threw \($0)" }
            } else {
                let kind = (received.error as? StreamDecodeError)?.kind
                ending = kind == .truncated ? nil : "cut at \(cut) (mid-record): \(received.error.map { "receive threw \($0)" } ?? "receive returned")"
            }
            #expect(ending == nil)
            // One failing cut says enough; the next 200 would say the same.
            if wrong != nil || received.streamEnd != nil || ending != nil { break }
        }
    }

    @Test("Over a socketpair, a primary that vanishes mid-checkpoint costs only that checkpoint")
    func cutOverARealSocket() throws {
        let (bytes, marks) = Session.recorded
        let start = try #require(marks["checkpoint 2"])
        let stop = try #require(marks["checkpoint 3"])
        let prefix = Array(bytes[..<((start + stop) / 2 | 1)])  // odd: not a record boundary (records are 8-aligned)
        let (primary, backup) = try socketPair()
        let writing = primaryThread(primary) { try $0.write(prefix) }
        let received = receive(from: backup)
        drain(backup)
        let written = writing.wait(seconds: 30)
        #expect(written != nil, "the primary's thread did not finish within 30 s")
        if case .failure(let error) = written { Issue.record("the primary failed: \(error)") }

        #expect(difference(received.commits, Array(Session.expectedCommits.prefix(4))) == nil,
                "\(difference(received.commits, Array(Session.expectedCommits.prefix(4))) ?? "")")
        #expect(received.begins.map(\.epoch) == [0, 0, 1, 2, 3], "checkpoint 3 began, and was dropped")
        #expect((received.error as? StreamDecodeError)?.kind == .truncated, "\(received.error.map { "\($0)" } ?? "returned")")
        #expect(received.streamEnd == nil)
    }

    /// The session with one bit flipped inside the payload of checkpoint 2's second chunk;
    /// with `reseal`, that record's CRC is recomputed, so only the checkpoint's digest can tell.
    private func corrupted(reseal: Bool) throws -> (bytes: [UInt8], record: OpaqueRecord) {
        var bytes = Session.recorded.bytes
        let record = try #require(try wireLayout(bytes).opaque.first { $0.sequence == 4 })
        #expect(record.epoch == 2)
        let body = record.offset + RecordHeader.size
        bytes[body + 8 + 12_345] ^= 0x10  // past the stream id and sequence: a byte of libxl's stream
        if reseal {
            let length = 8 + record.count
            let crc = bytes.withUnsafeBytes { raw in
                CRC32C.extend(CRC32C.extend(0, UnsafeRawBufferPointer(rebasing: raw[record.offset..<(record.offset + 12)])),
                              UnsafeRawBufferPointer(rebasing: raw[body..<(body + length)]))
            }
            withUnsafeBytes(of: crc.littleEndian) { bytes.replaceSubrange((record.offset + 12)..<(record.offset + 16), with: $0) }
        }
        return (bytes, record)
    }

    @Test("A flipped byte inside an opaque payload is refused by the record's CRC; checkpoint 2 is never committed")
    func flippedByteFailsTheRecordCRC() throws {
        let (bytes, record) = try corrupted(reseal: false)
        let received = receive(from: ReplayChannel(bytes, seed: 7))
        let error = try #require(received.error as? StreamDecodeError, "\(received.error.map { "\($0)" } ?? "returned")")
        #expect(error.kind == .crcMismatch)
        #expect(error.recordType == .opaquePayload)
        #expect(error.offset == UInt64(record.offset))
        #expect(error.description.contains("OPAQUE_PAYLOAD") && error.description.contains("CRC32C"), "\(error)")
        #expect(difference(received.commits, Array(Session.expectedCommits.prefix(3))) == nil,
                "\(difference(received.commits, Array(Session.expectedCommits.prefix(3))) ?? "")")
    }

    @Test("A flipped byte whose record CRC was recomputed is refused by checkpoint 2's digest; it is never committed")
    func resealedFlipFailsTheCheckpointDigest() throws {
        let (bytes, _) = try corrupted(reseal: true)
        let received = receive(from: ReplayChannel(bytes, seed: 8))
        let error = try #require(received.error as? StreamDecodeError, "\(received.error.map { "\($0)" } ?? "returned")")
        #expect(error.kind == .digestMismatch)
        #expect(error.recordType == .checkpointEnd)
        #expect(error.description.contains("checkpoint 2") && error.description.contains("last committed checkpoint kept"), "\(error)")
        #expect(received.begins.map(\.epoch) == [0, 0, 1, 2])
        #expect(difference(received.commits, Array(Session.expectedCommits.prefix(3))) == nil,
                "\(difference(received.commits, Array(Session.expectedCommits.prefix(3))) ?? "")")
    }
}
