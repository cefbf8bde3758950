import COpenSSL
import Glibc
import RemusSystem

/// Mutual TLS 1.3 over a connected TCP socket, as a `ByteChannel`: the shipper and the backup
/// read and write it exactly as they do plain TCP.
///
/// One reader thread and one writer thread use a channel at once (the backup's reader and its
/// ACK writer, the primary's shipper and its ACK reader). An OpenSSL session is not safe for
/// concurrent calls, so the socket is non-blocking, every SSL call runs under `session`, and a
/// call that would block releases the lock and polls.
///
/// Writes of many segments (a page batch is one per page) are coalesced into 16 KiB, one full
/// TLS record, before SSL_write: per-segment SSL_write would make a record and a syscall per
/// 4 KiB page (see Docs/benchmarks.md). Where the kernel took over the record layer for sending
/// (kTLS), segments go out by writev straight from the caller's memory, as over plain TCP.
///
/// The session lock is fair (first come, first served): with a plain mutex a writer streaming a
/// checkpoint re-takes the lock before a woken reader runs, and the reader misses the peer's
/// heartbeats (seen under load as "backup stopped answering" in the middle of a sync).
///
/// `@unchecked Sendable`: the SSL session is guarded by `session`, the coalescing buffer by `writer`.
public final class TLSChannel: ByteChannel, @unchecked Sendable {
    /// Whether the kernel encrypts (send) and decrypts (receive) this connection's records.
    public struct KernelTLS: Sendable, Equatable, CustomStringConvertible {
        public var send: Bool
        public var receive: Bool
        public var description: String {
            switch (send, receive) {
            case (true, true): "kTLS (send and receive)"
            case (true, false): "kTLS (send only)"
            case (false, true): "kTLS (receive only)"
            case (false, false): "userspace TLS"
            }
        }
    }

    /// A full TLS record's plaintext: what one coalesced SSL_write carries.
    public static let recordBytes = 16 << 10

    private let tcp: TCPChannel
    private let ssl: OpaquePointer
    private let context: TLSContext
    private let session = TicketLock()
    private let writer = MonitorLock()
    private let coalesceBytes: Int
    private let coalesce: UnsafeMutableRawPointer
    public var peer: String { tcp.peer }
    /// The peer certificate's subject CN (set by the handshake, before the channel is shared).
    public private(set) var peerIdentity = "?"
    /// Whether the kernel took over the record layer (set by the handshake).
    public private(set) var kernelTLS = KernelTLS(send: false, receive: false)
    /// When set, every wait of a read or write ends there with ETIMEDOUT: for a request and its
    /// response that must finish in a known time (the witness's etcd requests). Set it before the
    /// channel is shared; a streaming channel leaves it nil and is ended by `shutdown`.
    public var ioDeadline: Deadline?

    private init(tcp: TCPChannel, ssl: OpaquePointer, context: TLSContext, coalesceBytes: Int) {
        self.tcp = tcp
        self.ssl = ssl
        self.context = context
        self.coalesceBytes = coalesceBytes
        coalesce = .allocate(byteCount: max(coalesceBytes, 1), alignment: 16)
    }

    deinit {
        SSL_free(ssl)
        coalesce.deallocate()
    }

    // MARK: - Handshakes

    /// The server side (the backup): waits for the client's first bytes, refuses anything but a
    /// TLS handshake, verifies the client's certificate against the CA and, when `allowedPeers`
    /// is not empty, its identity (a DNS name in its subjectAltName, or its subject CN when it
    /// has none) against that list. Everything happens before `deadline`; on any failure the
    /// connection is closed and nothing was read past the handshake.
    /// - Parameter plaintextSignature: the first bytes of the protocol spoken without TLS, so a
    ///   peer that forgot TLS is named as such.
    public static func accept(
        _ tcp: TCPChannel, context: TLSContext, allowedPeers: [String], plaintextSignature: [UInt8],
        deadline: Deadline, coalesceBytes: Int = recordBytes
    ) throws(TLSError) -> TLSChannel {
        precondition(context.side == .server, "accept needs a server context")
        tcp.setNonBlocking(true)
        do throws(TLSError) {
            try expectClientHello(tcp, plaintextSignature: plaintextSignature, deadline: deadline)
            let ssl = try newSession(tcp, context: context)
            if let first = allowedPeers.first {
                let param = SSL_get0_param(ssl)
                _ = X509_VERIFY_PARAM_set1_host(param, first, 0)
                for name in allowedPeers.dropFirst() { _ = X509_VERIFY_PARAM_add1_host(param, name, 0) }
            }
            let channel = TLSChannel(tcp: tcp, ssl: ssl, context: context, coalesceBytes: coalesceBytes)
            try channel.handshake(deadline: deadline, step: SSL_accept)
            return channel
        } catch {
            tcp.shutdown()
            throw error
        }
    }

    /// The client side (the primary): verifies the server's certificate against the CA and its
    /// identity against `expectedName` (a host name, checked against the certificate's DNS names
    /// or CN, or an IP address, checked against its IP addresses), presenting our own.
    public static func connect(
        _ tcp: TCPChannel, context: TLSContext, expectedName: String, deadline: Deadline,
        coalesceBytes: Int = recordBytes
    ) throws(TLSError) -> TLSChannel {
        precondition(context.side == .client, "connect needs a client context")
        tcp.setNonBlocking(true)
        do throws(TLSError) {
            let ssl = try newSession(tcp, context: context)
            if isIPAddress(expectedName) {
                _ = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), expectedName)
            } else {
                _ = SSL_set1_host(ssl, expectedName)
            }
            let channel = TLSChannel(tcp: tcp, ssl: ssl, context: context, coalesceBytes: coalesceBytes)
            try channel.handshake(deadline: deadline, step: SSL_connect)
            return channel
        } catch {
            tcp.shutdown()
            throw error
        }
    }

    private static func newSession(_ tcp: TCPChannel, context: TLSContext) throws(TLSError) -> OpaquePointer {
        ERR_clear_error()
        guard let ssl = SSL_new(context.handle) else {
            throw TLSError(.configuration, "OpenSSL could not start a session: \(TLSError.drainQueue())")
        }
        guard SSL_set_fd(ssl, tcp.fd) == 1 else {
            SSL_free(ssl)
            throw TLSError(.configuration, "OpenSSL could not take the socket: \(TLSError.drainQueue())")
        }
        return ssl
    }

    /// A TLS connection starts with a handshake record (content type 22). Anything else is
    /// refused before OpenSSL sees it, with a name for what it was.
    private static func expectClientHello(_ tcp: TCPChannel, plaintextSignature: [UInt8], deadline: Deadline) throws(TLSError) {
        let peer = tcp.peer
        var first = [UInt8](repeating: 0, count: 8)
        while true {
            let ready: Bool
            do { ready = try waitReady(tcp.fd, events: Int16(POLLIN), until: deadline, call: "read(\(peer))") } catch {
                throw TLSError(.closed, "\(peer): \(error) before its TLS handshake")
            }
            guard ready else {
                throw TLSError(.timedOut, "\(peer) sent no TLS handshake within \(deadline.budgetMs) ms (a stalled peer, or a primary running with --insecure-plaintext, which waits for our stream header)")
            }
            let n = recv(tcp.fd, &first, first.count, Int32(MSG_PEEK))
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 { throw TLSError(.closed, "\(peer) closed the connection before its TLS handshake") }
            let seen = Array(first[0..<n])
            if seen[0] == 22 { return }
            if !plaintextSignature.isEmpty && plaintextSignature.starts(with: seen.prefix(plaintextSignature.count)) {
                throw TLSError(.plaintextClient, "\(peer) speaks the replication stream without TLS (a primary running with --insecure-plaintext?); give it --tls-cert, --tls-key and --tls-ca")
            }
            let hex = seen.map { String($0, radix: 16).leftPadded(to: 2) }.joined(separator: " ")
            throw TLSError(.notTLS, "\(peer) did not start a TLS handshake (first bytes: \(hex))")
        }
    }

    /// Drives the handshake step until it completes, fails, or `deadline` passes.
    private func handshake(deadline: Deadline, step: (OpaquePointer?) -> Int32) throws(TLSError) {
        while true {
            ERR_clear_error()
            let rc = step(ssl)
            if rc == 1 {
                peerIdentity = Self.identity(ssl)
                kernelTLS = KernelTLS(send: remus_bio_ktls_send(SSL_get_wbio(ssl)) == 1, receive: remus_bio_ktls_recv(SSL_get_rbio(ssl)) == 1)
                return
            }
            let code = SSL_get_error(ssl, rc)
            let savedErrno = errno
            let events: Int16
            switch code {
            case SSL_ERROR_WANT_READ: events = Int16(POLLIN)
            case SSL_ERROR_WANT_WRITE: events = Int16(POLLOUT)
            default: throw failure(code, errno: savedErrno, during: "the TLS handshake")
            }
            let ready: Bool
            do { ready = try waitReady(tcp.fd, events: events, until: deadline, call: "TLS handshake with \(peer)") } catch {
                throw TLSError(.closed, "\(error)")
            }
            guard ready else {
                throw TLSError(.timedOut, "\(peer) did not finish the TLS handshake within \(deadline.budgetMs) ms")
            }
        }
    }

    /// One failed SSL call as a `TLSError`, named by what the verification, the error queue or
    /// the socket says.
    private func failure(_ code: Int32, errno savedErrno: Int32, during what: String) -> TLSError {
        let verify = SSL_get_verify_result(ssl)
        let reason = TLSError.peekReason()
        let queue = TLSError.drainQueue()
        if verify != X509_V_OK { return TLSError.verification(verify, peer: peer) }
        if reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE {
            return TLSError(.noCertificate, "\(peer) presented no certificate; a primary needs --tls-cert and --tls-key")
        }
        if reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256 {
            return TLSError(.refusedByPeer, "\(peer) refused us during \(what) (\(queue)): \(Self.alertAdvice(reason - SSL_AD_REASON_OFFSET))")
        }
        if reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG {
            return TLSError(.notTLS, "\(peer) does not speak TLS (\(queue)); is it running with --insecure-plaintext?")
        }
        if code == SSL_ERROR_SYSCALL || code == SSL_ERROR_ZERO_RETURN {
            let cause = savedErrno != 0 ? String(cString: strerror(savedErrno)) : "end of input"
            return TLSError(.closed, "\(peer) closed the connection during \(what) (\(cause))")
        }
        return TLSError(.protocolFailure, "\(what) with \(peer) failed: \(queue.isEmpty ? "OpenSSL error \(code)" : queue)")
    }

    /// What an alert from the peer most likely means for us (RFC 8446 §6.2 numbers).
    private static func alertAdvice(_ alert: Int32) -> String {
        switch alert {
        case 48: "it does not trust the CA that signed our certificate; both sides need the same --tls-ca"
        case 45: "it finds our certificate expired; make a new one"
        case 42, 43: "it does not accept our certificate (not yet valid, or wrong use); check the clocks and the certificate"
        case 116: "it wants a certificate and we sent none"
        case 49: "it does not accept our identity; it serves only the primaries in its --tls-allow-peer list"
        case 40, 46: "it rejected our certificate (an identity it does not serve, or a certificate it cannot check); see its log"
        default: "see its log for why"
        }
    }

    private static func identity(_ ssl: OpaquePointer) -> String {
        guard let cert = SSL_get1_peer_certificate(ssl) else { return "?" }
        defer { X509_free(cert) }
        var buffer = [CChar](repeating: 0, count: 256)
        let n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, &buffer, Int32(buffer.count))
        guard n > 0 else { return "?" }
        return String(decoding: buffer.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: - ByteChannel

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        while true {
            var got = 0
            let (code, savedErrno) = call { SSL_read_ex(ssl, buffer.baseAddress, buffer.count, &got) }
            switch code {
            case SSL_ERROR_NONE: return got
            case SSL_ERROR_ZERO_RETURN: return 0
            case SSL_ERROR_WANT_READ: try waitFor(Int16(POLLIN))
            case SSL_ERROR_WANT_WRITE: try waitFor(Int16(POLLOUT))
            case SSL_ERROR_SYSCALL where savedErrno == 0: return 0
            case SSL_ERROR_SYSCALL: throw SystemError(call: "read(\(peer))", errno: savedErrno)
            default: throw session.withLock { failure(code, errno: savedErrno, during: "reading") }
            }
        }
    }

    public func write(segments: UnsafeMutableBufferPointer<iovec>) throws {
        try writer.withLock {
            if kernelTLS.send {
                try writeSegmentsToKernel(segments)
                return
            }
            var fill = 0
            for segment in segments {
                guard var p = segment.iov_base.map(UnsafeRawPointer.init) else { continue }
                var left = segment.iov_len
                while left > 0 {
                    if fill == 0 && left >= max(coalesceBytes, 1) {
                        // A whole record or more: encrypt straight from the caller's memory.
                        try sslWrite(p, left)
                        p += left
                        left = 0
                        continue
                    }
                    let n = min(left, coalesceBytes - fill)
                    (coalesce + fill).copyMemory(from: p, byteCount: n)
                    fill += n
                    p += n
                    left -= n
                    if fill == coalesceBytes {
                        try sslWrite(UnsafeRawPointer(coalesce), fill)
                        fill = 0
                    }
                }
            }
            if fill > 0 { try sslWrite(UnsafeRawPointer(coalesce), fill) }
        }
    }

    /// One SSL_write of `count` bytes, retried while the socket is full.
    private func sslWrite(_ bytes: UnsafeRawPointer, _ count: Int) throws {
        while true {
            var written = 0
            let (code, savedErrno) = call { SSL_write_ex(ssl, bytes, count, &written) }
            switch code {
            case SSL_ERROR_NONE: return
            case SSL_ERROR_WANT_WRITE: try waitFor(Int16(POLLOUT))
            case SSL_ERROR_WANT_READ: try waitFor(Int16(POLLIN))
            case SSL_ERROR_SYSCALL: throw SystemError(call: "write(\(peer))", errno: savedErrno == 0 ? EPIPE : savedErrno)
            default: throw session.withLock { failure(code, errno: savedErrno, during: "writing") }
            }
        }
    }

    /// With kTLS for sending, plaintext written to the socket leaves as TLS records: writev
    /// straight from the segments, as over plain TCP.
    private func writeSegmentsToKernel(_ segments: UnsafeMutableBufferPointer<iovec>) throws {
        var index = 0
        while index < segments.count {
            let batch = min(segments.count - index, 1024)  // IOV_MAX
            let base = segments.baseAddress! + index
            let result = try session.withLock { () throws(SystemError) in
                try syscallOrWouldBlock("writev(\(peer))") { Glibc.writev(tcp.fd, base, Int32(batch)) }
            }
            guard case .done(let written) = result else {
                try waitFor(Int16(POLLOUT))
                continue
            }
            skipWritten(written, in: segments, from: &index)
        }
    }

    /// Runs one SSL call under the session lock; returns SSL_get_error's code (SSL_ERROR_NONE on
    /// success) and errno as they were right after it.
    private func call(_ body: () -> Int32) -> (Int32, Int32) {
        session.withLock {
            ERR_clear_error()
            errno = 0
            let rc = body()
            if rc == 1 { return (SSL_ERROR_NONE, 0) }
            return (SSL_get_error(ssl, rc), errno)
        }
    }

    /// Waits, without the session lock, until the socket is ready; shutdown wakes it (hang-up
    /// counts as ready, and the next call reports the end).
    private func waitFor(_ events: Int16) throws {
        if let ioDeadline {
            guard try waitReady(tcp.fd, events: events, until: ioDeadline, call: "poll(\(peer))") else {
                throw SystemError(call: "TLS I/O with \(peer)", errno: ETIMEDOUT)
            }
            return
        }
        var entry = pollfd(fd: tcp.fd, events: events, revents: 0)
        _ = try syscall("poll(\(peer))") { poll(&entry, 1, -1) }
    }

    public func shutdown() { tcp.shutdown() }

    /// Sends close_notify after everything written, then FIN; the peer reads a clean end.
    public func shutdownWrite() {
        writer.withLock {
            let deadline = Deadline.after(milliseconds: 2000)
            while true {
                let (code, _) = call { SSL_shutdown(ssl) >= 0 ? 1 : 0 }
                guard code == SSL_ERROR_WANT_WRITE, (try? waitReady(tcp.fd, events: Int16(POLLOUT), until: deadline, call: "close_notify")) == true else { break }
            }
        }
        tcp.shutdownWrite()
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

/// A FIFO lock: threads enter in the order they asked.
final class TicketLock: @unchecked Sendable {  // next and serving are guarded by monitor
    private let monitor = MonitorLock()
    private var next: UInt64 = 0
    private var serving: UInt64 = 0

    func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        monitor.lock()
        let ticket = next
        next &+= 1
        while serving != ticket { monitor.wait() }
        monitor.unlock()
        defer {
            monitor.lock()
            serving &+= 1
            monitor.broadcast()
            monitor.unlock()
        }
        return try body()
    }
}
