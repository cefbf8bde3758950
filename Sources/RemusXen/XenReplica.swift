import CXen
import Glibc
import RemusCore
import RemusSystem

/// The backup's Xen domain: libxl's checkpointed restore (`libxl_domain_create_restore` with
/// `LIBXL_CHECKPOINTED_STREAM_REMUS`, stream version 2) on a thread of its own, fed through a
/// pipe with verified checkpoints only.
///
/// remusd's gate in front of it has already checked each checkpoint whole (count, digest,
/// order) and acknowledged it; `commitStream` queues its bytes, and a feeder thread writes them
/// into the pipe in order. libxenguest buffers every checkpoint until its CHECKPOINT record
/// and libxl until CHECKPOINT_END, so the pipe is closed only at such a boundary: on failover
/// (`activate`) libxenguest sees the end of the stream where a record would start, restores
/// the last checkpoint, libxl finishes building the domain, and remusd renames and unpauses
/// it. A planned stop (`discard`) destroys the incoming domain.
///
/// The queue between commit and pipe is bounded by backpressure (`XenFeedQueue`): after each
/// commit the backup's reader waits for room before it reads the next checkpoint.
///
/// `@unchecked Sendable`: progress is guarded by `monitor`, the queue by its own; the rest is set up
/// in `configure` on the backup's loop thread before the threads start.
public final class XenReplica: StreamingReplica, FeedBoundedReplica, @unchecked Sendable {
    let log: XenLog
    let light: XenLight
    /// How long libxl may take to finish the domain after the stream ends.
    let deadlineNs: UInt64

    private var name = ""
    private var incomingName = ""
    private var writeFd: Int32 = -1
    /// Writes into the pipe without copying (`vmsplice`); the feeder thread's alone, and kept
    /// with the replica: the arrays it holds for libxl's reader must outlive the restore, and the
    /// restore thread holds the replica until libxl has finished.
    private var pipeFeeder: PipeFeeder?

    private let monitor = MonitorLock()
    // Guarded by `monitor`:
    /// Committed bytes not yet in the pipe (its own lock, taken inside `monitor`, never around it).
    private let queue: XenFeedQueue
    private var feeding = false
    private var fedCheckpoints = 0
    private var queuedCheckpoints = 0
    private var feedFailure: String?
    private var restoreDone = false
    private var restoreResult: (rc: Int32, domid: UInt32, log: [String]) = (0, 0, [])
    private var closing = false

    /// Opens a libxl context; builds nothing until `configure`.
    /// What the feed queue may hold before the backup's reader waits for libxl, bytes. A failover
    /// first waits for libxl to restore everything queued, so the bound is a bound on failover
    /// time: 256 MiB, drained at the ~10 MB/s of libxl's restore under the testbed's emulation,
    /// made a plaintext failover take 28 s; 16 MiB keeps it within ~2 s there (and within a
    /// blink on hardware), while a primary faster than the restore is slowed by the backpressure.
    public static let defaultFeedBoundBytes = 16 << 20

    public init(log: XenLog, deadlineNs: UInt64 = 180_000_000_000, feedBoundBytes: Int = XenReplica.defaultFeedBoundBytes) throws {
        self.log = log
        self.deadlineNs = deadlineNs
        queue = XenFeedQueue(boundBytes: feedBoundBytes)
        light = try XenLight(log: log)
        light.reapOwnChildrenOnly()
        // A restore that fails closes its end of the pipe; the feeder must get EPIPE, not die.
        signal(SIGPIPE, SIG_IGN)
    }

    deinit { if writeFd >= 0 { close(writeFd) } }

    /// The name the domain runs under after a failover, and the one it has while incoming.
    public var domainNames: (final: String, incoming: String) { (name, incomingName) }

    public func configure(header: StreamHeader, config: DomainConfig) throws {
        guard header.backend == .xen, config.format == .libxlJSON else {
            throw XenBackendError("the primary sent a \(header.backend) guest with a \(config.format) configuration; a Xen backup builds domains from libxl JSON only")
        }
        let json = String(decoding: config.bytes, as: UTF8.self)
        var d = libxl_domain_config()
        cxen_libxl_domain_config_init(&d)
        let before = log.count
        let parsed = cxen_libxl_domain_config_from_json(light.context, &d, json)
        guard parsed == 0, let original = d.c_info.name.map({ String(cString: $0) }) else {
            cxen_libxl_domain_config_dispose(&d)
            throw XenBackendError("the primary's domain configuration is not valid libxl JSON (libxl: \(log.lines(since: before).map(\.description).joined(separator: " | "))); nothing was built")
        }
        name = original
        incomingName = original + "--incoming"
        // A failed earlier attempt must not block this one: an incoming domain of this name
        // holds nothing committed that is still wanted (the primary starts its stream anew).
        if let stale = light.domid(named: incomingName) {
            do {
                try light.destroy(domid: stale)
                reportLine("destroyed the stale incoming domain '\(incomingName)' (id \(stale)) left by an earlier attempt")
            } catch {
                cxen_libxl_domain_config_dispose(&d)
                throw XenBackendError("a stale domain '\(incomingName)' (id \(stale)) exists and could not be destroyed: \(error); destroy it with 'xl destroy \(incomingName)' and retry")
            }
        }
        free(d.c_info.name)
        d.c_info.name = strdup(incomingName)

        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            cxen_libxl_domain_config_dispose(&d)
            throw XenError(call: "pipe", errno: errno)
        }
        // Close-on-exec: only libxl's restore helper gets the read end (libxl dups it for the
        // helper itself); the write end must stay in this process alone, or the end of the
        // stream would never reach libxenguest.
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        // A large pipe (F_SETPIPE_SZ, 1031) keeps the feeder ahead while libxenguest applies pages.
        _ = fcntl(fds[1], 1031, Int32(1 << 20))
        writeFd = fds[1]
        pipeFeeder = PipeFeeder(fd: fds[1])
        let readFd = fds[0]
        let config = ConfigBox(d)
        startThread(name: "xen-restore") { [self] in restore(config: config, readFd: readFd) }
    }

    /// Runs libxl's checkpointed restore until the stream ends; keeps its result.
    private func restore(config: ConfigBox, readFd: Int32) {
        var params = libxl_domain_restore_params()
        cxen_libxl_domain_restore_params_init(&params)
        params.checkpointed_stream = Int32(LIBXL_CHECKPOINTED_STREAM_REMUS.rawValue)
        params.stream_version = 2
        var domid: UInt32 = 0
        let before = log.count
        let rc = cxen_libxl_domain_create_restore(light.context, &config.value, &domid, readFd, -1, &params, nil, nil)
        let said = log.lines(since: before, atLeast: .error).suffix(6).map(\.description)
        cxen_libxl_domain_restore_params_dispose(&params)
        cxen_libxl_domain_config_dispose(&config.value)
        close(readFd)
        monitor.withLock {
            restoreDone = true
            restoreResult = (rc, domid, said)
            monitor.broadcast()
        }
        queue.stop("libxl's restore ended")
    }

    public func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws {
        try monitor.withLock { () throws -> Void in
            if let feedFailure { throw XenBackendError("libxl's restore stopped taking the stream: \(feedFailure)") }
            if restoreDone { throw XenBackendError("libxl's restore ended early (\(restoreSummary())); the primary must start a new stream") }
            queue.append(.init(bytes: bytes, checkpoint: checkpoint))
            if checkpoint { queuedCheckpoints += 1 }
            if !feeding {
                feeding = true
                startThread(name: "xen-feed") { [self] in feed() }
            }
            monitor.broadcast()
        }
    }

    /// Writes queued bytes into the pipe in order until the queue is empty.
    private func feed() {
        while true {
            let next: XenFeedQueue.Item? = monitor.withLock {
                guard feedFailure == nil, !closing, let item = queue.takeFirst() else {
                    feeding = false
                    monitor.broadcast()
                    return nil
                }
                return item
            }
            guard let (bytes, checkpoint) = next.map({ ($0.bytes, $0.checkpoint) }) else { return }
            var failure: String?
            do throws(SystemError) { try pipeFeeder?.feed(bytes) } catch {
                failure = "writing into libxl's restore pipe failed: \(error)"
            }
            monitor.withLock {
                if let failure { feedFailure = failure } else if checkpoint { fedCheckpoints += 1 }
                monitor.broadcast()
            }
            queue.written(bytes.count)
            if let failure { queue.stop(failure) }
        }
    }

    /// The backup's reader, after each commit: waits until the feed queue is within its bound.
    public func waitForFeedRoom(until deadlineNs: UInt64) -> String? {
        queue.waitForRoom(until: deadlineNs)
    }

    /// Waits until every queued byte is in the pipe (or the feeder failed).
    private func drain(until deadline: UInt64) {
        monitor.withLock {
            while (feeding || !queue.isEmpty) && feedFailure == nil && monotonicNanoseconds() < deadline {
                monitor.wait(untilMonotonic: deadline)
            }
        }
    }

    private func restoreSummary() -> String {
        let r = restoreResult
        return "libxl_domain_create_restore returned \(r.rc)" + (r.log.isEmpty ? "" : "; libxl said: " + r.log.joined(separator: " | "))
    }

    /// The domain libxl finished from the last checkpoint and left paused (`prepareActivation`).
    private var preparedDomid: UInt32?

    /// Failover, while the primary is fenced: the end of the stream closes it at the last
    /// checkpoint, libxenguest restores it and libxl finishes the domain (devices, hotplug
    /// scripts, vifs) — all of it with the domain paused. `activate` then only unpauses it.
    public func prepareActivation(clock: any HostClock) throws {
        preparedDomid = try finishDomain()
    }

    /// Failover: the last complete checkpoint becomes the running domain, under Xen's control
    /// (finished here unless `prepareActivation` did it while the fence ran).
    @discardableResult
    public func activate(clock: any HostClock) throws -> ActivatedGuest {
        let domid = try preparedDomid ?? finishDomain()
        preparedDomid = nil
        let before = log.count
        let rc = cxen_libxl_domain_unpause(light.context, domid, nil)
        guard rc == 0 else {
            throw XenError(call: "libxl_domain_unpause(\(domid))", libxl: rc, log: log.lines(since: before).map(\.description))
        }
        giveOriginalName(domid: domid)
        return .underHypervisor
    }

    /// Ends the restore stream at the last complete checkpoint and waits until libxl has built
    /// the domain from it, paused; returns its id.
    private func finishDomain() throws -> UInt32 {
        let deadline = monotonicNanoseconds() + deadlineNs
        drain(until: deadline)
        let fed = monitor.withLock { fedCheckpoints }
        guard fed > 0 else {
            throw XenBackendError("no complete checkpoint reached libxl yet; there is nothing consistent to resume")
        }
        // The end of the stream, at a checkpoint boundary: libxenguest restores the last
        // checkpoint, libxl finishes the domain.
        closeStream("the stream was closed for the failover")
        let result = try waitForRestore(until: deadline)
        guard result.rc == 0 else {
            throw XenBackendError("libxl could not finish the domain from checkpoint \(fed): \(restoreSummary()); the incoming domain '\(incomingName)' is left for inspection")
        }
        return result.domid
    }

    /// Renames the running domain from `…--incoming` to its own name; when the old primary
    /// still holds the name on this host (dying, while dom0 releases its pages), waits for it
    /// on a thread of its own, for up to five minutes.
    private func giveOriginalName(domid: UInt32) {
        let (name, incoming) = (self.name, self.incomingName)
        let rename: @Sendable () -> Bool = { [self] in
            guard light.domid(named: name) == nil else { return false }
            return cxen_libxl_domain_rename(light.context, domid, incoming, name) == 0
        }
        if rename() { return }
        reportLine("a domain named '\(name)' still exists on this host (the old primary, dying?); the backup runs as '\(incoming)' until that name is free")
        startThread(name: "xen-rename") { [self] in
            let deadline = monotonicNanoseconds() + 300_000_000_000
            while monotonicNanoseconds() < deadline {
                if rename() {
                    reportLine("the backup domain \(domid) runs as '\(name)' now")
                    return
                }
                var pause = timespec(tv_sec: 0, tv_nsec: 500_000_000)
                nanosleep(&pause, nil)  // a poll for the old primary's name to be released, bounded
            }
            reportLine("'\(name)' stayed taken for five minutes; the backup keeps running as '\(incoming)' (xl rename \(incoming) \(name) once it is free)")
        }
    }

    /// Planned stop: the incoming domain goes away; nothing stale stays behind.
    public func discard() {
        closeStream("the replica was discarded")
        let result = try? waitForRestore(until: monotonicNanoseconds() + deadlineNs)
        if let result, result.rc == 0, result.domid != 0 {
            try? light.destroy(domid: result.domid)
        }
        // Whatever libxl left under the incoming name (a failed restore cleans up after itself,
        // but make sure).
        if !incomingName.isEmpty, let left = light.domid(named: incomingName) {
            try? light.destroy(domid: left)
        }
    }

    /// Ends the stream into libxl: the feeder stops after the item it is writing, and only then
    /// is the pipe's write end closed, so its number is never reused under a write of stream
    /// bytes. A feeder still blocked after 5 s (libxl reads nothing) keeps the descriptor:
    /// closing it would not end that write anyway (the write holds the pipe open).
    private func closeStream(_ reason: String) {
        monitor.withLock {
            closing = true
            monitor.broadcast()
        }
        queue.stop(reason)
        let feederStopped = monitor.withLock { () -> Bool in
            let deadline = monotonicNanoseconds() + 5_000_000_000
            while feeding && monotonicNanoseconds() < deadline { monitor.wait(untilMonotonic: deadline) }
            return !feeding
        }
        if writeFd >= 0 && feederStopped {
            close(writeFd)
            writeFd = -1
        }
    }

    private func waitForRestore(until deadline: UInt64) throws -> (rc: Int32, domid: UInt32, log: [String]) {
        try monitor.withLock { () throws -> (rc: Int32, domid: UInt32, log: [String]) in
            while !restoreDone && monotonicNanoseconds() < deadline { monitor.wait(untilMonotonic: deadline) }
            guard restoreDone else {
                throw XenBackendError("libxl did not finish the domain within \(deadlineNs / 1_000_000_000) s of the stream's end")
            }
            return restoreResult
        }
    }

    private func reportLine(_ text: String) {
        var line = "xen: \(text)\n"
        line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }
}

/// Hands a libxl_domain_config to the restore thread, which disposes of it.
private final class ConfigBox: @unchecked Sendable {  // used by one thread after the handover
    var value: libxl_domain_config
    init(_ value: libxl_domain_config) { self.value = value }
}
