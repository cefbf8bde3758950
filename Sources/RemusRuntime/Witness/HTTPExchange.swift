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
    let deadline = Deadline.after(milliseconds: max(timeoutMs, 1))
    let channel: TCPChannel
    do { channel = try TCPChannel.connect(to: endpoint, deadline: deadline) } catch {
        throw error.isTimeout ? .timedOut : .unreachable(error.description)
    }
    defer { channel.shutdown() }

    var request = "\(method) \(path) HTTP/1.1\r\nHost: \(endpoint)\r\n"
    if method == "POST" { request += "Content-Type: application/json\r\n" }
    request += "Content-Length: \(body.count)\r\nConnection: close\r\n\r\n"
    do {
        // The request is a few hundred bytes: it fits in the empty send buffer of a fresh socket,
        // and SO_SNDTIMEO bounds the write should it not.
        channel.setSendTimeout(nanoseconds: deadline.remainingNs)
        try channel.write(Array(request.utf8) + body)
    } catch {
        throw .connectionFailed("sending the request to \(endpoint): \(error)")
    }

    var parser = HTTPResponseParser()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 << 10, alignment: 1)
    defer { buffer.deallocate() }
    while true {
        // Readable, hung up or in error: the read reports which.
        let ready: Bool
        do { ready = try channel.waitReadable(until: deadline) } catch { throw .connectionFailed("\(error)") }
        guard ready else { throw .timedOut }
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
