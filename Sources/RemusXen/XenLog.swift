import CXen
import Glibc
import Synchronization

/// The logger handed to every Xen library handle: libxenctrl, libxl, libxenevtchn and
/// libxenforeignmemory log *why* a call failed (which device node, which hypercall) through it,
/// so remusd keeps the recent lines and attaches them to `XenError`s.
///
/// Every handle keeps its log alive: the libraries hold the logger's address until the handle
/// is closed. Messages may arrive on any thread (libxl's own threads, the save helper's
/// callbacks); the lines sit behind a mutex.
public final class XenLog: Sendable {
    /// A xentoollog level, least severe first.
    public enum Level: Int, Sendable, Comparable, CustomStringConvertible {
        case debug = 1, verbose, detail, progress, info, notice, warn, error, critical

        init(_ level: xentoollog_level) { self = Level(rawValue: Int(level.rawValue)) ?? .critical }

        /// Orders by severity.
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }

        /// The level's name, e.g. `"error"`.
        public var description: String {
            switch self {
            case .debug: "debug"
            case .verbose: "verbose"
            case .detail: "detail"
            case .progress: "progress"
            case .info: "info"
            case .notice: "notice"
            case .warn: "warning"
            case .error: "error"
            case .critical: "critical"
            }
        }
    }

    /// One message as a library logged it.
    public struct Line: Sendable, Equatable, CustomStringConvertible {
        public let level: Level
        /// The errno the library attached, nil when it attached none.
        public let errno: Int32?
        /// The library's context, e.g. `"xencall"` or `"libxl"`; empty when none was given.
        public let context: String
        /// The formatted text, at most 1023 bytes.
        public let message: String

        /// E.g. `xencall: error: Could not obtain handle on privileged command interface: No such file or directory`.
        public var description: String {
            let prefix = context.isEmpty ? "" : "\(context): "
            // SAFETY: strerror's result is copied at once.
            let cause = errno.map { ": " + String(cString: strerror($0)) } ?? ""
            return "\(prefix)\(level): \(message)\(cause)"
        }
    }

    /// Lines kept, oldest dropped first.
    public let capacity: Int
    /// Library lines at or above this level are also written to standard error; nil writes none.
    public let echoLevel: Level?
    /// remusd's own lines (`note`) at or above this level are also written to standard error;
    /// nil writes none.
    public let noteEchoLevel: Level?

    private struct State {
        var lines: [Line] = []
        var total = 0
    }
    private let state = Mutex(State())
    // SAFETY: allocated and initialised once in init, freed in deinit; the libraries only read
    // its function pointers. Sendable through the owner: nothing writes it after init.
    private nonisolated(unsafe) let logger: UnsafeMutablePointer<cxen_logger>

    /// - Parameters:
    ///   - capacity: lines kept (default 256).
    ///   - echoLevel: also write the libraries' lines at or above this level to standard error
    ///     (default: none).
    ///   - noteEchoLevel: also write remusd's own lines (`note`) at or above this level to
    ///     standard error (default: none).
    public init(capacity: Int = 256, echoLevel: Level? = nil, noteEchoLevel: Level? = nil) {
        self.capacity = max(1, capacity)
        self.echoLevel = echoLevel
        self.noteEchoLevel = noteEchoLevel
        logger = .allocate(capacity: 1)
        XenHandleCensus.opened()
        // SAFETY: `owner` is this object, unretained: the object outlives every handle that was
        // given the logger (each handle holds a strong reference to its XenLog).
        cxen_logger_init(logger, { owner, level, errnoval, context, message in
            guard let owner else { return }
            let log = Unmanaged<XenLog>.fromOpaque(owner).takeUnretainedValue()
            log.append(Line(
                level: Level(level),
                errno: errnoval >= 0 ? errnoval : nil,
                context: context.map { String(cString: $0) } ?? "",
                message: message.map { String(cString: $0) } ?? ""))
        }, Unmanaged.passUnretained(self).toOpaque())
    }

    deinit {
        logger.deallocate()
        XenHandleCensus.closed()
    }

    /// The pointer to give a library's `_open` call. Valid while this object lives.
    var pointer: UnsafeMutablePointer<xentoollog_logger> {
        // SAFETY: `base` is the first member of cxen_logger, so the addresses coincide.
        UnsafeMutableRawPointer(logger).assumingMemoryBound(to: xentoollog_logger.self)
    }

    /// The kept lines, oldest first.
    public var lines: [Line] { state.withLock { $0.lines } }

    /// How many lines were logged since creation (including ones no longer kept).
    public var count: Int { state.withLock { $0.total } }

    /// Lines at or above `level` logged after the `count` was `since`, oldest first: what a call
    /// that just failed had to say.
    public func lines(since: Int, atLeast level: Level = .warn) -> [Line] {
        state.withLock { state in
            let new = min(state.total - since, state.lines.count)
            guard new > 0 else { return [] }
            return state.lines.suffix(new).filter { $0.level >= level }
        }
    }

    /// Records a step of remusd's own on domain `domid` (context `"domain <domid>"`), e.g.
    /// which way the guest is suspended: what the log shows of a checkpointed save besides the
    /// libraries' own lines.
    ///
    /// Several notes are made per checkpoint, while the guest is suspended: a note below
    /// `noteEchoLevel` costs nothing (the message is not even built) and stays out of the ring,
    /// where it would only push out the libraries' lines that failure messages quote.
    func note(_ message: @autoclosure () -> String, domid: UInt32, level: Level = .debug) {
        guard let noteEchoLevel, level >= noteEchoLevel else { return }
        append(Line(level: level, errno: nil, context: "domain \(domid)", message: message()), echo: noteEchoLevel)
    }

    func append(_ line: Line) { append(line, echo: echoLevel) }

    private func append(_ line: Line, echo echoLevel: Level?) {
        state.withLock { state in
            state.lines.append(line)
            if state.lines.count > capacity { state.lines.removeFirst(state.lines.count - capacity) }
            state.total += 1
        }
        if let echoLevel, line.level >= echoLevel {
            var text = "xen: \(line)\n"
            text.withUTF8 { bytes in _ = write(2, bytes.baseAddress, bytes.count) }
        }
    }

    /// Runs a library call and, if `failed` says it failed, throws a `XenError` naming `call`
    /// with the errno read at once and the lines the library logged meanwhile.
    func check<T>(_ call: String, _ body: () -> T, failed: (T) -> Bool) throws(XenError) -> T {
        let before = count
        Glibc.errno = 0
        let result = body()
        let code = Glibc.errno
        if failed(result) {
            throw XenError(call: call, errno: code == 0 ? EIO : code, log: lines(since: before).map(\.description))
        }
        return result
    }
}
