import CXen
import Glibc
import RemusCore
import RemusSystem

/// A running Xen PV domain protected through libxenguest's checkpointed save
/// (`xc_domain_save(…, XCFLAGS_LIVE, callbacks, XC_STREAM_REMUS, …)`).
///
/// libxenguest owns memory and vCPU state and drives the checkpoint loop from its own thread;
/// remusd's shell drives the epochs. They meet in the save callbacks:
/// - `suspend` waits until the shell asks for a checkpoint (`suspend()`), then suspends the
///   domain cooperatively (xenstore `control/shutdown = suspend`) and waits for
///   SHUTDOWN_suspend;
/// - libxenguest then writes the dirty pages and vCPU state into one end of a local socketpair
///   while the guest stays suspended; the shell reads the other end (`captureCheckpoint`) up to the
///   CHECKPOINT record, so the pause costs a local copy, never a network send;
/// - `postcopy` waits until the shell has closed the output epoch (`resume()`), then resumes
///   the domain with `xc_domain_resume(…, 1)` (a cancelled suspend: it keeps its devices);
/// - `checkpoint` returns at once: the guest runs while the shell ships the checkpoint.
/// The stream bytes travel inside remusd's checkpoints; the libxl records around them (stream
/// header, LIBXC_CONTEXT, CHECKPOINT_END) are written here, as libxl would for a PV domain.
///
/// `@unchecked Sendable`: the session is replaced only on the shell's loop thread, while no
/// other call is in progress; the session guards its own state.
public final class XenPrimaryGuest: StreamingGuest, @unchecked Sendable {
    public let descriptor: GuestDescriptor
    /// The protected domain.
    public let domid: UInt32
    let log: XenLog
    let control: XenControl
    let light: XenLight
    private var session: SaveSession?
    /// Paused by `suspend()` outside a checkpoint (self-fencing), to be unpaused by `resume()`.
    private var pausedOutsideCheckpoint = false
    /// How long the guest may take to suspend, and libxenguest to write a checkpoint.
    let deadlineNs: UInt64

    /// Opens the domain named `domain`. Throws when it does not exist or is not a PV domain.
    public init(domain: String, log: XenLog, deadlineNs: UInt64 = 30_000_000_000) throws {
        self.log = log
        self.deadlineNs = deadlineNs
        control = try XenControl(log: log)
        light = try XenLight(log: log)
        light.reapOwnChildrenOnly()
        guard let id = light.domid(named: domain) else {
            throw XenBackendError("there is no Xen domain named '\(domain)' on this host ('xl list' shows the domains); nothing was changed")
        }
        guard let info = XenDomainInfo.read(control, domid: id) else {
            throw XenBackendError("domain '\(domain)' (id \(id)) disappeared while it was being opened; nothing was changed")
        }
        guard !info.isHVM else {
            throw XenBackendError("domain '\(domain)' is an HVM/PVH guest; remusd's Xen backend protects PV guests only so far (HVM needs QEMU's device state in every checkpoint); nothing was changed")
        }
        guard !info.isDying, !info.isShutDown else {
            throw XenBackendError("domain '\(domain)' (id \(id)) is shutting down or dying; nothing was changed")
        }
        domid = id
        descriptor = GuestDescriptor(name: domain, uuid: info.uuid, backend: .xen, pageSize: 4096, pageCount: max(1, info.maxPages))
    }

    deinit { session?.end(control: control) }

    public func domainConfig() throws -> DomainConfig {
        DomainConfig(format: .libxlJSON, bytes: Array(try light.configurationJSON(domid: domid).utf8))
    }

    /// Starts a new checkpointed save (a new connection needs a new stream from its start); an
    /// earlier one is ended first, leaving the guest running.
    public func startStream() throws {
        session?.end(control: control)
        session = nil
        session = try SaveSession(domid: domid, log: log, deadlineNs: deadlineNs)
    }

    public func nextLiveBytes(maxBytes: Int) throws -> [UInt8]? {
        guard let session else { throw XenBackendError("no checkpointed save is running") }
        return try session.readLive(maxBytes: maxBytes)
    }

    public func suspend() throws {
        if let session, session.isUsable {
            try session.suspendForCheckpoint()
            return
        }
        // Outside a checkpoint (self-fencing, or no stream): stop the vCPUs where they are.
        _ = try log.check("xc_domain_pause(\(domid))", { cxen_xc_domain_pause(control.handle, domid) }, failed: { $0 != 0 })
        pausedOutsideCheckpoint = true
    }

    public func resume() throws {
        if pausedOutsideCheckpoint {
            pausedOutsideCheckpoint = false
            _ = try log.check("xc_domain_unpause(\(domid))", { cxen_xc_domain_unpause(control.handle, domid) }, failed: { $0 != 0 })
            return
        }
        guard let session else { return }
        do {
            try session.resumeAfterCheckpoint()
        } catch {
            // The save is broken: end it, which resumes a guest it left suspended.
            session.end(control: control)
            throw error
        }
    }

    /// Reads libxenguest's checkpoint (dirty pages and vCPU state) from the socketpair up to its
    /// CHECKPOINT record, framed as libxl would frame it.
    public func captureCheckpoint(clock: any HostClock) throws -> GuestState {
        guard let session, !pausedOutsideCheckpoint else { throw XenBackendError("no checkpoint is being taken") }
        let bytes: [UInt8]
        do {
            bytes = try session.readCheckpoint()
        } catch {
            session.end(control: control)
            throw error
        }
        // libxenguest's stream carries the vCPUs, the TSC and the shared info; remusd's own
        // records carry the host's clocks at capture.
        let clockState = ClockState(guestMonotonicNs: 0, guestWallNs: 0, tscKHz: 0,
                                    hostMonotonicNs: clock.monotonicNs(), hostWallNs: clock.wallNs())
        return GuestState(vcpus: [], devices: [], clock: clockState, layout: MemoryLayout(generation: 0, ranges: []), stream: bytes)
    }

    public var hasVanished: Bool {
        guard let info = XenDomainInfo.read(control, domid: domid) else { return true }
        return info.isDying || (info.isShutDown && !info.isSuspended)
    }

    public func setSpeed(percent: Int) throws {
        try light.setCap(domid: domid, percent: percent)
    }

    /// The guest was handed over after its final checkpoint: it is suspended; destroy it here.
    public func stop() throws {
        session?.end(control: control, resumeGuest: false)
        session = nil
        try light.destroy(domid: domid)
    }

    /// Ends protection here (planned stop): the checkpointed save ends and the guest runs on.
    public func endProtection() {
        session?.end(control: control)
        session = nil
    }
}

/// One run of `xc_domain_save` on its own thread, writing into a socketpair whose other end
/// the shell reads.
///
/// `@unchecked Sendable`: the state shared by the save thread and the shell's threads is
/// guarded by `monitor`; the read end and the framer are used by one shell thread at a time
/// (the writer thread in the live phase, then the loop thread).
final class SaveSession: @unchecked Sendable {
    let domid: UInt32
    let log: XenLog
    let deadlineNs: UInt64
    /// The save thread's own interfaces (libxenguest uses its interface throughout the save).
    private let control: XenControl
    private let store: XenStoreConnection
    private let readFd: Int32
    private let writeFd: Int32
    private let callbacks: UnsafeMutablePointer<save_callbacks>
    private var framer = LibxcStreamFramer()
    /// Bytes read past the last CHECKPOINT record (belong to the next checkpoint).
    private var carry: [UInt8] = []
    private var preambleSent = false
    /// Where reads land before they are appended (allocated once: nothing per read).
    private static let scratchBytes = 1 << 20
    private let scratch = UnsafeMutableRawPointer.allocate(byteCount: SaveSession.scratchBytes, alignment: 4096)

    /// A place where the save thread waits for the shell: before suspending the guest (in the
    /// `suspend` callback) and before resuming it (in `postcopy`).
    private struct HandOff {
        /// The save thread is there, waiting.
        var waiting = false
        /// The shell lets it go on.
        var permitted = false
        /// How often the step after it succeeded.
        var done = 0
    }

    private let monitor = MonitorLock()
    // Guarded by `monitor`:
    private var suspendPoint = HandOff()
    private var resumePoint = HandOff()
    private var aborting = false
    private var finished = false
    private var failure: String?

    init(domid: UInt32, log: XenLog, deadlineNs: UInt64) throws {
        self.domid = domid
        self.log = log
        self.deadlineNs = deadlineNs
        control = try XenControl(log: log)
        store = try XenStoreConnection(log: log)
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw XenError(call: "socketpair", errno: errno)
        }
        readFd = fds[0]
        writeFd = fds[1]
        // Room for a checkpoint's pages in flight while the reader catches up.
        var size: Int32 = 8 << 20
        setsockopt(writeFd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(Swift.MemoryLayout<Int32>.size))
        setsockopt(readFd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(Swift.MemoryLayout<Int32>.size))
        callbacks = .allocate(capacity: 1)
        callbacks.initialize(to: save_callbacks())
        callbacks.pointee.suspend = { data in SaveSession.from(data).suspendCallback() }
        callbacks.pointee.postcopy = { data in SaveSession.from(data).postcopyCallback() }
        callbacks.pointee.checkpoint = { data in SaveSession.from(data).checkpointCallback() }
        // The session outlives the save thread: `end` waits for it before anything is freed.
        callbacks.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        startThread(name: "xen-save") { [self] in run() }
    }

    deinit {
        close(readFd)
        callbacks.deallocate()
        scratch.deallocate()
    }

    private static func from(_ data: UnsafeMutableRawPointer?) -> SaveSession {
        // SAFETY: `data` is the unretained session set in init; it lives until the save
        // thread has finished (`end` waits for that).
        Unmanaged<SaveSession>.fromOpaque(data!).takeUnretainedValue()
    }

    private func run() {
        let before = log.count
        let rc = cxen_xc_domain_save(control.handle, writeFd, domid, UInt32(XCFLAGS_LIVE), callbacks, XC_STREAM_REMUS, -1)
        let code = errno
        close(writeFd)  // the reader sees the end of the stream
        monitor.withLock {
            if rc != 0 && failure == nil && !aborting {
                let said = log.lines(since: before, atLeast: .error).suffix(4).map(\.description)
                failure = "xc_domain_save ended (\(rc), \(String(cString: strerror(code))))" + (said.isEmpty ? "" : "; libxenguest said: " + said.joined(separator: " | "))
            }
            finished = true
            monitor.broadcast()
        }
    }

    // MARK: - Callbacks (on the save thread)

    private func suspendCallback() -> Int32 {
        guard arrive(at: \.suspendPoint) else { return 0 }
        let failure = suspendDomain()
        finish(\.suspendPoint, failure: failure)
        return failure == nil ? 1 : 0
    }

    private func postcopyCallback() -> Int32 {
        guard arrive(at: \.resumePoint) else { return 0 }
        let rc = cxen_xc_domain_resume(control.handle, domid, 1)
        let code = errno
        finish(\.resumePoint, failure: rc == 0 ? nil : "xc_domain_resume(\(domid), fast) failed: \(String(cString: strerror(code)))")
        return rc == 0 ? 1 : 0
    }

    /// The save thread waits at `point` until the shell lets it go on (true) or the save is
    /// being ended (false).
    private func arrive(at point: ReferenceWritableKeyPath<SaveSession, HandOff>) -> Bool {
        monitor.withLock {
            self[keyPath: point].waiting = true
            monitor.broadcast()
            while !self[keyPath: point].permitted && !aborting { monitor.wait(untilMonotonic: nil) }
            self[keyPath: point] = HandOff(waiting: false, permitted: false, done: self[keyPath: point].done)
            return !aborting
        }
    }

    /// The step after `point` succeeded (failure nil) or failed.
    private func finish(_ point: ReferenceWritableKeyPath<SaveSession, HandOff>, failure: String?) {
        monitor.withLock {
            if let failure { self.failure = failure } else { self[keyPath: point].done += 1 }
            monitor.broadcast()
        }
    }

    /// The shell's side of `point`: waits for the save thread to get there, lets it go on and
    /// waits until the step after it is done.
    private func pass(_ point: ReferenceWritableKeyPath<SaveSession, HandOff>, before what: String) throws {
        let deadline = monotonicNanoseconds() + deadlineNs
        try monitor.withLock { () throws -> Void in
            while !self[keyPath: point].waiting && !finished && failure == nil && monotonicNanoseconds() < deadline {
                monitor.wait(untilMonotonic: deadline)
            }
            guard self[keyPath: point].waiting, failure == nil else {
                throw XenBackendError(failure != nil || finished ? failureText() : "libxenguest did not get to \(what) within \(deadlineNs / 1_000_000_000) s")
            }
            let before = self[keyPath: point].done
            self[keyPath: point].permitted = true
            monitor.broadcast()
            while self[keyPath: point].done == before && !finished && failure == nil { monitor.wait(untilMonotonic: nil) }
            guard self[keyPath: point].done > before else { throw XenBackendError(failureText()) }
        }
    }

    private func checkpointCallback() -> Int32 {
        monitor.withLock { aborting ? 0 : 1 }
    }

    /// Asks the guest to suspend through xenstore and waits until Xen shows it shut down for a
    /// suspend. Returns why it failed, nil on success.
    private func suspendDomain() -> String? {
        let path = "/local/domain/\(domid)/control/shutdown"
        guard cxen_xs_write(store.handle, xs_transaction_t(XBT_NULL), path, "suspend", 7) else {
            return "writing 'suspend' to \(path) failed: \(String(cString: strerror(errno)))"
        }
        let deadline = monotonicNanoseconds() + deadlineNs
        var waitNs = 50_000
        while monotonicNanoseconds() < deadline {
            guard let info = XenDomainInfo.read(control, domid: domid) else { return "domain \(domid) disappeared while suspending" }
            if info.isSuspended { return nil }
            if info.isShutDown || info.isDying { return "domain \(domid) shut down (reason \(info.shutdownReason)) instead of suspending" }
            // A poll of Xen's domain state, bounded by the deadline, backing off to 2 ms so it
            // does not take the CPU the guest needs to suspend.
            var pause = timespec(tv_sec: 0, tv_nsec: waitNs)
            nanosleep(&pause, nil)
            waitNs = min(waitNs * 2, 2_000_000)
        }
        // Withdraw the request, so that a late guest does not suspend with nobody to resume it.
        _ = cxen_xs_write(store.handle, xs_transaction_t(XBT_NULL), path, "", 0)
        return "domain \(domid) did not suspend within \(deadlineNs / 1_000_000_000) s of the xenstore request (its kernel needs Xen PV suspend support)"
    }

    // MARK: - The shell's side

    /// Whether checkpoints can still be taken from this save.
    var isUsable: Bool { monitor.withLock { !finished && !aborting && failure == nil } }

    private func failureText() -> String {
        failure ?? (finished ? "libxenguest's checkpointed save ended" : "the checkpointed save was ended")
    }

    /// The live phase: the stream's next bytes (with libxl's preamble first); empty after a
    /// short wait without any; nil once libxenguest waits to suspend the guest.
    func readLive(maxBytes: Int) throws -> [UInt8]? {
        var out: [UInt8] = []
        if !preambleSent {
            preambleSent = true
            out = LibxlStream.preamble
        }
        let waiting = monitor.withLock { suspendPoint.waiting }
        let start = out.count
        let n = try readSome(into: &out, max: maxBytes, waitMs: waiting ? 0 : 100)
        // Follow the framing from the first byte, so that checkpoints can be cut later.
        var at = start
        while at < out.count { at += try frame(out, from: at).taken }
        if n > 0 || !out.isEmpty { return out }
        if waiting { return nil }  // libxenguest wrote everything before it called suspend
        let state = monitor.withLock { (finished, failure) }
        if state.0 || state.1 != nil { throw XenBackendError(failureText()) }
        return out
    }

    /// Lets the save thread suspend the guest and waits until it is suspended.
    func suspendForCheckpoint() throws { try pass(\.suspendPoint, before: "the next checkpoint") }

    /// Reads libxenguest's records of the checkpoint being written, up to its CHECKPOINT
    /// record, and returns them followed by libxl's CHECKPOINT_END.
    func readCheckpoint() throws -> [UInt8] {
        var out: [UInt8] = []
        var start = 0
        if !carry.isEmpty {
            out = carry
            carry.removeAll()
        }
        let deadline = monotonicNanoseconds() + deadlineNs
        let checkpointsBefore = framer.checkpoints
        while true {
            // Frame what is there (carried bytes first, then each read).
            let (taken, done) = try frame(out, from: start)
            start += taken
            if done && framer.checkpoints > checkpointsBefore {
                carry = Array(out[start...])
                out.removeSubrange(start...)
                out.append(contentsOf: LibxlStream.checkpointEnd)
                return out
            }
            guard monotonicNanoseconds() < deadline else {
                throw XenBackendError("libxenguest did not finish writing the checkpoint within \(deadlineNs / 1_000_000_000) s")
            }
            let n = try readSome(into: &out, max: 4 << 20, waitMs: 100)
            if n == 0, monitor.withLock({ finished || failure != nil }) {
                // Whatever the save thread wrote is in the socket: read it out before giving up.
                if try readSome(into: &out, max: 4 << 20, waitMs: 0) == 0 { throw XenBackendError(failureText()) }
            }
        }
    }

    /// Lets the save thread resume the guest and waits until it has.
    func resumeAfterCheckpoint() throws { try pass(\.resumePoint, before: "the end of the checkpoint") }

    /// Ends the save: the callbacks return 0, libxenguest stops (turning log-dirty mode off),
    /// and the guest runs on here unless `resumeGuest` is false (handed over).
    func end(control shell: XenControl, resumeGuest: Bool = true) {
        monitor.withLock {
            aborting = true
            monitor.broadcast()
        }
        // A save blocked writing into a full socket gets EPIPE once nobody can read.
        shutdown(readFd, Int32(SHUT_RDWR))
        let deadline = monotonicNanoseconds() + deadlineNs
        monitor.withLock {
            while !finished && monotonicNanoseconds() < deadline { monitor.wait(untilMonotonic: deadline) }
        }
        if resumeGuest, let info = XenDomainInfo.read(shell, domid: domid), info.isSuspended {
            // Suspended for a checkpoint that will not be completed: a cancelled suspend.
            _ = cxen_xc_domain_resume(shell.handle, domid, 1)
        }
    }

    /// Follows `bytes[from...]` with the framer, up to the end or just past a CHECKPOINT.
    private func frame(_ bytes: [UInt8], from: Int) throws -> (taken: Int, checkpoint: Bool) {
        var framer = self.framer
        let result = bytes.withUnsafeBytes { raw -> Result<(taken: Int, checkpoint: Bool), LibxcStreamError> in
            do { return .success(try framer.consume(UnsafeRawBufferPointer(rebasing: raw[from...]))) } catch let e as LibxcStreamError { return .failure(e) } catch { return .failure(LibxcStreamError(description: "\(error)")) }
        }
        self.framer = framer
        switch result {
        case .success(let r): return r
        case .failure(let error): throw XenBackendError("libxenguest's stream is malformed: \(error); protection of this stream stops")
        }
    }

    /// Reads what is available (waiting up to `waitMs` for something) and appends it to `out`;
    /// returns bytes read, 0 at the end of the stream or when nothing came.
    private func readSome(into out: inout [UInt8], max: Int, waitMs: Int32) throws -> Int {
        var p = pollfd(fd: readFd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&p, 1, waitMs)
        if ready < 0 && errno != EINTR { throw XenError(call: "poll(checkpoint stream)", errno: errno) }
        guard ready > 0 else { return 0 }
        let n = read(readFd, scratch, min(max, Self.scratchBytes))
        if n < 0 {
            if errno == EINTR || errno == EAGAIN { return 0 }
            throw XenError(call: "read(checkpoint stream)", errno: errno)
        }
        // SAFETY: read wrote n bytes into the scratch buffer.
        out.append(contentsOf: UnsafeRawBufferPointer(start: scratch, count: n))
        return n
    }
}

