import Glibc
import RemusCore

/// What `remusd drill` runs.
public struct DrillConfiguration: Sendable {
    public var failovers: Int
    public var seed: UInt64
    public var settings: ProtectionSettings
    public var simulated: SimulatedGuestParameters
    /// Work directory (logs, activation reports); kept when the drill fails or `keep` is set.
    public var directory: String?
    public var keep: Bool
    /// Print a progress line per failover.
    public var progress: Bool
    /// Fault injected on purpose to prove the verifier catches it: the first primary releases
    /// output at once instead of on ACK (`--unsafe --no-netbuf`).
    public var injectEarlyRelease = false
    public init(failovers: Int, seed: UInt64, settings: ProtectionSettings, simulated: SimulatedGuestParameters,
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

/// One verified (or not) failover.
public struct FailoverResult: Sendable {
    public var index: Int
    /// Epoch the backup took over from.
    public var epoch: Epoch
    /// The kill landed while a checkpoint was in flight to the backup (it was dropped).
    public var cutMidCheckpoint: Bool
    /// Kill to loss detected, ms.
    public var detectionMs: Double
    /// Loss detected to guest running, ms.
    public var activationMs: Double
    /// Packets the outside world saw from state the backup did not commit (I1 violations).
    public var releasedUncommitted: Int
    /// Packets emitted by the dead primary and never released (lost with it, as in any Remus).
    public var discardedWithPrimary: Int
    /// The backup declared the primary lost (silence) before it was killed: a false alarm that
    /// fencing and held output made harmless.
    public var falseAlarm = false
    public var verified: Bool
    public var problems: [String]
}

/// `remusd drill`: a backup and a primary with the simulated guest on loopback; the primary is
/// SIGKILLed at random moments, the backup takes over, the verifier checks I1–I5, protection
/// resumes in the other direction, and again.
public final class Drill: @unchecked Sendable {  // driven from one thread; the observer has its own lock
    let config: DrillConfiguration
    let clock = SystemClock()
    private var rng: SplitMix

    public init(_ config: DrillConfiguration) {
        self.config = config
        rng = SplitMix(seed: config.seed)
    }

    /// Runs every failover; returns the results (all verified, or stops at the first failure).
    public func run() throws -> [FailoverResult] {
        Log.setRole("drill")
        SignalWatcher.ignorePipe()
        let dir = try makeDirectory()
        let observer = try PacketObserver()
        let exe = ProcessEnvironment.executablePath
        let s = config.settings
        let timing = ["--interval", "\(s.intervalNs / 1_000_000)", "--heartbeat", "\(s.heartbeatNs / 1_000_000)", "--timeout", "\(s.timeoutNs / 1_000_000)"]
        let env = ["REMUSD_RUN_DIR": dir]
        let ports = try freePorts(config.failovers + 1)
        var results: [FailoverResult] = []
        var children: [ChildProcess] = []
        var finished = false
        var previousGaps = 0
        defer {
            for c in children { c.signal(SIGKILL); c.wait() }
            if finished && !config.keep && results.allSatisfy(\.verified) {
                removeTree(dir)
            } else {
                Log.info("logs and activation reports kept in \(dir)")
            }
        }

        func startBackup(_ g: Int) throws -> ChildProcess {
            var args = [exe, "receive", "--listen", "127.0.0.1:\(ports[g])", "--fence", "test -e \(dir)/fenced-\(g)",
                        "--nic-sink", "\(observer.endpoint)", "--activation-report", "\(dir)/activation-\(g)",
                        "--exit-after-protection", "--status-socket", "\(dir)/backup-\(g).sock"] + timing
            if g + 1 < ports.count { args += ["--reprotect-to", "127.0.0.1:\(ports[g + 1])"] }
            let child = try ChildProcess(arguments: args, outputFile: "\(dir)/backup-\(g).log", environment: env)
            children.append(child)
            return child
        }

        // Generation 0: a fresh guest protected towards backup 0.
        var backup = try startBackup(0)
        try waitForFile("\(dir)/backup-0.sock", what: "backup 0 to listen", deadlineMs: 5000)
        let p = config.simulated
        var primary = try ChildProcess(
            arguments: [exe, "protect", "drill-guest", "127.0.0.1:\(ports[0])", "--backend", "sim",
                        "--sim-memory", "\(p.memoryBytes >> 20)", "--sim-vcpus", "\(p.vcpus)", "--sim-dirty-rate", "\(p.dirtyRate)",
                        "--sim-seed", "\(p.seed)", "--nic-sink", "\(observer.endpoint)", "--status-socket", "\(dir)/primary-0.sock"] + timing
                + (config.injectEarlyRelease ? ["--unsafe", "--no-netbuf"] : []),
            outputFile: "\(dir)/primary-0.log", environment: env)
        children.append(primary)
        var primarySocket = "\(dir)/primary-0.sock"
        var primaryPid = primary.pid

        for g in 0..<config.failovers {
            // The next backup listens before this failover so the survivor can protect onwards.
            let nextBackup = g + 1 < config.failovers ? try startBackup(g + 1) : nil
            // Let protection run: at least three acknowledged checkpoints, then a random moment.
            try waitForAcknowledged(socket: primarySocket, atLeast: 3, deadlineMs: 20_000, who: "generation \(g)'s primary")
            let killedAt = killAtRandomMoment(socket: primarySocket, child: primary)
            primary.wait()
            // Local fence: the drill knows the primary's process is gone.
            try touch("\(dir)/fenced-\(g)")
            let reportPath = "\(dir)/activation-\(g)"
            try waitForFile(reportPath, what: "backup \(g) to take over", deadlineMs: 20_000)
            let report = try ActivationReport.read(from: reportPath)
            observer.settle(forMs: 20)
            var result = DrillVerifier.verify(
                report: report, killedAt: killedAt, observed: observer.packets(), killedPid: primaryPid,
                survivorPid: backup.pid, index: g)
            result.index = g + 1
            // Gaps are counted over the whole drill: this failover's are the new ones.
            let gapsSoFar = result.discardedWithPrimary
            result.discardedWithPrimary -= previousGaps
            previousGaps = gapsSoFar
            results.append(result)
            if config.progress { printProgress(result, of: config.failovers) }
            if !result.verified {
                Log.error("failover \(g + 1) FAILED verification: \(result.problems.joined(separator: "; ")); logs kept in \(dir)")
                break
            }
            // The survivor is now the primary, protecting towards the next backup.
            primary = backup
            primaryPid = backup.pid
            primarySocket = "\(dir)/backup-\(g).sock"
            if let nextBackup { backup = nextBackup }
        }
        finished = true
        return results
    }

    // MARK: - Steps

    private func waitForAcknowledged(socket: String, atLeast: Epoch, deadlineMs: UInt64, who: String) throws {
        let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
        while clock.monotonicNs() < deadline {
            if let text = try? StatusSocket.query(socket), let acked = Self.acknowledged(in: text), acked >= atLeast { return }
            pauseBriefly(ms: 5)
        }
        throw ProtocolError("\(who) did not reach \(atLeast) acknowledged checkpoints within \(deadlineMs) ms; see the logs")
    }

    /// Kills at a random moment: half the time right after a checkpoint was captured (so it is
    /// likely in flight), otherwise at a uniformly random point of the next interval.
    /// Returns the monotonic time taken right before the signal (the backup may see the closed
    /// connection before this thread runs again).
    private func killAtRandomMoment(socket: String, child: ChildProcess) -> UInt64 {
        let intervalMs = config.settings.intervalNs / 1_000_000
        if rng.next() % 2 == 0 {
            let start = (try? StatusSocket.query(socket)).flatMap(Self.captured(in:)) ?? 0
            let deadline = clock.monotonicNs() + 4 * intervalMs * 1_000_000
            while clock.monotonicNs() < deadline {
                if let c = (try? StatusSocket.query(socket)).flatMap(Self.captured(in:)), c > start { break }
            }
            pauseBriefly(us: rng.next() % 2000)
        } else {
            pauseBriefly(us: rng.next() % (intervalMs * 1000 * 3))
        }
        let at = clock.monotonicNs()
        child.signal(SIGKILL)
        return at
    }

    static func acknowledged(in status: String) -> Epoch? { field(in: status, after: "acknowledged ") }
    static func captured(in status: String) -> Epoch? { field(in: status, after: "captured ") }

    /// The number after `key` in the first "epoch:" line (the taken-over guest's, for a backup).
    private static func field(in status: String, after key: String) -> Epoch? {
        for line in status.split(separator: "\n") where line.hasPrefix("epoch:") {
            // "epoch: captured 12, acknowledged 11, in flight 1"
            let words = line.split(whereSeparator: { $0 == " " || $0 == "," })
            guard let i = words.firstIndex(where: { $0 == key.trimmingWhitespace() }), i + 1 < words.count else { continue }
            return Epoch(words[i + 1])
        }
        return nil
    }

    private func printProgress(_ r: FailoverResult, of total: Int) {
        let line = "failover \(r.index)/\(total): epoch \(r.epoch)\(r.cutMidCheckpoint ? " (cut mid-checkpoint)" : ""), detected in \(format(r.detectionMs)) ms, running \(format(r.activationMs)) ms later, \(r.verified ? "verified" : "FAILED")\n"
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

// MARK: - Small helpers

func format(_ v: Double) -> String {
    let r = (v * 10).rounded() / 10
    return String(r)
}

/// Waits on a monotonic deadline without busy-spinning; used only by the drill's orchestration
/// (choosing random kill moments, polling for files), never as synchronisation in tests.
func pauseBriefly(ms: UInt64 = 0, us: UInt64 = 0) {
    var ts = timespec(tv_sec: Int((ms * 1000 + us) / 1_000_000), tv_nsec: Int(((ms * 1000 + us) % 1_000_000) * 1000))
    var remaining = timespec()
    while nanosleep(&ts, &remaining) == -1 && errno == EINTR { ts = remaining }
}

func waitForFile(_ path: String, what: String, deadlineMs: UInt64) throws {
    let clock = SystemClock()
    let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
    while access(path, F_OK) != 0 {
        if clock.monotonicNs() > deadline { throw ProtocolError("timed out after \(deadlineMs) ms waiting for \(what) (\(path))") }
        pauseBriefly(ms: 2)
    }
}

func touch(_ path: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT, 0o644)
    guard fd >= 0 else { throw SystemError(call: "open(\(path))", errno: errno) }
    close(fd)
}

func removeTree(_ path: String) {
    _ = try? runShell("rm -rf '\(path)'")
}

/// Free TCP ports on loopback (bound and released; the drill uses them a moment later).
func freePorts(_ count: Int) throws -> [UInt16] {
    var listeners: [TCPListener] = []
    for _ in 0..<count { listeners.append(try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))) }
    return listeners.map(\.port)
}

/// A small deterministic generator for the drill's random choices.
struct SplitMix {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension SignalWatcher {
    static func ignorePipe() { signal(SIGPIPE, SIG_IGN) }
}
