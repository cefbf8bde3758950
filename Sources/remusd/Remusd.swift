import ArgumentParser
import Glibc
import RemusCore
import RemusNetbuf
import RemusRuntime
import RemusSystem
import RemusTLS

/// `remusd`: continuous-checkpointing replication for virtual machines.
@main
struct Remusd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remusd",
        abstract: "Keep a running VM alive through the loss of its host by continuous checkpointing.",
        discussion: """
            The primary checkpoints the guest many times a second, ships each checkpoint to the backup and holds back the guest's output until the backup acknowledges that checkpoint as committed. When the primary dies the backup fences it and resumes the guest from the last committed checkpoint. 'remusd drill' shows all this on a simulated guest.
            """,
        subcommands: [Protect.self, Receive.self, Status.self, Stop.self, Failover.self, Certs.self, Drill.self, Bench.self, Netbuf.self, Disk.self]
    )

    static func main() {
        keepFreedMemoryForReuse()
        main(nil as [String]?)
    }
}

extension OverloadPolicy: ExpressibleByArgument {}

/// Timing options shared by `protect` and `receive`.
struct TimingOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Time between checkpoints.", valueName: "ms"))
    var interval: UInt64 = 100

    @Option(name: .long, help: ArgumentHelp("Time between heartbeats, both directions.", valueName: "ms"))
    var heartbeat: UInt64 = 100

    @Option(name: .long, help: ArgumentHelp("Silence after which the peer counts as lost (at least 2 heartbeats).", valueName: "ms"))
    var timeout: UInt64 = 600

    @Option(name: .customLong("fence-grace"), help: ArgumentHelp("How long a primary that lost its backup keeps the guest's output held while reconnecting, before it flows unprotected (the backup may be fencing it meanwhile).", valueName: "ms"))
    var fenceGrace: UInt64 = 2000

    @Option(name: .customLong("max-pause"), help: ArgumentHelp("Longest pause per checkpoint to aim for; a bigger dirty set is deferred and the overload policy applies (0: no bound). Default 50 for the simulated guest, 0 for Xen (its pause includes the guest's own suspend, which a throttled guest does more slowly). On a backup: for protecting onwards after a takeover.", valueName: "ms"))
    var maxPause: UInt64?

    @Option(name: .customLong("on-overload"), help: ArgumentHelp("When the guest dirties memory faster than it can be protected: throttle (slow its vCPUs), degrade (longer epochs), or abort (stop protecting, keep it running here).", valueName: "policy"))
    var onOverload: OverloadPolicy = .throttle

    @Option(help: ArgumentHelp("A witness that decides which copy is active: an etcd key held under a lease. The primary releases output only while it holds it (and pauses its guest when it cannot renew it); a backup takes over only once it holds it.", valueName: "etcd://host:port/key"))
    var witness: String?

    @Option(name: .customLong("witness-ttl"), help: ArgumentHelp("Lease time to live of the witness key (etcd raises it to at least 2).", valueName: "s"))
    var witnessTTL: Int = 3

    @Option(name: .customLong("witness-tls-cert"), help: ArgumentHelp("The certificate presented to etcd (its --client-cert-auth). Default: --tls-cert.", valueName: "path"))
    var witnessCertificate: String?

    @Option(name: .customLong("witness-tls-key"), help: ArgumentHelp("The private key of --witness-tls-cert. Default: --tls-key.", valueName: "path"))
    var witnessKey: String?

    @Option(name: .customLong("witness-tls-ca"), help: ArgumentHelp("The CA etcd's certificate must be signed by; etcd's certificate must also name the URL's host. Default: --tls-ca.", valueName: "path"))
    var witnessCA: String?

    @Flag(name: .customLong("witness-insecure-plaintext"), help: "Talk to etcd over plain HTTP: anyone on the path could forge or steal the lease that decides which copy runs. For labs; loopback only unless --insecure-plaintext-on-network. Implied by --insecure-plaintext unless --witness-tls-* are given.")
    var witnessInsecurePlaintext = false

    /// The witness, over mutual TLS with the `--witness-tls-*` files (each defaulting to the
    /// replication channel's), or plaintext when asked for; nil without `--witness`.
    func witnessConfiguration(channel: ChannelOptions) throws -> WitnessConfiguration? {
        let files = [("--witness-tls-cert", witnessCertificate), ("--witness-tls-key", witnessKey), ("--witness-tls-ca", witnessCA)]
        let given = files.filter { $0.1 != nil }.map(\.0)
        guard let witness else {
            if let flag = given.first ?? (witnessInsecurePlaintext ? "--witness-insecure-plaintext" : nil) {
                throw ValidationError("\(flag) without --witness: give the etcd URL with --witness, or leave \(flag) out")
            }
            return nil
        }
        let host: String
        do { host = try EtcdWitness(url: witness).endpoint.host } catch { throw ValidationError("--witness: \(error)") }
        if witnessInsecurePlaintext && !given.isEmpty {
            throw ValidationError("--witness-insecure-plaintext contradicts \(given.joined(separator: ", ")); choose mutual TLS or plaintext for the witness")
        }
        if witnessInsecurePlaintext || (channel.insecurePlaintext && given.isEmpty) {
            if !isLoopback(host) && !channel.insecurePlaintextOnNetwork {
                throw ValidationError("the witness at \(host) would be reached over plain HTTP, which is not loopback: anyone on that network could forge or steal the lease that decides which copy runs. Give etcd TLS (--witness-tls-cert, --witness-tls-key, --witness-tls-ca, or the --tls-* files), or, for a lab network, add --insecure-plaintext --insecure-plaintext-on-network")
            }
            return WitnessConfiguration(url: witness, ttlSeconds: witnessTTL, tls: nil)
        }
        guard let certificate = witnessCertificate ?? channel.certificate, let key = witnessKey ?? channel.key, let ca = witnessCA ?? channel.ca else {
            throw ValidationError("the witness needs mutual TLS with etcd: give --witness-tls-cert, --witness-tls-key and --witness-tls-ca (or the --tls-* files they default to), or --witness-insecure-plaintext for a lab etcd on loopback")
        }
        for (flag, path) in [("--witness-tls-cert", certificate), ("--witness-tls-key", key), ("--witness-tls-ca", ca)] where access(path, R_OK) != 0 {
            throw ValidationError("\(flag) \(path) cannot be read (\(String(cString: strerror(errno)))); nothing was started")
        }
        return WitnessConfiguration(url: witness, ttlSeconds: witnessTTL, tls: TLSFiles(certificate: certificate, key: key, ca: ca))
    }

    /// The engine's settings for a guest of `backend`: the pause bound defaults to none on Xen,
    /// where throttling the guest's CPU also slows the suspend it answers at every checkpoint.
    func settings(backend: BackendKind = .simulated) -> ProtectionSettings {
        let pauseMs = maxPause ?? (backend == .xen ? 0 : 50)
        return ProtectionSettings(intervalNs: interval * 1_000_000, heartbeatNs: heartbeat * 1_000_000, timeoutNs: timeout * 1_000_000,
                                  fenceGraceNs: fenceGrace * 1_000_000, maxPauseNs: pauseMs * 1_000_000, overload: onOverload)
    }

    func validate() throws {
        if let problem = settings().problem() { throw ValidationError(problem) }
        if witnessTTL < 1 || witnessTTL > 3600 { throw ValidationError("--witness-ttl must be between 1 and 3600 s") }
    }
}

/// Options of the simulated guest.
struct SimulatedGuestOptions: ParsableArguments {
    @Option(name: .customLong("sim-memory"), help: ArgumentHelp("Simulated guest memory.", valueName: "MiB"))
    var memoryMiB: UInt64 = 1024

    @Option(name: .customLong("sim-vcpus"), help: ArgumentHelp("Simulated guest vCPUs.", valueName: "n"))
    var vcpus: Int = 2

    @Option(name: .customLong("sim-dirty-rate"), help: ArgumentHelp("Pages the simulated guest dirties per second (0: as fast as it can).", valueName: "pages/s"))
    var dirtyRate: UInt64 = 20_000

    @Option(name: .customLong("sim-seed"), help: ArgumentHelp("Seed of the simulated guest's workload.", valueName: "n"))
    var seed: UInt64 = 1

    @Option(name: .customLong("nic-sink"), help: ArgumentHelp("Where the simulated NIC's released packets go (the outside world), host:port over TCP; with --sim-nic-tap only its port counts (the UDP port of the frames). None by default.", valueName: "host:port"))
    var nicSink: String?

    @Option(name: .customLong("sim-disk"), help: ArgumentHelp("Give the simulated guest a virtual disk 'xvda' with this image (created sparse when missing), written by its workload and replicated with every checkpoint; the backup needs --disk-dir. Default: no disk.", valueName: "path"))
    var diskPath: String?

    @Option(name: .customLong("sim-disk-size"), help: ArgumentHelp("Size of the --sim-disk disk.", valueName: "MiB"))
    var diskMiB: UInt64 = 16

    /// The guest's parameters as the runtime takes them.
    var parameters: SimulatedGuestParameters {
        SimulatedGuestParameters(memoryBytes: memoryMiB << 20, vcpus: vcpus, dirtyRate: dirtyRate, seed: seed, diskPath: diskPath, diskBytes: diskMiB << 20)
    }

    func validate() throws {
        if diskMiB < 1 || diskMiB > 1 << 20 { throw ValidationError("--sim-disk-size must be between 1 MiB and 1 TiB, got \(diskMiB)") }
        if memoryMiB < 4 || memoryMiB > 1 << 20 { throw ValidationError("--sim-memory must be between 4 MiB and 1 TiB, got \(memoryMiB)") }
        if vcpus < 1 || vcpus > 64 { throw ValidationError("--sim-vcpus must be between 1 and 64, got \(vcpus)") }
        if let nicSink, Endpoint(parsing: nicSink, defaultPort: 0) == nil { throw ValidationError("--nic-sink: '\(nicSink)' is not host:port") }
    }
}

/// The simulated guest's NIC over a real tap, and the plug qdiscs that hold its output
/// (`protect`, and `receive` for a guest it takes over).
struct SimNICTapOptions: ParsableArguments {
    @Option(name: .customLong("sim-nic-tap"), help: ArgumentHelp("Back the simulated guest's NIC with this existing, persistent tap (ip tuntap add mode tap <name>, with an IPv4 address, up): every packet becomes a UDP frame written into the tap, from the tap's address + 1 to the tap's address at the port of --nic-sink (required with it), and plug qdiscs hold the frames until acknowledged. Needs a kernel with sch_plug: build machines lack it, run inside the testbed (bash Tests/Testbed/run.sh). Default: none (in-process buffer, --nic-sink over TCP).", valueName: "tap"))
    var tap: String?

    @Option(name: .customLong("netbuf"), help: ArgumentHelp("Interfaces whose output plug qdiscs hold until the backup acknowledged it, comma-separated; must include the --sim-nic-tap tap (default: that tap).", valueName: "if[,if]"))
    var netbuf: String?

    @Option(name: .customLong("netbuf-limit"), help: ArgumentHelp("Bytes each plug may hold before it drops packets (10 MiB); with --backend xen, each plug on the domain's vifs.", valueName: "bytes"))
    var netbufLimit: Int = NetbufPlumbing.defaultLimitBytes

    var interfaces: [String] {
        netbuf.map { $0.split(separator: ",").map { String($0) } } ?? (tap.map { [$0] } ?? [])
    }

    func validate() throws {
        if netbufLimit < 1 || netbufLimit > Int(Int32.max) { throw ValidationError("--netbuf-limit must be between 1 and 2147483647 bytes, got \(netbufLimit)") }
        if let tap, tap.isEmpty || tap.utf8.count > 15 { throw ValidationError("--sim-nic-tap '\(tap)' is not an interface name (1 to 15 bytes)") }
        guard let tap else {
            if netbuf != nil {
                throw ValidationError("--netbuf needs --sim-nic-tap: the simulated guest's packets cross a real interface only through a tap")
            }
            return
        }
        if interfaces.isEmpty || interfaces.contains(where: \.isEmpty) { throw ValidationError("--netbuf '\(netbuf ?? "")' is not a comma-separated list of interfaces") }
        if !interfaces.contains(tap) {
            throw ValidationError("--netbuf must include the --sim-nic-tap tap '\(tap)', or the guest's frames would leave unbuffered")
        }
    }

    /// The runtime's configuration; `holding` false (`--unsafe --no-netbuf`) sets up no plug.
    func configuration(holding: Bool) -> SimNICTapConfiguration? {
        tap.map { SimNICTapConfiguration(tap: $0, netbuf: holding ? interfaces : [], netbufLimitBytes: netbufLimit) }
    }
}

/// The replication channel's protection, shared by `protect` and `receive`: mutual TLS unless
/// plaintext is asked for, and plaintext beyond loopback only when asked for twice.
struct ChannelOptions: ParsableArguments {
    @Option(name: .customLong("tls-cert"), help: ArgumentHelp("This host's certificate (PEM), presented to the peer. Required with --tls-key and --tls-ca unless --insecure-plaintext; 'remusd certs <dir>' makes a set.", valueName: "path"))
    var certificate: String?

    @Option(name: .customLong("tls-key"), help: ArgumentHelp("The private key of --tls-cert (PEM; keep it 0600).", valueName: "path"))
    var key: String?

    @Option(name: .customLong("tls-ca"), help: ArgumentHelp("The CA certificate(s) the peer's certificate must be signed by (PEM).", valueName: "path"))
    var ca: String?

    @Option(name: .customLong("tls-peer-name"), help: ArgumentHelp("The name the backup's certificate must carry (a DNS name in its subjectAltName, or its CN; or an IP address). Default: the host dialled. On receive: for --reprotect-to.", valueName: "name"))
    var peerName: String?

    @Flag(name: .customLong("insecure-plaintext"), help: "Replicate over plain TCP, without authentication or encryption: anyone who reaches the port can send a stream the backup runs, and the guest's memory crosses the network in clear. For labs; loopback only unless --insecure-plaintext-on-network.")
    var insecurePlaintext = false

    @Flag(name: .customLong("insecure-plaintext-on-network"), help: "With --insecure-plaintext: allow it on an address other than loopback (127.0.0.0/8, ::1).")
    var insecurePlaintextOnNetwork = false

    /// Checks the flags against the addresses the channel will use (`listen` or `backup`, and
    /// `reprotect-to`).
    func validate(addresses: [(flag: String, endpoint: Endpoint)]) throws {
        let tlsFlags = [("--tls-cert", certificate), ("--tls-key", key), ("--tls-ca", ca)]
        let given = tlsFlags.filter { $0.1 != nil }
        if insecurePlaintextOnNetwork && !insecurePlaintext {
            throw ValidationError("--insecure-plaintext-on-network only widens --insecure-plaintext; give both, or neither for mutual TLS")
        }
        if insecurePlaintext {
            if !given.isEmpty || peerName != nil {
                throw ValidationError("--insecure-plaintext contradicts \((given.map(\.0) + (peerName != nil ? ["--tls-peer-name"] : [])).joined(separator: ", ")); choose mutual TLS or plaintext")
            }
            if !insecurePlaintextOnNetwork, let remote = addresses.first(where: { !isLoopback($0.endpoint.host) }) {
                throw ValidationError("--insecure-plaintext on \(remote.flag) \(remote.endpoint), which is not loopback: anyone on that network could send this backup a guest to run or read the guest's memory. Use mutual TLS (--tls-cert, --tls-key, --tls-ca; 'remusd certs <dir>' makes a set), or, for a lab network, add --insecure-plaintext-on-network")
            }
            return
        }
        if given.count < tlsFlags.count {
            let missing = tlsFlags.filter { $0.1 == nil }.map(\.0).joined(separator: ", ")
            throw ValidationError(given.isEmpty
                ? "the replication channel needs mutual TLS: give --tls-cert, --tls-key and --tls-ca ('remusd certs <dir>' makes a throwaway CA and certificates), or --insecure-plaintext for a lab on loopback"
                : "mutual TLS needs --tls-cert, --tls-key and --tls-ca together; missing: \(missing)")
        }
        for (flag, path) in given.map({ ($0.0, $0.1!) }) where access(path, R_OK) != 0 {
            throw ValidationError("\(flag) \(path) cannot be read (\(String(cString: strerror(errno)))); nothing was started")
        }
        if let peerName, peerName.isEmpty { throw ValidationError("--tls-peer-name is empty; give the name the backup's certificate carries") }
    }

    /// The runtime's setting (after `validate`).
    func security(allowedPeers: [String] = [], handshakeTimeoutMs: Int = defaultHandshakeTimeoutMs) -> ChannelSecurity {
        guard !insecurePlaintext, let certificate, let key, let ca else { return .insecurePlaintext }
        return .mutualTLS(TLSPolicy(files: TLSFiles(certificate: certificate, key: key, ca: ca), allowedPeers: allowedPeers,
                                    peerName: peerName, handshakeTimeoutMs: handshakeTimeoutMs))
    }
}

/// 127.0.0.0/8, ::1 and "localhost": addresses no other host can reach.
func isLoopback(_ host: String) -> Bool {
    if host == "localhost" || host == "::1" { return true }
    let parts = host.split(separator: ".")
    return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
}
