import CXen
import Glibc

/// How a guest is asked to suspend for a checkpoint: libxl's choice
/// (libxl_dom_suspend.c, `domain_suspend_callback_common`), made again before every suspend
/// because an HVM guest's PV drivers may come and go.
enum SuspendMethod: Equatable, Sendable, CustomStringConvertible {
    /// The guest's own suspend event channel (`device/suspend/event-channel` in its xenstore
    /// directory, port `guestPort` on its side): one notification, no xenstore round trips.
    case eventChannel(guestPort: Int32)
    /// xenstore `control/shutdown = "suspend"`, which the guest's PV drivers watch.
    case xenstore
    /// `xc_domain_shutdown(SHUTDOWN_suspend)`: an HVM guest without PV drivers, which cannot
    /// be asked; Xen stops its vCPUs where they are.
    case shutdownHypercall

    /// How the log names it, e.g. `"event channel 5"`.
    var description: String {
        switch self {
        case .eventChannel(let port): "event channel \(port)"
        case .xenstore: "xenstore control/shutdown"
        case .shutdownHypercall: "xc_domain_shutdown (no PV drivers)"
        }
    }

    /// The method for a guest of `kind` offering suspend event channel `evtchnPort` (nil: none),
    /// with HVM parameters `callbackIRQ` (`HVM_PARAM_CALLBACK_IRQ`, 0 when no PV drivers
    /// registered a callback) and `acpiSState` (`HVM_PARAM_ACPI_S_STATE`, non-zero while the
    /// guest sleeps in ACPI S3/S4); both are 0 for PV guests, which have neither.
    ///
    /// libxl's order: the event channel unless the guest sleeps; an HVM guest without PV drivers
    /// through the hypervisor; everyone else through xenstore. Where libxl would suspend a
    /// sleeping guest through the hypervisor, this throws: its state is the firmware's, not a
    /// running kernel's, and it would not answer afterwards either.
    static func choose(domid: UInt32, kind: XenGuestKind, evtchnPort: Int32?, callbackIRQ: UInt64,
                       acpiSState: UInt64) throws(XenBackendError) -> SuspendMethod {
        guard kind == .pv || acpiSState == 0 else {
            throw XenBackendError("domain \(domid) is asleep (ACPI S\(acpiSState)), so it cannot be checkpointed: this checkpoint is abandoned and the guest stays as it was. Wake it ('xl trigger \(domid) power' or its own wake-up event) and protection can go on")
        }
        if let evtchnPort { return .eventChannel(guestPort: evtchnPort) }
        if kind == .hvm && callbackIRQ == 0 { return .shutdownHypercall }
        return .xenstore
    }

    /// Whether remusd itself must make the guest see this suspend as cancelled (vCPU0's RAX = 1,
    /// the `SCHEDOP_shutdown` return value a guest reads as "resumed in the same domain") before
    /// `xc_domain_resume(…, fast)`, which libxc does only where it can tell the guest has PV
    /// drivers: for PV always, for an HVM container only when `HVM_PARAM_CALLBACK_IRQ` is
    /// non-zero (`modify_returncode`, tools/libs/guest/xg_resume.c). A guest notified through
    /// per-vCPU upcall vectors need not set that parameter (Linux 6.0 and later set it to 1 for
    /// the toolstack's sake; nothing obliges other kernels to); after a cooperative suspend it is inside the hypercall all the same and
    /// would otherwise take the checkpoint for a migration, rebinding every event channel and
    /// reconnecting every device in a domain where they are all still there. After
    /// `xc_domain_shutdown(SHUTDOWN_suspend)` the guest made no hypercall: its RAX is its own.
    static func mustMarkCancelled(kind: XenGuestKind, method: SuspendMethod, callbackIRQ: UInt64) -> Bool {
        guard kind != .pv && callbackIRQ == 0 else { return false }
        switch method {
        case .eventChannel, .xenstore: return true
        case .shutdownHypercall: return false
        }
    }

    /// The guest's suspend event channel port from the value of its
    /// `device/suspend/event-channel` key (nil when the key is missing): a positive port number,
    /// as `xs_suspend_evtchn_port` reads it; anything else counts as none.
    static func guestPort(xenstoreValue value: String?) -> Int32? {
        guard let value else { return nil }
        let blank: (Character) -> Bool = { $0.isWhitespace || $0 == "\0" }
        let trimmed = String(value.drop(while: blank).reversed().drop(while: blank).reversed())
        guard let port = Int32(trimmed), port > 0 else { return nil }
        return port
    }
}

/// The guest's suspend event channel, bound on this side (`xc_suspend_evtchn_init_sane`: the
/// per-domain lock file /var/run/xen/suspend-evtchn-<domid>.lock, the interdomain binding, and
/// Xen's notification on it when the domain has suspended). Released in deinit.
///
/// Used by one thread at a time (the save thread, once set up).
final class XenSuspendChannel {
    /// The domain whose channel this is.
    let domid: UInt32
    /// The guest's port (what the log names).
    let guestPort: Int32
    /// Our end of the binding.
    let localPort: UInt32
    private let control: XenControl
    private let events: XenEventChannels
    private var lockFd: Int32 = -1

    /// Binds the guest's port `guestPort` through `events`, a handle of the caller's own.
    /// Throws when the lock is held (another toolstack process suspends this domain) or the
    /// binding fails; nothing is held then.
    init(control: XenControl, events: XenEventChannels, domid: UInt32, guestPort: Int32) throws(XenError) {
        self.domid = domid
        self.guestPort = guestPort
        self.control = control
        self.events = events
        var lock: Int32 = -1
        // libxl binds with xc_suspend_evtchn_init_exclusive, which then blocks in
        // xc_await_suspend for the event pending since the binding; the _sane variant and the
        // bounded drain below do the same without an unbounded wait.
        let port = try control.log.check("xc_suspend_evtchn_init_sane(\(domid), port \(guestPort))",
                                         { cxen_xc_suspend_evtchn_init_sane(control.handle, events.handle, domid, guestPort, &lock) },
                                         failed: { $0 < 0 })
        localPort = UInt32(port)
        lockFd = lock
        _ = drain(waitMs: 100)
    }

    deinit {
        _ = cxen_xc_suspend_evtchn_release(control.handle, events.handle, domid, Int32(localPort), &lockFd)
    }

    /// Asks the guest to suspend.
    func notify() throws(XenError) {
        _ = try control.log.check("xenevtchn_notify(\(domid), port \(localPort))",
                                  { cxen_xenevtchn_notify(events.handle, localPort) }, failed: { $0 < 0 })
    }

    /// Waits up to `waitMs` for an event on the handle and consumes it (unmasking our port, so
    /// the next one arrives); true when our port fired. Never blocks longer than `waitMs`.
    func drain(waitMs: Int32) -> Bool {
        var p = pollfd(fd: cxen_xenevtchn_fd(events.handle), events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, waitMs) > 0 else { return false }
        let fired = cxen_xenevtchn_pending(events.handle)
        guard fired >= 0 else { return false }
        _ = cxen_xenevtchn_unmask(events.handle, UInt32(fired))
        return UInt32(fired) == localPort
    }
}
