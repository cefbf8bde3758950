import Glibc
import RemusCore
import RemusNetbuf
import RemusRuntime
import RemusSim
import RemusTLS

/// What `remusd drill` runs.
package struct DrillConfiguration: Sendable {
    package var failovers: Int
    package var seed: UInt64
    package var settings: ProtectionSettings
    package var simulated: SimulatedGuestParameters
    /// Work directory (logs, activation reports); kept when the drill fails or `keep` is set.
    package var directory: String?
    package var keep: Bool
    /// Print a progress line per failover.
    package var progress: Bool
    /// Faults to inject, in turn.
    package var faults: [DrillFault] = [.crash]
    /// Fault injected on purpose to prove the verifier catches it: the first primary releases
    /// output at once instead of on ACK (`--unsafe --no-netbuf`).
    package var injectEarlyRelease = false
    /// A kill point of the disk path hit on purpose in every round of its fault (`--inject`).
    package var killPoint: DrillKillPoint?
    /// Back every process's simulated NIC with a real tap and its output with a plug qdisc:
    /// process i (0: the first primary, g + 1: backup g) uses the existing tap `<prefix><i>`, and
    /// the observer also receives their UDP frames. Needs a kernel with sch_plug (the testbed).
    package var simNICTapPrefix: String?
    package init(failovers: Int, seed: UInt64, settings: ProtectionSettings, simulated: SimulatedGuestParameters,
                directory: String?, keep: Bool, progress: Bool) {
        self.failovers = failovers
        self.seed = seed
        self.settings = settings
        self.simulated = simulated
        self.directory = directory
        self.keep = keep
        self.progress = progress
    }
}

/// What a drill does to the pair each round.
package enum DrillFault: String, Sendable, CaseIterable {
    /// SIGKILL of the primary at a random moment; the backup takes over.
    case crash
    /// A planned switchover; nothing may be lost or doubled.
    case switchover
    /// The primary hangs (SIGSTOP) with its connection open; heartbeats must detect it.
    case silence
    /// SIGKILL of the backup; the primary degrades, keeps running, re-protects when a backup returns.
    case backupKill = "backup-kill"
    /// An unthrottled guest; the throttle policy keeps checkpoints within the pause bound; crashes as usual.
    case overload
    /// The primary is cut off from its backup and from the witness (etcd); it must self-fence before
    /// the backup, holding the witness, takes over. With this fault every round uses the witness.
    case partition
}

/// A window of the disk path (I9) the drill hits on purpose instead of killing at a random
/// moment, through the daemons' `InjectedFault` hooks (Docs/disks.md, "Kill points").
package enum DrillKillPoint: String, Sendable, CaseIterable {
    /// Crash rounds: the primary dies after checkpoint N's disk records left and before its
    /// CHECKPOINT_END: the backup must discard disk N and take over at N − 1.
    case afterDiskRecords = "kill-after-disk-records"
    /// Crash rounds: the primary is killed while the backup applies disk N (held part-way): the
    /// backup must finish N and activate at N (or later, had N + 1 arrived whole meanwhile).
    case duringDiskApply = "kill-during-disk-apply"
    /// Backup-kill rounds: the backup dies part-way through applying disk N and is restarted: it
    /// must finish the logged epoch N at its start.
    case backupDuringDiskApply = "backup-kill-during-disk-apply"

    /// The rounds it replaces the kill of.
    package var fault: DrillFault { self == .backupDuringDiskApply ? .backupKill : .crash }
}

/// One verified (or not) failover.
package struct FailoverResult: Sendable {
    package var index: Int
    /// Epoch the backup took over from.
    package var epoch: Epoch
    /// The kill landed while a checkpoint was in flight to the backup (it was dropped).
    package var cutMidCheckpoint: Bool
    /// Kill to loss detected, ms.
    package var detectionMs: Double
    /// Loss detected to guest running, ms.
    package var activationMs: Double
    /// Loss detected to the fence's success, ms (nil: the backup's report has none).
    package var fenceMs: Double?
    /// Loss detected to the replica ready to run (built while the fence ran), ms; nil when it
    /// was not prepared ahead.
    package var prepareMs: Double?
    /// The unpause: activation begun to guest running, ms.
    package var unpauseMs: Double?
    /// I9: the disk the guest resumed on equals a replay to the committed checkpoint (nil: no disk).
    package var diskVerified: Bool?
    /// How long the backup took to apply the committed epoch's disk writes to its images, ms.
    package var diskApplyMs: Double?
    /// Loss detected to the images at the committed epoch, ms (0: applied before the loss).
    package var diskReadyMs: Double?
    /// Packets the outside world saw from state the backup did not commit (I1 violations).
    package var releasedUncommitted: Int
    /// Packets emitted by the dead primary and never released (lost with it, as in any Remus).
    package var discardedWithPrimary: Int
    /// The backup declared the primary lost (silence) before it was killed: a false alarm that
    /// fencing and held output made harmless.
    package var falseAlarm = false
    package var fault: DrillFault = .crash
    /// Observations worth printing (throttle, output flow).
    package var notes: [String] = []
    package var verified: Bool
    package var problems: [String]
}

/// `remusd drill`: a backup and a primary with the simulated guest on loopback; the primary is
/// SIGKILLed at random moments, the backup takes over, the verifier checks I1–I5, protection
/// resumes in the other direction, and again.
package final class Drill: @unchecked Sendable {  // driven from one thread; the observer has its own lock
    let config: DrillConfiguration
    let clock = SystemClock()
    private var rng: SplitMix64
    /// With taps: one line per tap, the kernel's plug counters read when the drill ended (before
    /// the buffers were removed), and what the observer received over UDP.
    package private(set) var netbufSummary: [String] = []
    /// The daemons started so far: the drill's thread adds them, ends them at its end, and
    /// `stopDaemons` reads them from another thread.
    private let running = RunningChildren()

    package init(_ config: DrillConfiguration) {
        self.config = config
        rng = SplitMix64(seed: config.seed)
    }

    /// SIGKILLs the process group of every daemon the drill started (a drill that is itself
    /// stopped by a signal must not leave primaries and backups running); callable from any
    /// thread.
    /// Returns how many daemons were signalled and the drill's directory (its logs).
    @discardableResult
    package func stopDaemons() -> (count: Int, directory: String) {
        let children = running.all
        for child in children { child.signalGroup(SIGKILL) }
        return (children.count, running.directory)
    }

    /// Runs every failover; returns the results (all verified, or stops at the first failure).
    package func run() throws -> [FailoverResult] {
        Log.setRole("drill")
        signal(SIGPIPE, SIG_IGN)  // a peer process that died must not kill the drill mid-write
        let taps = try config.simNICTapPrefix.map { try Self.checkTaps(prefix: $0, count: config.failovers + 2) } ?? []
        // Start from clean taps: a plug left by an earlier, killed drill would hold output the
        // processes here do not know about.
        for tap in taps {
            do { try NetbufPlumbing.cleanup(interface: tap, socket: try NetlinkSocket()) } catch {
                throw ProtocolError("removing an earlier output buffer from \(tap) failed: \(error)")
            }
        }
        let dir = try makeDirectory()
        running.directory = dir
        // Mutual TLS as in production, with a throwaway CA: the first primary is 'primary'; every
        // backup is 'backup', and serves 'backup' too, since a backup that took over protects
        // onwards under its own certificate.
        let certificates = CertificateSet(directory: dir + "/tls")
        // etcd (the witness, with the partition fault) serves 'etcd' for 127.0.0.1 and asks
        // every client for a certificate of the same CA.
        try certificates.make([.init(name: "primary"), .init(name: "backup"), .init(name: "etcd", alternativeNames: ["127.0.0.1"])])
        func tlsArguments(_ name: String) -> [String] {
            let f = certificates.files(for: name)
            return ["--tls-cert", f.certificate, "--tls-key", f.key, "--tls-ca", f.ca, "--tls-peer-name", "backup"]
        }
        let observer = try PacketObserver(udp: !taps.isEmpty)
        let exe = ProcessEnvironment.executablePath
        let s = config.settings
        // An overload drill runs an unthrottled guest against a tight pause bound: the throttle must engage.
        let overloadPauseMs: UInt64 = 2
        let timing = ["--interval", "\(s.intervalNs / 1_000_000)", "--heartbeat", "\(s.heartbeatNs / 1_000_000)", "--timeout", "\(s.timeoutNs / 1_000_000)"]
            + (config.faults.contains(.overload) ? ["--max-pause", "\(overloadPauseMs)"] : [])
        // The daemons' kill points stay inert unless the drill is asked for one.
        let env = ["REMUSD_RUN_DIR": dir].merging(config.killPoint == nil ? [:] : ["REMUSD_INJECT_DIR": dir]) { a, _ in a }
        let ports = try freePorts(config.failovers + 1)
        // Every process serves its metrics: the drill reads numbers and states there, never
        // from status prose. Index 0: the first primary; g + 1: backup g.
        let metricsPorts = try freePorts(config.failovers + 2)
        func metricsEndpoint(_ index: Int) -> Endpoint { Endpoint(host: "127.0.0.1", port: metricsPorts[index]) }
        var results: [FailoverResult] = []
        var finished = false
        var startSequences: [UInt64] = []  // where the current primary's NIC sequences began
        defer {
            for c in running.all { c.signal(SIGKILL); c.wait() }
            if !taps.isEmpty { netbufSummary = Self.removeTapBuffers(taps, observer: observer) }
            if finished && !config.keep && results.allSatisfy(\.verified) {
                removeTree(dir)
            } else {
                Log.info("logs and activation reports kept in \(dir)")
            }
        }

        // With the partition fault every process reaches its peer and etcd through a proxy the drill can cut.
        let witnessed = config.faults.contains(.partition)
        let etcd = witnessed ? try LocalEtcd(directory: dir, tls: certificates.files(for: "etcd")) : nil
        defer { etcd?.stop() }
        var replicationProxies: [Int: PartitionProxy] = [:]
        var etcdProxies: [Int: PartitionProxy] = [:]
        /// Where the primary protecting towards backup `g` connects.
        func replicationAddress(_ g: Int) throws -> String {
            // The injected early release cuts the first primary off from its backup (below).
            guard witnessed || (config.injectEarlyRelease && g == 0) else { return "127.0.0.1:\(ports[g])" }
            if replicationProxies[g] == nil { replicationProxies[g] = try PartitionProxy(to: Endpoint(host: "127.0.0.1", port: ports[g])) }
            return "\(replicationProxies[g]!.endpoint)"
        }
        /// `--witness` for process `index` (0: the first primary, g + 1: backup g), through its own proxy.
        func witnessArguments(_ index: Int) throws -> [String] {
            guard let etcd else { return [] }
            if etcdProxies[index] == nil { etcdProxies[index] = try PartitionProxy(to: etcd.clientEndpoint) }
            return ["--witness", "etcd://\(etcdProxies[index]!.endpoint)/remus/drill-guest", "--witness-ttl", "2"]
        }

        /// `--sim-nic-tap` (and `--netbuf` when `held`) for process `index`; nothing without taps.
        func tapArguments(_ index: Int, held: Bool = true) -> [String] {
            guard !taps.isEmpty else { return [] }
            return ["--sim-nic-tap", taps[index]] + (held ? ["--netbuf", taps[index]] : [])
        }

        func startBackup(_ g: Int) throws -> ChildProcess {
            var args = [exe, "receive", "--listen", "127.0.0.1:\(ports[g])",
                        "--nic-sink", "\(observer.endpoint)", "--activation-report", "\(dir)/activation-\(g)",
                        "--exit-after-protection", "--status-socket", "\(dir)/backup-\(g).sock",
                        "--metrics-listen", "\(metricsEndpoint(g + 1))"] + timing + tapArguments(g + 1)
                + tlsArguments("backup") + ["--tls-allow-peer", "primary", "--tls-allow-peer", "backup"]
            args += witnessed ? try witnessArguments(g + 1) : ["--fence", "test -e \(dir)/fenced-\(g)"]
            if config.simulated.diskPath != nil {
                // The operator's part: a directory with an image named as the guest's disk.
                let disks = "\(dir)/disks-\(g)"
                if mkdir(disks, 0o755) != 0 && errno != EEXIST { throw SystemError(call: "mkdir(\(disks))", errno: errno) }
                let image = open(disks + "/" + SimGuest.diskName, O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
                guard image >= 0 else { throw SystemError(call: "open(\(disks)/\(SimGuest.diskName))", errno: errno) }
                defer { close(image) }
                if ftruncate(image, off_t(config.simulated.diskBytes)) != 0 { throw SystemError(call: "ftruncate(\(disks)/\(SimGuest.diskName))", errno: errno) }
                args += ["--disk-dir", disks]
            }
            if g + 1 < ports.count { args += ["--reprotect-to", try replicationAddress(g + 1)] }
            let child = try ChildProcess(arguments: args, outputFile: "\(dir)/backup-\(g).log", environment: env)
            running.add(child)
            return child
        }

        // Generation 0: a fresh guest protected towards backup 0.
        var b = 0  // index of the current backup (and of its port)
        var backup = try startBackup(0)
        // Generous: under emulation on a loaded host a daemon's start takes seconds; one that
        // fails to start ends the wait at once.
        try waitForFile("\(dir)/backup-0.sock", what: "backup 0 to listen", deadlineMs: 30_000, madeBy: backup, log: "\(dir)/backup-0.log")
        let p = config.simulated
        let overload = config.faults.contains(.overload)
        var primary = try ChildProcess(
            arguments: [exe, "protect", "drill-guest", try replicationAddress(0), "--backend", "sim",
                        "--sim-memory", "\(p.memoryBytes >> 20)", "--sim-vcpus", "\(p.vcpus)",
                        "--sim-dirty-rate", overload ? "0" : "\(p.dirtyRate)",
                        "--sim-seed", "\(p.seed)", "--nic-sink", "\(observer.endpoint)", "--status-socket", "\(dir)/primary-0.sock",
                        "--metrics-listen", "\(metricsEndpoint(0))"] + timing + tlsArguments("primary")
                + (p.diskPath.map { ["--sim-disk", "\(dir)/\($0)", "--sim-disk-size", "\(p.diskBytes >> 20)"] } ?? [])
                + (config.injectEarlyRelease ? ["--unsafe", "--no-netbuf"] : []) + (try witnessArguments(0))
                + tapArguments(0, held: !config.injectEarlyRelease),
            outputFile: "\(dir)/primary-0.log", environment: env)
        running.add(primary)
        var primarySocket = "\(dir)/primary-0.sock"
        var primaryMetrics = metricsEndpoint(0)
        var primaryPid = primary.pid
        var primaryIndex = 0  // 0: the first primary; g + 1: backup g after it took over

        for g in 0..<config.failovers {
            let fault = config.faults[g % config.faults.count]
            try waitForAcknowledged(metrics: primaryMetrics, atLeast: 3, deadlineMs: 20_000, who: "failover \(g + 1)'s primary")
            var notes: [String] = []
            if fault == .backupKill {
                let injected = config.killPoint == .backupDuringDiskApply
                let diedPid = backup.pid
                var (result, diedApplying) = try backupKill(primary: primaryMetrics, primaryPid: primaryPid, backup: backup, observer: observer,
                                                            index: g + 1, directory: injected ? dir : nil)
                backup = try startBackup(b)
                result = try awaitReprotection(result, primary: primaryMetrics)
                if let epoch = diedApplying {
                    // The restarted backup finishes the logged epoch before it serves a primary.
                    let line = "finished applying the disk writes of checkpoint \(epoch) that a previous run had logged"
                    if logShows(line, in: "\(dir)/backup-\(b).log", deadlineMs: 5000) {
                        // I9 on the image as the restart left it, against the state it was applying.
                        let committed = try ActivationReport.read(from: InjectedFault.armingPath(dir, pid: diedPid) + ".committed")
                        let copy = InjectedFault.armingPath(dir, pid: backup.pid) + ".recovered-" + SimGuest.diskName
                        if let image = InjectedFault.readBytes(copy) {
                            if let problem = DrillVerifier.verifyRecoveredDisk(committed: committed, image: image) {
                                result.problems.append("disk (I9) after the restarted backup finished checkpoint \(epoch): \(problem)")
                                result.verified = false
                            } else {
                                result.notes.append("the restarted backup finished applying disk \(epoch) at its start, its image verified against checkpoint \(epoch)")
                            }
                        } else {
                            result.problems.append("the restarted backup left no copy of its recovered image (\(copy))")
                            result.verified = false
                        }
                    } else {
                        result.problems.append("the backup died applying disk \(epoch) and, restarted, did not log '\(line)' (see \(dir)/backup-\(b).log)")
                        result.verified = false
                    }
                }
                results.append(result)
                if config.progress { printProgress(result, of: config.failovers) }
                if !result.verified { break }
                continue
            }
            // A takeover: the next backup listens first so the survivor can protect onwards.
            let nextBackup = b + 1 < ports.count ? try startBackup(b + 1) : nil
            var problems: [String] = []
            if fault == .overload, let metrics = try? MetricsScrape.fetch(primaryMetrics) {
                let pause = Self.pauseMicroseconds(metrics)
                let throttled = metrics.integer("remusd_primary_throttle_events_total") ?? 0
                if throttled > 0 {
                    notes.append("guest speed: \(metrics.integer("remusd_primary_guest_speed_percent") ?? 100) % (slowed \(throttled) times)")
                } else if let p99 = pause?.p99, p99 > overloadPauseMs * 1000 {
                    problems.append("pauses reached \(p99) µs (p99), over the \(overloadPauseMs) ms bound, and the guest was not throttled")
                }
                if let pause { notes.append("pause: p50 \(pause.p50) µs, p99 \(pause.p99) µs") }
                if let deferred = metrics.integer("remusd_primary_checkpoints_deferred_total"), deferred > 0 {
                    notes.append("checkpoints deferred over the pause bound: \(deferred)")
                }
            }
            let eventAt: UInt64
            var injectedAt: Epoch?  // the checkpoint at which the kill point was reached
            var injectedDetail = ""
            switch fault {
            case .crash where config.killPoint == .afterDiskRecords:
                // The primary stops itself at the point; once the backup declared it lost (all it
                // had written was read by then), it dies.
                let fired = try armAndAwait(.killAfterDiskRecords, pid: primaryPid, directory: dir)
                eventAt = fired.atNs
                injectedAt = fired.epoch
                try waitForState("fencing", of: "remusd_backup_state", metrics: metricsEndpoint(b + 1), deadlineMs: 4 * s.timeoutNs / 1_000_000 + 2000)
                primary.signal(SIGKILL)
                primary.wait()
                injectedDetail = fired.detail
                notes.append("the primary died after the disk records of checkpoint \(fired.epoch) (\(fired.detail)), before its end")
            case .crash where config.killPoint == .duringDiskApply:
                let fired = try armAndAwait(.holdDiskApply, pid: backup.pid, directory: dir)
                eventAt = clock.monotonicNs()
                primary.signal(SIGKILL)
                primary.wait()
                try touch(InjectedFault.armingPath(dir, pid: backup.pid) + ".go")
                injectedAt = fired.epoch
                notes.append("the primary was killed while the backup applied disk \(fired.epoch) (\(fired.detail))")
            case .crash where config.injectEarlyRelease && g == 0:
                eventAt = try releaseUncommittedThenKill(metrics: primaryMetrics, child: primary, cut: replicationProxies[0]!, observer: observer)
                primary.wait()
                notes.append("the primary was cut off from its backup and killed two checkpoints later, its output released all along")
            case .crash, .overload:
                eventAt = killAtRandomMoment(metrics: primaryMetrics, child: primary)
                primary.wait()
            case .switchover:
                eventAt = clock.monotonicNs()
                _ = try StatusSocket.query(primarySocket, command: "switchover")
            case .silence:
                // The primary hangs with its connection open: only heartbeats can tell.
                eventAt = clock.monotonicNs()
                primary.signal(SIGSTOP)
                try waitForState("fencing", of: "remusd_backup_state", metrics: metricsEndpoint(b + 1), deadlineMs: 4 * s.timeoutNs / 1_000_000 + 2000)
                primary.signal(SIGKILL)
                primary.wait()
            case .partition:
                // Cut the primary off from its backup and from etcd; watch which side runs.
                eventAt = clock.monotonicNs()
                replicationProxies[b]?.cut()
                etcdProxies[primaryIndex]?.cut()
                var selfFencedAt: UInt64?
                let deadline = eventAt + 30_000_000_000
                while access("\(dir)/activation-\(b)", F_OK) != 0 && clock.monotonicNs() < deadline {
                    if selfFencedAt == nil, Self.primaryState(primaryMetrics) == "self_fenced" {
                        selfFencedAt = clock.monotonicNs()
                    }
                    pauseBriefly(ms: 2)
                }
                if selfFencedAt == nil, Self.primaryState(primaryMetrics) == "self_fenced" {
                    selfFencedAt = clock.monotonicNs()
                }
                if let report = try? ActivationReport.read(from: "\(dir)/activation-\(b)"), let activated = report.number("activated_ns") {
                    if let fenced = selfFencedAt, fenced <= activated {
                        notes.append("primary self-fenced \(format(Double(fenced - eventAt) / 1e6)) ms after the cut, backup activated \(format(Double(activated - eventAt) / 1e6)) ms after it")
                    } else {
                        problems.append("the backup activated while the cut-off primary had not self-fenced: two copies could run")
                    }
                }
                primary.signal(SIGKILL)
                primary.wait()
            case .backupKill:
                preconditionFailure("handled above")
            }
            // Local fence: the drill knows the primary's process is gone (a switchover needs none).
            try touch("\(dir)/fenced-\(b)")
            let reportPath = "\(dir)/activation-\(b)"
            try waitForFile(reportPath, what: "backup \(b) to take over", deadlineMs: 20_000)
            if fault == .switchover {
                // The old primary stops by itself once the backup acknowledged the final checkpoint.
                let deadline = clock.monotonicNs() + 10_000_000_000
                while primary.poll() == nil && clock.monotonicNs() < deadline { pauseBriefly(ms: 5) }
                if primary.poll() == nil { problems.append("the old primary still runs 10 s after the switchover") }
            }
            let report = try ActivationReport.read(from: reportPath)
            observer.settle(forMs: 20)
            var result = DrillVerifier.verify(
                report: report, killedAt: eventAt, observed: observer.packets(),
                survivorPid: backup.pid, index: g)
            result.index = g + 1
            result.fault = fault
            // Exactly what this round's primary emitted and never released.
            if let next = DrillVerifier.nextSequences(report) {
                result.discardedWithPrimary = DrillVerifier.unreleased(observed: observer.packets(), from: startSequences, to: next)
                startSequences = next
            }
            if let n = injectedAt {
                problems += Self.killPointProblems(config.killPoint, epoch: n, result: result, report: report)
                notes.append("the backup took over at checkpoint \(result.epoch)")
                if config.killPoint == .afterDiskRecords {
                    // The window was hit only if the backup had staged all of disk N when it dropped N.
                    let dropped = "the connection ended inside checkpoint \(n): its \(injectedDetail.split(separator: " ").last ?? "?") disk operations staged so far were dropped"
                    if !logShows(dropped, in: "\(dir)/backup-\(b).log", deadlineMs: 5000) {
                        problems.append("the backup did not log '\(dropped)': disk \(n) did not reach it whole before the primary died (see \(dir)/backup-\(b).log)")
                    }
                }
            }
            if fault == .switchover && result.discardedWithPrimary > 0 {
                problems.append("the switchover lost \(result.discardedWithPrimary) packets; a planned hand-over must lose none")
            }
            if fault == .silence && !result.falseAlarm && result.detectionMs < Double(s.timeoutNs) / 2e6 {
                problems.append("silence was detected in \(format(result.detectionMs)) ms, before any heartbeat could be missed")
            }
            result.problems += problems
            result.notes = notes
            result.verified = result.verified && problems.isEmpty
            results.append(result)
            if config.progress { printProgress(result, of: config.failovers) }
            if !result.verified {
                Log.error("failover \(g + 1) FAILED verification: \(result.problems.joined(separator: "; ")); logs kept in \(dir)")
                break
            }
            // The survivor is now the primary, protecting towards the next backup.
            primary = backup
            primaryPid = backup.pid
            primarySocket = "\(dir)/backup-\(b).sock"
            primaryMetrics = metricsEndpoint(b + 1)
            primaryIndex = b + 1
            if let nextBackup { backup = nextBackup }
            b += 1
        }
        finished = true
        return results
    }

    /// The taps `<prefix>0` … `<prefix><count - 1>`, which must exist (the drill never creates them).
    static func checkTaps(prefix: String, count: Int) throws -> [String] {
        let taps = (0..<count).map { "\(prefix)\($0)" }
        guard let longest = taps.last, longest.utf8.count <= 15 else {
            throw ProtocolError("tap names '\(taps.last ?? prefix)' would be longer than 15 bytes; use a shorter --sim-nic-taps prefix")
        }
        let missing = taps.filter { if_nametoindex($0) == 0 }
        guard missing.isEmpty else {
            throw ProtocolError("the drill needs \(count) taps, \(taps[0]) … \(longest) (one per process: the first primary and every backup), "
                + "and \(missing.count) do not exist (\(missing.prefix(4).joined(separator: ", "))\(missing.count > 4 ? ", …" : "")); nothing was started. "
                + "Create them: for i in $(seq 0 \(count - 1)); do ip tuntap add mode tap \(prefix)$i; ip addr add 10.99.$i.1/24 dev \(prefix)$i; "
                + "ip link set \(prefix)$i up; done. Their plug qdiscs need a kernel with sch_plug: run inside the testbed, bash Tests/Testbed/run.sh")
        }
        return taps
    }

    /// Reads every tap's plug counters, then removes the buffers the (killed) processes left.
    /// Packets still held are discarded, never released: they belong to dead primaries' epochs.
    static func removeTapBuffers(_ taps: [String], observer: PacketObserver) -> [String] {
        var lines: [String] = []
        // Every sender is dead: what a plug let out is on its way to (or in) the observer's socket.
        observer.settle(forMs: 100)
        let counts = observer.datagramCounts()
        lines.append("netbuf: the observer received \(counts.received) UDP datagrams over the taps (\(counts.malformed) malformed)")
        guard let socket = try? NetlinkSocket() else { return lines + ["netbuf: cannot open a netlink socket; buffers left in place ('remusd netbuf cleanup')"] }
        let qdiscs = (try? socket.qdiscs()) ?? []
        var total: UInt64 = 0
        for tap in taps {
            guard let attachment = try? NetbufPlumbing.find(interface: tap, socket: socket),
                  let plug = qdiscs.first(where: { $0.ifindex == attachment.ifbIndex && $0.kind == "plug" }) else { continue }
            total += plug.sentPackets
            lines.append("netbuf \(tap) (\(attachment.ifbName)): \(plug.sentPackets) packets passed the plug, \(plug.queueLength) still held, \(plug.drops) dropped")
            do {
                try NetbufPlumbing.cleanup(interface: tap, socket: socket)
            } catch {
                lines.append("netbuf \(tap): removing the buffer failed: \(error)")
            }
        }
        lines.append("netbuf: \(total) packets passed plug qdiscs in total")
        return lines
    }

    /// Kills the backup: the primary must notice within the timeout, keep the guest running, hold
    /// its output for the fence grace and then let it flow (DEGRADED).
    /// With `directory` (the kill point `backup-kill-during-disk-apply`) the backup kills itself
    /// part-way through applying a disk epoch instead; returns that epoch with the result.
    private func backupKill(primary metrics: Endpoint, primaryPid: Int32, backup: ChildProcess, observer: PacketObserver, index: Int,
                            directory: String?) throws -> (FailoverResult, diedApplying: Epoch?) {
        let s = config.settings
        var result = FailoverResult(index: index, epoch: 0, cutMidCheckpoint: false, detectionMs: 0, activationMs: 0,
                                    releasedUncommitted: 0, discardedWithPrimary: 0, verified: false, problems: [])
        result.fault = .backupKill
        let fromPrimary = { observer.packets().filter { $0.pid == UInt64(primaryPid) }.count }
        var killedAt = clock.monotonicNs()
        var diedApplying: Epoch?
        if let directory {
            let fired = try armAndAwait(.killDuringDiskApply, pid: backup.pid, directory: directory)
            killedAt = fired.atNs
            diedApplying = fired.epoch
            result.notes.append("the backup killed itself applying disk \(fired.epoch) (\(fired.detail))")
            let deadline = clock.monotonicNs() + 10_000_000_000
            while backup.poll() == nil && clock.monotonicNs() < deadline { pauseBriefly(ms: 2) }
            if backup.poll() == nil { result.problems.append("the backup still ran 10 s after reaching its kill point") }
        }
        backup.signal(SIGKILL)
        backup.wait()
        try waitForState("degraded", of: "remusd_primary_state", metrics: metrics, deadlineMs: s.timeoutNs / 1_000_000 + 2000)
        result.detectionMs = Double(clock.monotonicNs() - killedAt) / 1e6
        // After the fence grace the output must flow again (the guest kept running throughout).
        let before = fromPrimary()
        let deadline = clock.monotonicNs() + s.fenceGraceNs + 5_000_000_000
        while fromPrimary() < before + 8 && clock.monotonicNs() < deadline { pauseBriefly(ms: 10) }
        let flowingAfter = Double(clock.monotonicNs() - killedAt) / 1e6
        if fromPrimary() < before + 8 {
            result.problems.append("no output from the primary within \(format(flowingAfter)) ms of losing its backup")
        } else {
            result.notes.append("output flowing again \(format(flowingAfter)) ms after the backup died (fence grace \(s.fenceGraceNs / 1_000_000) ms)")
        }
        if let pause = (try? MetricsScrape.fetch(metrics)).flatMap(Self.pauseMicroseconds) {
            result.notes.append("pause: p50 \(pause.p50) µs, p99 \(pause.p99) µs")
            // The guest is never held waiting for the lost backup: that would show as pauses as
            // long as the silence timeout. A pause past --max-pause but short of it is the host's
            // scheduling (the drill shares its cores with every process it runs), noted only.
            if pause.p99 * 1000 >= s.timeoutNs {
                result.problems.append("the guest was paused \(pause.p99) µs (p99) while its backup was lost: as long as the \(s.timeoutNs / 1_000_000) ms timeout, held for the lost backup")
            } else if s.maxPauseNs > 0, pause.p99 * 1000 > s.maxPauseNs {
                result.notes.append("pause p99 over the \(s.maxPauseNs / 1_000_000) ms aim (a loaded host), short of the timeout")
            }
        }
        return (result, diedApplying)
    }

    /// A backup is back on the same address: the primary must re-protect (fresh synchronisation).
    private func awaitReprotection(_ result: FailoverResult, primary metrics: Endpoint) throws -> FailoverResult {
        var r = result
        let start = clock.monotonicNs()
        let before = (try? MetricsScrape.fetch(metrics)).flatMap(Self.acknowledged) ?? 0
        let deadline = start + config.settings.maxRetryNs + 20_000_000_000
        var reprotected = false
        while clock.monotonicNs() < deadline {
            if let snapshot = try? MetricsScrape.fetch(metrics), snapshot.state("remusd_primary_state") == "protected",
               let acked = Self.acknowledged(snapshot), acked > before + 2 {
                r.epoch = acked
                reprotected = true
                break
            }
            pauseBriefly(ms: 10)
        }
        r.activationMs = Double(clock.monotonicNs() - start) / 1e6
        if !reprotected { r.problems.append("the primary did not re-protect within \(format(r.activationMs)) ms of a backup returning") }
        r.verified = r.problems.isEmpty
        return r
    }

    /// Waits until the enum gauge `family` (remusd_primary_state, remusd_backup_state) is `state`.
    private func waitForState(_ state: String, of family: String, metrics: Endpoint, deadlineMs: UInt64) throws {
        let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
        while clock.monotonicNs() < deadline {
            if let snapshot = try? MetricsScrape.fetch(metrics), snapshot.state(family) == state { return }
            pauseBriefly(ms: 2)
        }
        throw ProtocolError("http://\(metrics)/metrics did not report \(family) \(state) within \(deadlineMs) ms")
    }

    // MARK: - Steps

    /// Arms process `pid` for `point` (`InjectedFault`) and waits until it reports the point
    /// reached: the checkpoint, when (monotonic ns) and what it held.
    private func armAndAwait(_ point: InjectedFault.Point, pid: Int32, directory: String) throws -> (epoch: Epoch, atNs: UInt64, detail: String) {
        let arming = InjectedFault.armingPath(directory, pid: pid)
        try writeFile(arming + ".tmp", Array(point.rawValue.utf8))
        try renameFile(arming + ".tmp", arming)
        // A checkpoint with disk writes (or a record of two) comes within a few intervals.
        try waitForFile(arming + ".fired", what: "process \(pid) to reach the kill point \(point.rawValue)", deadlineMs: 30_000)
        var fields: [String: String] = [:]
        for line in (readWholeFile(arming + ".fired") ?? "").split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
        }
        guard let epoch = fields["epoch"].flatMap({ Epoch($0) }), let at = fields["at_ns"].flatMap({ UInt64($0) }) else {
            throw ProtocolError("\(arming).fired does not say where the kill point was reached")
        }
        return (epoch, at, fields["detail"] ?? "")
    }

    /// Whether `log` contains `line`, waiting up to `deadlineMs` for it.
    private func logShows(_ line: String, in log: String, deadlineMs: UInt64) -> Bool {
        let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
        while readWholeFile(log)?.contains(line) != true {
            if clock.monotonicNs() > deadline { return false }
            pauseBriefly(ms: 5)
        }
        return true
    }

    /// What a takeover after the kill point reached at checkpoint `epoch` must show (I9).
    static func killPointProblems(_ point: DrillKillPoint?, epoch: Epoch, result: FailoverResult, report: ActivationReport) -> [String] {
        switch point {
        case .afterDiskRecords:
            var problems: [String] = []
            if result.epoch + 1 != epoch {
                problems.append("the primary died after checkpoint \(epoch)'s disk records and before its end: the backup must take over at \(epoch - 1) with disk \(epoch - 1), it took over at \(result.epoch)")
            }
            if report.fields["lost_while_staging"] != "1" {
                problems.append("the backup did not report checkpoint \(epoch) in flight when the primary died (lost_while_staging)")
            }
            return problems
        case .duringDiskApply:
            return result.epoch >= epoch ? [] : ["the primary died while the backup applied disk \(epoch): the backup must finish it and take over at \(epoch) or later, it took over at \(result.epoch)"]
        case .backupDuringDiskApply, nil:
            return []
        }
    }

    private func waitForAcknowledged(metrics: Endpoint, atLeast: Epoch, deadlineMs: UInt64, who: String) throws {
        let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
        while clock.monotonicNs() < deadline {
            if let acked = (try? MetricsScrape.fetch(metrics)).flatMap(Self.acknowledged), acked >= atLeast { return }
            pauseBriefly(ms: 5)
        }
        throw ProtocolError("\(who) did not reach \(atLeast) acknowledged checkpoints within \(deadlineMs) ms; see the logs")
    }

    /// Kills at a random moment: half the time right after a checkpoint was captured (so it is
    /// likely in flight), otherwise at a uniformly random point of the next interval.
    /// Returns the monotonic time taken right before the signal (the backup may see the closed
    /// connection before this thread runs again).
    private func killAtRandomMoment(metrics: Endpoint, child: ChildProcess) -> UInt64 {
        let intervalMs = config.settings.intervalNs / 1_000_000
        // With the injected fault, kill anywhere in the epoch so there is output to catch.
        if rng.next() % 2 == 0 && !config.injectEarlyRelease {
            let start = (try? MetricsScrape.fetch(metrics)).flatMap(Self.captured) ?? 0
            let deadline = clock.monotonicNs() + 4 * intervalMs * 1_000_000
            while clock.monotonicNs() < deadline {
                if let c = (try? MetricsScrape.fetch(metrics)).flatMap(Self.captured), c > start { break }
            }
            pauseBriefly(us: rng.next() % 2000)
        } else {
            pauseBriefly(us: rng.next() % (intervalMs * 1000 * 3))
        }
        let at = clock.monotonicNs()
        child.signal(SIGKILL)
        return at
    }

    /// The injected early release, made certain: a random kill can come when the unbuffered
    /// primary has released nothing past its last committed checkpoint (then the drill passes and
    /// proves nothing). Cuts the primary off from its backup, so the backup commits nothing
    /// captured after the cut; lets the guest run on until the primary captured two more
    /// checkpoints (a whole epoch after the cut, its output released at once) and the observer
    /// received packets after the cut; then kills it. Returns the time of the kill.
    private func releaseUncommittedThenKill(metrics: Endpoint, child: ChildProcess, cut proxy: PartitionProxy,
                                            observer: PacketObserver) throws -> UInt64 {
        proxy.cut()
        let seenAtCut = observer.packets().count
        let deadlineMs = 4 * config.settings.timeoutNs / 1_000_000 + 10_000
        guard let capturedAtCut = (try? MetricsScrape.fetch(metrics)).flatMap(Self.captured) else {
            throw ProtocolError("the first primary's metrics did not answer after its backup was cut off")
        }
        let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
        while clock.monotonicNs() < deadline {
            let captured = (try? MetricsScrape.fetch(metrics)).flatMap(Self.captured) ?? 0
            if captured >= capturedAtCut + 2 && observer.packets().count > seenAtCut { break }
            pauseBriefly(ms: 5)
        }
        let at = clock.monotonicNs()
        child.signal(SIGKILL)
        return at
    }

    // What the drill reads from a primary's metrics (a backup that took over serves its
    // taken-over guest's under the same names).
    static func acknowledged(_ metrics: MetricsSnapshot) -> Epoch? { metrics.integer("remusd_primary_epoch_acknowledged") }
    static func captured(_ metrics: MetricsSnapshot) -> Epoch? { metrics.integer("remusd_primary_epoch_captured") }

    /// The pause percentiles over the recent window, microseconds; nil before the first checkpoint.
    static func pauseMicroseconds(_ metrics: MetricsSnapshot) -> (p50: UInt64, p99: UInt64)? {
        guard (metrics.integer("remusd_primary_checkpoints_total") ?? 0) > 0,
              let p50 = metrics.value("remusd_primary_pause_recent_seconds", ["quantile": "0.5"]),
              let p99 = metrics.value("remusd_primary_pause_recent_seconds", ["quantile": "0.99"]) else { return nil }
        return (UInt64((p50 * 1e6).rounded()), UInt64((p99 * 1e6).rounded()))
    }

    /// The primary's state (`remusd_primary_state`), nil when its metrics do not answer.
    static func primaryState(_ endpoint: Endpoint) -> String? {
        (try? MetricsScrape.fetch(endpoint)).flatMap { $0.state("remusd_primary_state") }
    }

    private func printProgress(_ r: FailoverResult, of total: Int) {
        let line = "\(r.fault.rawValue) \(r.index)/\(total): epoch \(r.epoch)\(r.cutMidCheckpoint ? " (cut mid-checkpoint)" : ""), detected in \(format(r.detectionMs)) ms, running \(format(r.activationMs)) ms later, \(r.verified ? "verified" : "FAILED")\n"
        let bytes = Array(line.utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    private func makeDirectory() throws -> String {
        if let d = config.directory {
            if mkdir(d, 0o755) != 0 && errno != EEXIST { throw SystemError(call: "mkdir(\(d))", errno: errno) }
            return d
        }
        var template = Array("/tmp/remusd-drill-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw SystemError(call: "mkdtemp", errno: errno)
        }
        return String(cString: p)
    }
}

/// The drill's children, readable from a signal-watching thread while the drill's thread starts more.
private final class RunningChildren: @unchecked Sendable {  // `children` guarded by monitor
    private let monitor = MonitorLock()
    private var children: [ChildProcess] = []
    private var dir = ""
    func add(_ child: ChildProcess) { monitor.withLock { children.append(child) } }
    var all: [ChildProcess] { monitor.withLock { children } }
    var directory: String {
        get { monitor.withLock { dir } }
        set { monitor.withLock { dir = newValue } }
    }
}
