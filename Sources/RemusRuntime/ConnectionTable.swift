import RemusCore
import RemusSystem

/// The backup's open replication connections, the cap on those not yet accepted as a primary,
/// and the deadline each connection must meet next (I10, slowloris): one watchdog thread drops
/// a connection whose deadline passed by shutting its socket down, which ends its reader's
/// blocked read. A connection is in one of three phases:
///
/// - **pending** (accepted, not yet the primary): TLS handshake, stream header and
///   DOMAIN_CONFIG must all arrive by one deadline (`helloBudgetNs` after the accept). At most
///   `pendingLimit` connections are pending at once; beyond it a new one is closed at once.
/// - **streaming, between records**: no deadline here; the committer's silence timeout governs.
/// - **streaming, inside a record**: the record must complete by `recordDeadline(…)` after its
///   first byte arrived: bytes trickling in do not extend it.
///
/// `@unchecked Sendable`: every field is guarded by `monitor`.
final class ConnectionTable: @unchecked Sendable {
    /// One connection's entry, handed to its reader thread.
    final class Ticket: @unchecked Sendable {  // fields guarded by the table's monitor
        let id: Int
        let peer: String
        fileprivate let table: ConnectionTable
        fileprivate var pending = true
        fileprivate var deadline: UInt64?
        fileprivate var why = ""
        /// When the record being received started (monotonic ns), nil between records.
        fileprivate var recordStartedAt: UInt64?

        fileprivate init(id: Int, peer: String, table: ConnectionTable) {
            self.id = id
            self.peer = peer
            self.table = table
        }

        /// The connection was accepted as the primary: it no longer counts against the cap, and
        /// only record deadlines apply from now on.
        func admitted() { table.update(self) { $0.pending = false; $0.deadline = nil; $0.recordStartedAt = nil } }

        /// Called by the reader after every read: `pendingBytes` is the size of the item being
        /// received (nil when the buffer ends at an item boundary).
        func progress(pendingBytes: Int?) {
            table.update(self) { t in
                guard !t.pending else { return }
                guard let bytes = pendingBytes else {
                    t.recordStartedAt = nil
                    t.deadline = nil
                    return
                }
                let now = monotonicNanoseconds()
                let started = t.recordStartedAt ?? now
                t.recordStartedAt = started
                t.deadline = started + ConnectionTable.recordBudgetNs(bytes: bytes, silenceNs: t.table.silenceNs)
                t.why = "a record of \(bytes) bytes did not arrive within \(ConnectionTable.recordBudgetNs(bytes: bytes, silenceNs: t.table.silenceNs) / 1_000_000) ms"
            }
        }

        /// A whole item was decoded: the next record's clock starts with its first byte.
        func itemComplete() { table.update(self) { t in guard !t.pending else { return }; t.recordStartedAt = nil; t.deadline = nil } }

        /// The connection ended (closed by either side).
        func closed() { table.remove(self) }
    }

    /// Slowest rate at which a record may arrive, bytes per second (1 MiB/s): far below any link
    /// a checkpoint stream can use, far above a trickle.
    static let minimumRecordRate: UInt64 = 1 << 20

    /// How long a record of `bytes` bytes may take from its first byte to its last: the
    /// committer's silence timeout, plus its length at `minimumRecordRate`.
    static func recordBudgetNs(bytes: Int, silenceNs: UInt64) -> UInt64 {
        silenceNs + UInt64(bytes) * 1_000_000_000 / minimumRecordRate
    }

    let pendingLimit: Int
    let helloBudgetNs: UInt64
    let silenceNs: UInt64
    private let monitor = MonitorLock()
    private var tickets: [Int: (ticket: Ticket, channel: any ByteChannel)] = [:]
    private var nextID = 0
    private var watchdogStarted = false
    /// The deadline the watchdog sleeps until (`.max`: none), 0 while it is awake. A change wakes
    /// it only when it brings a deadline earlier than that: every read moves a deadline later,
    /// and waking the watchdog for each cost a backup a tenth of its CPU in a Xen live phase.
    private var watchdogSleepsUntil: UInt64 = 0
    /// What the watchdog did (for status and tests): connections dropped for a missed deadline,
    /// connections refused at once over the cap.
    private(set) var dropped = 0
    private(set) var refusedOverCap = 0

    /// - Parameters:
    ///   - pendingLimit: connections that may be pending at once (`--max-pending-connections`).
    ///   - helloBudgetNs: from accept to an accepted hello (TLS handshake, header, DOMAIN_CONFIG).
    ///   - silenceNs: the committer's silence timeout (the base of every record's budget).
    init(pendingLimit: Int, helloBudgetNs: UInt64, silenceNs: UInt64) {
        self.pendingLimit = pendingLimit
        self.helloBudgetNs = helloBudgetNs
        self.silenceNs = silenceNs
    }

    /// Registers an accepted connection, or returns nil when `pendingLimit` connections are
    /// already pending (the caller closes it at once). A connection from `preferredHost` (the
    /// primary this backup holds an image of) is never refused for the cap: it takes the place
    /// of the oldest pending connection from another host, which is dropped.
    func register(_ channel: TCPChannel, preferredHost: String?) -> Ticket? {
        let host = Endpoint(parsing: channel.peer, defaultPort: 0)?.host
        let result: (Ticket?, evicted: (any ByteChannel)?) = monitor.withLock {
            let pending = tickets.values.filter { $0.ticket.pending }
            var evicted: (any ByteChannel)?
            if pending.count >= pendingLimit {
                guard let preferredHost, host == preferredHost,
                      let victim = pending.filter({ Endpoint(parsing: $0.ticket.peer, defaultPort: 0)?.host != preferredHost }).min(by: { $0.ticket.id < $1.ticket.id })
                else {
                    refusedOverCap += 1
                    return (nil, nil)
                }
                tickets[victim.ticket.id] = nil
                dropped += 1
                evicted = victim.channel
            }
            nextID += 1
            let ticket = Ticket(id: nextID, peer: channel.peer, table: self)
            ticket.deadline = monotonicNanoseconds() + helloBudgetNs
            ticket.why = "no accepted hello (TLS handshake, stream header and DOMAIN_CONFIG) within \(helloBudgetNs / 1_000_000) ms"
            tickets[ticket.id] = (ticket, channel)
            startWatchdogIfNeeded()
            wakeWatchdogIfEarlier(ticket.deadline)
            return (ticket, evicted)
        }
        if let evicted = result.evicted {
            Log.warning("dropped a pending connection from \(evicted.peer) to make room for \(channel.peer), the address of the primary this backup holds; nothing changed here")
            evicted.shutdown()
        }
        return result.0
    }

    /// Connections pending now and streaming now.
    var counts: (pending: Int, streaming: Int) {
        monitor.withLock {
            let pending = tickets.values.filter { $0.ticket.pending }.count
            return (pending, tickets.count - pending)
        }
    }

    fileprivate func update(_ ticket: Ticket, _ body: (Ticket) -> Void) {
        monitor.withLock {
            body(ticket)
            wakeWatchdogIfEarlier(ticket.deadline)
        }
    }

    /// A removed ticket's deadline only goes away: the watchdog wakes at the old one, finds
    /// nothing due and sleeps until the next.
    fileprivate func remove(_ ticket: Ticket) {
        monitor.withLock { tickets[ticket.id] = nil }
    }

    /// Called with the monitor held.
    private func wakeWatchdogIfEarlier(_ deadline: UInt64?) {
        if let deadline, deadline < watchdogSleepsUntil { monitor.broadcast() }
    }

    private func startWatchdogIfNeeded() {
        guard !watchdogStarted else { return }
        watchdogStarted = true
        startThread(name: "connection-deadlines") { [self] in watch() }
    }

    /// Drops every connection whose deadline passed; sleeps until the earliest next one.
    private func watch() {
        while true {
            let expired: [(Ticket, any ByteChannel, String)] = monitor.withLock {
                let now = monotonicNanoseconds()
                let due = tickets.values.filter { ($0.ticket.deadline ?? .max) <= now }
                for entry in due {
                    entry.ticket.deadline = nil
                    tickets[entry.ticket.id] = nil
                    dropped += 1
                }
                if due.isEmpty {
                    let next = tickets.values.compactMap { $0.ticket.deadline }.min()
                    watchdogSleepsUntil = next ?? .max
                    monitor.wait(untilMonotonic: next)
                    watchdogSleepsUntil = 0
                }
                return due.map { ($0.ticket, $0.channel, $0.ticket.why) }
            }
            for (ticket, channel, why) in expired {
                Log.warning("dropped the connection from \(ticket.peer): \(why); its partial data was discarded, nothing it sent was committed")
                channel.shutdown()
            }
        }
    }
}
