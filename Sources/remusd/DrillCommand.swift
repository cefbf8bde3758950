import ArgumentParser
import Glibc
import RemusBench
import RemusCore
import RemusDrill
import RemusRuntime

/// `remusd drill`
struct Drill: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Prove failover on demand: kill the primary at random moments and verify what the backup resumed.",
        discussion: """
            Starts a backup and a primary running the simulated guest on loopback, lets them run, SIGKILLs the primary at random moments (about half of them right after a checkpoint was captured, so it is often in flight), lets the backup fence it and take over, and verifies memory byte for byte against a replay of the workload, the vCPU registers, the memory layout, every packet the outside world saw (I1: none from uncommitted state, none twice), and the guest clock (I4). The survivor then protects the guest towards a new backup, and again. Exits 0 when every failover verified, 1 otherwise; stopped by SIGINT or SIGTERM it kills the daemons it started and exits 128 + the signal, its logs kept.
            """)

    @Option(help: ArgumentHelp("Number of failovers.", valueName: "n"))
    var failovers: Int = 20

    @Option(help: ArgumentHelp("Seed of the kill moments and the guest's workload (default: random).", valueName: "n"))
    var seed: UInt64?

    @Option(name: .long, help: ArgumentHelp("Time between checkpoints.", valueName: "ms"))
    var interval: UInt64 = 50

    @Option(name: .long, help: ArgumentHelp("Time between heartbeats.", valueName: "ms"))
    var heartbeat: UInt64 = 50

    @Option(name: .long, help: ArgumentHelp("Silence after which a peer counts as lost.", valueName: "ms"))
    var timeout: UInt64 = 300

    @Option(name: .customLong("sim-memory"), help: ArgumentHelp("Simulated guest memory.", valueName: "MiB"))
    var memoryMiB: UInt64 = 1024

    @Option(name: .customLong("sim-vcpus"), help: ArgumentHelp("Simulated guest vCPUs.", valueName: "n"))
    var vcpus: Int = 2

    @Option(name: .customLong("sim-dirty-rate"), help: ArgumentHelp("Pages the guest dirties per second.", valueName: "pages/s"))
    var dirtyRate: UInt64 = 20_000

    @Option(name: .customLong("sim-disk-size"), help: ArgumentHelp("The guest's virtual disk, replicated and verified byte for byte at every failover (I9); 0: a guest without a disk.", valueName: "MiB"))
    var diskMiB: UInt64 = 16

    @Option(help: ArgumentHelp("Work directory for logs and activation reports (default: a new one under /tmp, removed when every failover verified).", valueName: "path"))
    var directory: String?

    @Flag(help: "Keep the work directory even when every failover verified.")
    var keep = false

    @Flag(help: "No progress lines, only the table.")
    var quiet = false

    @Option(help: .hidden)
    var inject: String?

    @Option(name: .customLong("sim-nic-taps"), help: ArgumentHelp("Back every process's simulated NIC with a real tap and hold its output in a plug qdisc: process i (0: the first primary, then each backup) uses the existing tap <prefix><i>; failovers + 2 taps, each with an IPv4 address (10.99.<i>.1/24) and up. The observer receives their UDP frames too. Needs sch_plug: run inside the testbed (bash Tests/Testbed/run.sh). Default: none (in-process buffers over TCP).", valueName: "prefix"))
    var simNICTaps: String?

    @Option(parsing: .upToNextOption, help: ArgumentHelp("Faults to inject in turn: crash (SIGKILL the primary), switchover (planned hand-over), silence (SIGSTOP the primary), backup-kill (SIGKILL the backup), overload (an unthrottled guest). Default: crash.", valueName: "fault"))
    var fault: [DrillFault] = [.crash]

    func validate() throws {
        if failovers < 1 || failovers > 100_000 { throw ValidationError("--failovers must be between 1 and 100000") }
        let settings = ProtectionSettings(intervalNs: interval * 1_000_000, heartbeatNs: heartbeat * 1_000_000, timeoutNs: timeout * 1_000_000)
        if let problem = settings.problem() { throw ValidationError(problem) }
        if vcpus < 1 || vcpus > 64 { throw ValidationError("--sim-vcpus must be between 1 and 64") }
        if memoryMiB < 4 { throw ValidationError("--sim-memory must be at least 4 MiB") }
        if diskMiB > 1024 { throw ValidationError("--sim-disk-size must be at most 1024 MiB (the verifier holds a replay of the disk in memory), got \(diskMiB)") }
        if let inject, inject != "early-release" {
            guard let point = DrillKillPoint(rawValue: inject) else {
                throw ValidationError("--inject knows 'early-release', \(DrillKillPoint.allCases.map { "'\($0.rawValue)'" }.joined(separator: ", ")); got '\(inject)'")
            }
            if !fault.contains(point.fault) { throw ValidationError("--inject \(inject) acts in \(point.fault.rawValue) rounds: add --fault \(point.fault.rawValue)") }
            if diskMiB == 0 { throw ValidationError("--inject \(inject) is a kill point of the disk path: it needs a guest with a disk (--sim-disk-size above 0)") }
        }
        if let simNICTaps, simNICTaps.isEmpty || simNICTaps.utf8.count + String(failovers + 1).utf8.count > 15 {
            throw ValidationError("--sim-nic-taps '\(simNICTaps)': <prefix><n> must be an interface name of at most 15 bytes for n up to \(failovers + 1)")
        }
    }

    func run() throws {
        let seed = self.seed ?? UInt64.random(in: 1...999_999)
        let config = DrillConfiguration(
            failovers: failovers, seed: seed,
            settings: ProtectionSettings(intervalNs: interval * 1_000_000, heartbeatNs: heartbeat * 1_000_000, timeoutNs: timeout * 1_000_000),
            simulated: SimulatedGuestParameters(memoryBytes: memoryMiB << 20, vcpus: vcpus, dirtyRate: dirtyRate, seed: seed,
                                                diskPath: diskMiB == 0 ? nil : "primary-disk.img", diskBytes: diskMiB << 20),
            directory: directory, keep: keep, progress: !quiet)
        var drill = config
        drill.injectEarlyRelease = inject == "early-release"
        drill.killPoint = inject.flatMap(DrillKillPoint.init(rawValue:))
        drill.faults = fault
        drill.simNICTapPrefix = simNICTaps
        let nic = simNICTaps.map { ", NIC over taps \($0)0 … \($0)\(failovers + 1) with plug qdiscs" } ?? ""
        print("remusd drill: \(failovers) rounds (\(fault.map(\.rawValue).joined(separator: ", "))), seed \(seed), checkpoint every \(interval) ms, timeout \(timeout) ms, guest \(memoryMiB) MiB × \(vcpus) vCPUs dirtying \(dirtyRate) pages/s\(nic)")
        let runner = RemusDrill.Drill(drill)
        // Stopped by SIGINT or SIGTERM (Ctrl-C, a CI job's timeout), the drill takes its daemons
        // with it: each runs in a process group of its own, out of reach of the terminal's signal.
        SignalWatcher.start { (signal: Int32) in
            let stopped = runner.stopDaemons()
            Log.error("drill stopped by signal \(signal): its \(stopped.count) daemons were killed (their process groups); logs kept in \(stopped.directory)")
            _exit(128 + signal)
        }
        let results = try runner.run()
        print(DrillTable.render(results))
        for line in runner.netbufSummary { print(line) }
        let failed = results.filter { !$0.verified }.count
        if failed > 0 || results.count < failovers {
            print("DRILL FAILED: \(results.count - failed) of \(failovers) failovers verified (seed \(seed))")
            throw ExitCode(1)
        }
        print("drill: \(results.count) passed, 0 failed")
    }
}

/// `remusd bench`
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure the replication loop beside this machine's limits (memcpy, raw loopback TCP).",
        discussion: "A benchmark, not a test: it prints medians and spreads, and ratios against the limits measured in the same run.")

    @Option(name: .customLong("dirty-pages"), help: ArgumentHelp("Pages dirtied per checkpoint.", valueName: "n"))
    var dirtyPages: Int = 2000

    @Option(help: ArgumentHelp("Samples per measurement.", valueName: "n"))
    var repetitions: Int = 15

    @Flag(name: .customLong("epoch-rate"), help: ArgumentHelp(
        "Instead: run the whole pipeline in one process as fast as it goes — a stepped simulated guest, the primary's capture, seal and writer over loopback TCP, the backup's reader, stager and committer with ACKs back — and report checkpoints/s and each side's CPU per checkpoint. --repetitions rounds (after a warm-up round) of --checkpoints checkpoints each."))
    var epochRate = false

    @Option(help: ArgumentHelp("Checkpoints per round with --epoch-rate.", valueName: "n"))
    var checkpoints: Int = 200

    @Flag(help: ArgumentHelp(
        "Instead: measure only the replication channel — raw loopback TCP, checkpoint shipping in plaintext and over mutual TLS 1.3 (kTLS where the kernel takes the records) — with --megabytes per sample; for slow machines such as the QEMU testbed."))
    var channels = false

    @Flag(name: .customLong("library-stream"), help: ArgumentHelp(
        "Instead: ship a hypervisor library's stream as a Xen guest's first synchronisation does — --megabytes of live phase in pre-copy pieces and a first checkpoint — from the primary's writer over loopback TCP through the backup's reader, committer and feeder into the pipe libxl's restore reads, and report its rate beside raw loopback TCP and each thread's CPU per GiB."))
    var libraryStream = false

    @Flag(name: .customLong("disk-server"), help: ArgumentHelp(
        "Instead: a protected Xen guest's disk path without the kernel — remusd's NBD server on a socket pair, a client writing (each write applied to a scratch image and journaled) and reading --megabytes in 1 MiB requests — beside the socket pair alone and pwrite alone."))
    var diskServer = false

    @Option(name: .customLong("scratch-dir"), help: ArgumentHelp("Where --disk-server makes its scratch image (removed after).", valueName: "dir"))
    var scratchDir = "/var/tmp"

    @Option(help: ArgumentHelp("Bytes per sample with --channels, --library-stream or --disk-server, in MiB.", valueName: "n"))
    var megabytes: Int = 64

    func validate() throws {
        let reachable = LoopBenchmark.reachableDirtyPages
        if dirtyPages < 1 || dirtyPages > reachable {
            throw ValidationError("--dirty-pages must be between 1 and \(reachable) (the working set of the benchmark's 1 GiB simulated guest), got \(dirtyPages)")
        }
        if repetitions < 3 { throw ValidationError("--repetitions must be at least 3") }
        if checkpoints < 10 || checkpoints > 100_000 { throw ValidationError("--checkpoints must be between 10 and 100000") }
        if megabytes < 1 || megabytes > 4096 { throw ValidationError("--megabytes must be between 1 and 4096, got \(megabytes)") }
        if [epochRate, channels, libraryStream, diskServer].filter({ $0 }).count > 1 {
            throw ValidationError("--epoch-rate, --channels, --library-stream and --disk-server are different benchmarks: pick one")
        }
    }

    func run() throws {
        let rows = epochRate
            ? try LoopBenchmark.epochRate(dirtyPages: dirtyPages, checkpoints: checkpoints, rounds: repetitions)
            : channels
            ? try LoopBenchmark.channels(megabytes: megabytes, repetitions: repetitions)
            : libraryStream
            ? try LoopBenchmark.libraryStream(megabytes: megabytes, repetitions: repetitions)
            : diskServer
            ? try LoopBenchmark.diskServer(megabytes: megabytes, repetitions: repetitions, directory: scratchDir)
            : try LoopBenchmark.run(dirtyPages: dirtyPages, repetitions: repetitions)
        print(LoopBenchmark.render(rows), terminator: "")
    }
}

extension DrillFault: ExpressibleByArgument {}
