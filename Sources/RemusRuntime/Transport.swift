import RemusCore
import RemusSystem
import RemusTLS

/// How the replication channel is protected.
public enum ChannelSecurity: Sendable, Equatable {
    /// Mutual TLS 1.3: the default, and what the command line requires unless told otherwise.
    case mutualTLS(TLSPolicy)
    /// Plain TCP (`--insecure-plaintext`): anyone who reaches the port can send a stream the
    /// backup will run, and the guest's memory crosses the network in clear. For labs.
    case insecurePlaintext
}

/// One side's TLS files and whom it accepts.
public struct TLSPolicy: Sendable, Equatable {
    public var files: TLSFiles
    /// On a backup: the primary identities it serves (`--tls-allow-peer`): a DNS name in the
    /// certificate's subjectAltName, or its subject CN when it has none. Empty: any certificate
    /// the CA signed.
    public var allowedPeers: [String]
    /// On a primary (and a backup protecting onwards): the name the backup's certificate must
    /// carry (`--tls-peer-name`); nil: the host it dials.
    public var peerName: String?
    /// On a backup: the longest a connection may take to complete its handshake, milliseconds.
    public var handshakeTimeoutMs: Int

    public init(files: TLSFiles, allowedPeers: [String] = [], peerName: String? = nil, handshakeTimeoutMs: Int = defaultHandshakeTimeoutMs) {
        self.files = files
        self.allowedPeers = allowedPeers
        self.peerName = peerName
        self.handshakeTimeoutMs = handshakeTimeoutMs
    }
}

/// The default `--tls-handshake-timeout` of `remusd receive`, milliseconds.
public let defaultHandshakeTimeoutMs = 3000

/// The replication channel's two ends as the daemons use them: a primary connects, a backup
/// secures what it accepted. Certificates and keys are loaded once, at start, so a bad file is
/// reported before anything runs.
public final class ReplicationTransport: Sendable {
    public let security: ChannelSecurity
    private let context: TLSContext?

    /// Plain TCP.
    public static let insecurePlaintext = try! ReplicationTransport(.insecurePlaintext, side: .client)

    public init(_ security: ChannelSecurity, side: TLSContext.Side) throws {
        self.security = security
        switch security {
        case .insecurePlaintext:
            context = nil
        case .mutualTLS(let policy):
            let context = try TLSContext(side, files: policy.files)
            if let problem = context.ownCertificateProblem {
                Log.warning("--tls-cert \(policy.files.certificate): \(problem)")
            }
            self.context = context
        }
    }

    /// The primary's end: TCP connect and TLS handshake, both before `deadline`.
    func connect(to endpoint: Endpoint, deadline: Deadline) throws -> any ByteChannel {
        let tcp = try TCPChannel.connect(to: endpoint, deadline: deadline)
        guard let context, case .mutualTLS(let policy) = security else { return tcp }
        return try TLSChannel.connect(tcp, context: context, expectedName: policy.peerName ?? endpoint.host, deadline: deadline)
    }

    /// The backup's end: the handshake of an accepted connection, within the handshake timeout.
    func secure(accepted tcp: TCPChannel) throws(TLSError) -> any ByteChannel {
        guard let context, case .mutualTLS(let policy) = security else { return tcp }
        return try TLSChannel.accept(
            tcp, context: context, allowedPeers: policy.allowedPeers, plaintextSignature: StreamHeader.magic,
            deadline: .after(milliseconds: policy.handshakeTimeoutMs))
    }

    /// For status and the log: what protects the channel in general.
    public var summary: String {
        switch security {
        case .insecurePlaintext:
            return "INSECURE PLAINTEXT (--insecure-plaintext): unauthenticated and unencrypted"
        case .mutualTLS(let policy):
            let whom: String
            if context?.side == .server {
                whom = "primaries accepted: " + (policy.allowedPeers.isEmpty ? "any certificate the CA signed" : policy.allowedPeers.map { "'\($0)'" }.joined(separator: ", "))
            } else {
                whom = "the backup's certificate must name " + (policy.peerName.map { "'\($0)'" } ?? "the host dialled")
            }
            return "mutual TLS 1.3 (CA \(policy.files.ca); \(whom); kTLS: \(TLSContext.kernelTLSAvailability))"
        }
    }

    /// For status and the log: one connection's protection and the peer's identity.
    static func describe(_ channel: any ByteChannel) -> String {
        guard let tls = channel as? TLSChannel else { return "INSECURE PLAINTEXT" }
        return "mutual TLS 1.3 with '\(tls.peerIdentity)', \(tls.kernelTLS)"
    }
}
