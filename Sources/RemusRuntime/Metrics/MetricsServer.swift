import Glibc

/// `--metrics-listen host:port`: a small HTTP/1.1 server on our own sockets that answers
/// `GET /metrics` with the daemon's metrics as Prometheus text, and everything else with 404.
///
/// It never blocks the daemon: an accept thread and one thread per client, at most `maxClients`
/// at once (more are told 503 and closed at once; a client's slot is free again before it sees
/// the end of its reply); a
/// request must arrive whole within `readDeadlineMs` and `maxRequestBytes` (else 408 or 431);
/// one request per connection (`Connection: close`).
/// Rendering takes the statistics lock only for a copy-sized moment.
///
/// `@unchecked Sendable`: the listener and the client slots are immutable references.
public final class MetricsServer: @unchecked Sendable {
    /// Clients served at once.
    public static let maxClients = 4
    /// How long a client may take to send its request, milliseconds; also bounds the reply's write.
    public static let readDeadlineMs = 2000
    /// The largest request (request line and headers) read, bytes.
    public static let maxRequestBytes = 8 << 10
    /// The Content-Type of Prometheus' text format.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    private let listener: TCPListener
    /// Where it listens (the bound port when asked for port 0).
    public let endpoint: Endpoint
    /// Up to `maxClients` served, and as many closing gently after their reply.
    private let slots = ClientSlots(capacity: MetricsServer.maxClients, lingerCapacity: MetricsServer.maxClients)

    /// - Parameter render: the metrics text, called on a client's thread for each `GET /metrics`.
    public init(listen: Endpoint, render: @escaping @Sendable () -> [UInt8]) throws {
        do { listener = try TCPListener(endpoint: listen) } catch {
            throw ProtocolError("cannot serve metrics on \(listen): \(error); nothing was started — "
                + "choose a free port with --metrics-listen, or leave it out to serve no metrics")
        }
        endpoint = listener.endpoint
        startThread(name: "metrics") { [self] in acceptClients(render: render) }
    }

    /// Stops accepting; requests in progress finish on their own threads.
    public func stop() { listener.shutdown() }

    private func acceptClients(render: @escaping @Sendable () -> [UInt8]) {
        while true {
            let client: TCPChannel
            do { client = try listener.accept() } catch {
                guard TCPListener.isTransient(error) else { return }  // shut down
                sleepNanoseconds(100_000_000)
                continue
            }
            let admitted = slots.serve(threadName: "metrics-client") {
                [self] replied in serve(client, render: render, replied: replied)
            }
            if !admitted {
                client.setSendTimeout(nanoseconds: 200_000_000)
                try? client.write(Self.response(status: "503 Service Unavailable", body: Array("busy: \(Self.maxClients) metrics clients are being served; try again\n".utf8)))
                client.shutdown()
            }
        }
    }

    /// - Parameter replied: frees the client's slot before it can see the end of the reply
    ///   (`ClientSlots.serve`); true if this thread may then drain the client's last bytes.
    private func serve(_ client: TCPChannel, render: () -> [UInt8], replied: () -> Bool) {
        defer { client.shutdown() }
        let deadline = Deadline.after(milliseconds: Self.readDeadlineMs)
        let reply: [UInt8]
        switch Self.readRequest(client, deadline: deadline) {
        case .request(let method, let target):
            let path = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? target
            if method == "GET" && path == "/metrics" {
                reply = Self.response(status: "200 OK", contentType: Self.contentType, body: render())
            } else {
                reply = Self.response(status: "404 Not Found", body: Array("remusd serves its metrics at GET /metrics\n".utf8))
            }
        case .malformed:
            reply = Self.response(status: "400 Bad Request", body: Array("not an HTTP/1.x request\n".utf8))
        case .tooLarge:
            reply = Self.response(status: "431 Request Header Fields Too Large", body: Array("requests are limited to \(Self.maxRequestBytes) bytes\n".utf8))
        case .timedOut:
            reply = Self.response(status: "408 Request Timeout", body: Array("no whole request within \(Self.readDeadlineMs) ms\n".utf8))
        case .closed:
            return
        }
        client.setSendTimeout(nanoseconds: UInt64(Self.readDeadlineMs) * 1_000_000)
        do { try client.write(reply) } catch { return }
        // The slot is free before the client sees the end of its reply: a scraper that comes
        // straight back is served, however late this thread is scheduled.
        let mayLinger = replied()
        // Close gently: a client still sending (an oversized request) would otherwise get a
        // reset that can destroy the reply before it reads it. Bounded in bytes and time, and
        // in threads (with every linger slot taken, the close is abrupt).
        client.shutdownWrite()
        if mayLinger { Self.drain(client, limit: 4 << 20, until: .after(milliseconds: 500)) }
    }

    enum RequestOutcome: Equatable {
        case request(method: String, target: String)
        case malformed, tooLarge, timedOut, closed
    }

    /// Reads up to the end of the headers (a blank line), at most `maxRequestBytes`, before `deadline`.
    static func readRequest(_ channel: TCPChannel, deadline: Deadline) -> RequestOutcome {
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 2048)
        while true {
            if let end = headerEnd(received) { return parseRequestLine(received[..<end]) }
            guard received.count < maxRequestBytes else { return .tooLarge }
            do {
                guard try channel.waitReadable(until: deadline) else { return .timedOut }
                let room = min(chunk.count, maxRequestBytes - received.count)
                let n = try chunk.withUnsafeMutableBytes { try channel.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[..<room])) }
                guard n > 0 else { return received.isEmpty ? .closed : .malformed }
                received += chunk[..<n]
            } catch {
                return .closed
            }
        }
    }

    /// Where the request line and headers end ("\r\n\r\n", or "\n\n" from a lax client).
    static func headerEnd(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 2 else { return nil }
        for i in 1..<bytes.count where bytes[i] == 0x0A {
            if bytes[i - 1] == 0x0A { return i }
            if i >= 3 && bytes[i - 1] == 0x0D && bytes[i - 2] == 0x0A && bytes[i - 3] == 0x0D { return i }
        }
        return nil
    }

    static func parseRequestLine(_ bytes: ArraySlice<UInt8>) -> RequestOutcome {
        let lineEnd = bytes.firstIndex(of: 0x0A) ?? bytes.endIndex
        var line = bytes[bytes.startIndex..<lineEnd]
        if line.last == 0x0D { line = line.dropLast() }
        let parts = line.split(separator: 0x20, omittingEmptySubsequences: false)
        guard parts.count == 3, let version = String(validating: parts[2], as: UTF8.self), version.hasPrefix("HTTP/1."),
              let method = String(validating: parts[0], as: UTF8.self), !method.isEmpty,
              let target = String(validating: parts[1], as: UTF8.self), target.hasPrefix("/") else { return .malformed }
        return .request(method: method, target: target)
    }

    static func response(status: String, contentType: String = "text/plain; charset=utf-8", body: [UInt8]) -> [UInt8] {
        let head = "HTTP/1.1 \(status)\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
        return Array(head.utf8) + body
    }

    private static func drain(_ client: TCPChannel, limit: Int, until deadline: Deadline) {
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        var total = 0
        while total < limit, (try? client.waitReadable(until: deadline)) == true {
            guard let n = try? chunk.withUnsafeMutableBytes({ try client.read(into: $0) }), n > 0 else { return }
            total += n
        }
    }
}

/// A value set once it exists, read from other threads meanwhile (the metrics server starts
/// before the protection whose numbers it serves).
final class LateBound<Value: AnyObject & Sendable>: @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var stored: Value?
    var value: Value? {
        get { monitor.withLock { stored } }
        set { monitor.withLock { stored = newValue } }
    }
}
