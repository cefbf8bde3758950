import COpenSSL
import Foundation
import Glibc
import RemusCore
import RemusDrill
@testable import RemusRuntime
import RemusTestSupport
import RemusTLS
import Testing

// Mutual TLS on real `remusd` processes: every peer that fails the handshake is refused, named
// with its reason in the log and the status, and changes nothing — the backup stays LISTENING
// (or keeps receiving from its real primary), commits nothing and ACKs nothing to it.

/// One hostile or misconfigured peer: how it connects and the reason the backup must log.
private struct BadPeer {
    let name: String
    let reason: TLSError.Kind
    /// Connects and does its thing; returns the bytes it received before the backup closed.
    let act: (UInt16) throws -> [UInt8]
}

/// Reads until the backup closes (bounded: a peer the backup forgot would hang the test).
private func drain(_ channel: any ByteChannel, fd: Int32) -> [UInt8] {
    var received: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    let deadline = Deadline.after(seconds: 10)
    while (try? waitReady(fd, events: Int16(POLLIN), until: deadline, call: "drain")) == true {
        guard let n = try? buffer.withUnsafeMutableBytes({ try channel.read(into: $0) }), n > 0 else { break }
        received += buffer[0..<n]
    }
    return received
}

/// A TLS client presenting `files` (its handshake may complete on its side: in TLS 1.3 a client
/// learns of its refusal on its first read).
private func tlsPeer(_ files: TLSFiles) -> (UInt16) throws -> [UInt8] {
    { port in
        let tcp = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
        let context = try TLSContext(.client, files: files)
        guard let channel = try? TLSChannel.connect(tcp, context: context, expectedName: "127.0.0.1", deadline: .after(milliseconds: 5000)) else { return [] }
        return drain(channel, fd: tcp.fd)
    }
}

/// A plain TCP peer that writes `bytes` (and, with `hold`, keeps quiet after them).
private func rawPeer(_ bytes: [UInt8]) -> (UInt16) throws -> [UInt8] {
    { port in
        let tcp = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
        if !bytes.isEmpty { try tcp.write(bytes) }
        return drain(tcp, fd: tcp.fd)
    }
}

/// The primary's plaintext preamble: stream header and DOMAIN_CONFIG, as `--insecure-plaintext` sends it.
private func plaintextPreamble() throws -> [UInt8] {
    var out: [UInt8] = []
    let header = StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .primary,
                              guestUUID: GuestUUID(high: 7, low: 7), guestName: "attacker", senderVersion: "test")
    try StreamEncoder.appendHeader(header, into: &out)
    return out
}

@Suite("Mutual TLS between real processes", .serialized)
struct TLSRefusalTests {
    init() { signal(SIGPIPE, SIG_IGN) }

    /// Peers that must be refused: made fresh per test (other CA, expired, not yet valid).
    private func badPeers(_ tag: String) throws -> [BadPeer] {
        let other = CertificateSet(directory: NSTemporaryDirectory() + "remusd-othe-ca-\(tag)-\(getpid())")
        try other.make([.init(name: "primary")])
        let expiredName = "expired-\(tag)", futureName = "future-\(tag)"
        // Both also name "primary", which the backup allows: only their validity is wrong.
        try testCertificates.make([.init(name: expiredName, alternativeNames: ["primary"])], validity: .init(notBeforeSeconds: -7200, notAfterSeconds: -3600))
        try testCertificates.make([.init(name: futureName, alternativeNames: ["primary"])], validity: .init(notBeforeSeconds: 3600, notAfterSeconds: 7200))
        var wrongCA = other.files(for: "primary")
        wrongCA.ca = testCertificates.caCertificate
        return [
            BadPeer(name: "plaintext primary", reason: .plaintextClient, act: rawPeer(try plaintextPreamble())),
            BadPeer(name: "garbage", reason: .notTLS, act: rawPeer(Array("GET / HTTP/1.1\r\n\r\n".utf8))),
            BadPeer(name: "wrong CA", reason: .unknownCA, act: tlsPeer(wrongCA)),
            BadPeer(name: "expired", reason: .expired, act: tlsPeer(testCertificates.files(for: expiredName))),
            BadPeer(name: "not yet valid", reason: .notYetValid, act: tlsPeer(testCertificates.files(for: futureName))),
            BadPeer(name: "identity not allowed", reason: .wrongIdentity, act: tlsPeer(testCertificates.files(for: "intruder"))),
            BadPeer(name: "no certificate", reason: .noCertificate, act: { port in
                let tcp = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
                let ctx = SSL_CTX_new(TLS_client_method())
                defer { SSL_CTX_free(ctx) }
                SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nil)
                let ssl = SSL_new(ctx)
                defer { SSL_free(ssl) }
                SSL_set_fd(ssl, tcp.fd)
                _ = SSL_connect(ssl)
                var byte: UInt8 = 0
                return SSL_read(ssl, &byte, 1) > 0 ? [byte] : []
            }),
            BadPeer(name: "staller", reason: .timedOut, act: rawPeer([])),
        ]
    }

    /// Runs each bad peer against the backup and checks what it must find afterwards.
    private func refuseAll(_ peers: [BadPeer], pair: DaemonPair, stateAfter: (String) -> Bool) throws {
        let refusedBefore = pair.backupLog.components(separatedBy: "refused a connection from 127.0.0.1:").count - 1
        for (i, peer) in peers.enumerated() {
            let received = try peer.act(pair.port)
            #expect(received.isEmpty, "\(peer.name) received \(received.count) bytes: a refused peer gets nothing, not even a stream header")
            let line = "refused a connection from 127.0.0.1:"
            var entries: [String] { pair.backupLog.components(separatedBy: "\n").filter { $0.contains(line) } }
            #expect(eventually(deadline: .after(seconds: 10)) { entries.count >= refusedBefore + i + 1 },
                    "\(peer.name) was not refused: \(pair.backupLog)")
            #expect(entries.count == refusedBefore + i + 1, "one refusal per peer: \(entries)")
            #expect(entries.last?.contains("(\(peer.reason.rawValue))") == true, "\(peer.name): \(entries)")
            #expect(entries.last?.contains("nothing changed here") == true)
            let status = pair.backupStatus
            #expect(stateAfter(status), "after \(peer.name): \(status)")
        }
        // The status counts what the log shows (a real primary's attempt that lost the race with a
        // loaded machine's handshake deadline would be among them, and retried).
        let logged = pair.backupLog.components(separatedBy: "refused a connection from").count - 1
        #expect(logged >= refusedBefore + peers.count)
        #expect(pair.backupStatus.contains("refused connections: \(logged)"), "\(pair.backupStatus)")
    }

    @Test("Every peer failing the handshake is refused with its reason; the backup's state and its real primary are untouched")
    func badPeersAreRefusedAndChangeNothing() throws {
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence", "--heartbeat", "50", "--timeout", "2000",
                                                    "--tls-allow-peer", "primary", "--tls-handshake-timeout", "1000"], tag: "tls")
        defer { pair.stop() }
        #expect(pair.backupStatus.contains("channel: mutual TLS 1.3"), "\(pair.backupStatus)")
        let peers = try badPeers("a")
        // An idle backup stays LISTENING with nothing committed.
        try refuseAll(peers, pair: pair) { $0.contains("state: LISTENING") && !$0.contains("committed:") && !$0.contains("primary:") }

        // A real primary is served afterwards, over TLS, under its own identity.
        try pair.startPrimary(["--sim-memory", "32", "--interval", "50", "--heartbeat", "50", "--timeout", "2000"])
        try #require(eventually(deadline: .after(seconds: 20)) { pair.backupStatus.contains("RECEIVING (committed") }, "\(pair.backupStatus)\n\(pair.primaryLog)")
        #expect(pair.backupStatus.contains("over mutual TLS 1.3 with 'primary'"), "\(pair.backupStatus)")
        #expect(pair.primaryStatus.contains("channel: mutual TLS 1.3 with 'backup'"), "\(pair.primaryStatus)")

        // While it receives, the same peers change nothing: the primary keeps its one connection.
        let peerLine = pair.backupStatus.split(separator: "\n").first { $0.hasPrefix("primary:") }
        try refuseAll(try badPeers("b"), pair: pair) { status in
            status.contains("RECEIVING (committed") && status.split(separator: "\n").first { $0.hasPrefix("primary:") } == peerLine
        }
        #expect(pair.primaryLog.components(separatedBy: "connected to the backup").count - 1 == 1, "the primary reconnected: \(pair.primaryLog)")
        #expect(!pair.backupLog.contains("attacker"), "a refused peer's stream header was read: \(pair.backupLog)")
    }

    @Test("A primary refuses a backup whose certificate names another host, and says why")
    func primaryRefusesABackupWithAnotherName() throws {
        // The backup presents "intruder", signed by the same CA: the primary dialled 127.0.0.1.
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence"] + tlsArguments("intruder"), tag: "tls-name")
        defer { pair.stop() }
        try pair.startPrimary(["--sim-memory", "16", "--interval", "50"])
        #expect(eventually(deadline: .after(seconds: 15)) { pair.primaryLog.contains("names someone we do not accept") }, "\(pair.primaryLog)")
        #expect(pair.backupStatus.contains("state: LISTENING"), "\(pair.backupStatus)")
    }

    @Test("A primary with an expired certificate is told by the backup's alert")
    func primaryWithAnExpiredCertificateIsToldWhy() throws {
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence"], tag: "tls-expired")
        defer { pair.stop() }
        try testCertificates.make([.init(name: "expired-p")], validity: .init(notBeforeSeconds: -7200, notAfterSeconds: -3600))
        try pair.startPrimary(["--sim-memory", "16", "--interval", "50"] + tlsArguments("expired-p"))
        #expect(eventually(deadline: .after(seconds: 15)) { pair.primaryLog.contains("our certificate expired") || pair.primaryLog.contains("certificate expired") },
                "\(pair.primaryLog)")
        #expect(eventually(deadline: .after(seconds: 5)) { pair.backupLog.contains("(expired)") }, "\(pair.backupLog)")
        #expect(pair.backupStatus.contains("state: LISTENING"), "\(pair.backupStatus)")
    }

    @Test("Without TLS flags protect and receive refuse to start; plaintext off loopback needs its own flag")
    func theCommandLineRequiresTLS() throws {
        let dir = try freshRunDirectory("tls-cli")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freePorts(1)[0]
        let (s1, o1) = try runRemusd(["receive", "--listen", "127.0.0.1:\(port)"], runDir: dir)
        #expect(s1 != 0 && o1.contains("needs mutual TLS") && o1.contains("remusd certs"), "\(o1)")
        let (s2, o2) = try runRemusd(["protect", "g", "127.0.0.1:\(port)"], runDir: dir)
        #expect(s2 != 0 && o2.contains("needs mutual TLS"), "\(o2)")
        let (s3, o3) = try runRemusd(["receive", "--listen", "0.0.0.0:\(port)", "--insecure-plaintext"], runDir: dir)
        #expect(s3 != 0 && o3.contains("not loopback") && o3.contains("--insecure-plaintext-on-network"), "\(o3)")
        let (s4, o4) = try runRemusd(["protect", "g", "10.0.0.2", "--insecure-plaintext"], runDir: dir)
        #expect(s4 != 0 && o4.contains("not loopback"), "\(o4)")
        let (s5, o5) = try runRemusd(["receive", "--listen", "127.0.0.1:\(port)", "--tls-cert", "/nonexistent.pem"], runDir: dir)
        #expect(s5 != 0 && o5.contains("missing: --tls-key, --tls-ca"), "\(o5)")
        let (s6, o6) = try runRemusd(["receive", "--listen", "127.0.0.1:\(port)", "--insecure-plaintext"] + tlsArguments("backup"), runDir: dir)
        #expect(s6 != 0 && o6.contains("contradicts"), "\(o6)")
        let (s7, o7) = try runRemusd(["receive", "--listen", "127.0.0.1:\(port)", "--tls-allow-peer", "10.0.0.1"] + tlsArguments("backup"), runDir: dir)
        #expect(s7 != 0 && o7.contains("is not a certificate name"), "\(o7)")
    }

    @Test("A plaintext pair on loopback runs, and both sides say it is insecure")
    func plaintextOnLoopbackRunsAndSaysSo() throws {
        let dir = try freshRunDirectory("plain")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freePorts(1)[0]
        let backup = try ChildProcess(
            arguments: [remusdBinary, "receive", "--listen", "127.0.0.1:\(port)", "--unsafe-no-fence", "--insecure-plaintext",
                        "--status-socket", dir + "/backup.sock"],
            outputFile: dir + "/backup.log", environment: ["REMUSD_RUN_DIR": dir])
        defer { backup.signal(SIGKILL); backup.wait() }
        try waitForFile(dir + "/backup.sock", what: "the backup", deadlineMs: 30_000)
        let primary = try ChildProcess(
            arguments: [remusdBinary, "protect", "g", "127.0.0.1:\(port)", "--sim-memory", "16", "--interval", "50",
                        "--insecure-plaintext", "--status-socket", dir + "/g.sock"],
            outputFile: dir + "/primary.log", environment: ["REMUSD_RUN_DIR": dir])
        defer { primary.signal(SIGKILL); primary.wait() }
        let status = { (try? StatusSocket.query(dir + "/backup.sock")) ?? "" }
        #expect(eventually(deadline: .after(seconds: 20)) { status().contains("RECEIVING (committed") }, "\(status())")
        #expect(status().contains("channel: INSECURE PLAINTEXT"), "\(status())")
        #expect(contents(dir + "/backup.log").contains("INSECURE PLAINTEXT"))
        #expect(contents(dir + "/primary.log").contains("INSECURE PLAINTEXT"))
    }
}
