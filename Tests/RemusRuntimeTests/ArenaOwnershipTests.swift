import Glibc
import RemusCore
@testable import RemusRuntime  // ArenaPool, CheckpointShipper, PrimaryProtection.arenas
import RemusSim
import Testing

// A refused or cut connection must give back every staging arena its writer was handed: a pool
// that runs dry made the primary trap ("pre-copy without a connection or arena") after some
// dozens of refused reconnections.

/// A channel whose writes wait until the test opens it, then fail as a peer's reset would.
/// `@unchecked Sendable`: state guarded by `monitor`.
private final class HeldChannel: ByteChannel, @unchecked Sendable {
    let peer = "held"
    private let monitor = MonitorLock()
    private var open = false
    private var writing = false

    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int { 0 }
    func write(segments: UnsafeMutableBufferPointer<iovec>) throws {
        monitor.withLock {
            writing = true
            monitor.broadcast()
            while !open { monitor.wait(untilMonotonic: nil) }
        }
        throw SystemError(call: "writev(held)", errno: ECONNRESET)
    }
    func shutdown() { letGo() }
    func shutdownWrite() {}

    func letGo() { monitor.withLock { open = true; monitor.broadcast() } }

    /// Waits (at most 10 s) until the writer thread is inside a write.
    func awaitWriter() -> Bool {
        let deadline = SystemClock().monotonicNs() + 10_000_000_000
        return monitor.withLock {
            while !writing && SystemClock().monotonicNs() < deadline { monitor.wait(untilMonotonic: deadline) }
            return writing
        }
    }
}

/// A backup that refuses every primary the way a fenced backup does: its header, then an ERROR
/// record, then it closes. Counts the refusals; stops accepting after `limit`.
private final class RefusingBackup: @unchecked Sendable {  // `refused` guarded by `monitor`
    let endpoint: Endpoint
    private let listener: TCPListener
    private let monitor = MonitorLock()
    private var refused = 0

    init(limit: Int) throws {
        listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        endpoint = listener.endpoint
        startThread(name: "test-refuser") { [self] in
            let header = StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .backup,
                                      guestUUID: .zero, guestName: "", senderVersion: "test")
            while let channel = try? listener.accept() {
                // The refusal goes out at once, so it often reaches the primary's reader before
                // its writer has started the pre-copy round it was given.
                try? RecordWriter.writeHeader(header, to: channel)
                try? RecordWriter(channel: channel, pageSize: 4096).write(PeerError(code: 1, message: "this backup is PRIMARY LOST; it accepts no primary now"))
                channel.shutdown()
                let done = monitor.withLock { refused += 1; monitor.broadcast(); return refused >= limit }
                if done { break }
            }
            listener.shutdown()
        }
    }

    /// Waits until `count` primaries were refused or `seconds` passed; returns the count.
    func wait(for count: Int, seconds: Double) -> Int {
        let deadline = SystemClock().monotonicNs() + UInt64(seconds * 1e9)
        return monitor.withLock {
            while refused < count && SystemClock().monotonicNs() < deadline { monitor.wait(untilMonotonic: deadline) }
            return refused
        }
    }
}

@Suite("Staging arenas come back from every connection")
struct ArenaOwnershipTests {
    @Test("A shipper gives back the arenas of the jobs it drops and of the job it was writing")
    func abandonedJobsGiveTheirArenasBack() throws {
        let pool = ArenaPool((0..<2).map { _ in StagingArena(pageSize: 4096, capacityPages: 4) })
        let channel = HeldChannel()
        let header = StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .primary,
                                  guestUUID: .zero, guestName: "g", senderVersion: "test")
        let shipper = CheckpointShipper(channel: channel, generation: 1, header: header, blackhole: false,
                                        giveBack: { pool.give($0) }, post: { _ in })
        let first = try #require(pool.take())
        first.reset(epoch: 1, kind: .checkpoint)
        let state = GuestState(vcpus: [], devices: [],
                               clock: ClockState(guestMonotonicNs: 0, guestWallNs: 0, tscKHz: 0, hostMonotonicNs: 0, hostWallNs: 0),
                               layout: RemusCore.MemoryLayout(generation: 1, ranges: []))
        shipper.enqueue(.checkpoint(arena: first, state: state))
        #expect(channel.awaitWriter(), "the writer never started checkpoint 1")
        // Queued behind the write in progress: the job a refused connection used to lose.
        let guest = try SimGuest(config: SimConfig(memoryBytes: 4 << 20, vcpus: 1), clock: SystemClock(), nic: nil, autoRun: false)
        let second = try #require(pool.take())
        shipper.enqueue(.precopyPages(round: 1, guest: guest, dirty: DirtyLog(pageCount: guest.descriptor.pageCount),
                                      arena: second, progress: { _, _ in }))
        #expect(pool.available == 0)
        shipper.abandon()
        #expect(pool.available == 1, "the dropped pre-copy job's arena is back at once")
        channel.letGo()
        shipper.waitUntilStopped()
        #expect(pool.available == 2, "the arena of the job in progress is back once the writer stopped")
        // A job given to a stopped shipper is not kept either.
        let third = try #require(pool.take())
        shipper.enqueue(.checkpoint(arena: third, state: state))
        #expect(pool.available == 2)
    }

    @Test("A primary refused 60 times in a row keeps running and keeps all its staging arenas")
    func refusedReconnectionsKeepThePoolFull() throws {
        signal(SIGPIPE, SIG_IGN)
        let refusals = 60
        let backup = try RefusingBackup(limit: refusals)
        let guest = try SimGuest(config: SimConfig(memoryBytes: 8 << 20, vcpus: 1), clock: SystemClock(), nic: nil, autoRun: false)
        // Quick retries; a long fence grace keeps the output held (not under test here).
        let settings = ProtectionSettings(intervalNs: 20_000_000, heartbeatNs: 20_000_000, timeoutNs: 500_000_000,
                                          retryNs: 2_000_000, maxRetryNs: 5_000_000, fenceGraceNs: 60_000_000_000)
        let protection = try PrimaryProtection(
            guest: guest, output: SimOutputBuffer(sink: SimPacketRecorder()), backup: backup.endpoint, transport: .insecurePlaintext, settings: settings,
            maxCheckpointPages: 1024, clock: SystemClock())
        protection.start()
        defer {
            protection.stop(.shutdown)
            let deadline = SystemClock().monotonicNs() + 10_000_000_000
            while !protection.isStopped && SystemClock().monotonicNs() < deadline { pauseBriefly(ms: 5) }
            if !protection.isStopped { Issue.record("the primary did not stop within 10 s") }
        }
        #expect(backup.wait(for: refusals, seconds: 60) == refusals, "the primary stopped reconnecting: \(protection.statusText())")
        // No backup listens now: each writer of a refused connection ends, and gives its arenas back.
        let deadline = SystemClock().monotonicNs() + 10_000_000_000
        while protection.arenas.available < protection.arenas.total && SystemClock().monotonicNs() < deadline {
            pauseBriefly(ms: 5)
        }
        #expect(protection.arenas.available == protection.arenas.total,
                "\(protection.arenas.available) of \(protection.arenas.total) staging arenas free after \(refusals) refusals")
        #expect(!protection.isStopped)
        #expect(protection.statusText().contains("DEGRADED") || protection.statusText().contains("CONNECTING"), "\(protection.statusText())")
    }
}
