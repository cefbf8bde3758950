import RemusSystem

/// What went wrong talking to a QEMU monitor (QMP), and on which socket and command.
public struct QMPError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kinds of failure, each with what it needs to be acted on.
    public enum Kind: Sendable, Equatable {
        /// connect(2) failed: no socket there (ENOENT: QEMU is not running), refused, no permission.
        case cannotConnect(Errno)
        /// Nothing (or not enough) came within the time the command was given.
        case timedOut(afterMs: UInt64)
        /// QEMU closed the connection; `receivedBytes` of an unfinished message had arrived.
        case peerClosed(receivedBytes: Int)
        /// A message that is not a JSON object, or not a shape QMP sends.
        case malformed(String)
        /// A message longer than `limit` bytes without its end: refused before holding more.
        case replyTooLarge(limit: Int)
        /// QEMU answered `{"error": {"class": …, "desc": …}}`.
        case qemu(class: String, desc: String)
        /// More than `count` events or stale replies arrived before the command's answer.
        case tooManyUnrelatedMessages(count: Int)
        /// Another socket failure.
        case io(SystemError)
    }

    /// The monitor's socket path.
    public var socket: String
    /// The command that failed ("connect" and "greeting" for the handshake's steps).
    public var command: String
    public var kind: Kind

    public init(socket: String, command: String, kind: Kind) {
        self.socket = socket
        self.command = command
        self.kind = kind
    }

    /// QEMU's own refusal, or a fault of the connection (after which the client is unusable).
    public var isQEMURefusal: Bool {
        if case .qemu = kind { true } else { false }
    }

    public var description: String {
        let monitor = "QEMU monitor \(socket)"
        switch kind {
        case .cannotConnect(let errno):
            return "cannot connect to \(monitor): \(errno) (\(errno.symbol)); is the guest's device model running, and is this run as root?"
        case .timedOut(let ms):
            return "\(monitor) did not answer '\(command)' within \(ms) ms"
        case .peerClosed(let received):
            let partial = received > 0 ? " in the middle of a message (\(received) bytes of it had arrived)" : ""
            return "\(monitor) closed the connection during '\(command)'\(partial); the device model may have exited"
        case .malformed(let detail):
            return "\(monitor) sent a message remusd cannot read during '\(command)': \(detail)"
        case .replyTooLarge(let limit):
            return "\(monitor) sent a message over \(limit) bytes during '\(command)'; refused and the connection closed"
        case .qemu(let errorClass, let desc):
            return "QEMU refused '\(command)' (\(monitor)): \(errorClass): \(desc)"
        case .tooManyUnrelatedMessages(let count):
            return "\(monitor) sent \(count) events or stale replies without answering '\(command)'"
        case .io(let error):
            return "\(monitor) failed during '\(command)': \(error)"
        }
    }
}

/// A client of one QEMU monitor (QMP) over its Unix socket: connects, reads the greeting,
/// negotiates capabilities, then runs commands one at a time. Every read and write has a
/// deadline; a message may be at most `maxMessageBytes` long. Not thread-safe: one owner.
///
/// Protocol (QEMU's docs/interop/qmp-spec): the server greets with `{"QMP": {...}}`, accepts
/// nothing but `qmp_capabilities` until that is sent, then answers each `{"execute": …,
/// "arguments": …, "id": …}` with `{"return": …, "id": …}` or `{"error": {"class", "desc"},
/// "id": …}`. Events (`{"event": …}`) may come at any time in between; they are skipped. Each
/// message is one line of JSON.
///
/// After any failure other than QEMU's own refusal the connection is in an unknown state (a
/// reply may still be on its way), so that failure is sticky: every later call repeats it.
public final class QMPClient {
    /// The longest message accepted, in bytes (1 MiB): a broken or hostile QEMU cannot make us
    /// hold more than this plus one read.
    public static let maxMessageBytes = 1 << 20
    /// Events and stale replies skipped while waiting for one command's answer.
    public static let maxUnrelatedMessages = 256

    /// The socket path.
    public let path: String
    /// The greeting's `QMP` member (QEMU's version and capabilities).
    public private(set) var greeting: QMPValue = .null
    /// The most bytes ever buffered at once: stays at most `maxMessageBytes` plus one.
    public private(set) var bufferedHighWater = 0
    /// Events skipped so far (their names; the last 16).
    public private(set) var skippedEvents: [String] = []

    private let connection: UnixConnection
    /// Bytes received past the last complete line.
    private var pending: [UInt8] = []
    /// How much of `pending` holds no newline: each byte is searched once.
    private var scanned = 0
    private var nextID: Int64 = 1
    private var failure: QMPError?

    /// Connects to the monitor at `path`, reads the greeting and sends `qmp_capabilities`, all
    /// before `deadline`.
    public init(path: String, deadline: Deadline) throws(QMPError) {
        self.path = path
        do {
            connection = try UnixConnection.connect(path: path, deadline: deadline)
        } catch {
            let kind: QMPError.Kind = error.isTimeout ? .timedOut(afterMs: deadline.budgetMs) : .cannotConnect(error.errno)
            throw QMPError(socket: path, command: "connect", kind: kind)
        }
        let hello = try fail(command: "greeting") { () throws(QMPError) in try readMessage(command: "greeting", until: deadline) }
        guard case .object(let members)? = hello["QMP"] else {
            throw fail(QMPError(socket: path, command: "greeting", kind: .malformed("the first message is not a greeting {\"QMP\": {...}}: \(Self.excerpt(hello.json))")))
        }
        greeting = .object(members)
        _ = try execute("qmp_capabilities", until: deadline)
    }

    /// Runs `command` with `arguments` and returns its `return` value (often `{}`), or throws
    /// QEMU's error with its class and description.
    public func execute(_ command: String, arguments: [String: QMPValue]? = nil, until deadline: Deadline) throws(QMPError) -> QMPValue {
        if let failure { throw failure }
        let id = nextID
        nextID += 1
        var request: [String: QMPValue] = ["execute": .string(command), "id": .integer(id)]
        if let arguments { request["arguments"] = .object(arguments) }
        let line = Array(QMPValue.object(request).json.utf8) + [10]
        try fail(command: command) { () throws(QMPError) in
            do throws(SystemError) {
                try connection.write(line, until: deadline)
            } catch {
                throw classify(error, command: command, deadline: deadline)
            }
        }
        var unrelated = 0
        while true {
            let message = try fail(command: command) { () throws(QMPError) in try readMessage(command: command, until: deadline) }
            if let event = message["event"] {
                remember(event: event.stringValue ?? event.json)
                unrelated += 1
            } else if message["return"] != nil || message["error"] != nil {
                // QEMU leaves `id` out only when it could not read the request at all; such an
                // answer is for the command just sent. Another id is a reply to an earlier,
                // abandoned command.
                if let replyID = message["id"], replyID != .integer(id) {
                    unrelated += 1
                } else if let error = message["error"] {
                    throw QMPError(socket: path, command: command, kind: .qemu(
                        class: error["class"]?.stringValue ?? "(no class)", desc: error["desc"]?.stringValue ?? error.json))
                } else {
                    return message["return"]!
                }
            } else {
                throw fail(QMPError(socket: path, command: command, kind: .malformed("neither a reply nor an event: \(Self.excerpt(message.json))")))
            }
            if unrelated > Self.maxUnrelatedMessages {
                throw fail(QMPError(socket: path, command: command, kind: .tooManyUnrelatedMessages(count: Self.maxUnrelatedMessages)))
            }
        }
    }

    private func remember(event name: String) {
        skippedEvents.append(name)
        if skippedEvents.count > 16 { skippedEvents.removeFirst(skippedEvents.count - 16) }
    }

    /// Reads the next non-empty line and parses it as a JSON object.
    private func readMessage(command: String, until deadline: Deadline) throws(QMPError) -> QMPValue {
        while true {
            if let newline = pending[scanned...].firstIndex(of: 10) {
                let line = Array(pending[..<newline])
                pending.removeFirst(newline + 1)
                scanned = 0
                if line.allSatisfy({ $0 == 32 || $0 == 9 || $0 == 13 }) { continue }
                guard let value = QMPValue.parse(line) else {
                    throw QMPError(socket: path, command: command, kind: .malformed("not JSON: \(Self.excerpt(String(decoding: line, as: UTF8.self)))"))
                }
                guard case .object = value else {
                    throw QMPError(socket: path, command: command, kind: .malformed("not a JSON object: \(Self.excerpt(value.json))"))
                }
                return value
            }
            scanned = pending.count
            guard pending.count <= Self.maxMessageBytes else {
                throw QMPError(socket: path, command: command, kind: .replyTooLarge(limit: Self.maxMessageBytes))
            }
            let chunk: [UInt8]
            do {
                chunk = try connection.read(upTo: Self.maxMessageBytes + 1 - pending.count, until: deadline)
            } catch {
                throw classify(error, command: command, deadline: deadline)
            }
            if chunk.isEmpty {
                throw QMPError(socket: path, command: command, kind: .peerClosed(receivedBytes: pending.count))
            }
            pending += chunk
            bufferedHighWater = max(bufferedHighWater, pending.count)
        }
    }

    private func classify(_ error: SystemError, command: String, deadline: Deadline) -> QMPError {
        let kind: QMPError.Kind = switch error.errno {
        case .timedOut: .timedOut(afterMs: deadline.budgetMs)
        case .connectionReset, .brokenPipe: .peerClosed(receivedBytes: pending.count)
        default: .io(error)
        }
        return QMPError(socket: path, command: command, kind: kind)
    }

    /// Runs `body`; a failure other than QEMU's refusal becomes sticky.
    private func fail<T>(command: String, _ body: () throws(QMPError) -> T) throws(QMPError) -> T {
        do {
            return try body()
        } catch {
            throw fail(error)
        }
    }

    private func fail(_ error: QMPError) -> QMPError {
        if !error.isQEMURefusal && failure == nil { failure = error }
        return error
    }

    /// At most 120 characters of `text`, for messages.
    static func excerpt(_ text: String) -> String {
        text.count <= 120 ? text : String(text.prefix(120)) + "…"
    }
}
