import CNetlink
import Glibc
import RemusSystem

/// Small traffic tools for the testbed (`remusd netbuf probe-…`): numbered raw Ethernet frames of
/// any ethertype, a frame listener, and a TCP echo/round-trip pair. They exist because busybox
/// cannot send arbitrary ethertypes or time a TCP round trip; remusd's replication never uses them.
package enum NetbufProbe {
    /// Marks our frames: 8 bytes after the Ethernet header, followed by a big-endian UInt64 number.
    package static let magic: [UInt8] = Array("RMSDPRB1".utf8)

    /// Opens an AF_PACKET socket bound to `interface`, receiving every protocol.
    private static func packetSocket(interface: String) throws(SystemError) -> (fd: Int32, ifindex: Int32) {
        let ifindex = Int32(if_nametoindex(interface))
        guard ifindex > 0 else { throw SystemError(call: "if_nametoindex(\(interface))", errno: ENODEV) }
        let protocolAll = Int32(UInt16(ETH_P_ALL).bigEndian)
        let fd = try syscall("socket(AF_PACKET)") { socket(AF_PACKET, Int32(SOCK_RAW.rawValue), protocolAll) }
        var address = sockaddr_ll()
        address.sll_family = UInt16(AF_PACKET)
        address.sll_protocol = UInt16(ETH_P_ALL).bigEndian
        address.sll_ifindex = ifindex
        // SAFETY: sockaddr_ll is a plain C struct; bind reads `MemoryLayout<sockaddr_ll>.size` bytes.
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_ll>.size))
            }
        }
        if rc < 0 {
            let code = Glibc.errno
            close(fd)
            throw SystemError(call: "bind(AF_PACKET, \(interface))", errno: code)
        }
        return (fd, ifindex)
    }

    /// Sends `count` broadcast frames of `ethertype` numbered `first…`, each `size` bytes long
    /// (at least 60), out of `interface`.
    package static func sendFrames(interface: String, ethertype: UInt16, first: UInt64, count: UInt64, size: Int) throws(SystemError) {
        let (fd, _) = try packetSocket(interface: interface)
        defer { close(fd) }
        let length = max(size, 14 + magic.count + 8, 60)
        var frame = [UInt8](repeating: 0, count: length)
        for i in 0..<6 { frame[i] = 0xFF }
        // Locally administered source address, so bridges learn nothing that matters.
        frame[6...11] = [0x02, 0x52, 0x4D, 0x53, 0x00, 0x01]
        frame[12] = UInt8(ethertype >> 8)
        frame[13] = UInt8(ethertype & 0xFF)
        frame[14..<(14 + magic.count)] = magic[...]
        for number in first..<(first + count) {
            let sequenceStart = 14 + magic.count
            for byte in 0..<8 { frame[sequenceStart + byte] = UInt8(truncatingIfNeeded: number >> (56 - 8 * UInt64(byte))) }
            // SAFETY: send reads `count` bytes of the frame while the closure holds it.
            try syscall("send(frame \(number))") { frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) } }
        }
    }

    /// Prints one line per frame received on `interface` (not sent by it): `0x<ethertype> <number>`
    /// for our frames, `0x<ethertype> -` for others (ARP, IPv6, …). Runs until killed or after
    /// `limit` frames. `ready` runs once the socket is bound (frames from then on are seen).
    package static func listen(interface: String, limit: UInt64?, ready: () -> Void = {}, line: (String) -> Void) throws(SystemError) {
        let (fd, _) = try packetSocket(interface: interface)
        defer { close(fd) }
        ready()
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var seen: UInt64 = 0
        while limit.map({ seen < $0 }) ?? true {
            var from = sockaddr_ll()
            var fromLength = socklen_t(MemoryLayout<sockaddr_ll>.size)
            // SAFETY: the buffer and the address outlive the call; lengths are passed with them.
            let received = buffer.withUnsafeMutableBytes { bytes in
                withUnsafeMutablePointer(to: &from) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        recvfrom(fd, bytes.baseAddress, bytes.count, 0, $0, &fromLength)
                    }
                }
            }
            if received < 0 {
                if Glibc.errno == EINTR { continue }
                throw SystemError(call: "recvfrom(AF_PACKET)", errno: Glibc.errno)
            }
            if from.sll_pkttype == UInt8(PACKET_OUTGOING) || received < 14 { continue }
            let ethertype = UInt16(buffer[12]) << 8 | UInt16(buffer[13])
            let hex = String(ethertype, radix: 16)
            let paddedType = "0x" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
            var number = "-"
            let sequenceStart = 14 + magic.count
            if received >= sequenceStart + 8, Array(buffer[14..<sequenceStart]) == magic {
                var value: UInt64 = 0
                for byte in 0..<8 { value = value << 8 | UInt64(buffer[sequenceStart + byte]) }
                number = String(value)
            }
            line("\(paddedType) \(number)")
            seen += 1
        }
    }

    // MARK: TCP round trips

    /// Accepts connections on `port` (IPv4, any address) and echoes every byte back, one
    /// connection at a time, until killed.
    package static func tcpEcho(port: UInt16) throws(SystemError) -> Never {
        let listener = try syscall("socket(AF_INET)") { socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0) }
        var one: Int32 = 1
        _ = setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr = in_addr(s_addr: 0)
        // SAFETY: sockaddr_in is a plain C struct of the size passed.
        _ = try withUnsafePointer(to: &address) { pointer throws(SystemError) in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw throws(SystemError) in
                try syscall("bind(:\(port))") { bind(listener, raw, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        }
        _ = try syscall("listen") { Glibc.listen(listener, 4) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let connection = accept(listener, nil, nil)
            if connection < 0 { continue }
            _ = setsockopt(connection, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            while true {
                // SAFETY: recv and send stay within the buffer's bytes while the closures hold it.
                let count = buffer.withUnsafeMutableBytes { recv(connection, $0.baseAddress, $0.count, 0) }
                if count <= 0 { break }
                let sent = buffer.withUnsafeBytes { send(connection, $0.baseAddress, count, Int32(MSG_NOSIGNAL)) }
                if sent != count { break }
            }
            close(connection)
        }
    }

    /// Round-trip times of `count` 64-byte messages over one TCP connection, in microseconds.
    /// Between round trips it pauses `intervalMicroseconds`, or a uniformly random time up to
    /// that with `randomPause` (so requests do not phase-lock to periodic releases).
    package static func tcpRoundTrips(
        host: String, port: UInt16, count: Int, intervalMicroseconds: UInt32, randomPause: Bool = false
    ) throws(SystemError) -> [UInt64] {
        let fd = try syscall("socket(AF_INET)") { socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0) }
        defer { close(fd) }
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            throw SystemError(call: "inet_pton(\(host))", errno: EINVAL)
        }
        // SAFETY: sockaddr_in is a plain C struct of the size passed.
        _ = try withUnsafePointer(to: &address) { pointer throws(SystemError) in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw throws(SystemError) in
                try syscall("connect(\(host):\(port))") { connect(fd, raw, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        }
        var message = [UInt8](repeating: 0x5A, count: 64)
        var reply = [UInt8](repeating: 0, count: 64)
        var samples: [UInt64] = []
        samples.reserveCapacity(count)
        for round in 0..<count {
            message[0] = UInt8(truncatingIfNeeded: round)
            let start = monotonicNanoseconds()
            // SAFETY: send reads the message's bytes while the closure holds them.
            try syscall("send(round \(round))") { message.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
            var got = 0
            while got < reply.count {
                // SAFETY: recv writes at most `count - got` bytes after offset `got` of the reply.
                let n = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, $0.count - got, 0) }
                if n < 0 && Glibc.errno == EINTR { continue }
                if n <= 0 { throw SystemError(call: "recv(round \(round))", errno: n == 0 ? ECONNRESET : Glibc.errno) }
                got += n
            }
            samples.append((monotonicNanoseconds() - start) / 1_000)
            let pause = randomPause ? UInt32.random(in: 0...intervalMicroseconds) : intervalMicroseconds
            if pause > 0 { usleep(pause) }
        }
        return samples
    }
}

/// Percentiles of a sample (nearest rank), for the testbed's reports.
package struct SampleSummary: Sendable, CustomStringConvertible {
    package var count: Int
    package var minimum: UInt64
    package var median: UInt64
    package var p90: UInt64
    package var p99: UInt64
    package var maximum: UInt64
    package var mean: Double

    package init?(_ samples: [UInt64]) {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        // Nearest rank: the smallest sample with at least p of the samples at or below it.
        func rank(_ p: Double) -> UInt64 {
            let index = Int((p * Double(sorted.count)).rounded(.up)) - 1
            return sorted[min(max(index, 0), sorted.count - 1)]
        }
        count = sorted.count
        minimum = sorted[0]
        median = rank(0.5)
        p90 = rank(0.9)
        p99 = rank(0.99)
        maximum = sorted[sorted.count - 1]
        mean = Double(sorted.reduce(0, +)) / Double(sorted.count)
    }

    package var description: String {
        "n=\(count) min=\(minimum) median=\(median) mean=\(Int(mean.rounded())) p90=\(p90) p99=\(p99) max=\(maximum)"
    }
}
