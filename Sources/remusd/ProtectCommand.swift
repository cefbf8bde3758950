import ArgumentParser
import Glibc
import RemusCore
import RemusRuntime
import RemusTLS

extension BackendKind: ExpressibleByArgument {
    public init?(argument: String) {
        switch argument {
        case "sim", "simulated": self = .simulated
        case "xen": self = .xen
        default: return nil
        }
    }
    public static var allValueStrings: [String] { ["sim", "xen"] }
}

/// `remusd protect <domain> <backup-host[:port]>`
struct Protect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Protect a running guest by checkpointing it to a backup host.",
        discussion: """
            Runs until stopped (SIGINT/SIGTERM or 'remusd stop'). With the simulated backend the guest is created here and runs inside this process. With the Xen backend (root in dom0 of the Xen release remusd was built for: 4.17 or 4.20) the guest is a running PV, PVH or HVM domain created with 'xl create' (PV needs a hypervisor with shadow paging); every vif of it is buffered by plug qdiscs, and the backup builds it as '<domain>--incoming' (see Docs/xen.md).
            """)

    @Argument(help: "The guest to protect (a Xen domain name, or a name for the simulated guest).")
    var domain: String

    @Argument(help: ArgumentHelp("The backup running 'remusd receive' (default port \(defaultPort)).", valueName: "backup-host[:port]"))
    var backup: String

    @Option(help: ArgumentHelp("Hypervisor backend: sim or xen (default: xen when a Xen hypervisor is present, else sim).", valueName: "backend"))
    var backend: BackendKind?

    @OptionGroup var timing: TimingOptions
    @OptionGroup(title: "Replication channel") var channel: ChannelOptions
    @OptionGroup var sim: SimulatedGuestOptions
    @OptionGroup var tap: SimNICTapOptions

    @Option(name: .customLong("connect-timeout"), help: ArgumentHelp("Longest one connection attempt to the backup may take, handshake included; then it counts as failed and is retried with backoff (a frozen backup accepts the TCP connection but never answers).", valueName: "ms"))
    var connectTimeout: UInt64 = 3000

    @Option(name: .customLong("max-checkpoint"), help: ArgumentHelp("Largest checkpoint the staging area holds.", valueName: "MiB"))
    var maxCheckpointMiB: Int = 256

    @Flag(help: "Allow the unsafe switches below (as xl remus's -F).")
    var unsafe = false

    @Flag(name: .customLong("no-netbuf"), help: "Do not hold back the guest's output (needs --unsafe: breaks output commit).")
    var noNetbuf = false

    @Flag(help: "Take checkpoints but send them nowhere (needs --unsafe: no protection at all; for measuring overhead).")
    var blackhole = false

    @Option(name: .customLong("status-socket"), help: ArgumentHelp("Status socket (default: <run dir>/<domain>.sock).", valueName: "path"))
    var statusSocket: String?

    @Option(name: .customLong("xen-disk"), help: ArgumentHelp("Serve the Xen guest's disk <vdev> from <image> (an image file, or a block device such as a logical volume, opened exclusively) as the NBD device <dev> and replicate every write to it with the checkpoints (Docs/disks.md). The domain must use that device for that disk (disk = ['phy:/dev/nbd0,xvda,w']); a domain that writes to a disk remusd does not serve is refused. The backup needs --disk-dir with an image named <vdev>. Repeatable.", valueName: "vdev=image,/dev/nbdN"))
    var xenDisks: [String] = []

    @Option(name: .customLong("wait-for-domain"), help: ArgumentHelp("Wait this long for the Xen domain to appear (start remusd with --xen-disk first, then 'xl create' the domain on the NBD devices it serves); 0: it must exist already.", valueName: "s"))
    var waitForDomain: Int = 0

    @OptionGroup var metrics: MetricsOptions

    func validate() throws {
        for text in xenDisks {
            if case .failure(let why) = XenServedDisk.parse(text) { throw ValidationError("--xen-disk: \(why)") }
        }
        let parsed = xenDisks.compactMap { try? XenServedDisk.parse($0).get() }
        if Set(parsed.map(\.vdev)).count < parsed.count || Set(parsed.map(\.device)).count < parsed.count {
            throw ValidationError("--xen-disk: each disk needs its own name and its own NBD device")
        }
        if waitForDomain < 0 || waitForDomain > 86_400 { throw ValidationError("--wait-for-domain must be between 0 and 86400 s, got \(waitForDomain)") }
        if (noNetbuf || blackhole) && !unsafe {
            throw ValidationError("--no-netbuf and --blackhole give up protection; they need --unsafe as well")
        }
        if domain.allSatisfy(\.isWhitespace) {
            throw ValidationError("the guest to protect has an empty name; give the Xen domain's name (or a name for the simulated guest)")
        }
        guard let endpoint = Endpoint(parsing: backup, defaultPort: defaultPort) else {
            throw ValidationError("backup '\(backup)' is not host[:port] (IPv6 as [addr]:port)")
        }
        if endpoint.port == 0 {
            throw ValidationError("backup '\(backup)': port 0 is no port a backup listens on; give the port of its 'remusd receive' (default \(defaultPort))")
        }
        if maxCheckpointMiB < 1 { throw ValidationError("--max-checkpoint must be at least 1 MiB") }
        if connectTimeout < 1 || connectTimeout > 3_600_000 { throw ValidationError("--connect-timeout must be between 1 ms and one hour, got \(connectTimeout) ms") }
        if noNetbuf && tap.netbuf != nil { throw ValidationError("--no-netbuf and --netbuf contradict each other; choose one") }
        if tap.tap != nil && sim.nicSink == nil {
            throw ValidationError("--sim-nic-tap needs --nic-sink host:port: its port is the UDP port the guest's frames go to")
        }
        try channel.validate(addresses: [("the backup", endpoint)])
        _ = try timing.witnessConfiguration(channel: channel)
    }

    func run() throws {
        let kind = backend ?? (xenHypervisorPresent() ? .xen : .simulated)
        var settings = timing.settings(backend: kind)
        settings.connectTimeoutNs = connectTimeout * 1_000_000
        var config = ProtectConfiguration(
            domain: domain,
            backup: Endpoint(parsing: backup, defaultPort: defaultPort)!,
            backend: kind,
            settings: settings,
            simulated: sim.parameters,
            nicSink: sim.nicSink.flatMap { Endpoint(parsing: $0, defaultPort: 0) },
            maxCheckpointPages: maxCheckpointMiB * 256,
            unsafeNoNetbuf: noNetbuf,
            blackhole: blackhole,
            statusSocket: statusSocket ?? RunDirectory.socketPath(for: domain),
            security: channel.security(),
            witness: try timing.witnessConfiguration(channel: channel),
            simNICTap: tap.configuration(holding: !noNetbuf))
        config.netbufLimitBytes = tap.netbufLimit
        config.metricsListen = metrics.endpoint
        config.xenDisks = xenDisks.compactMap { try? XenServedDisk.parse($0).get() }
        config.waitForDomainMs = waitForDomain * 1000
        if kind != .xen && (!config.xenDisks.isEmpty || waitForDomain > 0) {
            throw ValidationError("--xen-disk and --wait-for-domain are for a Xen domain (--backend xen); the simulated guest's disk is --sim-disk")
        }
        let code = try PrimaryDaemon(config, metrics: metrics.bootstrap()).run()
        if code != 0 { throw ExitCode(code) }
    }
}

/// `remusd receive`
struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the backup daemon: receive checkpoints, acknowledge committed ones, take over when the primary is lost.")

    @Option(help: ArgumentHelp("Address to listen on.", valueName: "host:port"))
    var listen: String = "0.0.0.0:\(defaultPort)"

    @OptionGroup var timing: TimingOptions
    @OptionGroup(title: "Replication channel") var channel: ChannelOptions

    @Option(name: .customLong("tls-allow-peer"), help: ArgumentHelp("A primary identity this backup serves: a DNS name in its certificate's subjectAltName, or its CN when it has none. Repeatable. Default: any certificate the CA (--tls-ca) signed.", valueName: "name"))
    var allowPeers: [String] = []

    @Option(name: .customLong("tls-handshake-timeout"), help: ArgumentHelp("Longest a connection may take to complete its TLS handshake; then it is dropped (a peer that stalls holds nothing longer).", valueName: "ms"))
    var handshakeTimeout: Int = defaultHandshakeTimeoutMs

    @Option(name: .customLong("accept-guest"), help: ArgumentHelp("A guest this backup serves, by name or UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx). Repeatable. Default: any guest, from any primary the channel accepts; either way, once a backup holds a guest's image only that guest's primary (same identity, same UUID) may stream to it until the operator runs 'remusd failover --discard'.", valueName: "name|uuid"))
    var acceptGuests: [String] = []

    @Option(name: .customLong("memory-budget"), help: ArgumentHelp("Largest guest memory a primary may declare, in MiB; a larger guest is refused before anything is allocated. Default: this host's physical memory.", valueName: "MiB"))
    var memoryBudget: UInt64?

    @Option(name: .customLong("max-pending-connections"), help: ArgumentHelp("Connections that may wait at once for their TLS handshake and hello; more are closed at once (the primary's own streaming connection does not count).", valueName: "n"))
    var maxPendingConnections: Int = defaultMaxPendingConnections

    @Option(name: .customLong("hello-timeout"), help: ArgumentHelp("Longest from the end of the TLS handshake (plaintext: the accept) to the primary's stream header and DOMAIN_CONFIG; then the connection is dropped.", valueName: "ms"))
    var helloTimeout: Int = defaultHelloTimeoutMs

    @Option(name: .customLong("xen-allow-path"), help: ArgumentHelp("A directory whose files a Xen primary's domain configuration may name on this host (kernel, ramdisk, firmware, disk images, device model, hotplug scripts), besides /etc/xen and /var/lib/xen. Repeatable. A configuration naming anything else is refused at the hello, naming the path.", valueName: "dir"))
    var xenAllowPaths: [String] = []

    @Option(name: .customLong("xen-allow-bridge"), help: ArgumentHelp("A bridge a Xen guest's NICs may attach to on this host, besides xenbr0. Repeatable. A configuration naming another bridge is refused at the hello.", valueName: "name"))
    var xenAllowBridges: [String] = []

    @Option(help: ArgumentHelp("Command that makes sure the primary is off (exit 0: it is; an empty command is refused). Retried every heartbeat until it succeeds. Alternatives: --witness, --unsafe-no-fence; with none the backup waits for 'remusd failover --activate'.", valueName: "command"))
    var fence: String?

    @Option(name: .customLong("fence-timeout"), help: ArgumentHelp("Longest time the --fence command may run, in ms; then its process group is killed and the primary counts as not fenced.", valueName: "ms"))
    var fenceTimeout: Int = defaultFenceTimeoutMs

    @Flag(name: .customLong("unsafe-no-fence"), help: "Take over as soon as the primary is lost, without fencing it (xl remus's behaviour; risks two running copies).")
    var unsafeNoFence = false

    @Option(name: .customLong("reprotect-to"), help: ArgumentHelp("After taking over, protect the guest towards this backup.", valueName: "host:port"))
    var reprotectTo: String?

    @Option(name: .customLong("nic-sink"), help: ArgumentHelp("Where the simulated NIC's released packets go once the guest runs here (TCP; with --sim-nic-tap only its port counts: the UDP port of the frames).", valueName: "host:port"))
    var nicSink: String?

    @OptionGroup var tap: SimNICTapOptions

    @Option(name: .customLong("disk-dir"), help: ArgumentHelp("Replicate the primary's disks into this directory (default: none; a primary whose guest has disks then refuses this backup). It holds one image per disk, named as the primary names the disk (e.g. xvda), at least the disk's size: a file, or a symbolic link to a block device such as a logical volume; remusd keeps its redo log and spill files there too.", valueName: "dir"))
    var diskDirectory: String?

    @Option(name: .customLong("max-disk-checkpoint"), help: ArgumentHelp("Most disk data one checkpoint may carry, in MiB (at least 260: a primary journals up to 256 MiB of disk writes per checkpoint); a checkpoint carrying more is dropped with its connection before the excess is staged, the replica and the images keep the last committed checkpoint. Bounds the spill file and the redo log's record too.", valueName: "MiB"))
    var maxDiskCheckpoint: UInt64 = StreamLimits.defaultMaxDiskBytesPerCheckpoint >> 20

    @Option(name: .customLong("disk-staging-memory"), help: ArgumentHelp("Disk data of one checkpoint held in memory while it arrives, in MiB; the rest spills to a file in --disk-dir until the checkpoint is complete.", valueName: "MiB"))
    var diskStagingMemory: Int = defaultDiskStagingMemoryBytes >> 20

    @Option(name: .customLong("activation-report"), help: ArgumentHelp("Write what was activated (epoch, state, memory hash, timings) to this file, for 'remusd drill'.", valueName: "path"))
    var activationReport: String?

    @Flag(name: .customLong("exit-after-protection"), help: "Exit once the guest, after taking over here, is no longer running (used by the drill).")
    var exitAfterProtection = false

    @Option(name: .customLong("status-socket"), help: ArgumentHelp("Status socket (default: <run dir>/receive-<port>.sock).", valueName: "path"))
    var statusSocket: String?

    @OptionGroup var metrics: MetricsOptions

    func validate() throws {
        guard let listenEndpoint = Endpoint(parsing: listen, defaultPort: defaultPort) else { throw ValidationError("--listen '\(listen)' is not host:port") }
        if channel.insecurePlaintext && !allowPeers.isEmpty {
            throw ValidationError("--tls-allow-peer needs mutual TLS; it means nothing with --insecure-plaintext")
        }
        for name in allowPeers where name.isEmpty || isIPAddress(name) || name.contains(where: { $0.isWhitespace || $0 == "," }) {
            throw ValidationError("--tls-allow-peer '\(name)' is not a certificate name: give the DNS name or CN of a primary's certificate (one per flag; IP addresses are not matched)")
        }
        for guest in acceptGuests where GuestSelector(parsing: guest) == nil {
            throw ValidationError("--accept-guest '\(guest)' is empty: give a guest name or UUID")
        }
        for dir in xenAllowPaths where !dir.hasPrefix("/") || dir.split(separator: "/").contains("..") {
            throw ValidationError("--xen-allow-path '\(dir)' must be an absolute directory without '..' components")
        }
        for bridge in xenAllowBridges where bridge.isEmpty || bridge.count > 15 || bridge.contains(where: { $0 == "/" || $0.isWhitespace }) {
            throw ValidationError("--xen-allow-bridge '\(bridge)' is not an interface name (1 to 15 characters, no '/' or spaces)")
        }
        if let memoryBudget, memoryBudget < 1 || memoryBudget > 1 << 24 { throw ValidationError("--memory-budget must be between 1 MiB and 16 TiB (16777216 MiB), got \(memoryBudget)") }
        if maxPendingConnections < 1 || maxPendingConnections > 4096 { throw ValidationError("--max-pending-connections must be between 1 and 4096, got \(maxPendingConnections)") }
        if maxDiskCheckpoint < minDiskBytesPerCheckpoint >> 20 || maxDiskCheckpoint > 1 << 20 {
            throw ValidationError("--max-disk-checkpoint must be between \(minDiskBytesPerCheckpoint >> 20) MiB (a primary journals up to 256 MiB of disk writes per checkpoint) and 1 TiB (1048576 MiB), got \(maxDiskCheckpoint)")
        }
        if diskStagingMemory < 1 || diskStagingMemory > 1 << 16 { throw ValidationError("--disk-staging-memory must be between 1 MiB and 64 GiB (65536 MiB), got \(diskStagingMemory)") }
        if helloTimeout < 1 || helloTimeout > 600_000 { throw ValidationError("--hello-timeout must be between 1 ms and 10 minutes, got \(helloTimeout) ms") }
        if handshakeTimeout < 1 || handshakeTimeout > 600_000 { throw ValidationError("--tls-handshake-timeout must be between 1 ms and 10 minutes, got \(handshakeTimeout) ms") }
        if let fence, fence.allSatisfy(\.isWhitespace) {
            throw ValidationError("--fence needs a command that makes sure the primary is off (exit status 0: it is); an empty one would count as fenced and could leave two copies of the guest running. To wait for the operator instead, leave --fence out")
        }
        if [fence != nil, unsafeNoFence, timing.witness != nil].filter({ $0 }).count > 1 {
            throw ValidationError("choose one way to fence the primary: --fence, --witness or --unsafe-no-fence")
        }
        for (flag, value) in [("--reprotect-to", reprotectTo), ("--nic-sink", nicSink)] {
            guard let value else { continue }
            guard let endpoint = Endpoint(parsing: value, defaultPort: defaultPort) else { throw ValidationError("\(flag) '\(value)' is not host:port") }
            if endpoint.port == 0 { throw ValidationError("\(flag) '\(value)': port 0 is no port to connect to") }
        }
        if fenceTimeout < 1 { throw ValidationError("--fence-timeout must be at least 1 ms") }
        if tap.tap != nil && nicSink == nil {
            throw ValidationError("--sim-nic-tap needs --nic-sink host:port: its port is the UDP port the taken-over guest's frames go to")
        }
        var addresses = [(flag: "--listen", endpoint: listenEndpoint)]
        if let next = reprotectTo.flatMap({ Endpoint(parsing: $0, defaultPort: defaultPort) }) { addresses.append(("--reprotect-to", next)) }
        try channel.validate(addresses: addresses)
        _ = try timing.witnessConfiguration(channel: channel)
    }

    func run() throws {
        let endpoint = Endpoint(parsing: listen, defaultPort: defaultPort)!
        let fenceConfig: FenceConfiguration = try timing.witnessConfiguration(channel: channel).map { .witness($0) }
            ?? fence.map { .command($0) } ?? (unsafeNoFence ? .unsafeNoFence : .operatorOnly)
        var config = ReceiveConfiguration(
            listen: endpoint, settings: timing.settings(), fence: fenceConfig,
            reprotectTo: reprotectTo.flatMap { Endpoint(parsing: $0, defaultPort: defaultPort) },
            nicSink: nicSink.flatMap { Endpoint(parsing: $0, defaultPort: defaultPort) },
            activationReport: activationReport, exitAfterProtection: exitAfterProtection,
            statusSocket: statusSocket ?? RunDirectory.socketPath(for: "receive-\(endpoint.port)"),
            security: channel.security(allowedPeers: allowPeers, handshakeTimeoutMs: handshakeTimeout),
            simNICTap: tap.configuration(holding: true))
        config.fenceTimeoutMs = fenceTimeout
        config.metricsListen = metrics.endpoint
        config.admission.servedGuests = acceptGuests.compactMap { GuestSelector(parsing: $0) }
        if let memoryBudget { config.admission.guestMemoryBudget = memoryBudget << 20 }
        config.maxPendingConnections = maxPendingConnections
        config.helloTimeoutMs = helloTimeout
        config.xenPaths.allowedDirectories += xenAllowPaths
        config.xenPaths.allowedBridges += xenAllowBridges
        config.diskDirectory = diskDirectory
        config.maxDiskBytesPerCheckpoint = maxDiskCheckpoint << 20
        config.diskStagingMemoryBytes = diskStagingMemory << 20
        let code = try BackupDaemon(config, metrics: metrics.bootstrap()).run()
        if code != 0 { throw ExitCode(code) }
    }
}

/// `remusd status`
struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the state of running remusd daemons on this host.")

    @Option(help: ArgumentHelp("One daemon's status socket (default: every socket in the run directory).", valueName: "path"))
    var socket: String?

    func run() throws {
        let sockets = socket.map { [$0] } ?? RunDirectory.sockets()
        if sockets.isEmpty {
            printError("no remusd daemon is running here (no status socket in \(RunDirectory.path)); start one with 'remusd protect <domain> <backup-host>' (primary) or 'remusd receive' (backup)")
            throw ExitCode(3)
        }
        var silent = 0
        for path in sockets {
            do {
                print(try StatusClient.query(path), terminator: "")
            } catch {
                printError("\(error)")
                silent += 1
            }
        }
        if silent > 0 { throw ExitCode(3) }
    }
}

/// `remusd stop`
struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "End protection cleanly: the backup discards its image and does not take over; the guest keeps running here.")

    @Argument(help: "The protected guest.")
    var domain: String

    func run() throws {
        do {
            print(try StatusClient.send("stop", toGuest: domain), terminator: "")
        } catch let error as StatusClient.NoAnswer {
            printError("\(error); nothing was stopped")
            throw ExitCode(3)
        }
    }
}

/// `remusd failover`
struct Failover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Hand a guest to its backup on purpose (planned switchover), or confirm on a backup that the primary is off (--activate).",
        discussion: """
            On the primary: 'remusd failover <domain>' suspends the guest, sends a final checkpoint, and once the backup acknowledges it the backup runs the guest and it is stopped here; no output is lost or released twice. If the acknowledgement never comes, the guest stays suspended here (never two running copies) and the backup takes over. On a backup waiting for the operator: 'remusd failover --activate' takes over. On a backup: 'remusd failover --discard' drops the image it holds (a backup never lets another primary or guest replace it by itself).
            """)

    @Argument(help: "The protected guest (on the primary, for a planned switchover).")
    var domain: String?

    @Flag(help: "On a backup waiting for the operator: the primary is off, activate the guest here.")
    var activate = false

    @Flag(help: "On a backup: drop the image it holds and its primary's connection, so that another primary or guest may stream to it (it never lets one replace a held image by itself).")
    var discard = false

    @Option(help: ArgumentHelp("The daemon's status socket (default: found in the run directory).", valueName: "path"))
    var socket: String?

    func validate() throws {
        if [activate, discard, domain != nil].filter({ $0 }).count != 1 {
            throw ValidationError("name the guest to switch over ('remusd failover <domain>' on the primary), or use --activate or --discard on a backup — one of them")
        }
    }

    func run() throws {
        if let domain {
            do {
                print(try StatusClient.send("switchover", toGuest: domain, socket: socket), terminator: "")
            } catch let error as StatusClient.NoAnswer {
                printError("\(error); nothing was switched over")
                throw ExitCode(3)
            }
            return
        }
        let candidates = socket.map { [$0] } ?? RunDirectory.sockets().filter { $0.contains("/receive-") }
        guard candidates.count == 1 else {
            throw ValidationError(candidates.isEmpty ? "no backup daemon found in \(RunDirectory.path)" : "several backups run here; name one with --socket: \(candidates.joined(separator: ", "))")
        }
        do {
            print(try StatusClient.query(candidates[0], command: activate ? "activate" : "discard"), terminator: "")
        } catch let error as StatusClient.NoAnswer {
            printError("\(error); nothing was \(activate ? "activated" : "discarded")")
            throw ExitCode(3)
        }
    }
}

/// Writes a line to standard error (messages for a person, not output to parse).
func printError(_ text: String) {
    let bytes = Array(("remusd: " + text + "\n").utf8)
    var offset = 0
    while offset < bytes.count {
        let written = bytes.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress! + offset, $0.count - offset) }
        if written < 0 && errno == EINTR { continue }
        if written <= 0 { return }
        offset += written
    }
}
