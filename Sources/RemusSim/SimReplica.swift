// The backup side of the simulated guest: a committed image that can be activated into a running
// SimGuest.

import RemusCore
import RemusDisk
import Synchronization

/// The simulated guest's replica on the backup host.
///
/// Holds the last committed checkpoint (memory, registers, devices, clock, layout). `commit` and
/// `activate` take the same lock, so activation sees either the previous checkpoint or the new one
/// (invariant I2). A checkpoint is validated completely before any page is applied; a rejected one
/// leaves the committed image untouched.
public final class SimReplica: PageReplica, Sendable {
    private struct Image {
        var config: SimConfig
        var memory: GuestMemory
        var name: String
        var uuid: GuestUUID
        var committed: GuestState?
        var committedEpoch: Epoch?
        /// The replica host's monotonic clock when `committed` was committed, nanoseconds.
        var committedAtHostNs: UInt64 = 0
    }

    private enum Phase {
        case unconfigured
        case ready(Image)
        /// Built from the committed image with its vCPUs parked, waiting for `activate`.
        case prepared(SimGuest, committed: GuestState, epoch: Epoch?)
        case activated(SimGuest, committed: GuestState, epoch: Epoch?)
        case discarded
    }

    private let clock: any HostClock
    private let nic: SimOutputBuffer?
    private let autoRunOnActivation: Bool
    private let phase = Mutex(Phase.unconfigured)
    /// The disk the activated guest writes to (the backup's image, at the committed checkpoint).
    private let disk = Mutex<DiskJournal?>(nil)

    /// Gives the guest this replica activates its disk: the backup's image, which holds the
    /// committed checkpoint's disk (I9) when activation comes.
    public func attachDisk(_ journal: DiskJournal) { disk.withLock { $0 = journal } }

    /// - Parameters:
    ///   - clock: the backup host's clocks (commit timestamps, the activated guest's clock).
    ///   - nic: the output buffer the activated guest emits into.
    ///   - autoRunOnActivation: whether the activated guest starts its vCPU threads (default true;
    ///     false leaves it to `step`, for tests).
    public init(clock: any HostClock, nic: SimOutputBuffer? = nil, autoRunOnActivation: Bool = true) {
        self.clock = clock
        self.nic = nic
        self.autoRunOnActivation = autoRunOnActivation
    }

    // MARK: PageReplica

    public func configure(header: StreamHeader, config domainConfig: DomainConfig) throws {
        let config = try SimConfig(domainConfig)
        guard header.backend == .simulated else {
            throw SimError.invalidConfig("stream is from the \(header.backend) backend, this replica is simulated")
        }
        guard header.pageSize == UInt32(config.pageSize) else {
            throw SimError.invalidConfig("stream page size \(header.pageSize) differs from the config's \(config.pageSize)")
        }
        try phase.withLock { phase throws(SimError) in
            switch phase {
            case .unconfigured:
                let memory = try GuestMemory(pageSize: config.pageSize, pageCount: config.pageCount)
                phase = .ready(Image(config: config, memory: memory, name: header.guestName, uuid: header.guestUUID))
            case .ready(let image):
                // A reconnecting primary sends its DOMAIN_CONFIG again: the same guest is fine.
                guard image.config == config, image.uuid == header.guestUUID else {
                    throw .replicaState("already holds guest \(image.uuid) (\(image.config.memoryBytes) bytes); "
                        + "refusing guest \(header.guestUUID) — discard this replica first")
                }
            case .prepared, .activated:
                throw .replicaState("already prepared for a takeover or activated; the guest runs here now or is about to")
            case .discarded:
                throw .replicaState("discarded; create a new replica")
            }
        }
    }

    /// `body` runs with the replica's lock held: a `commit`, `activate` or `discard` on another
    /// thread (which would change or unmap the page) waits until it returns.
    public func withCommittedPage<R>(_ pfn: PFN, _ body: (UnsafeRawBufferPointer?) throws -> R) rethrows -> R {
        try phase.withLock { phase in
            guard case .ready(let image) = phase, pfn < image.memory.pageCount, !image.memory.absent.test(pfn) else {
                return try body(nil)
            }
            // SAFETY: the image (and its mapping) stays alive while the lock is held.
            return try body(image.memory.pageBytes(pfn))
        }
    }

    public func commit(_ arenas: [StagingArena], state: GuestState?) throws {
        let commitTime = clock.monotonicNs()
        try phase.withLock { phase throws(SimError) in
            let epoch = arenas.first?.epoch ?? 0
            guard case .ready(var image) = phase else {
                throw .replicaState("commit of epoch \(epoch) while not ready (unconfigured, activated or discarded)")
            }
            // Every arena is checked before any page is applied: all of the checkpoint or none (I2).
            try Self.validate(arenas, state: state, image: image)
            for pages in arenas { Self.apply(pages, to: image.memory) }
            if let state {
                Self.applyLayout(state.layout, to: image.memory)
                image.committed = state
                image.committedEpoch = epoch
                image.committedAtHostNs = commitTime
            }
            phase = .ready(image)
        }
    }

    /// The activated guest runs in this process: remusd can protect it onwards.
    @discardableResult
    public func activate(clock activationClock: any HostClock) throws -> ActivatedGuest {
        let guest = try phase.withLock { phase throws(SimError) -> SimGuest in
            let (guest, committed, epoch): (SimGuest, GuestState, Epoch?)
            switch phase {
            case .prepared(let prepared, let c, let e):
                (guest, committed, epoch) = (prepared, c, e)
                // Built during the fence, before the images held the committed checkpoint: it
                // gets them now, before its first op (I9).
                if let journal = disk.withLock({ $0 }) { try prepared.attachDisk(journal) }
                try? guest.resume()
            case .ready(let image):
                (guest, committed) = try Self.build(
                    image, clock: activationClock, nic: nic, disk: disk.withLock { $0 }, autoRun: autoRunOnActivation, suspended: false)
                epoch = image.committedEpoch
            case .unconfigured, .activated, .discarded:
                throw .replicaState("activate while not ready")
            }
            phase = .activated(guest, committed: committed, epoch: epoch)
            return guest
        }
        return .inProcess(guest, output: guest.nic)
    }

    /// Builds the guest from the committed image with its vCPUs parked: `activate` only resumes it.
    public func prepareActivation(clock activationClock: any HostClock) throws {
        try phase.withLock { phase throws(SimError) in
            guard case .ready(let image) = phase else { throw .replicaState("prepare while not ready") }
            // No disk yet: the backup hands the images over only once they hold the committed
            // checkpoint, which may still be being applied while the fence runs (`activate`
            // attaches them before the first op).
            let (guest, committed) = try Self.build(
                image, clock: activationClock, nic: nic, disk: nil, autoRun: autoRunOnActivation, suspended: true)
            phase = .prepared(guest, committed: committed, epoch: image.committedEpoch)
        }
    }

    /// The guest of the committed image; its clock continues from the checkpoint's by the real
    /// time elapsed since the commit (I4), also while it waits suspended for its activation.
    private static func build(
        _ image: Image, clock: any HostClock, nic: SimOutputBuffer?, disk: DiskJournal?, autoRun: Bool, suspended: Bool
    ) throws(SimError) -> (SimGuest, GuestState) {
        guard let committed = image.committed else {
            throw .replicaState("activate before any checkpoint was committed; there is no consistent image")
        }
        var registers: [SimRegisters] = []
        for state in committed.vcpus { registers.append(try SimRegisters(state)) }
        let guestClock = GuestClock.resumed(
            from: committed.clock, committedAtHostNs: image.committedAtHostNs,
            hostMonotonicNs: clock.monotonicNs(), hostWallNs: clock.wallNs())
        let guest = try SimGuest(
            config: image.config, memory: image.memory, registers: registers, guestClock: guestClock,
            clock: clock, nic: nic, name: image.name, uuid: image.uuid, disk: disk, autoRun: autoRun, suspended: suspended)
        return (guest, committed)
    }

    public func discard() {
        phase.withLock { $0 = .discarded }
    }

    // MARK: Accessors

    /// The guest running from the committed image, once `activate` succeeded; the runtime protects
    /// it again, in the other direction.
    public var activatedGuest: SimGuest? {
        phase.withLock { phase -> SimGuest? in
            if case .activated(let guest, _, _) = phase { return guest }
            return nil
        }
    }

    /// The guest built by `prepareActivation`, parked until `activate`; nil in any other phase.
    public var preparedGuest: SimGuest? {
        phase.withLock { phase -> SimGuest? in
            if case .prepared(let guest, _, _) = phase { return guest }
            return nil
        }
    }

    /// The last committed checkpoint's state (also after activation: the state it resumed from).
    public var committedState: GuestState? {
        phase.withLock { phase -> GuestState? in
            switch phase {
            case .ready(let image): return image.committed
            case .prepared(_, let committed, _), .activated(_, let committed, _): return committed
            case .unconfigured, .discarded: return nil
            }
        }
    }

    /// The epoch of the last committed checkpoint.
    public var committedEpoch: Epoch? {
        phase.withLock { phase -> Epoch? in
            switch phase {
            case .ready(let image): return image.committedEpoch
            case .prepared(_, _, let epoch), .activated(_, _, let epoch): return epoch
            case .unconfigured, .discarded: return nil
            }
        }
    }

    /// The config received in DOMAIN_CONFIG.
    public var config: SimConfig? {
        phase.withLock { phase -> SimConfig? in
            switch phase {
            case .ready(let image): return image.config
            case .prepared(let guest, _, _), .activated(let guest, _, _): return guest.config
            case .unconfigured, .discarded: return nil
            }
        }
    }

    /// The committed image's memory digest (`PageHash`), nil unless configured and not activated.
    public func memoryDigest() -> UInt64? {
        phase.withLock { phase -> UInt64? in
            guard case .ready(let image) = phase else { return nil }
            return image.memory.digest()
        }
    }

    /// Runs `body` on the committed memory (not after activation), with commits held off.
    func withCommittedMemory<T>(_ body: (GuestMemory, GuestState?) -> T) -> T? {
        phase.withLock { phase -> T? in
            guard case .ready(let image) = phase else { return nil }
            return body(image.memory, image.committed)
        }
    }

    // MARK: Applying a checkpoint

    private static func validate(_ arenas: [StagingArena], state: GuestState?, image: Image) throws(SimError) {
        let memory = image.memory
        guard let first = arenas.first else { throw .inconsistentCheckpoint("a checkpoint with no staging arena") }
        let epoch = first.epoch
        for (i, pages) in arenas.enumerated() {
            guard pages.pageSize == memory.pageSize else {
                throw .inconsistentCheckpoint("epoch \(epoch) pages are \(pages.pageSize) bytes, the guest's \(memory.pageSize)")
            }
            guard pages.epoch == epoch, pages.kind == first.kind else {
                throw .inconsistentCheckpoint("epoch \(epoch): staging arena \(i) holds epoch \(pages.epoch) (\(pages.kind))")
            }
        }
        if let state {
            if let last = image.committedEpoch, epoch <= last {
                throw .inconsistentCheckpoint("epoch \(epoch) is not after the committed epoch \(last)")
            }
            guard state.vcpus.count == image.config.vcpus else {
                throw .inconsistentCheckpoint("epoch \(epoch) has \(state.vcpus.count) vCPUs, the guest \(image.config.vcpus)")
            }
            for (index, vcpu) in state.vcpus.enumerated() {
                guard vcpu.vcpu == UInt32(index) else {
                    throw .inconsistentCheckpoint("epoch \(epoch): VCPU_STATE \(index) is for vCPU \(vcpu.vcpu)")
                }
                _ = try SimRegisters(vcpu)
            }
            var end: PFN = 0
            for (i, range) in state.layout.ranges.enumerated() {
                guard range.count > 0, range.start >= end, (i == 0 || range.start > end), range.end <= memory.pageCount else {
                    throw .inconsistentCheckpoint("epoch \(epoch): layout range \(i) (\(range.start)+\(range.count)) "
                        + "is empty, unsorted, adjacent or beyond \(memory.pageCount) pages")
                }
                end = range.end
            }
        } else if image.committed != nil {
            throw .inconsistentCheckpoint("pre-copy pages (epoch \(epoch)) after a committed checkpoint")
        }
        // PFNs ascend across the arenas too: one checkpoint, split only by the arenas' size.
        var previous: PFN?
        for pages in arenas {
            try validatePages(pages, state: state, memory: memory, previous: &previous)
        }
    }

    private static func validatePages(_ pages: StagingArena, state: GuestState?, memory: GuestMemory,
                                      previous: inout PFN?) throws(SimError) {
        for index in 0..<pages.count {
            let entry = pages.entry(index)
            guard entry.pfn < memory.pageCount else { throw .pageOutOfRange(pfn: entry.pfn, pageCount: memory.pageCount) }
            if let previous, entry.pfn <= previous {
                throw .inconsistentCheckpoint("epoch \(pages.epoch): PFN \(entry.pfn) after \(previous), not ascending")
            }
            previous = entry.pfn
            guard entry.encoding != .delta else {
                throw .inconsistentCheckpoint("epoch \(pages.epoch): PFN \(entry.pfn) is still delta-encoded")
            }
            if let state {
                let populated = contains(state.layout, entry.pfn)
                if populated == (entry.encoding == .absent) {
                    throw .inconsistentCheckpoint("epoch \(pages.epoch): PFN \(entry.pfn) is \(entry.encoding) but the "
                        + "layout has it \(populated ? "populated" : "not populated")")
                }
            }
        }
    }

    private static func contains(_ layout: MemoryLayout, _ pfn: PFN) -> Bool {
        var low = 0
        var high = layout.ranges.count
        while low < high {
            let mid = (low + high) / 2
            let range = layout.ranges[mid]
            if pfn < range.start { high = mid } else if pfn >= range.end { low = mid + 1 } else { return true }
        }
        return false
    }

    private static func apply(_ pages: StagingArena, to memory: GuestMemory) {
        for index in 0..<pages.count {
            let entry = pages.entry(index)
            switch entry.encoding {
            case .raw:
                memory.absent.clear(entry.pfn)
                memory.writePage(entry.pfn, from: pages.pageData(index))
                memory.written.set(entry.pfn)
            case .zero:
                memory.absent.clear(entry.pfn)
                if memory.written.test(entry.pfn) {
                    memory.zeroPage(entry.pfn)
                    memory.written.clear(entry.pfn)
                }
            case .absent:
                if !memory.absent.test(entry.pfn) {
                    memory.absent.set(entry.pfn)
                    memory.written.clear(entry.pfn)
                    memory.discard(entry.pfn)
                }
            case .delta:
                preconditionFailure("validated away")
            }
        }
    }

    /// Makes the populated pages exactly the layout's: pages outside it are dropped, pages inside
    /// it that were absent come back zero-filled (invariant I5).
    private static func applyLayout(_ layout: MemoryLayout, to memory: GuestMemory) {
        var next: PFN = 0
        func dropGap(_ end: PFN) {
            for pfn in next..<end where !memory.absent.test(pfn) {
                memory.absent.set(pfn)
                memory.written.clear(pfn)
                memory.discard(pfn)
            }
        }
        for range in layout.ranges {
            dropGap(range.start)
            next = range.end
        }
        dropGap(memory.pageCount)
        for index in 0..<memory.absent.wordCount {
            var bits = memory.absent.word(index)
            while bits != 0 {
                let pfn = UInt64(index) << 6 | UInt64(bits.trailingZeroBitCount)
                bits &= bits &- 1
                if contains(layout, pfn) { memory.absent.clear(pfn) }
            }
        }
    }
}
