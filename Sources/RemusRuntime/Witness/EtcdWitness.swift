import RemusTLS
import Glibc

/// A lease on the witness key, as last confirmed by etcd.
public struct WitnessLease: Equatable, Sendable {
    /// etcd's lease ID.
    public let id: Int64
    /// The TTL etcd granted or restored, in seconds. It may exceed what was asked for: etcd raises
    /// short TTLs to its minimum (about 1.5 × its election timeout; 2 s with default settings).
    public let ttlSeconds: Int
    /// `WitnessLease.clockNs()` read just before sending the request that granted or renewed the
    /// lease. etcd started the TTL countdown after this instant, so measured from it the lease
    /// lives at least `ttlSeconds` (as far as etcd's clock and ours advance at the same rate).
    public let confirmedAtNs: UInt64

    public init(id: Int64, ttlSeconds: Int, confirmedAtNs: UInt64) {
        self.id = id
        self.ttlSeconds = ttlSeconds
        self.confirmedAtNs = confirmedAtNs
    }

    /// The clock of witness deadlines, in ns: CLOCK_BOOTTIME, which unlike CLOCK_MONOTONIC keeps
    /// counting while the host is suspended — a primary that sleeps through its deadline must wake
    /// up past it, not before it.
    public static func clockNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// The last instant (`clockNs()`, ns) at which the holder may still act as the active copy:
    /// `confirmedAtNs + ttlSeconds − marginNs`. `marginNs` covers clock-rate drift and the longest
    /// stall between checking the deadline and the output leaving (see Docs/witness.md).
    public func deadlineNs(marginNs: UInt64) -> UInt64 {
        let ttlNs = UInt64(max(ttlSeconds, 0)) * 1_000_000_000
        return ttlNs > marginNs ? confirmedAtNs + (ttlNs - marginNs) : confirmedAtNs
    }

    /// Nanoseconds left before `deadlineNs(marginNs:)`, 0 once it has passed: at 0 the holder
    /// stops releasing output and pauses the guest.
    public func remainingNs(marginNs: UInt64, now: UInt64 = WitnessLease.clockNs()) -> UInt64 {
        let deadline = deadlineNs(marginNs: marginNs)
        return deadline > now ? deadline - now : 0
    }
}

/// The `--witness etcd://host:port/key` client: one key in an etcd cluster, held under a lease,
/// decides which copy of the guest may be active (invariant I7). The primary acquires and renews
/// it; the backup activates only once it holds it. See Docs/witness.md for the timing rules.
///
/// Blocking: each call makes one to three HTTP/1.1 requests to etcd's v3 JSON gateway, each on a
/// fresh connection bounded by `requestTimeoutMs`. Call it from a dedicated thread, never from the
/// Swift concurrency pool. `acquire`, `renew` and `release` are serialized with each other;
/// `holder` may run alongside them. The process must ignore SIGPIPE (the daemons do), as for
/// every `TCPChannel`.
///
/// `@unchecked Sendable`: the mutable state (lease, gateway prefix) is only touched with `stateLock`
/// held, and `operationLock` serializes the operations that change it.
public final class EtcdWitness: @unchecked Sendable {
    /// etcd's client endpoint from the URL.
    public let endpoint: Endpoint
    /// The witness key (the URL's path without its leading "/").
    public let key: String
    /// The bound on each HTTP request, connect to last byte, in milliseconds.
    public let requestTimeoutMs: Int
    /// Mutual TLS or plaintext.
    public let transport: WitnessTransport

    private let keyBase64: String
    private let stateLock = MonitorLock()
    private let operationLock = MonitorLock()
    private var state = State.idle
    private var gatewayPrefix: String?

    private enum State {
        case idle
        case holding(owner: String, lease: WitnessLease)
        case lost(reason: String)
    }

    /// Gateway prefixes by etcd version: 3.4+ serves /v3, 3.3 /v3beta, 3.2 /v3alpha.
    static let gatewayPrefixes = ["/v3", "/v3beta", "/v3alpha"]

    /// Parses `etcd://host[:port]/key` (port 2379 when omitted; `[v6addr]:port` for IPv6). The key
    /// may contain "/"; it may not be empty or contain "%", "?", "#", spaces or control characters.
    /// `requestTimeoutMs` bounds each request to etcd (default 1000 ms).
    /// - Parameter tls: our certificate, key and CA for mutual TLS with etcd, whose certificate
    ///   must name the URL's host; nil: plaintext (a lab etcd on loopback).
    public init(url: String, requestTimeoutMs: Int = 1000, tls: TLSFiles? = nil) throws(WitnessError) {
        let scheme = "etcd://"
        guard url.lowercased().hasPrefix(scheme) else {
            let reason = url.contains("://") ? "unsupported scheme (only etcd:// is supported)" : "missing etcd:// scheme"
            throw .invalidURL(url: url, reason: reason)
        }
        let rest = url.dropFirst(scheme.count)
        guard let slash = rest.firstIndex(of: "/") else {
            throw .invalidURL(url: url, reason: "missing key (the path after host:port)")
        }
        let authority = rest[..<slash]
        let key = rest[rest.index(after: slash)...]
        guard !authority.isEmpty else { throw .invalidURL(url: url, reason: "missing host") }
        guard !authority.contains("@") else { throw .invalidURL(url: url, reason: "user information is not supported") }
        guard let endpoint = Endpoint(parsing: String(authority), defaultPort: 2379), endpoint.port != 0 else {
            throw .invalidURL(url: url, reason: "'\(authority)' is not host:port with a port from 1 to 65535")
        }
        guard !key.isEmpty else { throw .invalidURL(url: url, reason: "missing key (the path after host:port)") }
        if let bad = key.unicodeScalars.first(where: { $0 == "%" || $0 == "?" || $0 == "#" || $0 == " " || $0.value < 0x20 || $0.value == 0x7F }) {
            throw .invalidURL(url: url, reason: "the key may not contain \(bad.value < 0x20 || bad.value == 0x7F ? "control characters" : "'\(bad)'")")
        }
        guard requestTimeoutMs > 0 else { throw .invalidURL(url: url, reason: "request timeout must be positive (got \(requestTimeoutMs) ms)") }
        self.endpoint = endpoint
        self.key = String(key)
        self.keyBase64 = EtcdCodec.base64(String(key))
        self.requestTimeoutMs = requestTimeoutMs
        if let tls {
            do {
                transport = .tls(try TLSContext(.client, files: tls), expectedName: endpoint.host)
            } catch {
                throw .tlsConfiguration(reason: error.detail)
            }
        } else {
            transport = .plaintext
        }
    }

    /// The owner name the daemons use: "<role>:<hostname>:<pid>", e.g. "primary:hostA:4242".
    public static func ownerName(role: String) -> String {
        var name = [CChar](repeating: 0, count: 256)
        let host = gethostname(&name, name.count - 1) == 0
            ? String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            : "unknown-host"
        return "\(role):\(host):\(getpid())"
    }

    /// The lease as last confirmed by etcd while we hold the key; nil when we do not hold it.
    public var lease: WitnessLease? {
        stateLock.withLock {
            if case .holding(_, let lease) = state { return lease }
            return nil
        }
    }

    /// Takes the key for `owner` (not empty) under a new lease of `ttlSeconds` (> 0) unless someone holds it.
    /// Returns true if this witness holds the key now (also when it already held it for `owner`:
    /// then the lease is renewed), false if another owner holds it. Acquiring for a different
    /// owner first releases what this witness held.
    ///
    /// Atomic in etcd: one transaction puts key=owner with the lease only if the key does not
    /// exist (create_revision == 0), so two callers can never both get true.
    @discardableResult
    public func acquire(owner: String, ttlSeconds: Int) throws(WitnessError) -> Bool {
        precondition(ttlSeconds > 0, "EtcdWitness.acquire: ttlSeconds must be positive, got \(ttlSeconds)")
        precondition(!owner.isEmpty, "EtcdWitness.acquire: owner must not be empty")
        operationLock.lock()
        defer { operationLock.unlock() }

        switch currentState() {
        case .holding(let heldOwner, _) where heldOwner == owner:
            do {
                _ = try renewHeld()
                return true
            } catch .lost {
                // The old lease is gone; fall through and compete for the key afresh.
            }
        case .holding(_, let lease):
            setState(.idle)
            try? revoke(lease.id)
        case .idle, .lost:
            break
        }
        setState(.idle)

        let sentAt = WitnessLease.clockNs()
        let (leaseID, grantedTTL) = try grant(ttlSeconds: ttlSeconds)
        let won: Bool
        do {
            won = try putIfAbsent(owner: owner, lease: leaseID)
        } catch {
            // The put may have been applied even though we saw no answer: revoking the lease
            // removes the key with it. Should the revoke fail too, the lease ends at its TTL.
            try? revoke(leaseID)
            throw error
        }
        guard won else {
            try? revoke(leaseID)  // an unused lease would linger until its TTL
            return false
        }
        setState(.holding(owner: owner, lease: WitnessLease(id: leaseID, ttlSeconds: grantedTTL, confirmedAtNs: sentAt)))
        return true
    }

    /// Renews our lease (one keepalive) and checks that the key still holds our owner name under
    /// our lease. Returns the lease with its new `confirmedAtNs`; the caller may act as the active
    /// copy until `deadlineNs(marginNs:)` of the last lease returned.
    ///
    /// Throws `.lost` if the lease expired or the key is no longer ours (and keeps throwing it
    /// until the next `acquire`), `.notHeld` before any `acquire`; transport errors leave the
    /// lease as it was: it may still be alive, and a later `renew` may succeed.
    @discardableResult
    public func renew() throws(WitnessError) -> WitnessLease {
        operationLock.lock()
        defer { operationLock.unlock() }
        return try renewHeld()
    }

    /// Who holds the key now (the owner string stored as its value), or nil if nobody does.
    public func holder() throws(WitnessError) -> String? {
        let reply = try call("read key", "/kv/range", EtcdKeyRequest(key: keyBase64))
        guard let kv = try firstKV(reply.kvs, operation: "read key") else { return nil }
        return kv.owner
    }

    /// Gives the key up: revokes our lease, which deletes the key in the same step. If etcd cannot
    /// be reached the error is thrown, but this witness no longer counts as holding the key, and
    /// etcd deletes it by itself when the lease's TTL runs out.
    public func release() throws(WitnessError) {
        operationLock.lock()
        defer { operationLock.unlock() }
        guard case .holding(_, let lease) = currentState() else {
            setState(.idle)
            return
        }
        setState(.idle)
        try revoke(lease.id)
    }

    // MARK: - Operations (operationLock held)

    private func renewHeld() throws(WitnessError) -> WitnessLease {
        let owner: String
        let lease: WitnessLease
        switch currentState() {
        case .idle: throw .notHeld(key: key)
        case .lost(let reason): throw .lost(key: key, reason: reason)
        case .holding(let o, let l): (owner, lease) = (o, l)
        }
        let sentAt = WitnessLease.clockNs()
        let ttl = try keepAlive(lease.id)
        guard ttl > 0 else {
            try markLost("lease \(lease.id) expired in etcd (not renewed within its \(lease.ttlSeconds) s TTL)")
        }
        guard try isOwned(by: owner, lease: lease.id) else {
            try markLost("the key no longer holds '\(owner)' under lease \(lease.id) (deleted or taken over)")
        }
        let renewed = WitnessLease(id: lease.id, ttlSeconds: ttl, confirmedAtNs: sentAt)
        setState(.holding(owner: owner, lease: renewed))
        return renewed
    }

    private func markLost(_ reason: String) throws(WitnessError) -> Never {
        setState(.lost(reason: reason))
        throw .lost(key: key, reason: reason)
    }

    private func currentState() -> State { stateLock.withLock { state } }
    private func setState(_ new: State) { stateLock.withLock { state = new } }

    // MARK: - etcd requests

    private func grant(ttlSeconds: Int) throws(WitnessError) -> (id: Int64, ttl: Int) {
        let operation = "grant lease"
        let reply = try call(operation, "/lease/grant", EtcdLeaseGrantRequest(TTL: EtcdInteger(Int64(ttlSeconds))))
        if let text = reply.error?.message, !text.isEmpty {
            throw .httpStatus(endpoint: endpoint.description, operation: operation, status: 200, message: text)
        }
        guard let id = reply.ID?.value, id != 0, let ttl = reply.TTL?.value, ttl > 0, ttl <= Int64(Int32.max) else {
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: "no lease ID or TTL in the reply")
        }
        return (id, Int(ttl))
    }

    /// Returns the TTL (s) etcd restored, 0 if the lease no longer exists.
    private func keepAlive(_ lease: Int64) throws(WitnessError) -> Int {
        let operation = "renew lease"
        let reply = try call(operation, "/lease/keepalive", EtcdLeaseRequest(ID: EtcdInteger(lease)), stream: true)
        guard let result = reply.result, result.header != nil else {
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: "no result in the keepalive reply")
        }
        if let id = result.ID, id.value != lease {
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: "keepalive answered for another lease")
        }
        // Protobuf's JSON omits zero values: no TTL means TTL 0, the lease is gone.
        guard let ttl = result.TTL?.value else { return 0 }
        guard ttl <= Int64(Int32.max) else {
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: "TTL \(ttl) is out of range")
        }
        return ttl > 0 ? Int(ttl) : 0
    }

    /// One transaction: if the key does not exist, put key=owner with `lease`. True if it did.
    private func putIfAbsent(owner: String, lease: Int64) throws(WitnessError) -> Bool {
        let body = EtcdTxnRequest(
            compare: [.init(target: "CREATE", key: keyBase64, create_revision: EtcdInteger(0))],
            success: [.init(request_put: .init(key: keyBase64, value: EtcdCodec.base64(owner), lease: EtcdInteger(lease)))])
        let reply = try call("acquire key", "/kv/txn", body)
        return try succeeded(reply, operation: "acquire key")
    }

    /// One transaction comparing the key's value with `owner` and its lease with `lease`.
    private func isOwned(by owner: String, lease: Int64) throws(WitnessError) -> Bool {
        let body = EtcdTxnRequest(compare: [
            .init(target: "VALUE", key: keyBase64, value: EtcdCodec.base64(owner)),
            .init(target: "LEASE", key: keyBase64, lease: EtcdInteger(lease)),
        ])
        let reply = try call("check key ownership", "/kv/txn", body)
        return try succeeded(reply, operation: "check key ownership")
    }

    private func succeeded(_ reply: EtcdReply, operation: String) throws(WitnessError) -> Bool {
        // "succeeded" is omitted when false (a non-boolean fails decoding); the header proves
        // this is a transaction reply.
        guard reply.header != nil else {
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: "no header in the txn reply")
        }
        return reply.succeeded ?? false
    }

    /// Revokes `lease`; a lease etcd no longer knows counts as revoked.
    private func revoke(_ lease: Int64) throws(WitnessError) {
        do {
            _ = try call("revoke lease", "/lease/revoke", EtcdLeaseRequest(ID: EtcdInteger(lease)))
        } catch .httpStatus(_, _, 404, _) {
            return  // gRPC NotFound: expired already
        }
    }

    /// Deletes the key whoever holds it. Not part of the protocol: tests use it to take a key away.
    func deleteKey() throws(WitnessError) {
        _ = try call("delete key", "/kv/deleterange", EtcdKeyRequest(key: keyBase64))
    }

    private struct KeyValue {
        var owner: String
        var lease: Int64
    }

    private func firstKV(_ kvs: [EtcdReply.KeyValue]?, operation: String) throws(WitnessError) -> KeyValue? {
        // A 'kvs' that is not an array failed decoding already.
        guard let first = kvs?.first else { return nil }
        // Empty values and lease 0 are omitted, like every zero value.
        guard let owner = EtcdCodec.text(fromBase64: first.value ?? "") else {
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: "the key's value is not base64-encoded UTF-8")
        }
        return KeyValue(owner: owner, lease: first.lease?.value ?? 0)
    }

    // MARK: - Gateway

    /// POSTs `body` to the gateway at `path` (below the version prefix) and returns the reply
    /// object (for a streaming call, its first message). The prefix is found on first use.
    private func call(_ operation: String, _ path: String, _ body: some Encodable, stream: Bool = false) throws(WitnessError) -> EtcdReply {
        let bytes = EtcdCodec.encode(body)
        if let prefix = stateLock.withLock({ gatewayPrefix }) {
            return try interpret(try post(prefix + path, bytes, operation), operation: operation, stream: stream)
        }
        for prefix in EtcdWitness.gatewayPrefixes {
            let response = try post(prefix + path, bytes, operation)
            if response.status == 404 && !isGatewayError(response) { continue }  // no such route
            stateLock.withLock { gatewayPrefix = prefix }
            return try interpret(response, operation: operation, stream: stream)
        }
        throw .gatewayNotFound(endpoint: endpoint.description)
    }

    private func post(_ path: String, _ body: [UInt8], _ operation: String) throws(WitnessError) -> HTTPResponse {
        do {
            return try httpExchange(endpoint: endpoint, transport: transport, method: "POST", path: path, body: body, timeoutMs: requestTimeoutMs)
        } catch {
            switch error {
            case .unreachable(let cause):
                throw .unreachable(endpoint: endpoint.description, operation: operation, cause: cause)
            case .timedOut:
                throw .timedOut(endpoint: endpoint.description, operation: operation, timeoutMs: requestTimeoutMs)
            case .refused(let reason):
                throw .refused(endpoint: endpoint.description, operation: operation, reason: reason)
            case .connectionFailed(let cause):
                throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: cause)
            case .malformed(let parse):
                throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: parse.description)
            }
        }
    }

    /// A gRPC error the gateway turned into JSON (`{"error":…,"code":5}`), as opposed to the
    /// plain-text 404 of a route the server does not have.
    private func isGatewayError(_ response: HTTPResponse) -> Bool {
        guard let reply = try? EtcdCodec.decodeReply(response.body, firstMessageOnly: true) else { return false }
        return reply.code != nil || reply.error != nil
    }

    private func interpret(_ response: HTTPResponse, operation: String, stream: Bool) throws(WitnessError) -> EtcdReply {
        let reply: EtcdReply
        do {
            reply = try EtcdCodec.decodeReply(response.body, firstMessageOnly: stream)
        } catch {
            guard (200..<300).contains(response.status) else {
                throw .httpStatus(endpoint: endpoint.description, operation: operation, status: response.status, message: "")
            }
            throw .malformedResponse(endpoint: endpoint.description, operation: operation, detail: error.description)
        }
        guard (200..<300).contains(response.status) else {
            throw .httpStatus(endpoint: endpoint.description, operation: operation, status: response.status,
                              message: errorMessage(reply))
        }
        // A streaming call reports errors inside a 200 answer: {"error":{"http_code":…,"message":…}}.
        if stream, let error = reply.error {
            var status = 500
            if case .detail(let code?, _) = error, let known = Int(exactly: code) { status = known }
            throw .httpStatus(endpoint: endpoint.description, operation: operation, status: status, message: errorMessage(reply))
        }
        return reply
    }

    private func errorMessage(_ reply: EtcdReply) -> String {
        let text = reply.message ?? reply.error?.message ?? ""
        return String(text.prefix(300))
    }
}
