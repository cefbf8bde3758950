/// What went wrong talking to the witness. Every case leaves the same thing safe: a side that
/// cannot confirm it holds the key does not act as the active copy — a primary keeps output held
/// once its renewal deadline passes, a backup does not activate (see Docs/witness.md).
public enum WitnessError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The `--witness` value is not `etcd://host[:port]/key`.
    case invalidURL(url: String, reason: String)
    /// No connection to etcd (refused, no route, name not resolved). `operation` is what we were
    /// doing ("renew lease"), `cause` the failing call and its errno text.
    case unreachable(endpoint: String, operation: String, cause: String)
    /// The TLS handshake with etcd failed: its certificate is not signed by our CA or does not
    /// name the host we dialled, or etcd refused our certificate. `reason` is the TLS layer's.
    case refused(endpoint: String, operation: String, reason: String)
    /// Our own witness certificate, key or CA cannot be used (`reason` names the file).
    case tlsConfiguration(reason: String)
    /// etcd did not answer within the request timeout (milliseconds).
    case timedOut(endpoint: String, operation: String, timeoutMs: Int)
    /// etcd answered with an HTTP error status; `message` is etcd's own text when it sent one.
    case httpStatus(endpoint: String, operation: String, status: Int, message: String)
    /// The answer was not the JSON etcd's gateway sends (or the connection broke mid-answer).
    case malformedResponse(endpoint: String, operation: String, detail: String)
    /// Nothing at `endpoint` serves etcd's v3 JSON gateway (`/v3/`, `/v3beta/`, `/v3alpha/`).
    case gatewayNotFound(endpoint: String)
    /// Our lease expired or the key is no longer ours: another copy may be active now.
    case lost(key: String, reason: String)
    /// `renew()` was called before `acquire` succeeded (or after `release`).
    case notHeld(key: String)

    public var description: String {
        switch self {
        case .invalidURL(let url, let reason):
            return "invalid witness URL '\(url)': \(reason); expected etcd://host:port/key, e.g. etcd://10.0.0.9:2379/remus/guest1"
        case .unreachable(let endpoint, let operation, let cause):
            return "witness etcd at \(endpoint) unreachable (\(operation): \(cause)); "
                + Self.keptSafe + " — check that etcd runs and listens on \(endpoint)"
        case .refused(let endpoint, let operation, let reason):
            return "witness etcd at \(endpoint) failed the TLS handshake (\(operation): \(reason)); "
                + Self.keptSafe + " — check that etcd's certificate is signed by the witness CA and names \(endpoint)'s host, "
                + "and that etcd trusts our certificate's CA (its --trusted-ca-file)"
        case .tlsConfiguration(let reason):
            return "the witness's TLS files cannot be used: \(reason); nothing was started"
        case .timedOut(let endpoint, let operation, let timeoutMs):
            return "witness etcd at \(endpoint) did not answer within \(timeoutMs) ms (\(operation)); "
                + Self.keptSafe + " — check etcd's health and the network to \(endpoint)"
        case .httpStatus(let endpoint, let operation, let status, let message):
            return "witness etcd at \(endpoint) refused \(operation) with HTTP \(status)"
                + (message.isEmpty ? "" : " (\(message))") + "; " + Self.keptSafe + " — see etcd's log"
        case .malformedResponse(let endpoint, let operation, let detail):
            return "witness at \(endpoint) sent a response to \(operation) that is not etcd's JSON gateway format (\(detail)); "
                + Self.keptSafe + " — check that \(endpoint) is an etcd 3.x client URL"
        case .gatewayNotFound(let endpoint):
            return "no etcd v3 JSON gateway at \(endpoint) (tried /v3/, /v3beta/, /v3alpha/); "
                + Self.keptSafe + " — point --witness at an etcd 3.x client URL"
        case .lost(let key, let reason):
            return "witness key '\(key)' lost: \(reason); another copy may be active now — this copy must stay fenced "
                + "(output held, guest paused) until an operator decides which copy runs"
        case .notHeld(let key):
            return "witness key '\(key)' is not held by this process (renew before acquire or after release); "
                + "act as if the key were lost: keep output held"
        }
    }

    private static let keptSafe =
        "the lease cannot be confirmed, so a primary holds output once its renewal deadline passes and a backup does not activate"
}
