import Glibc
import Logging

/// The daemons' log: swift-log's `Logger` with `RemusLogHandler`, behind a small facade so call
/// sites stay one line: `Log.warning("backup lost", ["epoch": "\(epoch)", "peer": "\(peer)"])`.
///
/// The facade's logger is built with an explicit handler factory, never through
/// `LoggingSystem.bootstrap`, so daemons run in-process by tests log the same way; the executable
/// bootstraps swift-log with the same handler for any library that logs on its own.
public enum Log {
    private static let logger = Logger(label: "remusd") { label in RemusLogHandler(label: label) }

    /// Names the daemon in every line ("primary", "backup", "drill").
    public static func setRole(_ name: String) { RemusLogHandler.setRole(name) }

    public static func info(_ message: String, _ metadata: Logger.Metadata = [:]) {
        logger.info("\(message)", metadata: metadata.isEmpty ? nil : metadata)
    }
    public static func warning(_ message: String, _ metadata: Logger.Metadata = [:]) {
        logger.warning("\(message)", metadata: metadata.isEmpty ? nil : metadata)
    }
    public static func error(_ message: String, _ metadata: Logger.Metadata = [:]) {
        logger.error("\(message)", metadata: metadata.isEmpty ? nil : metadata)
    }
}

/// One line per event on standard error, written with a single `write(2)`:
/// `2026-11-21T23:30:00.123Z remusd[primary] WARNING message epoch=412 peer=10.0.0.2:7788`.
///
/// Under systemd (`JOURNAL_STREAM` names our standard error) the journal stamps the time itself
/// and reads the level from a `<N>` syslog-priority prefix: `<4>remusd[primary] WARNING message …`.
public struct RemusLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public var logLevel: Logger.Level = .info
    private let journald: Bool

    /// - Parameter journald: nil: decided from the environment (`JOURNAL_STREAM`).
    public init(label: String, journald: Bool? = nil) {
        self.journald = journald ?? Self.stderrIsJournal
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let own = event.metadata { merged.merge(own) { _, new in new } }
        let line = LogLine.format(
            level: event.level, message: event.message.description, metadata: merged,
            role: Self.role, timestamp: journald ? nil : LogLine.now(), journald: journald)
        var bytes = Array(line.utf8)
        bytes.append(UInt8(ascii: "\n"))
        _ = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
    }

    // The role is the process's (one daemon per process); tests that run daemons in-process
    // share it, which only changes the name in their lines.
    private static let roleLock = MonitorLock()
    nonisolated(unsafe) private static var currentRole = "remusd"
    static func setRole(_ name: String) { roleLock.withLock { currentRole = "remusd[\(name)]" } }
    static var role: String { roleLock.withLock { currentRole } }

    /// systemd sets JOURNAL_STREAM to "<device>:<inode>" of the journal's socket; it counts only
    /// while standard error still is that socket (a child may have redirected it).
    static var stderrIsJournal: Bool { isJournal(stream: ProcessEnvironment.current["JOURNAL_STREAM"]) }

    /// Whether standard error is the stream `JOURNAL_STREAM` ("<device>:<inode>") names; a value
    /// that is not of that form is taken at its word.
    static func isJournal(stream value: String?) -> Bool {
        guard let value, !value.isEmpty else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return true }
        var info = stat()
        guard fstat(2, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }
}

/// The text of one log line (without its newline); pure, for tests.
public enum LogLine {
    /// A wall-clock instant: seconds since the epoch and milliseconds.
    public struct Timestamp: Sendable, Equatable {
        public var seconds: Int
        public var milliseconds: Int
        public init(seconds: Int, milliseconds: Int) { self.seconds = seconds; self.milliseconds = milliseconds }
    }

    /// Now, from CLOCK_REALTIME.
    public static func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: Int(ts.tv_sec), milliseconds: Int(ts.tv_nsec) / 1_000_000)
    }

    /// `2026-11-21T23:30:00.123Z remusd[primary] WARNING message key=value …` (keys sorted);
    /// with `journald`, `<4>remusd[primary] WARNING message …` and no time (pass nil).
    public static func format(level: Logger.Level, message: String, metadata: Logger.Metadata, role: String,
                              timestamp: Timestamp?, journald: Bool) -> String {
        var line = ""
        if journald { line += "<\(syslogPriority(level))>" }
        if let timestamp { line += iso8601(timestamp) + " " }
        line += role + " "
        if let word = levelWord(level) { line += word + " " }
        line += message
        for key in metadata.keys.sorted() {
            line += " " + key + "=" + quoted(render(metadata[key]!))
        }
        return line
    }

    /// syslog(3) priorities: what the journal files the line under.
    public static func syslogPriority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// Information carries no word, so the common line stays short.
    private static func levelWord(_ level: Logger.Level) -> String? {
        switch level {
        case .trace: "TRACE"
        case .debug: "DEBUG"
        case .info: nil
        case .notice: "NOTICE"
        case .warning: "WARNING"
        case .error: "ERROR"
        case .critical: "CRITICAL"
        }
    }

    private static func render(_ value: Logger.MetadataValue) -> String {
        switch value {
        case .string(let s): s
        case .stringConvertible(let c): c.description
        case .array(let items): "[" + items.map(render).joined(separator: ",") + "]"
        case .dictionary(let d): "{" + d.keys.sorted().map { "\($0):\(render(d[$0]!))" }.joined(separator: ",") + "}"
        }
    }

    /// A value with a space, a quote or nothing at all is quoted, so the line still splits on spaces.
    private static func quoted(_ value: String) -> String {
        guard value.isEmpty || value.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.isNewline }) else { return value }
        var out = "\""
        for c in value {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out + "\""
    }

    static func iso8601(_ t: Timestamp) -> String {
        var seconds = time_t(t.seconds)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        return pad(Int(parts.tm_year) + 1900, 4) + "-" + pad(Int(parts.tm_mon) + 1, 2) + "-" + pad(Int(parts.tm_mday), 2)
            + "T" + pad(Int(parts.tm_hour), 2) + ":" + pad(Int(parts.tm_min), 2) + ":" + pad(Int(parts.tm_sec), 2)
            + "." + pad(t.milliseconds, 3) + "Z"
    }

    private static func pad(_ value: Int, _ width: Int) -> String {
        let digits = String(value)
        return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
    }
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

    /// The sample added last, nil when empty.
    public var latest: UInt64? { filled > 0 ? samples[(next + samples.count - 1) % samples.count] : nil }

    /// Samples the window holds now (at most its capacity).
    public var count: Int { filled }

    /// The p-th percentile (0…100) of the window, nil when empty.
    public func percentile(_ p: Double) -> UInt64? {
        guard filled > 0 else { return nil }
        let sorted = samples[0..<filled].sorted()
        let index = min(Int((Double(filled - 1) * p / 100).rounded()), filled - 1)
        return sorted[index]
    }
}
