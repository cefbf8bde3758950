import CoreMetrics
import Prometheus
import RemusCore

// Prometheus has types of these names too; ours are swift-metrics' (made with an explicit factory).
private typealias Gauge = CoreMetrics.Gauge
private typealias Counter = CoreMetrics.Counter
private typealias Recorder = CoreMetrics.Recorder

/// One daemon's metrics: a Prometheus registry and the swift-metrics factory that feeds it.
///
/// Library code never uses `MetricsSystem.bootstrap`: every metric is made with this factory,
/// so daemons that tests run in one process keep apart. The executable makes one per process
/// and bootstraps swift-metrics with its `factory`, so anything else that records metrics lands
/// in the same registry.
public final class DaemonMetrics: Sendable {
    /// Where every metric of this daemon lives; `exposition()` renders it.
    public let registry: PrometheusCollectorRegistry
    /// A swift-metrics factory over `registry`, with remusd's histogram buckets.
    public let factory: PrometheusMetricsFactory

    public init() {
        registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        // A pause is a local copy: tens of microseconds to tens of milliseconds.
        let pauseBuckets: [Duration] = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .seconds(1),
        ]
        factory.durationHistogramBuckets[PrimaryMetrics.pauseName] = pauseBuckets
        // Its parts: a suspend or resume alone can take a few microseconds.
        factory.durationHistogramBuckets[PrimaryMetrics.pausePartName] = [.microseconds(10), .microseconds(50)] + pauseBuckets
        factory.valueHistogramBuckets[PrimaryMetrics.checkpointPagesName] = [0, 1, 16, 64, 256, 1024, 4096, 16384, 65536, 262_144]
        factory.valueHistogramBuckets[PrimaryMetrics.checkpointBytesName] = [
            4096, 65536, 262_144, 1_048_576, 4_194_304, 16_777_216, 67_108_864, 268_435_456, 1_073_741_824,
        ]
        self.factory = factory
    }

    /// The Prometheus text of every metric (format 0.0.4).
    public func exposition() -> [UInt8] { registry.emitToBuffer() }
}

/// An enum as a gauge: one series per value, `name{state="protected"} 1`, the others 0.
struct StateGauge {
    private let gauges: [String: Gauge]
    private var current: String?

    init(name: String, states: [String], factory: any MetricsFactory) {
        var gauges: [String: Gauge] = [:]
        for state in states { gauges[state] = Gauge(label: name, dimensions: [("state", state)], factory: factory) }
        self.gauges = gauges
        for gauge in gauges.values { gauge.record(0) }
    }

    mutating func set(_ state: String) {
        guard state != current else { return }
        if let current { gauges[current]?.record(0) }
        gauges[state]?.record(1)
        current = state
    }
}

/// Adds to a counter what a running total grew by since the last call.
struct TotalCounter {
    private let counter: Counter
    private var seen: UInt64 = 0

    init(_ name: String, factory: any MetricsFactory) { counter = Counter(label: name, factory: factory) }

    mutating func advance(to total: UInt64) {
        // A total that went back (a new connection's statistics) starts a new run from there.
        if total > seen { counter.increment(by: Int64(clamping: total - seen)) }
        seen = total
    }
}

/// The primary's metrics: every number of `remusd status`. Updated from `PrimaryStatistics`
/// under its lock (per event, per checkpoint: never per page).
struct PrimaryMetrics {
    static let pauseName = "remusd_primary_pause_seconds"
    static let pausePartName = "remusd_primary_pause_part_seconds"
    static let checkpointPagesName = "remusd_primary_checkpoint_pages"
    static let checkpointBytesName = "remusd_primary_checkpoint_bytes"

    /// The values of `remusd_primary_state{state=…}`.
    static let states = ["idle", "connecting", "synchronizing", "protected", "degraded", "switching_over",
                         "handed_off", "self_fenced", "stopping", "stopped"]

    private var state: StateGauge
    private let captured, acknowledged, inFlight: Gauge
    private var checkpoints: TotalCounter
    private let pause: CoreMetrics.Timer
    private let pauseP50, pauseP99: Gauge
    /// Per part of the pause (suspend, capture, resume): a histogram and the recent p50 / p99.
    private let pauseParts: [(histogram: CoreMetrics.Timer, p50: Gauge, p99: Gauge)]
    private let checkpointPages, checkpointBytes: Recorder
    private let checkpointPagesP50, lastCheckpointBytes: Gauge
    private let checkpointRate: Gauge
    private let bytesInFlight: Gauge
    private var shippedBytes, precopyPages: TotalCounter
    private let syncSent, syncTotal: Gauge
    private let lastAckAge: Gauge
    private let heldPackets, heldBytes: Gauge
    private var drops, overlimits: TotalCounter
    private let speed: Gauge
    private var throttleEvents, deferred: TotalCounter
    private var pausesSeen: UInt64 = 0
    private var shipsSeen: UInt64 = 0

    init(factory: any MetricsFactory) {
        func gauge(_ name: String) -> Gauge { Gauge(label: name, factory: factory) }
        state = StateGauge(name: "remusd_primary_state", states: Self.states, factory: factory)
        captured = gauge("remusd_primary_epoch_captured")
        acknowledged = gauge("remusd_primary_epoch_acknowledged")
        inFlight = gauge("remusd_primary_checkpoints_in_flight")
        checkpoints = TotalCounter("remusd_primary_checkpoints_total", factory: factory)
        pause = CoreMetrics.Timer(label: Self.pauseName, factory: factory)
        pauseP50 = Gauge(label: "remusd_primary_pause_recent_seconds", dimensions: [("quantile", "0.5")], factory: factory)
        pauseP99 = Gauge(label: "remusd_primary_pause_recent_seconds", dimensions: [("quantile", "0.99")], factory: factory)
        pauseParts = PauseSplitWindows().parts.map { part in
            (CoreMetrics.Timer(label: Self.pausePartName, dimensions: [("part", part.name)], factory: factory),
             Gauge(label: "remusd_primary_pause_part_recent_seconds", dimensions: [("part", part.name), ("quantile", "0.5")], factory: factory),
             Gauge(label: "remusd_primary_pause_part_recent_seconds", dimensions: [("part", part.name), ("quantile", "0.99")], factory: factory))
        }
        checkpointPages = Recorder(label: Self.checkpointPagesName, factory: factory)
        checkpointBytes = Recorder(label: Self.checkpointBytesName, factory: factory)
        checkpointPagesP50 = Gauge(label: "remusd_primary_checkpoint_recent_pages", dimensions: [("quantile", "0.5")], factory: factory)
        lastCheckpointBytes = gauge("remusd_primary_last_checkpoint_bytes")
        checkpointRate = gauge("remusd_primary_checkpoint_rate_per_second")
        bytesInFlight = gauge("remusd_primary_bytes_in_flight")
        shippedBytes = TotalCounter("remusd_primary_shipped_bytes_total", factory: factory)
        precopyPages = TotalCounter("remusd_primary_precopy_pages_total", factory: factory)
        syncSent = gauge("remusd_primary_sync_pages_sent")
        syncTotal = gauge("remusd_primary_sync_pages")
        lastAckAge = gauge("remusd_primary_last_ack_age_seconds")
        heldPackets = gauge("remusd_primary_output_held_packets")
        heldBytes = gauge("remusd_primary_output_held_bytes")
        drops = TotalCounter("remusd_primary_output_dropped_packets_total", factory: factory)
        overlimits = TotalCounter("remusd_primary_output_overlimits_total", factory: factory)
        speed = gauge("remusd_primary_guest_speed_percent")
        throttleEvents = TotalCounter("remusd_primary_throttle_events_total", factory: factory)
        deferred = TotalCounter("remusd_primary_checkpoints_deferred_total", factory: factory)
        lastAckAge.record(-1)
        speed.record(100)
    }

    /// Brings the counters, histograms and current values up to `stats`: cheap, after every change.
    mutating func publish(_ stats: PrimaryStatistics) {
        state.set(Self.name(of: stats.state))
        captured.record(Int64(stats.captured))
        acknowledged.record(Int64(stats.acknowledged))
        inFlight.record(stats.unacknowledged)
        checkpoints.advance(to: stats.pauses.total)
        // One histogram sample per checkpoint captured since the last call.
        if stats.pauses.total > pausesSeen {
            if let latest = stats.pauses.latest { pause.recordNanoseconds(latest) }
            for (metric, part) in zip(pauseParts, stats.pauseSplit.parts) {
                if let latest = part.window.latest { metric.histogram.recordNanoseconds(latest) }
            }
            if let pages = stats.dirtyPages.latest { checkpointPages.record(pages) }
            pausesSeen = stats.pauses.total
        }
        if stats.shippedCheckpoints > shipsSeen {
            checkpointBytes.record(stats.lastCheckpointBytes)
            shipsSeen = stats.shippedCheckpoints
        }
        lastCheckpointBytes.record(stats.lastCheckpointBytes)
        bytesInFlight.record(stats.unacknowledgedBytes.values.reduce(0, +))
        shippedBytes.advance(to: stats.shippedBytes)
        precopyPages.advance(to: stats.precopyPages)
        syncSent.record(stats.syncProgress.sent)
        syncTotal.record(stats.syncProgress.total)
        heldPackets.record(stats.output.heldPackets)
        heldBytes.record(stats.output.heldBytes)
        drops.advance(to: stats.output.drops)
        overlimits.advance(to: stats.output.overlimits)
        speed.record(stats.speedPercent)
        throttleEvents.advance(to: UInt64(stats.throttleEvents))
        deferred.advance(to: UInt64(stats.deferred))
    }

    /// The values computed over the recent window (percentiles, rate) and the last ACK's age at
    /// `now` (monotonic ns): when the metrics are served, not at every change.
    mutating func refresh(_ stats: PrimaryStatistics, now: UInt64) {
        publish(stats)
        if let p50 = stats.pauses.percentile(50), let p99 = stats.pauses.percentile(99) {
            pauseP50.record(Double(p50) / 1e9)
            pauseP99.record(Double(p99) / 1e9)
        }
        for (metric, part) in zip(pauseParts, stats.pauseSplit.parts) {
            if let p50 = part.window.percentile(50), let p99 = part.window.percentile(99) {
                metric.p50.record(Double(p50) / 1e9)
                metric.p99.record(Double(p99) / 1e9)
            }
        }
        if let pages = stats.dirtyPages.percentile(50) { checkpointPagesP50.record(pages) }
        checkpointRate.record(stats.checkpointRate ?? 0)
        lastAckAge.record(stats.lastAckAt == 0 ? -1 : Double(now - min(stats.lastAckAt, now)) / 1e9)
    }

    static func name(of state: PrimaryEngine.State) -> String {
        switch state {
        case .idle: "idle"
        case .connecting: "connecting"
        case .synchronizing: "synchronizing"
        case .protecting: "protected"
        case .degraded: "degraded"
        case .switchingOver: "switching_over"
        case .handedOff: "handed_off"
        case .selfFenced: "self_fenced"
        case .stopping: "stopping"
        case .stopped: "stopped"
        }
    }
}

/// The backup's metrics: every number of its `remusd status`.
struct BackupMetrics {
    /// The values of `remusd_backup_state{state=…}`.
    static let states = ["listening", "synchronizing", "receiving", "fencing", "awaiting_operator", "activating", "active", "stopped"]

    private var state: StateGauge
    private let committed: Gauge
    private let committedCheckpoints: Counter
    private let fenceAttempts: Counter
    private let fenceRunning: Gauge
    private let primaryConnected: Gauge
    private let acceptFailing: Gauge
    private let activation: Gauge

    init(factory: any MetricsFactory) {
        func gauge(_ name: String) -> Gauge { Gauge(label: name, factory: factory) }
        state = StateGauge(name: "remusd_backup_state", states: Self.states, factory: factory)
        committed = gauge("remusd_backup_epoch_committed")
        committedCheckpoints = Counter(label: "remusd_backup_checkpoints_committed_total", factory: factory)
        fenceAttempts = Counter(label: "remusd_backup_fence_attempts_total", factory: factory)
        fenceRunning = gauge("remusd_backup_fence_running_seconds")
        primaryConnected = gauge("remusd_backup_primary_connected")
        acceptFailing = gauge("remusd_backup_accept_failing")
        activation = gauge("remusd_backup_activation_seconds")
        for g in [committed, fenceRunning, primaryConnected, acceptFailing] { g.record(0) }
        activation.record(-1)
    }

    mutating func publish(_ state: BackupCommitter.State, committed epoch: Epoch) {
        self.state.set(Self.name(of: state))
        committed.record(Int64(epoch))
        if case .receiving(_, let connected) = state { primaryConnected.record(connected ? 1 : 0) } else { primaryConnected.record(0) }
    }

    func checkpointCommitted() { committedCheckpoints.increment() }
    func fenceStarted() { fenceAttempts.increment() }
    /// How long the running fence attempt has run, 0 when none runs.
    func fence(runningForNs ns: UInt64) { fenceRunning.record(Double(ns) / 1e9) }
    func accepting(failing: Bool) { acceptFailing.record(failing ? 1 : 0) }
    /// Loss detected to guest running, after a takeover.
    func activated(afterNs ns: UInt64) { activation.record(Double(ns) / 1e9) }

    static func name(of state: BackupCommitter.State) -> String {
        switch state {
        case .listening: "listening"
        case .receiving(let committed, _): committed == 0 ? "synchronizing" : "receiving"
        case .fencing: "fencing"
        case .awaitingOperator: "awaiting_operator"
        case .activating: "activating"
        case .active: "active"
        case .stopped: "stopped"
        }
    }
}
