import Foundation
import Glibc
import RemusCore
import RemusDrill
@testable import RemusRuntime
import RemusSim
import RemusTestSupport
import RemusTLS
import Testing

// Issue #13's list of what a hostile peer could do to a live `remusd receive`, each replayed
// against real processes on loopback: a peer holding a valid certificate of our CA (a
// compromised or misconfigured host) must not run memory of its choosing, call off a fence,
// squat the backup, hold it with a slowloris, or make it allocate what it likes. Each test
// asserts nothing of the attacker's was committed or acknowledged and the real primary is served.

/// A peer that writes the replication stream by hand, under the identity the test picks.
/// `@unchecked Sendable`: the channel is shared with the deadline thread (which only shuts it
/// down) and a trickling thread (which only writes); `finished` is guarded by `watchdog`.
final class HandWrittenPeer: @unchecked Sendable {
    let channel: any ByteChannel
    let reader: StreamReader
    private let watchdog = MonitorLock()
    private var finished = false

    /// Connects over mutual TLS as `identity` and reads the backup's stream header. Every read
    /// afterwards ends by `deadline` at the latest: the connection is shut down then.
    convenience init(port: UInt16, identity: String = "intruder", deadline: Deadline = .after(seconds: 30)) throws {
        try self.init(channel: connectAsPrimary(port: port, identity: identity), deadline: deadline)
    }

    /// Takes over a connection already made (a plaintext one, for the network fuzzer).
    init(channel: any ByteChannel, deadline: Deadline) throws {
        self.channel = channel
        reader = StreamReader(channel: channel, direction: .backupToPrimary)
        let channel = self.channel
        startThread(name: "peer-deadline") { [watchdog, weak self] in
            watchdog.withLock {
                while self.map({ !$0.finished }) ?? false && monotonicNanoseconds() < deadline.monotonicNs {
                    watchdog.wait(untilMonotonic: deadline.monotonicNs)
                }
            }
            channel.shutdown()
        }
        _ = try reader.readHeader()
    }

    deinit { close() }

    func close() {
        watchdog.withLock { finished = true; watchdog.broadcast() }
        channel.shutdown()
    }

    /// The stream header and a simulated guest's DOMAIN_CONFIG.
    func hello(uuid: GuestUUID, name: String, memoryBytes: UInt64) throws {
        let header = StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .primary,
                                  guestUUID: uuid, guestName: name, senderVersion: "attacker")
        try RecordWriter.writePreamble(header: header, config: SimConfig(memoryBytes: memoryBytes, vcpus: 1, seed: 5).encode(), to: channel)
    }

    /// What the backup answers next: "refused: MESSAGE", "ack N" or "closed".
    func answer() -> String {
        do {
            while let event = try reader.next() {
                if case .peerError(let e) = event { return "refused: \(e.message)" }
                if case .ack(let a) = event { return "ack \(a.epoch)" }
            }
        } catch {}
        return "closed"
    }

    /// Reads until the backup closes the connection; returns every ACK seen.
    func acksUntilClosed() -> [Epoch] {
        var acks: [Epoch] = []
        while let event = try? reader.next() {
            if case .ack(let a) = event { acks.append(a.epoch) }
        }
        return acks
    }
}

/// A stepped simulated guest whose checkpoints the attacker encodes: "memory of its choosing".
private func attackerCheckpoints(uuid: GuestUUID, epochs: ClosedRange<Epoch>, finalEpoch: Epoch?) throws -> [UInt8] {
    let config = SimConfig(memoryBytes: 16 << 20, vcpus: 1, seed: 5)
    let guest = try SimGuest(config: config, clock: SystemClock(), nic: nil, name: "g1", uuid: uuid, autoRun: false)
    var dirty = DirtyBitmap(pageCount: config.pageCount)
    let arena = StagingArena(pageSize: config.pageSize, capacityPages: Int(config.pageCount))
    try guest.startDirtyLogging()
    let recording = RecordingChannel()
    let writer = RecordWriter(channel: recording, pageSize: config.pageSize)
    for epoch in epochs.map({ ($0, CheckpointKind.checkpoint) }) + (finalEpoch.map { [($0, CheckpointKind.final)] } ?? []) {
        guest.stepAll(ops: 500)
        try guest.harvestDirty(into: &dirty)
        arena.reset(epoch: epoch.0, kind: epoch.1)
        try guest.capturePages(dirty, into: arena)
        dirty.clearAll()
        try writer.writeCheckpoint(arena, state: try guest.captureState(clock: SystemClock()))
    }
    try writer.write(StreamEnd(reason: .switchover, lastEpoch: 6, message: "attacker"))
    return recording.bytes
}

/// The guest UUID of the primary a backup's log says connected first ("… connected over …:
/// guest 'g1' UUID, simulated, …").
private func connectedUUID(_ log: String) -> GuestUUID? {
    guard let line = log.split(separator: "\n").first(where: { $0.contains(" connected over ") }),
          let range = line.range(of: "guest '") else { return nil }
    let rest = line[range.upperBound...]
    guard let quote = rest.firstIndex(of: "'") else { return nil }
    let uuid = rest[rest.index(quote, offsetBy: 2)...].prefix(36)
    return GuestUUID(parsing: String(uuid))
}

/// The committed checkpoint a status shows.
private func committed(_ status: String) -> String {
    status.split(separator: "\n").first { $0.hasPrefix("committed:") }.map(String.init) ?? "none"
}

/// Peak and current resident memory of a process, bytes (VmHWM, VmRSS in /proc/PID/status).
func residentMemory(_ pid: pid_t) -> (peak: UInt64, now: UInt64) {
    let text = contents("/proc/\(pid)/status")
    func field(_ name: String) -> UInt64 {
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return 0 }
        return (UInt64(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
    }
    return (field("VmHWM"), field("VmRSS"))
}

private let primaryArguments = ["--sim-memory", "16", "--interval", "50", "--heartbeat", "50", "--timeout", "1000"]

@Suite("Hostile input against a live backup (issue #13)", .serialized)
struct HostileInputTests {
    init() { signal(SIGPIPE, SIG_IGN) }

    /// A backup whose fence keeps failing, holding the real primary's checkpoint after that
    /// primary was killed: the state in which a peer could call off the fence on main.
    private func fencingBackup(_ tag: String) throws -> (DaemonPair, held: String, uuid: GuestUUID) {
        let pair = try DaemonPair(backupArguments: ["--fence", "false", "--fence-timeout", "500", "--heartbeat", "50", "--timeout", "800"], tag: tag)
        try pair.startPrimary(primaryArguments)
        try #require(eventually(deadline: .after(seconds: 30)) { pair.backupStatus.contains("RECEIVING (committed") }, "\(pair.backupStatus)\n\(pair.primaryLog)")
        let uuid = try #require(connectedUUID(pair.backupLog), "\(pair.backupLog)")
        pair.primary?.signal(SIGKILL)
        try #require(eventually(deadline: .after(seconds: 10)) { pair.backupStatus.contains("state: FENCING") }, "\(pair.backupStatus)")
        return (pair, committed(pair.backupStatus), uuid)
    }

    @Test("A peer with another guest UUID, or another identity, never calls off a fence")
    func fenceBypassIsRefused() throws {
        let (pair, held, uuid) = try fencingBackup("fence-bypass")
        defer { pair.stop() }
        for (identity, guest) in [("primary", GuestUUID(high: 0xBAD, low: 1)), ("intruder", uuid)] {
            let peer = try HandWrittenPeer(port: pair.port, identity: identity)
            try peer.hello(uuid: guest, name: "g1", memoryBytes: 16 << 20)
            let answer = peer.answer()
            #expect(answer.hasPrefix("refused:") && answer.contains("cannot replace it") && answer.contains("remusd failover --discard"),
                    "\(identity) with \(guest): \(answer)")
            peer.close()
        }
        let status = pair.backupStatus
        #expect(status.contains("state: FENCING"), "\(status)")
        #expect(committed(status) == held, "the held checkpoint changed: \(status)")
        #expect(!pair.backupLog.contains("fencing called off"), "\(pair.backupLog)")

        // The real primary, restarted, is still served: its own reconnect calls the fence off.
        try pair.startPrimary(primaryArguments)
        #expect(eventually(deadline: .after(seconds: 30)) { pair.backupStatus.contains("RECEIVING (committed") && pair.backupLog.contains("fencing called off") },
                "\(pair.backupStatus)\n\(pair.backupLog)")
    }

    @Test("A replayed stream with a final checkpoint and a switchover from another identity runs nothing")
    func replayAndSwitchoverFromAnotherIdentityRunNothing() throws {
        let (pair, held, uuid) = try fencingBackup("replay")
        defer { pair.stop() }
        let peer = try HandWrittenPeer(port: pair.port, identity: "intruder")
        try peer.hello(uuid: uuid, name: "g1", memoryBytes: 16 << 20)
        // The attacker does not wait for an answer: it streams 1–5, a final 6 and a switchover.
        try? peer.channel.write(try attackerCheckpoints(uuid: uuid, epochs: 1...5, finalEpoch: 6))
        var answers: [String] = []
        while true {
            let a = peer.answer()
            answers.append(a)
            if !a.hasPrefix("ack") { break }
        }
        #expect(answers.allSatisfy { !$0.hasPrefix("ack") }, "the backup acknowledged the attacker's checkpoints: \(answers)")
        #expect(answers.last?.hasPrefix("refused:") == true, "\(answers)")
        let status = pair.backupStatus
        #expect(status.contains("state: FENCING") && committed(status) == held, "\(status)")
        #expect(!pair.backupLog.contains("taking over as planned") && !pair.backupLog.contains("ACTIVATED"), "\(pair.backupLog)")

        // Only the operator can let another sender in: after 'remusd failover --discard' it may stream.
        let (code, output) = try runRemusd(["failover", "--discard", "--socket", pair.backupSocket], runDir: pair.directory)
        #expect(code == 0 && output.contains("discard requested"), "\(output)")
        #expect(eventually(deadline: .after(seconds: 10)) { pair.backupStatus.contains("STOPPED: discarded by the operator") }, "\(pair.backupStatus)")
        let next = try HandWrittenPeer(port: pair.port, identity: "intruder")
        defer { next.close() }
        try next.hello(uuid: uuid, name: "g1", memoryBytes: 16 << 20)
        #expect(eventually(deadline: .after(seconds: 10)) { pair.backupStatus.contains("from primary 'intruder'") }, "\(pair.backupStatus)")
    }

    @Test("A squatter trickling one byte every 300 ms inside a record is dropped; the real primary is served meanwhile")
    func squatterTricklingIsDroppedAndThePrimaryServed() throws {
        let pair = try DaemonPair(backupArguments: ["--fence", "true", "--heartbeat", "50", "--timeout", "800", "--hello-timeout", "1000"], tag: "squat")
        defer { pair.stop() }
        let peer = try HandWrittenPeer(port: pair.port, identity: "intruder")
        try peer.hello(uuid: GuestUUID(high: 0x5, low: 0x9), name: "squat", memoryBytes: 16 << 20)
        var opening: [UInt8] = []
        var encoder = StreamEncoder(pageSize: 4096, features: [])
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &opening)
        // A PAGE_BATCH header announcing 1024 pages (~4 MiB): its body then trickles in.
        opening += le(RecordType.pageBatch.rawValue) + le(UInt16(1)) + le(UInt16(0)) + le(UInt32(8 + 1024 * (16 + 4096))) + le(UInt32(0))
        try peer.channel.write(opening)
        #expect(eventually(deadline: .after(seconds: 10)) { pair.backupStatus.contains("SYNCHRONIZING") }, "\(pair.backupStatus)")

        let trickling = TrickleFlag()
        startThread(name: "trickle") {
            while trickling.on {
                guard (try? peer.channel.write([0x42])) != nil else { break }
                pauseBriefly(ms: 300)  // the attacker's pace, not a wait for a condition
            }
        }
        defer { trickling.stop() }
        let started = monotonicNanoseconds()
        try pair.startPrimary(primaryArguments)
        #expect(eventually(deadline: .after(seconds: 30)) { pair.backupStatus.contains("RECEIVING (committed") }, "\(pair.backupStatus)\n\(pair.backupLog)")
        let waitedMs = (monotonicNanoseconds() - started) / 1_000_000
        // The record's budget: the silence timeout plus ~4 MiB at 1 MiB/s, then the primary's retry.
        #expect(waitedMs < 12_000, "the real primary waited \(waitedMs) ms")
        #expect(pair.backupLog.contains("dropped the connection from") && pair.backupLog.contains("did not arrive within"), "\(pair.backupLog)")
        #expect(pair.backupStatus.contains("from primary 'primary'"), "\(pair.backupStatus)")
    }

    @Test("A partial stream header held after the TLS handshake is dropped by the hello deadline")
    func slowlorisHeaderIsDropped() throws {
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence", "--tls-handshake-timeout", "1000", "--hello-timeout", "1000"], tag: "slow-header")
        defer { pair.stop() }
        let peer = try HandWrittenPeer(port: pair.port, identity: "intruder", deadline: .after(seconds: 20))
        try peer.channel.write(Array(StreamHeader.magic) + [1, 0])
        let started = monotonicNanoseconds()
        let answer = peer.answer()
        let heldMs = (monotonicNanoseconds() - started) / 1_000_000
        #expect(answer == "closed")
        #expect(heldMs < 6_000, "a partial header held the connection for \(heldMs) ms")
        #expect(eventually(deadline: .after(seconds: 5)) { pair.backupLog.contains("no accepted hello") }, "\(pair.backupLog)")
        #expect(pair.backupStatus.contains("state: LISTENING"))
    }

    @Test("60 connections with unfinished 8 MiB records: refused over the cap, bounded before the hello; the real primary served")
    func manyUnfinishedRecordsStayBounded() throws {
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence", "--tls-handshake-timeout", "1000", "--hello-timeout", "1000"], tag: "flood")
        defer { pair.stop() }
        let before = residentMemory(pair.backup.pid)
        var peers: [HandWrittenPeer] = []
        defer { peers.forEach { $0.close() } }
        for _ in 0..<60 {
            // Over the cap the backup closes at once: the handshake then fails, which is the point.
            guard let peer = try? HandWrittenPeer(port: pair.port, identity: "intruder") else { continue }
            var bytes: [UInt8] = []
            try StreamEncoder.appendHeader(StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .primary,
                                                        guestUUID: GuestUUID(high: 1, low: 1), guestName: "x", senderVersion: "a"), into: &bytes)
            // An optional record of an unknown type announcing 8 MiB, and most of its body.
            bytes += le(UInt32(0x7000_0001)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt32(8 << 20)) + le(UInt32(0))
            try? peer.channel.write(bytes + [UInt8](repeating: 0x41, count: (8 << 20) - 4096))
            peers.append(peer)
        }
        let after = residentMemory(pair.backup.pid)
        let grownMiB = (after.peak - min(before.peak, after.peak)) >> 20
        print("flood: backup peak RSS \(before.peak >> 20) MiB before, \(after.peak >> 20) MiB after 60 connections (+\(grownMiB) MiB)")
        #expect(grownMiB < 64, "60 unfinished 8 MiB records grew the backup by \(grownMiB) MiB")
        #expect(pair.backupLog.contains("exceeds this reader's limit") || pair.backupLog.contains("--max-pending-connections"), "\(pair.backupLog)")
        try pair.startPrimary(primaryArguments)
        #expect(eventually(deadline: .after(seconds: 30)) { pair.backupStatus.contains("RECEIVING (committed") }, "\(pair.backupStatus)")
    }

    @Test("A hello declaring a 16 TiB guest is refused before anything is allocated")
    func hugeHelloIsRefused() throws {
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence"], tag: "huge")
        defer { pair.stop() }
        let before = residentMemory(pair.backup.pid)
        let peer = try HandWrittenPeer(port: pair.port)
        try peer.hello(uuid: GuestUUID(high: 1, low: 6), name: "huge", memoryBytes: 1 << 44)
        let started = monotonicNanoseconds()
        let answer = peer.answer()
        let tookMs = (monotonicNanoseconds() - started) / 1_000_000
        let after = residentMemory(pair.backup.pid)
        let grownMiB = (after.peak - min(before.peak, after.peak)) >> 20
        print("16 TiB hello: backup peak RSS \(before.peak >> 20) MiB before, \(after.peak >> 20) MiB after (+\(grownMiB) MiB), answered in \(tookMs) ms")
        #expect(answer.contains("--memory-budget") && answer.contains("nothing was allocated"), "\(answer)")
        #expect(grownMiB < 32, "+\(grownMiB) MiB")
        #expect(pair.backupStatus.contains("state: LISTENING"))
        try pair.startPrimary(primaryArguments)
        #expect(eventually(deadline: .after(seconds: 30)) { pair.backupStatus.contains("RECEIVING (committed") }, "\(pair.backupStatus)")
    }

    @Test("A 1 GiB pre-copy round for a guest declared as 16 MiB is refused once it passes the guest's 4096 pages")
    func oversizePrecopyRoundIsRefused() throws {
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence", "--timeout", "2000"], tag: "precopy")
        defer { pair.stop() }
        let before = residentMemory(pair.backup.pid)
        let peer = try HandWrittenPeer(port: pair.port)
        try peer.hello(uuid: GuestUUID(high: 1, low: 7), name: "small", memoryBytes: 16 << 20)
        var encoder = StreamEncoder(pageSize: 4096, features: [])
        var out: [UInt8] = []
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
        try? peer.channel.write(out)
        let arena = StagingArena(pageSize: 4096, capacityPages: StreamLimits.maxPagesPerBatch)
        var sentMiB = 0
        // 256 batches of 1024 distinct, non-zero pages: 1 GiB, pages 0 … 262143.
        for batch in 0..<256 {
            arena.reset(epoch: 0, kind: .precopy)
            for i in 0..<StreamLimits.maxPagesPerBatch {
                arena.append(pfn: PFN(batch * StreamLimits.maxPagesPerBatch + i), encoding: .raw)!.initializeMemory(as: UInt8.self, repeating: 0x5A)
            }
            out.removeAll(keepingCapacity: true)
            encoder.appendPageBatch(arena, entries: 0..<arena.count, into: &out)
            guard (try? peer.channel.write(out)) != nil else { break }
            sentMiB += 4
        }
        let answer = peer.answer()
        let after = residentMemory(pair.backup.pid)
        let grownMiB = (after.peak - min(before.peak, after.peak)) >> 20
        print("1 GiB pre-copy round for a 16 MiB guest: \(sentMiB) MiB written before the backup closed; peak RSS +\(grownMiB) MiB")
        #expect(answer == "closed")
        #expect(grownMiB < 128, "+\(grownMiB) MiB")
        #expect(eventually(deadline: .after(seconds: 5)) { pair.backupLog.contains("the 4096 pages the primary declared") }, "\(pair.backupLog)")
        #expect(!pair.backupStatus.contains("committed:") || pair.backupStatus.contains("committed: 0"), "\(pair.backupStatus)")
    }
}

/// A flag the trickling thread reads.
final class TrickleFlag: @unchecked Sendable {  // guarded by lock
    private let lock = MonitorLock()
    private var running = true
    var on: Bool { lock.withLock { running } }
    func stop() { lock.withLock { running = false } }
}

/// Little-endian bytes of an integer.
func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { Array($0) }
}
