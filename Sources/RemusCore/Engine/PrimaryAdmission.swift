/// Whom a backup takes a stream from (I10): authentication says who a peer is; this says whether
/// that peer may write here now. A pure function of the hello, the backup's configuration, the
/// sender it already holds an image of, and the committer's state; the shell asks it for every
/// hello before anything is built or allocated for the stream.
///
/// The rules:
/// - Only guests the backup serves (`servedGuests`; empty: any) and only guests whose declared
///   memory fits the backup's budget.
/// - The backup binds to the sender of its replica (identity and guest UUID). Once that sender
///   has committed a checkpoint, or while its connection is open, nothing but that same sender
///   may stream here: a new identity or a new guest UUID never calls off a fence, never replaces
///   a committed image, never takes over a FENCING, PRIMARY LOST or ACTIVE backup. Only the
///   operator can (`remusd failover --discard` drops the held image, `--activate` runs it).
/// - A backup that has committed nothing binds nothing once its sender is gone: a squatter that
///   connected first and was dropped (by the deadlines) leaves nothing the real primary cannot
///   replace.
public struct PrimaryAdmission: Sendable {
    /// Guests this backup serves (`--accept-guest`); empty: any guest.
    public var servedGuests: [GuestSelector]
    /// Largest guest memory a hello may declare, bytes (`--memory-budget`).
    public var guestMemoryBudget: UInt64

    public init(servedGuests: [GuestSelector] = [], guestMemoryBudget: UInt64) {
        self.servedGuests = servedGuests
        self.guestMemoryBudget = guestMemoryBudget
    }

    public enum Decision: Equatable, Sendable {
        /// Take the stream; with `replacingConnection` the holder's own open connection is dropped
        /// first (its primary reconnected before the backup noticed the old one was dead).
        case admit(replacingConnection: Bool)
        /// Refuse it; the text says why, what stayed as it was, and what the operator can do.
        case refuse(String)
    }

    /// Decides on a hello from `sender` declaring `declaredGuestBytes` of guest memory, while the
    /// backup holds the replica of `holder` (nil: none) in `state`.
    public func decide(_ sender: StreamSender, declaredGuestBytes: UInt64, holder: StreamSender?,
                       state: BackupCommitter.State, fenceInFlight: Bool) -> Decision {
        if !servedGuests.isEmpty && !servedGuests.contains(where: { $0.matches(sender) }) {
            let served = servedGuests.map(\.description).joined(separator: ", ")
            return .refuse("this backup serves only \(served) (--accept-guest); \(sender.guestDescription) is not among them; nothing changed here — add --accept-guest to this backup's command line to serve it")
        }
        if declaredGuestBytes > guestMemoryBudget {
            return .refuse("\(sender.guestDescription) declares \(mebibytes(declaredGuestBytes)) of memory, above this backup's budget of \(mebibytes(guestMemoryBudget)) (--memory-budget); nothing was allocated and nothing changed here — raise --memory-budget if this host can hold that guest")
        }
        let same = holder == sender
        switch state {
        case .listening, .stopped:
            return .admit(replacingConnection: false)
        case .receiving(let committed, let connected):
            if same { return .admit(replacingConnection: connected) }
            // Nothing committed and nobody streaming: there is no image to protect.
            if committed == 0 && !connected { return .admit(replacingConnection: false) }
            return .refuse(held(holder, what: committed == 0 ? "is synchronising" : "holds checkpoint \(committed)", from: sender))
        case .fencing(let committed, _, _):
            // Its own primary, back before the fence ran, held its output: take it back.
            if same && !fenceInFlight { return .admit(replacingConnection: false) }
            let why = same ? "is fencing it right now" : "is fencing its primary, holding checkpoint \(committed)"
            return .refuse(held(holder, what: why, from: sender))
        case .awaitingOperator(let committed):
            return .refuse(held(holder, what: "lost its primary and holds checkpoint \(committed) for the operator", from: sender))
        case .activating(let committed), .active(let committed):
            return .refuse("this backup runs the guest it took over (checkpoint \(committed)); it accepts no primary now; nothing changed here")
        }
    }

    private func held(_ holder: StreamSender?, what: String, from sender: StreamSender) -> String {
        let whose = holder.map { " of \($0.guestDescription) from primary '\($0.identity)'" } ?? ""
        return "this backup\(whose) \(what); a stream from '\(sender.identity)' for \(sender.guestDescription) cannot replace it — only the operator can: 'remusd failover --discard' on the backup drops what it holds, 'remusd failover --activate' runs it; nothing changed here"
    }

    private func mebibytes(_ bytes: UInt64) -> String {
        bytes >= 1 << 20 ? "\(bytes >> 20) MiB" : "\(bytes) bytes"
    }
}

/// Who sends a stream: the connection's authenticated identity and the guest its hello names.
public struct StreamSender: Equatable, Sendable {
    /// The primary's certificate name under TLS; "plaintext:ADDRESS" without it.
    public var identity: String
    public var guestUUID: GuestUUID
    public var guestName: String

    public init(identity: String, guestUUID: GuestUUID, guestName: String) {
        self.identity = identity
        self.guestUUID = guestUUID
        self.guestName = guestName
    }

    /// Two senders are the same primary of the same guest: identity and UUID (the name may change).
    public static func == (a: StreamSender, b: StreamSender) -> Bool {
        a.identity == b.identity && a.guestUUID == b.guestUUID
    }

    /// "guest 'NAME' (UUID)", for messages.
    public var guestDescription: String { "guest '\(guestName)' (\(guestUUID))" }
}

/// A guest a backup serves (`--accept-guest NAME|UUID`).
public enum GuestSelector: Equatable, Sendable, CustomStringConvertible {
    case name(String)
    case uuid(GuestUUID)

    /// A UUID in its usual 8-4-4-4-12 hexadecimal form, else a name; nil for an empty string.
    public init?(parsing text: String) {
        guard !text.isEmpty else { return nil }
        if let uuid = GuestUUID(parsing: text) { self = .uuid(uuid) } else { self = .name(text) }
    }

    public func matches(_ sender: StreamSender) -> Bool {
        switch self {
        case .name(let n): return n == sender.guestName
        case .uuid(let u): return u == sender.guestUUID
        }
    }

    public var description: String {
        switch self {
        case .name(let n): return "guest '\(n)'"
        case .uuid(let u): return "guest \(u)"
        }
    }
}

extension GuestUUID {
    /// Parses "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (hexadecimal, either case).
    public init?(parsing text: String) {
        let groups = text.split(separator: "-", omittingEmptySubsequences: false)
        guard groups.map(\.count) == [8, 4, 4, 4, 12] else { return nil }
        let hex = groups.joined()
        guard hex.allSatisfy(\.isHexDigit),
              let high = UInt64(hex.prefix(16), radix: 16), let low = UInt64(hex.suffix(16), radix: 16) else { return nil }
        self.init(high: high, low: low)
    }
}
