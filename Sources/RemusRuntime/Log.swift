import Glibc

/// Daemon log lines on standard error: "2026-11-21T23:30:00.123Z remusd[primary] message".
public enum Log {
    nonisolated(unsafe) private static var role = "remusd"
    private static let lock = MonitorLock()

    /// Names the daemon in every line ("primary", "backup", "drill").
    public static func setRole(_ name: String) { lock.withLock { role = "remusd[\(name)]" } }

    public static func info(_ message: String) { write("", message) }
    public static func warning(_ message: String) { write("WARNING ", message) }
    public static func error(_ message: String) { write("ERROR ", message) }

    private static func write(_ level: String, _ message: String) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = time_t(ts.tv_sec)
        var tmv = tm()
        gmtime_r(&t, &tmv)
        let stamp = String(format4: Int(tmv.tm_year) + 1900) + "-" + two(Int(tmv.tm_mon) + 1) + "-" + two(Int(tmv.tm_mday))
            + "T" + two(Int(tmv.tm_hour)) + ":" + two(Int(tmv.tm_min)) + ":" + two(Int(tmv.tm_sec)) + "." + three(Int(ts.tv_nsec) / 1_000_000) + "Z"
        let line = lock.withLock { "\(stamp) \(role) \(level)\(message)\n" }
        let bytes = Array(line.utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
    }

    private static func two(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
    private static func three(_ v: Int) -> String { v < 10 ? "00\(v)" : v < 100 ? "0\(v)" : "\(v)" }
}

extension String {
    fileprivate init(format4 v: Int) { self = v < 1000 ? String(repeating: "0", count: 4 - String(v).count) + String(v) : String(v) }
}

/// Recent samples of a quantity (pause per checkpoint, checkpoint size), for percentiles.
public struct SampleWindow: Sendable {
    private var samples: [UInt64]
    private var next = 0
    private var filled = 0
    public private(set) var total: UInt64 = 0

    public init(capacity: Int = 1024) { samples = [UInt64](repeating: 0, count: capacity) }

    public mutating func add(_ value: UInt64) {
        samples[next] = value
        next = (next + 1) % samples.count
        filled = min(filled + 1, samples.count)
        total += 1
    }

    /// The p-th percentile (0…100) of the window, nil when empty.
    public func percentile(_ p: Double) -> UInt64? {
        guard filled > 0 else { return nil }
        let sorted = samples[0..<filled].sorted()
        let index = min(Int((Double(filled - 1) * p / 100).rounded()), filled - 1)
        return sorted[index]
    }
}
