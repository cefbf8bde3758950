import Glibc
@testable import RemusXen
import RemusSystem
import Synchronization

/// A QEMU monitor stand-in: a Unix socket in a temporary directory and a thread that accepts
/// `connections` clients one after the other and plays `script` with each. Every read and write
/// it makes has a deadline, so a test that goes wrong ends instead of hanging.
final class FakeQMPServer: Sendable {
    let directory: String
    let path: String
    /// The request lines received, in order, across connections.
    var requests: [String] { received.lines.withLock { $0 } }
    /// What the script threw, if anything (a test asserts it is nil when the script must finish).
    var scriptError: String? { received.failure.withLock { $0 } }

    private let listener: UnixListener
    private let received = RequestLog()
    private let thread: JoinableThread

    init(connections: Int = 1, _ script: @escaping @Sendable (FakeQMPPeer) throws -> Void) throws {
        var template = Array("/tmp/remusxen-qmp-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in mkdtemp(buffer.baseAddress!).map { String(cString: $0) } }
        guard let made else { throw SystemError.last("mkdtemp") }
        directory = made
        path = made + "/qmp.sock"
        let listener = try UnixListener(path: path)
        self.listener = listener
        let received = received
        thread = try JoinableThread(name: "fake-qmp") {
            for _ in 0..<connections {
                do {
                    let connection = try listener.accept()
                    try script(FakeQMPPeer(connection: connection, received: received))
                } catch {
                    received.failure.withLock { $0 = $0 ?? "\(error)" }
                    return
                }
            }
        }
    }

    /// Waits for the script to end (it ends at its own deadlines) and removes the directory.
    func finish() {
        listener.shutdown()
        thread.join()
        unlink(path)
        rmdir(directory)
    }
}

/// What a fake monitor saw: the request lines across its connections, and its script's failure.
final class RequestLog: Sendable {
    let lines = Mutex<[String]>([])
    let failure = Mutex<String?>(nil)
}

/// One accepted client, as the script sees it.
struct FakeQMPPeer: Sendable {
    let connection: UnixConnection
    let received: RequestLog

    func send(_ text: String) throws {
        try connection.write(Array(text.utf8), until: .after(seconds: 20))
    }

    /// The next request line (without its newline), recorded; nil at end of input.
    @discardableResult
    func receive() throws -> String? {
        let line = try connection.readLine(limit: 65536, until: .after(seconds: 20))
        guard !line.isEmpty else { return nil }
        let text = String(decoding: line.prefix(while: { $0 != 10 }), as: UTF8.self)
        received.lines.withLock { $0.append(text) }
        return text
    }

    /// The `id` of a request, as JSON text to echo.
    func id(of request: String?) -> String {
        guard let request, let id = QMPValue.parse(Array(request.utf8))?["id"] else { return "null" }
        return id.json
    }

    /// Receives one request and answers `{"return": <value>, "id": …}` as QEMU does (CRLF).
    @discardableResult
    func answer(_ value: String = "{}") throws -> String? {
        let request = try receive()
        try send("{\"return\": \(value), \"id\": \(id(of: request))}\r\n")
        return request
    }

    /// QEMU's greeting and the answer to `qmp_capabilities`.
    func handshake() throws {
        try send(#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob"]}}"# + "\r\n")
        try answer()
    }

    /// Waits until the client hangs up (or the deadline passes): a peer that never answers.
    func waitForHangUp() {
        while let chunk = try? connection.readLine(limit: 65536, until: .after(seconds: 20)), !chunk.isEmpty {}
    }
}
