import Glibc
import RemusCore
import RemusDisk
import RemusSim
import RemusXen

/// The one place in the runtime that names the backends. The daemons ask it for the guest to
/// protect or for a replica of a primary's stream; from then on they switch over what the guest
/// or the replica says it is (its capture or commit mode, what its activation hands back),
/// never over its type or its backend.
///
/// The standard factory knows the simulated guest (`SimulatedBackend.swift`) and Xen
/// (`XenBackend.swift`, whose libraries are opened only when it is first used). Tests build one
/// with a fake replica, since a real Xen replica needs libxl in a dom0.
struct BackendFactory: Sendable {
    /// Opens the guest `remusd protect` protects, as `config.backend` says.
    typealias PrimaryOpener = @Sendable (_ config: ProtectConfiguration, _ clock: any HostClock) throws -> OpenedGuest
    /// Builds an empty replica for a primary's stream, as its header's backend says; a guest
    /// that runs in this process after a takeover sends its NIC's packets to `guestNIC`.
    typealias ReplicaMaker = @Sendable (_ header: StreamHeader, _ guestNIC: any PacketSink, _ clock: any HostClock) throws -> BackupReplica

    private let primaryOpener: PrimaryOpener
    private let replicaMaker: ReplicaMaker

    /// A factory whose primaries or replicas come from elsewhere (tests); by default the standard ones.
    init(openPrimary: @escaping PrimaryOpener = BackendFactory.openStandardPrimary,
         makeReplica: @escaping ReplicaMaker = BackendFactory.makeStandardReplica) {
        primaryOpener = openPrimary
        replicaMaker = makeReplica
    }

    /// The backends of this build: the simulated guest and Xen.
    static let standard = BackendFactory()

    /// Opens the guest to protect with its output buffer. Nothing is changed on the guest when
    /// this throws.
    func openPrimary(for config: ProtectConfiguration, clock: any HostClock) throws -> OpenedGuest {
        try primaryOpener(config, clock)
    }

    /// An empty replica for the stream that starts with `header`; the primary's DOMAIN_CONFIG
    /// configures it.
    func makeReplica(for header: StreamHeader, guestNIC: any PacketSink, clock: any HostClock) throws -> BackupReplica {
        try replicaMaker(header, guestNIC, clock)
    }

    /// The guest memory a primary's hello declares, bytes, read from its DOMAIN_CONFIG before
    /// anything is built for it (the backup checks it against its memory budget).
    static func declaredGuestBytes(_ header: StreamHeader, _ config: DomainConfig) throws -> UInt64 {
        switch config.format {
        case .simulated: return try SimConfig(config).memoryBytes
        case .libxlJSON: return try XenDomainConfigPolicy.declaredMemoryBytes(config.bytes)
        }
    }

    /// Refuses a DOMAIN_CONFIG that names files, scripts or bridges of this host outside the
    /// operator's `policy` (Xen; a simulated guest names none). The disks named in `replicated`
    /// are exempt: the backup serves them from its own copies (`placeDisks`), never from the
    /// paths the primary named.
    static func checkHostResources(_ config: DomainConfig, policy: XenPathPolicy, replicated: Set<String> = []) throws {
        switch config.format {
        case .simulated: return
        case .libxlJSON: try policy.check(config.bytes, replaced: XenDomainDisks.replacedPaths(config.bytes, vdevs: replicated))
        }
    }

    /// The DOMAIN_CONFIG the replica is built from, with each replicated disk (`described`)
    /// served from this backup's image of it in `directory`, and what serves them (held as long
    /// as the replica: Xen attaches an image file to a loop device, since blkback serves block
    /// devices; an image that is a block device, or a symbolic link to one such as a logical
    /// volume, is served as it is). The simulated guest's configuration names no disk: unchanged.
    /// Throws, with nothing attached, naming the disk and what to do.
    static func placeDisks(_ config: DomainConfig, described: [DiskDescriptor], directory: String) throws -> (DomainConfig, [AnyObject]) {
        switch config.format {
        case .simulated:
            return (config, [])
        case .libxlJSON:
            var loops: [LoopDevice] = []
            var devices: [String: String] = [:]
            for disk in described {
                let image = try BackupDisks.imagePath(of: disk, in: directory)
                var st = stat()
                let kind = stat(image, &st) == 0 ? st.st_mode & S_IFMT : 0
                switch kind {
                case S_IFBLK:
                    // blkback gives the guest the device's own sectors: other than those its
                    // primary served, its partition table would be misplaced after a failover.
                    let sector = DiskFile.logicalSectorSize(atPath: image)
                    guard sector == disk.blockSize else {
                        throw ProtocolError("disk '\(disk.name)': \(image) has \(sector.map { "\($0)-byte" } ?? "unknown") logical sectors, and the primary serves the disk with \(disk.blockSize)-byte ones; the guest would find its partitions misplaced after a failover — nothing was changed; give it a volume with \(disk.blockSize)-byte sectors (or an image file)")
                    }
                    devices[disk.name] = realPath(image) ?? image
                case S_IFREG:
                    do { loops.append(try LoopDevice(imagePath: image)) } catch {
                        throw ProtocolError("disk '\(disk.name)': cannot serve \(image) to the Xen guest: \(error); nothing was changed")
                    }
                    devices[disk.name] = loops.last!.path
                default:
                    throw ProtocolError("disk '\(disk.name)': this backup has no image \(image); nothing was changed — create it with at least \(disk.sizeBytes) bytes (truncate -s \(disk.sizeBytes) \(image)), or make it a symbolic link to a logical volume of that size")
                }
            }
            let placed = try XenDomainDisks.placing(config.bytes, devices: devices)
            return (DomainConfig(format: .libxlJSON, bytes: placed), loops)
        }
    }

    /// `path` with every symbolic link resolved (realpath), or nil.
    private static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    @Sendable
    private static func openStandardPrimary(_ config: ProtectConfiguration, clock: any HostClock) throws -> OpenedGuest {
        switch config.backend {
        case .simulated: return try SimulatedBackend.openPrimary(config, clock: clock)
        case .xen: return try XenBackend.openPrimary(config)
        }
    }

    @Sendable
    private static func makeStandardReplica(for header: StreamHeader, guestNIC: any PacketSink, clock: any HostClock) throws -> BackupReplica {
        switch header.backend {
        case .simulated: return SimulatedBackend.makeReplica(sink: guestNIC, clock: clock)
        case .xen:
            // The domain's disks already are this backup's images (`placeDisks`), which hold the
            // committed checkpoint by the time the guest is activated.
            return BackupReplica(try XenBackend.makeReplica(), attachDisks: { _, _ in })
        }
    }
}

/// A guest opened for protection.
struct OpenedGuest {
    let guest: any PrimaryGuest
    /// Holds the guest's output back until the backup acknowledged the epoch that sent it.
    let output: any OutputBuffer
    /// Undoes what opening set up, once protection has ended (Xen: ends the checkpointed save,
    /// so the guest runs on unprotected, and removes the plug qdiscs from its vifs).
    let close: () -> Void
}

/// A replica as the backup daemon keeps it: the backend's replica and the backend's own check of
/// the guest it activates.
struct BackupReplica {
    let target: any ReplicaTarget
    /// Checks the activated guest for `--activation-report` and returns the report's fields (the
    /// simulated guest: memory and registers against a replay, the first clock reading); nil for
    /// a backend that has no such check.
    let verifyActivation: ((_ clock: any HostClock) throws -> [String: String])?
    /// Hands the replicated disks (each with its image's path, at the committed checkpoint) to
    /// the guest the replica will activate; with `snapshot`, the backend also keeps their content
    /// for `verifyActivation`. nil: the backend takes no disks.
    let attachDisks: ((_ disks: [(DiskDescriptor, String)], _ snapshot: Bool) throws -> Void)?
    /// The committed state as the activation report records it (the simulated guest), for the
    /// injected faults (`InjectedFault`); nil for a backend without it. Any thread.
    let committedFields: (@Sendable () -> [String: String]?)?

    init(_ target: any ReplicaTarget, verifyActivation: ((_ clock: any HostClock) throws -> [String: String])? = nil,
         committedFields: (@Sendable () -> [String: String]?)? = nil,
         attachDisks: ((_ disks: [(DiskDescriptor, String)], _ snapshot: Bool) throws -> Void)? = nil) {
        self.committedFields = committedFields
        self.attachDisks = attachDisks
        self.target = target
        self.verifyActivation = verifyActivation
    }
}
