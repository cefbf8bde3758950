import Foundation
import RemusTLS
@testable import RemusRuntime
import Testing
import RemusTestSupport

// MARK: - Helpers

/// The `etcd` binary, if installed (Debian: etcd-server).
let etcdPath: String? = {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
    let dirs = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin"]
    return dirs.map { $0 + "/etcd" }.first { FileManager.default.isExecutableFile(atPath: $0) }
}()

let etcdMissing = "etcd not found: install etcd-server (apt-get install etcd-server) or run scripts/test.sh"

private func monotonicNs() -> UInt64 { SystemClock().monotonicNs() }


/// Two distinct ports that were free a moment ago (bound to port 0, then closed).
private func freePorts() throws -> (UInt16, UInt16) {
    let a = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
    let b = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
    return (a.port, b.port)
}

struct EtcdStartError: Error, CustomStringConvertible {
    var description: String
}

/// A single-member etcd on loopback with its own data directory, killed by `stop()`; with `tls`,
/// it serves HTTPS with that certificate and requires client certificates of the same CA.
final class EtcdServer {
    let clientPort: UInt16
    let directory: String
    private let process = Process()
    private let transport: WitnessTransport

    init(binary: String, tls: TLSFiles? = nil) throws {
        let (clientPort, peerPort) = try freePorts()
        self.clientPort = clientPort
        directory = NSTemporaryDirectory() + "remusd-etcd-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let client = "\(tls == nil ? "http" : "https")://127.0.0.1:\(clientPort)"
        let peer = "http://127.0.0.1:\(peerPort)"
        transport = try tls.map { .tls(try TLSContext(.client, files: $0), expectedName: "127.0.0.1") } ?? .plaintext
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = [
            "--name", "witness-test",
            "--data-dir", directory + "/data",
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", "witness-test=\(peer)",
            "--initial-cluster-state", "new",
        ] + (tls.map { ["--cert-file", $0.certificate, "--key-file", $0.key, "--trusted-ca-file", $0.ca, "--client-cert-auth"] } ?? [])
        let logPath = directory + "/etcd.log"
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath)
        process.standardOutput = log
        process.standardError = log
        try process.run()
        do {
            try waitUntilHealthy(seconds: 20)
        } catch {
            stop()
            throw error
        }
    }

    /// Polls GET /health until etcd answers {"health":"true"}, or gives up at the deadline.
    private func waitUntilHealthy(seconds: Double) throws {
        let endpoint = Endpoint(host: "127.0.0.1", port: clientPort)
        let healthy = eventually(deadline: .after(seconds: Double(seconds))) {
            guard process.isRunning else { return true }  // reported below
            guard let response = try? httpExchange(endpoint: endpoint, transport: transport, method: "GET", path: "/health", body: [], timeoutMs: 500)
            else { return false }
            return response.status == 200 && String(decoding: response.body, as: UTF8.self).contains("\"health\":\"true\"")
        }
        if !healthy || !process.isRunning {
            let log = (try? String(contentsOfFile: directory + "/etcd.log", encoding: .utf8)) ?? ""
            throw EtcdStartError(description: "etcd on 127.0.0.1:\(clientPort) not healthy within \(seconds) s; log tail:\n\(log.suffix(2000))")
        }
    }

    func url(key: String) -> String { "etcd://127.0.0.1:\(clientPort)/\(key)" }

    /// Freezes etcd (SIGSTOP): it keeps its sockets but answers nothing. Returns once the kernel
    /// reports the process stopped (state 'T'), since the signal is delivered asynchronously.
    func freeze() -> Bool {
        kill(process.processIdentifier, SIGSTOP)
        return eventually(deadline: .after(seconds: Double(5)), pollEveryMs: 5) {
            let stat = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8)) ?? ""
            // "pid (comm) S ...": the state follows the command's closing parenthesis.
            guard let close = stat.lastIndex(of: ")") else { return false }
            return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("T")
        }
    }
    func thaw() { kill(process.processIdentifier, SIGCONT) }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// A stand-in for etcd's gateway: answers each request with the bytes `respond(path)` returns,
/// then closes the connection.
private final class FakeGateway: @unchecked Sendable {  // the listener is thread-safe; the rest is immutable
    let listener: TCPListener
    let respond: @Sendable (String) -> [UInt8]

    init(respond: @escaping @Sendable (String) -> [UInt8]) throws {
        listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        self.respond = respond
        startThread(name: "fake-gateway") { [self] in
            while let channel = try? listener.accept() {
                serve(channel)
            }
        }
    }

    var endpoint: String { "127.0.0.1:\(listener.port)" }

    private func serve(_ channel: TCPChannel) {
        defer { channel.shutdown() }
        var request: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        // Read the head and, by Content-Length, the body.
        while true {
            guard let n = try? buffer.withUnsafeMutableBytes({ try channel.read(into: $0) }), n > 0 else { return }
            request += buffer[0..<n]
            let text = String(decoding: request, as: UTF8.self)
            guard let headEnd = text.range(of: "\r\n\r\n") else { continue }
            let head = text[..<headEnd.lowerBound]
            let length = head.split(separator: "\r\n").compactMap { line -> Int? in
                let parts = line.split(separator: ":", maxSplits: 1)
                guard parts.count == 2, parts[0].lowercased() == "content-length" else { return nil }
                return Int(parts[1].trimmingCharacters(in: .whitespaces))
            }.first ?? 0
            if text.utf8.distance(from: headEnd.upperBound, to: text.endIndex) >= length { break }
        }
        let firstLine = String(decoding: request, as: UTF8.self).split(separator: "\r\n").first ?? ""
        let path = firstLine.split(separator: " ").dropFirst().first.map(String.init) ?? ""
        try? channel.write(respond(path))
    }

    func stop() { listener.shutdown() }
}

private func raw(_ text: String) -> [UInt8] { Array(text.utf8) }

private func jsonResponse(_ status: String, _ body: String) -> [UInt8] {
    raw("HTTP/1.1 \(status)\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
}

private func isLost(_ error: WitnessError) -> Bool {
    if case .lost = error { return true }
    return false
}

// MARK: - Against a real etcd

extension WitnessTests {
    @Suite("etcd on loopback", .serialized, .enabled(if: etcdPath != nil, Comment(rawValue: etcdMissing)))
    struct Etcd {
        private func withEtcd(_ body: (EtcdServer) throws -> Void) throws {
            guard let etcdPath else { return }
            let etcd = try EtcdServer(binary: etcdPath)
            defer { etcd.stop() }
            try body(etcd)
        }

        @Test func aSecondOwnerCannotAcquireWhileTheHolderRenews() throws {
            try withEtcd { etcd in
                let a = try EtcdWitness(url: etcd.url(key: "remus/guest1"))
                let b = try EtcdWitness(url: etcd.url(key: "remus/guest1"))
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 2))
                let first = try #require(a.lease)
                #expect(first.ttlSeconds == 2)
                #expect(try b.acquire(owner: "backup:hostB:2", ttlSeconds: 2) == false)
                #expect(try b.holder() == "primary:hostA:1")

                // A renews every 500 ms for twice the TTL; B never gets the key.
                let end = monotonicNs() + 4_000_000_000
                while monotonicNs() < end {
                    let renewed = try a.renew()
                    #expect(renewed.id == first.id)
                    #expect(try b.acquire(owner: "backup:hostB:2", ttlSeconds: 2) == false)
                    usleep(500_000)
                }
                // Acquiring again for the same owner keeps (and renews) the same lease.
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 2))
                #expect(a.lease?.id == first.id)
                #expect(try a.holder() == "primary:hostA:1")
            }
        }

        @Test func theKeyPassesToTheBackupOnlyAfterTheHolderStopsRenewingForItsTTL() throws {
            try withEtcd { etcd in
                let a = try EtcdWitness(url: etcd.url(key: "remus/guest2"))
                let b = try EtcdWitness(url: etcd.url(key: "remus/guest2"))
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 2))
                let last = try a.renew()  // A's last renewal; it stops renewing now

                var acquiredAt: UInt64 = 0
                let acquired = try eventually(deadline: .after(seconds: Double(15)), pollEveryMs: 100) {
                    let won = try b.acquire(owner: "backup:hostB:2", ttlSeconds: 2)
                    acquiredAt = WitnessLease.clockNs()
                    return won
                }
                #expect(acquired, "B never acquired the key after A stopped renewing")
                // etcd freed the key no earlier than A's own deadline with no margin: A, counting from
                // the moment it sent its last renewal, had stopped acting before B could start.
                #expect(acquiredAt >= last.deadlineNs(marginNs: 0))
                #expect(try b.holder() == "backup:hostB:2")

                #expect(throws: WitnessError.self) { try a.renew() }
                do throws(WitnessError) {
                    try a.renew()
                } catch {
                    #expect(isLost(error), "expected .lost, got \(error)")
                    #expect(error.description.contains("remus/guest2"))
                    #expect(error.description.contains("fenced"))
                }
                #expect(a.lease == nil)
                #expect(try b.renew().ttlSeconds == 2)
            }
        }

        @Test func releaseFreesTheKeyAtOnce() throws {
            try withEtcd { etcd in
                let a = try EtcdWitness(url: etcd.url(key: "remus/guest3"))
                let b = try EtcdWitness(url: etcd.url(key: "remus/guest3"))
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 60))
                try a.release()
                #expect(try a.holder() == nil)
                #expect(try b.acquire(owner: "backup:hostB:2", ttlSeconds: 60))
                #expect(throws: WitnessError.notHeld(key: "remus/guest3")) { try a.renew() }
                try a.release()  // releasing what one does not hold changes nothing
                #expect(try b.holder() == "backup:hostB:2")
            }
        }

        @Test func renewReportsLostWhenTheKeyIsDeletedBehindItsBack() throws {
            try withEtcd { etcd in
                let a = try EtcdWitness(url: etcd.url(key: "remus/guest4"))
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 60))
                try a.deleteKey()
                do throws(WitnessError) {
                    try a.renew()
                    Issue.record("renew succeeded although the key was deleted")
                } catch {
                    #expect(isLost(error), "expected .lost, got \(error)")
                }
                // Lost stays lost until the next acquire, which competes afresh.
                #expect(throws: WitnessError.self) { try a.renew() }
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 60))
                try a.renew()
            }
        }

        @Test func aFrozenEtcdFailsRenewalWithinTheRequestTimeoutAndKeepsTheLease() throws {
            try withEtcd { etcd in
                let a = try EtcdWitness(url: etcd.url(key: "remus/guest5"), requestTimeoutMs: 300)
                #expect(try a.acquire(owner: "primary:hostA:1", ttlSeconds: 30))
                let before = try a.renew()

                #expect(etcd.freeze(), "etcd did not stop on SIGSTOP")
                let start = monotonicNs()
                do throws(WitnessError) {
                    try a.renew()
                    Issue.record("renew succeeded against a frozen etcd")
                } catch {
                    #expect(error == .timedOut(endpoint: "127.0.0.1:\(etcd.clientPort)", operation: "renew lease", timeoutMs: 300))
                    #expect(error.description.contains("backup does not activate"))
                }
                let elapsedMs = (monotonicNs() - start) / 1_000_000
                etcd.thaw()
                #expect(elapsedMs < 1500, "renew blocked \(elapsedMs) ms with a 300 ms timeout")
                // The failure changed nothing: the last confirmed lease still bounds A's deadline.
                #expect(a.lease == before)
                let after = try a.renew()
                #expect(after.id == before.id && after.confirmedAtNs > before.confirmedAtNs)
            }
        }
    }
}

// MARK: - Without etcd

@Suite struct WitnessTests {
    @Test func parsesWitnessURLs() throws {
        let w = try EtcdWitness(url: "etcd://10.0.0.9:2379/remus/guest1")
        #expect(w.endpoint == Endpoint(host: "10.0.0.9", port: 2379))
        #expect(w.key == "remus/guest1")
        #expect(try EtcdWitness(url: "etcd://witness.example/k").endpoint.port == 2379)
        #expect(try EtcdWitness(url: "etcd://[::1]:12379/k").endpoint == Endpoint(host: "::1", port: 12379))
    }

    @Test(arguments: [
        ("http://10.0.0.9:2379/k", "unsupported scheme"),
        ("10.0.0.9:2379/k", "missing etcd:// scheme"),
        ("etcd://10.0.0.9:2379", "missing key"),
        ("etcd://10.0.0.9:2379/", "missing key"),
        ("etcd:///k", "missing host"),
        ("etcd://10.0.0.9:port/k", "not host:port"),
        ("etcd://10.0.0.9:70000/k", "not host:port"),
        ("etcd://10.0.0.9:0/k", "not host:port"),
        ("etcd://user@10.0.0.9:2379/k", "user information"),
        ("etcd://10.0.0.9:2379/k?x=1", "'?'"),
        ("etcd://10.0.0.9:2379/a%20b", "'%'"),
        ("etcd://10.0.0.9:2379/a\u{1}b", "control characters"),
    ])
    func rejectsMalformedURLsWithTheReason(url: String, reason: String) {
        do throws(WitnessError) {
            _ = try EtcdWitness(url: url)
            Issue.record("accepted \(url)")
        } catch {
            guard case .invalidURL(let badURL, let text) = error else {
                Issue.record("expected .invalidURL, got \(error)")
                return
            }
            #expect(badURL == url)
            #expect(text.contains(reason), "reason '\(text)' does not mention \(reason)")
            #expect(error.description.contains("expected etcd://host:port/key"))
        }
    }

    @Test func anUnreachableEndpointSaysWhereAndWhatStaysSafe() throws {
        let (port, _) = try freePorts()  // nothing listens there any more
        let w = try EtcdWitness(url: "etcd://127.0.0.1:\(port)/remus/guest1", requestTimeoutMs: 1000)
        do throws(WitnessError) {
            _ = try w.acquire(owner: "backup:hostB:2", ttlSeconds: 2)
            Issue.record("acquire succeeded without etcd")
        } catch {
            guard case .unreachable(let endpoint, let operation, let cause) = error else {
                Issue.record("expected .unreachable, got \(error)")
                return
            }
            #expect(endpoint == "127.0.0.1:\(port)")
            #expect(operation == "grant lease")
            #expect(cause.contains("Connection refused"))
            #expect(error.description.contains("backup does not activate"))
            #expect(error.description.contains("check that etcd runs"))
        }
        #expect(w.lease == nil)
        #expect(throws: WitnessError.notHeld(key: "remus/guest1")) { try w.renew() }
    }

    @Test func findsAnOlderGatewayPrefix() throws {
        let kvs = #"{"header":{"revision":"7"},"kvs":[{"key":"a","create_revision":"7","value":"cHJpbWFyeTphOjE=","lease":"5"}],"count":"1"}"#
        let gateway = try FakeGateway { path in
            if path == "/v3beta/kv/range" { return jsonResponse("200 OK", kvs) }
            return raw("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 19\r\n\r\n404 page not found\n")
        }
        defer { gateway.stop() }
        let w = try EtcdWitness(url: "etcd://\(gateway.endpoint)/remus/guest1")
        #expect(try w.holder() == "primary:a:1")
        #expect(try w.holder() == "primary:a:1")  // the prefix is remembered
    }

    @Test func noGatewayAtAllIsReportedAsSuch() throws {
        let gateway = try FakeGateway { _ in
            raw("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot here\n")
        }
        defer { gateway.stop() }
        let w = try EtcdWitness(url: "etcd://\(gateway.endpoint)/k")
        #expect(throws: WitnessError.gatewayNotFound(endpoint: gateway.endpoint)) { try w.holder() }
    }

    @Test(arguments: [
        ("SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x status line"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "invalid JSON"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{\"header\":{}}", "closed in the middle"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "not a JSON object"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"kvs\":{\"a\":\"b\"}}   ", "'kvs' is not an array"),
    ])
    func aResponseThatIsNotEtcdsIsMalformed(response: String, detail: String) throws {
        let gateway = try FakeGateway { _ in raw(response) }
        defer { gateway.stop() }
        let w = try EtcdWitness(url: "etcd://\(gateway.endpoint)/k")
        do throws(WitnessError) {
            _ = try w.holder()
            Issue.record("accepted \(response.debugDescription)")
        } catch {
            guard case .malformedResponse(_, let operation, let text) = error else {
                Issue.record("expected .malformedResponse, got \(error)")
                return
            }
            #expect(operation == "read key")
            #expect(text.contains(detail), "'\(text)' does not mention \(detail)")
        }
    }

    @Test func anEtcdErrorCarriesItsStatusAndMessage() throws {
        let gateway = try FakeGateway { _ in
            jsonResponse("503 Service Unavailable", #"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#)
        }
        defer { gateway.stop() }
        let w = try EtcdWitness(url: "etcd://\(gateway.endpoint)/k")
        #expect(throws: WitnessError.httpStatus(endpoint: gateway.endpoint, operation: "read key", status: 503, message: "etcdserver: no leader")) {
            try w.holder()
        }
    }

    @Test func aSilentPeerTimesOut() throws {
        // Accepts but never answers: the request must end at its timeout, not hang.
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.shutdown() }
        let w = try EtcdWitness(url: "etcd://127.0.0.1:\(listener.port)/k", requestTimeoutMs: 200)
        let start = monotonicNs()
        #expect(throws: WitnessError.timedOut(endpoint: "127.0.0.1:\(listener.port)", operation: "read key", timeoutMs: 200)) {
            try w.holder()
        }
        #expect(monotonicNs() - start < 1_000_000_000)
    }

    @Test func leaseDeadlineSubtractsTheMarginFromTheTTL() {
        let lease = WitnessLease(id: 1, ttlSeconds: 5, confirmedAtNs: 1_000)
        #expect(lease.deadlineNs(marginNs: 1_500_000_000) == 1_000 + 3_500_000_000)
        #expect(lease.deadlineNs(marginNs: 9_000_000_000) == 1_000)  // margin beyond TTL: no time at all
        #expect(lease.remainingNs(marginNs: 1_500_000_000, now: 1_000 + 3_000_000_000) == 500_000_000)
        #expect(lease.remainingNs(marginNs: 1_500_000_000, now: 1_000 + 3_500_000_000) == 0)
        #expect(lease.remainingNs(marginNs: 1_500_000_000, now: 9_000_000_000) == 0)
        let fresh = WitnessLease(id: 1, ttlSeconds: 5, confirmedAtNs: WitnessLease.clockNs())
        #expect(fresh.remainingNs(marginNs: 1_500_000_000) > 3_000_000_000)
    }

    @Test func ownerNameHasRoleHostAndPid() {
        let name = EtcdWitness.ownerName(role: "primary")
        let parts = name.split(separator: ":")
        #expect(parts.count == 3 && parts[0] == "primary" && parts[2] == Substring(String(getpid())))
    }
}

// MARK: - HTTP reader, etcd messages and base64

extension WitnessTests {
    @Suite struct Codecs {
        /// Feeds `bytes` all at once and one byte at a time; both must give the same result.
        private func parseBothWays(_ bytes: [UInt8], closeAtEnd: Bool = false) throws -> HTTPResponse {
            var whole = HTTPResponseParser()
            var wholeResult = try whole.feed(bytes)
            if wholeResult == nil, closeAtEnd { wholeResult = try whole.finish() }
            var single = HTTPResponseParser()
            var singleResult: HTTPResponse?
            for (i, byte) in bytes.enumerated() {
                singleResult = try single.feed([byte])
                if singleResult != nil { #expect(i == bytes.count - 1, "complete before the last byte") }
            }
            if singleResult == nil, closeAtEnd { singleResult = try single.finish() }
            let result = try #require(wholeResult)
            #expect(singleResult == result)
            return result
        }

        @Test func readsAContentLengthResponse() throws {
            let response = try parseBothWays(jsonResponse("200 OK", #"{"health":"true"}"#))
            #expect(response.status == 200 && response.reason == "OK")
            #expect(response.header("Content-Type") == "application/json")
            #expect(String(decoding: response.body, as: UTF8.self) == #"{"health":"true"}"#)
        }

        @Test func readsEtcdsChunkedStreamWithTrailers() throws {
            // The bytes etcd 3.4 sends for a keepalive on an unknown lease, and for a failed revoke.
            let keepalive = #"{"result":{"header":{"revision":"2"},"ID":"77"}}"# + "\n"
            let text = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + String(keepalive.utf8.count, radix: 16) + "\r\n" + keepalive + "\r\n0\r\n\r\n"
            let response = try parseBothWays(raw(text))
            #expect(String(decoding: response.body, as: UTF8.self) == keepalive)

            let error = #"{"error":"etcdserver: requested lease not found","code":5}"#
            let split = error.utf8.count / 2
            let revoke = "HTTP/1.1 404 Not Found\r\nTrailer: Grpc-Trailer-Content-Type\r\nTransfer-Encoding: chunked\r\n\r\n"
                + String(split, radix: 16) + "\r\n" + error.prefix(split) + "\r\n"
                + String(error.utf8.count - split, radix: 16) + ";ext=1\r\n" + error.dropFirst(split) + "\r\n"
                + "0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n"
            let failed = try parseBothWays(raw(revoke))
            #expect(failed.status == 404)
            #expect(String(decoding: failed.body, as: UTF8.self) == error)
            #expect(failed.header("grpc-trailer-content-type") == "application/grpc")
        }

        @Test func readsABodyThatEndsWithTheConnection() throws {
            let response = try parseBothWays(raw("HTTP/1.0 200 OK\r\n\r\n{}"), closeAtEnd: true)
            #expect(response.body == raw("{}"))
            let interim = try parseBothWays(raw("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"))
            #expect(interim.status == 204)
        }

        @Test(arguments: [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\n\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy",
        ])
        func rejectsBrokenResponses(text: String) {
            var parser = HTTPResponseParser()
            #expect(throws: HTTPParseError.self) {
                _ = try parser.feed(raw(text))
                _ = try parser.finish()
            }
        }

        @Test func rejectsAResponseCutShort() {
            var parser = HTTPResponseParser()
            #expect(throws: HTTPParseError(reason: "the connection closed before any response arrived")) { _ = try parser.finish() }
            var partial = HTTPResponseParser()
            #expect(throws: HTTPParseError.self) {
                _ = try partial.feed(raw("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"))
                _ = try partial.finish()
            }
        }

        @Test func readsEtcdReplies() throws {
            let text = #"{"header":{"cluster_id":"324952591200643719","revision":"2"},"succeeded":true,"kvs":[{"key":"cmVtdXMvdzE=","value":"cHJpbWFyeTphOjE=","lease":"2324035531141996047"}],"count":"1"}"#
            let reply = try EtcdCodec.decodeReply(raw(text), firstMessageOnly: false)
            #expect(reply.succeeded == true)
            #expect(reply.header?.revision?.value == 2)
            #expect(reply.kvs?.first?.lease?.value == 2_324_035_531_141_996_047)
            #expect(reply.kvs?.first?.value.flatMap(EtcdCodec.text(fromBase64:)) == "primary:a:1")
            // Older gateways write integers as numbers; zero values are omitted.
            let grant = try EtcdCodec.decodeReply(raw(#"{"ID":7,"TTL":"3"}"#), firstMessageOnly: false)
            #expect(grant.ID?.value == 7 && grant.TTL?.value == 3 && grant.succeeded == nil && grant.kvs == nil)
            // A streamed call: the first newline-delimited message only.
            let stream = try EtcdCodec.decodeReply(raw(" \n{\"result\":{\"header\":{},\"ID\":\"9\",\"TTL\":\"2\"}}\n{\"result\":{}}\n"), firstMessageOnly: true)
            #expect(stream.result?.ID?.value == 9 && stream.result?.TTL?.value == 2)
            // Both shapes of an error.
            let unary = try EtcdCodec.decodeReply(raw(#"{"error":"no leader","code":14,"message":"no leader"}"#), firstMessageOnly: false)
            #expect(unary.error?.message == "no leader" && unary.code?.value == 14)
            let streamed = try EtcdCodec.decodeReply(raw(#"{"error":{"http_code":404,"message":"lease not found"}}"#), firstMessageOnly: true)
            guard case .detail(let code, let message)? = streamed.error else {
                Issue.record("a streamed error was not read as an object: \(String(describing: streamed.error))")
                return
            }
            #expect(code == 404 && message == "lease not found")
        }

        @Test(arguments: [
            ("", "invalid JSON"), ("{", "invalid JSON"), ("{\"a\" 1}", "invalid JSON"), ("hello", "invalid JSON"),
            ("[]", "not a JSON object"), ("\"x\"", "not a JSON object"),
            ("{\"kvs\":{\"a\":\"b\"}}", "'kvs' is not an array"),
            ("{\"succeeded\":\"yes\"}", "'succeeded' is not a boolean"),
            ("{\"ID\":\"12x\"}", "'ID'"), ("{\"TTL\":1.5}", "'TTL': not an integer"), ("{\"ID\":\"99999999999999999999\"}", "'ID'"),
        ])
        func rejectsWhatIsNotAnEtcdReply(text: String, reason: String) {
            do {
                _ = try EtcdCodec.decodeReply(raw(text), firstMessageOnly: false)
                Issue.record("accepted \(text.debugDescription)")
            } catch {
                #expect(error.reason.contains(reason), "'\(error.reason)' does not mention \(reason)")
            }
        }

        @Test func encodesRequestsReproducibly() {
            let body = EtcdTxnRequest(
                compare: [.init(target: "CREATE", key: EtcdCodec.base64("remus/w1"), create_revision: EtcdInteger(0))],
                success: [.init(request_put: .init(key: EtcdCodec.base64("remus/w1"), value: EtcdCodec.base64("primary:é"), lease: EtcdInteger(5)))])
            #expect(String(decoding: EtcdCodec.encode(body), as: UTF8.self)
                == #"{"compare":[{"create_revision":"0","key":"cmVtdXMvdzE=","result":"EQUAL","target":"CREATE"}],"#
                + #""success":[{"request_put":{"key":"cmVtdXMvdzE=","lease":"5","value":"cHJpbWFyeTrDqQ=="}}]}"#)
            #expect(String(decoding: EtcdCodec.encode(EtcdLeaseGrantRequest(TTL: EtcdInteger(3))), as: UTF8.self) == #"{"TTL":"3"}"#)
        }

        @Test func base64OfKeysAndValues() {
            let vectors = ["": "", "f": "Zg==", "fo": "Zm8=", "foo": "Zm9v", "foob": "Zm9vYg==", "fooba": "Zm9vYmE=", "foobar": "Zm9vYmFy"]
            for (plain, encoded) in vectors {
                #expect(EtcdCodec.base64(plain) == encoded)
                #expect(EtcdCodec.text(fromBase64: encoded) == plain)
            }
            for bad in ["Zg=", "Z===", "Zm-v", "=Zm9", "wyg="] {  // the last: valid base64 of invalid UTF-8
                #expect(EtcdCodec.text(fromBase64: bad) == nil, "accepted \(bad.debugDescription)")
            }
        }
    }
}
