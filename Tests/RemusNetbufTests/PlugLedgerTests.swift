import RemusCore
@testable import RemusNetbuf
import Testing

/// A guest, its plug (the model) and the ledger driving it, with an oracle for invariant I1.
private struct Harness {
    var plug = SchPlugModel()
    var ledger = PlugLedger()
    var nextPacket = 0
    /// The epoch the guest is running (output now belongs to it).
    var runningEpoch: UInt64 = 1
    var acknowledged: UInt64 = 0
    /// Packets that may leave regardless of ACKs: emitted while not holding, or covered by releaseAll.
    var freed = Set<Int>()
    var failNext: Set<PlugCommand> = []

    mutating func emit(_ count: Int = 1) {
        for _ in 0..<count {
            nextPacket += 1
            if !ledger.holding { freed.insert(nextPacket) }
            plug.enqueue(.init(number: nextPacket, epoch: runningEpoch))
        }
    }

    /// Runs one ledger operation; the commands it sent reach the plug in order, the failing one
    /// (if any) does not.
    mutating func run(_ operation: (inout PlugLedger, (PlugCommand) throws -> Void) throws -> Void) {
        var sentCommands: [PlugCommand] = []
        let fail = failNext
        try? operation(&ledger) { command in
            if fail.contains(command) { throw NetbufError.tornDown }
            sentCommands.append(command)
        }
        for command in sentCommands { plug.apply(command) }
    }

    mutating func close() {
        let epoch = runningEpoch
        run { ledger, send in try ledger.close(epoch, send: send) }
        runningEpoch += 1
    }

    mutating func ack(_ epoch: UInt64) {
        acknowledged = max(acknowledged, epoch)
        run { ledger, send in try ledger.acknowledge(through: epoch, send: send) }
    }

    mutating func releaseAll() {
        run { ledger, send in try ledger.releaseAll(send: send) }
        if !ledger.holding, nextPacket > 0 { freed.formUnion(1...nextPacket) }
    }

    mutating func hold() { run { ledger, send in try ledger.hold(send: send) } }

    /// I1 and order: every packet out belongs to an acknowledged epoch (or was freed), in FIFO order.
    func checkSafety(_ context: @autoclosure () -> String) {
        for packet in plug.sent where !freed.contains(packet.number) {
            #expect(packet.epoch <= acknowledged,
                    "packet \(packet.number) of epoch \(packet.epoch) left before its ACK (acked \(acknowledged)); \(context())")
        }
        let numbers = plug.sent.map(\.number)
        #expect(numbers == numbers.sorted(), "packets left out of order: \(numbers); \(context())")
    }
}

// The project's deterministic generator (SplitMix64), so a failing seed can be replayed.
extension SplitMix64 {
    fileprivate mutating func below(_ n: UInt64) -> UInt64 { next() % n }
}

@Suite("PlugLedger against a model of sch_plug")
struct PlugLedgerTests {
    @Test("ACK before the next checkpoint releases exactly the epochs acknowledged")
    func lockstepReleasesExactlyTheAcknowledgedEpochs() {
        var h = Harness()
        for epoch in 1...20 as ClosedRange<UInt64> {
            h.emit(Int(epoch % 4))          // 0…3 packets per epoch, some epochs silent
            h.close()
            h.emit(2)                       // epoch+1 output, emitted before the ACK arrives
            h.ack(epoch)
            #expect(h.plug.sent.count + h.plug.queue.count == h.nextPacket, "no packet vanished")
            #expect(h.plug.sent.allSatisfy { $0.epoch <= epoch })
            #expect(h.plug.queue.allSatisfy { $0.epoch > epoch }, "epoch \(epoch): held \(h.plug.queue)")
        }
    }

    @Test("Pairing every checkpoint with a barrier would release an unacknowledged epoch (the kernel keeps one)")
    func naivePairingBreaksOutputCommitWhenAcksLag() {
        // Barrier at every close, release-one at every ACK: what the plug's doc comment suggests.
        var plug = SchPlugModel()
        plug.enqueue(.init(number: 1, epoch: 1))
        plug.apply(.buffer)                                  // close 1
        for n in 2...4 { plug.enqueue(.init(number: n, epoch: 2)) }
        plug.apply(.buffer)                                  // close 2 before ACK 1: overwrites the count
        plug.apply(.releaseOne)                              // ACK 1
        #expect(plug.sent.contains { $0.epoch == 2 }, "the model must reproduce the kernel's one-slot hazard")
    }

    @Test("With ACKs lagging, the ledger merges epochs and never releases early")
    func pipelinedAcksMergeEpochsButStaySafe() {
        var h = Harness()
        h.emit(1); h.close()                 // epoch 1 → barrier
        h.emit(3); h.close()                 // epoch 2 → slot busy: merged
        #expect(h.ledger.pendingBarrier == 1)
        h.ack(1)
        #expect(h.plug.sent.map(\.number) == [1])
        h.checkSafety("after ack 1")
        h.ack(2)                             // epoch 2 has no barrier of its own yet: stays held
        #expect(h.plug.sent.map(\.number) == [1])
        h.emit(2); h.close()                 // epoch 3: one barrier covering epochs 2 and 3
        #expect(h.ledger.pendingBarrier == 3)
        h.ack(3)
        #expect(h.plug.sent.map(\.number) == [1, 2, 3, 4, 5, 6])
        #expect(h.plug.queue.isEmpty)
    }

    @Test("A coalesced ACK releases the barrier it covers, once")
    func coalescedAckReleasesOnce() {
        var commands: [PlugCommand] = []
        var ledger = PlugLedger()
        try? ledger.close(1) { commands.append($0) }
        try? ledger.close(2) { commands.append($0) }
        try? ledger.acknowledge(through: 2) { commands.append($0) }
        try? ledger.acknowledge(through: 2) { commands.append($0) }
        try? ledger.acknowledge(through: 1) { commands.append($0) }
        #expect(commands == [.buffer, .releaseOne])
        #expect(ledger.releasedThrough == 1 && ledger.acknowledgedThrough == 2)
    }

    @Test("Epochs must increase")
    func closingAnOldEpochThrows() {
        var ledger = PlugLedger()
        try? ledger.close(5) { _ in }
        #expect(throws: NetbufError.self) { try ledger.close(5) { _ in } }
        #expect(throws: NetbufError.self) { try ledger.close(3) { _ in } }
        #expect(ledger.closedThrough == 5)
    }

    @Test("releaseAll lets everything out; hold starts a fresh epoch")
    func releaseAllAndHold() {
        var h = Harness()
        h.emit(2); h.close(); h.emit(3)
        h.releaseAll()
        #expect(h.plug.queue.isEmpty && h.plug.sent.count == 5)
        h.emit(2)                            // flows while not holding
        #expect(h.plug.sent.count == 7)
        h.hold()
        h.emit(1); h.close(); h.emit(1)
        #expect(h.plug.sent.count == 7)
        h.ack(h.runningEpoch - 1)
        #expect(h.plug.sent.count == 8 && h.plug.queue.count == 1)
        h.checkSafety("after hold")
    }

    @Test("A failed command leaves the ledger as it was, and output only leaves later", arguments: [PlugCommand.buffer, .releaseOne])
    func failedCommandsDelayButNeverReleaseEarly(_ failing: PlugCommand) {
        var h = Harness()
        h.emit(2); h.close(); h.ack(1)
        h.failNext = [failing]
        h.emit(2); h.close(); h.emit(1); h.ack(2)
        h.checkSafety("with \(failing) failing")
        h.failNext = []
        for _ in 0..<3 { h.emit(1); h.close(); h.ack(h.runningEpoch - 1) }
        h.checkSafety("after recovery")
        #expect(h.plug.queue.isEmpty, "everything acknowledged left eventually: \(h.plug.queue)")
    }

    @Test("Random schedules keep I1 and order, and two lockstep rounds drain everything", arguments: 0..<200 as Range<UInt64>)
    func randomSchedules(seed: UInt64) {
        var random = SplitMix64(seed: seed)
        var h = Harness()
        var log: [String] = []
        for _ in 0..<60 {
            switch random.below(100) {
            case 0..<40:
                let n = Int(random.below(4)); h.emit(n); log.append("emit \(n)")
            case 40..<65:
                h.close(); log.append("close \(h.runningEpoch - 1)")
            case 65..<92:
                let closed = h.ledger.closedThrough
                if closed > 0 {
                    let epoch = closed - random.below(min(closed, 3))
                    h.ack(epoch); log.append("ack \(epoch)")
                }
            case 92..<96:
                h.releaseAll(); log.append("releaseAll")
            default:
                h.hold(); log.append("hold")
            }
            if random.below(10) == 0 { h.failNext = [PlugCommand.allCases[Int(random.below(3))]] } else { h.failNext = [] }
            h.checkSafety("seed \(seed): \(log.joined(separator: ", "))")
        }
        h.failNext = []
        h.hold()
        for _ in 0..<2 { h.close(); h.ack(h.runningEpoch - 1) }
        h.checkSafety("seed \(seed) final")
        #expect(h.plug.queue.isEmpty, "seed \(seed): held after two lockstep rounds: \(h.plug.queue); \(log)")
    }
}
