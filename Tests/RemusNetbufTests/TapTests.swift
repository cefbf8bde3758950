import Glibc
import RemusCore
@testable import RemusNetbuf
import Testing
import RemusTestSupport

private let tapMAC: [UInt8] = [0x0A, 0x1B, 0x2C, 0x3D, 0x4E, 0x5F]
private let guestMAC: [UInt8] = [0x02, 0x52, 0x4D, 0x55, 0x53, 0x00]
private let addressing = UDPFrameAddressing(
    destinationMAC: tapMAC, sourceMAC: guestMAC, source: IPv4Address(10, 99, 3, 2), destination: IPv4Address(10, 99, 3, 1),
    sourcePort: 7790, destinationPort: 40_123)

/// RFC 1071 the slow way, as the oracle: one's-complement sum of big-endian 16-bit words.
private func naiveChecksum(_ bytes: [UInt8]) -> UInt16 {
    var sum = 0
    for i in stride(from: 0, to: bytes.count, by: 2) {
        sum += Int(bytes[i]) * 256 + (i + 1 < bytes.count ? Int(bytes[i + 1]) : 0)
        if sum > 0xFFFF { sum -= 0xFFFF }
    }
    return UInt16(0xFFFF - sum)
}

@Suite("Ethernet + IPv4 + UDP frames of the tap-backed simulated NIC")
struct UDPFrameTests {
    @Test("The header checksum matches a published example and a naive oracle")
    func checksumMatchesKnownValues() {
        // The worked example of en.wikipedia.org/wiki/Internet_checksum: 0xB861.
        let header: [UInt8] = [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11,
                               0x00, 0x00, 0xC0, 0xA8, 0x00, 0x01, 0xC0, 0xA8, 0x00, 0xC7]
        #expect(header.withUnsafeBytes { UDPFrame.ipv4HeaderChecksum($0) } == 0xB861)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var h = (0..<20).map { _ in UInt8.random(in: 0...255, using: &rng) }
            h[10] = 0
            h[11] = 0
            #expect(h.withUnsafeBytes { UDPFrame.ipv4HeaderChecksum($0) } == naiveChecksum(h), "header \(h)")
        }
    }

    @Test("Layout: MACs, ethertype, IPv4 header (length, DF, TTL, UDP, checksum), UDP header, payload")
    func layout() throws {
        let payload = (0..<40).map { UInt8($0 * 3 & 0xFF) }
        let frame = UDPFrame.make(addressing: addressing, identification: 0xBEEF, payload: payload)
        #expect(frame.count == 14 + 20 + 8 + 40)
        #expect(Array(frame[0..<6]) == tapMAC && Array(frame[6..<12]) == guestMAC)
        #expect(frame[12] == 0x08 && frame[13] == 0x00)
        let ip = Array(frame[14..<34])
        #expect(ip[0] == 0x45 && ip[1] == 0)
        #expect(ip[2] == 0 && ip[3] == 68, "IPv4 total length 20 + 8 + 40")
        #expect(ip[4] == 0xBE && ip[5] == 0xEF)
        #expect(ip[6] == 0x40 && ip[7] == 0, "DF, no fragment offset")
        #expect(ip[8] == 64 && ip[9] == 17)
        #expect(Array(ip[12..<16]) == [10, 99, 3, 2] && Array(ip[16..<20]) == [10, 99, 3, 1])
        #expect(naiveChecksum(ip) == 0, "a header with its checksum sums to 0xFFFF")
        var zeroed = ip
        zeroed[10] = 0
        zeroed[11] = 0
        #expect(UInt16(ip[10]) << 8 | UInt16(ip[11]) == naiveChecksum(zeroed))
        let udp = Array(frame[34..<42])
        #expect(udp == [0x1E, 0x6E, 0x9C, 0xBB, 0, 48, 0, 0], "ports 7790 → 40123, length 48, checksum 0 (none)")
        #expect(Array(frame[42...]) == payload)
    }

    @Test("A frame parses back to its addressing, identification and payload")
    func parsesBack() throws {
        for size in [0, 1, 40, 1000, UDPFrame.maxPayload] {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
            let frame = UDPFrame.make(addressing: addressing, identification: UInt16(size), payload: payload)
            let parsed = try UDPFrame.parse(frame)
            #expect(parsed == UDPFrame.Parsed(addressing: addressing, identification: UInt16(size), payload: payload))
        }
        // Ethernet padding after the packet is not payload.
        let padded = UDPFrame.make(addressing: addressing, identification: 1, payload: [9]) + [0, 0, 0, 0, 0]
        #expect(try UDPFrame.parse(padded).payload == [9])
    }

    @Test("Damaged frames are rejected with the reason")
    func damagedFramesAreRejected() throws {
        let good = UDPFrame.make(addressing: addressing, identification: 7, payload: Array(repeating: 0xAB, count: 40))
        func resum(_ f: inout [UInt8]) {
            f[24] = 0
            f[25] = 0
            let c = naiveChecksum(Array(f[14..<34]))
            f[24] = UInt8(c >> 8)
            f[25] = UInt8(c & 0xFF)
        }
        #expect(throws: UDPFrame.ParseError.truncated(length: 41)) { try UDPFrame.parse(Array(good[0..<41])) }
        var f = good
        f[12] = 0x86; f[13] = 0xDD
        #expect(throws: UDPFrame.ParseError.notIPv4(ethertype: 0x86DD)) { try UDPFrame.parse(f) }
        for offset in 14..<34 {
            f = good
            f[offset] ^= 0x10
            #expect(throws: UDPFrame.ParseError.self, "bit flip at \(offset)") { try UDPFrame.parse(f) }
        }
        f = good
        f[22] ^= 0x01  // TTL: only the checksum can tell
        let ttlError = #expect(throws: UDPFrame.ParseError.self) { try UDPFrame.parse(f) }
        if case .badChecksum = ttlError {} else { Issue.record("a changed TTL must fail the checksum, got \(String(describing: ttlError))") }
        f = good; f[23] = 6; resum(&f)
        #expect(throws: UDPFrame.ParseError.notUDP(protocol: 6)) { try UDPFrame.parse(f) }
        f = good; f[20] = 0x20; resum(&f)  // more fragments
        #expect(throws: UDPFrame.ParseError.fragmented) { try UDPFrame.parse(f) }
        f = good; f[17] = 69; resum(&f)  // IPv4 total length one too long
        #expect(throws: UDPFrame.ParseError.badLength(ip: 69, udp: 48, frame: 82)) { try UDPFrame.parse(f) }
        f = good; f[39] = 47
        #expect(throws: UDPFrame.ParseError.badLength(ip: 68, udp: 47, frame: 82)) { try UDPFrame.parse(f) }
    }

    @Test("IPv4 addresses parse and print as dotted quads")
    func addresses() {
        #expect(IPv4Address("10.99.3.1") == IPv4Address(10, 99, 3, 1))
        #expect(IPv4Address(10, 99, 3, 1).description == "10.99.3.1")
        #expect(IPv4Address(0x0A63_0301).value == IPv4Address(10, 99, 3, 1).value)
        for bad in ["10.99.3", "10.99.3.256", "a.b.c.d", "10..3.1", "1.2.3.4.5", "-1.2.3.4"] { #expect(IPv4Address(bad) == nil, "\(bad)") }
    }
}

@Suite("Attaching to a tap")
struct TapAttachTests {
    @Test("A missing tap is a clear error, and attaching does not create it")
    func missingTap() {
        let name = "rmsno\(getpid() % 100_000)"
        #expect(throws: TapError.notFound(name)) { try TapDevice(attaching: name) }
        #expect(if_nametoindex(name) == 0, "attaching must never create the tap")
        let message = TapError.notFound(name).description
        #expect(message.contains("does not exist") && message.contains("ip tuntap add mode tap \(name)"))
        #expect(throws: TapError.invalidName("a-name-longer-than-15")) { try TapDevice(attaching: "a-name-longer-than-15") }
        #expect(throws: TapError.invalidName("")) { try TapDevice(attaching: "") }
    }

    @Test("Interfaces that are not usable taps are refused with the reason",
          .enabled(if: Kernel.canBuildNamespaces, Kernel.namespaceSkipMessage), .enabled(if: Tap.available, Tap.skipMessage))
    func unusableTaps() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            try socket.addLink(name: "notatap", kind: "ifb")
            #expect(throws: TapError.notATap("notatap")) { try TapDevice(attaching: "notatap") }

            try TapAdministration.create("bare0")
            #expect(throws: TapError.noGuestAddress("bare0", detail: "has no IPv4 address")) { try TapDevice(attaching: "bare0") }

            try TapAdministration.create("host32")
            try TapAdministration.configure("host32", address: IPv4Address(10, 99, 7, 1), prefixLength: 32)
            #expect(throws: TapError.self) { try TapDevice(attaching: "host32") }

            try TapAdministration.create("edge0")
            try TapAdministration.configure("edge0", address: IPv4Address(10, 99, 8, 254), prefixLength: 24)
            let edge = #expect(throws: TapError.self) { try TapDevice(attaching: "edge0") }
            if case .noGuestAddress(_, let detail) = edge {
                #expect(detail.contains("10.99.8.255"), "the next address is the broadcast: \(detail)")
            } else {
                Issue.record("expected noGuestAddress, got \(String(describing: edge))")
            }

            try TapAdministration.create("down0")
            try TapAdministration.configure("down0", address: IPv4Address(10, 99, 9, 1), prefixLength: 24, up: false)
            #expect(throws: TapError.down("down0")) { try TapDevice(attaching: "down0") }

            try TapAdministration.create("good0")
            try TapAdministration.configure("good0", address: IPv4Address(10, 99, 4, 1), prefixLength: 24)
            let tap = try TapDevice(attaching: "good0")
            #expect(tap.address == IPv4Address(10, 99, 4, 1) && tap.guestAddress == IPv4Address(10, 99, 4, 2))
            #expect(tap.netmask == IPv4Address(255, 255, 255, 0))
            #expect(tap.hardwareAddress.count == 6 && tap.hardwareAddress != [0, 0, 0, 0, 0, 0])
            #expect(throws: TapError.busy("good0")) { try TapDevice(attaching: "good0") }
            _ = tap
        }
    }

    @Test("Frames written into a tap arrive as the tap's ingress: a UDP socket on its address receives them intact",
          .enabled(if: Kernel.canBuildNamespaces, Kernel.namespaceSkipMessage), .enabled(if: Tap.available, Tap.skipMessage))
    func framesReachTheHost() throws {
        try inThrowawayNetns {
            let tap = try makeTap("rt0", IPv4Address(10, 99, 5, 1))
            let receiver = try UDPReceiver()
            let a = UDPFrameAddressing(destinationMAC: tap.hardwareAddress, sourceMAC: guestMAC, source: tap.guestAddress,
                                       destination: tap.address, sourcePort: 7790, destinationPort: receiver.port)
            for i in 0..<50 {
                let frame = UDPFrame.make(addressing: a, identification: UInt16(i), payload: [UInt8(i)] + Array(repeating: 0x5A, count: 39))
                try frame.withUnsafeBytes { try tap.write(frame: $0) }
            }
            var got: [(payload: [UInt8], from: IPv4Address, port: UInt16)] = []
            #expect(eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { got += receiver.drain(); return got.count == 50 }, "received \(got.count) of 50")
            #expect(got.map(\.payload[0]) == (0..<50).map { UInt8($0) }, "every datagram once, in order")
            #expect(got.allSatisfy { $0.from == tap.guestAddress && $0.port == 7790 && $0.payload.count == 40 })

            // A damaged header checksum: the kernel drops the frame (so the checksum above was right).
            var bad = UDPFrame.make(addressing: a, identification: 99, payload: Array(repeating: 1, count: 40))
            bad[25] ^= 0xFF
            try bad.withUnsafeBytes { try tap.write(frame: $0) }
            let marker = UDPFrame.make(addressing: a, identification: 100, payload: Array(repeating: 2, count: 40))
            try marker.withUnsafeBytes { try tap.write(frame: $0) }
            var after: [(payload: [UInt8], from: IPv4Address, port: UInt16)] = []
            #expect(eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { after += receiver.drain(); return !after.isEmpty })
            #expect(after.map(\.payload[0]) == [2], "the frame with the bad checksum never arrived")
        }
    }
}

/// The plug on a tap: the simulated NIC's path in the drill. Runs where the kernel has sch_plug.
@Suite("A tap's frames held by a real plug qdisc",
       .enabled(if: Kernel.canBuildNamespaces, Kernel.namespaceSkipMessage),
       .enabled(if: Tap.available, Tap.skipMessage),
       .enabled(if: Kernel.hasPlug, Kernel.plugSkipMessage))
struct TapPlugTests {
    @Test("Frames written into a tap wait in its plug until their epoch is released, then arrive in order")
    func heldUntilReleased() throws {
        try inThrowawayNetns {
            let tap = try makeTap("rt1", IPv4Address(10, 99, 6, 1))
            let receiver = try UDPReceiver()
            let buffer = try PlugOutputBuffer(interfaces: [tap.name], limitBytes: 1_000_000)
            try buffer.releaseAll()
            try buffer.hold()
            let a = UDPFrameAddressing(destinationMAC: tap.hardwareAddress, sourceMAC: guestMAC, source: tap.guestAddress,
                                       destination: tap.address, sourcePort: 7790, destinationPort: receiver.port)
            func send(_ range: Range<Int>) throws {
                for i in range {
                    let frame = UDPFrame.make(addressing: a, identification: UInt16(i), payload: [UInt8(i)] + Array(repeating: 0, count: 39))
                    try frame.withUnsafeBytes { try tap.write(frame: $0) }
                }
            }
            var got: [UInt8] = []
            func drain() { got += receiver.drain().map(\.payload[0]) }
            try send(0..<5)
            #expect(try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try buffer.statistics().heldPackets == 5 })
            drain()
            #expect(got.isEmpty, "nothing leaves while the kernel reports 5 held: \(got)")
            try buffer.closeEpoch(1)
            try send(5..<8)
            #expect(try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try buffer.statistics().heldPackets == 8 })
            try buffer.release(through: 1)
            #expect(eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { drain(); return got.count >= 5 })
            #expect(try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try buffer.statistics().heldPackets == 3 })
            drain()
            #expect(got == [0, 1, 2, 3, 4], "exactly epoch 1")
            try buffer.closeEpoch(2)
            try buffer.release(through: 2)
            #expect(eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { drain(); return got.count == 8 })
            #expect(got == (0..<8).map { UInt8($0) })
            try buffer.teardown()
        }
    }
}

/// Whether this machine has /dev/net/tun (module tun).
enum Tap {
    static let available = access("/dev/net/tun", R_OK | W_OK) == 0
    static let skipMessage: Comment = "no /dev/net/tun here (modprobe tun)"
}

/// A persistent tap with `address`/24, up, attached.
private func makeTap(_ name: String, _ address: IPv4Address) throws -> TapDevice {
    try TapAdministration.create(name)
    try TapAdministration.configure(name, address: address, prefixLength: 24)
    return try TapDevice(attaching: name)
}

/// A UDP socket on 0.0.0.0 (an ephemeral port) of the calling thread's namespace.
private final class UDPReceiver {
    let fd: Int32
    let port: UInt16

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw TapError.system(.last("socket")) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        var length = socklen_t(Swift.MemoryLayout<sockaddr_in>.size)
        // SAFETY: sockaddr_in is a plain C struct of `length` bytes.
        let rc = withUnsafeMutablePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(fd, sa, length) == 0 ? getsockname(fd, sa, &length) : -1
            }
        }
        guard rc == 0 else {
            close(fd)
            throw TapError.system(.last("bind/getsockname"))
        }
        self.fd = fd
        port = UInt16(bigEndian: address.sin_port)
    }

    deinit { close(fd) }

    /// Every datagram queued now (without waiting): payload, source address and port.
    func drain() -> [(payload: [UInt8], from: IPv4Address, port: UInt16)] {
        var out: [(payload: [UInt8], from: IPv4Address, port: UInt16)] = []
        var buffer = [UInt8](repeating: 0, count: 2048)
        while true {
            var from = sockaddr_in()
            var length = socklen_t(Swift.MemoryLayout<sockaddr_in>.size)
            // SAFETY: recvfrom writes at most `length` bytes of address and buffer.count bytes of data.
            let n = buffer.withUnsafeMutableBytes { b in
                withUnsafeMutablePointer(to: &from) { p in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, b.baseAddress, b.count, Int32(MSG_DONTWAIT), $0, &length) }
                }
            }
            if n < 0 { return out }
            out.append((Array(buffer[0..<n]), IPv4Address(UInt32(bigEndian: from.sin_addr.s_addr)), UInt16(bigEndian: from.sin_port)))
        }
    }
}
