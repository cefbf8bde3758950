/// An IPv4 address, host byte order inside.
public struct IPv4Address: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The address as a host-order integer (10.99.0.1 is 0x0A63_0001).
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        value = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// Parses dotted-quad text ("10.99.0.1").
    public init?(_ text: String) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for part in parts {
            guard part.count <= 3, part.allSatisfy({ $0.isASCII && $0.isNumber }), let octet = UInt8(part) else { return nil }
            v = v << 8 | UInt32(octet)
        }
        value = v
    }

    public var description: String { "\(value >> 24).\(value >> 16 & 0xFF).\(value >> 8 & 0xFF).\(value & 0xFF)" }
}

/// Who sends a UDP frame to whom: the Ethernet, IPv4 and UDP addresses of a frame.
public struct UDPFrameAddressing: Equatable, Sendable {
    public var destinationMAC: [UInt8]
    public var sourceMAC: [UInt8]
    public var source: IPv4Address
    public var destination: IPv4Address
    public var sourcePort: UInt16
    public var destinationPort: UInt16

    public init(destinationMAC: [UInt8], sourceMAC: [UInt8], source: IPv4Address, destination: IPv4Address, sourcePort: UInt16, destinationPort: UInt16) {
        precondition(destinationMAC.count == 6 && sourceMAC.count == 6, "MAC addresses have 6 bytes")
        self.destinationMAC = destinationMAC
        self.sourceMAC = sourceMAC
        self.source = source
        self.destination = destination
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
    }
}

/// A complete Ethernet II + IPv4 + UDP frame, as a guest NIC would send it: what the simulated
/// guest writes into its tap (see `TapDevice`).
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 6 | destination MAC |
/// | 6 | 6 | source MAC |
/// | 12 | 2 | ethertype 0x0800 |
/// | 14 | 20 | IPv4 header: version 4, IHL 5, total length, identification, DF, TTL 64, protocol 17, header checksum |
/// | 34 | 8 | UDP header: ports, length, checksum 0 (none, allowed for IPv4 by RFC 768) |
/// | 42 | n | payload |
///
/// Multi-byte fields are big-endian (network order).
public enum UDPFrame {
    /// Bytes before the payload: Ethernet 14, IPv4 20, UDP 8.
    public static let headerSize = 42
    /// Largest payload that keeps the IPv4 packet within a 1500-byte MTU.
    public static let maxPayload = 1500 - 28
    static let ipv4Offset = 14
    static let udpOffset = 34

    /// Writes a frame carrying `payload` into `buffer` (at least `headerSize + payload.count`
    /// bytes) and returns its length. Allocates nothing.
    @discardableResult
    public static func write(
        into buffer: UnsafeMutableRawBufferPointer, addressing a: UDPFrameAddressing, identification: UInt16,
        payload: UnsafeRawBufferPointer
    ) -> Int {
        precondition(payload.count <= maxPayload, "UDP payload of \(payload.count) bytes, at most \(maxPayload)")
        let length = headerSize + payload.count
        precondition(buffer.count >= length, "frame buffer of \(buffer.count) bytes, need \(length)")
        // SAFETY: the buffer holds `length` bytes (checked above); storeBytes on a raw buffer needs no alignment.
        for i in 0..<6 {
            buffer[i] = a.destinationMAC[i]
            buffer[6 + i] = a.sourceMAC[i]
        }
        buffer.storeBytes(of: UInt16(0x0800).bigEndian, toByteOffset: 12, as: UInt16.self)
        let ip = ipv4Offset
        buffer[ip] = 0x45
        buffer[ip + 1] = 0
        buffer.storeBytes(of: UInt16(20 + 8 + payload.count).bigEndian, toByteOffset: ip + 2, as: UInt16.self)
        buffer.storeBytes(of: identification.bigEndian, toByteOffset: ip + 4, as: UInt16.self)
        buffer.storeBytes(of: UInt16(0x4000).bigEndian, toByteOffset: ip + 6, as: UInt16.self)  // DF, offset 0
        buffer[ip + 8] = 64
        buffer[ip + 9] = 17
        buffer.storeBytes(of: UInt16(0), toByteOffset: ip + 10, as: UInt16.self)
        buffer.storeBytes(of: a.source.value.bigEndian, toByteOffset: ip + 12, as: UInt32.self)
        buffer.storeBytes(of: a.destination.value.bigEndian, toByteOffset: ip + 16, as: UInt32.self)
        let checksum = ipv4HeaderChecksum(UnsafeRawBufferPointer(rebasing: buffer[ip..<ip + 20]))
        buffer.storeBytes(of: checksum.bigEndian, toByteOffset: ip + 10, as: UInt16.self)
        let udp = udpOffset
        buffer.storeBytes(of: a.sourcePort.bigEndian, toByteOffset: udp, as: UInt16.self)
        buffer.storeBytes(of: a.destinationPort.bigEndian, toByteOffset: udp + 2, as: UInt16.self)
        buffer.storeBytes(of: UInt16(8 + payload.count).bigEndian, toByteOffset: udp + 4, as: UInt16.self)
        buffer.storeBytes(of: UInt16(0), toByteOffset: udp + 6, as: UInt16.self)
        if let base = payload.baseAddress, !payload.isEmpty {
            (buffer.baseAddress! + headerSize).copyMemory(from: base, byteCount: payload.count)
        }
        return length
    }

    /// A frame carrying `payload`, as a new array.
    public static func make(addressing: UDPFrameAddressing, identification: UInt16, payload: [UInt8]) -> [UInt8] {
        var frame = [UInt8](repeating: 0, count: headerSize + payload.count)
        frame.withUnsafeMutableBytes { buffer in
            _ = payload.withUnsafeBytes { write(into: buffer, addressing: addressing, identification: identification, payload: $0) }
        }
        return frame
    }

    /// The Internet checksum (RFC 1071) of an IPv4 header whose checksum field is zero; over a
    /// header with its checksum filled in, a correct header gives 0.
    public static func ipv4HeaderChecksum(_ header: UnsafeRawBufferPointer) -> UInt16 {
        var sum: UInt32 = 0
        var i = 0
        while i + 1 < header.count {
            sum += UInt32(header[i]) << 8 | UInt32(header[i + 1])
            i += 2
        }
        if i < header.count { sum += UInt32(header[i]) << 8 }
        while sum > 0xFFFF { sum = (sum & 0xFFFF) + (sum >> 16) }
        return ~UInt16(sum)
    }

    /// A frame read back: its addressing and payload.
    public struct Parsed: Equatable, Sendable {
        public var addressing: UDPFrameAddressing
        public var identification: UInt16
        public var payload: [UInt8]
    }

    /// Why a frame is not a well-formed Ethernet + IPv4 + UDP frame.
    public enum ParseError: Error, Equatable, Sendable, CustomStringConvertible {
        case truncated(length: Int)
        case notIPv4(ethertype: UInt16)
        case unsupportedHeader(versionAndLength: UInt8)
        case badChecksum(UInt16)
        case fragmented
        case notUDP(protocol: UInt8)
        case badLength(ip: Int, udp: Int, frame: Int)

        public var description: String {
            switch self {
            case .truncated(let n): return "frame of \(n) bytes is shorter than the \(UDPFrame.headerSize)-byte headers"
            case .notIPv4(let t): return "ethertype 0x\(String(t, radix: 16)) is not IPv4"
            case .unsupportedHeader(let v): return "IPv4 version/IHL byte 0x\(String(v, radix: 16)) (expected 0x45: no options)"
            case .badChecksum(let c): return "IPv4 header checksum does not verify (sum 0x\(String(c, radix: 16)))"
            case .fragmented: return "IPv4 fragment"
            case .notUDP(let p): return "IP protocol \(p) is not UDP"
            case .badLength(let ip, let udp, let frame): return "lengths disagree: IPv4 total \(ip), UDP \(udp), frame \(frame)"
            }
        }
    }

    /// Reads a frame back, checking the ethertype, the IPv4 header (no options, checksum, not a
    /// fragment), the protocol and every length.
    public static func parse(_ frame: [UInt8]) throws(ParseError) -> Parsed {
        guard frame.count >= headerSize else { throw .truncated(length: frame.count) }
        func u16(_ at: Int) -> UInt16 { UInt16(frame[at]) << 8 | UInt16(frame[at + 1]) }
        func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) << 16 | UInt32(u16(at + 2)) }
        guard u16(12) == 0x0800 else { throw .notIPv4(ethertype: u16(12)) }
        let ip = ipv4Offset
        guard frame[ip] == 0x45 else { throw .unsupportedHeader(versionAndLength: frame[ip]) }
        let sum = frame.withUnsafeBytes { ipv4HeaderChecksum(UnsafeRawBufferPointer(rebasing: $0[ip..<ip + 20])) }
        guard sum == 0 else { throw .badChecksum(sum) }
        guard u16(ip + 6) & 0x3FFF == 0 else { throw .fragmented }
        guard frame[ip + 9] == 17 else { throw .notUDP(protocol: frame[ip + 9]) }
        let total = Int(u16(ip + 2))
        let udpLength = Int(u16(udpOffset + 4))
        // Ethernet pads short frames to 60 bytes, so the frame may be longer than the packet.
        guard udpLength >= 8, total == 20 + udpLength, ip + total <= frame.count else {
            throw .badLength(ip: total, udp: udpLength, frame: frame.count)
        }
        let addressing = UDPFrameAddressing(
            destinationMAC: Array(frame[0..<6]), sourceMAC: Array(frame[6..<12]),
            source: IPv4Address(u32(ip + 12)), destination: IPv4Address(u32(ip + 16)),
            sourcePort: u16(udpOffset), destinationPort: u16(udpOffset + 2))
        return Parsed(addressing: addressing, identification: u16(ip + 4),
                      payload: Array(frame[headerSize..<ip + total]))
    }
}
