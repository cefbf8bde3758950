import RemusCore
@testable import RemusRuntime
import RemusTestSupport
import Testing

// A Xen backup commits checkpoints into a feed queue in front of libxl's restore. The queue is
// bounded by backpressure: after each commit the connection's reader waits for room before it
// reads the next checkpoint, and a feed that stays full ends the connection (the replica keeps
// what it committed) instead of growing or dropping.

/// A streaming replica whose feed has room only when the test says so.
private final class GatedFeedReplica: StreamingReplica, FeedBoundedReplica, @unchecked Sendable {  // guarded by `lock`
    private let lock = MonitorLock()
    private var room = false
    private var waiting = 0
    private var commits: [Bool] = []
    /// When set, the feed never makes room: waits end at once with this answer.
    let stuck: String?

    init(stuck: String? = nil) { self.stuck = stuck }

    func configure(header: StreamHeader, config: DomainConfig) throws {}
    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws { lock.withLock { commits.append(checkpoint) } }
    func activate(clock: any HostClock) throws -> ActivatedGuest { .underHypervisor }
    func discard() {}

    func waitForFeedRoom(until deadlineNs: UInt64) -> String? {
        if let stuck { return stuck }
        return lock.withLock {
            waiting += 1
            lock.broadcast()
            while !room && monotonicNanoseconds() < deadlineNs { lock.wait(untilMonotonic: deadlineNs) }
            waiting -= 1
            return room ? nil : "the test's feed stayed full"
        }
    }

    func openRoom() { lock.withLock { room = true; lock.broadcast() } }
    var snapshot: (waiting: Int, checkpoints: Int) { lock.withLock { (waiting, commits.filter { $0 }.count) } }
}

/// A Xen primary written by hand: the hello, then checkpoints carrying a few bytes of "libxl stream".
/// With `backupMayClose`, a write failing after the first checkpoint ends the sending quietly: the
/// backup is allowed to drop the connection while later checkpoints are still on their way.
private func xenPrimary(port: UInt16, checkpoints: ClosedRange<Epoch>, backupMayClose: Bool = false) throws -> HandWrittenPeer {
    let tcp = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
    let peer = try HandWrittenPeer(channel: tcp, deadline: .after(seconds: 30))
    let header = StreamHeader(features: [], pageSize: 4096, backend: .xen, role: .primary,
                              guestUUID: RecordedGuestStream.uuid, guestName: RecordedGuestStream.name, senderVersion: "test")
    let json = #"{"c_info": {"name": "fuzzed"}, "b_info": {"max_memkb": 4096}}"#
    try RecordWriter.writePreamble(header: header, config: DomainConfig(format: .libxlJSON, bytes: Array(json.utf8)), to: tcp)
    let writer = RecordWriter(channel: tcp, pageSize: 4096)
    let arena = StagingArena(pageSize: 4096, capacityPages: 1)
    for epoch in checkpoints {
        arena.reset(epoch: epoch, kind: .checkpoint)
        let state = GuestState(vcpus: [], devices: [], clock: ClockState(guestMonotonicNs: epoch, guestWallNs: 0, tscKHz: 0, hostMonotonicNs: 0, hostWallNs: 0),
                               layout: MemoryLayout(generation: 0, ranges: []), stream: [UInt8](repeating: UInt8(epoch), count: 64))
        do {
            try writer.writeCheckpoint(arena, state: state)
        } catch where backupMayClose && epoch > checkpoints.lowerBound {
            break
        }
    }
    return peer
}

@Test func theReaderReadsTheNextCheckpointOnlyOnceTheFeedHasRoom() throws {
    let replica = GatedFeedReplica()
    let backup = try FuzzedBackup(expected: [:], xenReplica: { replica })
    defer { backup.stop() }
    let peer = try xenPrimary(port: backup.port, checkpoints: 1...2)
    defer { peer.close() }
    #expect(peer.answer() == "ack 1")
    // The reader waits for room after committing checkpoint 1: checkpoint 2, already sent, is
    // not read, so it cannot have been committed.
    #expect(eventually(deadline: .after(seconds: 10)) { replica.snapshot.waiting == 1 })
    #expect(replica.snapshot.checkpoints == 1)
    replica.openRoom()
    #expect(peer.answer() == "ack 2")
    #expect(replica.snapshot.checkpoints == 2)
}

@Test func aFeedThatStaysFullEndsTheConnectionAndKeepsWhatWasCommitted() throws {
    let replica = GatedFeedReplica(stuck: "300 MiB of acknowledged checkpoints still wait for libxl's restore (bound 256 MiB)")
    let backup = try FuzzedBackup(expected: [:], xenReplica: { replica })
    defer { backup.stop() }
    let peer = try xenPrimary(port: backup.port, checkpoints: 1...3, backupMayClose: true)
    defer { peer.close() }
    // ACK 1 may or may not leave before the connection is dropped (the writer is abandoned);
    // nothing later is acknowledged or committed.
    let acks = peer.acksUntilClosed()
    #expect(acks.allSatisfy { $0 == 1 }, "\(acks)")
    #expect(replica.snapshot.checkpoints == 1)
    // The reader's rejection reaches the loop after the socket closed: wait for it to show.
    #expect(eventually(deadline: .after(seconds: 10)) { backup.status()?.contains("libxl's restore fell behind: 300 MiB") == true },
            "\(backup.status() ?? "no status")")
    #expect(backup.status()?.contains("committed: 1") == true, "\(backup.status() ?? "no status")")
}
