import ArgumentParser
import RemusCore
import RemusNetbuf
import RemusRuntime

/// `remusd`: continuous-checkpointing replication for virtual machines.
@main
struct Remusd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remusd",
        abstract: "Keep a running VM alive through the loss of its host by continuous checkpointing.",
        discussion: """
            The primary checkpoints the guest many times a second, ships each checkpoint to the backup and holds back the guest's output until the backup acknowledges that checkpoint as committed. When the primary dies the backup fences it and resumes the guest from the last committed checkpoint. 'remusd drill' shows all this on a simulated guest.
            """,
        subcommands: [Protect.self, Receive.self, Status.self, Stop.self, Failover.self, Drill.self, Bench.self, Netbuf.self]
    )
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

    var witnessConfiguration: WitnessConfiguration? { witness.map { WitnessConfiguration(url: $0, ttlSeconds: witnessTTL) } }

    /// The engine's settings for a guest of `backend`: the pause bound defaults to none on Xen,
    /// where throttling the guest's CPU also slows the suspend it answers at every checkpoint.
    func settings(backend: BackendKind = .simulated) -> ProtectionSettings {
        let pauseMs = maxPause ?? (backend == .xen ? 0 : 50)
        return ProtectionSettings(intervalNs: interval * 1_000_000, heartbeatNs: heartbeat * 1_000_000, timeoutNs: timeout * 1_000_000,
                                  fenceGraceNs: fenceGrace * 1_000_000, maxPauseNs: pauseMs * 1_000_000, overload: onOverload)
    }

    func validate() throws {
        if let problem = settings().problem() { throw ValidationError(problem) }
        if let witness {
            do { _ = try EtcdWitness(url: witness) } catch { throw ValidationError("--witness: \(error)") }
        }
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

    func validate() throws {
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
