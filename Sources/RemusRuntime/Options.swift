import Glibc
import RemusTLS
import RemusCore
import RemusXen

/// Parameters of the simulated guest chosen on the command line.
public struct SimulatedGuestParameters: Equatable, Sendable {
    /// Guest memory in bytes.
    public var memoryBytes: UInt64
    public var vcpus: Int
    /// Pages dirtied per second across the guest (0: unthrottled).
    public var dirtyRate: UInt64
    public var seed: UInt64
    /// The virtual disk's image (created sparse when missing), replicated with the checkpoints;
    /// nil: the guest has no disk.
    public var diskPath: String?
    /// The virtual disk's size in bytes (with `diskPath`).
    public var diskBytes: UInt64
    public init(memoryBytes: UInt64, vcpus: Int, dirtyRate: UInt64, seed: UInt64, diskPath: String? = nil, diskBytes: UInt64 = 16 << 20) {
        self.memoryBytes = memoryBytes
        self.vcpus = vcpus
        self.dirtyRate = dirtyRate
        self.seed = seed
        self.diskPath = diskPath
        self.diskBytes = diskBytes
    }
}

/// The simulated guest's NIC over a real tap device (`--sim-nic-tap`): its packets enter the
/// host as UDP frames written into the tap, and a plug qdisc on the tap holds them (`--netbuf`).
public struct SimNICTapConfiguration: Equatable, Sendable {
    /// The existing, persistent tap the guest's frames are written to.
    public var tap: String
    /// Interfaces whose output a plug qdisc holds until acknowledged (the tap; empty with
    /// `--unsafe --no-netbuf`: frames then leave at once).
    public var netbuf: [String]
    /// Bytes each plug may hold before it drops (default 10 MiB).
    public var netbufLimitBytes: Int
    public init(tap: String, netbuf: [String], netbufLimitBytes: Int) {
        self.tap = tap
        self.netbuf = netbuf
        self.netbufLimitBytes = netbufLimitBytes
    }
}

/// Everything `remusd protect` needs.
public struct ProtectConfiguration: Sendable {
    /// The guest's name (a Xen domain name, or the simulated guest's name).
    public var domain: String
    public var backup: Endpoint
    public var backend: BackendKind
    public var settings: ProtectionSettings
    public var simulated: SimulatedGuestParameters
    /// Where released simulated-NIC packets go.
    public var nicSink: Endpoint?
    /// Most pages one checkpoint may hold (staging arena size).
    public var maxCheckpointPages: Int
    /// Output is not held back at all (`--unsafe --no-netbuf`).
    public var unsafeNoNetbuf: Bool
    /// Nothing is sent to a backup; checkpoints are taken and dropped (`--unsafe --blackhole`).
    public var blackhole: Bool
    /// Status socket path.
    public var statusSocket: String
    /// The witness that decides which copy is active, if any.
    public var witness: WitnessConfiguration?
    /// The simulated NIC over a tap, with plug-qdisc buffering; nil: the in-process buffer and `nicSink` over TCP.
    public var simNICTap: SimNICTapConfiguration?
    /// Bytes each plug qdisc on a Xen domain's vifs may hold (`--netbuf-limit`).
    public var netbufLimitBytes = 10 << 20
    /// Serve the metrics as Prometheus text here (`--metrics-listen`); nil: not served.
    public var metricsListen: Endpoint?
    /// How the connection to the backup is protected (mutual TLS unless `--insecure-plaintext`).
    public var security: ChannelSecurity
    /// A Xen domain's disks remusd serves and replicates (`--xen-disk`); empty: none.
    public var xenDisks: [XenServedDisk] = []
    /// How long to wait for the Xen domain to appear (`--wait-for-domain`), ms; 0: it must exist.
    public var waitForDomainMs = 0

    public init(domain: String, backup: Endpoint, backend: BackendKind, settings: ProtectionSettings,
                simulated: SimulatedGuestParameters, nicSink: Endpoint?, maxCheckpointPages: Int,
                unsafeNoNetbuf: Bool, blackhole: Bool, statusSocket: String, security: ChannelSecurity,
                witness: WitnessConfiguration? = nil, simNICTap: SimNICTapConfiguration? = nil) {
        self.security = security
        self.witness = witness
        self.simNICTap = simNICTap
        self.domain = domain
        self.backup = backup
        self.backend = backend
        self.settings = settings
        self.simulated = simulated
        self.nicSink = nicSink
        self.maxCheckpointPages = maxCheckpointPages
        self.unsafeNoNetbuf = unsafeNoNetbuf
        self.blackhole = blackhole
        self.statusSocket = statusSocket
    }
}

/// A Xen guest's disk that remusd serves to the domain and replicates (`--xen-disk
/// xvda=/srv/vm.img,/dev/nbd0`): the image is served as the block device, which the domain
/// must use for its disk `vdev` (`phy:/dev/nbd0,xvda,w`).
public struct XenServedDisk: Equatable, Sendable {
    /// The guest's name for the disk (the domain configuration's vdev), also its name on the
    /// backup (`--disk-dir`/vdev).
    public var vdev: String
    /// The image file holding the disk.
    public var image: String
    /// The NBD device it is served as (`/dev/nbdN`).
    public var device: String

    public init(vdev: String, image: String, device: String) {
        self.vdev = vdev
        self.image = image
        self.device = device
    }

    /// Parses `vdev=image,/dev/nbdN`; nil with the reason when it is not that.
    public static func parse(_ text: String) -> Result<XenServedDisk, ParseFailure> {
        guard let eq = text.firstIndex(of: "="), let comma = text.lastIndex(of: ","), eq < comma else {
            return .failure(ParseFailure("'\(text)' is not vdev=image,/dev/nbdN"))
        }
        let vdev = String(text[..<eq]), image = String(text[text.index(after: eq)..<comma]), device = String(text[text.index(after: comma)...])
        guard !vdev.isEmpty, vdev.utf8.count <= 255, !vdev.contains("/"), vdev != ".", vdev != ".." else {
            return .failure(ParseFailure("'\(vdev)' is not a disk name (the domain's vdev, e.g. xvda: 1 to 255 bytes, no '/')"))
        }
        guard image.hasPrefix("/") else { return .failure(ParseFailure("the image '\(image)' must be an absolute path")) }
        guard device.hasPrefix("/dev/nbd"), UInt32(device.dropFirst("/dev/nbd".count)) != nil else {
            return .failure(ParseFailure("'\(device)' is not an NBD device (/dev/nbdN)"))
        }
        return .success(XenServedDisk(vdev: vdev, image: image, device: device))
    }

    /// Why a `--xen-disk` value was refused.
    public struct ParseFailure: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }
}

/// `--witness etcd://host:port/key` and its lease.
public struct WitnessConfiguration: Equatable, Sendable {
    /// The etcd URL.
    public var url: String
    /// Lease time to live, seconds (`--witness-ttl`, default 3; etcd raises it to at least 2).
    public var ttlSeconds: Int
    /// Output is released only while the lease has more than this left, nanoseconds (a third of the TTL).
    public var marginNs: UInt64 { UInt64(ttlSeconds) * 1_000_000_000 / 3 }
    /// One etcd request may take at most a quarter of the TTL (at most 1 s), so several renewals
    /// fit before the deadline.
    public var requestTimeoutMs: Int { min(1000, ttlSeconds * 250) }
    /// The certificate, key and CA for mutual TLS with etcd; nil: plaintext (a lab etcd).
    public var tls: TLSFiles?
    public init(url: String, ttlSeconds: Int, tls: TLSFiles?) {
        self.url = url
        self.ttlSeconds = ttlSeconds
        self.tls = tls
    }

    /// The witness this configuration names, over mutual TLS when `tls` is given.
    public func makeWitness() throws(WitnessError) -> EtcdWitness {
        try EtcdWitness(url: url, requestTimeoutMs: requestTimeoutMs, tls: tls)
    }
}

/// How the backup makes sure the primary is off before it takes over.
public enum FenceConfiguration: Equatable, Sendable {
    /// Run this shell command; exit status 0 means the primary is off.
    case command(String)
    /// Hold the witness key: the primary's lease has run out, so it released nothing since.
    case witness(WitnessConfiguration)
    /// Wait for `remusd failover --activate`.
    case operatorOnly
    /// Take over without fencing.
    case unsafeNoFence
}

/// Everything `remusd receive` needs.
public struct ReceiveConfiguration: Sendable {
    public var listen: Endpoint
    public var settings: ProtectionSettings
    public var fence: FenceConfiguration
    /// After taking over, protect the guest towards this backup.
    public var reprotectTo: Endpoint?
    /// Where released simulated-NIC packets go once the guest runs here.
    public var nicSink: Endpoint?
    /// Write an activation report (for the drill's verifier) to this file.
    public var activationReport: String?
    /// Exit after the guest was activated and (if asked) protection towards `reprotectTo` ended.
    public var exitAfterProtection: Bool
    /// Status socket path.
    public var statusSocket: String
    /// The taken-over guest's NIC over this tap, with plug-qdisc buffering when protected onwards.
    public var simNICTap: SimNICTapConfiguration?
    /// How long the `--fence` command may run before its process group is killed and the attempt
    /// counts as not fenced, milliseconds (`--fence-timeout`, default 5000).
    public var fenceTimeoutMs: Int = defaultFenceTimeoutMs
    /// Serve the metrics as Prometheus text here (`--metrics-listen`); nil: not served.
    public var metricsListen: Endpoint?
    /// How primaries must connect (mutual TLS unless `--insecure-plaintext`); also how a guest
    /// taken over here is protected onwards (`reprotectTo`).
    public var security: ChannelSecurity
    /// Which primaries and guests this backup takes a stream from (`--accept-guest`,
    /// `--memory-budget`); see `PrimaryAdmission`.
    public var admission = PrimaryAdmission(guestMemoryBudget: physicalMemoryBytes())
    /// Connections that may wait at once for their TLS handshake and hello
    /// (`--max-pending-connections`); more are closed at once.
    public var maxPendingConnections = defaultMaxPendingConnections
    /// Longest from the end of the TLS handshake (plaintext: the accept) to the primary's stream
    /// header and DOMAIN_CONFIG, milliseconds (`--hello-timeout`).
    public var helloTimeoutMs = defaultHelloTimeoutMs
    /// What a Xen primary's DOMAIN_CONFIG may name on this host (`--xen-allow-path`,
    /// `--xen-allow-bridge`).
    public var xenPaths = XenPathPolicy()
    /// Where the replicated disks' images live (`--disk-dir`): one per disk, named as the primary
    /// names it, plus the redo log and spill files. nil: this backup does not offer DISKS.
    public var diskDirectory: String?
    /// Most bytes of disk records one checkpoint may carry (`--max-disk-checkpoint`): checked as
    /// each record arrives, before it is staged; it also bounds the connection's spill file and
    /// the redo log's record.
    public var maxDiskBytesPerCheckpoint = StreamLimits.defaultMaxDiskBytesPerCheckpoint
    /// Bytes of one checkpoint's disk records held in memory before the rest spills to a file in
    /// the disk directory (`--disk-staging-memory`).
    public var diskStagingMemoryBytes = defaultDiskStagingMemoryBytes

    public init(listen: Endpoint, settings: ProtectionSettings, fence: FenceConfiguration, reprotectTo: Endpoint?,
                nicSink: Endpoint?, activationReport: String?, exitAfterProtection: Bool, statusSocket: String,
                security: ChannelSecurity, simNICTap: SimNICTapConfiguration? = nil) {
        self.security = security
        self.simNICTap = simNICTap
        self.listen = listen
        self.settings = settings
        self.fence = fence
        self.reprotectTo = reprotectTo
        self.nicSink = nicSink
        self.activationReport = activationReport
        self.exitAfterProtection = exitAfterProtection
        self.statusSocket = statusSocket
    }
}

/// The default `--max-pending-connections` of `remusd receive`.
public let defaultMaxPendingConnections = 16

/// The default `--disk-staging-memory` of `remusd receive`, bytes (32 MiB).
public let defaultDiskStagingMemoryBytes = 32 << 20

/// The smallest `--max-disk-checkpoint` of `remusd receive`, bytes (260 MiB): a primary bounds a
/// checkpoint's disk journal at 256 MiB (and primaries before 2026-12 copied their disks in
/// pre-copy rounds of 256 MiB), plus the records' headers.
public let minDiskBytesPerCheckpoint: UInt64 = 260 << 20

/// The default `--hello-timeout` of `remusd receive`, milliseconds.
public let defaultHelloTimeoutMs = 3000

/// This host's physical memory, bytes: the default `--memory-budget` (a backup holds its
/// replica in memory; a guest larger than the host cannot be held).
public func physicalMemoryBytes() -> UInt64 {
    UInt64(max(sysconf(Int32(_SC_PHYS_PAGES)), 1)) * UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 1))
}

/// The default `--fence-timeout` of `remusd receive`, milliseconds.
public let defaultFenceTimeoutMs = 5000

/// The default port of `remusd receive`.
public let defaultPort: UInt16 = 7788
