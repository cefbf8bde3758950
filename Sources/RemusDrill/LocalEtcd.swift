import Glibc
import RemusRuntime
import RemusTLS

/// An etcd member on loopback for the drill's witness.
final class LocalEtcd: @unchecked Sendable {  // immutable after init
    let clientEndpoint: Endpoint
    private let process: ChildProcess
    private let directory: String

    /// Starts etcd serving HTTPS with `tls` (its certificate must name 127.0.0.1), requiring
    /// client certificates signed by the same CA (`--client-cert-auth`), as a production witness
    /// should; waits until a lease can be granted over it.
    init(directory: String, tls: TLSFiles) throws {
        guard access("/usr/bin/etcd", X_OK) == 0 else {
            throw ProtocolError("the partition fault needs etcd for the witness: apt-get install etcd-server (scripts/setup.sh does)")
        }
        let ports = try freePorts(2)
        self.directory = directory
        clientEndpoint = Endpoint(host: "127.0.0.1", port: ports[0])
        let client = "https://127.0.0.1:\(ports[0])", peer = "http://127.0.0.1:\(ports[1])"
        process = try ChildProcess(
            arguments: ["/usr/bin/etcd", "--name", "drill", "--data-dir", directory + "/etcd",
                        "--listen-client-urls", client, "--advertise-client-urls", client,
                        "--cert-file", tls.certificate, "--key-file", tls.key, "--trusted-ca-file", tls.ca, "--client-cert-auth",
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", "drill=\(peer)", "--initial-cluster-state", "new"],
            outputFile: directory + "/etcd.log")
        // Ready when a lease can be granted through the gateway (the probe presents etcd's own
        // certificate, which is also a client certificate of the CA).
        let probe = try WitnessConfiguration(url: "etcd://\(clientEndpoint)/remus/drill-probe", ttlSeconds: 2, tls: tls).makeWitness()
        let deadline = SystemClock().monotonicNs() + 20_000_000_000
        while SystemClock().monotonicNs() < deadline {
            if (try? probe.acquire(owner: "probe", ttlSeconds: 2)) == true {
                try? probe.release()
                return
            }
            pauseBriefly(ms: 50)
        }
        process.signal(SIGKILL)
        throw ProtocolError("etcd did not start within 20 s; see \(directory)/etcd.log")
    }

    func stop() {
        process.signal(SIGKILL)
        process.wait()
    }
}
