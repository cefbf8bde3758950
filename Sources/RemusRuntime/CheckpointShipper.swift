import RemusCore
import RemusSystem

/// The staging arenas of one protected guest: taken by the loop thread for a capture or a
/// pre-copy round, given back by whichever thread is done with them.
///
/// Every arena handed to a `CheckpointShipper` comes back here exactly once: when its job was
/// written, failed, or was dropped with its connection. A pool that runs dry is therefore a bug
/// of ours, never something a peer can cause by refusing or cutting connections.
///
/// `@unchecked Sendable`: `free` is guarded by `monitor`; arenas are owned by one thread at a time.
final class ArenaPool: @unchecked Sendable {
    private let monitor = MonitorLock()
    private var free: [StagingArena]
    /// Arenas the pool was made with.
    let total: Int

    init(_ arenas: [StagingArena]) {
        free = arenas
        total = arenas.count
    }

    /// A free arena, or nil when all are in use.
    func take() -> StagingArena? { monitor.withLock { free.popLast() } }

    /// Hands an arena back (any thread).
    func give(_ arena: StagingArena) {
        monitor.withLock {
            precondition(free.count < total && !free.contains { $0 === arena }, "arena given back twice")
            free.append(arena)
        }
    }

    /// Arenas free now.
    var available: Int { monitor.withLock { free.count } }
}

/// The writer thread of one connection: encodes and writes jobs in order while the guest runs.
///
/// Arenas: the shipper owns the arena of every job it was given until it gives it back through
/// `giveBack`: after the job was written or failed, or when it drops the job (abandoned or
/// stopped connection). No job's arena is ever left behind.
///
/// `@unchecked Sendable`: the job queue is guarded by `monitor`; the channel and encoder are used
/// only on the writer thread.
final class CheckpointShipper: @unchecked Sendable {
    enum Job {
        /// One live pre-copy round of a page-capturing guest: harvest, then copy and write the
        /// dirty set in arena-sized chunks.
        case precopyPages(round: Int, guest: any PageCapturingGuest, dirty: DirtyLog, arena: StagingArena,
                          progress: @Sendable (_ sent: Int, _ total: Int) -> Void)
        /// The live phase of a streaming guest: its library's bytes as they come, until it waits
        /// to suspend the guest for the first checkpoint.
        case precopyStream(round: Int, guest: any StreamingGuest, progress: @Sendable (_ sent: Int, _ total: Int) -> Void)
        /// The full copy of the guest's disks at the start of a connection, as pre-copy rounds.
        case diskCopy(any GuestDisks)
        case checkpoint(arena: StagingArena, state: GuestState)
        case heartbeat(Heartbeat)
        case ack(Ack)
        case streamEnd(StreamEnd)
        /// Shut the connection down once everything before has been written.
        case close

        /// The staging arena the job owns, if any.
        var arena: StagingArena? {
            switch self {
            case .precopyPages(_, _, _, let arena, _), .checkpoint(let arena, _): return arena
            case .precopyStream, .diskCopy, .heartbeat, .ack, .streamEnd, .close: return nil
            }
        }
    }

    private let monitor = MonitorLock()
    private var jobs: [Job] = []
    private var abandoned = false
    /// The writer thread has ended: jobs enqueued from now on are dropped at once.
    private var ended = false
    private let channel: any ByteChannel
    private let generation: Int
    private let blackhole: Bool
    private let post: @Sendable (PrimaryProtection.Event) -> Void
    private let giveBack: @Sendable (StagingArena) -> Void

    /// - Parameters:
    ///   - giveBack: receives every arena of every job, once, on the writer thread or the thread
    ///     that abandons the shipper; needed by a shipper that is given arena jobs.
    ///   - post: the connection's events (shipped, lost) for the loop.
    init(channel: any ByteChannel, generation: Int, header: StreamHeader, blackhole: Bool,
         giveBack: @escaping @Sendable (StagingArena) -> Void = { _ in preconditionFailure("an arena job on a shipper without an arena pool") },
         post: @escaping @Sendable (PrimaryProtection.Event) -> Void) {
        self.channel = channel
        self.generation = generation
        self.blackhole = blackhole
        self.giveBack = giveBack
        self.post = post
        startThread(name: "shipper") { [self] in run(pageSize: Int(header.pageSize)) }
    }

    func enqueue(_ job: Job) {
        let dropped: Job? = monitor.withLock {
            if abandoned || ended { return job }
            jobs.append(job)
            monitor.broadcast()
            return nil
        }
        if let arena = dropped?.arena { giveBack(arena) }
    }

    /// Drops queued jobs (their arenas go back at once) and ends the thread after the job in
    /// progress (its arena goes back when it ends).
    func abandon() {
        let dropped: [Job] = monitor.withLock {
            abandoned = true
            defer { jobs.removeAll() }
            monitor.broadcast()
            return jobs
        }
        for case let arena? in dropped.map(\.arena) { giveBack(arena) }
    }

    private let stopped = Gate<Bool>()

    /// Waits until the writer thread has ended (after `abandon`, or a failed or closed
    /// connection); every arena it was given is back by then.
    func waitUntilStopped() { _ = stopped.wait() }

    private func nextJob() -> Job? {
        monitor.withLock {
            while jobs.isEmpty && !abandoned { monitor.wait(untilMonotonic: nil) }
            return abandoned ? nil : jobs.removeFirst()
        }
    }

    /// The thread is ending: later jobs are refused, queued ones dropped, their arenas given back.
    private func end() {
        let dropped: [Job] = monitor.withLock {
            ended = true
            defer { jobs.removeAll() }
            return jobs
        }
        for case let arena? in dropped.map(\.arena) { giveBack(arena) }
    }

    private func run(pageSize: Int) {
        defer {
            end()
            stopped.open(with: true)
        }
        let writer = RecordWriter(channel: channel, pageSize: pageSize)
        while let job = nextJob() {
            do {
                switch job {
                case .precopyPages(let round, let guest, let dirty, let arena, let progress):
                    // The arena goes back before the loop hears of the round, so the next job finds it free.
                    let result = Result { try precopy(guest: guest, dirty: dirty, arena: arena, writer: writer, progress: progress) }
                    giveBack(arena)
                    let (pages, remaining) = try result.get()
                    post(.precopyShipped(generation: generation, round: round, remainingDirty: remaining, pages: pages))
                case .precopyStream(let round, let guest, let progress):
                    let (pages, remaining) = try precopyStream(guest, writer: writer, progress: progress)
                    post(.precopyShipped(generation: generation, round: round, remainingDirty: remaining, pages: pages))
                case .diskCopy(let disks):
                    let total = disks.descriptors.reduce(UInt64(0)) { $0 + $1.sizeBytes }
                    Log.info("copying the guest's disks to the backup: \(disks.descriptors.map { "\($0.name) (\($0.sizeBytes >> 20) MiB)" }.joined(separator: ", "))")
                    var quarter: UInt64 = 0
                    if !blackhole {
                        try writer.writeDiskCopy(disks) { copied, _ in
                            let now = total > 0 ? copied * 4 / total : 4
                            if now > quarter {
                                quarter = now
                                Log.info("disk copy: \(copied >> 20) of \(total >> 20) MiB")
                            }
                        }
                    }
                case .checkpoint(let arena, let state):
                    let epoch = arena.epoch
                    let result = Result { blackhole ? 0 : try writer.writeCheckpoint(arena, state: state) }
                    giveBack(arena)
                    post(.shipped(generation: generation, epoch: epoch, bytes: try result.get()))
                case .heartbeat(let heartbeat):
                    try writer.write(heartbeat)
                case .ack(let ack):
                    try writer.write(ack)
                case .streamEnd(let end):
                    try writer.write(end)
                case .close:
                    // Half-close: the backup reads STREAM_END, closes its side, and our reader sees
                    // that EOF. Closing both ways with its heartbeats unread would send a reset that
                    // can destroy STREAM_END before the backup reads it.
                    channel.shutdownWrite()
                    return
                }
            } catch {
                post(.connectionLost(generation: generation, reason: "\(error)"))
                channel.shutdown()
                return
            }
        }
    }

    /// Copies the dirty set while the guest runs and writes it as pre-copy checkpoints (epoch 0),
    /// one per arena-full. Returns pages sent and pages dirtied meanwhile.
    private func precopy(guest: any PageCapturingGuest, dirty: DirtyLog, arena: StagingArena, writer: RecordWriter,
                         progress: (Int, Int) -> Void) throws -> (Int, Int) {
        try dirty.harvest(from: guest)
        let total = dirty.count
        var chunk = DirtyBitmap(pageCount: guest.descriptor.pageCount)
        var sent = 0
        progress(0, total)
        while dirty.count > 0 {
            chunk.clearAll()
            sent += dirty.take(upTo: arena.capacityPages, into: &chunk)
            arena.reset(epoch: 0, kind: .precopy)
            try guest.capturePages(chunk, into: arena)
            if !blackhole { _ = try writer.writeCheckpoint(arena, state: nil) }
            progress(sent, total)
        }
        // What the guest dirtied while this round ran: the next round's (or first checkpoint's) work.
        try dirty.harvest(from: guest)
        return (sent, dirty.count)
    }

    /// The live phase of a hypervisor library's stream: ships its bytes as they come, as
    /// pre-copy rounds, until the library waits to suspend the guest. Returns the pages' worth
    /// of bytes sent and nothing left dirty (the library sends the rest in the first checkpoint).
    private func precopyStream(_ guest: any StreamingGuest, writer: RecordWriter,
                               progress: (Int, Int) -> Void) throws -> (Int, Int) {
        let pageSize = guest.descriptor.pageSize
        let total = Int(guest.descriptor.pageCount)
        var sentBytes = 0
        progress(0, total)
        // Where the live phase's time goes: waiting for the library's bytes, or writing them.
        let start = monotonicNanoseconds()
        var writingNs: UInt64 = 0
        var pieces = 0
        while let bytes = try guest.nextLiveBytes(maxBytes: 4 * RecordWriter.opaqueChunkBytes) {
            if isAbandoned { throw ProtocolError("the connection was closed during the live phase") }
            guard !bytes.isEmpty else { continue }
            let before = monotonicNanoseconds()
            if !blackhole { try writer.writePrecopyStream(bytes) }
            writingNs += monotonicNanoseconds() - before
            pieces += 1
            sentBytes += bytes.count
            progress(min(total, sentBytes / pageSize), total)
        }
        let elapsed = monotonicNanoseconds() - start
        Log.info("live phase shipped: \(sentBytes >> 20) MiB of the library's stream in \(elapsed / 1_000_000) ms "
                 + "(\(pieces) pieces; \((elapsed - writingNs) / 1_000_000) ms waiting for the library, \(writingNs / 1_000_000) ms writing to the backup); "
                 + "the library suspends the guest for the first checkpoint")
        return (sentBytes / pageSize, 0)
    }

    private var isAbandoned: Bool { monitor.withLock { abandoned } }
}

/// Statistics a primary keeps for `remusd status`.
struct PrimaryStatistics {
    var state: PrimaryEngine.State = .idle
    var captured: Epoch = 0
    var acknowledged: Epoch = 0
    var unacknowledged = 0
    var shippedBytes: UInt64 = 0
    var precopyPages: UInt64 = 0
    /// Progress of the running pre-copy round: pages sent and pages in the round.
    var syncProgress: (sent: Int, total: Int) = (0, 0)
    /// The running round's time left.
    var syncETA = SyncETA()
    var lastCheckpointBytes: UInt64 = 0
    /// Checkpoints written to the backup (each sets `lastCheckpointBytes`).
    var shippedCheckpoints: UInt64 = 0
    /// Bytes on the wire of each shipped, unacknowledged checkpoint.
    var unacknowledgedBytes: [Epoch: UInt64] = [:]
    var lastAckAt: UInt64 = 0
    var pauses = SampleWindow()
    /// The same pauses split into suspend / capture / resume.
    var pauseSplit = PauseSplitWindows()
    var dirtyPages = SampleWindow()
    var checkpointTimes = SampleWindow(capacity: 64)
    var lastReport = ""
    var speedPercent = 100
    /// Times the throttle policy slowed the guest down (it speeds it up again after calm epochs).
    var throttleEvents = 0
    var output = OutputStatistics()
    var deferred = 0
    /// How the connection to the backup is protected, and the backup's identity (last connection).
    var channel = "not connected yet"

    func render() -> String {
        let now = SystemClock().monotonicNs()
        var lines: [String] = []
        lines.append("role: primary")
        lines.append("state: \(describe(state))")
        lines.append("epoch: captured \(captured), acknowledged \(acknowledged), in flight \(unacknowledged)")
        lines.append("channel: \(channel)")
        if let p50 = pauses.percentile(50), let p99 = pauses.percentile(99) {
            lines.append("pause: p50 \(micro(p50)) µs, p99 \(micro(p99)) µs over the last \(min(pauses.total, 1024)) checkpoints")
            if let split = pauseSplit.render() { lines.append("pause split: \(split)") }
        }
        if let d50 = dirtyPages.percentile(50) { lines.append("checkpoint size: p50 \(d50) pages, last \(lastCheckpointBytes) bytes on the wire") }
        if let rate = checkpointRate { lines.append("checkpoint rate: \(String(Int(rate.rounded()))) /s") }
        lines.append("bytes in flight: \(unacknowledgedBytes.values.reduce(0, +)) (shipped, not yet acknowledged)")
        lines.append("shipped: \(shippedBytes) bytes, pre-copy \(precopyPages) pages")
        lines.append(lastAckAt == 0 ? "last ACK: none yet" : "last ACK: \((now - lastAckAt) / 1_000_000) ms ago")
        lines.append("output buffer: \(output.heldPackets) packets (\(output.heldBytes) bytes) held, \(output.drops) dropped, limit hit \(output.overlimits) times")
        if throttleEvents > 0 {
            lines.append("guest speed: \(speedPercent) % (slowed \(throttleEvents) times: it dirties memory faster than it can be protected)")
        }
        if deferred > 0 { lines.append("checkpoints deferred over the pause bound: \(deferred)") }
        if !lastReport.isEmpty { lines.append("last event: \(lastReport)") }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Checkpoints per second over the last (up to 64) captures; nil before two.
    var checkpointRate: Double? {
        guard let first = checkpointTimes.percentile(0), let last = checkpointTimes.percentile(100), last > first else { return nil }
        return Double(checkpointTimes.count - 1) * 1e9 / Double(last - first)
    }

    private func micro(_ ns: UInt64) -> String { String(ns / 1000) }


    private func describe(_ state: PrimaryEngine.State) -> String {
        switch state {
        case .idle: return "IDLE"
        case .connecting(let attempt, _, _): return "CONNECTING (attempt \(attempt))"
        case .synchronizing(let round, _):
            return "SYNCHRONIZING (pre-copy round \(round)) "
                + progressBar(syncProgress.sent, syncProgress.total, remainingNs: syncETA.remainingNs(now: SystemClock().monotonicNs()))
        case .protecting: return "PROTECTED"
        case .degraded(let reason, _, _): return "DEGRADED: \(reason)"
        case .switchingOver(let final, _): return "SWITCHING OVER (final checkpoint \(final), guest suspended)"
        case .handedOff(let text): return "HANDED OFF: \(text)"
        case .selfFenced(let text): return "SELF-FENCED: \(text)"
        case .stopping: return "STOPPING"
        case .stopped: return "STOPPED"
        }
    }
}

/// The recent pauses split into suspend / capture / resume (`PauseSplit`), one window per part.
public struct PauseSplitWindows: Sendable {
    public private(set) var suspend = SampleWindow()
    public private(set) var capture = SampleWindow()
    public private(set) var resume = SampleWindow()

    public init() {}

    public mutating func add(_ split: PauseSplit) {
        suspend.add(split.suspendNs)
        capture.add(split.captureNs)
        resume.add(split.resumeNs)
    }

    /// The parts by name, in the order of the pause.
    public var parts: [(name: String, window: SampleWindow)] { [("suspend", suspend), ("capture", capture), ("resume", resume)] }

    /// "suspend p50 12 / p99 40 µs, capture p50 400 / p99 900 µs, resume p50 8 / p99 20 µs"; nil when empty.
    public func render() -> String? {
        guard suspend.count > 0 else { return nil }
        return parts.map { part in
            "\(part.name) p50 \((part.window.percentile(50) ?? 0) / 1000) / p99 \((part.window.percentile(99) ?? 0) / 1000) µs"
        }.joined(separator: ", ")
    }
}

/// "[#########...........] 45 % (29491/65536 pages)"
func progressBar(_ sent: Int, _ total: Int, width: Int = 20, remainingNs: UInt64? = nil) -> String {
    guard total > 0 else { return "[" + String(repeating: ".", count: width) + "]" }
    let filled = min(width, sent * width / total)
    let bar = "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "] \(sent * 100 / total) % (\(sent)/\(total) pages)"
    guard let remainingNs, sent < total else { return bar }
    let tenths = (remainingNs + 50_000_000) / 100_000_000
    let seconds = (remainingNs + 500_000_000) / 1_000_000_000
    let left = tenths < 100 ? "\(tenths / 10).\(tenths % 10) s" : seconds < 60 ? "\(seconds) s" : "\(seconds / 60) min \(seconds % 60) s"
    return bar + ", about " + left + " left"
}

/// The time a pre-copy round has left: its remaining pages at the rate of its last few seconds
/// (a round's start is slower: connection set-up, a library that maps before it sends), or of
/// the whole round while it is younger than that. A round that starts again (fewer pages sent
/// than before, or another total) starts the estimate again.
struct SyncETA: Sendable {
    /// How far back the rate looks.
    static let windowNs: UInt64 = 3_000_000_000
    private var samples: [(at: UInt64, sent: Int)] = []
    private var total = 0

    mutating func record(sent: Int, total: Int, at now: UInt64) {
        if total != self.total || sent < (samples.last?.sent ?? 0) { samples.removeAll() }
        self.total = total
        samples.append((now, sent))
        // One sample at or beyond the window stays as the rate's base.
        while samples.count > 2 && now - samples[1].at >= Self.windowNs { samples.removeFirst() }
    }

    /// Nanoseconds left after `now`; nil until the round has made progress over some time.
    func remainingNs(now: UInt64) -> UInt64? {
        guard let first = samples.first, let last = samples.last, last.sent > first.sent, last.at > first.at else { return nil }
        let pagesPerNs = Double(last.sent - first.sent) / Double(last.at - first.at)
        let fromLast = Double(max(0, total - last.sent)) / pagesPerNs
        let since = Double(now >= last.at ? now - last.at : 0)
        return UInt64(max(0, fromLast - since))
    }
}
