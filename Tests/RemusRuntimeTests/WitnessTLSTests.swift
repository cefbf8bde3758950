import Foundation
@testable import RemusRuntime
import RemusTestSupport
import RemusTLS
import Testing

/// The witness over mutual TLS: etcd with `--client-cert-auth`, the way a production witness runs.
@Suite("The witness over mutual TLS", .serialized)
struct WitnessTLSTests {
    /// etcd serves the "backup" certificate (it names 127.0.0.1); clients present "primary".
    private func withTLSEtcd(_ body: (EtcdServer) throws -> Void) throws {
        guard let etcdPath else { return }
        let etcd = try EtcdServer(binary: etcdPath, tls: testCertificates.files(for: "backup"))
        defer { etcd.stop() }
        try body(etcd)
    }

    private func witness(_ url: String, files: TLSFiles = testCertificates.files(for: "primary"), timeoutMs: Int = 3000) throws -> EtcdWitness {
        try EtcdWitness(url: url, requestTimeoutMs: timeoutMs, tls: files)
    }

    @Test(.enabled(if: etcdPath != nil, Comment(rawValue: etcdMissing)))
    func aWitnessWithACertificateOfTheCAHoldsAndRenewsTheKey() throws {
        try withTLSEtcd { etcd in
            let a = try witness(etcd.url(key: "remus/tls1"))
            let b = try witness(etcd.url(key: "remus/tls1"))
            #expect(try a.acquire(owner: "primary:a:1", ttlSeconds: 2))
            let lease = try #require(a.lease)
            #expect(try a.renew().id == lease.id)
            #expect(try b.acquire(owner: "backup:b:2", ttlSeconds: 2) == false)
            #expect(try b.holder() == "primary:a:1")
        }
    }

    @Test(.enabled(if: etcdPath != nil, Comment(rawValue: etcdMissing)))
    func aCertificateOfAnotherCAGetsNoLeaseAndTheErrorSaysWhy() throws {
        let rogue = CertificateSet(directory: NSTemporaryDirectory() + "remusd-rogue-ca-\(getpid())")
        try rogue.make([.init(name: "primary")])
        defer { try? FileManager.default.removeItem(atPath: rogue.directory) }
        try withTLSEtcd { etcd in
            let intruder = try witness(etcd.url(key: "remus/tls2"), files: rogue.files(for: "primary"))
            #expect {
                try intruder.acquire(owner: "intruder", ttlSeconds: 2)
            } throws: { error in
                guard case .refused(_, _, let reason) = error as? WitnessError else { return false }
                return !reason.isEmpty && "\(error)".contains("TLS handshake") && "\(error)".contains("does not activate")
            }
            // The key stays free for the real holder.
            #expect(try witness(etcd.url(key: "remus/tls2")).acquire(owner: "primary:a:1", ttlSeconds: 2))
        }
    }

    @Test(.enabled(if: etcdPath != nil, Comment(rawValue: etcdMissing)))
    func anEtcdWhoseCertificateNamesAnotherHostIsRefused() throws {
        try withTLSEtcd { etcd in
            // "localhost" reaches the same etcd, but its certificate names only 127.0.0.1 and "backup".
            let misdirected = try witness("etcd://localhost:\(etcd.clientPort)/remus/tls3")
            #expect {
                try misdirected.acquire(owner: "primary:a:1", ttlSeconds: 2)
            } throws: { error in
                guard case .refused = error as? WitnessError else { return false }
                return true
            }
        }
    }

    @Test(.enabled(if: etcdPath != nil, Comment(rawValue: etcdMissing)))
    func plaintextToATLSEtcdGetsNoLease() throws {
        try withTLSEtcd { etcd in
            let plain = try EtcdWitness(url: etcd.url(key: "remus/tls4"), requestTimeoutMs: 3000)
            #expect(throws: WitnessError.self) { try plain.acquire(owner: "plain", ttlSeconds: 2) }
        }
    }

    @Test func aPeerThatNeverAnswersTheHandshakeTimesOutWithinTheRequestTimeout() throws {
        // Accepted by the kernel (backlog), never answered: the TLS handshake must end by itself.
        let silent = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        defer { silent.shutdown() }
        let w = try witness("etcd://127.0.0.1:\(silent.port)/remus/tls5", timeoutMs: 300)
        #expect {
            try w.acquire(owner: "primary:a:1", ttlSeconds: 2)
        } throws: { error in
            guard case .timedOut(_, _, let ms) = error as? WitnessError else { return false }
            return ms == 300
        }
    }

    @Test func theCommandLineChoosesTLSForTheWitnessUnlessPlaintextIsSpelledOut() throws {
        let dir = try freshRunDirectory("witness-cli")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0)).port  // closed again at once
        let listen = ["receive", "--listen", "127.0.0.1:\(port)"]
        // TLS replication, no witness files: the witness would use --tls-*; a plaintext witness
        // contradicting given witness files is refused.
        let (s1, o1) = try runRemusd(listen + tlsArguments("backup") + ["--witness", "etcd://127.0.0.1:1/k", "--witness-insecure-plaintext", "--witness-tls-ca", "/x"], runDir: dir)
        #expect(s1 != 0 && o1.contains("contradicts --witness-tls-ca"), "\(o1)")
        // Plaintext to a witness off loopback needs the network flag.
        let (s2, o2) = try runRemusd(listen + tlsArguments("backup") + ["--witness", "etcd://10.0.0.9:2379/k", "--witness-insecure-plaintext"], runDir: dir)
        #expect(s2 != 0 && o2.contains("not loopback") && o2.contains("forge"), "\(o2)")
        // --insecure-plaintext replication implies a plaintext witness, with the same loopback rule.
        let (s3, o3) = try runRemusd(listen + ["--insecure-plaintext", "--witness", "etcd://10.0.0.9:2379/k"], runDir: dir)
        #expect(s3 != 0 && o3.contains("not loopback"), "\(o3)")
        // Witness files without a witness.
        let (s4, o4) = try runRemusd(listen + tlsArguments("backup") + ["--witness-tls-cert", "/x"], runDir: dir)
        #expect(s4 != 0 && o4.contains("without --witness"), "\(o4)")
        // A witness file that cannot be read is named.
        let (s5, o5) = try runRemusd(listen + tlsArguments("backup") + ["--witness", "etcd://127.0.0.1:1/k", "--witness-tls-ca", "/nonexistent-ca.pem"], runDir: dir)
        #expect(s5 != 0 && o5.contains("--witness-tls-ca /nonexistent-ca.pem cannot be read"), "\(o5)")
    }
}
