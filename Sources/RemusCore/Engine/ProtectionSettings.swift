/// What the primary does when the guest dirties memory faster than it can be protected (I6).
public enum OverloadPolicy: String, Equatable, Sendable, CaseIterable {
    /// Slow the guest's vCPUs until checkpoints fit the pause bound (Xen: the credit scheduler's cap).
    case throttle
    /// Keep protecting with longer epochs (up to 16× the interval), and say so.
    case degrade
    /// Stop protecting; the guest keeps running on the primary, unprotected.
    case abort
}

/// Tunables of a protected guest's epoch loop. All durations in nanoseconds.
public struct ProtectionSettings: Equatable, Sendable {
    /// Time between checkpoints (`--interval`, default 100 ms).
    public var intervalNs: UInt64
    /// Time between heartbeats in each direction (`--heartbeat`, default 100 ms).
    public var heartbeatNs: UInt64
    /// Silence after which the peer counts as lost (`--timeout`, default 600 ms).
    public var timeoutNs: UInt64
    /// Most live pre-copy rounds before the first checkpoint is taken anyway.
    public var maxPrecopyRounds: Int
    /// Pre-copy stops once a round leaves at most this many dirty pages.
    public var precopyTargetPages: Int
    /// Most checkpoints captured but not yet acknowledged. When reached, the next checkpoint waits
    /// (the guest runs on, its output stays held) until an ACK arrives or the timeout fires.
    public var maxUnacknowledged: Int
    /// Most checkpoints captured but not yet written to the connection (staging arenas in use).
    public var maxShipping: Int
    /// First delay before reconnecting to a lost backup; doubles up to `maxRetryNs`.
    public var retryNs: UInt64
    /// Longest delay between reconnection attempts.
    public var maxRetryNs: UInt64
    /// How long a primary that lost its backup keeps the guest's output held while it reconnects
    /// (`--fence-grace`, default 2 s). The backup may be fencing this primary right now (its
    /// silence detection can fire while this host is merely slow); releasing output it never
    /// committed before the backup could have fenced would let clients see state that a takeover
    /// rolls back. After the grace the output flows unprotected (DEGRADED).
    public var fenceGraceNs: UInt64
    /// Longest pause per checkpoint the policy aims for (`--max-pause`, default 50 ms); 0: no bound.
    public var maxPauseNs: UInt64
    /// What to do when checkpoints do not fit (`--on-overload`, default throttle).
    public var overload: OverloadPolicy
    /// Longest a connection attempt to the backup may take, handshake included (`--connect-timeout`,
    /// default 3 s). A backup that accepts the TCP connection but never answers (frozen, overloaded)
    /// otherwise keeps the primary CONNECTING for ever; past it the attempt counts as failed.
    public var connectTimeoutNs: UInt64
    /// Longest a fence may run before the backup counts it as failed and retries (default 30 s:
    /// a power fence through a management controller can take several seconds).
    public var fenceTimeoutNs: UInt64

    public init(
        intervalNs: UInt64 = 100_000_000, heartbeatNs: UInt64 = 100_000_000, timeoutNs: UInt64 = 600_000_000,
        maxPrecopyRounds: Int = 5, precopyTargetPages: Int = 50, maxUnacknowledged: Int = 8, maxShipping: Int = 2,
        retryNs: UInt64 = 500_000_000, maxRetryNs: UInt64 = 10_000_000_000, fenceGraceNs: UInt64 = 2_000_000_000,
        maxPauseNs: UInt64 = 50_000_000, overload: OverloadPolicy = .throttle,
        connectTimeoutNs: UInt64 = 3_000_000_000, fenceTimeoutNs: UInt64 = 30_000_000_000
    ) {
        self.connectTimeoutNs = connectTimeoutNs
        self.fenceTimeoutNs = fenceTimeoutNs
        self.fenceGraceNs = fenceGraceNs
        self.maxPauseNs = maxPauseNs
        self.overload = overload
        self.intervalNs = intervalNs
        self.heartbeatNs = heartbeatNs
        self.timeoutNs = timeoutNs
        self.maxPrecopyRounds = maxPrecopyRounds
        self.precopyTargetPages = precopyTargetPages
        self.maxUnacknowledged = maxUnacknowledged
        self.maxShipping = maxShipping
        self.retryNs = retryNs
        self.maxRetryNs = maxRetryNs
    }

    /// Checks the settings hang together; returns a sentence naming the first problem.
    public func problem() -> String? {
        if intervalNs == 0 { return "the checkpoint interval must be above 0 ms" }
        if heartbeatNs == 0 { return "the heartbeat interval must be above 0 ms" }
        if timeoutNs < 2 * heartbeatNs {
            return "the timeout (\(timeoutNs / 1_000_000) ms) must be at least two heartbeat intervals (\(2 * heartbeatNs / 1_000_000) ms), or every late heartbeat looks like a lost peer"
        }
        if maxPrecopyRounds < 1 { return "at least one pre-copy round is needed" }
        if maxUnacknowledged < 1 || maxShipping < 1 { return "at least one checkpoint must be allowed in flight" }
        if retryNs == 0 { return "the reconnection delay must be above 0 ms" }
        if connectTimeoutNs == 0 { return "the connect timeout must be above 0 ms" }
        if fenceTimeoutNs == 0 { return "the fence timeout must be above 0 ms" }
        return nil
    }
}
