import Glibc
import RemusCore
import RemusDrill  // freePorts
@testable import RemusRuntime  // BackendFactory, BackupDaemon's loop (to terminate it)
import Testing
import RemusTestSupport

// The Xen backend's flow without Xen: a real PrimaryProtection ships a fake libxenguest stream
// (a StreamingGuest) over loopback TCP to a real BackupDaemon, whose Xen replica is a fake
// that keeps every byte it is handed. A relay between them decodes both directions. The fakes and
// the relay share one ledger under one lock, so the order of events across the primary's, the
// backup's and the relay's threads is a true order: a release of output is checked against the
// ACKs that had crossed the wire and the checkpoints the replica had committed at that moment
// (I1), a barrier against the guest being suspended, a replica commit against the bytes the guest
// produced.

// MARK: - The guest's stream

/// What the fake guest's library "writes": the live phase and one chunk per checkpoint. Every
/// 8-byte word (aligned to the start of its part) names its part and its place in it, so a lost,
/// doubled, reordered or shifted byte range shows up in a byte comparison and can be named.
private enum GuestStream {
    static let tag: UInt64 = 0xA5
    /// Part 0 is the live phase; part k ≥ 1 is checkpoint k.
    static func word(part: UInt64, index: Int) -> UInt64 {
        tag << 56 | (part & 0xFF_FFFF) << 32 | UInt64(truncatingIfNeeded: index) & 0xFFFF_FFFF
    }

    static func bytes(part: UInt64, count: Int) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            let raw = UnsafeMutableRawBufferPointer(buffer)
            var i = 0
            while i + 8 <= count {
                raw.storeBytes(of: word(part: part, index: i >> 3).littleEndian, toByteOffset: i, as: UInt64.self)
                i += 8
            }
            let last = word(part: part, index: i >> 3)
            for k in 0..<(count - i) { raw[i + k] = UInt8(truncatingIfNeeded: last >> (8 * UInt64(k))) }
            initialized = count
        }
    }

    /// A few MiB, not a multiple of the page or the OPAQUE_PAYLOAD chunk.
    static let live = bytes(part: 0, count: (3 << 20) + 13)

    /// Checkpoint sizes, cycled: empty checkpoints, a byte, exactly one OPAQUE_PAYLOAD chunk and
    /// one byte past it, two chunks, a page, odd sizes.
    static let sizes = [1 << 20, 0, 5, (2 << 20) - 3, 4096, (1 << 20) + 1, 0, 777_777, 1, 2 << 20, 65_543, 1_234_567]

    static func checkpoint(_ k: Int) -> [UInt8] { bytes(part: UInt64(k), count: sizes[(k - 1) % sizes.count]) }

    /// Names the stream word around byte `offset` of `bytes` (a part that starts word-aligned).
    static func describe(_ bytes: [UInt8], at offset: Int) -> String {
        let start = offset & ~7
        guard start + 8 <= bytes.count else { return "a tail byte 0x\(String(bytes[offset], radix: 16))" }
        var w: UInt64 = 0
        for k in 0..<8 { w |= UInt64(bytes[start + k]) << (8 * UInt64(k)) }
        guard w >> 56 == tag else { return "0x\(String(w, radix: 16)), not a stream word" }
        let part = (w >> 32) & 0xFF_FFFF
        return "byte \((w & 0xFFFF_FFFF) * 8) of \(part == 0 ? "the live phase" : "checkpoint \(part)")"
    }

    /// Nil when `got` equals `want` byte for byte; otherwise where and how they differ.
    static func difference(_ got: [UInt8], _ want: [UInt8]) -> String? {
        let common = min(got.count, want.count)
        let same = got.withUnsafeBytes { a in want.withUnsafeBytes { b in common == 0 || memcmp(a.baseAddress!, b.baseAddress!, common) == 0 } }
        if !same, let at = (0..<common).first(where: { got[$0] != want[$0] }) {
            return "\(got.count) bytes (want \(want.count)); first difference at byte \(at): got \(describe(got, at: at)), want \(describe(want, at: at))"
        }
        return got.count == want.count ? nil : "\(got.count) bytes, want \(want.count) (equal over the first \(common))"
    }
}

// MARK: - The ledger

/// Everything the fakes saw, in one order. `@unchecked Sendable`: all state is guarded by `monitor`.
private final class Ledger: @unchecked Sendable {
    struct Record {
        /// Calls in order, for failure messages.
        var steps: [String] = []
        /// Broken rules, each said where it happened.
        var violations: [String] = []

        // The guest.
        var liveOffset = 0
        var liveEnded = false
        var liveCalls = 0
        var suspended = false
        var everSuspended = false
        var capturedThisPause = false
        /// Checkpoints whose state (stream chunk) the guest handed out.
        var captured = 0
        var vanishRequested = false
        /// The checkpoint whose suspend found the guest gone.
        var vanishedAt: Int?

        // The output buffer.
        var holding = false
        var closed: [Epoch] = []
        var released: [Epoch] = []
        var releasesAfterVanish: [Epoch] = []
        var releaseAllCount = 0
        var stopRequested = false

        // The replica.
        var replicasBuilt = 0
        var configured: (StreamHeader, DomainConfig)?
        var precopy: [[UInt8]] = []
        var checkpoints: [[UInt8]] = []
        var activations: [Int] = []
        var discards = 0

        // The wire, as the relay decoded it (heartbeats left out).
        var connections = 0
        /// CHECKPOINT_BEGIN records from the primary, in order.
        var begins: [CheckpointBegin] = []
        /// CHECKPOINT_END records from the primary, in order.
        var ends: [Epoch] = []
        var streamEnd: StreamEnd?
        /// Highest ACK that crossed towards the primary.
        var acked: Epoch = 0
        /// How the primary's direction ended: "closed at a record boundary", or what was wrong.
        var primaryStreamClosed: String?

        var primaryFinished: PrimaryEngine.State?

        var maxReleased: Epoch { released.max() ?? 0 }

        mutating func violation(_ text: String) {
            violations.append(text)
            steps.append("VIOLATION: \(text)")
        }

        /// The last steps, for a failure message.
        var recent: String { steps.suffix(24).joined(separator: " | ") }
    }

    private let monitor = MonitorLock()
    private var record = Record()

    @discardableResult
    func update<T>(_ body: (inout Record) throws -> T) rethrows -> T {
        try monitor.withLock {
            defer { monitor.broadcast() }
            return try body(&record)
        }
    }

    var snapshot: Record { monitor.withLock { record } }

    /// Waits until `condition` holds or `seconds` pass; returns whether it holds.
    func wait(seconds: Double, until condition: (Record) -> Bool) -> Bool {
        let deadline = SystemClock().monotonicNs() + UInt64(seconds * 1e9)
        return monitor.withLock {
            while !condition(record) && SystemClock().monotonicNs() < deadline { monitor.wait(untilMonotonic: deadline) }
            return condition(record)
        }
    }
}

// MARK: - Fakes

private struct GuestGone: Error, CustomStringConvertible {
    var description: String { "domain 7 is dying (destroyed under us)" }
}

/// A libxenguest-shaped guest: a live phase in uneven pieces, then one chunk per checkpoint.
/// Checks the call order the Xen backend relies on. `@unchecked Sendable`: state in the ledger.
private final class FakeXenGuest: StreamingGuest, @unchecked Sendable {
    static let config = DomainConfig(format: .libxlJSON, bytes: Array(#"{"c_info":{"type":"pv","name":"flow-guest"},"b_info":{"max_memkb":65536}}"#.utf8))

    let descriptor = GuestDescriptor(name: "flow-guest", uuid: GuestUUID(high: 0xF10, low: 0x0F1), backend: .xen,
                                     pageSize: 4096, pageCount: 32768)
    private let ledger: Ledger
    /// Piece sizes of the live phase (used on the writer thread only).
    private var rng = SplitMix64(seed: 0x5EED)
    private var emptyNext = true

    init(_ ledger: Ledger) { self.ledger = ledger }

    func domainConfig() throws -> DomainConfig { Self.config }

    private func alive(_ r: inout Ledger.Record, _ call: String) {
        if r.vanishedAt != nil { r.violation("\(call) on a guest that vanished") }
    }

    func startStream() throws { ledger.update { alive(&$0, "startStream"); $0.steps.append("startStream") } }

    func nextLiveBytes(maxBytes: Int) throws -> [UInt8]? {
        // Pieces of up to 1.5 MiB; before about half of them a call that found nothing yet.
        let empty = emptyNext
        emptyNext = rng.next() % 2 == 0
        let want = Int(rng.next() % 1_500_000) + 1
        return try ledger.update { r -> [UInt8]? in
            alive(&r, "nextLiveBytes")
            // libxenguest's save ends when the domain is destroyed under it.
            if r.vanishRequested {
                r.vanishedAt = r.captured + 1
                r.steps.append("live: GONE")
                throw GuestGone()
            }
            r.liveCalls += 1
            if r.everSuspended { r.violation("nextLiveBytes after the first suspend (checkpoint \(r.captured + 1))") }
            if r.liveEnded { r.violation("nextLiveBytes after it returned nil"); return nil }
            if maxBytes < 1 { r.violation("nextLiveBytes(maxBytes: \(maxBytes))") }
            if empty { r.steps.append("live []"); return [] }
            guard r.liveOffset < GuestStream.live.count else {
                r.liveEnded = true
                r.steps.append("live nil")
                return nil
            }
            let end = min(r.liveOffset + min(want, maxBytes), GuestStream.live.count)
            let piece = Array(GuestStream.live[r.liveOffset..<end])
            r.steps.append("live \(piece.count)")
            r.liveOffset = end
            return piece
        }
    }

    func suspend() throws {
        try ledger.update { r in
            alive(&r, "suspend")
            let k = r.captured + 1
            if r.vanishRequested {
                r.vanishedAt = k
                r.steps.append("suspend \(k): GONE")
                throw GuestGone()
            }
            if r.suspended { r.violation("suspend for checkpoint \(k) while suspended") }
            if !r.liveEnded { r.violation("suspend for checkpoint \(k) before the live phase ended (libxenguest would not be at its suspend callback)") }
            r.suspended = true
            r.everSuspended = true
            r.capturedThisPause = false
            r.steps.append("suspend \(k)")
        }
    }

    func resume() throws {
        ledger.update { r in
            alive(&r, "resume")
            if !r.suspended { r.violation("resume without a suspend (after checkpoint \(r.captured))") }
            if !r.capturedThisPause { r.violation("resume without captureCheckpoint (checkpoint \(r.captured + 1))") }
            r.suspended = false
            r.steps.append("resume \(r.captured)")
        }
    }

    func captureCheckpoint(clock: any HostClock) throws -> GuestState {
        let k = ledger.update { r -> Int in
            alive(&r, "captureCheckpoint")
            if !r.suspended { r.violation("captureCheckpoint without a suspend (checkpoint \(r.captured + 1))") }
            if r.capturedThisPause { r.violation("captureCheckpoint twice in one pause (checkpoint \(r.captured + 1))") }
            r.capturedThisPause = true
            r.captured += 1
            r.steps.append("captureCheckpoint \(r.captured)")
            return r.captured
        }
        let clockState = ClockState(guestMonotonicNs: 0, guestWallNs: 0, tscKHz: 0, hostMonotonicNs: clock.monotonicNs(), hostWallNs: clock.wallNs())
        let layout = RemusCore.MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: descriptor.pageCount)])
        return GuestState(vcpus: [], devices: [], clock: clockState, layout: layout, stream: GuestStream.checkpoint(k))
    }

    func setSpeed(percent: Int) throws { ledger.update { $0.steps.append("setSpeed \(percent)") } }
    func stop() throws { ledger.update { $0.violation("stop(): no switchover was asked for") } }
    var hasVanished: Bool { ledger.snapshot.vanishedAt != nil }
}

/// An output buffer that holds nothing but checks every call against the ledger (I1).
/// `@unchecked Sendable`: state in the ledger.
private final class CheckedOutput: OutputBuffer, @unchecked Sendable {
    private let ledger: Ledger
    init(_ ledger: Ledger) { self.ledger = ledger }

    func closeEpoch(_ epoch: Epoch) throws {
        ledger.update { r in
            if !r.suspended { r.violation("closeEpoch(\(epoch)) while the guest runs: the barrier is not where the checkpoint is") }
            if !r.holding { r.violation("closeEpoch(\(epoch)) while output is not held") }
            if epoch != Epoch(r.captured) { r.violation("closeEpoch(\(epoch)) in the pause of checkpoint \(r.captured)") }
            if epoch != (r.closed.last ?? 0) + 1 { r.violation("closeEpoch(\(epoch)) after \(r.closed.last ?? 0)") }
            r.closed.append(epoch)
            r.steps.append("closeEpoch \(epoch)")
        }
    }

    func release(through epoch: Epoch) throws {
        ledger.update { r in
            let committed = r.checkpoints.count
            if epoch > r.acked { r.violation("release(through: \(epoch)) before its ACK: the highest ACK on the wire is \(r.acked)") }
            if epoch > Epoch(committed) {
                r.violation("release(through: \(epoch)) while the backup had committed \(committed) checkpoints")
            }
            if epoch > (r.closed.last ?? 0) { r.violation("release(through: \(epoch)) beyond the last closed epoch \(r.closed.last ?? 0)") }
            if let n = r.vanishedAt {
                r.releasesAfterVanish.append(epoch)
                if epoch >= Epoch(n) { r.violation("release(through: \(epoch)) after the guest vanished at checkpoint \(n)") }
            }
            r.released.append(epoch)
            r.steps.append("release \(epoch) (acked \(r.acked), committed \(committed))")
        }
    }

    func releaseAll() throws {
        ledger.update { r in
            if r.holding && !r.stopRequested {
                r.violation("releaseAll while output of epochs after \(r.maxReleased) is held and no stop was asked for\(r.vanishedAt.map { " (the guest vanished at checkpoint \($0))" } ?? "")")
            }
            r.holding = false
            r.releaseAllCount += 1
            r.steps.append("releaseAll")
        }
    }

    func hold() throws { ledger.update { $0.holding = true; $0.steps.append("hold") } }
    func statistics() throws -> OutputStatistics { OutputStatistics() }
}

/// The backup's Xen replica: keeps every stream commit. `@unchecked Sendable`: state in the ledger.
private final class RecordingReplica: StreamingReplica, @unchecked Sendable {
    private let ledger: Ledger
    init(_ ledger: Ledger) {
        self.ledger = ledger
        ledger.update { $0.replicasBuilt += 1 }
    }

    func configure(header: StreamHeader, config: DomainConfig) throws { ledger.update { $0.configured = (header, config) } }
    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws {
        ledger.update { r in
            if !r.activations.isEmpty || r.discards > 0 { r.violation("commitStream after the replica was activated or discarded") }
            if checkpoint {
                r.checkpoints.append(bytes)
                r.steps.append("commit checkpoint \(r.checkpoints.count) (\(bytes.count) bytes)")
            } else {
                if !r.checkpoints.isEmpty { r.violation("a pre-copy commit after checkpoint \(r.checkpoints.count)") }
                r.precopy.append(bytes)
                r.steps.append("commit pre-copy \(bytes.count)")
            }
        }
    }

    func activate(clock: any HostClock) throws -> ActivatedGuest {
        ledger.update { r in
            r.activations.append(r.checkpoints.count)
            r.steps.append("activate (\(r.checkpoints.count) checkpoints)")
        }
        return .underHypervisor
    }

    func discard() { ledger.update { $0.discards += 1; $0.steps.append("discard") } }
}

// MARK: - The wire

/// A TCP relay from the primary to the backup that decodes both directions into the ledger before
/// passing the bytes on, so an ACK is on record before the primary can act on it. Half-closes are
/// passed on as half-closes. `@unchecked Sendable`: the listener is immutable; each pump thread
/// owns its decoder.
private final class WireTap: @unchecked Sendable {
    let endpoint: Endpoint
    private let listener: TCPListener
    private let ledger: Ledger

    init(to target: Endpoint, ledger: Ledger) throws {
        self.ledger = ledger
        listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        endpoint = listener.endpoint
        startThread(name: "test-tap") { [self] in
            while let primary = try? listener.accept() {
                ledger.update { $0.connections += 1 }
                guard let backup = try? TCPChannel.connect(to: target, deadline: .after(milliseconds: 5000)) else { primary.shutdown(); continue }
                startThread(name: "test-tap-acks") { [self] in pump(from: backup, to: primary, fromPrimary: false) }
                startThread(name: "test-tap-stream") { [self] in pump(from: primary, to: backup, fromPrimary: true) }
            }
        }
    }

    func close() { listener.shutdown() }

    private func pump(from source: TCPChannel, to destination: TCPChannel, fromPrimary: Bool) {
        var decoder = StreamDecoder()
        var decoding = true
        var buffer = [UInt8](repeating: 0, count: 256 << 10)
        while true {
            let n = (try? buffer.withUnsafeMutableBytes { try source.read(into: $0) }) ?? 0
            if n <= 0 { break }
            let written: Bool = buffer.withUnsafeBytes { raw in
                let bytes = UnsafeRawBufferPointer(rebasing: raw[0..<n])
                if decoding {
                    do {
                        try decoder.feed(bytes) { item in note(item, fromPrimary: fromPrimary) }
                    } catch {
                        decoding = false
                        ledger.update { $0.violation("the relay could not decode the \(fromPrimary ? "primary's" : "backup's") stream: \(error)") }
                    }
                }
                return (try? destination.write(bytes)) != nil
            }
            if !written {
                // The far end is gone: let the near end see it too.
                source.shutdown()
                break
            }
        }
        destination.shutdownWrite()
        if fromPrimary && decoding {
            let how: String
            do {
                try decoder.finish()
                how = "closed at a record boundary"
            } catch {
                how = "cut: \(error)"
            }
            ledger.update { $0.primaryStreamClosed = how; $0.steps.append("wire: primary \(how)") }
        }
    }

    private func note(_ item: StreamItem, fromPrimary: Bool) {
        guard case .record(let record) = item else { return }
        switch record.content {
        case .checkpointBegin(let begin) where fromPrimary:
            ledger.update { $0.begins.append(begin) }
        case .checkpointEnd(let end) where fromPrimary:
            ledger.update { $0.ends.append(end.epoch); $0.steps.append("wire: END \(end.epoch)") }
        case .streamEnd(let end) where fromPrimary:
            ledger.update { $0.streamEnd = end; $0.steps.append("wire: STREAM_END \(end.reason) \(end.lastEpoch)") }
        case .ack(let ack) where !fromPrimary:
            ledger.update { r in
                if ack.epoch > Epoch(r.checkpoints.count) {
                    r.violation("ACK \(ack.epoch) with \(r.checkpoints.count) checkpoints committed by the replica")
                }
                r.acked = max(r.acked, ack.epoch)
                r.steps.append("wire: ACK \(ack.epoch)")
            }
        default:
            break
        }
    }
}

// MARK: - The two daemons in this process

/// A value set once by another thread, awaited with a deadline.
private final class Outcome<Value: Sendable>: @unchecked Sendable {  // `value` guarded by `monitor`
    private let monitor = MonitorLock()
    private var value: Value?
    func set(_ v: Value) { monitor.withLock { value = v; monitor.broadcast() } }
    func wait(seconds: Double) -> Value? {
        let deadline = SystemClock().monotonicNs() + UInt64(seconds * 1e9)
        return monitor.withLock {
            while value == nil && SystemClock().monotonicNs() < deadline { monitor.wait(untilMonotonic: deadline) }
            return value
        }
    }
    var current: Value? { monitor.withLock { value } }
}


/// A BackupDaemon with the recording replica and a PrimaryProtection of the fake guest, on loopback.
private final class Flow {
    /// 20 ms epochs and heartbeats; a peer silent for 500 ms is lost. No pause bound: the fake's
    /// capture builds up to 2 MiB in a debug build, and the overload policy is not under test.
    static let settings = ProtectionSettings(intervalNs: 20_000_000, heartbeatNs: 20_000_000, timeoutNs: 500_000_000, maxPauseNs: 0)

    let ledger = Ledger()
    let guest: FakeXenGuest
    let output: CheckedOutput
    let daemon: BackupDaemon
    let tap: WireTap
    let protection: PrimaryProtection
    let directory: String
    var statusPath: String { directory + "/backup.sock" }
    private let backupExit = Outcome<Result<Int32, any Error>>()

    init(fence: FenceConfiguration) throws {
        // A write to a connection the peer closed must fail, not kill the test process (the
        // daemon ignores SIGPIPE too, once it runs).
        signal(SIGPIPE, SIG_IGN)
        var template = Array("/tmp/remusd-flow-XXXXXX".utf8CString)
        guard let dir = mkdtemp(&template) else { throw SystemError(call: "mkdtemp", errno: errno) }
        directory = String(cString: dir)
        let port = try freePorts(1)[0]
        let ledger = self.ledger
        // The backup's factory builds the recording replica for a Xen stream (and nothing else).
        let backends = BackendFactory(makeReplica: { header, _, _ in
            guard header.backend == .xen else { throw ProtocolError("the flow's backup takes Xen streams only; the primary sent \(header.backend)") }
            return BackupReplica(RecordingReplica(ledger))
        })
        daemon = BackupDaemon(ReceiveConfiguration(
            listen: Endpoint(host: "127.0.0.1", port: port), settings: Self.settings, fence: fence, reprotectTo: nil,
            nicSink: nil, activationReport: nil, exitAfterProtection: false, statusSocket: directory + "/backup.sock",
            security: .insecurePlaintext), backends: backends)
        tap = try WireTap(to: Endpoint(host: "127.0.0.1", port: port), ledger: ledger)
        guest = FakeXenGuest(ledger)
        output = CheckedOutput(ledger)
        let (daemon, backupExit, statusPath) = (self.daemon, self.backupExit, directory + "/backup.sock")
        startThread(name: "test-backup") { backupExit.set(Result { try daemon.run() }) }
        // The listener is up before the status socket appears.
        guard eventually(deadline: .after(seconds: 10), { access(statusPath, F_OK) == 0 || backupExit.current != nil }), backupExit.current == nil else {
            throw ProtocolError("the in-process backup did not start: \(backupExit.current.map { "\($0)" } ?? "no status socket within 10 s")")
        }
        // Cannot throw after the backup runs: the fake's domainConfig() does not throw.
        protection = try PrimaryProtection(
            guest: guest, output: output, backup: tap.endpoint, transport: .insecurePlaintext, settings: Self.settings,
            maxCheckpointPages: 1, clock: SystemClock(),
            onFinished: { state in ledger.update { $0.primaryFinished = state; $0.steps.append("primary finished") } })
    }

    func start() { protection.start() }

    func backupStatus() -> String { (try? StatusSocket.query(statusPath)) ?? "" }

    /// The planned stop, marked in the ledger first so that the releaseAll it brings is expected.
    func stopProtection() {
        ledger.update { $0.stopRequested = true; $0.steps.append("test: stop") }
        protection.stop(.plannedStop)
    }

    /// Ends both daemons; says so when either does not end in time.
    func tearDown() {
        if ledger.snapshot.primaryFinished == nil {
            ledger.update { $0.stopRequested = true }
            protection.stop(.shutdown)
            if !ledger.wait(seconds: 10, until: { $0.primaryFinished != nil }) { Issue.record("the primary did not stop within 10 s") }
        }
        daemon.loop.post(.terminate)
        if backupExit.wait(seconds: 10) == nil { Issue.record("the backup daemon did not end within 10 s of terminate") }
        tap.close()
        unlink(statusPath)
        rmdir(directory)
    }
}

// MARK: - Checks shared by the tests

/// Nil when the replica holds exactly the live phase (pre-copy, in any split) and checkpoints
/// 1…`count` whole and in order; otherwise the first difference.
private func replicaDifference(_ r: Ledger.Record, checkpoints count: Int) -> String? {
    if let d = GuestStream.difference(r.precopy.flatMap { $0 }, GuestStream.live) { return "pre-copy (\(r.precopy.count) commits): \(d)" }
    if r.precopy.contains(where: \.isEmpty) { return "an empty pre-copy commit" }
    guard r.checkpoints.count == count else {
        return "\(r.checkpoints.count) checkpoint commits [\(r.checkpoints.map { "\($0.count)" }.joined(separator: " "))], want \(count)"
    }
    for (i, got) in r.checkpoints.enumerated() {
        if let d = GuestStream.difference(got, GuestStream.checkpoint(i + 1)) { return "checkpoint commit \(i + 1): \(d)" }
    }
    return nil
}

/// Nil when the primary sent, on one connection, pre-copy rounds (epoch 0) for the live phase
/// and then checkpoints 1…`count`, each begun and ended, and closed its direction at a record
/// boundary; otherwise what it sent instead.
private func wireDifference(_ r: Ledger.Record, checkpoints count: Int) -> String? {
    guard r.connections == 1 else { return "\(r.connections) connections" }
    let rounds = r.begins.prefix { $0.kind == .precopy }
    let want = Array(repeating: CheckpointBegin(epoch: 0, kind: .precopy), count: rounds.count)
        + (0..<count).map { CheckpointBegin(epoch: Epoch($0 + 1), kind: .checkpoint) }
    guard r.begins == want else { return "BEGIN records \(r.begins.map { "\($0.epoch)/\($0.kind)" }), want \(rounds.count) pre-copy rounds and checkpoints 1…\(count)" }
    guard r.ends == want.map(\.epoch) else { return "END records for \(r.ends), want \(want.map(\.epoch))" }
    guard rounds.count == r.precopy.count else { return "\(rounds.count) pre-copy rounds on the wire, \(r.precopy.count) committed" }
    guard r.primaryStreamClosed == "closed at a record boundary" else { return "the primary's direction: \(r.primaryStreamClosed ?? "still open")" }
    return nil
}

@Suite("A streaming (Xen-shaped) guest, protected in-process over loopback", .serialized)
struct StreamingGuestFlowTests {
    @Test("The replica gets the live phase and every committed checkpoint whole and in order; output is released only after its ACK")
    func bytesArriveWholeAndOutputFollowsTheAcks() throws {
        let flow = try Flow(fence: .unsafeNoFence)
        defer { flow.tearDown() }
        flow.start()
        let reached = flow.ledger.wait(seconds: 30) { $0.checkpoints.count >= 12 && $0.maxReleased >= 12 || !$0.violations.isEmpty }
        #expect(reached, "12 checkpoints committed and released within 30 s: \(flow.ledger.snapshot.recent)")
        // Every captured checkpoint goes out ahead of STREAM_END: after the stop the replica has them all.
        flow.stopProtection()
        // The relay records how the primary's direction ended only after the primary finished:
        // wait for that too before checking it.
        #expect(flow.ledger.wait(seconds: 10) { $0.primaryFinished != nil && $0.discards > 0 && $0.primaryStreamClosed != nil },
                "\(flow.ledger.snapshot.recent)")

        let r = flow.ledger.snapshot
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.captured >= 12)
        #expect(replicaDifference(r, checkpoints: r.captured) == nil, "\(replicaDifference(r, checkpoints: r.captured) ?? "")")
        let wire = wireDifference(r, checkpoints: r.captured)
        #expect(wire == nil, "\(wire ?? "")")
        #expect(r.streamEnd?.reason == .plannedStop && r.streamEnd?.lastEpoch == Epoch(r.captured), "\(String(describing: r.streamEnd))")
        // The scenario itself: pieces of the live phase, calls that found nothing, every size of the table (0 bytes too).
        #expect(r.precopy.count >= 3 && r.liveCalls > r.precopy.count + 1, "\(r.liveCalls) live calls, pieces \(r.precopy.map(\.count))")
        #expect(Set(r.checkpoints.prefix(12).map(\.count)) == Set(GuestStream.sizes))
        // Output: one barrier per checkpoint, released in order, never past an ACK (checked at each call).
        #expect(r.closed == (1...Epoch(r.captured)).map { $0 })
        #expect(r.released == r.released.sorted() && r.maxReleased >= 12 && r.maxReleased <= r.acked)
        #expect(r.replicasBuilt == 1)
        #expect(r.configured?.0.backend == .xen && r.configured?.0.guestUUID == flow.guest.descriptor.uuid)
        #expect(r.configured?.1 == FakeXenGuest.config)
        #expect(r.primaryFinished == .stopped)
    }

    @Test("A planned stop discards the replica after the last checkpoint and never activates it")
    func plannedStopDiscardsTheReplica() throws {
        let flow = try Flow(fence: .unsafeNoFence)
        defer { flow.tearDown() }
        flow.start()
        #expect(flow.ledger.wait(seconds: 30) { $0.checkpoints.count >= 3 || !$0.violations.isEmpty }, "\(flow.ledger.snapshot.recent)")
        flow.stopProtection()
        #expect(flow.ledger.wait(seconds: 10) { $0.discards > 0 && $0.primaryFinished != nil && $0.primaryStreamClosed != nil || !$0.activations.isEmpty },
                "\(flow.ledger.snapshot.recent)")
        #expect(eventually(deadline: .after(seconds: 10)) { flow.backupStatus().contains("state: STOPPED: protection stopped by the primary's operator") }, "\(flow.backupStatus())")
        // With --unsafe-no-fence a backup that took the stop for a loss would activate at once, or
        // at the latest when its 500 ms silence timeout fires: watch past that.
        let activated = flow.ledger.wait(seconds: 1) { !$0.activations.isEmpty }
        #expect(!activated, "the replica was activated after a planned stop: \(flow.ledger.snapshot.recent)")
        #expect(flow.backupStatus().contains("state: STOPPED"), "\(flow.backupStatus())")

        let r = flow.ledger.snapshot
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.discards == 1 && r.activations.isEmpty)
        #expect(r.streamEnd?.reason == .plannedStop, "\(String(describing: r.streamEnd))")
        let wire = wireDifference(r, checkpoints: r.captured)
        #expect(wire == nil, "\(wire ?? "")")
        #expect(replicaDifference(r, checkpoints: r.captured) == nil, "every captured checkpoint arrived before the discard: \(replicaDifference(r, checkpoints: r.captured) ?? "")")
        #expect(r.steps.last(where: { $0.hasPrefix("commit") || $0 == "discard" }) == "discard", "nothing committed after the discard")
        #expect(r.primaryFinished == .stopped)
    }

    @Test("A guest that vanishes in the live phase ends protection as a lost guest: no reconnection, no save of a domain that is gone")
    func guestVanishedInTheLivePhaseIsNotALostConnection() throws {
        let flow = try Flow(fence: .command("true"))
        defer { flow.tearDown() }
        // The save of the first connection finds the domain gone; it reaches the primary as its
        // writer failing, as a real save's failure does.
        flow.ledger.update { $0.vanishRequested = true; $0.steps.append("test: vanish in the live phase") }
        flow.start()
        #expect(flow.ledger.wait(seconds: 20) { $0.primaryFinished != nil || !$0.violations.isEmpty }, "\(flow.ledger.snapshot.recent)")
        // A primary that took it for a lost connection would reconnect within its retry delay and
        // start another save (a violation: startStream on a guest that vanished): watch past that.
        let restarted = flow.ledger.wait(seconds: 1) { $0.connections > 1 || !$0.violations.isEmpty }
        #expect(!restarted, "\(flow.ledger.snapshot.recent)")

        let r = flow.ledger.snapshot
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.vanishedAt == 1 && r.captured == 0)
        #expect(r.steps.filter { $0 == "startStream" }.count == 1, "\(r.recent)")
        #expect(r.primaryFinished == .stopped)
        #expect(flow.protection.statusText().contains("GUEST LOST: the guest vanished from this host"), "\(flow.protection.statusText())")
        // Nothing was committed on the backup: nothing to take over, and no output ever released.
        #expect(r.activations.isEmpty && r.checkpoints.isEmpty)
        #expect(r.released.isEmpty)
    }

    @Test("A guest that vanishes at a checkpoint: STREAM_END(error), the backup fences and activates its last checkpoint, held output stays held")
    func vanishedGuestHandsOverToTheBackup() throws {
        let flow = try Flow(fence: .command("true"))
        defer { flow.tearDown() }
        flow.start()
        // Some output released first, so that there is output released and output held.
        #expect(flow.ledger.wait(seconds: 30) { $0.maxReleased >= 3 || !$0.violations.isEmpty }, "\(flow.ledger.snapshot.recent)")
        let releasedBefore = flow.ledger.update { r -> Epoch in
            r.vanishRequested = true
            r.steps.append("test: vanish at the next suspend")
            return r.maxReleased
        }
        #expect(flow.ledger.wait(seconds: 20) { !$0.activations.isEmpty && $0.primaryFinished != nil && $0.primaryStreamClosed != nil },
                "\(flow.ledger.snapshot.recent)")

        let r = flow.ledger.snapshot
        let n = try #require(r.vanishedAt, "the guest never reached another suspend: \(r.recent)")
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(n >= 4 && r.captured == n - 1)
        // The primary ended its stream on purpose, after every checkpoint it had captured.
        let wire = wireDifference(r, checkpoints: n - 1)
        #expect(wire == nil, "\(wire ?? "")")
        #expect(r.streamEnd?.reason == .error, "\(String(describing: r.streamEnd))")
        #expect(r.streamEnd?.lastEpoch ?? 0 >= releasedBefore && r.streamEnd?.lastEpoch ?? .max < Epoch(n))
        // The backup has every checkpoint before the vanish, whole, and activated the last of them.
        #expect(r.activations == [n - 1], "activated with \(r.activations) checkpoints committed, want \(n - 1)")
        #expect(replicaDifference(r, checkpoints: n - 1) == nil, "\(replicaDifference(r, checkpoints: n - 1) ?? "")")
        #expect(eventually(deadline: .after(seconds: 10)) { flow.backupStatus().contains("state: ACTIVE (guest resumed from checkpoint \(n - 1))") }, "\(flow.backupStatus())")
        // The primary: epoch n was never closed nor released, and no release passed an ACK (checked
        // at each call), before the vanish or after it.
        #expect(r.closed == (1...Epoch(n - 1)).map { $0 })
        #expect(r.maxReleased < Epoch(n), "released after the vanish: \(r.releasesAfterVanish)")
        #expect(r.releaseAllCount == 1, "only the one before protection began")
        #expect(r.discards == 0)
        #expect(r.primaryFinished == .stopped)
        #expect(flow.protection.statusText().contains("GUEST LOST"), "\(flow.protection.statusText())")
    }
}
