import CXen
import Glibc
import RemusCore
import RemusSystem

/// A running Xen domain — PV, PVH or HVM (`kind`) — protected through libxenguest's
/// checkpointed save (`xc_domain_save(…, XCFLAGS_LIVE, callbacks, XC_STREAM_REMUS, …)`).
///
/// libxenguest owns memory and vCPU state and drives the checkpoint loop from its own thread;
/// remusd's shell drives the epochs. They meet in the save callbacks:
/// - `suspend` waits until the shell asks for a checkpoint (`suspend()`), then suspends the
///   domain as libxl would (`SuspendMethod`: the guest's suspend event channel, xenstore
///   `control/shutdown = suspend`, or for HVM without PV drivers `xc_domain_shutdown`) and
///   waits for SHUTDOWN_suspend; an HVM guest's device model then saves its state;
/// - libxenguest then writes the dirty pages and vCPU state into one end of a local socketpair
///   while the guest stays suspended; the shell reads the other end (`captureCheckpoint`) up to the
///   CHECKPOINT record, so the pause costs a local copy, never a network send;
/// - `postcopy` waits until the shell has closed the output epoch (`resume()`), then restarts
///   an HVM guest's device model and resumes the domain with `xc_domain_resume(…, 1)` (a
///   cancelled suspend: it keeps its devices);
/// - `checkpoint` returns at once: the guest runs while the shell ships the checkpoint;
/// - `switch_qemu_logdirty` (PVH and HVM only) turns the device model's log-dirty mode on at
///   the start and off at the end; a PVH guest has no device model and nothing to switch.
/// The stream bytes travel inside remusd's checkpoints; the libxl records around them (stream
/// header, LIBXC_CONTEXT, an HVM guest's emulator records, CHECKPOINT_END) are written here, as
/// libxl would write them.
///
/// `@unchecked Sendable`: the session is replaced only on the shell's loop thread, while no
/// other call is in progress; the session guards its own state.
public final class XenPrimaryGuest: StreamingGuest, @unchecked Sendable {
    public let descriptor: GuestDescriptor
    /// The protected domain.
    public let domid: UInt32
    /// PV, PVH or HVM.
    public let kind: XenGuestKind
    let log: XenLog
    let control: XenControl
    let light: XenLight
    private var session: SaveSession?
    /// An HVM guest's device model, opened with the domain (so that one that does not answer
    /// refuses protection before anything is set up) and handed to the first save.
    private var openedDeviceModel: (any XenDeviceModel)?
    /// Paused by `suspend()` outside a checkpoint (self-fencing), to be unpaused by `resume()`.
    private var pausedOutsideCheckpoint = false
    /// How long the guest may take to suspend, and libxenguest to write a checkpoint.
    let deadlineNs: UInt64
    /// The guest's disks remusd serves and replicates (`--xen-disk`); set before protection starts.
    public var replicatedDisks: (any GuestDisks)?
    public var disks: (any GuestDisks)? { replicatedDisks }

    /// Opens the domain named `domain` and tells its kind. Throws, before anything changes on
    /// the domain, when it does not exist, is going away, or cannot be checkpointed on this
    /// hypervisor (a PV guest without shadow paging, see `XenPagingSupport`).
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
        guard !info.isDying, !info.isShutDown else {
            throw XenBackendError("domain '\(domain)' (id \(id)) is shutting down or dying; nothing was changed")
        }
        let libxlType: (type: libxl_domain_type, deviceModel: libxl_device_model_version)
        do {
            libxlType = try light.domainType(domid: id)
        } catch {
            throw XenBackendError("libxl does not know domain '\(domain)' (id \(id)): \(error); remusd protects domains that xl/libxl created. Nothing was changed")
        }
        kind = try XenGuestKind.classify(domain: domain, hvmContainer: info.isHVM, configType: libxlType.type, deviceModel: libxlType.deviceModel)
        let paging = XenPagingSupport(capabilities: try control.physicalCapabilities())
        log.note("\(kind) guest; hypervisor paging: shadow \(paging.shadow ? "yes" : "no"), HAP \(paging.hap ? "yes" : "no")", domid: id)
        if let refusal = paging.refusal(kind: kind, domain: domain, version: try control.version()) { throw refusal }
        if kind == .hvm {
            log.note("opening the device model (QMP)", domid: id)
            openedDeviceModel = try openDeviceModel(domid: id, log: log, deadlineNs: deadlineNs)
        }
        domid = id
        descriptor = GuestDescriptor(name: domain, uuid: info.uuid, backend: .xen, pageSize: 4096, pageCount: max(1, info.maxPages))
    }

    /// Waits until a domain named `domain` has been created and has booted far enough to be
    /// checkpointed, polling every 100 ms until `deadlineNs` (monotonic); returns whether it
    /// has. Created: libxl keeps its configuration and the domain has been unpaused, as `xl
    /// create` ends (before that the name exists while libxl still adds its devices; a domain
    /// created paused, `xl create -p`, counts once unpaused). Booted, for PV and PVH guests:
    /// every PV device frontend it has is Connected (xenstore state 4): its kernel runs its
    /// drivers, so it answers a suspend, and a PV kernel has published its page frame lists
    /// (before, libxenguest refuses the save: "Bad mfn 0 for p2m frame list list").
    public static func waitForDomain(named domain: String, log: XenLog, untilMonotonic deadlineNs: UInt64) throws -> Bool {
        let light = try XenLight(log: log)
        let control = try XenControl(log: log)
        let store = try XenStoreConnection(log: log)
        while true {
            if let id = light.domid(named: domain), let info = XenDomainInfo.read(control, domid: id),
               !info.isPaused, let type = try? light.domainType(domid: id).type {
                if type == LIBXL_DOMAIN_TYPE_HVM || frontendsConnected(domid: id, store: store) { return true }
            }
            if monotonicNanoseconds() >= deadlineNs { return false }
            sleepNanoseconds(100_000_000)
        }
    }

    /// Whether every PV device frontend of the domain (`/local/domain/<id>/device/<class>/<n>/state`)
    /// is Connected (XenbusStateConnected, 4).
    static func frontendsConnected(domid: UInt32, store: XenStoreConnection) -> Bool {
        let root = "/local/domain/\(domid)/device"
        for kind in store.directory(root) ?? [] {
            // Entries without a state (device/suspend/event-channel) are no frontends.
            for device in store.directory(root + "/" + kind) ?? [] {
                if let state = store.read(root + "/" + kind + "/" + device + "/state"), state != "4" { return false }
            }
        }
        return true
    }

    /// Tells whether a domain named `domain` exists (any state), for as long as the returned
    /// closure is kept.
    public static func existence(of domain: String, log: XenLog) throws -> () -> Bool {
        let light = try XenLight(log: log)
        return { light.domid(named: domain) != nil }
    }

    /// E.g. `'guest' (PVH, 128 MiB)`: what is protected, for the log and status.
    public var summary: String { Self.summary(of: descriptor, kind: kind) }

    /// E.g. `'guest' (PVH, 128 MiB)` for a guest of 32768 pages of 4 KiB.
    static func summary(of guest: GuestDescriptor, kind: XenGuestKind) -> String {
        "'\(guest.name)' (\(kind), \((guest.pageCount * UInt64(guest.pageSize)) >> 20) MiB)"
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
        let deviceModel = openedDeviceModel
        openedDeviceModel = nil
        session = try SaveSession(domid: domid, kind: kind, deviceModel: deviceModel, log: log, deadlineNs: deadlineNs)
    }

    public func nextLiveBytes(maxBytes: Int) throws -> [UInt8]? {
        guard let session else { throw XenBackendError("no checkpointed save is running") }
        return try session.readLive(maxBytes: maxBytes)
    }

    public func suspend() throws {
        if let session, session.isUsable {
            do {
                try session.suspendForCheckpoint()
            } catch {
                // Nothing half-done: the save ends, which restarts a device model it stopped and
                // resumes a guest it left suspended.
                session.end(control: control)
                throw error
            }
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
    let kind: XenGuestKind
    let log: XenLog
    let deadlineNs: UInt64
    /// The save thread's own interfaces (libxenguest uses its interface throughout the save).
    private let control: XenControl
    private let store: XenStoreConnection
    private let events: XenEventChannels
    /// The guest's suspend event channel, bound on `events`, when it offers one.
    private var suspendChannel: XenSuspendChannel?
    /// An HVM guest's device model (nil for PV and PVH).
    private let deviceModel: CheckpointDeviceModel?
    /// The way the last suspend went (logged when it changes; save thread only).
    private var suspendMethod: SuspendMethod?
    /// The guest's `HVM_PARAM_CALLBACK_IRQ` at the last suspend (logged when it changes; save
    /// thread only).
    private var callbackIRQ: UInt64?
    /// Whether remusd has marked a suspend cancelled itself yet (logged once; save thread only).
    private var markedCancelled = false
    private let readFd: Int32
    private let writeFd: Int32
    private let callbacks: UnsafeMutablePointer<save_callbacks>
    private var framer = LibxcStreamFramer()
    /// Bytes read past the last CHECKPOINT record (belong to the next checkpoint).
    private var carry: [UInt8] = []
    private var preambleSent = false
    /// Where reads land before they are appended (allocated once: nothing per read).
    private static let scratchBytes = 1 << 20
    /// Most bytes of the live phase read into one piece. Each piece is a pre-copy round of its
    /// own, verified, committed and queued on the backup as one: larger pieces mean fewer of
    /// those hand-overs (129 MiB went as 138 pieces of at most 1 MiB before).
    private static let livePieceBytes = 4 << 20
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
    /// The device model's records of the checkpoint being taken, for `readCheckpoint`.
    private var emulatorRecords: [UInt8] = []

    /// Sets the save up and starts it; an HVM guest's device model is `deviceModel`, or opened
    /// here when nil. Throws, with the guest untouched, when the device model does not answer,
    /// the suspend event channel cannot be bound, or the guest sleeps.
    init(domid: UInt32, kind: XenGuestKind, deviceModel opened: (any XenDeviceModel)?, log: XenLog, deadlineNs: UInt64) throws {
        self.domid = domid
        self.kind = kind
        self.log = log
        self.deadlineNs = deadlineNs
        control = try XenControl(log: log)
        store = try XenStoreConnection(log: log)
        events = try XenEventChannels(log: log)
        if kind == .hvm {
            let model: any XenDeviceModel
            if let opened {
                model = opened
            } else {
                log.note("opening the device model (QMP)", domid: domid)
                model = try openDeviceModel(domid: domid, log: log, deadlineNs: deadlineNs)
            }
            deviceModel = CheckpointDeviceModel(model, domid: domid)
        } else {
            deviceModel = nil
        }
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw XenError(call: "socketpair", errno: errno)
        }
        readFd = fds[0]
        writeFd = fds[1]
        // Room for a checkpoint's pages in flight while the reader ships the previous bytes, so
        // that libxenguest and the shipping overlap. SO_SNDBUF alone is capped at
        // net.core.wmem_max (208 KiB by default); the FORCE variants (CAP_NET_ADMIN, which remusd
        // has in dom0) are not, and a Unix stream socket queues by its sender's buffer.
        var size: Int32 = 8 << 20
        let length = socklen_t(Swift.MemoryLayout<Int32>.size)
        if setsockopt(writeFd, SOL_SOCKET, SO_SNDBUFFORCE, &size, length) != 0 {
            setsockopt(writeFd, SOL_SOCKET, SO_SNDBUF, &size, length)
        }
        if setsockopt(readFd, SOL_SOCKET, SO_RCVBUFFORCE, &size, length) != 0 {
            setsockopt(readFd, SOL_SOCKET, SO_RCVBUF, &size, length)
        }
        callbacks = .allocate(capacity: 1)
        callbacks.initialize(to: save_callbacks())
        callbacks.pointee.suspend = { data in SaveSession.from(data).suspendCallback() }
        callbacks.pointee.postcopy = { data in SaveSession.from(data).postcopyCallback() }
        callbacks.pointee.checkpoint = { data in SaveSession.from(data).checkpointCallback() }
        // libxenguest calls it for HVM containers (PVH and HVM) and fails the save without it.
        callbacks.pointee.switch_qemu_logdirty = { _, enable, data in SaveSession.from(data).switchLogDirtyCallback(enable != 0) }
        // The session outlives the save thread: `end` waits for it before anything is freed.
        callbacks.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        do {
            try prepareSuspend()
        } catch {
            close(writeFd)
            throw error
        }
        startThread(name: "xen-save") { [self] in run() }
    }

    /// Binds the guest's suspend event channel when it offers one, and chooses the way it is
    /// suspended; refuses a sleeping guest before its save starts.
    private func prepareSuspend() throws {
        let offered = SuspendMethod.guestPort(xenstoreValue: store.read("/local/domain/\(domid)/device/suspend/event-channel"))
        if let port = offered {
            do {
                suspendChannel = try XenSuspendChannel(control: control, events: events, domid: domid, guestPort: port)
                log.note("suspend event channel: guest port \(port) bound", domid: domid)
            } catch {
                throw XenBackendError("domain \(domid) offers suspend event channel \(port), but binding it failed: \(error). Nothing was changed; if another toolstack process (xl save, migrate or remus) works on this domain, it holds /var/run/xen/suspend-evtchn-\(domid).lock: let it finish first")
            }
        }
        // A sleeping guest is refused now, before its checkpointed save starts.
        let method = try currentSuspendMethod()
        suspendMethod = method
        log.note("suspend: \(method)", domid: domid, level: .info)
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
        var failure = suspendDomain()
        if failure == nil, let deviceModel {
            // libxl's order: the vCPUs are suspended, then the device model stops and saves.
            log.note("device model: saving its state", domid: domid)
            switch deviceModel.capture() {
            case .success(let records): monitor.withLock { emulatorRecords = records }
            case .failure(let error): failure = error.description
            }
        }
        finish(\.suspendPoint, failure: failure)
        return failure == nil ? 1 : 0
    }

    private func postcopyCallback() -> Int32 {
        guard arrive(at: \.resumePoint) else { return 0 }
        // libxl's order (libxl__domain_resume): the device model continues first, so that the
        // vCPUs never run against a stopped one; the vCPUs resume even if it does not.
        let deviceModelFailure = deviceModel?.resume()
        var failure = markCancelledIfLibxcWillNot()
        if failure == nil {
            let rc = cxen_xc_domain_resume(control.handle, domid, 1)
            let code = errno
            failure = rc == 0 ? deviceModelFailure : "xc_domain_resume(\(domid), fast) failed: \(String(cString: strerror(code)))"
        }
        // libxl's last step (domain_resume_done): xenstored forgets the shutdown it saw, so its
        // next one fires @releaseDomain again for whoever watches (remusd polls Xen instead).
        if failure == nil && !cxen_xs_resume_domain(store.handle, domid) {
            log.note("xs_resume_domain(\(domid)) failed: \(String(cString: strerror(errno)))", domid: domid, level: .warn)
        }
        log.note("resumed" + (failure.map { ": \($0)" } ?? ""), domid: domid)
        finish(\.resumePoint, failure: failure)
        return failure == nil ? 1 : 0
    }

    /// Sets vCPU0's RAX to 1 (the suspend hypercall's "cancelled") where libxc's fast resume
    /// would leave it 0 (`SuspendMethod.mustMarkCancelled`), as libxc itself does for PV guests.
    /// Returns why it failed (the guest then stays suspended and the save ends), nil otherwise.
    private func markCancelledIfLibxcWillNot() -> String? {
        guard let method = suspendMethod,
              SuspendMethod.mustMarkCancelled(kind: kind, method: method, callbackIRQ: callbackIRQ ?? 0) else { return nil }
        var context = vcpu_guest_context_any_t()
        guard cxen_xc_vcpu_getcontext(control.handle, domid, 0, &context) == 0 else {
            return "xc_vcpu_getcontext(\(domid), vCPU 0) failed: \(String(cString: strerror(errno))); the guest stays suspended"
        }
        context.c.user_regs.rax = 1
        guard cxen_xc_vcpu_setcontext(control.handle, domid, 0, &context) == 0 else {
            return "xc_vcpu_setcontext(\(domid), vCPU 0) failed: \(String(cString: strerror(errno))); the guest stays suspended"
        }
        if !markedCancelled {
            markedCancelled = true
            log.note("HVM_PARAM_CALLBACK_IRQ is 0: remusd marks each suspend cancelled itself (vCPU0 RAX = 1), which libxc's fast resume does not for this guest", domid: domid, level: .info)
        }
        return nil
    }

    /// libxenguest's `switch_qemu_logdirty`: on when the save starts, off when it ends. A PVH
    /// guest has no device model: nothing to switch. Non-zero fails the save.
    private func switchLogDirtyCallback(_ enable: Bool) -> Int32 {
        guard let deviceModel else { return 0 }
        log.note("device model: log-dirty \(enable ? "on" : "off")", domid: domid)
        guard let failure = deviceModel.setLogDirty(enable) else { return 0 }
        log.note(failure, domid: domid, level: .error)
        monitor.withLock {
            if self.failure == nil && !aborting { self.failure = failure + "; nothing was checkpointed with it, the guest runs on here" }
            monitor.broadcast()
        }
        return -1
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

    /// The way to suspend the guest now (its HVM parameters can change while it runs).
    private func currentSuspendMethod() throws(XenBackendError) -> SuspendMethod {
        var callbackIRQ: UInt64 = 0, acpiSState: UInt64 = 0
        if kind != .pv {
            // As libxl: a parameter Xen does not return counts as 0.
            callbackIRQ = control.hvmParameter(domid: domid, HVM_PARAM_CALLBACK_IRQ) ?? 0
            acpiSState = control.hvmParameter(domid: domid, HVM_PARAM_ACPI_S_STATE) ?? 0
            if self.callbackIRQ != callbackIRQ {
                log.note("HVM_PARAM_CALLBACK_IRQ \(callbackIRQ)", domid: domid, level: .info)
                self.callbackIRQ = callbackIRQ
            }
        }
        return try SuspendMethod.choose(domid: domid, kind: kind, evtchnPort: suspendChannel?.guestPort,
                                        callbackIRQ: callbackIRQ, acpiSState: acpiSState)
    }

    /// Asks the guest to suspend and waits until Xen shows it shut down for a suspend. Returns
    /// why it failed, nil on success.
    private func suspendDomain() -> String? {
        let method: SuspendMethod
        do {
            method = try currentSuspendMethod()
        } catch {
            return error.description
        }
        if method != suspendMethod {
            log.note("suspend: \(method)", domid: domid, level: .info)
            suspendMethod = method
        }
        log.note("suspending (\(method))", domid: domid)
        let path = "/local/domain/\(domid)/control/shutdown"
        switch method {
        case .eventChannel(let port):
            do {
                try suspendChannel?.notify()
            } catch {
                return "notifying domain \(domid)'s suspend event channel \(port) failed: \(error)"
            }
        case .xenstore:
            guard cxen_xs_write(store.handle, xs_transaction_t(XBT_NULL), path, "suspend", 7) else {
                return "writing 'suspend' to \(path) failed: \(String(cString: strerror(errno)))"
            }
        case .shutdownHypercall:
            guard cxen_xc_domain_shutdown(control.handle, domid, SHUTDOWN_suspend) == 0 else {
                return "xc_domain_shutdown(\(domid), SHUTDOWN_suspend) failed: \(String(cString: strerror(errno)))"
            }
        }
        let deadline = monotonicNanoseconds() + deadlineNs
        var waitNs = 50_000
        while monotonicNanoseconds() < deadline {
            guard let info = XenDomainInfo.read(control, domid: domid) else { return "domain \(domid) disappeared while suspending" }
            if info.isSuspended {
                log.note("suspended", domid: domid)
                return nil
            }
            if info.isShutDown || info.isDying { return "domain \(domid) shut down (reason \(info.shutdownReason)) instead of suspending" }
            if let suspendChannel {
                // Xen signals the bound channel when the domain has suspended: wait for that,
                // a few milliseconds at a time, and look at the domain's state again.
                _ = suspendChannel.drain(waitMs: 5)
            } else {
                // A poll of Xen's domain state, bounded by the deadline, backing off to 2 ms so
                // it does not take the CPU the guest needs to suspend.
                var pause = timespec(tv_sec: 0, tv_nsec: waitNs)
                nanosleep(&pause, nil)
                waitNs = min(waitNs * 2, 2_000_000)
            }
        }
        let seconds = deadlineNs / 1_000_000_000
        switch method {
        case .eventChannel(let port):
            return "domain \(domid) did not suspend within \(seconds) s of the notification on its suspend event channel \(port)"
        case .xenstore:
            if store.read(path) == "suspend" {
                // Never taken up: withdraw it, so that a late guest does not suspend with nobody to resume it.
                _ = cxen_xs_write(store.handle, xs_transaction_t(XBT_NULL), path, "", 0)
                return "domain \(domid) did not take up the xenstore suspend request within \(seconds) s (its kernel needs Xen PV suspend support); the request was withdrawn"
            }
            return "domain \(domid) took up the xenstore suspend request but did not suspend within \(seconds) s"
        case .shutdownHypercall:
            return "Xen did not show domain \(domid) suspended within \(seconds) s of xc_domain_shutdown(SHUTDOWN_suspend)"
        }
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
        var prefix: [UInt8] = []
        if !preambleSent {
            preambleSent = true
            prefix = LibxlStream.preamble
        }
        let waiting = monitor.withLock { suspendPoint.waiting }
        let start = prefix.count
        // Straight into the array that is shipped: the live phase is the whole guest's memory.
        let (out, n) = try readFresh(after: prefix, max: min(maxBytes, Self.livePieceBytes), waitMs: waiting ? 0 : 100)
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
    /// record, and returns them followed by the device model's records (HVM) and libxl's
    /// CHECKPOINT_END.
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
                let records = monitor.withLock { () -> [UInt8] in
                    defer { emulatorRecords = [] }
                    return emulatorRecords
                }
                LibxlStream.endCheckpoint(&out, emulatorRecords: records)
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
        let threadDone = monitor.withLock { () -> Bool in
            while !finished && monotonicNanoseconds() < deadline { monitor.wait(untilMonotonic: deadline) }
            return finished
        }
        guard resumeGuest else { return }
        // Only once the save thread is gone: the device model is the save thread's until then.
        if threadDone, let deviceModel, let failure = deviceModel.resume() { log.note(failure, domid: domid, level: .error) }
        if let info = XenDomainInfo.read(shell, domid: domid), info.isSuspended {
            // Suspended for a checkpoint that will not be completed: a cancelled suspend.
            _ = cxen_xc_domain_resume(shell.handle, domid, 1)
            log.note("resumed after the checkpointed save ended", domid: domid)
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

    /// Reads what is available (waiting up to `waitMs` for something, then reading on while
    /// more is there at once, up to `max`) into a new array after `prefix`, with no copy on the
    /// way; returns it and the bytes read (0 when nothing came).
    private func readFresh(after prefix: [UInt8], max: Int, waitMs: Int32) throws -> ([UInt8], Int) {
        var p = pollfd(fd: readFd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&p, 1, waitMs)
        if ready < 0 && errno != EINTR { throw XenError(call: "poll(checkpoint stream)", errno: errno) }
        guard ready > 0 else { return (prefix, 0) }
        var failure: Int32 = 0
        var n = 0
        let out = [UInt8](unsafeUninitializedCapacity: prefix.count + max) { buffer, count in
            // SAFETY: the capacity holds the prefix and then `max` bytes for read to fill.
            let base = buffer.baseAddress!
            prefix.withUnsafeBufferPointer { base.update(from: $0.baseAddress!, count: prefix.count) }
            while n < max {
                if n > 0 {
                    // Only what is there now: the piece goes out as soon as the stream pauses.
                    var more = pollfd(fd: readFd, events: Int16(POLLIN), revents: 0)
                    guard poll(&more, 1, 0) > 0 else { break }
                }
                let got = read(readFd, base + prefix.count + n, max - n)
                if got < 0 { failure = errno }
                guard got > 0 else { break }
                n += got
            }
            count = prefix.count + n
        }
        // A failure after bytes were read shows at the next read; these bytes go out first.
        if n > 0 { failure = 0 }
        if failure != 0 && failure != EINTR && failure != EAGAIN { throw XenError(call: "read(checkpoint stream)", errno: failure) }
        return (out, n)
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

