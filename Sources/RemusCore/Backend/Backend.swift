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
    /// The epoch's disk operations (`GuestDisks.sealEpoch`), in order; travel as DISK_WRITE and
    /// DISK_COMMAND records inside the checkpoint. Empty for a guest without replicated disks.
    public var disks: DiskOperations
    public init(vcpus: [VCPUState], devices: [DeviceState], clock: ClockState, layout: MemoryLayout, stream: [UInt8] = [],
                disks: DiskOperations = DiskOperations()) {
        self.vcpus = vcpus
        self.devices = devices
        self.clock = clock
        self.layout = layout
        self.stream = stream
        self.disks = disks
    }
}

/// The primary side of a backend: a running guest that can be suspended, resumed, throttled and
/// stopped. How its memory and vCPUs reach the backup is its `captureMode`: remusd copies its
/// pages itself (`PageCapturingGuest`), or the hypervisor library writes its own migration stream
/// (`StreamingGuest`). A backend conforms to exactly one of the two.
///
/// Calls come from one thread at a time (the runtime's loop thread, and its writer thread during
/// pre-copy, never both at once); the guest's own vCPUs run on threads of the backend's.
public protocol PrimaryGuest: AnyObject, Sendable {
    var descriptor: GuestDescriptor { get }
    /// How this guest is captured; the same value for the guest's whole life.
    var captureMode: CaptureMode { get }
    /// How to build this guest on the backup; sent before the first checkpoint.
    func domainConfig() throws -> DomainConfig
    /// Stops every vCPU at a safe point and returns once all have stopped.
    func suspend() throws
    /// Lets the vCPUs run again.
    func resume() throws
    /// Runs the guest at `percent` (1…100) of its speed: the throttle policy for guests that
    /// dirty memory faster than they can be protected (Xen: the credit scheduler's cap).
    func setSpeed(percent: Int) throws
    /// The guest was handed over to the backup (planned switchover): stop it here for good.
    func stop() throws
    /// Whether the guest no longer exists on this host (destroyed or crashed under us), asked
    /// after a capture failed: then the backup must take over.
    var hasVanished: Bool { get }
    /// The guest's replicated disks; nil when it has none (its checkpoints carry no disk records).
    var disks: (any GuestDisks)? { get }
}

extension PrimaryGuest {
    /// A guest that lives inside this process cannot vanish on its own.
    public var hasVanished: Bool { false }
    /// No replicated disks unless the backend says otherwise.
    public var disks: (any GuestDisks)? { nil }
}

/// How a primary guest's memory and vCPU state are captured: the shell switches over this value,
/// decided once per guest, instead of asking what type the guest is.
public enum CaptureMode: Sendable {
    /// remusd harvests the dirty log and copies pages into its own staging arenas (the simulated guest).
    case pages(any PageCapturingGuest)
    /// The hypervisor library writes its own migration stream, which travels as OPAQUE_PAYLOAD
    /// records (Xen's libxenguest).
    case stream(any StreamingGuest)
}

/// A guest whose pages remusd captures itself: it keeps a dirty log and copies pages into
/// caller-owned arenas while suspended.
public protocol PageCapturingGuest: PrimaryGuest {
    /// Starts dirty logging. Every populated page counts as dirty at the first harvest.
    func startDirtyLogging() throws
    /// ORs the pages dirtied since the last harvest into `bitmap` and clears the backend's log.
    func harvestDirty(into bitmap: inout DirtyBitmap) throws
    /// Copies every page set in `bitmap` into `arena` (raw, or absent when not populated), in
    /// ascending PFN order. Allocates nothing per page.
    func capturePages(_ bitmap: borrowing DirtyBitmap, into arena: StagingArena) throws
    /// vCPU, device, clock and layout state (`stream` empty). The guest must be suspended.
    func captureState(clock: any HostClock) throws -> GuestState
}

extension PageCapturingGuest {
    public var captureMode: CaptureMode { .pages(self) }
}

/// A guest whose hypervisor library writes its own migration stream (Xen's libxenguest): pages
/// and vCPU state are that stream's bytes, shipped as they come before the first checkpoint and
/// as one piece per checkpoint after it.
public protocol StreamingGuest: PrimaryGuest {
    /// Starts the library's stream from its beginning (a new connection needs a new stream); an
    /// earlier stream is ended first, leaving the guest running.
    func startStream() throws
    /// The live phase before the first checkpoint: the next bytes of the library's stream, at
    /// most `maxBytes`, waiting until there are some; empty when none came within a short wait
    /// (so the caller can look around); nil once the live phase is over and the library waits
    /// to suspend the guest for the first checkpoint.
    func nextLiveBytes(maxBytes: Int) throws -> [UInt8]?
    /// The library's stream bytes of the checkpoint being taken, in `GuestState.stream`, with
    /// the host's clocks at capture. The guest must be suspended.
    func captureCheckpoint(clock: any HostClock) throws -> GuestState
}

extension StreamingGuest {
    public var captureMode: CaptureMode { .stream(self) }
}

/// The backup side of a backend: receives committed checkpoints and can resume the guest. What
/// a checkpoint hands it is its `commitMode`: pages staged by remusd (`PageReplica`) or the
/// hypervisor library's stream bytes (`StreamingReplica`). A backend conforms to exactly one.
public protocol ReplicaTarget: AnyObject {
    /// How committed checkpoints reach this replica; the same value for its whole life.
    var commitMode: CommitMode { get }
    /// Builds (or checks) the replica from the primary's DOMAIN_CONFIG and stream header.
    func configure(header: StreamHeader, config: DomainConfig) throws
    /// Builds the guest of the last committed checkpoint up to the point of running it, without
    /// letting it run (Xen: the restore stream closed, libxl's domain built and left paused; the
    /// simulated guest: memory, registers and clock in place, vCPUs parked). Called at most once,
    /// after the last commit, while the primary is being fenced: it may still run, so nothing
    /// here may let this copy run or emit anything (I7). `activate` then only lets it run; a
    /// replica that cannot prepare ahead does nothing here.
    func prepareActivation(clock: any HostClock) throws
    /// Resumes the guest from the last committed checkpoint (prepared or not); says where it runs now.
    @discardableResult
    func activate(clock: any HostClock) throws -> ActivatedGuest
    /// Throws the replica away (planned stop). A page replica waits for a `withCommittedPage`
    /// in progress.
    func discard()
}

extension ReplicaTarget {
    /// Nothing to build ahead: `activate` does it all.
    public func prepareActivation(clock: any HostClock) throws {}
}

/// How committed checkpoints reach a replica: the backup's shell switches over this value.
public enum CommitMode {
    /// Decoded pages in staging arenas, with the state records (the simulated guest).
    case pages(any PageReplica)
    /// The hypervisor library's stream bytes (Xen: libxl's checkpointed restore).
    case stream(any StreamingReplica)
}

/// What an activated replica hands back.
public enum ActivatedGuest {
    /// The guest runs inside this process and can be protected onwards towards another backup:
    /// the guest and the buffer its NIC emits into (nil for a guest without a NIC).
    case inProcess(any PrimaryGuest, output: (any OutputBuffer)?)
    /// The hypervisor runs the guest outside remusd (Xen); protecting it onwards from here is
    /// not available yet.
    case underHypervisor
}

/// A replica that holds the guest's pages itself and applies staged checkpoints to them.
public protocol PageReplica: ReplicaTarget {
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
}

extension PageReplica {
    public var commitMode: CommitMode { .pages(self) }

    /// Applies a checkpoint whose pages fit one arena (see `commit(_:state:)` for several).
    public func commit(_ pages: StagingArena, state: GuestState?) throws {
        try commit([pages], state: state)
    }
}

/// A replica built by the hypervisor library from its own stream (Xen: libxl's checkpointed
/// restore): verified checkpoints hand over their `GuestState.stream` bytes, in order.
public protocol StreamingReplica: ReplicaTarget {
    /// Takes the stream bytes of a verified pre-copy chunk (`checkpoint` false) or of a
    /// complete, verified checkpoint (`checkpoint` true). Called in stream order.
    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws
}

/// A replica that applies committed checkpoints behind a queue of its own (Xen: the feed into
/// libxl's restore). The backup's reader calls `waitForFeedRoom` after each commit and reads the
/// next checkpoint only when it returns nil, so the queue is bounded by backpressure on the
/// connection, never by dropping what was acknowledged.
public protocol FeedBoundedReplica: AnyObject {
    /// Blocks until the queue is within its bound, the feed has ended, or `deadlineNs`
    /// (monotonic) passes; nil when the reader may go on, otherwise what is still queued.
    func waitForFeedRoom(until deadlineNs: UInt64) -> String?
}

extension StreamingReplica {
    public var commitMode: CommitMode { .stream(self) }
}
