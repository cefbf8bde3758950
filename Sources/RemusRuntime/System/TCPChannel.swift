import Glibc

/// The byte path between primary and backup. One interface, so an authenticated, encrypted
/// channel (mutual TLS) can replace plain TCP later without touching the loop.
public protocol ByteChannel: AnyObject, Sendable {
    /// Reads up to `buffer.count` bytes; 0 means the peer closed the connection.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Writes every byte of every segment, in order. `segments` may be modified (partial writes).
    func write(segments: UnsafeMutableBufferPointer<iovec>) throws
    /// Stops both directions: a blocked `read` returns 0, later writes fail.
    func shutdown()
    /// Ends our direction (FIN after everything written) and keeps reading: a clean goodbye that
    /// lets the peer read the last records before it closes its side.
    func shutdownWrite()
    /// "host:port" of the peer, for messages.
    var peer: String { get }
}

extension ByteChannel {
    /// Writes one contiguous buffer.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        try withUnsafeMutablePointer(to: &iov) { (p) throws in
            try write(segments: UnsafeMutableBufferPointer(start: p, count: 1))
        }
    }

    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { (b) throws in try write(b) }
    }
}

/// An endpoint "host:port" ("[v6]:port" for IPv6).
public struct Endpoint: Equatable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) { self.host = host; self.port = port }

    /// Parses "host", "host:port" or "[v6addr]:port"; `defaultPort` when none is given.
    public init?(parsing text: String, defaultPort: UInt16) {
        var host = Substring(text)
        var port = defaultPort
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return nil }
            let rest = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if !rest.isEmpty {
                guard rest.hasPrefix(":"), let p = UInt16(rest.dropFirst()) else { return nil }
                port = p
            }
        } else if let colon = host.lastIndex(of: ":"), host.firstIndex(of: ":") == colon {
            guard let p = UInt16(host[host.index(after: colon)...]) else { return nil }
            port = p
            host = host[..<colon]
        }
        guard !host.isEmpty else { return nil }
        self.host = String(host)
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// A connected TCP socket with TCP_NODELAY and large buffers.
public final class TCPChannel: ByteChannel {
    private let fd: Int32
    public let peer: String

    init(fd: Int32, peer: String) {
        self.fd = fd
        self.peer = peer
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var size: Int32 = 8 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { Glibc.close(fd) }

    /// Connects to `endpoint`, trying each address it resolves to.
    public static func connect(to endpoint: Endpoint) throws -> TCPChannel {
        var lastError = SystemError(call: "connect(\(endpoint))", errno: EHOSTUNREACH)
        for address in try resolve(endpoint, passive: false) {
            let fd = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { lastError = SystemError(call: "socket", errno: errno); continue }
            let rc = withUnsafeBytes(of: address.storage) { raw in
                Glibc.connect(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), address.length)
            }
            if rc == 0 { return TCPChannel(fd: fd, peer: endpoint.description) }
            lastError = SystemError(call: "connect(\(endpoint))", errno: errno)
            Glibc.close(fd)
        }
        throw lastError
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try syscall("read(\(peer))") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    public func write(segments: UnsafeMutableBufferPointer<iovec>) throws {
        var index = 0
        while index < segments.count {
            let batch = min(segments.count - index, 1024)  // IOV_MAX
            let base = segments.baseAddress! + index
            var written = try syscall("writev(\(peer))") { Glibc.writev(fd, base, Int32(batch)) }
            // Skip what was written; adjust a partly written segment in place.
            while written > 0 && index < segments.count {
                let len = segments[index].iov_len
                if written >= len {
                    written -= len
                    index += 1
                } else {
                    segments[index].iov_base = segments[index].iov_base! + written
                    segments[index].iov_len = len - written
                    written = 0
                }
            }
            while index < segments.count && segments[index].iov_len == 0 { index += 1 }
        }
    }

    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    public func shutdownWrite() { _ = Glibc.shutdown(fd, Int32(SHUT_WR)) }
}

/// A listening TCP socket.
public final class TCPListener: @unchecked Sendable {  // fd is immutable; accept/shutdown are thread-safe syscalls
    private let fd: Int32
    /// The port actually bound (useful with port 0).
    public let port: UInt16
    public let endpoint: Endpoint

    public init(endpoint: Endpoint) throws {
        guard let address = try resolve(endpoint, passive: true).first else {
            throw SystemError(call: "getaddrinfo(\(endpoint))", errno: EADDRNOTAVAIL)
        }
        fd = try syscall("socket") { socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let fd = self.fd
        do {
            try withUnsafeBytes(of: address.storage) { (raw) throws in
                try syscall("bind(\(endpoint))") { bind(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), address.length) }
            }
            try syscall("listen(\(endpoint))") { listen(fd, 16) }
        } catch {
            Glibc.close(fd)
            throw error
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
        }
        let bound = withUnsafeBytes(of: storage) { raw -> UInt16 in
            // sin_port and sin6_port sit at the same offset, in network order.
            UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        }
        port = bound
        self.endpoint = Endpoint(host: endpoint.host, port: bound)
    }

    deinit { Glibc.close(fd) }

    /// Waits for the next connection.
    public func accept() throws -> TCPChannel {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let fd = self.fd
        let client = try withUnsafeMutablePointer(to: &storage) { (p) throws in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws in
                try syscall("accept(\(endpoint))") { Glibc.accept(fd, sa, &length) }
            }
        }
        _ = fcntl(client, F_SETFD, FD_CLOEXEC)
        return TCPChannel(fd: client, peer: describe(storage))
    }

    /// Makes a blocked `accept` fail so its thread can end.
    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
}

private struct ResolvedAddress {
    var family: Int32
    var storage: sockaddr_storage
    var length: socklen_t
}

private func resolve(_ endpoint: Endpoint, passive: Bool) throws -> [ResolvedAddress] {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = passive ? AI_PASSIVE : 0
    var list: UnsafeMutablePointer<addrinfo>?
    let rc = getaddrinfo(endpoint.host, String(endpoint.port), &hints, &list)
    guard rc == 0 else {
        throw SystemError(call: "getaddrinfo(\(endpoint.host)): \(String(cString: gai_strerror(rc)))", errno: EHOSTUNREACH)
    }
    defer { freeaddrinfo(list) }
    var out: [ResolvedAddress] = []
    var node = list
    while let n = node {
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { dst in
            dst.copyMemory(from: UnsafeRawBufferPointer(start: n.pointee.ai_addr, count: Int(n.pointee.ai_addrlen)))
        }
        out.append(ResolvedAddress(family: n.pointee.ai_family, storage: storage, length: n.pointee.ai_addrlen))
        node = n.pointee.ai_next
    }
    return out
}

private func describe(_ storage: sockaddr_storage) -> String {
    var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
    var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
    var s = storage
    let rc = withUnsafePointer(to: &s) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            getnameinfo($0, socklen_t(MemoryLayout<sockaddr_storage>.size), &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV)
        }
    }
    guard rc == 0 else { return "?" }
    return "\(String(cString: host)):\(String(cString: serv))"
}
