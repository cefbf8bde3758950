import COpenSSL

/// Why a TLS connection was refused or broke, translated once at OpenSSL's boundary.
public struct TLSError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable, Equatable {
        /// The peer's certificate is past its notAfter.
        case expired
        /// The peer's certificate's notBefore is still in the future.
        case notYetValid
        /// The peer's certificate was not issued by our CA (`--tls-ca`).
        case unknownCA
        /// The certificate is signed by our CA but names someone we do not accept.
        case wrongIdentity
        /// The peer presented no certificate.
        case noCertificate
        /// The peer spoke remusd's stream without TLS (it runs with `--insecure-plaintext`).
        case plaintextClient
        /// The first bytes were not a TLS handshake at all.
        case notTLS
        /// The peer refused our certificate (its alert names why).
        case refusedByPeer
        /// The handshake did not finish before its deadline.
        case timedOut
        /// The peer closed the connection during the handshake.
        case closed
        /// Our own certificate, key or CA file cannot be used.
        case configuration
        /// Anything else OpenSSL reported (a malformed handshake, a bad record).
        case protocolFailure
    }

    public var kind: Kind
    /// What happened, in a sentence (names files, the peer and OpenSSL's own reason).
    public var detail: String

    public init(_ kind: Kind, _ detail: String) {
        self.kind = kind
        self.detail = detail
    }

    public var description: String { detail }

    /// OpenSSL's queued errors of this thread as one line, oldest first; the queue is emptied.
    static func drainQueue() -> String {
        var reasons: [String] = []
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            var text = [CChar](repeating: 0, count: 256)
            ERR_error_string_n(code, &text, text.count)
            let line = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            // "error:0A000086:SSL routines::certificate verify failed" → the part after the last "::" or ":".
            let reason = line.split(separator: ":", omittingEmptySubsequences: true).last.map(String.init) ?? line
            if !reasons.contains(reason) { reasons.append(reason) }
        }
        return reasons.joined(separator: "; ")
    }

    /// The first queued error's reason code (0 when none), without taking it off the queue.
    static func peekReason() -> Int32 {
        let code = ERR_peek_error()
        // ERR_GET_REASON is a macro: the low 23 bits (ERR_REASON_MASK).
        return Int32(code & 0x7FFFFF)
    }

    /// The verification result of a peer's certificate as a refusal.
    static func verification(_ result: Int, peer: String) -> TLSError {
        let text = String(cString: X509_verify_cert_error_string(result))
        switch Int32(result) {
        case X509_V_ERR_CERT_HAS_EXPIRED:
            return TLSError(.expired, "\(peer)'s certificate has expired (\(text))")
        case X509_V_ERR_CERT_NOT_YET_VALID:
            return TLSError(.notYetValid, "\(peer)'s certificate is not valid yet (\(text)); check both hosts' clocks")
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
             X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
             X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE, X509_V_ERR_CERT_SIGNATURE_FAILURE:
            return TLSError(.unknownCA, "\(peer)'s certificate is not signed by our CA (\(text))")
        case X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH:
            return TLSError(.wrongIdentity, "\(peer)'s certificate, though signed by our CA, names someone we do not accept (\(text))")
        default:
            return TLSError(.protocolFailure, "\(peer)'s certificate was rejected: \(text)")
        }
    }
}
