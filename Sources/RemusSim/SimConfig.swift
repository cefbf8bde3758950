// The simulated guest's parameters and their DOMAIN_CONFIG encoding.

import RemusCore

/// Everything that determines a simulated guest: its size and its workload.
///
/// The workload is memory-stress style: each vCPU owns a disjoint region of the working set and
/// runs ops on it, `storeRatio` stores and the rest loads, `hotProbability` of them on the first
/// `hotSetFraction` of its region. Guest memory and vCPU registers are a pure function of
/// (config, vCPU, op count), which is what lets a verifier replay them.
public struct SimConfig: Sendable, Equatable {
    /// Guest memory in bytes (default 1 GiB). A multiple of `pageSize`. Mapped sparse: untouched
    /// memory costs nothing.
    public var memoryBytes: UInt64 = 1 << 30
    /// Page size in bytes (default 4096); one of the stream's page sizes.
    public var pageSize: Int = 4096
    /// Number of vCPUs (default 2), each a thread of its own.
    public var vcpus: Int = 2
    /// Seed of every vCPU's PRNG (default 1).
    public var seed: UInt64 = 1
    /// Share of guest memory the workload touches, 0 < f ≤ 1 (default 0.05). Small by default so
    /// that a drill's checkpoints stay light: 5% of 1 GiB is 51 MiB of pages that can ever be dirty;
    /// the rest stays zero and travels as zero pages once. Memory-stress benchmarks use 0.8.
    public var workingSetFraction: Double = 0.05
    /// Share of each vCPU's region that is hot, 0 < f ≤ 1 (default 0.1).
    public var hotSetFraction: Double = 0.1
    /// Probability that an op goes to the hot set, 0…1 (default 0.9).
    public var hotProbability: Double = 0.9
    /// Share of ops that are stores, 0…1 (default 0.75, the rest are loads).
    public var storeRatio: Double = 0.75
    /// Most ops per second each vCPU runs (default 1 000 000; 0 = unthrottled). Bounds the op
    /// counts a verifier must replay (a replay runs about 50 million ops per second), so a drill
    /// stays light however long it runs; unthrottled, a vCPU runs tens of millions of ops per second.
    public var opRateLimit: UInt64 = 1_000_000
    /// Most pages per second the whole guest may newly dirty (default 0 = unthrottled). Split
    /// evenly across vCPUs; enforced with the injected host clock.
    public var dirtyRateLimit: UInt64 = 0
    /// A vCPU emits one packet every this many of its stores (default 64; 0 = no packets).
    public var packetEveryStores: UInt64 = 64
    /// Every this many ops a vCPU gives a page of its region back to the host, and the next time
    /// takes it again (default 4096; 0 = no ballooning).
    public var balloonPeriod: UInt64 = 4096
    /// Size of the guest's virtual disk in bytes (default 0: no disk). A multiple of
    /// `SimConfig.diskBlockBytes`, split evenly between the vCPUs, each writing only its share.
    public var diskBytes: UInt64 = 0
    /// Every this many ops a vCPU makes a disk operation (default 16384: about 60 per second at
    /// the default op rate): a one-block write, and
    /// every `flushEveryDiskOps`-th a flush instead; its completion is recorded in guest memory.
    public var diskPeriod: UInt64 = 16384

    /// The disk's block size, bytes: one block per write.
    public static let diskBlockBytes = 4096
    /// Every this many disk operations of a vCPU one is a flush.
    public static let flushEveryDiskOps: UInt64 = 8

    public init() {}

    /// A config with the given size and seed and default workload.
    /// - Parameters:
    ///   - memoryBytes: guest memory in bytes.
    ///   - vcpus: number of vCPUs.
    ///   - seed: PRNG seed.
    public init(memoryBytes: UInt64, vcpus: Int = 2, seed: UInt64 = 1) {
        self.memoryBytes = memoryBytes
        self.vcpus = vcpus
        self.seed = seed
    }

    /// Number of guest page frames.
    public var pageCount: UInt64 { memoryBytes / UInt64(pageSize) }

    /// Throws unless every parameter is in range.
    public func validate() throws(SimError) {
        func bad(_ why: String) -> SimError { .invalidConfig(why) }
        guard StreamLimits.pageSizes.contains(UInt32(truncatingIfNeeded: pageSize)), pageSize > 0 else {
            throw bad("page size \(pageSize) is not one of \(StreamLimits.pageSizes.sorted())")
        }
        guard memoryBytes > 0, memoryBytes % UInt64(pageSize) == 0 else {
            throw bad("memory \(memoryBytes) bytes is not a positive multiple of the page size \(pageSize)")
        }
        guard memoryBytes <= 1 << 44 else { throw bad("memory \(memoryBytes) bytes is above the 16 TiB limit") }
        guard (1...1024).contains(vcpus) else { throw bad("vcpus \(vcpus) is outside 1…1024") }
        guard packetEveryStores <= 1 << 32, balloonPeriod <= 1 << 32 else {
            throw bad("packet period \(packetEveryStores) stores or balloon period \(balloonPeriod) ops is beyond 2^32")
        }
        guard opRateLimit <= 1 << 40, dirtyRateLimit <= 1 << 40 else {
            throw bad("rate limits \(opRateLimit) ops/s and \(dirtyRateLimit) pages/s are beyond 2^40")
        }
        guard workingSetFraction > 0, workingSetFraction <= 1 else {
            throw bad("working-set fraction \(workingSetFraction) is outside (0, 1]")
        }
        guard hotSetFraction > 0, hotSetFraction <= 1 else {
            throw bad("hot-set fraction \(hotSetFraction) is outside (0, 1]")
        }
        guard hotProbability >= 0, hotProbability <= 1 else {
            throw bad("hot probability \(hotProbability) is outside [0, 1]")
        }
        guard storeRatio >= 0, storeRatio <= 1 else { throw bad("store ratio \(storeRatio) is outside [0, 1]") }
        let region = WorkloadShape.regionPages(self)
        guard region >= 2 else {
            throw bad("each vCPU's region would hold \(region) pages (working set \(workingSetFraction) of "
                + "\(pageCount) pages over \(vcpus) vCPUs); it needs at least 2")
        }
        if diskBytes > 0 {
            let block = UInt64(Self.diskBlockBytes)
            guard diskBytes % block == 0, diskBytes <= 1 << 40, diskBytes / block >= UInt64(vcpus) else {
                throw bad("disk \(diskBytes) bytes is not a multiple of \(block) up to 1 TiB with a block per vCPU")
            }
            guard diskPeriod >= 2, diskPeriod <= 1 << 32 else { throw bad("disk period \(diskPeriod) ops is outside 2…2^32") }
            guard WorkloadShape(self).workingSetStart >= UInt64(vcpus) else {
                throw bad("no room below the working set for the vCPUs' disk completion pages")
            }
        }
    }

    // MARK: DOMAIN_CONFIG body

    /// First line of the encoded form; names the format and its version.
    static let magicLine = "remus-sim-config 1"
    /// Longest body `init(_:)` accepts, in bytes.
    static let maxEncodedBytes = 4096

    private var fields: [(String, String)] {
        [
            ("memory-bytes", String(memoryBytes)),
            ("page-size", String(pageSize)),
            ("vcpus", String(vcpus)),
            ("seed", String(seed)),
            ("working-set-fraction", String(workingSetFraction)),
            ("hot-set-fraction", String(hotSetFraction)),
            ("hot-probability", String(hotProbability)),
            ("store-ratio", String(storeRatio)),
            ("op-rate-limit", String(opRateLimit)),
            ("dirty-rate-limit", String(dirtyRateLimit)),
            ("packet-every-stores", String(packetEveryStores)),
            ("balloon-period", String(balloonPeriod)),
        ] + (diskBytes == 0 ? [] : [("disk-bytes", String(diskBytes)), ("disk-period", String(diskPeriod))])
    }

    /// Keys a DOMAIN_CONFIG may leave out (a guest without a disk, and streams from before disks).
    private static let optionalKeys: Set<String> = ["disk-bytes", "disk-period"]

    /// The DOMAIN_CONFIG the backup builds the replica from: UTF-8 text, a `remus-sim-config 1`
    /// line, then one `key=value` line per parameter. Doubles print in their shortest exact form.
    public func encode() -> DomainConfig {
        var text = Self.magicLine + "\n"
        for (key, value) in fields { text += key + "=" + value + "\n" }
        return DomainConfig(format: .simulated, bytes: Array(text.utf8))
    }

    /// Decodes and validates a DOMAIN_CONFIG written by `encode()`. Rejects another format, another
    /// version, unknown, missing or repeated keys, and values out of range.
    public init(_ domainConfig: DomainConfig) throws(SimError) {
        func bad(_ why: String) -> SimError { .invalidConfig(why) }
        guard domainConfig.format == .simulated else {
            throw bad("DOMAIN_CONFIG format \(domainConfig.format) is not the simulated guest's")
        }
        guard domainConfig.bytes.count <= Self.maxEncodedBytes else {
            throw bad("body of \(domainConfig.bytes.count) bytes exceeds \(Self.maxEncodedBytes)")
        }
        guard let text = String(validating: domainConfig.bytes, as: UTF8.self) else {
            throw bad("body is not UTF-8")
        }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        if lines.last == "" { lines.removeLast() }
        guard let first = lines.first, first == Self.magicLine else {
            throw bad("first line is not '\(Self.magicLine)' (found '\(lines.first.map { String($0.prefix(40)) } ?? "")')")
        }
        var values: [String: Substring] = [:]
        for (number, line) in lines.dropFirst().enumerated() {
            guard let eq = line.firstIndex(of: "=") else { throw bad("line \(number + 2) has no '='") }
            let key = String(line[..<eq])
            guard values[key] == nil else { throw bad("key '\(key)' repeated on line \(number + 2)") }
            values[key] = line[line.index(after: eq)...]
        }
        var config = SimConfig()
        let known = Set(config.fields.map(\.0)).union(Self.optionalKeys)
        if let unknown = values.keys.sorted().first(where: { !known.contains($0) }) {
            throw bad("unknown key '\(unknown.prefix(40))'")
        }
        func take<T: LosslessStringConvertible>(_ key: String, _ type: T.Type) throws(SimError) -> T {
            guard let raw = values[key] else { throw bad("key '\(key)' missing") }
            guard let value = T(String(raw)) else { throw bad("key '\(key)': '\(raw.prefix(40))' is not a \(T.self)") }
            return value
        }
        config.memoryBytes = try take("memory-bytes", UInt64.self)
        config.pageSize = try take("page-size", Int.self)
        config.vcpus = try take("vcpus", Int.self)
        config.seed = try take("seed", UInt64.self)
        config.workingSetFraction = try take("working-set-fraction", Double.self)
        config.hotSetFraction = try take("hot-set-fraction", Double.self)
        config.hotProbability = try take("hot-probability", Double.self)
        config.storeRatio = try take("store-ratio", Double.self)
        config.opRateLimit = try take("op-rate-limit", UInt64.self)
        config.dirtyRateLimit = try take("dirty-rate-limit", UInt64.self)
        config.packetEveryStores = try take("packet-every-stores", UInt64.self)
        config.balloonPeriod = try take("balloon-period", UInt64.self)
        if values["disk-bytes"] != nil { config.diskBytes = try take("disk-bytes", UInt64.self) }
        if values["disk-period"] != nil { config.diskPeriod = try take("disk-period", UInt64.self) }
        try config.validate()
        self = config
    }
}
