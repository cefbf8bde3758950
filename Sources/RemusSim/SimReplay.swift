// Replays the workload single-threaded from the seed: the expected memory, registers, layout and
// packets of a guest at given op counts.

import RemusCore

/// The packet path of a replay: every packet is recorded per vCPU.
struct RecordingEmitter: PacketEmitter {
    /// Packets from sequence `forgotten` on.
    var packets: [SimPacket] = []
    /// Packets below this sequence were dropped by `forgetPackets`.
    var forgotten: UInt64 = 0
    mutating func emit(_ packet: SimPacket) { packets.append(packet) }
    /// Sequence of the next packet the vCPU will emit.
    var emitted: UInt64 { forgotten + UInt64(packets.count) }
}

/// The disk path of a replay: straight into its image in memory.
struct ReplayDiskPort: SimDiskPort {
    let image: UnsafeMutableRawBufferPointer
    let block: UnsafeMutableRawBufferPointer
    mutating func write(blockNumber number: UInt64) {
        let at = Int(number) * block.count
        UnsafeMutableRawBufferPointer(rebasing: image[at..<(at + block.count)]).copyMemory(from: UnsafeRawBufferPointer(block))
    }
    mutating func flush() {}
}

/// The workload replayed from the seed, vCPU by vCPU, forward only.
///
/// Because each vCPU touches only its own region, vCPUs replay independently and the result does
/// not depend on how the real guest's threads interleaved. Memory is a sparse mapping of the
/// guest's size; only the working set is ever touched. Release builds replay about 50 million
/// ops per second; a long drill can keep one replay and pass it to each verification (they only
/// move it forward) instead of replaying from boot every time, and `forgetPackets` bounds the
/// packets it keeps (32 bytes each).
public final class SimReplay {
    /// The config replayed.
    public let config: SimConfig
    let shape: WorkloadShape
    let memory: GuestMemory
    private var state: [SimRegisters]
    private var emitters: [RecordingEmitter]
    /// The expected disk (the config's disk bytes, zero at boot; empty without a disk).
    private var disk: ReplayDiskPort

    /// A replay at boot (every vCPU at op 0).
    public init(config: SimConfig) throws {
        try config.validate()
        self.config = config
        shape = WorkloadShape(config)
        memory = try GuestMemory(pageSize: config.pageSize, pageCount: config.pageCount)
        state = (0..<config.vcpus).map { SimRegisters(seed: config.seed, vcpu: UInt32($0)) }
        emitters = Array(repeating: RecordingEmitter(), count: config.vcpus)
        let image = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(config.diskBytes), alignment: 4096)
        image.initializeMemory(as: UInt8.self, repeating: 0)
        disk = ReplayDiskPort(image: image, block: .allocate(byteCount: SimConfig.diskBlockBytes, alignment: 4096))
    }

    deinit {
        disk.image.deallocate()
        disk.block.deallocate()
    }

    /// The expected disk content now (empty when the config has no disk).
    public var expectedDisk: UnsafeRawBufferPointer { UnsafeRawBufferPointer(disk.image) }

    /// Runs vCPU `vcpu` forward until it has completed `opCount` ops. Never goes backwards.
    public func advance(vcpu: Int, to opCount: UInt64) {
        precondition(opCount >= state[vcpu].opCount,
                     "replay of vCPU \(vcpu) is at op \(state[vcpu].opCount), cannot go back to \(opCount)")
        var registers = state[vcpu]
        let index = UInt32(vcpu)
        while registers.opCount < opCount {
            _ = executeOp(&registers, vcpu: index, shape: shape, memory: memory, emitter: &emitters[vcpu], disk: &disk)
        }
        state[vcpu] = registers
    }

    /// Runs every vCPU forward to its op count in `opCounts`.
    public func advance(to opCounts: [UInt64]) {
        precondition(opCounts.count == config.vcpus, "\(opCounts.count) op counts for \(config.vcpus) vCPUs")
        for (vcpu, ops) in opCounts.enumerated() { advance(vcpu: vcpu, to: ops) }
    }

    /// Runs vCPU `vcpu` until it has emitted packet `seq`, or until `opLimit` ops. Returns whether
    /// the packet exists.
    @discardableResult
    public func advance(vcpu: Int, untilPacket seq: UInt64, opLimit: UInt64) -> Bool {
        var registers = state[vcpu]
        let index = UInt32(vcpu)
        while emitters[vcpu].emitted <= seq && registers.opCount < opLimit {
            _ = executeOp(&registers, vcpu: index, shape: shape, memory: memory, emitter: &emitters[vcpu], disk: &disk)
        }
        state[vcpu] = registers
        return emitters[vcpu].emitted > seq
    }

    /// The registers every vCPU has now.
    public var registers: [SimRegisters] { state }

    /// Each vCPU's op count now.
    public var opCounts: [UInt64] { state.map(\.opCount) }

    /// The populated layout now.
    public var layout: MemoryLayout { layoutFromRegisters(state, pageCount: config.pageCount) }

    /// The packet vCPU `vcpu` emitted with sequence `seq`, if the replay has got that far and
    /// has not forgotten it.
    public func expectedPacket(vcpu: Int, seq: UInt64) -> SimPacket? {
        guard vcpu >= 0, vcpu < config.vcpus else { return nil }
        let e = emitters[vcpu]
        guard seq >= e.forgotten, seq < e.emitted else { return nil }
        return e.packets[Int(seq - e.forgotten)]
    }

    /// Sequence of the next packet vCPU `vcpu` emits in the replay.
    public func emittedPackets(vcpu: Int) -> UInt64 { emitters[vcpu].emitted }

    /// Drops the recorded packets of vCPU `vcpu` below sequence `seq` (memory for long runs).
    public func forgetPackets(vcpu: Int, below seq: UInt64) {
        let drop = Int(min(seq, emitters[vcpu].emitted) - min(seq, emitters[vcpu].forgotten))
        guard drop > 0 else { return }
        emitters[vcpu].packets.removeFirst(drop)
        emitters[vcpu].forgotten += UInt64(drop)
    }

    /// The expected content of page `pfn` now; nil when the page is given back.
    public func expectedPage(_ pfn: PFN) -> UnsafeRawBufferPointer? {
        precondition(pfn < memory.pageCount)
        return memory.absent.test(pfn) ? nil : memory.pageBytes(pfn)
    }

    /// The expected memory digest now (`PageHash`). Only the working set and the disk counter
    /// pages below it can hold non-zero pages, so only they are read.
    public func memoryDigest() -> UInt64 {
        var digest = PageHash.memorySeed
        let counters = shape.diskPeriod == 0 ? 0 : UInt64(config.vcpus)
        for pfn in (shape.workingSet.lowerBound - counters)..<shape.workingSet.upperBound where !memory.absent.test(pfn) && memory.written.test(pfn) {
            let bytes = memory.pageBytes(pfn)
            if !PageHash.isZero(bytes) { digest = PageHash.fold(digest, pageHash: PageHash.page(bytes, pfn: pfn)) }
        }
        return digest
    }

    /// The expected committed state at the current op counts, without the clock (the verifier
    /// compares vCPUs, devices and layout).
    public var expectedVCPUs: [VCPUState] { state.enumerated().map { $0.element.encode(vcpu: UInt32($0.offset)) } }

    /// The "nic0" device state expected now.
    public var expectedNIC: DeviceState { NICState.encode(state) }
}
