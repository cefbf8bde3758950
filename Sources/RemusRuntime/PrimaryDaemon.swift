import Glibc
import RemusCore
import RemusNetbuf

/// `remusd protect`: creates (simulated backend) or opens the guest and protects it until stopped.
public final class PrimaryDaemon: @unchecked Sendable {  // configured once, then driven by PrimaryProtection's threads
    let config: ProtectConfiguration
    /// This daemon's metrics (served with `--metrics-listen`).
    let metrics: DaemonMetrics

    /// Where the guest comes from (tests inject their own).
    let backends: BackendFactory

    /// - Parameter metrics: the process's registry (the executable bootstraps swift-metrics with
    ///   it); by default one of the daemon's own.
    public convenience init(_ config: ProtectConfiguration, metrics: DaemonMetrics = DaemonMetrics()) {
        self.init(config, backends: .standard, metrics: metrics)
    }

    init(_ config: ProtectConfiguration, backends: BackendFactory, metrics: DaemonMetrics = DaemonMetrics()) {
        self.config = config
        self.backends = backends
        self.metrics = metrics
    }

    /// Returns the process exit code once protection has stopped.
    public func run() throws -> Int32 {
        SignalWatcher.blockTerminationSignals()
        Log.setRole("primary")
        let clock = SystemClock()
        // Bound before the guest starts, so a taken port is reported before anything runs.
        let protecting = LateBound<PrimaryProtection>()
        let metricsServer = try config.metricsListen.map { listen in
            try MetricsServer(listen: listen) { [metrics] in
                protecting.value?.refreshMetrics()
                return metrics.exposition()
            }
        }
        defer { metricsServer?.stop() }
        if let metricsServer { Log.info("serving metrics at http://\(metricsServer.endpoint)/metrics") }
        // Certificates are loaded before the guest is touched: a bad file stops nothing that runs.
        let transport = try ReplicationTransport(config.security, side: .client)
        if case .insecurePlaintext = config.security {
            Log.warning("replication to \(config.backup) is \(transport.summary): whoever can reach that address can read the guest's memory; use --tls-cert, --tls-key and --tls-ca outside a lab")
        } else {
            Log.info("replication channel: \(transport.summary)")
        }
        let opened = try backends.openPrimary(for: config, clock: clock)
        // Protection over: what opening set up is undone (a Xen guest runs on here without its
        // checkpointed save and with its vifs unbuffered again).
        defer { opened.close() }
        let (guest, output) = (opened.guest, opened.output)
        var held: (EtcdWitness, WitnessConfiguration)?
        if let wc = config.witness {
            let w = try wc.makeWitness()
            guard try w.acquire(owner: EtcdWitness.ownerName(role: "primary"), ttlSeconds: wc.ttlSeconds) else {
                let holder = (try? w.holder()).flatMap { $0 } ?? "another host"
                throw ProtocolError("the witness key \(wc.url) is held by \(holder): another copy of '\(config.domain)' may be active; nothing was started")
            }
            held = (w, wc)
            Log.info("holding the witness \(wc.url)")
        }
        let finished = Gate<Bool>()
        // The daemon exits when the operator ended protection (stop, switchover, SIGTERM). When
        // protection ends by itself (--on-overload abort) the guest keeps running here.
        let ended = OneShotFlag()
        let protection = try PrimaryProtection(
            guest: guest, output: output, backup: config.backup, transport: transport, settings: config.settings,
            maxCheckpointPages: config.maxCheckpointPages, blackhole: config.blackhole, clock: clock,
            witness: held, metrics: metrics, onFinished: { _ in
                if ended.isSet || guest.hasVanished {
                    // Ended by the operator, or the guest is gone: nothing left to do here.
                    finished.open(with: true)
                } else {
                    Log.warning("protection ended; the guest keeps running here UNPROTECTED; 'remusd stop \(self.config.domain)' or SIGTERM ends this daemon")
                }
            })
        SignalWatcher.start {
            let wasEnded = ended.set()
            protection.stop(.plannedStop)
            // Protection may have ended already (abort): then nothing else will finish it.
            if wasEnded || protection.isStopped { finished.open(with: true) }
        }
        let status = try StatusSocket(
            path: config.statusSocket,
            snapshot: { "guest: \(self.config.domain) (\(self.config.backend)), backup \(self.config.backup) over \(transport.summary)\n" + protection.statusText() },
            command: { line in
                switch line {
                case "stop":
                    _ = ended.set()
                    if protection.isStopped { finished.open(with: true) }
                    protection.stop(.plannedStop)
                    return "stopping protection of '\(self.config.domain)': the backup discards its image; the guest keeps running here\n"
                case "switchover":
                    _ = ended.set()
                    protection.switchover()
                    return "switchover of '\(self.config.domain)' requested: final checkpoint, then the backup runs the guest; follow it with 'remusd status'\n"
                default:
                    return "unknown command '\(line)' (a primary knows 'stop' and 'switchover')\n"
                }
            })
        protecting.value = protection
        Log.info("protecting '\(config.domain)' (\(guest.descriptor.pageCount) pages) towards \(config.backup), checkpoint every \(config.settings.intervalNs / 1_000_000) ms",
                 ["guest": "\(config.domain)", "peer": "\(config.backup)"])
        protection.start()
        _ = finished.wait()
        status.remove()
        return 0
    }
}

/// A flag set once from any thread.
final class OneShotFlag: @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var value = false
    /// Sets the flag; returns whether it was already set.
    func set() -> Bool { monitor.withLock { defer { value = true }; return value } }
    var isSet: Bool { monitor.withLock { value } }
}
