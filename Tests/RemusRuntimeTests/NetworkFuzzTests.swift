import Foundation
import Glibc
import RemusCore
import RemusDrill
@testable import RemusRuntime
import RemusSim
import RemusTestSupport
import Testing

// Issue #13's network fuzzer: mutated replication streams, sent over real loopback connections
// to a running BackupDaemon (in this process, simulated backend, plaintext test mode). After
// every input it checks that the daemon answers its status socket, holds no more connections
// than its cap and no unbounded memory, never went ACTIVE (its fence always fails and no
// operator asks), committed only checkpoints whose image equals the primary's at that epoch
// (I2), acknowledged only what it committed so (I1), and at the end that a real primary of the
// same guest still connects and gets its checkpoints acknowledged.
//
// Seeded and reproducible: the seed is printed; REMUSD_NET_FUZZ_SEED=N re-runs one, and
// REMUSD_NET_FUZZ_SECONDS sets the run's length (default 8 s in the unit suite; scripts/test.sh
// runs 60 s).

/// The recorded valid stream the mutations start from: a 4 MiB simulated guest's stream header
/// and DOMAIN_CONFIG, one pre-copy round of every page, and checkpoints 1…6, encoded by the
/// primary's own writer; with the guest's memory digest at the end of each epoch.
struct RecordedGuestStream {
    static let uuid = GuestUUID(high: 0x6675_7a7a_6564_2d67, low: 0x7565_7374_2d6e_6574)
    static let name = "fuzzed"
    static let config = SimConfig(memoryBytes: 4 << 20, vcpus: 1, seed: 17)

    /// The stream header and DOMAIN_CONFIG record, as bytes.
    let hello: [UInt8]
    /// Every record after the hello, each with its header, body and padding.
    let records: [[UInt8]]
    /// The guest's memory digest at the end of checkpoint N (`SimGuest.memoryDigest`).
    let imageDigest: [Epoch: UInt64]

    init(checkpoints: Int = 6) throws {
        let config = Self.config
        let guest = try SimGuest(config: config, clock: SystemClock(), nic: nil, name: Self.name, uuid: Self.uuid, autoRun: false)
        let header = StreamHeader(features: [], pageSize: UInt32(config.pageSize), backend: .simulated, role: .primary,
                                  guestUUID: Self.uuid, guestName: Self.name, senderVersion: "fuzz-recording")
        let helloChannel = RecordingChannel()
        try RecordWriter.writePreamble(header: header, config: config.encode(), to: helloChannel)
        hello = helloChannel.bytes

        var dirty = DirtyBitmap(pageCount: config.pageCount)
        let arena = StagingArena(pageSize: config.pageSize, capacityPages: Int(config.pageCount))
        let recording = RecordingChannel()
        let writer = RecordWriter(channel: recording, pageSize: config.pageSize)
        try guest.startDirtyLogging()
        // Pre-copy: every page, while the guest "runs" (steps) between capture and the first checkpoint.
        for pfn in 0..<config.pageCount { dirty.set(pfn) }
        arena.reset(epoch: 0, kind: .precopy)
        try guest.capturePages(dirty, into: arena)
        try writer.writeCheckpoint(arena, state: nil)
        var digests: [Epoch: UInt64] = [:]
        for epoch in 1...Epoch(checkpoints) {
            guest.stepAll(ops: 300)
            dirty.clearAll()
            try guest.harvestDirty(into: &dirty)
            if epoch == 1 { for pfn in 0..<config.pageCount { dirty.set(pfn) } }  // what pre-copy saw may have changed since
            arena.reset(epoch: epoch, kind: .checkpoint)
            try guest.capturePages(dirty, into: arena)
            try writer.writeCheckpoint(arena, state: try guest.captureState(clock: SystemClock()))
            digests[epoch] = try guest.memoryDigest()
        }
        imageDigest = digests
        records = try Self.split(recording.bytes)
    }

    /// Cuts well-formed record bytes at their record boundaries.
    static func split(_ bytes: [UInt8]) throws -> [[UInt8]] {
        var out: [[UInt8]] = []
        var offset = 0
        while offset < bytes.count {
            guard offset + RecordHeader.size <= bytes.count else { throw ProtocolError("recording ends inside a record header at \(offset)") }
            let length = Int(FuzzRecord.le32(bytes, offset + 8))
            let wire = RecordHeader.size + (length + 7) / 8 * 8
            guard offset + wire <= bytes.count else { throw ProtocolError("recording ends inside a record at \(offset)") }
            out.append(Array(bytes[offset..<(offset + wire)]))
            offset += wire
        }
        return out
    }
}

/// Reading and rewriting one record's fields, with its CRC made valid again (a peer that knows
/// the format, not a broken link).
enum FuzzRecord {
    static func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    static func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
        for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }

    static func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
        for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
    }

    static func type(_ record: [UInt8]) -> RecordType? { record.count >= RecordHeader.size ? RecordType(rawValue: le32(record, 0)) : nil }

    /// The CRC a record with these header fields and body carries.
    static func crc(_ record: [UInt8]) -> UInt32 {
        let length = Int(le32(record, 8))
        let covered = Array(record[0..<12]) + record[RecordHeader.size..<min(record.count, RecordHeader.size + length)]
        return covered.withUnsafeBytes { CRC32C.extend(0, $0) }
    }

    /// The hello with byte `at` of the guest UUID changed and the stream header's CRC (its last
    /// four bytes) recomputed.
    static func helloWithUUIDByteChanged(_ hello: [UInt8], at: Int) -> [UInt8] {
        var h = hello
        let uuid = RecordedGuestStream.uuid
        let bytes = withUnsafeBytes(of: uuid.high.bigEndian) { Array($0) } + withUnsafeBytes(of: uuid.low.bigEndian) { Array($0) }
        guard let start = (0...(h.count - 16)).first(where: { Array(h[$0..<($0 + 16)]) == bytes }) else { return h }
        h[start + at] ^= 0x5A
        let length = Int(le32(h, 12))
        put32(&h, length - 4, h[0..<(length - 4)].withUnsafeBytes { CRC32C.extend(0, $0) })
        return h
    }

    static func resealed(_ record: [UInt8]) -> [UInt8] {
        var r = record
        put32(&r, 12, crc(r))
        return r
    }
}

/// One fuzz input: the byte chunks a connection sends, and whether it then closes or holds the
/// connection open until the backup drops it.
struct FuzzInput: CustomStringConvertible {
    var chunks: [[UInt8]]
    var holdOpen: Bool
    var mutations: [String]
    /// Whole checkpoints were dropped or moved, every record intact: a well-formed stream of
    /// another history (a primary whose first checkpoint on a connection may carry any epoch),
    /// which the backup cannot tell from the real one, so its images are not compared; nor are
    /// they after the DOMAIN_CONFIG changed (another guest's size or seed).
    var historyChanged = false
    var description: String { mutations.joined(separator: ", ") + (holdOpen ? "; held open" : "; closed") }
}

/// Mutates the recorded stream at record level (drop, duplicate, reorder, truncate, length
/// fields, epochs, a second hello, another guest's UUID, whole checkpoints dropped) and at byte
/// level (bit flips, overwritten and inserted bytes).
struct StreamMutator {
    let stream: RecordedGuestStream
    var rng: SplitMix64

    mutating func int(_ n: Int) -> Int { Int(rng.next() % UInt64(max(n, 1))) }

    mutating func next() -> FuzzInput {
        var hello = stream.hello
        var records = stream.records
        var notes: [String] = []
        let operations = 1 + int(3)
        for _ in 0..<operations {
            switch int(15) {
            case 0 where !records.isEmpty:
                let i = int(records.count); records.remove(at: i); notes.append("drop record \(i)")
            case 1 where !records.isEmpty:
                let i = int(records.count); records.insert(records[i], at: i); notes.append("duplicate record \(i)")
            case 2 where records.count > 1:
                let i = int(records.count), j = int(records.count); records.swapAt(i, j); notes.append("swap records \(i) and \(j)")
            case 3 where !records.isEmpty:
                let keep = int(records.count); records.removeSubrange(keep...); notes.append("keep \(keep) records")
            case 4 where !records.isEmpty:
                // A length field: random, one page more or less, or past every limit; CRC not fixed.
                let i = int(records.count)
                guard records[i].count >= RecordHeader.size else { continue }
                let old = FuzzRecord.le32(records[i], 8)
                let new: UInt32 = [UInt32.random(in: 0...UInt32.max, using: &rng), old &+ 4096, old &- 8, 0xFFFF_FFF0, 0][int(5)]
                FuzzRecord.put32(&records[i], 8, new)
                if rng.next() % 2 == 0 { records[i] = FuzzRecord.resealed(records[i]) }
                notes.append("length of record \(i) \(old)→\(new)")
            case 5:
                // An epoch in a BEGIN or END, resealed.
                let marks = records.indices.filter { [.checkpointBegin, .checkpointEnd].contains(FuzzRecord.type(records[$0])) && records[$0].count >= RecordHeader.size + 8 }
                guard let i = marks.isEmpty ? nil : marks[int(marks.count)] else { continue }
                let epoch = [0, 1, 2, 5, 7, 1 << 40, UInt64.max][int(7)]
                FuzzRecord.put64(&records[i], RecordHeader.size, epoch)
                records[i] = FuzzRecord.resealed(records[i])
                notes.append("epoch of record \(i) → \(epoch)")
            case 6:
                // Drop whole checkpoints (BEGIN…END), the pre-copy round among them.
                let begins = records.indices.filter { FuzzRecord.type(records[$0]) == .checkpointBegin }
                guard !begins.isEmpty else { continue }
                let b = begins[int(begins.count)]
                guard let e = records[b...].firstIndex(where: { FuzzRecord.type($0) == .checkpointEnd }) else { continue }
                records.removeSubrange(b...e); notes.append("drop checkpoint at record \(b)")
            case 7:
                // Another guest's UUID in the hello, its header's CRC made valid again.
                hello = FuzzRecord.helloWithUUIDByteChanged(hello, at: int(16))
                notes.append("another guest UUID in the hello")
            case 8 where !records.isEmpty:
                // A second hello in the middle of the stream.
                let i = int(records.count); records.insert(stream.hello, at: i); notes.append("second hello before record \(i)")
            case 9:
                let (r, at) = randomByte(records); guard r >= 0 else { continue }
                records[r][at] ^= UInt8(1 << int(8)); notes.append("flip a bit of byte \(at) in record \(r)")
            case 10:
                let (r, at) = randomByte(records); guard r >= 0 else { continue }
                let n = min(1 + int(32), records[r].count - at)
                for k in 0..<n { records[r][at + k] = UInt8(truncatingIfNeeded: rng.next()) }
                notes.append("overwrite \(n) bytes at \(at) in record \(r)")
            case 11:
                let r = int(records.count + 1)
                let junk = (0..<(1 + int(64))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                records.insert(junk, at: r); notes.append("insert \(junk.count) random bytes before record \(r)")
            case 12 where !records.isEmpty:
                // Byte-level truncation inside a record.
                let i = int(records.count); let cut = int(records[i].count)
                records[i].removeSubrange(cut...); records.removeSubrange((i + 1)...); notes.append("cut record \(i) at byte \(cut)")
            case 13:
                // A checkpoint moved before its predecessor (reorder at checkpoint level).
                let begins = records.indices.filter { FuzzRecord.type(records[$0]) == .checkpointBegin }
                guard begins.count >= 2 else { continue }
                let k = 1 + int(begins.count - 1)
                guard let e = records[begins[k]...].firstIndex(where: { FuzzRecord.type($0) == .checkpointEnd }) else { continue }
                let moved = Array(records[begins[k]...e])
                records.removeSubrange(begins[k]...e)
                records.insert(contentsOf: moved, at: begins[k - 1]); notes.append("checkpoint at record \(begins[k]) moved before the one at \(begins[k - 1])")
            case 14:
                // The DOMAIN_CONFIG's content (the guest's size, vCPUs, seed), resealed.
                let start = Int(FuzzRecord.le32(hello, 12))
                var record = Array(hello[start...])
                let body = Int(FuzzRecord.le32(record, 8))
                guard body > 0 else { continue }
                let at = RecordHeader.size + int(body)
                let replacements = Array("0123456789=\n,ax".utf8)
                record[at] = replacements[int(replacements.count)]
                hello = Array(hello[..<start]) + FuzzRecord.resealed(record)
                notes.append("DOMAIN_CONFIG byte \(at - RecordHeader.size) changed")
            default:
                continue
            }
        }
        if notes.isEmpty { notes.append("unchanged") }
        // Sent in random chunks, so the backup's reads split anywhere.
        let all = hello + records.flatMap { $0 }
        var chunks: [[UInt8]] = []
        var offset = 0
        while offset < all.count {
            let n = min(all.count - offset, 1 + int(200_000))
            chunks.append(Array(all[offset..<(offset + n)]))
            offset += n
        }
        let changed = notes.contains { $0.hasPrefix("drop checkpoint") || $0.hasPrefix("checkpoint at") || $0.hasPrefix("DOMAIN_CONFIG") }
        return FuzzInput(chunks: chunks, holdOpen: int(4) == 0, mutations: notes, historyChanged: changed)
    }

    private mutating func randomByte(_ records: [[UInt8]]) -> (Int, Int) {
        guard !records.isEmpty else { return (-1, 0) }
        let r = int(records.count)
        guard !records[r].isEmpty else { return (-1, 0) }
        return (r, int(records[r].count))
    }
}

/// The oracle beside the replica: every commit of a checkpoint of the recorded guest must leave
/// the image the primary had at that epoch, and the epochs committed so are the only ones an ACK
/// may name. Commits of another guest configuration (the real primary's) are counted.
final class FuzzLedger: @unchecked Sendable {  // all state guarded by `lock`
    private let lock = MonitorLock()
    private var violations: [String] = []
    private var verifiedEpochs: Set<Epoch> = []
    private var otherCommits = 0
    private var comparing = true

    /// Whether commits of the recorded guest are compared with its images (see `FuzzInput.historyChanged`).
    func compareImages(_ on: Bool) { lock.withLock { comparing = on } }
    var comparesImages: Bool { lock.withLock { comparing } }

    func verified(_ epoch: Epoch) { lock.withLock { _ = verifiedEpochs.insert(epoch) } }
    func violation(_ text: String) { lock.withLock { violations.append(text) } }
    func otherCommitted() { lock.withLock { otherCommits += 1 } }
    var snapshot: (violations: [String], verified: Set<Epoch>, otherCommits: Int) { lock.withLock { (violations, verifiedEpochs, otherCommits) } }
    func resetVerified() { lock.withLock { verifiedEpochs.removeAll() } }
}

/// A SimReplica that checks each committed image against the recorded guest's.
final class CheckedSimReplica: PageReplica {
    let inner: SimReplica
    let ledger: FuzzLedger
    let expected: [Epoch: UInt64]
    private var isRecordedGuest = false

    init(inner: SimReplica, ledger: FuzzLedger, expected: [Epoch: UInt64]) {
        self.inner = inner
        self.ledger = ledger
        self.expected = expected
    }

    func configure(header: StreamHeader, config: DomainConfig) throws {
        try inner.configure(header: header, config: config)
        isRecordedGuest = (try? SimConfig(config))?.seed == RecordedGuestStream.config.seed
    }

    func withCommittedPage<R>(_ pfn: PFN, _ body: (UnsafeRawBufferPointer?) throws -> R) rethrows -> R {
        try inner.withCommittedPage(pfn, body)
    }

    func commit(_ arenas: [StagingArena], state: GuestState?) throws {
        try inner.commit(arenas, state: state)
        guard let first = arenas.first, first.kind != .precopy else { return }
        let epoch = first.epoch
        guard isRecordedGuest else {
            if ledger.comparesImages { ledger.otherCommitted() } else { ledger.verified(epoch) }
            return
        }
        let digest = inner.memoryDigest()
        if !ledger.comparesImages || expected[epoch].map({ $0 == digest }) == true {
            ledger.verified(epoch)
        } else {
            ledger.violation("committed checkpoint \(epoch) whose image is not the primary's at that epoch (digest \(digest.map { String($0, radix: 16) } ?? "none"), want \(expected[epoch].map { String($0, radix: 16) } ?? "no such epoch"))")
        }
    }

    func prepareActivation(clock: any HostClock) throws { try inner.prepareActivation(clock: clock) }
    func activate(clock: any HostClock) throws -> ActivatedGuest {
        ledger.violation("the backup activated a replica")
        return try inner.activate(clock: clock)
    }
    func discard() { inner.discard() }
}

/// The backup under fuzz, in this process: plaintext on loopback, its fence always fails
/// (`false`), so no input may make it ACTIVE.
final class FuzzedBackup {
    let daemon: BackupDaemon
    let port: UInt16
    let directory: String
    let ledger = FuzzLedger()
    private let exit = ExitBox()
    var statusPath: String { directory + "/backup.sock" }
    static let settings = ProtectionSettings(intervalNs: 20_000_000, heartbeatNs: 50_000_000, timeoutNs: 400_000_000, maxPauseNs: 0)

    /// - Parameter xenReplica: builds the replica of a Xen stream (default: none, refused).
    init(expected: [Epoch: UInt64], xenReplica: (@Sendable () -> any ReplicaTarget)? = nil) throws {
        signal(SIGPIPE, SIG_IGN)
        directory = try freshRunDirectory("netfuzz")
        port = try freePorts(1)[0]
        let ledger = self.ledger
        let backends = BackendFactory(makeReplica: { header, _, clock in
            if header.backend == .xen, let xenReplica { return BackupReplica(xenReplica()) }
            guard header.backend == .simulated else { throw ProtocolError("the fuzzed backup takes simulated streams only") }
            return BackupReplica(CheckedSimReplica(inner: SimReplica(clock: clock, autoRunOnActivation: false), ledger: ledger, expected: expected))
        })
        var config = ReceiveConfiguration(
            listen: Endpoint(host: "127.0.0.1", port: port), settings: Self.settings, fence: .command("false"), reprotectTo: nil,
            nicSink: nil, activationReport: nil, exitAfterProtection: false, statusSocket: directory + "/backup.sock",
            security: .insecurePlaintext)
        config.fenceTimeoutMs = 2000
        config.helloTimeoutMs = 1000
        config.maxPendingConnections = 4
        // The operator names the guest it serves (Docs/security.md): another UUID is refused at the hello.
        config.admission = PrimaryAdmission(servedGuests: [.uuid(RecordedGuestStream.uuid)], guestMemoryBudget: 64 << 20)
        daemon = BackupDaemon(config, backends: backends)
        let (daemon, exit, statusPath) = (self.daemon, self.exit, directory + "/backup.sock")
        startThread(name: "fuzzed-backup") { exit.set(Result { try daemon.run() }) }
        guard eventually(deadline: .after(seconds: 10), { access(statusPath, F_OK) == 0 || exit.done }), !exit.done else {
            throw ProtocolError("the in-process backup did not start")
        }
    }

    func status() -> String? { try? StatusSocket.query(statusPath, timeoutMs: 3000) }

    /// Sends one input on a fresh connection; returns the epochs the backup acknowledged on it.
    func send(_ input: FuzzInput) -> [Epoch] {
        guard let tcp = try? TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 3000)) else { return [] }
        // Held open, the backup's own deadlines must drop it: the peer's deadline is a backstop.
        let peer: HandWrittenPeer
        do { peer = try HandWrittenPeer(channel: tcp, deadline: .after(seconds: input.holdOpen ? 6 : 4)) } catch { return [] }
        ledger.compareImages(!input.historyChanged)
        let acks = AckCollector()
        startThread(name: "fuzz-acks") { acks.collect(peer) }
        for chunk in input.chunks {
            if (try? tcp.write(chunk)) == nil { break }
        }
        if !input.holdOpen { tcp.shutdownWrite() }
        let result = acks.wait()
        peer.close()
        return result
    }

    func stop() {
        daemon.loop.post(.terminate)
        if !eventually(deadline: .after(seconds: 10), { exit.done }) { Issue.record("the fuzzed backup did not end within 10 s of terminate") }
        unlink(statusPath)
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Whether the daemon's run() returned.
    private final class ExitBox: @unchecked Sendable {  // guarded by `lock`
        private let lock = MonitorLock()
        private var result: Result<Int32, any Error>?
        func set(_ r: Result<Int32, any Error>) { lock.withLock { result = r } }
        var done: Bool { lock.withLock { result != nil } }
    }
}

/// The ACKs one connection receives, collected on a thread of their own until it closes.
private final class AckCollector: @unchecked Sendable {  // guarded by `lock`
    private let lock = MonitorLock()
    private var acks: [Epoch] = []
    private var finished = false

    func collect(_ peer: HandWrittenPeer) {
        let got = peer.acksUntilClosed()
        lock.withLock { acks = got; finished = true; lock.broadcast() }
    }

    func wait() -> [Epoch] {
        lock.withLock {
            while !finished { lock.wait(untilMonotonic: monotonicNanoseconds() + 10_000_000_000) }
            return acks
        }
    }
}

/// Peak resident memory of this process, bytes.
private func ownResidentMemory() -> UInt64 { residentMemory(getpid()).now }

@Suite(.serialized) struct NetworkFuzzTests {
    /// The run's length: REMUSD_NET_FUZZ_SECONDS, default 8 s (scripts/test.sh runs 60 s).
    static var seconds: Double { Double(ProcessInfo.processInfo.environment["REMUSD_NET_FUZZ_SECONDS"] ?? "") ?? 8 }
    /// How much this process may grow while fuzzing: the backup holds at most a 4 MiB replica,
    /// one staged checkpoint and four pending connections' buffers (Docs/security.md, bounds).
    /// Run alone (scripts/test.sh sets REMUSD_NET_FUZZ_SECONDS and filters to this suite) 256 MiB;
    /// in the unit suite other tests' daemons share the process, so 1 GiB.
    static var memoryBound: Int64 { ProcessInfo.processInfo.environment["REMUSD_NET_FUZZ_SECONDS"] == nil ? 1 << 30 : 256 << 20 }

    @Test func recordedStreamReadsBackAsTheGuestsImages() throws {
        // The oracle itself: the unmutated stream, sent whole, commits checkpoints 1…6 with the
        // primary's images and acknowledges each; a record resealed unchanged keeps its CRC.
        let stream = try RecordedGuestStream()
        for record in stream.records { #expect(FuzzRecord.resealed(record) == record) }
        let backup = try FuzzedBackup(expected: stream.imageDigest)
        defer { backup.stop() }
        // Held open: a primary that closes its side makes the backup drop the connection, and an
        // ACK still queued then may not leave.
        let acks = backup.send(FuzzInput(chunks: [stream.hello + stream.records.flatMap { $0 }], holdOpen: true, mutations: ["unchanged"]))
        #expect(acks == Array(1...6))
        #expect(backup.ledger.snapshot.verified == Set(1...6))
        #expect(backup.ledger.snapshot.violations.isEmpty, "\(backup.ledger.snapshot.violations)")
    }

    @Test func mutatedStreamsLeaveTheBackupServingAndHonest() throws {
        let seed = ProcessInfo.processInfo.environment["REMUSD_NET_FUZZ_SEED"].flatMap { UInt64($0) }
            ?? UInt64(truncatingIfNeeded: monotonicNanoseconds())
        print("network fuzz: seed \(seed) (re-run with REMUSD_NET_FUZZ_SEED=\(seed)), \(Self.seconds) s")
        let stream = try RecordedGuestStream()
        let backup = try FuzzedBackup(expected: stream.imageDigest)
        defer { backup.stop() }
        var mutator = StreamMutator(stream: stream, rng: SplitMix64(seed: seed))
        let baseline = ownResidentMemory()
        let end = monotonicNanoseconds() + UInt64(Self.seconds * 1e9)
        var inputs = 0
        var maxGrowth: Int64 = 0
        while monotonicNanoseconds() < end {
            let input = mutator.next()
            inputs += 1
            let acks = backup.send(input)
            let context = "seed \(seed), input \(inputs): \(input)"
            let ledger = backup.ledger.snapshot
            try #require(ledger.violations.isEmpty, "\(context): \(ledger.violations.joined(separator: "; "))")
            // I1: an ACK names a checkpoint committed with the primary's image.
            for epoch in acks where !ledger.verified.contains(epoch) {
                Issue.record("\(context): ACK for checkpoint \(epoch), which was not committed with the primary's image")
                return
            }
            guard let status = backup.status() else {
                Issue.record("\(context): the backup's status socket did not answer within 3 s"); return
            }
            let state = status.split(separator: "\n").first { $0.hasPrefix("state:") } ?? "state: ?"
            try #require(!state.contains("ACTIVE") && !state.contains("ACTIVATING"), "\(context): \(state)")
            let counts = backup.daemon.connections.counts
            try #require(counts.pending <= backup.daemon.connections.pendingLimit, "\(context): \(counts.pending) pending connections")
            let grown = Int64(ownResidentMemory()) - Int64(baseline)
            maxGrowth = max(maxGrowth, grown)
            try #require(grown < Self.memoryBound, "\(context): this process grew by \(grown >> 20) MiB (bound \(Self.memoryBound >> 20) MiB)")
        }
        print("network fuzz: \(inputs) inputs, seed \(seed), resident memory grew by at most \(maxGrowth >> 20) MiB")
        #expect(inputs > 5)

        // The backup's connections drain: nothing it held for the fuzzer stays.
        #expect(eventually(deadline: .after(seconds: 10)) { backup.daemon.connections.counts.pending == 0 })
        // The real primary of the same guest still connects and is protected.
        backup.ledger.compareImages(true)
        let before = backup.ledger.snapshot.otherCommits
        let guest = try SimGuest(config: SimConfig(memoryBytes: 4 << 20, vcpus: 1, seed: 99), clock: SystemClock(),
                                 nic: nil, name: RecordedGuestStream.name, uuid: RecordedGuestStream.uuid)
        let protection = try PrimaryProtection(
            guest: guest, output: SimOutputBuffer(sink: DiscardingPacketSink(), holding: false),
            backup: Endpoint(host: "127.0.0.1", port: backup.port), transport: .insecurePlaintext,
            settings: FuzzedBackup.settings, maxCheckpointPages: 4096, clock: SystemClock(), onFinished: { _ in })
        protection.start()
        let protectedAgain = eventually(deadline: .after(seconds: 30)) { backup.ledger.snapshot.otherCommits >= before + 3 }
        protection.stop(.shutdown)
        _ = eventually(deadline: .after(seconds: 10)) { protection.isStopped }
        try? guest.stop()
        #expect(protectedAgain, "seed \(seed): the real primary got no 3 checkpoints committed within 30 s after the fuzz; backup: \(backup.status() ?? "no answer")")
        #expect(backup.ledger.snapshot.violations.isEmpty, "\(backup.ledger.snapshot.violations)")
    }
}
