// The guest's workload: one op of one vCPU. The same function runs on the vCPU threads, in
// `SimGuest.step` and in `SimReplay`, so that a replay cannot drift from what the guest did.

import RemusCore

/// One vCPU's registers: everything its future depends on besides its memory region.
///
/// Serialised into `VCPUState` format 1 as seven little-endian u64 in declaration order (56 bytes).
public struct SimRegisters: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// Ops completed since boot (stores, loads and balloon ops).
    public var opCount: UInt64
    /// splitmix64 state.
    public var prng: UInt64
    /// Fold of every value this vCPU loaded.
    public var accumulator: UInt64
    /// Stores completed since boot.
    public var storeCount: UInt64
    /// Sequence number of the next packet this vCPU emits (dense from 0).
    public var nicSeq: UInt64
    /// The page this vCPU has given back to the host, or `SimRegisters.noBalloonPage`.
    public var balloonPFN: UInt64
    /// Balloon transitions (give back or take again) since boot.
    public var balloonTransitions: UInt64

    /// `balloonPFN` when no page is given back.
    public static let noBalloonPage = UInt64.max
    /// `VCPUState.format` of the simulated guest.
    public static let stateFormat: UInt32 = 1
    /// Bytes of a format-1 VCPU_STATE body.
    public static let encodedBytes = 56

    /// The registers at boot.
    public init(seed: UInt64, vcpu: UInt32) {
        opCount = 0
        prng = mix64(seed ^ mix64(0x5EED_0000_0000 | UInt64(vcpu)))
        accumulator = 0
        storeCount = 0
        nicSeq = 0
        balloonPFN = Self.noBalloonPage
        balloonTransitions = 0
    }

    /// The VCPU_STATE body (format 1).
    public func encode(vcpu: UInt32) -> VCPUState {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Self.encodedBytes)
        for field in [opCount, prng, accumulator, storeCount, nicSeq, balloonPFN, balloonTransitions] {
            withUnsafeBytes(of: field.littleEndian) { bytes.append(contentsOf: $0) }
        }
        return VCPUState(vcpu: vcpu, format: Self.stateFormat, bytes: bytes)
    }

    /// Decodes a format-1 VCPU_STATE body.
    public init(_ state: VCPUState) throws(SimError) {
        guard state.format == Self.stateFormat else {
            throw .invalidState("VCPU_STATE of vCPU \(state.vcpu) has format \(state.format), expected \(Self.stateFormat)")
        }
        guard state.bytes.count == Self.encodedBytes else {
            throw .invalidState("VCPU_STATE of vCPU \(state.vcpu) is \(state.bytes.count) bytes, expected \(Self.encodedBytes)")
        }
        var fields = [UInt64](repeating: 0, count: 7)
        for i in 0..<7 {
            var v: UInt64 = 0
            for b in 0..<8 { v |= UInt64(state.bytes[i * 8 + b]) << (8 * UInt64(b)) }
            fields[i] = v
        }
        opCount = fields[0]
        prng = fields[1]
        accumulator = fields[2]
        storeCount = fields[3]
        nicSeq = fields[4]
        balloonPFN = fields[5]
        balloonTransitions = fields[6]
    }

    /// A 64-bit digest of the registers (what a packet carries).
    public func digest(vcpu: UInt32) -> UInt64 {
        // Unrolled: this runs on the vCPU's op path and must not allocate.
        @inline(__always) func fold(_ h: UInt64, _ field: UInt64) -> UInt64 { mix64(h ^ field) &+ 0x9E37_79B9_7F4A_7C15 }
        var h = mix64(UInt64(vcpu) ^ 0xD16E_57D1_6E57)
        h = fold(h, opCount)
        h = fold(h, prng)
        h = fold(h, accumulator)
        h = fold(h, storeCount)
        h = fold(h, nicSeq)
        h = fold(h, balloonPFN)
        return fold(h, balloonTransitions)
    }

    public var description: String {
        let balloon = balloonPFN == Self.noBalloonPage ? "none" : String(balloonPFN)
        return "ops=\(opCount) prng=0x\(String(prng, radix: 16)) acc=0x\(String(accumulator, radix: 16)) "
            + "stores=\(storeCount) nicSeq=\(nicSeq) balloon=\(balloon) transitions=\(balloonTransitions)"
    }
}

/// The splitmix64 finaliser: a bijective 64-bit mix.
@inline(__always)
func mix64(_ x: UInt64) -> UInt64 {
    var z = x
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// The next splitmix64 output.
@inline(__always)
func splitmix(_ state: inout UInt64) -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    return mix64(state)
}

/// The config turned into the integers the op loop uses (computed once).
struct WorkloadShape: Sendable, Equatable {
    let vcpus: Int
    let seed: UInt64
    let pageSize: Int
    let pageCount: UInt64
    let wordsPerPage: UInt64
    /// First PFN of the working set (the working set sits in the middle of guest memory).
    let workingSetStart: UInt64
    /// Pages per vCPU region.
    let regionPages: UInt64
    /// Hot pages at the start of each region (≥ 1).
    let hotPages: UInt64
    /// An op is a store when its 16-bit draw is below this (0…65536).
    let storeThreshold: UInt64
    /// An op goes to the hot set when its 16-bit draw is below this (0…65536).
    let hotThreshold: UInt64
    let packetEveryStores: UInt64
    let balloonPeriod: UInt64
    /// Ops between two disk operations of a vCPU (0: no disk).
    let diskPeriod: UInt64
    /// Blocks of the disk each vCPU writes (its share, from block vcpu × this).
    let diskBlocksPerVCPU: UInt64

    static func regionPages(_ c: SimConfig) -> UInt64 {
        let pageCount = c.pageSize > 0 ? c.memoryBytes / UInt64(c.pageSize) : 0
        let workingSet = UInt64((Double(pageCount) * c.workingSetFraction).rounded(.down))
        return c.vcpus > 0 ? workingSet / UInt64(c.vcpus) : 0
    }

    init(_ c: SimConfig) {
        vcpus = c.vcpus
        seed = c.seed
        pageSize = c.pageSize
        pageCount = c.pageCount
        wordsPerPage = UInt64(c.pageSize / 8)
        regionPages = Self.regionPages(c)
        let workingSet = regionPages * UInt64(c.vcpus)
        workingSetStart = (pageCount - workingSet) / 2
        hotPages = max(1, min(regionPages, UInt64((Double(regionPages) * c.hotSetFraction).rounded(.down))))
        storeThreshold = UInt64((c.storeRatio * 65536).rounded(.down))
        hotThreshold = UInt64((c.hotProbability * 65536).rounded(.down))
        packetEveryStores = c.packetEveryStores
        balloonPeriod = c.balloonPeriod
        diskPeriod = c.diskBytes == 0 ? 0 : c.diskPeriod
        diskBlocksPerVCPU = c.diskBytes / UInt64(SimConfig.diskBlockBytes) / UInt64(max(c.vcpus, 1))
    }

    /// The page whose first word counts the disk operations `vcpu` completed (below the
    /// working set, which no other op touches): memory N says which writes completed by N.
    @inline(__always)
    func diskCounterPage(_ vcpu: UInt32) -> UInt64 { workingSetStart - 1 - UInt64(vcpu) }

    /// First PFN of a vCPU's region.
    @inline(__always)
    func regionStart(_ vcpu: UInt32) -> UInt64 { workingSetStart + UInt64(vcpu) * regionPages }

    /// The PFNs any vCPU may ever touch.
    var workingSet: Range<UInt64> { workingSetStart..<(workingSetStart + regionPages * UInt64(vcpus)) }
}

/// What an op did that its caller must act on.
struct OpEffect {
    /// The op set a page's dirty bit that was clear (counts against the dirty rate).
    var newlyDirtied: Bool
}

/// A packet the op emitted.
protocol PacketEmitter {
    mutating func emit(_ packet: SimPacket)
}

/// Where a vCPU's disk operations go: the guest's disk journal, or a replay's image. Each
/// returns once the operation completed (the guest then records the completion in memory).
protocol SimDiskPort {
    /// One block (`SimConfig.diskBlockBytes`) the op fills before `write`.
    var block: UnsafeMutableRawBufferPointer { get }
    /// Writes `block` at block number `number` of the disk.
    mutating func write(blockNumber number: UInt64)
    /// Makes the completed writes durable.
    mutating func flush()
}

/// The disk path of a guest without a disk: no op ever reaches it.
struct NoDisk: SimDiskPort {
    var block: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: nil, count: 0) }
    mutating func write(blockNumber number: UInt64) { preconditionFailure("a disk write on a guest without a disk") }
    mutating func flush() { preconditionFailure("a disk flush on a guest without a disk") }
}

/// Runs op number `registers.opCount` of `vcpu` against `memory`.
///
/// Op i draws x from the PRNG. Every `balloonPeriod`-th op is a balloon op: give back the page
/// `(x >> 32) % regionPages` of the region, or take the given-back page again — unless it is a
/// `diskPeriod`-th op, which is a disk op: with d the vCPU's completed disk ops (its counter word), a
/// flush when d + 1 is a multiple of `SimConfig.flushEveryDiskOps`, else a write of block
/// `(x >> 32) % diskBlocksPerVCPU` of its share, word k = mix64(x ^ k << 40 ^ d); then the
/// counter becomes d + 1 (the completion, in memory). Otherwise bits 0…15
/// of x choose store or load, bits 16…31 hot or cold, bits 32…63 the page; y = mix64(x ^ i) the
/// 8-byte word, and for a store the value. The given-back page is never touched: an op that draws
/// it uses the next page of the region instead.
@inline(__always)
func executeOp<E: PacketEmitter, D: SimDiskPort>(
    _ r: inout SimRegisters, vcpu: UInt32, shape: WorkloadShape, memory: GuestMemory, emitter: inout E, disk: inout D
) -> OpEffect {
    let i = r.opCount
    let x = splitmix(&r.prng)
    r.opCount = i &+ 1
    let regionStart = shape.regionStart(vcpu)
    // Before the balloon: with periods that share factors, a disk op must not be shadowed.
    if shape.diskPeriod != 0 && (i &+ 1) % shape.diskPeriod == 0 {
        let counter = shape.diskCounterPage(vcpu)
        let done = memory.load(pfn: counter, word: 0)
        if (done &+ 1) % SimConfig.flushEveryDiskOps == 0 {
            disk.flush()
        } else {
            let block = disk.block
            for k in 0..<(block.count / 8) {
                block.storeBytes(of: mix64(x ^ UInt64(k) << 40 ^ done).littleEndian, toByteOffset: k * 8, as: UInt64.self)
            }
            disk.write(blockNumber: UInt64(vcpu) * shape.diskBlocksPerVCPU + (x >> 32) % shape.diskBlocksPerVCPU)
        }
        return OpEffect(newlyDirtied: memory.store(pfn: counter, word: 0, value: done &+ 1))
    }
    if shape.balloonPeriod != 0 && (i &+ 1) % shape.balloonPeriod == 0 {
        r.balloonTransitions &+= 1
        if r.balloonPFN == SimRegisters.noBalloonPage {
            let pfn = regionStart + (x >> 32) % shape.regionPages
            r.balloonPFN = pfn
            return OpEffect(newlyDirtied: memory.giveBack(pfn))
        } else {
            let pfn = r.balloonPFN
            r.balloonPFN = SimRegisters.noBalloonPage
            return OpEffect(newlyDirtied: memory.takeBack(pfn))
        }
    }
    let y = mix64(x ^ i)
    var page = (x >> 16) & 0xFFFF < shape.hotThreshold ? (x >> 32) % shape.hotPages : (x >> 32) % shape.regionPages
    if regionStart + page == r.balloonPFN { page = (page + 1) % shape.regionPages }
    let pfn = regionStart + page
    let word = y % shape.wordsPerPage
    if x & 0xFFFF < shape.storeThreshold {
        let value = mix64(y ^ (UInt64(vcpu) << 48) ^ i)
        let fresh = memory.store(pfn: pfn, word: word, value: value)
        r.storeCount &+= 1
        if shape.packetEveryStores != 0 && r.storeCount % shape.packetEveryStores == 0 {
            let packet = SimPacket(vcpu: vcpu, seq: r.nicSeq, opCount: r.opCount, digest: r.digest(vcpu: vcpu))
            r.nicSeq &+= 1
            emitter.emit(packet)
        }
        return OpEffect(newlyDirtied: fresh)
    } else {
        let value = memory.load(pfn: pfn, word: word)
        r.accumulator = mix64(r.accumulator ^ value) ^ i
        return OpEffect(newlyDirtied: false)
    }
}

/// The populated layout implied by the vCPUs' balloon registers: all of memory minus each
/// given-back page; the generation counts every balloon transition.
func layoutFromRegisters(_ registers: [SimRegisters], pageCount: UInt64) -> MemoryLayout {
    var holes = registers.map(\.balloonPFN).filter { $0 != SimRegisters.noBalloonPage && $0 < pageCount }
    holes.sort()
    var ranges: [PFNRange] = []
    var start: UInt64 = 0
    for hole in holes {
        if hole > start { ranges.append(PFNRange(start: start, count: hole - start)) }
        start = max(start, hole + 1)
    }
    if pageCount > start { ranges.append(PFNRange(start: start, count: pageCount - start)) }
    let generation = registers.reduce(UInt64(0)) { $0 &+ $1.balloonTransitions }
    return MemoryLayout(generation: generation, ranges: ranges)
}

/// The "nic0" device state: format version, vCPU count, then each vCPU's next packet sequence.
enum NICState {
    static let name = "nic0"
    static let version: UInt32 = 1

    static func encode(_ registers: [SimRegisters]) -> DeviceState {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8 + 8 * registers.count)
        withUnsafeBytes(of: version.littleEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(registers.count).littleEndian) { bytes.append(contentsOf: $0) }
        for r in registers { withUnsafeBytes(of: r.nicSeq.littleEndian) { bytes.append(contentsOf: $0) } }
        return DeviceState(name: name, bytes: bytes)
    }

    /// Each vCPU's next packet sequence.
    static func decode(_ device: DeviceState) throws(SimError) -> [UInt64] {
        let b = device.bytes
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * UInt32($1)) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) } }
        guard b.count >= 8, u32(0) == version else { throw .invalidState("nic0 state has no version-\(version) header") }
        let n = Int(u32(4))
        guard b.count == 8 + 8 * n else { throw .invalidState("nic0 state of \(b.count) bytes does not hold \(n) vCPUs") }
        return (0..<n).map { u64(8 + 8 * $0) }
    }
}
