/// Where one pause went: the three parts an operator can act on separately. All in nanoseconds.
///
/// - suspend: from asking the guest to stop until all its vCPUs stopped (the simulated guest's
///   vCPU threads reaching a safe point; Xen: the suspend callback — event channel or xenstore,
///   waiting for SHUTDOWN_suspend, an HVM device model saving its state);
/// - capture: harvest and copy of the dirty pages and the state, and closing the output epoch
///   (Xen: reading xc_domain_save's checkpoint records off the local socketpair);
/// - resume: from asking the guest to run again until it does (Xen: `xc_domain_resume`, an HVM
///   device model continuing).
public struct PauseSplit: Equatable, Sendable {
    public var suspendNs: UInt64
    public var captureNs: UInt64
    public var resumeNs: UInt64
    /// The whole pause: what the guest felt.
    public var totalNs: UInt64 { suspendNs + captureNs + resumeNs }

    public init(suspendNs: UInt64, captureNs: UInt64, resumeNs: UInt64) {
        self.suspendNs = suspendNs
        self.captureNs = captureNs
        self.resumeNs = resumeNs
    }
}

/// Reads the injected clock at the pause's boundaries and splits it (`PauseSplit`). A boundary
/// never reached (a capture that failed half-way) counts as reached at the next one read, so the
/// parts always add up to the whole pause.
public struct PauseStopwatch {
    private let clock: any HostClock
    /// When the pause began: the suspend was asked for.
    public let startNs: UInt64
    private var suspendedNs: UInt64?
    private var capturedNs: UInt64?

    /// Starts timing a pause now (just before the suspend call).
    public init(clock: any HostClock) {
        self.clock = clock
        startNs = clock.monotonicNs()
    }

    /// The guest is suspended (the suspend call returned).
    public mutating func suspended() { suspendedNs = clock.monotonicNs() }

    /// The checkpoint is captured (pages, state, the output epoch closed).
    public mutating func captured() { capturedNs = clock.monotonicNs() }

    /// The guest runs again (the resume call returned, or the guest stays suspended for good);
    /// returns the split.
    public func resumed() -> PauseSplit {
        let end = clock.monotonicNs()
        let captured = capturedNs ?? end
        let suspended = min(suspendedNs ?? captured, captured)
        return PauseSplit(suspendNs: suspended - startNs, captureNs: captured - suspended, resumeNs: end - captured)
    }
}
