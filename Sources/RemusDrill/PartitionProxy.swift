import Glibc
import RemusRuntime

/// A TCP relay the drill can cut without closing anything: while cut, nothing crosses in either
/// direction and new connections wait, as in a network partition (both ends see only silence).
final class PartitionProxy: @unchecked Sendable {  // `isCut` guarded by monitor; sockets owned by their pump threads
    let endpoint: Endpoint
    private let listener: TCPListener
    private let target: Endpoint
    private let monitor = MonitorLock()
    private var isCut = false

    init(to target: Endpoint) throws {
        self.target = target
        listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        endpoint = listener.endpoint
        startThread(name: "proxy") { [self] in
            while let client = try? listener.accept() {
                startThread(name: "proxy-conn") { [self] in relay(client) }
            }
        }
    }

    deinit { listener.shutdown() }

    func cut() { monitor.withLock { isCut = true } }

    func heal() {
        monitor.withLock {
            isCut = false
            monitor.broadcast()
        }
    }

    private func waitWhileCut() {
        monitor.withLock { while isCut { monitor.wait(untilMonotonic: nil) } }
    }

    private func relay(_ client: TCPChannel) {
        waitWhileCut()
        guard let server = try? TCPChannel.connect(to: target, deadline: .after(milliseconds: 2000)) else { client.shutdown(); return }
        let pumpDone = Gate<Bool>()
        startThread(name: "proxy-pump") { [self] in
            pump(from: server, to: client)
            pumpDone.open(with: true)
        }
        pump(from: client, to: server)
        _ = pumpDone.wait()
    }

    private func pump(from source: TCPChannel, to destination: TCPChannel) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = (try? buffer.withUnsafeMutableBytes { try source.read(into: $0) }) ?? 0
            if n <= 0 { break }
            waitWhileCut()  // bytes read while cut are held, not delivered, until healed
            let ok = (try? buffer.withUnsafeBytes { try destination.write(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) != nil
            if !ok { break }
        }
        source.shutdown()
        destination.shutdown()
    }
}
