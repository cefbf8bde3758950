import COpenSSL
import Foundation
import Glibc
import RemusSystem
import RemusTestSupport
@testable import RemusTLS
import Testing

// Mutual TLS between two TLSChannels on loopback, with certificates made at test time by the
// same code as `remusd certs`: what is accepted, what is refused and why, and that the bytes
// cross intact however they are cut into segments.

/// Certificates of one test: CA 1 with primary, backup and intruder; CA 2 with its own primary.
final class TestCertificates {
    let directory: String
    let main: CertificateSet
    let other: CertificateSet

    init(_ tag: String) throws {
        directory = NSTemporaryDirectory() + "remusd-tls-\(tag)-\(UUID().uuidString.prefix(8))"
        main = CertificateSet(directory: directory + "/main")
        other = CertificateSet(directory: directory + "/other")
        try main.make([.init(name: "primary"), .init(name: "backup", alternativeNames: ["127.0.0.1"]), .init(name: "intruder")])
        try other.make([.init(name: "primary")])
    }

    /// A certificate of CA 1 for `name` with the given validity (seconds from now).
    func files(_ name: String, notBefore: Int, notAfter: Int) throws -> TLSFiles {
        try main.make([.init(name: name)], validity: .init(notBeforeSeconds: notBefore, notAfterSeconds: notAfter))
        return main.files(for: name)
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }
}

/// A loopback listener whose one accepted connection is handed to the TLS server side on a
/// thread of its own.
final class TLSServer: @unchecked Sendable {  // result guarded by monitor
    let listener: TCPListener
    private let monitor = MonitorLock()
    private var result: Result<TLSChannel, TLSError>?
    private(set) var elapsedMs: UInt64 = 0

    init(context: TLSContext, allowedPeers: [String] = [], handshakeMs: Int = 2000) throws {
        listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let listener = self.listener
        startThread(name: "tls-server") { [self] in
            guard let tcp = try? listener.accept() else { return }
            let start = monotonicNanoseconds()
            let outcome: Result<TLSChannel, TLSError>
            do throws(TLSError) {
                outcome = .success(try TLSChannel.accept(tcp, context: context, allowedPeers: allowedPeers,
                                                         plaintextSignature: [0x89, 0x52, 0x45, 0x4D, 0x55, 0x53, 0x0D, 0x0A],
                                                         deadline: .after(milliseconds: handshakeMs)))
            } catch {
                outcome = .failure(error)
            }
            monitor.withLock {
                elapsedMs = (monotonicNanoseconds() - start) / 1_000_000
                result = outcome
                monitor.broadcast()
            }
        }
    }

    var endpoint: Endpoint { Endpoint(host: "127.0.0.1", port: listener.port) }

    /// The server's outcome, waited for up to `ms`.
    func outcome(withinMs ms: UInt64 = 10_000) -> Result<TLSChannel, TLSError>? {
        let deadline = monotonicNanoseconds() + ms * 1_000_000
        return monitor.withLock {
            while result == nil { if !monitor.wait(untilMonotonic: deadline) { break } }
            return result
        }
    }

    func refusal() -> TLSError? {
        if case .failure(let e) = outcome() { return e }
        return nil
    }

    deinit { listener.shutdown() }
}

/// Connects a TLS client; returns the channel, or the client's own error.
func connectClient(_ server: TLSServer, files: TLSFiles, expecting name: String = "backup") -> Result<TLSChannel, Error> {
    do {
        let context = try TLSContext(.client, files: files)
        let tcp = try TCPChannel.connect(to: server.endpoint, deadline: .after(milliseconds: 2000))
        return .success(try TLSChannel.connect(tcp, context: context, expectedName: name, deadline: .after(milliseconds: 2000)))
    } catch {
        return .failure(error)
    }
}

/// The client's first read after the handshake: in TLS 1.3 a client learns that the server
/// refused its certificate only here.
func firstRead(_ channel: TLSChannel) -> Error? {
    var byte = [UInt8](repeating: 0, count: 1)
    do {
        let n = try byte.withUnsafeMutableBytes { try channel.read(into: $0) }
        return n == 0 ? TLSError(.closed, "end of input") : nil
    } catch { return error }
}

@Suite("Mutual TLS on the replication channel", .serialized)
struct TLSChannelTests {
    init() { signal(SIGPIPE, SIG_IGN) }

    @Test("A valid pair completes the handshake; each side knows the other's identity; bytes cross both ways")
    func validPairHandshakes() throws {
        let certs = try TestCertificates("ok")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")), allowedPeers: ["primary"])
        let client = try connectClient(server, files: certs.main.files(for: "primary")).get()
        let accepted = try server.outcome()!.get()
        #expect(client.peerIdentity == "backup")
        #expect(accepted.peerIdentity == "primary")
        #expect(client.kernelTLS == accepted.kernelTLS)
        try client.write(Array("hello backup".utf8))
        try accepted.write(Array("hello primary".utf8))
        var buffer = [UInt8](repeating: 0, count: 64)
        let n1 = try buffer.withUnsafeMutableBytes { try accepted.read(into: $0) }
        #expect(String(decoding: buffer[0..<n1], as: UTF8.self) == "hello backup")
        let n2 = try buffer.withUnsafeMutableBytes { try client.read(into: $0) }
        #expect(String(decoding: buffer[0..<n2], as: UTF8.self) == "hello primary")
    }

    @Test("The primary may name the backup by IP address when its certificate carries it")
    func ipAddressIdentity() throws {
        let certs = try TestCertificates("ip")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")))
        _ = try connectClient(server, files: certs.main.files(for: "primary"), expecting: "127.0.0.1").get()
        #expect(try server.outcome()!.get().peerIdentity == "primary")
    }

    @Test("Segments of any shape arrive byte for byte, while the other direction is read concurrently")
    func segmentsArriveIntact() throws {
        let certs = try TestCertificates("segments")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")))
        let client = try connectClient(server, files: certs.main.files(for: "primary")).get()
        let accepted = try server.outcome()!.get()
        // Sizes around the 16 KiB coalescing buffer: small records, page-sized runs, a large slab.
        let sizes = [1, 16, 4096, 4096, 4096, 16_383, 16_384, 16_385, 100, 1 << 20, 7, 4096]
        var rng = SystemRandomNumberGenerator()
        let pieces = sizes.map { n in (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) } }
        let expected = pieces.flatMap { $0 }
        // The server sends ACK-like records back meanwhile: reads and writes share the session.
        let echoes = 200
        startThread(name: "acks") { for i in 0..<echoes { try? accepted.write([UInt8(i & 0xFF)]) } }
        let received = LockedBytes()
        startThread(name: "reader") {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while received.count < expected.count {
                guard let n = try? buffer.withUnsafeMutableBytes({ try accepted.read(into: $0) }), n > 0 else { return }
                received.append(buffer[0..<n])
            }
        }
        let ackReader = LockedBytes()
        startThread(name: "ack-reader") {
            var buffer = [UInt8](repeating: 0, count: 256)
            while ackReader.count < echoes {
                guard let n = try? buffer.withUnsafeMutableBytes({ try client.read(into: $0) }), n > 0 else { return }
                ackReader.append(buffer[0..<n])
            }
        }
        let storage = pieces.map { p -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: p.count, alignment: 16)
            b.copyBytes(from: p)
            return b
        }
        defer { storage.forEach { $0.deallocate() } }
        var iov = storage.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        try iov.withUnsafeMutableBufferPointer { try client.write(segments: $0) }
        #expect(eventually(deadline: .after(seconds: 20)) { received.count >= expected.count })
        #expect(received.bytes == expected, "the bytes differ after \(zip(received.bytes, expected).prefix { $0 == $1 }.count)")
        #expect(eventually(deadline: .after(seconds: 20)) { ackReader.count >= echoes })
        #expect(ackReader.count == echoes)
    }

    @Test("Refused: a client whose certificate another CA signed")
    func wrongCA() throws {
        let certs = try TestCertificates("wrongca")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")))
        var files = certs.other.files(for: "primary")
        files.ca = certs.main.caCertificate  // it trusts the backup, but the backup does not trust it
        let client = try? connectClient(server, files: files).get()
        let refusal = try #require(server.refusal())
        #expect(refusal.kind == .unknownCA, "\(refusal)")
        #expect(refusal.detail.contains("not signed by our CA"), "\(refusal)")
        let clientSide = try #require(client.flatMap(firstRead) ?? TLSError(.closed, "handshake failed"))
        #expect("\(clientSide)".contains("CA") || "\(clientSide)".contains("closed"), "\(clientSide)")
    }

    @Test("Refused: an expired client certificate, and one not valid yet")
    func expiredAndNotYetValid() throws {
        let certs = try TestCertificates("validity")
        let context = try TLSContext(.server, files: certs.main.files(for: "backup"))
        let expired = try certs.files("old-primary", notBefore: -7200, notAfter: -3600)
        let server1 = try TLSServer(context: context)
        let client1 = try? connectClient(server1, files: expired).get()
        let r1 = try #require(server1.refusal())
        #expect(r1.kind == .expired, "\(r1)")
        if let client1, let e = firstRead(client1) {
            #expect("\(e)".contains("expired"), "the primary is told why: \(e)")
        }

        let future = try certs.files("future-primary", notBefore: 3600, notAfter: 7200)
        let server2 = try TLSServer(context: context)
        _ = try? connectClient(server2, files: future).get()
        let r2 = try #require(server2.refusal())
        #expect(r2.kind == .notYetValid, "\(r2)")
    }

    @Test("Refused: a certificate of our CA whose identity is not in the allow-list")
    func wrongIdentity() throws {
        let certs = try TestCertificates("identity")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")), allowedPeers: ["primary", "primary-2"])
        _ = try? connectClient(server, files: certs.main.files(for: "intruder")).get()
        let refusal = try #require(server.refusal())
        #expect(refusal.kind == .wrongIdentity, "\(refusal)")

        // Without an allow-list any certificate the CA signed is accepted.
        let open = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")))
        _ = try connectClient(open, files: certs.main.files(for: "intruder")).get()
        #expect(try open.outcome()!.get().peerIdentity == "intruder")
    }

    @Test("Refused by the primary: a backup whose certificate names another host")
    func backupWithTheWrongName() throws {
        let certs = try TestCertificates("servername")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "intruder")))
        let result = connectClient(server, files: certs.main.files(for: "primary"), expecting: "backup")
        guard case .failure(let error) = result, let tlsError = error as? TLSError else {
            Issue.record("the primary accepted a backup named 'intruder' when it dialled 'backup'")
            return
        }
        #expect(tlsError.kind == .wrongIdentity, "\(tlsError)")
    }

    @Test("Refused: a client that presents no certificate")
    func clientWithoutCertificate() throws {
        let certs = try TestCertificates("nocert")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")))
        let tcp = try TCPChannel.connect(to: server.endpoint, deadline: .after(milliseconds: 2000))
        // A client of OpenSSL's own, without any certificate.
        let ctx = try #require(SSL_CTX_new(TLS_client_method()))
        defer { SSL_CTX_free(ctx) }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nil)
        let ssl = try #require(SSL_new(ctx))
        defer { SSL_free(ssl) }
        SSL_set_fd(ssl, tcp.fd)
        _ = SSL_connect(ssl)
        let refusal = try #require(server.refusal())
        #expect(refusal.kind == .noCertificate, "\(refusal)")
        tcp.shutdown()
    }

    @Test("Refused: plaintext remusd, and garbage instead of a ClientHello")
    func plaintextAndGarbage() throws {
        let certs = try TestCertificates("plain")
        let context = try TLSContext(.server, files: certs.main.files(for: "backup"))
        for (bytes, kind) in [([0x89, 0x52, 0x45, 0x4D, 0x55, 0x53, 0x0D, 0x0A, 1, 0] as [UInt8], TLSError.Kind.plaintextClient),
                              (Array("GET / HTTP/1.1\r\n\r\n".utf8), .notTLS),
                              ([0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00], .protocolFailure)] {
            let server = try TLSServer(context: context)
            let tcp = try TCPChannel.connect(to: server.endpoint, deadline: .after(milliseconds: 2000))
            try tcp.write(bytes)
            let refusal = try #require(server.refusal())
            #expect(refusal.kind == kind, "\(bytes.prefix(4)): \(refusal)")
            tcp.shutdown()
        }
    }

    @Test("A peer that stalls before or inside its ClientHello is dropped at the deadline")
    func stallingPeerIsDroppedAtTheDeadline() throws {
        let certs = try TestCertificates("stall")
        let context = try TLSContext(.server, files: certs.main.files(for: "backup"))
        for partial in [[], [0x16, 0x03, 0x01, 0x02] as [UInt8]] {
            let server = try TLSServer(context: context, handshakeMs: 300)
            let tcp = try TCPChannel.connect(to: server.endpoint, deadline: .after(milliseconds: 2000))
            if !partial.isEmpty { try tcp.write(partial) }
            let refusal = try #require(server.refusal())
            #expect(refusal.kind == .timedOut, "\(refusal)")
            #expect(server.elapsedMs >= 290 && server.elapsedMs < 3000, "dropped after \(server.elapsedMs) ms for a 300 ms deadline")
            // The server closed its side: the staller reads the end.
            var byte = [UInt8](repeating: 0, count: 1)
            #expect(try byte.withUnsafeMutableBytes { try tcp.read(into: $0) } == 0)
        }
    }

    @Test("shutdown wakes a reader blocked on the TLS channel")
    func shutdownWakesABlockedReader() throws {
        let certs = try TestCertificates("shutdown")
        let server = try TLSServer(context: try TLSContext(.server, files: certs.main.files(for: "backup")))
        let client = try connectClient(server, files: certs.main.files(for: "primary")).get()
        let accepted = try server.outcome()!.get()
        let done = LockedBytes()
        startThread(name: "blocked-reader") {
            var b = [UInt8](repeating: 0, count: 8)
            let n = (try? b.withUnsafeMutableBytes { try accepted.read(into: $0) }) ?? -1
            done.append([UInt8(truncatingIfNeeded: n + 1)])
        }
        accepted.shutdown()
        #expect(eventually(deadline: .after(seconds: 5)) { done.count == 1 })
        _ = client
    }

    @Test("remusd certs' files: keys are 0600, certificates chain to the CA, a second run reuses the CA")
    func certificateFiles() throws {
        let certs = try TestCertificates("files")
        var st = stat()
        stat(certs.main.files(for: "primary").key, &st)
        #expect(st.st_mode & 0o777 == 0o600)
        stat(certs.main.caKey, &st)
        #expect(st.st_mode & 0o777 == 0o600)
        let before = try String(contentsOfFile: certs.main.caCertificate, encoding: .utf8)
        #expect(try certs.main.make([.init(name: "extra")]) == false, "a second run makes no new CA")
        #expect(try String(contentsOfFile: certs.main.caCertificate, encoding: .utf8) == before)
        #expect(CertificateSet.Host(parsing: "backup=10.0.0.2,backup.lan") == .init(name: "backup", alternativeNames: ["10.0.0.2", "backup.lan"]))
        #expect(CertificateSet.Host(parsing: "bad name") == nil)
        #expect(CertificateSet.Host(parsing: "backup=") == nil)
    }
}

/// Bytes appended by one thread and counted by another.
final class LockedBytes: @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var storage: [UInt8] = []
    func append<S: Sequence>(_ s: S) where S.Element == UInt8 { monitor.withLock { storage.append(contentsOf: s) } }
    var count: Int { monitor.withLock { storage.count } }
    var bytes: [UInt8] { monitor.withLock { storage } }
}
