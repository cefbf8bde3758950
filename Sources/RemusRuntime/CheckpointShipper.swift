import RemusCore

/// The writer thread of one connection: encodes and writes jobs in order while the guest runs.
///
/// `@unchecked Sendable`: the job queue is guarded by `monitor`; the channel and encoder are used
/// only on the writer thread.
final class CheckpointShipper: @unchecked Sendable {
    enum Job {
        /// One live pre-copy round: harvest, then copy and write the dirty set in arena-sized chunks.
        case precopy(round: Int, guest: any PrimaryGuest, dirty: DirtyLog, arena: StagingArena, done: @Sendable (StagingArena) -> Void,
                     progress: @Sendable (_ sent: Int, _ total: Int) -> Void)
        case checkpoint(arena: StagingArena, state: GuestState)
        case heartbeat(Heartbeat)
        case ack(Ack)
        case streamEnd(StreamEnd)
        /// Shut the connection down once everything before has been written.
        case close
    }

    private let monitor = MonitorLock()
    private var jobs: [Job] = []
    private var abandoned = false
    private let channel: any ByteChannel
    private let generation: Int
    private let blackhole: Bool
    private let post: @Sendable (PrimaryProtection.Event) -> Void

    init(channel: any ByteChannel, generation: Int, header: StreamHeader, blackhole: Bool,
         post: @escaping @Sendable (PrimaryProtection.Event) -> Void) {
        self.channel = channel
        self.generation = generation
        self.blackhole = blackhole
        self.post = post
        startThread(name: "shipper") { [self] in run(pageSize: Int(header.pageSize)) }
    }

    func enqueue(_ job: Job) {
        monitor.withLock {
            jobs.append(job)
            monitor.broadcast()
        }
    }

    /// Drops queued jobs and ends the thread after the job in progress.
    func abandon() {
        monitor.withLock {
            abandoned = true
            jobs.removeAll()
            monitor.broadcast()
        }
    }

    private let stopped = Gate<Bool>()

    /// Waits until the writer thread has ended (after `abandon`, or a failed or closed connection).
    func waitUntilStopped() { _ = stopped.wait() }

    private func nextJob() -> Job? {
        monitor.withLock {
            while jobs.isEmpty && !abandoned { monitor.wait(untilMonotonic: nil) }
            return abandoned ? nil : jobs.removeFirst()
        }
    }

    private func run(pageSize: Int) {
        defer { stopped.open(with: true) }
        let writer = RecordWriter(channel: channel, pageSize: pageSize)
        while let job = nextJob() {
            do {
                switch job {
                case .precopy(let round, let guest, let dirty, let arena, let done, let progress):
                    // The arena goes back before the loop hears of the round, so the next job finds it free.
                    let result = Result { try precopy(guest: guest, dirty: dirty, arena: arena, writer: writer, progress: progress) }
                    done(arena)
                    let (pages, remaining) = try result.get()
                    post(.precopyShipped(generation: generation, round: round, remainingDirty: remaining, pages: pages))
                case .checkpoint(let arena, let state):
                    let bytes = blackhole ? 0 : try writer.writeCheckpoint(arena, state: state)
                    post(.shipped(generation: generation, epoch: arena.epoch, bytes: bytes))
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
    private func precopy(guest: any PrimaryGuest, dirty: DirtyLog, arena: StagingArena, writer: RecordWriter,
                         progress: (Int, Int) -> Void) throws -> (Int, Int) {
        if let streaming = guest as? any StreamingPrimaryGuest {
            return try precopyStream(streaming, writer: writer, progress: progress)
        }
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
    private func precopyStream(_ guest: any StreamingPrimaryGuest, writer: RecordWriter,
                               progress: (Int, Int) -> Void) throws -> (Int, Int) {
        let pageSize = guest.descriptor.pageSize
        let total = Int(guest.descriptor.pageCount)
        var sentBytes = 0
        progress(0, total)
        while let bytes = try guest.nextLiveBytes(maxBytes: 4 * RecordWriter.opaqueChunkBytes) {
            if isAbandoned { throw ProtocolError("the connection was closed during the live phase") }
            guard !bytes.isEmpty else { continue }
            if !blackhole { try writer.writePrecopyStream(bytes) }
            sentBytes += bytes.count
            progress(min(total, sentBytes / pageSize), total)
        }
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
    var lastCheckpointBytes: UInt64 = 0
    /// Bytes on the wire of each shipped, unacknowledged checkpoint.
    var unacknowledgedBytes: [Epoch: UInt64] = [:]
    var lastAckAt: UInt64 = 0
    var pauses = SampleWindow()
    var dirtyPages = SampleWindow()
    var checkpointTimes = SampleWindow(capacity: 64)
    var lastReport = ""
    var speedPercent = 100
    /// Times the throttle policy slowed the guest down (it speeds it up again after calm epochs).
    var throttleEvents = 0
    var output = OutputStatistics()
    var deferred = 0

    func render() -> String {
        let now = SystemClock().monotonicNs()
        var lines: [String] = []
        lines.append("role: primary")
        lines.append("state: \(describe(state))")
        lines.append("epoch: captured \(captured), acknowledged \(acknowledged), in flight \(unacknowledged)")
        if let p50 = pauses.percentile(50), let p99 = pauses.percentile(99) {
            lines.append("pause: p50 \(micro(p50)) µs, p99 \(micro(p99)) µs over the last \(min(pauses.total, 1024)) checkpoints")
        }
        if let d50 = dirtyPages.percentile(50) { lines.append("checkpoint size: p50 \(d50) pages, last \(lastCheckpointBytes) bytes on the wire") }
        if let first = checkpointTimes.percentile(0), let last = checkpointTimes.percentile(100), last > first {
            let n = Double(min(checkpointTimes.total, 64) - 1)
            lines.append("checkpoint rate: \(String(Int((n * 1e9 / Double(last - first)).rounded()))) /s")
        }
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

    private func micro(_ ns: UInt64) -> String { String(ns / 1000) }


    private func describe(_ state: PrimaryEngine.State) -> String {
        switch state {
        case .idle: return "IDLE"
        case .connecting(let attempt, _, _): return "CONNECTING (attempt \(attempt))"
        case .synchronizing(let round, _):
            return "SYNCHRONIZING (pre-copy round \(round)) " + progressBar(syncProgress.sent, syncProgress.total)
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

/// "[#########...........] 45 % (29491/65536 pages)"
func progressBar(_ sent: Int, _ total: Int, width: Int = 20) -> String {
    guard total > 0 else { return "[" + String(repeating: ".", count: width) + "]" }
    let filled = min(width, sent * width / total)
    return "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "] \(sent * 100 / total) % (\(sent)/\(total) pages)"
}
