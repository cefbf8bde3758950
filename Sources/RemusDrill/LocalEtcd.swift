import Glibc
import RemusRuntime

/// An etcd member on loopback for the drill's witness.
final class LocalEtcd: @unchecked Sendable {  // immutable after init
    let clientEndpoint: Endpoint
    private let process: ChildProcess
    private let directory: String

    init(directory: String) throws {
        guard access("/usr/bin/etcd", X_OK) == 0 else {
            throw ProtocolError("the partition fault needs etcd for the witness: apt-get install etcd-server (scripts/setup.sh does)")
        }
        let ports = try freePorts(2)
        self.directory = directory
        clientEndpoint = Endpoint(host: "127.0.0.1", port: ports[0])
        let client = "http://127.0.0.1:\(ports[0])", peer = "http://127.0.0.1:\(ports[1])"
        process = try ChildProcess(
            arguments: ["/usr/bin/etcd", "--name", "drill", "--data-dir", directory + "/etcd",
                        "--listen-client-urls", client, "--advertise-client-urls", client,
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", "drill=\(peer)", "--initial-cluster-state", "new"],
            outputFile: directory + "/etcd.log")
        // Ready when a lease can be granted through the gateway.
        let probe = try EtcdWitness(url: "etcd://\(clientEndpoint)/remus/drill-probe")
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
