import Glibc
import RemusCore
import RemusNetbuf
import RemusSim

// The simulated guest's NIC sinks: where the daemons deliver released packets (a tap, an
// observer over TCP, or nowhere), and the datagram format of the tap path.

/// What a tap-backed simulated NIC sends in each UDP datagram: the sending process's pid (u64,
/// little-endian), then one 32-byte `SimPacket`. 40 bytes. The daemons encode it; the drill's
/// observer decodes it.
package struct SimNICDatagram: Sendable, Equatable {
    package static let size = 8 + SimPacket.wireSize

    /// The sending process.
    package var pid: UInt64
    package var packet: SimPacket

    package init(pid: UInt64, packet: SimPacket) {
        self.pid = pid
        self.packet = packet
    }

    /// Writes pid and packet into the first 40 bytes of `buffer` (no allocation).
    package static func encode(pid: UInt64, packet: SimPacket, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= size, "datagram buffer of \(buffer.count) bytes, need \(size)")
        // SAFETY: at least 40 bytes (checked above); storeBytes on a raw buffer needs no alignment.
        buffer.storeBytes(of: pid.littleEndian, toByteOffset: 0, as: UInt64.self)
        packet.encode(into: UnsafeMutableRawBufferPointer(rebasing: buffer[8..<size]))
    }

    /// Exactly 40 bytes whose packet part is a valid `SimPacket`, else nil.
    package static func decode(_ bytes: UnsafeRawBufferPointer) -> SimNICDatagram? {
        guard bytes.count == size, let packet = SimPacket(wire: UnsafeRawBufferPointer(rebasing: bytes[8..<size])) else { return nil }
        // SAFETY: 40 bytes (checked above); an unaligned load works on any buffer.
        return SimNICDatagram(pid: UInt64(littleEndian: bytes.loadUnaligned(as: UInt64.self)), packet: packet)
    }

    package static func decode(_ bytes: [UInt8]) -> SimNICDatagram? { bytes.withUnsafeBytes { decode($0) } }
}

/// Sends released packets into a tap (`--sim-nic-tap`) as complete Ethernet + IPv4 + UDP frames,
/// from the "guest" (the tap's address + 1, a fixed locally administered MAC) to the tap's own
/// address and MAC at `port`, each carrying one `SimNICDatagram`. Written into the tap, they are
/// the tap's ingress, exactly like a Xen vif's guest traffic: a plug on the tap holds them.
final class TapPacketSink: PacketSink, @unchecked Sendable {  // frame buffer and counters guarded by monitor
    /// The guest's MAC address: locally administered, "RMUS".
    static let guestMAC: [UInt8] = [0x02, 0x52, 0x4D, 0x55, 0x53, 0x00]
    /// The guest's UDP source port.
    static let sourcePort: UInt16 = 7790

    let device: TapDevice
    let addressing: UDPFrameAddressing
    private let pid = UInt64(getpid())
    private let monitor = MonitorLock()
    private var frame = [UInt8](repeating: 0, count: UDPFrame.headerSize + SimNICDatagram.size)
    private var payload = [UInt8](repeating: 0, count: SimNICDatagram.size)
    private var identification: UInt16 = 0
    private var failures = 0

    init(device: TapDevice, port: UInt16) {
        self.device = device
        addressing = UDPFrameAddressing(
            destinationMAC: device.hardwareAddress, sourceMAC: Self.guestMAC,
            source: device.guestAddress, destination: device.address,
            sourcePort: Self.sourcePort, destinationPort: port)
    }

    func deliver(_ packets: [SimPacket]) {
        monitor.withLock {
            for packet in packets {
                identification &+= 1
                payload.withUnsafeMutableBytes { SimNICDatagram.encode(pid: pid, packet: packet, into: $0) }
                let length = frame.withUnsafeMutableBytes { out in
                    payload.withUnsafeBytes { UDPFrame.write(into: out, addressing: addressing, identification: identification, payload: $0) }
                }
                do {
                    try frame.withUnsafeBytes { try device.write(frame: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
                } catch {
                    // A lost frame is a lost packet (the verifier counts it as a gap), never a
                    // reason to stop the guest; say so at 1, 2, 4, 8, … failures.
                    failures += 1
                    if failures & (failures - 1) == 0 {
                        Log.warning("writing to the tap \(device.name) failed (\(failures) frame(s) lost so far): \(error)")
                    }
                }
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
                // Short: this runs on the output release path; an unreachable sink drops packets.
                guard let ch = try? TCPChannel.connect(to: endpoint, deadline: .after(milliseconds: 500)) else {
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
