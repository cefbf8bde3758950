// The contract between the engine's shell and a hypervisor backend. The engine never knows which
// hypervisor it drives; a backend never knows about sockets or epochs beyond the numbers it is given.

/// A guest as the replicator sees it.
public struct GuestDescriptor: Equatable, Sendable {
    public var name: String
    public var uuid: GuestUUID
    public var backend: BackendKind
    /// Page size in bytes.
    public var pageSize: Int
    /// Number of guest-physical page frames (highest PFN + 1) the guest may ever populate.
    public var pageCount: UInt64
    public init(name: String, uuid: GuestUUID, backend: BackendKind, pageSize: Int, pageCount: UInt64) {
        self.name = name
        self.uuid = uuid
        self.backend = backend
        self.pageSize = pageSize
        self.pageCount = pageCount
    }
}

/// Readings of the host's clocks, injected so that Core never reads a clock itself.
public protocol HostClock: Sendable {
    /// Monotonic time in nanoseconds (CLOCK_MONOTONIC on Linux).
    func monotonicNs() -> UInt64
    /// Wall time in nanoseconds since the Unix epoch.
    func wallNs() -> Int64
}

/// Everything about a guest except its memory, captured while it is suspended.
public struct GuestState: Equatable, Sendable {
    public var vcpus: [VCPUState]
    public var devices: [DeviceState]
    public var clock: ClockState
    public var layout: MemoryLayout
    /// The hypervisor library's own migration stream for this checkpoint, for backends whose
    /// library captures the guest itself (Xen: libxl v2 framing around libxenguest's records);
    /// travels as OPAQUE_PAYLOAD records inside the checkpoint. Empty for the simulated guest.
    public var stream: [UInt8]
    public init(vcpus: [VCPUState], devices: [DeviceState], clock: ClockState, layout: MemoryLayout, stream: [UInt8] = []) {
        self.vcpus = vcpus
        self.devices = devices
        self.clock = clock
        self.layout = layout
        self.stream = stream
    }
}

/// The primary side of a backend: a running guest that can be suspended and captured.
///
/// Calls come from one thread at a time (the runtime's capture thread); the guest's own vCPUs run
/// on threads of the backend's.
public protocol PrimaryGuest: AnyObject {
    var descriptor: GuestDescriptor { get }
    /// How to build this guest on the backup; sent before the first checkpoint.
    func domainConfig() throws -> DomainConfig
    /// Starts dirty logging. Every populated page counts as dirty at the first harvest.
    func startDirtyLogging() throws
    /// Stops every vCPU at a safe point and returns once all have stopped.
    func suspend() throws
    /// Lets the vCPUs run again.
    func resume() throws
    /// ORs the pages dirtied since the last harvest into `bitmap` and clears the backend's log.
    func harvestDirty(into bitmap: inout DirtyBitmap) throws
    /// Copies every page set in `bitmap` into `arena` (raw, or absent when not populated), in
    /// ascending PFN order. Allocates nothing per page.
    func capturePages(_ bitmap: borrowing DirtyBitmap, into arena: StagingArena) throws
    /// vCPU, device, clock and layout state. The guest must be suspended.
    func captureState(clock: any HostClock) throws -> GuestState
    /// Runs the guest at `percent` (1…100) of its speed: the throttle policy for guests that
    /// dirty memory faster than they can be protected (Xen: the credit scheduler's cap).
    func setSpeed(percent: Int) throws
    /// The guest was handed over to the backup (planned switchover): stop it here for good.
    func stop() throws
    /// Whether the guest no longer exists on this host (destroyed or crashed under us), asked
    /// after a capture failed: then the backup must take over.
    var hasVanished: Bool { get }
}

extension PrimaryGuest {
    /// A guest that lives inside this process cannot vanish on its own.
    public var hasVanished: Bool { false }
}

/// A primary whose hypervisor library writes its own migration stream (Xen's libxenguest):
/// pages and vCPU state arrive as that stream's bytes instead of through `capturePages`, and a
/// checkpoint's bytes come back in `GuestState.stream`.
public protocol StreamingPrimaryGuest: PrimaryGuest {
    /// The live phase before the first checkpoint: the next bytes of the library's stream, at
    /// most `maxBytes`, waiting until there are some; empty when none came within a short wait
    /// (so the caller can look around); nil once the live phase is over and the library waits
    /// to suspend the guest for the first checkpoint.
    func nextLiveBytes(maxBytes: Int) throws -> [UInt8]?
}

/// A replica built by the hypervisor library from its own stream (Xen: libxl's checkpointed
/// restore): committed checkpoints hand over their `GuestState.stream` bytes, in order.
public protocol StreamingReplicaTarget: ReplicaTarget {
    /// Takes the stream bytes of a verified pre-copy chunk (`checkpoint` false) or of a
    /// complete, verified checkpoint (`checkpoint` true). Called in stream order.
    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws
}

/// The backup side of a backend: receives committed checkpoints and can resume the guest.
public protocol ReplicaTarget: AnyObject {
    /// Builds (or checks) the replica from the primary's DOMAIN_CONFIG and stream header.
    func configure(header: StreamHeader, config: DomainConfig) throws
    /// Runs `body` on the current content of a page (the base for a delta-encoded page), or on nil
    /// when the page is not populated or the replica holds no image (unconfigured, activated,
    /// discarded). The view is valid only inside `body`: the replica is neither changed, activated
    /// nor discarded (freed) until `body` returns, whichever thread asks for that. Keep `body` short
    /// (a copy of one page).
    func withCommittedPage<R>(_ pfn: PFN, _ body: (UnsafeRawBufferPointer?) throws -> R) rethrows -> R
    /// Applies one verified, complete checkpoint whose pages span `arenas`, in order (pages decoded
    /// to raw, zero or absent; PFNs ascending across the arenas). All or nothing, and atomic with
    /// respect to `activate`: the replica is at the previous checkpoint or at this one, never in
    /// between; a checkpoint rejected in any of its arenas leaves the previous one intact.
    /// `state` is nil for pre-copy rounds, which carry pages only.
    func commit(_ arenas: [StagingArena], state: GuestState?) throws
    /// Resumes the guest from the last committed checkpoint.
    func activate(clock: any HostClock) throws
    /// Throws the replica away (planned stop). Waits for a `withCommittedPage` in progress.
    func discard()
}

extension ReplicaTarget {
    /// Applies a checkpoint whose pages fit one arena (see `commit(_:state:)` for several).
    public func commit(_ pages: StagingArena, state: GuestState?) throws {
        try commit([pages], state: state)
    }
}
