import Glibc
import RemusTLS

/// How the witness reaches etcd: mutual TLS (etcd's `--client-cert-auth`), or plain TCP for a lab.
public enum WitnessTransport: Sendable {
    /// Plain HTTP: anyone on the path can read or forge the lease (labs only).
    case plaintext
    /// HTTPS with our certificate; etcd's certificate must be signed by the context's CA and
    /// carry `expectedName` (the URL's host: a DNS name or an IP address).
    case tls(TLSContext, expectedName: String)

    /// "TLS" or "plaintext", for status lines and messages.
    public var name: String {
        switch self {
        case .plaintext: "plaintext"
        case .tls: "mutual TLS"
        }
    }
}

/// Why one HTTP request got no usable response.
enum HTTPExchangeError: Error, Equatable {
    /// No TCP connection (resolution failed, refused, unreachable); the text names the call.
    case unreachable(String)
    /// The connection or the response did not complete before the deadline.
    case timedOut
    /// The peer broke the connection after it was made.
    case connectionFailed(String)
    /// The TLS handshake failed: etcd's certificate was not acceptable, or etcd refused ours.
    case refused(String)
    /// The peer answered, but not with an HTTP/1.1 response we can read.
    case malformed(HTTPParseError)
}

/// One request, one connection ("Connection: close"), bounded by `timeoutMs` from start to end
/// (connect, TLS handshake, request and response): a witness must learn within a known time that
/// it could not reach etcd, so neither the connect nor any read may block without limit.
func httpExchange(
    endpoint: Endpoint, transport: WitnessTransport = .plaintext, method: String, path: String, body: [UInt8], timeoutMs: Int
) throws(HTTPExchangeError) -> HTTPResponse {
    let deadline = Deadline.after(milliseconds: max(timeoutMs, 1))
    let tcp: TCPChannel
    do { tcp = try TCPChannel.connect(to: endpoint, deadline: deadline) } catch {
        throw error.isTimeout ? .timedOut : .unreachable(error.description)
    }
    defer { tcp.shutdown() }
    let channel: any ByteChannel
    switch transport {
    case .plaintext:
        // The request is a few hundred bytes: it fits in the empty send buffer of a fresh
        // socket, and SO_SNDTIMEO bounds the write should it not.
        tcp.setSendTimeout(nanoseconds: deadline.remainingNs)
        channel = tcp
    case .tls(let context, let expectedName):
        do {
            let tls = try TLSChannel.connect(tcp, context: context, expectedName: expectedName, deadline: deadline, coalesceBytes: 0)
            tls.ioDeadline = deadline
            channel = tls
        } catch {
            throw error.kind == .timedOut ? .timedOut : .refused(error.detail)
        }
    }

    var request = "\(method) \(path) HTTP/1.1\r\nHost: \(endpoint)\r\n"
    if method == "POST" { request += "Content-Type: application/json\r\n" }
    request += "Content-Length: \(body.count)\r\nConnection: close\r\n\r\n"
    do {
        try channel.write(Array(request.utf8) + body)
    } catch {
        if (error as? SystemError)?.isTimeout == true { throw .timedOut }
        throw .connectionFailed("sending the request to \(endpoint): \(error)")
    }

    var parser = HTTPResponseParser()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 << 10, alignment: 1)
    defer { buffer.deallocate() }
    while true {
        let count: Int
        do {
            // Over TLS the channel's deadline bounds each wait; over TCP we wait here.
            // Readable, hung up or in error: the read reports which.
            if case .plaintext = transport, try !tcp.waitReadable(until: deadline) { throw HTTPExchangeError.timedOut }
            count = try channel.read(into: buffer)
        } catch let error as HTTPExchangeError {
            throw error
        } catch {
            if (error as? SystemError)?.isTimeout == true { throw .timedOut }
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
