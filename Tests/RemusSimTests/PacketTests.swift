import RemusCore
@testable import RemusSim
import Testing

@Suite("SimPacket wire form")
struct PacketTests {
    @Test func encodeDecodeRoundTrip() {
        let p = SimPacket(vcpu: 3, seq: 0x0102_0304_0506_0708, opCount: 42, digest: 0xFFEE_DDCC_BBAA_9988)
        let bytes = p.encode()
        #expect(bytes.count == 32)
        #expect(SimPacket(wire: bytes) == p)
    }

    @Test func wireLayoutIsLittleEndianAtFixedOffsets() {
        let bytes = SimPacket(vcpu: 0x0A0B_0C0D, seq: 1, opCount: 2, digest: 3).encode()
        #expect(bytes[0..<4].elementsEqual([0x0D, 0x0C, 0x0B, 0x0A]))
        #expect(bytes[4..<8].elementsEqual([0x53, 0x4D, 0x50, 0x31]))  // "SMP1"
        #expect(bytes[8] == 1 && bytes[16] == 2 && bytes[24] == 3)
        #expect(bytes[9..<16].allSatisfy { $0 == 0 })
    }

    @Test func garbageDoesNotDecode() {
        let good = SimPacket(vcpu: 1, seq: 2, opCount: 3, digest: 4).encode()
        #expect(SimPacket(wire: Array(good.dropLast())) == nil)
        #expect(SimPacket(wire: good + [0]) == nil)
        var badMarker = good
        badMarker[5] ^= 0xFF
        #expect(SimPacket(wire: badMarker) == nil)
        #expect(SimPacket(wire: [UInt8](repeating: 0, count: 32)) == nil)
    }

    @Test func guestPacketsAreDenseAndMatchTheReplay() throws {
        let config = smallConfig()
        let recorder = SimPacketRecorder()
        let nic = SimOutputBuffer(sink: recorder, holding: false)
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: nic, autoRun: false)
        guest.stepAll(ops: 5_000)
        let packets = recorder.received
        #expect(!packets.isEmpty)
        let replay = try SimReplay(config: config)
        replay.advance(to: [5_000, 5_000])
        for vcpu in 0..<2 {
            let mine = packets.filter { $0.vcpu == vcpu }
            #expect(mine.map(\.seq) == Array(0..<UInt64(mine.count)))
            for p in mine { #expect(replay.expectedPacket(vcpu: vcpu, seq: p.seq) == p) }
            #expect(try guest.registers()[vcpu].nicSeq == UInt64(mine.count))
        }
    }
}
