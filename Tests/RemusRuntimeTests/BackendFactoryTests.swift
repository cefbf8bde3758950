import RemusCore
@testable import RemusRuntime
import RemusSim
import Testing

// The runtime reaches a backend through the factory and switches over what the guest or replica
// says it is. These tests hold the two replica shapes apart: a checkpoint of the other shape than
// the replica takes is refused whole, and the replica keeps what it had.

/// A streaming replica that keeps every `commitStream` call.
private final class StreamCommits: StreamingReplica {
    private(set) var commits: [(bytes: [UInt8], checkpoint: Bool)] = []
    func configure(header: StreamHeader, config: DomainConfig) throws {}
    func commitStream(_ bytes: [UInt8], checkpoint: Bool) throws { commits.append((bytes, checkpoint)) }
    func activate(clock: any HostClock) throws -> ActivatedGuest { .underHypervisor }
    func discard() {}
}

private let simConfig = SimConfig(memoryBytes: 4 << 20, vcpus: 1)
private let simHeader = StreamHeader(features: [], pageSize: 4096, backend: .simulated, role: .primary,
                                     guestUUID: GuestUUID(high: 7, low: 7), guestName: "shapes", senderVersion: "test")
private let someClock = ClockState(guestMonotonicNs: 1, guestWallNs: 1, tscKHz: 1, hostMonotonicNs: 1, hostWallNs: 1)

/// Checkpoint 1 staged with one zero page and the state records, and `stream` as its hypervisor stream bytes.
private func staged(pages: Int, stream: [UInt8]) -> StagedCheckpoint {
    let checkpoint = StagedCheckpoint(pageSize: 4096, guestBytes: simConfig.memoryBytes)
    try! checkpoint.reset(CheckpointBegin(epoch: 1, kind: .checkpoint))  // no disk staging: cannot throw
    for pfn in 0..<UInt64(pages) { checkpoint.arenaWithRoom().append(pfn: pfn, encoding: .zero) }
    checkpoint.clock = someClock
    checkpoint.layout = RemusCore.MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: simConfig.pageCount)])
    checkpoint.stream = stream
    return checkpoint
}

@Suite("Backends: the factory, and replicas of two shapes")
struct BackendFactoryTests {
    @Test("A checkpoint carrying pages is refused by a replica that takes a hypervisor's stream, which gets nothing")
    func pagesRefusedByAStreamingReplica() throws {
        let replica = StreamCommits()
        let error = #expect(throws: ProtocolError.self) { try staged(pages: 3, stream: [1, 2, 3]).commit(to: replica) }
        #expect(error?.description.contains("carries 3 pages") == true, "\(String(describing: error))")
        #expect(replica.commits.isEmpty)
        // The same checkpoint without pages goes through, bytes and flag as staged.
        try staged(pages: 0, stream: [1, 2, 3]).commit(to: replica)
        #expect(replica.commits.count == 1 && replica.commits.first?.bytes == [1, 2, 3] && replica.commits.first?.checkpoint == true)
    }

    @Test("A checkpoint carrying a hypervisor's stream is refused by a page replica, which keeps its image")
    func streamRefusedByAPageReplica() throws {
        let replica = SimReplica(clock: SystemClock(), autoRunOnActivation: false)
        try replica.configure(header: simHeader, config: simConfig.encode())
        let before = replica.memoryDigest()
        let error = #expect(throws: ProtocolError.self) { try staged(pages: 0, stream: [9]).commit(to: replica) }
        #expect(error?.description.contains("1 bytes of a hypervisor library's stream") == true, "\(String(describing: error))")
        #expect(replica.committedEpoch == nil && replica.memoryDigest() == before)
    }

    @Test("The standard factory builds a page replica with an activation check for a simulated stream")
    func standardFactoryBuildsTheSimulatedReplica() throws {
        let built = try BackendFactory.standard.makeReplica(for: simHeader, guestNIC: SimPacketRecorder(), clock: SystemClock())
        guard case .pages = built.target.commitMode else {
            Issue.record("a simulated stream got a replica that does not take pages")
            return
        }
        #expect(built.verifyActivation != nil)
        // Not activated yet: the check says so instead of verifying nothing.
        try built.target.configure(header: simHeader, config: simConfig.encode())
        #expect(try built.verifyActivation?(SystemClock())["verified"] == "the simulated replica holds no activated guest")
    }
}
