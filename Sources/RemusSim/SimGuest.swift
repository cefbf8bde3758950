// RemusSim: the simulated guest backend, the ground truth for the drill.
//
// - SimGuest (this file): the primary side, a running guest with vCPU threads, a software dirty
//   log, a virtual NIC, a balloon and a virtual clock. Implements PageCapturingGuest.
// - SimReplica: the backup side; commits checkpoints atomically and activates into a SimGuest.
// - SimOutputBuffer / PacketSink / SimPacket: the NIC's output, held back per epoch (I1).
// - SimReplay / SimVerifier: the workload replayed from the seed; checks memory byte for byte,
//   registers, layout, packets and the clock after failover.
// Determinism by construction: each vCPU touches only its own region of the working set, so its
// memory and registers are a pure function of (config, vCPU, op count), whatever the interleaving.

import RemusCore
import RemusDisk
import Synchronization
import RemusSystem

/// One vCPU's register file and throttle state.
///
/// `@unchecked Sendable`: while the vCPU runs only its thread touches `registers`; the controller
/// reads or writes them only while the vCPU is parked or stopped, and the control lock's
/// handshake orders those accesses.
final class VCPUSlot: @unchecked Sendable {
    let index: UInt32
    var registers: SimRegisters
    /// The op count, published every `GuestMachine.progressInterval` ops for progress waiters.
    let progress: Atomic<UInt64>

    init(index: UInt32, registers: SimRegisters) {
        self.index = index
        self.registers = registers
        progress = Atomic(registers.opCount)
    }
}

/// A vCPU's allowance of something per unit of host time (ops, newly dirtied pages).
struct TokenBucket {
    /// Host nanoseconds that earn one token (0 = unlimited).
    let nsPerToken: UInt64
    /// Most tokens held at once: 10 ms worth of the rate, at least 1.
    let burst: UInt64
    var tokens: UInt64
    var lastRefillNs: UInt64 = 0

    /// A bucket for `perSecond` tokens per second shared by `sharers` vCPUs (0 = unlimited).
    init(perSecond: UInt64, sharers: Int) {
        if perSecond == 0 {
            nsPerToken = 0
            burst = 0
        } else {
            nsPerToken = max(1, 1_000_000_000 * UInt64(sharers) / perSecond)
            burst = max(1, perSecond / UInt64(sharers) / 100)
        }
        tokens = burst
    }

    var isLimited: Bool { nsPerToken != 0 }

    /// Adds the tokens earned since the last refill, at most `burst`; returns how long until the
    /// next one is due when none were earned (0 otherwise).
    mutating func refill(now: UInt64) -> UInt64 {
        let earned = now > lastRefillNs ? (now - lastRefillNs) / nsPerToken : 0
        if earned >= burst {
            tokens = burst
            lastRefillNs = now
            return 0
        }
        if earned > 0 {
            tokens = earned
            lastRefillNs += earned * nsPerToken
            return 0
        }
        return lastRefillNs + nsPerToken - now
    }
}

/// The packet path of the vCPU threads: straight into the output buffer (or nowhere).
struct NICEmitter: PacketEmitter {
    let nic: SimOutputBuffer?
    @inline(__always) mutating func emit(_ packet: SimPacket) { nic?.emit(packet) }
}

/// The disk path of the vCPU threads and `step`: each operation through the guest's journal (the
/// local image, then the epoch's journal), completed when the call returns.
struct JournalDiskPort: SimDiskPort {
    let machine: GuestMachine
    let block: UnsafeMutableRawBufferPointer

    /// A port with a block of its own (`release()` it when done).
    init(_ machine: GuestMachine) {
        self.machine = machine
        block = .allocate(byteCount: SimConfig.diskBlockBytes, alignment: 4096)
    }

    func release() { block.deallocate() }

    mutating func write(blockNumber number: UInt64) {
        guard let disk = machine.disk else { return }
        // Journaled now, applied to the local image by the journal's worker: a vCPU must not wait
        // for host I/O inside an op (a checkpoint waits for it to park).
        do { try disk.writeApplyingLater(disk: 0, offset: number * UInt64(block.count), data: UnsafeRawBufferPointer(block)) } catch {
            // A real guest would see EIO; the simulated one counts it, and its disk no longer
            // matches a replay, which the verifier then reports.
            machine.diskFailures.add(1, ordering: .relaxed)
        }
    }

    mutating func flush() {
        guard let disk = machine.disk else { return }
        // No local fdatasync: a vCPU parks only between ops, so a flush that waits for the host's
        // disk would stretch the checkpoint's pause (a real guest's flush does not hold its vCPUs);
        // what failover needs durable is the backup's image, which applies each epoch durably.
        do { try disk.flush(disk: 0, localSync: false) } catch { machine.diskFailures.add(1, ordering: .relaxed) }
    }
}

/// The machine the vCPU threads run on; shared by them and the controller (`SimGuest`).
///
/// `@unchecked Sendable`: the mutable fields below `control` are only touched with `control`
/// held; `pauseRequested` is an atomic; everything else is immutable or documented on its type.
final class GuestMachine: @unchecked Sendable {
    let config: SimConfig
    let shape: WorkloadShape
    let memory: GuestMemory
    let slots: [VCPUSlot]
    let nic: SimOutputBuffer?
    let clock: any HostClock
    let guestClock: GuestClock
    let autoRun: Bool
    /// The virtual disk (local image and journal); nil without one. Set at construction, or by
    /// `SimGuest.attachDisk` while no vCPU has run an op yet (a replica prepared during the fence
    /// gets the backup's images only once they hold the committed checkpoint, I9); the vCPU
    /// threads read it only after `resume()`'s handshake on `control`.
    var disk: DiskJournal?
    /// Disk operations whose local I/O failed.
    let diskFailures = Atomic<UInt64>(0)

    /// Set when the vCPUs must stop at their next safe point (suspend or halt); checked every op.
    let pauseRequested = Atomic<Bool>(false)
    /// Share of full speed the vCPUs may run at, percent (the throttle policy's knob).
    let speedPercent = Atomic<Int>(100)
    /// Threads in `waitForProgress`; vCPUs wake them only when there are any.
    let progressWaiters = Atomic<Int>(0)
    /// Ops between two publications of a vCPU's op count (a power of two).
    static let progressInterval: UInt64 = 1024
    let control = MonitorLock()
    // Guarded by `control`:
    var suspendRequested = false
    /// Whether a vCPU may have run an op (false only for a guest built suspended, until `resume`).
    var mayHaveRun = true
    var halting = false
    var parked = 0
    var running = 0
    var threads: [JoinableThread] = []

    init(
        config: SimConfig, memory: GuestMemory, registers: [SimRegisters], guestClock: GuestClock,
        clock: any HostClock, nic: SimOutputBuffer?, disk: DiskJournal?, autoRun: Bool
    ) {
        self.disk = disk
        self.config = config
        shape = WorkloadShape(config)
        self.memory = memory
        slots = registers.enumerated().map { VCPUSlot(index: UInt32($0.offset), registers: $0.element) }
        self.nic = nic
        self.clock = clock
        self.guestClock = guestClock
        self.autoRun = autoRun
    }

    /// Starts one thread per vCPU.
    func start(name: String) throws(SimError) {
        control.lock()
        defer { control.unlock() }
        for slot in slots {
            running += 1
            do throws(SystemError) {
                threads.append(try JoinableThread(name: "vcpu\(slot.index)-\(name)") { [self] in runVCPU(slot) })
            } catch {
                running -= 1
                throw .system(error)
            }
        }
    }

    /// The body of a vCPU thread: ops until halted, parking whenever a pause is requested.
    private func runVCPU(_ slot: VCPUSlot) {
        var registers = slot.registers
        var emitter = NICEmitter(nic: nic)
        var disk = JournalDiskPort(self)
        defer { disk.release() }
        // Throttles: ops per second per vCPU, newly dirtied pages per second per guest.
        var speed = speedPercent.load(ordering: .relaxed)
        var (opBudget, pageBudget) = budgets(speed: speed)
        while true {
            // The throttle policy changed the speed: rebuild the buckets at the new rates.
            if speedPercent.load(ordering: .relaxed) != speed {
                speed = speedPercent.load(ordering: .relaxed)
                (opBudget, pageBudget) = budgets(speed: speed)
            }
            if pauseRequested.load(ordering: .acquiring) {
                slot.registers = registers
                publishProgress(slot, registers.opCount)
                guard park() else { break }
                continue
            }
            if opBudget.isLimited && opBudget.tokens == 0 {
                throttle(&opBudget, slot, registers.opCount)
                continue
            }
            if pageBudget.isLimited && pageBudget.tokens == 0 {
                throttle(&pageBudget, slot, registers.opCount)
                continue
            }
            let effect = executeOp(&registers, vcpu: slot.index, shape: shape, memory: memory, emitter: &emitter, disk: &disk)
            if opBudget.isLimited { opBudget.tokens -= 1 }
            if pageBudget.isLimited && effect.newlyDirtied { pageBudget.tokens -= 1 }
            if registers.opCount & (Self.progressInterval - 1) == 0 { publishProgress(slot, registers.opCount) }
        }
        publishProgress(slot, registers.opCount)
        control.withLock {
            running -= 1
            control.broadcast()
        }
    }

    /// Token buckets for the configured rates scaled to `speed` percent. An unthrottled guest that
    /// must slow down gets an op budget from a nominal 16 M ops/s per vCPU.
    private func budgets(speed: Int) -> (TokenBucket, TokenBucket) {
        let p = UInt64(max(min(speed, 100), 1))
        var opRate = config.opRateLimit * UInt64(config.vcpus)
        if p < 100 && opRate == 0 && config.dirtyRateLimit == 0 { opRate = 16_000_000 * UInt64(config.vcpus) }
        var ops = TokenBucket(perSecond: opRate * p / 100, sharers: config.vcpus)
        var pages = TokenBucket(perSecond: config.dirtyRateLimit * p / 100, sharers: config.vcpus)
        if ops.isLimited || pages.isLimited {
            let now = clock.monotonicNs()
            ops.lastRefillNs = now
            pages.lastRefillNs = now
        }
        return (ops, pages)
    }

    private func publishProgress(_ slot: VCPUSlot, _ opCount: UInt64) {
        slot.progress.store(opCount, ordering: .relaxed)
        if progressWaiters.load(ordering: .relaxed) != 0 { control.withLock { control.broadcast() } }
    }

    /// Waits until every vCPU has completed at least `ops` ops, or `timeoutNs` of real time passed.
    func waitForProgress(ops: UInt64, timeoutNs: UInt64) -> Bool {
        if !autoRun { return slots.allSatisfy { $0.registers.opCount >= ops } }
        let realClock = SystemHostClock()
        let deadline = realClock.monotonicNs() &+ timeoutNs
        progressWaiters.add(1, ordering: .relaxed)
        defer { progressWaiters.subtract(1, ordering: .relaxed) }
        return control.withLock {
            while !slots.allSatisfy({ $0.progress.load(ordering: .relaxed) >= ops }) {
                let now = realClock.monotonicNs()
                if now >= deadline || (halting && running == 0) { return false }
                // Bounded so that a vCPU publishing just before this thread started waiting is seen.
                control.wait(nanoseconds: min(deadline - now, 5_000_000))
            }
            return true
        }
    }

    /// Parks the calling vCPU until resumed; false when the machine halts instead.
    private func park() -> Bool {
        control.lock()
        defer { control.unlock() }
        parked += 1
        control.broadcast()
        while suspendRequested && !halting { control.wait() }
        parked -= 1
        return !halting
    }

    /// Refills `bucket` from the host clock; when no token is due yet, waits until a quarter of a
    /// burst is (one wake-up per batch of ops, not per op), woken early by suspend or halt. The
    /// wait is capped at 10 ms so that an injected clock that moves in steps is re-read.
    private func throttle(_ bucket: inout TokenBucket, _ slot: VCPUSlot, _ opCount: UInt64) {
        let due = bucket.refill(now: clock.monotonicNs())
        guard due > 0 else { return }
        publishProgress(slot, opCount)
        let wait = min(due + bucket.nsPerToken * (bucket.burst / 4), 10_000_000)
        control.withLock {
            if !suspendRequested && !halting { control.wait(nanoseconds: wait) }
        }
    }

    /// Stops every vCPU at a safe point; returns once all are parked.
    func suspend() {
        control.lock()
        defer { control.unlock() }
        suspendRequested = true
        pauseRequested.store(true, ordering: .releasing)
        // Wake vCPUs waiting in a throttle: they must park now, not when their wait times out.
        control.broadcast()
        while parked < running { control.wait() }
    }

    /// Lets the vCPUs run again.
    func resume() {
        control.lock()
        defer { control.unlock() }
        suspendRequested = false
        mayHaveRun = true
        if !halting { pauseRequested.store(false, ordering: .releasing) }
        control.broadcast()
    }

    /// Whether no vCPU can run an op right now (suspended, halted, or stepped by the caller).
    var isStopped: Bool {
        control.withLock { !autoRun || (parked == running && (suspendRequested || halting)) }
    }

    var isSuspended: Bool { control.withLock { suspendRequested && parked == running } }

    /// Stops the vCPU threads for good and joins them.
    func halt() {
        let joining: [JoinableThread] = control.withLock {
            halting = true
            pauseRequested.store(true, ordering: .releasing)
            control.broadcast()
            let all = threads
            threads = []
            return all
        }
        for thread in joining { thread.join() }
    }
}

/// A simulated guest on the primary: memory, vCPU threads running the workload, a dirty log, a
/// virtual NIC feeding a `SimOutputBuffer`, a balloon and a virtual clock.
///
/// The controller calls (`PrimaryGuest`, `step`, accessors) come from one thread at a time, as the
/// `PrimaryGuest` contract says.
///
/// `@unchecked Sendable`: the runtime may hand the guest from thread to thread; all shared state
/// lives in `GuestMachine`, whose synchronisation is documented there.
public final class SimGuest: PageCapturingGuest, @unchecked Sendable {
    public let descriptor: GuestDescriptor
    /// The config the guest was built from.
    public let config: SimConfig
    let machine: GuestMachine

    /// Boots a fresh guest: memory all populated and zero, registers at their boot values, guest
    /// monotonic clock at 0.
    /// - Parameters:
    ///   - config: size and workload; validated.
    ///   - clock: the host's clocks (guest clock, dirty-rate throttle).
    ///   - nic: where emitted packets go (nil: they are counted in the registers and dropped).
    ///   - name: guest name for the descriptor.
    ///   - uuid: guest identity (default derived from the seed).
    ///   - disk: the virtual disk's image and journal (`SimGuest.openDisk`) when `config` has a
    ///     disk; nil: its operations complete without reaching any image.
    ///   - autoRun: start the vCPU threads now (default); false for a guest driven by `step`.
    public convenience init(
        config: SimConfig, clock: any HostClock, nic: SimOutputBuffer?, name: String = "sim",
        uuid: GuestUUID? = nil, disk: DiskJournal? = nil, autoRun: Bool = true
    ) throws {
        try config.validate()
        let memory = try GuestMemory(pageSize: config.pageSize, pageCount: config.pageCount)
        let registers = (0..<config.vcpus).map { SimRegisters(seed: config.seed, vcpu: UInt32($0)) }
        try self.init(
            config: config, memory: memory, registers: registers, guestClock: .boot(host: clock), clock: clock,
            nic: nic, name: name, uuid: uuid ?? SimGuest.defaultUUID(config), disk: disk, autoRun: autoRun)
    }

    /// The name of the simulated guest's disk (the backup finds its image by it).
    public static let diskName = "xvda"

    /// Opens (`create`: creates when missing, sparse) the image of `config`'s disk at `path`,
    /// as the guest's disk journal. Throws naming the disk and what to do (missing, smaller,
    /// in use).
    public static func openDisk(_ config: SimConfig, path: String, create: Bool) throws -> DiskJournal {
        try DiskJournal([DiskJournal.Disk(name: diskName, path: path, sizeBytes: config.diskBytes, blockSize: UInt32(SimConfig.diskBlockBytes))], create: create)
    }

    /// A guest built from existing memory and registers (a replica being activated). With
    /// `suspended`, its vCPU threads start parked and run no op until `resume()`.
    init(
        config: SimConfig, memory: GuestMemory, registers: [SimRegisters], guestClock: GuestClock,
        clock: any HostClock, nic: SimOutputBuffer?, name: String, uuid: GuestUUID, disk: DiskJournal? = nil,
        autoRun: Bool, suspended: Bool = false
    ) throws(SimError) {
        self.config = config
        descriptor = GuestDescriptor(
            name: name, uuid: uuid, backend: .simulated, pageSize: config.pageSize, pageCount: config.pageCount)
        machine = GuestMachine(
            config: config, memory: memory, registers: registers, guestClock: guestClock, clock: clock, nic: nic,
            disk: disk, autoRun: autoRun)
        if suspended {
            // Before any vCPU thread exists: each parks before its first op.
            machine.control.withLock {
                machine.suspendRequested = true
                machine.mayHaveRun = false
                machine.pauseRequested.store(true, ordering: .releasing)
            }
        }
        if autoRun {
            do { try machine.start(name: name) } catch {
                machine.halt()
                throw error
            }
        }
    }

    deinit { machine.halt() }

    /// The identity a guest gets when none is given: a function of the seed.
    public static func defaultUUID(_ config: SimConfig) -> GuestUUID {
        GuestUUID(high: mix64(config.seed ^ 0x5EED_5EED), low: mix64(~config.seed))
    }

    var memory: GuestMemory { machine.memory }

    /// Where the guest's packets go.
    public var nic: SimOutputBuffer? { machine.nic }

    /// The virtual disk, replicated with the checkpoints; nil without one.
    public var disks: (any GuestDisks)? { machine.disk }

    /// Gives a guest built `suspended` (a replica prepared for its takeover) its disk before it
    /// first runs: the backup's images, once they hold the committed checkpoint (I9). Throws
    /// when the guest already has a disk or has run.
    public func attachDisk(_ journal: DiskJournal) throws(SimError) {
        try machine.control.withLock { () throws(SimError) in
            guard machine.disk == nil else { throw .replicaState("the guest already has its disk") }
            guard !machine.mayHaveRun else {
                throw .replicaState("a disk can be attached only to a guest that has not run yet")
            }
            machine.disk = journal
        }
    }

    /// Disk operations whose local I/O failed (the disk then no longer matches a replay).
    public var diskFailures: UInt64 {
        machine.diskFailures.load(ordering: .relaxed) + (machine.disk?.localWriteFailures.load(ordering: .relaxed) ?? 0)
    }

    // MARK: PageCapturingGuest

    public func domainConfig() throws -> DomainConfig { config.encode() }

    public func startDirtyLogging() throws {
        // Every page, populated or not: the backup starts from "all populated, all zero" and must
        // learn about pages given back before protection started.
        machine.memory.dirty.setAll()
    }

    public func suspend() throws {
        if machine.autoRun {
            machine.suspend()
        } else {
            machine.control.withLock { machine.suspendRequested = true }
        }
    }

    public func resume() throws { machine.resume() }

    /// Takes the dirty log word by word (an atomic exchange each), so it is also correct while the
    /// vCPUs run: a store's dirty bit is set after its data, so a page dirtied concurrently is
    /// either in this harvest (with its data visible to the capture that follows) or in the next.
    public func harvestDirty(into bitmap: inout DirtyBitmap) throws {
        let log = machine.memory.dirty
        guard bitmap.pageCount == log.bitCount else { throw SimError.bitmapSize(expected: log.bitCount, found: bitmap.pageCount) }
        for index in 0..<log.wordCount {
            let bits = log.takeWord(index)
            if bits != 0 { bitmap.or(word: index, bits) }
        }
    }

    /// Appends every page set in `bitmap` in ascending PFN order: `.absent` when given back,
    /// `.zero` when not written since it was populated, else `.raw` with a copy of its bytes.
    /// Checks the arena's room first and then appends without allocating.
    public func capturePages(_ bitmap: borrowing DirtyBitmap, into arena: StagingArena) throws {
        let memory = machine.memory
        guard bitmap.pageCount == memory.pageCount else {
            throw SimError.bitmapSize(expected: memory.pageCount, found: bitmap.pageCount)
        }
        guard arena.pageSize == memory.pageSize else {
            throw SimError.inconsistentCheckpoint("staging arena pages are \(arena.pageSize) bytes, guest pages \(memory.pageSize)")
        }
        let needed = bitmap.count
        guard arena.hasRoom(for: needed) else {
            throw SimError.arenaFull(needed: needed, free: arena.capacityPages - arena.count)
        }
        for index in 0..<bitmap.wordCountValue {
            var bits = bitmap.word(index)
            while bits != 0 {
                let pfn = UInt64(index) << 6 | UInt64(bits.trailingZeroBitCount)
                bits &= bits &- 1
                if memory.absent.test(pfn) {
                    arena.append(pfn: pfn, encoding: .absent)
                } else if !memory.written.test(pfn) {
                    arena.append(pfn: pfn, encoding: .zero)
                } else {
                    memory.copyPage(pfn, to: arena.append(pfn: pfn, encoding: .raw)!)
                }
            }
        }
    }

    public func captureState(clock: any HostClock) throws -> GuestState {
        let registers = try registers(for: "captureState")
        return GuestState(
            vcpus: registers.enumerated().map { $0.element.encode(vcpu: UInt32($0.offset)) },
            devices: [NICState.encode(registers)],
            clock: machine.guestClock.reading(clock),
            layout: layoutFromRegisters(registers, pageCount: config.pageCount))
    }

    // MARK: Test and verification access

    /// Runs exactly `ops` ops of vCPU `vcpu` on the calling thread. Only for a guest created with
    /// `autoRun: false` that is not suspended.
    public func step(vcpu: Int, ops: UInt64) {
        precondition(!machine.autoRun, "step(vcpu:ops:) needs a guest created with autoRun: false")
        precondition(!machine.control.withLock { machine.suspendRequested }, "step(vcpu:ops:) on a suspended guest")
        let slot = machine.slots[vcpu]
        var registers = slot.registers
        var emitter = NICEmitter(nic: machine.nic)
        var disk = JournalDiskPort(machine)
        defer { disk.release() }
        for _ in 0..<ops {
            _ = executeOp(&registers, vcpu: slot.index, shape: machine.shape, memory: machine.memory, emitter: &emitter, disk: &disk)
        }
        slot.registers = registers
    }

    /// Runs `ops` ops on every vCPU in turn (see `step(vcpu:ops:)`).
    public func stepAll(ops: UInt64) {
        for vcpu in 0..<config.vcpus { step(vcpu: vcpu, ops: ops) }
    }

    /// Whether every vCPU is parked by `suspend()`.
    public var isSuspended: Bool {
        machine.autoRun ? machine.isSuspended : machine.control.withLock { machine.suspendRequested }
    }

    /// The vCPUs' registers. Throws unless the guest is suspended, shut down or stepped.
    public func registers() throws -> [SimRegisters] { try registers(for: "registers()") }

    private func registers(for operation: String) throws(SimError) -> [SimRegisters] {
        guard machine.isStopped else { throw .notSuspended(operation: operation) }
        return machine.slots.map(\.registers)
    }

    /// The memory digest (`PageHash`): reads every populated page. Throws unless stopped.
    public func memoryDigest() throws -> UInt64 {
        guard machine.isStopped else { throw SimError.notSuspended(operation: "memoryDigest()") }
        return machine.memory.digest()
    }

    /// The guest's clocks now, read through the guest's host clock.
    public func clockNow() -> ClockState { machine.guestClock.reading(machine.clock) }

    /// Waits until every vCPU has completed at least `ops` ops since boot, or `timeoutNs` of real
    /// time passed; returns whether they got there. For tests and the drill ("the guest still runs").
    public func waitForProgress(ops: UInt64, timeoutNs: UInt64) -> Bool {
        machine.waitForProgress(ops: ops, timeoutNs: timeoutNs)
    }

    /// Each vCPU's op count as last published (every 1024 ops, and when it parks or waits for its
    /// rate limit); readable while the guest runs.
    public var publishedOpCounts: [UInt64] { machine.slots.map { $0.progress.load(ordering: .relaxed) } }

    /// Stops the vCPU threads for good and waits for them (also done on deinit). The guest can
    /// still be captured and verified afterwards.
    public func shutdown() { machine.halt() }

    /// Runs the vCPUs at `percent` of their configured rates (1…100); the throttle policy's knob.
    public func setSpeed(percent: Int) throws {
        machine.speedPercent.store(max(min(percent, 100), 1), ordering: .relaxed)
    }

    /// The guest was handed over to the backup: its vCPUs stop for good.
    public func stop() throws { machine.halt() }
}
