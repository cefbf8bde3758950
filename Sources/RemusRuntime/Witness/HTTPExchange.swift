import Glibc

/// Why one HTTP request got no usable response.
enum HTTPExchangeError: Error, Equatable {
    /// No TCP connection (resolution failed, refused, unreachable); the text names the call.
    case unreachable(String)
    /// The connection or the response did not complete before the deadline.
    case timedOut
    /// The peer broke the connection after it was made.
    case connectionFailed(String)
    /// The peer answered, but not with an HTTP/1.1 response we can read.
    case malformed(HTTPParseError)
}

/// One request, one connection ("Connection: close"), bounded by `timeoutMs` from start to end:
/// a witness must learn within a known time that it could not reach etcd, so neither the
/// connect nor any read may block without limit. The bytes travel over a `TCPChannel`.
func httpExchange(
    endpoint: Endpoint, method: String, path: String, body: [UInt8], timeoutMs: Int
) throws(HTTPExchangeError) -> HTTPResponse {
    let deadline = SystemClock().monotonicNs() + UInt64(max(timeoutMs, 1)) * 1_000_000
    let (channel, fd) = try connect(endpoint, deadline: deadline)
    defer { channel.shutdown() }

    var request = "\(method) \(path) HTTP/1.1\r\nHost: \(endpoint)\r\n"
    if method == "POST" { request += "Content-Type: application/json\r\n" }
    request += "Content-Length: \(body.count)\r\nConnection: close\r\n\r\n"
    do {
        // The request is a few hundred bytes: it fits in the empty send buffer of a fresh socket,
        // and SO_SNDTIMEO bounds the write should it not.
        setTimeout(fd, SO_SNDTIMEO, remainingNs(until: deadline))
        try channel.write(Array(request.utf8) + body)
    } catch {
        throw .connectionFailed("sending the request to \(endpoint): \(error)")
    }

    var parser = HTTPResponseParser()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 << 10, alignment: 1)
    defer { buffer.deallocate() }
    while true {
        try waitReadable(fd, deadline: deadline)
        let count: Int
        do { count = try channel.read(into: buffer) } catch {
            throw .connectionFailed("reading the response from \(endpoint): \(error)")
        }
        do {
            if count == 0 { return try parser.finish() }
            if let response = try parser.feed(UnsafeRawBufferPointer(rebasing: buffer[0..<count])) { return response }
        } catch {
            throw .malformed(error)
        }
    }
}

private func remainingNs(until deadline: UInt64) -> UInt64 {
    let now = SystemClock().monotonicNs()
    return deadline > now ? deadline - now : 0
}

private func setTimeout(_ fd: Int32, _ option: Int32, _ ns: UInt64) {
    let bounded = max(ns, 1_000)  // 0 would mean "no timeout"
    var tv = timeval(tv_sec: Int(bounded / 1_000_000_000), tv_usec: Int(bounded % 1_000_000_000 / 1_000))
    setsockopt(fd, SOL_SOCKET, option, &tv, socklen_t(MemoryLayout<timeval>.size))
}

/// Waits until `fd` has data or end of input, or throws `.timedOut` at the deadline.
private func waitReadable(_ fd: Int32, deadline: UInt64) throws(HTTPExchangeError) {
    while true {
        let remaining = remainingNs(until: deadline)
        guard remaining > 0 else { throw .timedOut }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ms = Int32(min((remaining + 999_999) / 1_000_000, UInt64(Int32.max)))
        let ready: Int32
        do { ready = try syscall("poll") { poll(&pfd, 1, ms) } } catch {
            throw .connectionFailed(error.description)
        }
        if ready > 0 { return }  // readable, hung up or in error: the read reports which
    }
}

/// Connects without blocking past `deadline`, then hands the socket, back in blocking mode, to a
/// `TCPChannel`. Returns the channel and its descriptor (owned by the channel; for poll only).
private func connect(_ endpoint: Endpoint, deadline: UInt64) throws(HTTPExchangeError) -> (TCPChannel, Int32) {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = AI_NUMERICSERV
    var list: UnsafeMutablePointer<addrinfo>?
    let rc = getaddrinfo(endpoint.host, String(endpoint.port), &hints, &list)
    guard rc == 0 else {
        throw .unreachable("getaddrinfo(\(endpoint.host)): \(String(cString: gai_strerror(rc)))")
    }
    defer { freeaddrinfo(list) }

    var lastFailure = HTTPExchangeError.unreachable("connect(\(endpoint)): no address")
    var node = list
    while let address = node?.pointee {
        node = address.ai_next
        let fd: Int32
        do {
            fd = try syscall("socket") {
                socket(address.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            }
        } catch {
            lastFailure = .unreachable(error.description)
            continue
        }
        do {
            try finishConnect(fd, address, endpoint: endpoint, deadline: deadline)
        } catch {
            Glibc.close(fd)
            if error == .timedOut { throw error }
            lastFailure = error
            continue
        }
        // Back to blocking mode: TCPChannel's reads and writes expect it; poll bounds the waits.
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags & ~Int32(O_NONBLOCK))
        return (TCPChannel(fd: fd, peer: endpoint.description), fd)
    }
    throw lastFailure
}

private func finishConnect(_ fd: Int32, _ address: addrinfo, endpoint: Endpoint, deadline: UInt64) throws(HTTPExchangeError) {
    // SAFETY: ai_addr points at ai_addrlen bytes owned by the addrinfo list, alive until freeaddrinfo.
    let rc = Glibc.connect(fd, address.ai_addr, address.ai_addrlen)
    if rc == 0 { return }
    let code = errno
    guard code == EINPROGRESS || code == EINTR else {
        throw .unreachable(SystemError(call: "connect(\(endpoint))", errno: code).description)
    }
    while true {
        let remaining = remainingNs(until: deadline)
        guard remaining > 0 else { throw .timedOut }
        var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        let ms = Int32(min((remaining + 999_999) / 1_000_000, UInt64(Int32.max)))
        let ready: Int32
        do { ready = try syscall("poll") { poll(&pfd, 1, ms) } } catch {
            throw .unreachable(error.description)
        }
        if ready > 0 { break }
    }
    var soError: Int32 = 0
    var length = socklen_t(MemoryLayout<Int32>.size)
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &length)
    guard soError == 0 else {
        throw .unreachable(SystemError(call: "connect(\(endpoint))", errno: soError).description)
    }
}
