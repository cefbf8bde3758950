import COpenSSL
import Glibc
import RemusSystem

/// A throwaway CA and host certificates for the replication channel (`remusd certs`), made with
/// OpenSSL's API: ECDSA P-256 keys, SHA-256 signatures, certificates usable for both TLS client
/// and server authentication. Keys are written 0600.
///
/// Files in the directory: `ca.pem` and `ca.key` (the CA), `<name>.pem` and `<name>.key` for
/// each host. An existing CA in the directory is reused, so a host's certificate can be renewed
/// (or one added) without re-issuing the others.
public struct CertificateSet: Sendable {
    /// One host certificate to issue.
    public struct Host: Sendable, Equatable {
        /// The subject CN, and the first DNS name of its subjectAltName.
        public var name: String
        /// More names it answers to: DNS names or IP addresses.
        public var alternativeNames: [String]
        public init(name: String, alternativeNames: [String] = []) {
            self.name = name
            self.alternativeNames = alternativeNames
        }

        /// Parses "name" or "name=alt,alt" (alt: a DNS name or an IP address).
        public init?(parsing text: String) {
            let parts = text.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let first = parts.first, Self.isName(first) else { return nil }
            let alternatives = parts.count > 1 ? parts[1].split(separator: ",").map(String.init) : []
            guard parts.count == 1 || !alternatives.isEmpty else { return nil }
            guard alternatives.allSatisfy({ Self.isName($0[...]) || isIPAddress($0) }) else { return nil }
            self.init(name: String(first), alternativeNames: alternatives)
        }

        /// Letters, digits, '-', '.' and '_' (a host name, or a label for one).
        static func isName(_ text: Substring) -> Bool {
            !text.isEmpty && text.utf8.count <= 253 && text.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-._".contains($0)) }
        }
    }

    /// Validity of the certificates made, in seconds relative to now (tests make expired and
    /// not-yet-valid ones; the defaults allow an hour of clock skew and last a year).
    public struct Validity: Sendable {
        public var notBeforeSeconds: Int
        public var notAfterSeconds: Int
        public init(notBeforeSeconds: Int = -3600, notAfterSeconds: Int = 365 * 86_400) {
            self.notBeforeSeconds = notBeforeSeconds
            self.notAfterSeconds = notAfterSeconds
        }
    }

    public let directory: String

    public init(directory: String) { self.directory = directory }

    public var caCertificate: String { directory + "/ca.pem" }
    public var caKey: String { directory + "/ca.key" }

    /// The three files a host passes as --tls-cert, --tls-key and --tls-ca.
    public func files(for name: String) -> TLSFiles {
        TLSFiles(certificate: "\(directory)/\(name).pem", key: "\(directory)/\(name).key", ca: caCertificate)
    }

    /// Makes the CA (unless the directory has one) and a certificate for each host.
    /// Returns whether a new CA was made.
    @discardableResult
    public func make(_ hosts: [Host], validity: Validity = Validity(), caValidity: Validity = Validity(notAfterSeconds: 5 * 365 * 86_400)) throws -> Bool {
        try makeDirectories(directory)
        let existing = access(caCertificate, F_OK) == 0 && access(caKey, F_OK) == 0
        let ca: IssuedCertificate
        if existing {
            ca = try IssuedCertificate(loadingCertificate: caCertificate, key: caKey)
        } else {
            ca = try IssuedCertificate.authority(name: "remusd replication CA", validity: caValidity)
            try write(ca.keyPEM(), to: caKey, mode: 0o600)
            try write(ca.certificatePEM(), to: caCertificate, mode: 0o644)
        }
        for host in hosts {
            let cert = try IssuedCertificate.host(host, issuer: ca, validity: validity)
            try write(cert.keyPEM(), to: files(for: host.name).key, mode: 0o600)
            try write(cert.certificatePEM(), to: files(for: host.name).certificate, mode: 0o644)
        }
        return !existing
    }

    /// mkdir -p; the last directory, which holds the keys, is 0700.
    private func makeDirectories(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "" : "."
        let parts = path.split(separator: "/")
        for (i, part) in parts.enumerated() {
            prefix += "/" + part
            if mkdir(prefix, i == parts.count - 1 ? 0o700 : 0o755) != 0 && errno != EEXIST {
                throw SystemError(call: "mkdir(\(prefix))", errno: errno)
            }
        }
    }

    private func write(_ bytes: [UInt8], to path: String, mode: mode_t) throws {
        // Created with its final mode, and set again in case the file existed: a key is never
        // readable by others, not even for a moment.
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw SystemError(call: "open(\(path))", errno: errno) }
        let owned = OwnedDescriptor(adopting: fd)
        let raw = owned.raw
        _ = try syscall("fchmod(\(path))") { fchmod(raw, mode) }
        var offset = 0
        while offset < bytes.count {
            let n = try bytes.withUnsafeBytes { buffer throws(SystemError) in
                try syscall("write(\(path))") { Glibc.write(raw, buffer.baseAddress! + offset, buffer.count - offset) }
            }
            offset += n
        }
        _ = consume owned
    }
}

/// A certificate with its private key, owned (freed in deinit).
final class IssuedCertificate {
    let certificate: OpaquePointer
    let key: OpaquePointer

    private init(certificate: OpaquePointer, key: OpaquePointer) {
        self.certificate = certificate
        self.key = key
    }

    deinit {
        X509_free(certificate)
        EVP_PKEY_free(key)
    }

    convenience init(loadingCertificate certPath: String, key keyPath: String) throws(TLSError) {
        ERR_clear_error()
        guard let bio = BIO_new_file(certPath, "r") else { throw TLSError(.configuration, "cannot read the CA certificate \(certPath): \(TLSError.drainQueue())") }
        defer { BIO_free(bio) }
        guard let cert = PEM_read_bio_X509(bio, nil, nil, nil) else { throw TLSError(.configuration, "\(certPath) is not a PEM certificate: \(TLSError.drainQueue())") }
        guard let keyBio = BIO_new_file(keyPath, "r") else {
            X509_free(cert)
            throw TLSError(.configuration, "cannot read the CA key \(keyPath): \(TLSError.drainQueue())")
        }
        defer { BIO_free(keyBio) }
        guard let key = PEM_read_bio_PrivateKey(keyBio, nil, nil, nil) else {
            X509_free(cert)
            throw TLSError(.configuration, "\(keyPath) is not a PEM private key: \(TLSError.drainQueue())")
        }
        self.init(certificate: cert, key: key)
        guard X509_check_private_key(cert, key) == 1 else {
            throw TLSError(.configuration, "\(keyPath) is not the key of \(certPath)")
        }
    }

    static func authority(name: String, validity: CertificateSet.Validity) throws(TLSError) -> IssuedCertificate {
        let made = try blank(commonName: name, validity: validity)
        X509_set_issuer_name(made.certificate, X509_get_subject_name(made.certificate))
        try made.extend(issuer: made, [
            (NID_basic_constraints, "critical,CA:TRUE,pathlen:0"),
            (NID_key_usage, "critical,keyCertSign,cRLSign"),
            (NID_subject_key_identifier, "hash"),
        ])
        try made.sign(with: made)
        return made
    }

    static func host(_ host: CertificateSet.Host, issuer: IssuedCertificate, validity: CertificateSet.Validity) throws(TLSError) -> IssuedCertificate {
        let made = try blank(commonName: host.name, validity: validity)
        X509_set_issuer_name(made.certificate, X509_get_subject_name(issuer.certificate))
        let alternatives = ([host.name] + host.alternativeNames).map { isIPAddress($0) ? "IP:\($0)" : "DNS:\($0)" }
        try made.extend(issuer: issuer, [
            (NID_basic_constraints, "critical,CA:FALSE"),
            (NID_key_usage, "critical,digitalSignature"),
            (NID_ext_key_usage, "serverAuth,clientAuth"),
            (NID_subject_alt_name, alternatives.joined(separator: ",")),
            (NID_subject_key_identifier, "hash"),
            (NID_authority_key_identifier, "keyid:always"),
        ])
        try made.sign(with: issuer)
        return made
    }

    private static func blank(commonName: String, validity: CertificateSet.Validity) throws(TLSError) -> IssuedCertificate {
        ERR_clear_error()
        guard let key = remus_ec_p256_keygen() else { throw TLSError(.configuration, "cannot make a P-256 key: \(TLSError.drainQueue())") }
        guard let cert = X509_new() else {
            EVP_PKEY_free(key)
            throw TLSError(.configuration, "cannot make a certificate: \(TLSError.drainQueue())")
        }
        let made = IssuedCertificate(certificate: cert, key: key)
        X509_set_version(cert, 2)  // v3
        ASN1_INTEGER_set_int64(X509_get_serialNumber(cert), Int64.random(in: 1...Int64.max))
        X509_gmtime_adj(X509_getm_notBefore(cert), validity.notBeforeSeconds)
        X509_gmtime_adj(X509_getm_notAfter(cert), validity.notAfterSeconds)
        X509_set_pubkey(cert, key)
        guard X509_NAME_add_entry_by_txt(X509_get_subject_name(cert), "CN", MBSTRING_ASC, commonName, -1, -1, 0) == 1 else {
            throw TLSError(.configuration, "'\(commonName)' cannot be a certificate's CN: \(TLSError.drainQueue())")
        }
        return made
    }

    private func extend(issuer: IssuedCertificate, _ extensions: [(Int32, String)]) throws(TLSError) {
        var ctx = X509V3_CTX()
        X509V3_set_ctx(&ctx, issuer.certificate, certificate, nil, nil, 0)
        for (nid, value) in extensions {
            guard let ext = X509V3_EXT_conf_nid(nil, &ctx, nid, value) else {
                throw TLSError(.configuration, "cannot make the extension \(value): \(TLSError.drainQueue())")
            }
            defer { X509_EXTENSION_free(ext) }
            X509_add_ext(certificate, ext, -1)
        }
    }

    private func sign(with issuer: IssuedCertificate) throws(TLSError) {
        guard X509_sign(certificate, issuer.key, EVP_sha256()) > 0 else {
            throw TLSError(.configuration, "cannot sign the certificate: \(TLSError.drainQueue())")
        }
    }

    func certificatePEM() throws(TLSError) -> [UInt8] {
        try pem { PEM_write_bio_X509($0, certificate) }
    }

    func keyPEM() throws(TLSError) -> [UInt8] {
        try pem { PEM_write_bio_PrivateKey($0, key, nil, nil, 0, nil, nil) }
    }

    private func pem(_ body: (OpaquePointer) -> Int32) throws(TLSError) -> [UInt8] {
        guard let bio = BIO_new(BIO_s_mem()) else { throw TLSError(.configuration, "cannot make a memory BIO") }
        defer { BIO_free(bio) }
        guard body(bio) == 1 else { throw TLSError(.configuration, "cannot write PEM: \(TLSError.drainQueue())") }
        var data: UnsafeMutablePointer<CChar>?
        let count = remus_bio_mem_data(bio, &data)
        guard count > 0, let data else { return [] }
        return Array(UnsafeRawBufferPointer(start: data, count: count))
    }
}

/// Whether `text` is a numeric IPv4 or IPv6 address.
public func isIPAddress(_ text: String) -> Bool {
    var v4 = in_addr()
    var v6 = in6_addr()
    return inet_pton(AF_INET, text, &v4) == 1 || inet_pton(AF_INET6, text, &v6) == 1
}
