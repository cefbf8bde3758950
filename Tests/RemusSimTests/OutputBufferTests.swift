import RemusCore
@testable import RemusSim
import Synchronization
import Testing
import RemusSystem

@Suite("SimOutputBuffer epoch barriers")
struct OutputBufferTests {
    func packet(_ seq: UInt64, vcpu: UInt32 = 0) -> SimPacket { SimPacket(vcpu: vcpu, seq: seq, opCount: seq, digest: seq) }

    @Test func releaseLetsOutClosedEpochsInOrderExactlyOnce() throws {
        let sink = SimPacketRecorder()
        let buffer = SimOutputBuffer(sink: sink)
        for s in 0..<3 { buffer.emit(packet(UInt64(s))) }
        try buffer.closeEpoch(1)
        for s in 3..<5 { buffer.emit(packet(UInt64(s))) }
        try buffer.closeEpoch(2)
        buffer.emit(packet(5))  // open: epoch 3
        #expect(sink.count == 0)
        #expect(try buffer.statistics() == OutputStatistics(heldPackets: 6, heldBytes: 192))

        try buffer.release(through: 1)
        #expect(sink.received.map(\.seq) == [0, 1, 2])
        try buffer.release(through: 1)
        #expect(sink.count == 3)
        try buffer.release(through: 9)  // only closed epochs go, never the open one
        #expect(sink.received.map(\.seq) == [0, 1, 2, 3, 4])
        #expect(try buffer.statistics().heldPackets == 1)
        try buffer.closeEpoch(3)
        try buffer.release(through: 3)
        #expect(sink.received.map(\.seq) == [0, 1, 2, 3, 4, 5])
        #expect(buffer.deliveredCount == 6)
    }

    @Test func aCoalescedReleaseCoversSeveralEpochs() throws {
        let sink = SimPacketRecorder()
        let buffer = SimOutputBuffer(sink: sink)
        var seq: UInt64 = 0
        for epoch in 1...5 as ClosedRange<Epoch> {
            for _ in 0..<epoch { buffer.emit(packet(seq)); seq += 1 }
            try buffer.closeEpoch(epoch)
        }
        #expect(buffer.heldEpochs.map(\.epoch) == [1, 2, 3, 4, 5])
        try buffer.release(through: 4)
        #expect(sink.received.map(\.seq) == Array(0..<10))
        #expect(buffer.heldEpochs.map(\.packets) == [5])
        try buffer.release(through: 5)
        #expect(sink.received.map(\.seq) == Array(0..<15))
    }

    @Test func releaseAllStopsHoldingAndHoldStartsAgain() throws {
        let sink = SimPacketRecorder()
        let buffer = SimOutputBuffer(sink: sink)
        buffer.emit(packet(0))
        try buffer.closeEpoch(1)
        buffer.emit(packet(1))
        try buffer.releaseAll()
        #expect(sink.received.map(\.seq) == [0, 1])
        #expect(!buffer.isHolding)
        buffer.emit(packet(2))  // passes straight through
        #expect(sink.received.map(\.seq) == [0, 1, 2])
        try buffer.closeEpoch(2)  // harmless while not holding

        try buffer.hold()
        buffer.emit(packet(3))
        #expect(sink.count == 3)
        try buffer.closeEpoch(3)
        try buffer.release(through: 2)
        #expect(sink.count == 3)
        try buffer.release(through: 3)
        #expect(sink.received.map(\.seq) == [0, 1, 2, 3])
    }

    @Test func epochsMustIncrease() throws {
        let buffer = SimOutputBuffer(sink: SimPacketRecorder())
        try buffer.closeEpoch(5)
        #expect(throws: SimError.epochOutOfOrder(epoch: 5, lastClosed: 5)) { try buffer.closeEpoch(5) }
        #expect(throws: SimError.self) { try buffer.closeEpoch(4) }
        try buffer.closeEpoch(6)
    }

    @Test func aFullBufferDropsAndCounts() throws {
        let sink = SimPacketRecorder()
        let buffer = SimOutputBuffer(sink: sink, maxHeldPackets: 2)
        for s in 0..<5 { buffer.emit(packet(UInt64(s))) }
        let stats = try buffer.statistics()
        #expect(stats.heldPackets == 2 && stats.drops == 3 && stats.overlimits == 3)
        try buffer.closeEpoch(1)
        try buffer.release(through: 1)
        #expect(sink.received.map(\.seq) == [0, 1])
    }

    @Test func concurrentEmittersAndReleasesDeliverEachPacketOnceInOrder() throws {
        // Four "vCPUs" emit while the test thread closes and releases epochs, then switches to pass
        // through. Each vCPU's packets must arrive exactly once and in order.
        let sink = SimPacketRecorder()
        let buffer = SimOutputBuffer(sink: sink)
        let perThread: UInt64 = 20_000
        let started = Atomic<Int>(0)
        var threads: [JoinableThread] = []
        for vcpu in 0..<4 as Range<UInt32> {
            threads.append(try JoinableThread(name: "emitter") {
                started.add(1, ordering: .relaxed)
                for seq in 0..<perThread { buffer.emit(SimPacket(vcpu: vcpu, seq: seq, opCount: 0, digest: 0)) }
            })
        }
        var epoch: Epoch = 0
        while sink.count < 10_000 {
            epoch += 1
            try buffer.closeEpoch(epoch)
            try buffer.release(through: epoch)
        }
        try buffer.releaseAll()
        for t in threads { t.join() }
        try buffer.closeEpoch(epoch + 1)
        try buffer.release(through: epoch + 1)
        let received = sink.received
        #expect(received.count == 4 * Int(perThread))
        for vcpu in 0..<4 as Range<UInt32> {
            #expect(received.filter { $0.vcpu == vcpu }.map(\.seq) == Array(0..<perThread))
        }
    }

    @Test func aCheckpointsOutputIsExactlyWhatItsNICStateSaysWasEmitted() throws {
        // A running guest: after checkpoint N is released, the outside world has seen exactly the
        // packets with seq below the NIC sequence captured in checkpoint N, nothing of epoch N + 1.
        var config = smallConfig(vcpus: 3)
        config.packetEveryStores = 4
        // Real time. 20,000 ops/s per vCPU is 5,000 packets/s per vCPU: the NIC's 1 Mi held packets
        // would take a 70 s stall within one epoch to fill. At 300,000 ops/s a 4.7 s stall did,
        // on a CI machine under stress-ng, and the dropped packets failed this check.
        config.opRateLimit = 20_000
        let clock = SystemHostClock()
        let recorder = SimPacketRecorder()
        let nic = SimOutputBuffer(sink: recorder)
        let guest = try SimGuest(config: config, clock: clock, nic: nic)
        defer { guest.shutdown() }
        let loop = try CheckpointLoop(primary: guest, replica: SimReplica(clock: clock, autoRunOnActivation: false), clock: clock)
        for _ in 0..<25 {
            #expect(guest.waitForProgress(ops: guest.publishedOpCounts.max()! + 2_000, timeoutNs: 20 * secondNs))
            let state = try loop.checkpoint()
            // A full buffer drops as a plug qdisc would; that is not what this test checks.
            try #require(try nic.statistics().drops == 0, "the NIC's buffer filled and dropped packets")
            let nicSeq = try state.vcpus.map { try SimRegisters($0).nicSeq }
            let seen = recorder.received
            for vcpu in 0..<config.vcpus {
                let difference = Self.differenceFromPrefix(seen.filter { $0.vcpu == vcpu }.map(\.seq), count: nicSeq[vcpu])
                #expect(difference == nil, "vCPU \(vcpu): \(difference ?? "")")
            }
            #expect(try NICState.decode(state.devices[0]) == nicSeq)
        }
    }

    /// Where `seqs` departs from 0, 1, …, count − 1, in a line (a diff of two long arrays would
    /// be megabytes of test output), or nil when it is exactly that.
    static func differenceFromPrefix(_ seqs: [UInt64], count: UInt64) -> String? {
        for (index, seq) in seqs.enumerated() where seq != UInt64(index) {
            return "packet \(index) has seq \(seq), expected \(index) (\(seqs.count) seen, \(count) emitted per the NIC state)"
        }
        guard UInt64(seqs.count) == count else {
            return "\(seqs.count) packets seen in order, but the NIC state says \(count) were emitted"
        }
        return nil
    }
}
