import Glibc
@testable import RemusXen
import RemusSystem
import Testing

// The QMP client against a scripted monitor on a real Unix socket: the handshake, replies,
// QEMU's errors, events in between, and each way a broken or hostile QEMU can misbehave.

/// What `body` threw as a QMPError (nil when it threw nothing, or something else).
func qmpError(_ body: () throws -> Void) -> QMPError? {
    do {
        try body()
        return nil
    } catch let error as QMPError {
        return error
    } catch {
        return nil
    }
}

/// Runs `script` on a fake monitor and `body` against its socket path. Whatever client `body`
/// makes is gone (its socket closed) when `body` returns, before the server is waited for, so a
/// script waiting for the hang-up ends then.
@discardableResult
func withFakeMonitor(
    connections: Int = 1, _ script: @escaping @Sendable (FakeQMPPeer) throws -> Void, _ body: (String) throws -> Void
) throws -> FakeQMPServer {
    let server = try FakeQMPServer(connections: connections, script)
    defer { server.finish() }
    try body(server.path)
    return server
}

@Suite("QMP client")
struct QMPClientTests {
    @Test("the handshake reads the greeting and sends qmp_capabilities before any command")
    func handshake() throws {
        let server = try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.answer(#"{"status": "running", "running": true}"#)
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            #expect(client.greeting["version"]?["qemu"]?["major"] == .integer(7))
            let status = try client.execute("query-status", until: .after(seconds: 10))
            #expect(status["status"] == .string("running"))
            #expect(status["running"] == .bool(true))
        }
        #expect(server.requests == [
            #"{"execute":"qmp_capabilities","id":1}"#,
            #"{"execute":"query-status","id":2}"#,
        ])
        #expect(server.scriptError == nil)
    }

    @Test("arguments are sent as JSON with strings escaped, and nested replies come back whole")
    func argumentsAndNestedReplies() throws {
        let server = try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.answer(#"{"a": [1, 2.5, null, {"b": "x\"y\\z\n"}], "big": 18446744073709551615, "neg": -3}"#)
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let value = try client.execute("xen-save-devices-state", arguments: [
                "filename": .string("/var/lib/xen/a \"b\"\n\u{1}"), "live": .bool(false),
            ], until: .after(seconds: 10))
            #expect(value["a"] == .array([.integer(1), .double(2.5), .null, .object(["b": .string("x\"y\\z\n")])]))
            #expect(value["neg"] == .integer(-3))
            #expect(value["big"] == .double(18446744073709551616))
        }
        #expect(server.requests.last == #"{"arguments":{"filename":"/var/lib/xen/a \"b\"\n\u0001","live":false},"execute":"xen-save-devices-state","id":2}"#)
    }

    @Test("QEMU's error comes back typed with its class and description, and the client stays usable")
    func qemuErrorIsTyped() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            let request = try peer.receive()
            try peer.send(#"{"id": \#(peer.id(of: request)), "error": {"class": "CommandNotFound", "desc": "The command xen-set-global-dirty-log has not been found"}}"# + "\r\n")
            try peer.answer()
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let error = qmpError { _ = try client.execute("xen-set-global-dirty-log", arguments: ["enable": .bool(true)], until: .after(seconds: 10)) }
            #expect(error?.kind == .qemu(class: "CommandNotFound", desc: "The command xen-set-global-dirty-log has not been found"))
            #expect(error?.command == "xen-set-global-dirty-log")
            #expect(error?.description.contains("CommandNotFound") == true)
            #expect(try client.execute("cont", until: .after(seconds: 10)) == .object([:]))
        }
    }

    @Test("events and stale replies between a command and its answer are skipped")
    func eventsAreSkipped() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            let request = try peer.receive()
            try peer.send(#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"# + "\r\n")
            try peer.send(#"{"return": {"stale": true}, "id": 999}"# + "\r\n\r\n")
            // Two messages in one write, the answer split over two.
            try peer.send(#"{"event": "RESUME", "data": {}}"# + "\r\n" + #"{"return": {"fin"#)
            try peer.send(#"e": 1}, "id": \#(peer.id(of: request))}"# + "\r\n")
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            #expect(try client.execute("stop", until: .after(seconds: 10)) == .object(["fine": .integer(1)]))
            #expect(client.skippedEvents == ["STOP", "RESUME"])
        }
    }

    @Test("a flood of events without the answer is refused at the bound")
    func eventFloodIsBounded() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.receive()
            let event = #"{"event": "RTC_CHANGE", "data": {"offset": 0}}"# + "\r\n"
            try peer.send(String(repeating: event, count: QMPClient.maxUnrelatedMessages + 10))
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let error = qmpError { _ = try client.execute("stop", until: .after(seconds: 10)) }
            #expect(error?.kind == .tooManyUnrelatedMessages(count: QMPClient.maxUnrelatedMessages))
        }
    }

    @Test("a monitor that never answers times out at the deadline, not before, not much after")
    func silentPeerTimesOut() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.receive()
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let budgetMs: UInt64 = 300
            let started = monotonicNanoseconds()
            let error = qmpError { _ = try client.execute("stop", until: .after(milliseconds: Int(budgetMs))) }
            let elapsedMs = (monotonicNanoseconds() - started) / 1_000_000
            #expect(error?.kind == .timedOut(afterMs: budgetMs))
            #expect(error?.command == "stop")
            #expect(elapsedMs >= budgetMs)
            #expect(elapsedMs < budgetMs + 3000)
            // The answer may still come later: the connection is not trusted again.
            let again = qmpError { _ = try client.execute("cont", until: .after(seconds: 10)) }
            #expect(again == error)
        }
    }

    @Test("a greeting that never comes times out during the handshake")
    func missingGreetingTimesOut() throws {
        try withFakeMonitor({ peer in peer.waitForHangUp() }) { path in
            let started = monotonicNanoseconds()
            let error = qmpError { _ = try QMPClient(path: path, deadline: .after(milliseconds: 300)) }
            let elapsedMs = (monotonicNanoseconds() - started) / 1_000_000
            #expect(error?.kind == .timedOut(afterMs: 300))
            #expect(error?.command == "greeting")
            #expect(elapsedMs >= 300 && elapsedMs < 3300)
        }
    }

    @Test("a monitor that closes in the middle of a reply is reported as closed, with what had arrived")
    func peerClosesMidReply() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.receive()
            try peer.send(#"{"return": {"sta"#)
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let error = qmpError { _ = try client.execute("query-status", until: .after(seconds: 10)) }
            #expect(error?.kind == .peerClosed(receivedBytes: 16))
        }
    }

    @Test("garbage instead of JSON is malformed, with an excerpt of it")
    func garbageIsMalformed() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.receive()
            try peer.send("Ceci n'est pas du JSON\r\n")
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let error = qmpError { _ = try client.execute("stop", until: .after(seconds: 10)) }
            guard case .malformed(let detail)? = error?.kind else {
                Issue.record("want malformed, got \(String(describing: error))")
                return
            }
            #expect(detail.contains("Ceci n'est pas"))
        }
    }

    @Test("a first message that is not a greeting, or a message that is neither reply nor event, is malformed")
    func wrongShapesAreMalformed() throws {
        try withFakeMonitor({ peer in
            try peer.send(#"{"return": {}}"# + "\r\n")
            peer.waitForHangUp()
        }) { path in
            let error = qmpError { _ = try QMPClient(path: path, deadline: .after(seconds: 10)) }
            #expect(error?.command == "greeting")
            if case .malformed? = error?.kind {} else { Issue.record("want malformed, got \(String(describing: error))") }
        }
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.receive()
            try peer.send("[1, 2]\r\n")
            peer.waitForHangUp()
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let error = qmpError { _ = try client.execute("stop", until: .after(seconds: 10)) }
            if case .malformed? = error?.kind {} else { Issue.record("want malformed, got \(String(describing: error))") }
        }
    }

    @Test("a 10 MiB reply without a newline is refused at 1 MiB and never held whole")
    func hugeReplyIsRefusedAtTheBound() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.receive()
            let chunk = String(repeating: "a", count: 1 << 16)
            // The client stops reading at the bound and hangs up; the writes then fail.
            for _ in 0..<160 { guard (try? peer.send(chunk)) != nil else { return } }
        }) { path in
            let client = try QMPClient(path: path, deadline: .after(seconds: 10))
            let error = qmpError { _ = try client.execute("query-status", until: .after(seconds: 10)) }
            #expect(error?.kind == .replyTooLarge(limit: QMPClient.maxMessageBytes))
            #expect(client.bufferedHighWater > QMPClient.maxMessageBytes)
            #expect(client.bufferedHighWater <= QMPClient.maxMessageBytes + 1)
        }
    }

    @Test("no socket at the path: cannot connect, with the errno and the path")
    func cannotConnect() {
        let error = qmpError { _ = try QMPClient(path: "/tmp/remusxen-no-such-dir/qmp.sock", deadline: .after(seconds: 2)) }
        #expect(error?.kind == .cannotConnect(.noSuchFileOrDirectory))
        #expect(error?.command == "connect")
        #expect(error?.description.contains("/tmp/remusxen-no-such-dir/qmp.sock") == true)
    }
}
