import Glibc
import RemusCore
import RemusSim

/// The outside world of a drill: receives every packet a guest's NIC released, tagged with the
/// process that sent it. Each connection starts with the sender's pid (u64, little-endian), then
/// 32-byte `SimPacket`s.
final class PacketObserver: @unchecked Sendable {  // received packets guarded by monitor
    struct Observed: Sendable {
        var pid: UInt64
        var packet: SimPacket
    }

    let endpoint: Endpoint
    private let listener: TCPListener
    private let monitor = MonitorLock()
    private var received: [Observed] = []
    private var lastArrival: UInt64 = 0

    init() throws {
        listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        endpoint = listener.endpoint
        startThread(name: "observer") { [self] in
            while let ch = try? listener.accept() {
                startThread(name: "observer-conn") { [self] in read(ch) }
            }
        }
    }

    deinit { listener.shutdown() }

    private func read(_ ch: TCPChannel) {
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var pending: [UInt8] = []
        var pid: UInt64?
        while true {
            let n = (try? buffer.withUnsafeMutableBytes { try ch.read(into: $0) }) ?? 0
            if n <= 0 { return }
            pending += buffer[0..<n]
            var offset = 0
            if pid == nil {
                guard pending.count >= 8 else { continue }
                pid = pending.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
                offset = 8
            }
            var batch: [Observed] = []
            while pending.count - offset >= SimPacket.wireSize {
                let packet = pending.withUnsafeBytes { raw in
                    SimPacket(wire: UnsafeRawBufferPointer(rebasing: raw[offset..<offset + SimPacket.wireSize]))
                }
                if let packet { batch.append(Observed(pid: pid!, packet: packet)) }
                offset += SimPacket.wireSize
            }
            pending.removeFirst(offset)
            let now = SystemClock().monotonicNs()
            monitor.withLock {
                received += batch
                lastArrival = now
                monitor.broadcast()
            }
        }
    }

    /// Everything received so far, in arrival order per sender.
    func packets() -> [Observed] { monitor.withLock { received } }

    /// Waits until nothing has arrived for `ms` (bounded by 50 × ms).
    func settle(forMs ms: UInt64) {
        let clock = SystemClock()
        let hardDeadline = clock.monotonicNs() + 50 * ms * 1_000_000
        monitor.withLock {
            while true {
                let now = clock.monotonicNs()
                let quietUntil = lastArrival + ms * 1_000_000
                if now >= quietUntil || now >= hardDeadline { return }
                monitor.wait(untilMonotonic: min(quietUntil, hardDeadline))
            }
        }
    }
}

/// Sends released packets to an observer over TCP (the simulated guest's outside world).
final class TCPPacketSink: PacketSink, @unchecked Sendable {  // channel guarded by monitor
    private let monitor = MonitorLock()
    private var channel: TCPChannel?
    private let endpoint: Endpoint

    init(endpoint: Endpoint) {
        self.endpoint = endpoint
    }

    func deliver(_ packets: [SimPacket]) {
        monitor.withLock {
            if channel == nil {
                guard let ch = try? TCPChannel.connect(to: endpoint) else {
                    Log.warning("the NIC sink \(endpoint) is unreachable; \(packets.count) released packets were dropped")
                    return
                }
                var pid = UInt64(getpid()).littleEndian
                _ = try? withUnsafeBytes(of: &pid) { try ch.write($0) }
                channel = ch
            }
            var bytes: [UInt8] = []
            bytes.reserveCapacity(packets.count * SimPacket.wireSize)
            for p in packets { bytes += p.encode() }
            do { try channel?.write(bytes) } catch {
                Log.warning("writing to the NIC sink failed: \(error)")
                channel = nil
            }
        }
    }
}

/// Released packets go nowhere (no --nic-sink).
final class DiscardingPacketSink: PacketSink, @unchecked Sendable {  // stateless
    func deliver(_ packets: [SimPacket]) {}
}
