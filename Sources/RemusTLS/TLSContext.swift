import COpenSSL
import Glibc
import RemusSystem

/// The three files of one side of mutual TLS: our certificate (chain), its private key, and the
/// CA that must have signed the peer's certificate.
public struct TLSFiles: Sendable, Equatable {
    /// PEM certificate, optionally followed by intermediates (`--tls-cert`).
    public var certificate: String
    /// PEM private key of that certificate (`--tls-key`).
    public var key: String
    /// PEM CA certificate(s) the peer's certificate must chain to (`--tls-ca`).
    public var ca: String

    public init(certificate: String, key: String, ca: String) {
        self.certificate = certificate
        self.key = key
        self.ca = ca
    }
}

/// An OpenSSL `SSL_CTX` for one side of the replication channel: TLS 1.3 only, our certificate
/// and key loaded and checked against each other, the peer's certificate required and verified
/// against the CA, no session tickets (every connection is a full mutual handshake), kernel TLS
/// asked for where the kernel has it.
public final class TLSContext: @unchecked Sendable {  // SSL_CTX is safe to share once configured
    public enum Side: Sendable { case server, client }

    let handle: OpaquePointer
    public let side: Side
    public let files: TLSFiles

    public init(_ side: Side, files: TLSFiles) throws(TLSError) {
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(side == .server ? TLS_server_method() : TLS_client_method()) else {
            throw TLSError(.configuration, "OpenSSL could not make a TLS context: \(TLSError.drainQueue())")
        }
        do throws(TLSError) {
            try Self.configure(ctx, side: side, files: files)
        } catch {
            SSL_CTX_free(ctx)
            throw error
        }
        handle = ctx
        self.side = side
        self.files = files
        // An expired certificate still loads; say so at start, not only at the peer.
        ownCertificateProblem = Self.validityProblem(ctx)
    }

    private static func configure(_ ctx: OpaquePointer, side: Side, files: TLSFiles) throws(TLSError) {
        guard remus_ssl_ctx_tls13_only(ctx) == 1 else {
            throw TLSError(.configuration, "this OpenSSL cannot be limited to TLS 1.3: \(TLSError.drainQueue())")
        }
        SSL_CTX_set_options(ctx, remus_ssl_op_no_ticket() | remus_ssl_op_no_renegotiation()
            | remus_ssl_op_ignore_unexpected_eof() | remus_ssl_op_enable_ktls())
        _ = SSL_CTX_set_num_tickets(ctx, 0)
        // A non-blocking write that must be retried is retried with the same bytes.
        remus_ssl_ctx_set_mode(ctx, Int(SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER))
        guard SSL_CTX_use_certificate_chain_file(ctx, files.certificate) == 1 else {
            throw TLSError(.configuration, "--tls-cert \(files.certificate) cannot be used as our certificate: \(TLSError.drainQueue()); give a PEM certificate (make a set with 'remusd certs <dir>')")
        }
        guard SSL_CTX_use_PrivateKey_file(ctx, files.key, SSL_FILETYPE_PEM) == 1 else {
            throw TLSError(.configuration, "--tls-key \(files.key) cannot be used as our private key: \(TLSError.drainQueue()); give the PEM key of --tls-cert")
        }
        guard SSL_CTX_check_private_key(ctx) == 1 else {
            throw TLSError(.configuration, "--tls-key \(files.key) is not the key of --tls-cert \(files.certificate): \(TLSError.drainQueue())")
        }
        guard SSL_CTX_load_verify_locations(ctx, files.ca, nil) == 1 else {
            throw TLSError(.configuration, "--tls-ca \(files.ca) cannot be loaded as the CA that signs our peers: \(TLSError.drainQueue())")
        }
        // Mutual: a server asks for the client's certificate and refuses a client without one.
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (side == .server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), nil)
    }

    deinit { SSL_CTX_free(handle) }

    /// Our own certificate's validity compared with this host's clock, when it is wrong (peers
    /// will refuse it): for a warning at start.
    public let ownCertificateProblem: String?

    private static func validityProblem(_ ctx: OpaquePointer) -> String? {
        guard let cert = SSL_CTX_get0_certificate(ctx) else { return nil }
        if X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0 {
            return "our own certificate has expired: peers will refuse it"
        }
        if X509_cmp_current_time(X509_get0_notBefore(cert)) >= 0 {
            return "our own certificate is not valid yet: peers will refuse it (check this host's clock)"
        }
        return nil
    }

    /// Whether this OpenSSL was built with kernel TLS and the kernel offers it (`tls` module):
    /// a description for status lines. The channel itself reports whether each connection got it.
    public static var kernelTLSAvailability: String {
        if remus_ssl_op_enable_ktls() == 0 { return "this OpenSSL has no kernel TLS" }
        if access("/proc/sys/net/ipv4/tcp_available_ulp", R_OK) == 0,
           let ulps = readWholeFile("/proc/sys/net/ipv4/tcp_available_ulp"), ulps.split(separator: " ").contains(where: { $0.hasPrefix("tls") }) {
            return "the kernel offers kTLS"
        }
        return "the kernel has no 'tls' module loaded (modprobe tls)"
    }
}
