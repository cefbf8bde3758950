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


/// A connected TCP socket with TCP_NODELAY and large buffers. Reads and writes block (the
/// caller's thread is dedicated); connecting is bounded by a deadline.
public final class TCPChannel: ByteChannel {
    private let descriptor: OwnedDescriptor
    public let peer: String

    init(_ descriptor: consuming OwnedDescriptor, peer: String) {
        let fd = descriptor.raw
        self.descriptor = descriptor
        self.peer = peer
        setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1)
        setOption(fd, SOL_SOCKET, SO_SNDBUF, 8 << 20)
        setOption(fd, SOL_SOCKET, SO_RCVBUF, 8 << 20)
    }

    /// Takes ownership of a connected stream socket (e.g. one end of a socketpair in a test).
    public convenience init(adopting fd: Int32, peer: String) {
        self.init(OwnedDescriptor(adopting: fd), peer: peer)
    }

    /// The descriptor, for poll; owned by the channel.
    public var fd: Int32 { descriptor.raw }

    /// Connects to `endpoint`, trying each address it resolves to, without blocking past
    /// `deadline`: a host that drops SYNs costs the deadline, not the kernel's two minutes.
    /// Throws ETIMEDOUT ("no answer within N ms") when the deadline passes first.
    public static func connect(to endpoint: Endpoint, deadline: Deadline) throws(SystemError) -> TCPChannel {
        var lastError = SystemError(call: "connect(\(endpoint))", errno: .noRouteToHost, detail: "no address to try")
        for address in try resolve(endpoint, passive: false) {
            let socket = OwnedDescriptor(adopting: try syscall("socket(\(endpoint))") {
                Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            })
            let fd = socket.raw
            do throws(SystemError) {
                try finishConnect(fd, to: address, endpoint: endpoint, deadline: deadline)
            } catch {
                if error.isTimeout { throw error }
                lastError = error
                continue
            }
            // Back to blocking mode: the channel's reads and writes block on their own thread.
            let channel = TCPChannel(socket, peer: endpoint.description)
            channel.setNonBlocking(false)
            return channel
        }
        throw lastError
    }

    private static func finishConnect(_ fd: Int32, to address: ResolvedAddress, endpoint: Endpoint, deadline: Deadline) throws(SystemError) {
        let call = "connect(\(endpoint))"
        let started = try withUnsafeBytes(of: address.storage) { (raw) throws(SystemError) in
            try syscallOrWouldBlock(call) { Glibc.connect(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), address.length) }
        }
        if case .done = started { return }
        guard try waitReady(fd, events: Int16(POLLOUT), until: deadline, call: call) else {
            throw SystemError(call: call, errno: .timedOut, detail: "no answer within \(deadline.budgetMs) ms")
        }
        var soError: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        try syscall("getsockopt(SO_ERROR)") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &length) }
        if soError != 0 { throw SystemError(call: call, errno: soError) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try syscall("read(\(peer))") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// Switches the descriptor between blocking and non-blocking mode (a TLS channel drives it
    /// non-blocking so a reader and a writer can share one TLS session).
    public func setNonBlocking(_ on: Bool) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~Int32(O_NONBLOCK))
    }

    /// Waits until a read would not block (data, end of input or an error) or the deadline
    /// passes; false at the deadline.
    public func waitReadable(until deadline: Deadline) throws(SystemError) -> Bool {
        try waitReady(fd, events: Int16(POLLIN), until: deadline, call: "read(\(peer))")
    }

    /// Bounds each blocking write to `nanoseconds` (SO_SNDTIMEO; at least 1 µs, as 0 means none).
    public func setSendTimeout(nanoseconds: UInt64) {
        let bounded = max(nanoseconds, 1_000)
        var tv = timeval(tv_sec: Int(bounded / 1_000_000_000), tv_usec: Int(bounded % 1_000_000_000 / 1_000))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    public func write(segments: UnsafeMutableBufferPointer<iovec>) throws {
        var index = 0
        while index < segments.count {
            let batch = min(segments.count - index, 1024)  // IOV_MAX
            let base = segments.baseAddress! + index
            let written = try syscall("writev(\(peer))") { Glibc.writev(fd, base, Int32(batch)) }
            skipWritten(written, in: segments, from: &index)
        }
    }

    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    public func shutdownWrite() { _ = Glibc.shutdown(fd, Int32(SHUT_WR)) }
}

/// After a writev wrote `written` bytes of `segments` starting at `index`: moves `index` past the
/// segments written whole (and empty ones), and adjusts a partly written segment in place.
public func skipWritten(_ written: Int, in segments: UnsafeMutableBufferPointer<iovec>, from index: inout Int) {
    var written = written
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

/// A listening TCP socket.
public final class TCPListener: Sendable {
    private let descriptor: OwnedDescriptor
    /// The port actually bound (useful with port 0).
    public let port: UInt16
    public let endpoint: Endpoint

    public init(endpoint: Endpoint, backlog: Int32 = 16) throws(SystemError) {
        guard let address = try resolve(endpoint, passive: true).first else {
            throw SystemError(call: "getaddrinfo(\(endpoint))", errno: .addressNotAvailable)
        }
        let socket = OwnedDescriptor(adopting: try syscall("socket(\(endpoint))") {
            Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
        let fd = socket.raw
        setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
        _ = try withUnsafeBytes(of: address.storage) { (raw) throws(SystemError) in
            try syscall("bind(\(endpoint))") { bind(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), address.length) }
        }
        try syscall("listen(\(endpoint))") { listen(fd, backlog) }
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
        descriptor = socket
    }

    /// Waits for the next connection. A failure that passes (`isTransient`) leaves the listener
    /// usable; any other means it was shut down or broke.
    public func accept() throws(SystemError) -> TCPChannel {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let fd = descriptor.raw
        let client = try withUnsafeMutablePointer(to: &storage) { (p) throws(SystemError) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws(SystemError) in
                try syscall("accept(\(endpoint))") { Glibc.accept(fd, sa, &length) }
            }
        }
        _ = fcntl(client, F_SETFD, FD_CLOEXEC)  // accept4 is hidden behind _GNU_SOURCE
        return TCPChannel(OwnedDescriptor(adopting: client), peer: describe(storage))
    }

    /// Whether an accept failure passes with time: out of descriptors (EMFILE, ENFILE), of
    /// buffers or memory, or a connection that was reset before we took it (ECONNABORTED,
    /// EPROTO). The listener keeps working; the caller backs off and accepts again.
    public static func isTransient(_ error: SystemError) -> Bool {
        switch error.errno.rawValue {
        case EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED, EPROTO, EPERM: true
        default: false
        }
    }

    /// Makes a blocked `accept` fail so its thread can end.
    public func shutdown() { _ = Glibc.shutdown(descriptor.raw, Int32(SHUT_RDWR)) }
}

private func setOption(_ fd: Int32, _ level: Int32, _ option: Int32, _ value: Int32) {
    var value = value
    setsockopt(fd, level, option, &value, socklen_t(MemoryLayout<Int32>.size))
}

private struct ResolvedAddress {
    var family: Int32
    var storage: sockaddr_storage
    var length: socklen_t
}

/// getaddrinfo for one endpoint. (A name, not a numeric address, may wait on DNS: remusd's
/// peers are normally given as addresses.)
private func resolve(_ endpoint: Endpoint, passive: Bool) throws(SystemError) -> [ResolvedAddress] {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = (passive ? AI_PASSIVE : 0) | AI_NUMERICSERV
    var list: UnsafeMutablePointer<addrinfo>?
    let rc = getaddrinfo(endpoint.host, String(endpoint.port), &hints, &list)
    guard rc == 0 else {
        throw SystemError(call: "getaddrinfo(\(endpoint.host))", errno: .noRouteToHost, detail: String(cString: gai_strerror(rc)))
    }
    defer { freeaddrinfo(list) }
    var out: [ResolvedAddress] = []
    var node = list
    while let n = node {
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { dst in
            // SAFETY: ai_addr points at ai_addrlen bytes (at most sizeof(sockaddr_storage)) owned by the list.
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
