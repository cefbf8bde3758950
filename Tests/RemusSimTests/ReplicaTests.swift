import RemusCore
@testable import RemusSim
import Testing

@Suite("SimReplica, activation and the verifier")
struct ReplicaTests {
    @Test func captureAndCommitReproduceMemoryExactly() throws {
        let config = smallConfig()
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        let loop = try CheckpointLoop(primary: guest, replica: replica, clock: clock)
        for _ in 0..<6 {
            guest.stepAll(ops: 4_000)
            try loop.checkpoint()
            #expect(replica.memoryDigest() == (try guest.memoryDigest()))
            for pfn in 0..<config.pageCount {
                let committed = replica.committedCopy(pfn)
                if guest.memory.absent.test(pfn) {
                    #expect(committed == nil)
                } else if let committed {
                    if !committed.elementsEqual(guest.memory.pageBytes(pfn)) {
                        Issue.record("pfn \(pfn) differs after epoch \(loop.epoch)")
                    }
                } else {
                    Issue.record("pfn \(pfn) populated on the primary, absent on the replica")
                }
            }
        }
        #expect(replica.committedEpoch == 6)
        #expect(replica.committedState == loop.lastState)
    }

    @Test func checkpointsOfARunningGuestThenActivationPassTheVerifier() throws {
        var config = smallConfig(vcpus: 2)
        config.opRateLimit = 400_000  // real time: bounds the ops the verifier replays
        let clock = SystemHostClock()
        let primaryOut = SimPacketRecorder()
        let primaryNIC = SimOutputBuffer(sink: primaryOut)
        let primary = try SimGuest(config: config, clock: clock, nic: primaryNIC)
        let backupOut = SimPacketRecorder()
        let backupNIC = SimOutputBuffer(sink: backupOut, holding: false)
        let replica = SimReplica(clock: clock, nic: backupNIC)
        let loop = try CheckpointLoop(primary: primary, replica: replica, clock: clock)
        // Each epoch lasts at least 5 000 ops of every vCPU.
        func runEpoch() {
            #expect(primary.waitForProgress(ops: primary.publishedOpCounts.max()! + 5_000, timeoutNs: 20 * secondNs))
        }
        for _ in 0..<15 {
            runEpoch()
            try loop.checkpoint()
        }
        // The backup commits one more checkpoint but its ACK never reaches the primary: that epoch's
        // output is never released and the backup resumes after it (a gap, as a lost packet).
        runEpoch()
        let beforeUnacked = try #require(loop.lastState)
        try loop.checkpoint(release: false)
        // The primary keeps running and emitting; then a checkpoint is captured but never committed,
        // and the primary dies. Its held output is lost with it (the backup emits it again).
        runEpoch()
        try loop.checkpoint(commit: false)
        primary.shutdown()
        #expect(try primaryNIC.statistics().heldPackets > 0)
        let committed = try #require(loop.lastState)

        // The activated guest runs in this process and can be protected onwards, with its NIC's buffer.
        let handedBack = try replica.activate(clock: clock)
        let activated = try #require(replica.activatedGuest)
        defer { activated.shutdown() }
        guard case .inProcess(let running, let output) = handedBack else {
            Issue.record("a simulated replica's activation handed back \(handedBack), not the guest running here")
            return
        }
        #expect(running === activated && output === backupNIC)
        try activated.suspend()
        let verifier = SimVerifier(config: config)
        let atActivation = verifier.verifyActivation(replica: replica)
        #expect(atActivation.passed, "\(atActivation)")

        // The guest continues the workload from the committed registers.
        try activated.resume()
        let resumedAt = try #require(committed.vcpus.map { try SimRegisters($0).opCount }.max())
        #expect(activated.waitForProgress(ops: resumedAt + 20_000, timeoutNs: 20 * secondNs))
        try activated.suspend()
        let later = verifier.verifyActivation(guest: activated, committed: committed)
        #expect(later.passed, "\(later)")
        #expect(later.counter("opsSinceActivation")! >= 20_000)

        let packets = verifier.verifyPackets(
            fromPrimary: primaryOut.received, fromActivated: backupOut.received, activated: committed)
        #expect(packets.passed, "\(packets)")
        #expect(packets.counter("observed") == UInt64(primaryOut.count + backupOut.count))
        #expect(primaryOut.count > 0 && backupOut.count > 0)
        let unacked = try zip(committed.vcpus, beforeUnacked.vcpus).reduce(UInt64(0)) {
            $0 + (try SimRegisters($1.0).nicSeq - SimRegisters($1.1).nicSeq)
        }
        #expect(unacked > 0)
        #expect(packets.counter("gaps") == unacked)
    }

    @Test("A replica prepared for a takeover holds its guest parked: no op, no packet until activate, then it runs on from the checkpoint")
    func aPreparedGuestRunsNothingUntilActivated() throws {
        var config = smallConfig(vcpus: 2)
        config.opRateLimit = 400_000  // real time: bounds the ops the verifier replays
        let clock = SystemHostClock()
        let primary = try SimGuest(config: config, clock: clock, nic: SimOutputBuffer(sink: SimPacketRecorder()))
        let backupOut = SimPacketRecorder()
        let replica = SimReplica(clock: clock, nic: SimOutputBuffer(sink: backupOut, holding: false))
        let loop = try CheckpointLoop(primary: primary, replica: replica, clock: clock)
        for _ in 0..<4 {
            #expect(primary.waitForProgress(ops: primary.publishedOpCounts.max()! + 5_000, timeoutNs: 20 * secondNs))
            try loop.checkpoint()
        }
        primary.shutdown()
        let committed = try #require(loop.lastState)
        let committedOps = try committed.vcpus.map { try SimRegisters($0).opCount }

        try replica.prepareActivation(clock: clock)
        let prepared = try #require(replica.preparedGuest)
        #expect(replica.activatedGuest == nil)
        // Every vCPU thread parks before its first op: once all are parked, none has run one.
        try prepared.suspend()
        #expect(try prepared.registers().map(\.opCount) == committedOps, "a prepared guest ran ops before its activation (I7)")
        #expect(backupOut.count == 0, "a prepared guest emitted packets before its activation (I7)")
        let verifier = SimVerifier(config: config)
        let atPreparation = verifier.verifyActivation(guest: prepared, committed: committed)
        #expect(atPreparation.passed, "\(atPreparation)")
        // Nothing more may reach it: it is no longer the replica of a stream.
        #expect(throws: SimError.self) { try replica.commit(loop.arena, state: committed) }

        guard case .inProcess(let running, _) = try replica.activate(clock: clock) else {
            Issue.record("a simulated replica's activation did not hand back the guest running here")
            return
        }
        defer { prepared.shutdown() }
        #expect(running === prepared && replica.activatedGuest === prepared && replica.preparedGuest == nil)
        #expect(prepared.waitForProgress(ops: committedOps.max()! + 5_000, timeoutNs: 20 * secondNs), "the activated guest runs")
        try prepared.suspend()
        let later = verifier.verifyActivation(guest: prepared, committed: committed)
        #expect(later.passed, "\(later)")
    }

    @Test func aCorruptedReplicaPageFailsTheVerifier() throws {
        let config = smallConfig()
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        let loop = try CheckpointLoop(primary: guest, replica: replica, clock: clock)
        guest.stepAll(ops: 8_000)
        try loop.checkpoint()
        let verifier = SimVerifier(config: config)
        #expect(verifier.verifyActivation(replica: replica).passed)

        let victim = try #require((0..<config.pageCount).first { guest.memory.written.test($0) && !guest.memory.absent.test($0) })
        let corrupted = replica.withCommittedPage(victim) { page -> Bool in
            guard let page else { return false }
            UnsafeMutableRawPointer(mutating: page.baseAddress!).storeBytes(of: 0xA5, toByteOffset: 100, as: UInt8.self)
            return true
        }
        #expect(corrupted)
        let report = verifier.verifyActivation(replica: replica)
        #expect(!report.passed)
        #expect(report.mismatches.contains { $0.contains("pfn \(victim) ") && $0.contains("byte 96") }, "\(report)")
        #expect(report.mismatches.contains { $0.hasPrefix("memory digest") })
    }

    @Test func aCorruptedRegisterOrLayoutFailsTheVerifier() throws {
        let config = smallConfig()
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        _ = try CheckpointLoop(primary: guest, replica: replica, clock: clock)
        guest.stepAll(ops: 3_000)
        var state = try guest.captureState(clock: clock)
        let verifier = SimVerifier(config: config)

        var registers = try SimRegisters(state.vcpus[1])
        registers.accumulator ^= 1
        state.vcpus[1] = registers.encode(vcpu: 1)
        let activated = try SimGuest(
            config: config, clock: clock, nic: nil, autoRun: false)  // any guest at boot: memory differs too
        let report = verifier.verifyActivation(guest: activated, committed: state)
        #expect(!report.passed)
        #expect(report.mismatches.contains { $0.hasPrefix("vCPU 1 committed registers") }, "\(report)")

        var layoutState = try guest.captureState(clock: clock)
        layoutState.layout.generation += 1
        let layoutReport = verifier.verifyActivation(guest: guest, committed: layoutState)
        #expect(layoutReport.mismatches.contains { $0.hasPrefix("committed layout") }, "\(layoutReport)")
    }

    @Test func balloonedPagesAreAbsentAndTheLayoutRoundTrips() throws {
        var config = smallConfig()
        config.balloonPeriod = 50
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        let loop = try CheckpointLoop(primary: guest, replica: replica, clock: clock)
        guest.step(vcpu: 0, ops: 1_000)  // 20 transitions: page given back and taken again
        guest.step(vcpu: 1, ops: 1_050)  // 21 transitions: a page is out now
        try loop.checkpoint()
        let registers = try guest.registers()
        #expect(registers[0].balloonPFN == SimRegisters.noBalloonPage)
        let out = registers[1].balloonPFN
        #expect(out != SimRegisters.noBalloonPage)
        let state = try #require(loop.lastState)
        #expect(state.layout.generation == 41)
        #expect(state.layout.ranges == [
            PFNRange(start: 0, count: out), PFNRange(start: out + 1, count: config.pageCount - out - 1),
        ])
        #expect(state.layout.pageCount == config.pageCount - 1)
        #expect(replica.committedState?.layout == state.layout)
        #expect(replica.committedCopy(out) == nil)
        #expect(guest.memory.absent.test(out))

        // Taken again, the page comes back populated and zero-filled.
        guest.step(vcpu: 1, ops: 50)
        #expect(try guest.registers()[1].balloonPFN == SimRegisters.noBalloonPage)
        let taken = try loop.checkpoint()
        #expect(taken.layout.ranges == [PFNRange(start: 0, count: config.pageCount)])
        #expect(loop.arena.count > 0)
        let entry = try #require((0..<loop.arena.count).map(loop.arena.entry).first { $0.pfn == out })
        #expect(entry.encoding != .absent)
        let back = try #require(replica.committedCopy(out))
        #expect(back.allSatisfy { $0 == 0 })
        #expect(SimVerifier(config: config).verifyActivation(replica: replica).passed)
    }

    @Test func aDirtyGivenBackPageIsCapturedAsAbsent() throws {
        var config = smallConfig()
        config.balloonPeriod = 10
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        try guest.harvestDirty(into: &bitmap)
        guest.step(vcpu: 0, ops: 10)
        let out = try guest.registers()[0].balloonPFN
        bitmap.clearAll()
        try guest.harvestDirty(into: &bitmap)
        let outDirty = bitmap.isSet(out)
        #expect(outDirty)
        let arena = StagingArena(pageSize: config.pageSize, capacityPages: 64)
        try guest.capturePages(bitmap, into: arena)
        let entry = try #require((0..<arena.count).map(arena.entry).first { $0.pfn == out })
        #expect(entry.encoding == .absent)
    }

    @Test func anInconsistentCheckpointIsRejectedAndTheCommittedOneStays() throws {
        let config = smallConfig()
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        let loop = try CheckpointLoop(primary: guest, replica: replica, clock: clock)
        guest.stepAll(ops: 3_000)
        try loop.checkpoint()
        let digest = replica.memoryDigest()
        let state = try #require(loop.lastState)

        // A page beyond the guest, after a legitimate one that must not be applied either.
        let arena = StagingArena(pageSize: config.pageSize, capacityPages: 4)
        arena.reset(epoch: 2, kind: .checkpoint)
        let written = try #require((0..<config.pageCount).first { guest.memory.written.test($0) })
        arena.append(pfn: written, encoding: .raw)!.initializeMemory(as: UInt8.self, repeating: 0xEE)
        arena.append(pfn: config.pageCount + 5, encoding: .raw)!.initializeMemory(as: UInt8.self, repeating: 1)
        #expect(throws: SimError.self) { try replica.commit(arena, state: state) }
        #expect(replica.memoryDigest() == digest)
        #expect(replica.committedEpoch == 1)

        // An old epoch, a pre-copy after a checkpoint, a wrong vCPU count.
        arena.reset(epoch: 1, kind: .checkpoint)
        #expect(throws: SimError.self) { try replica.commit(arena, state: state) }
        arena.reset(epoch: 0, kind: .precopy)
        #expect(throws: SimError.self) { try replica.commit(arena, state: nil) }
        var oneVCPU = state
        oneVCPU.vcpus.removeLast()
        arena.reset(epoch: 3, kind: .checkpoint)
        #expect(throws: SimError.self) { try replica.commit(arena, state: oneVCPU) }
        #expect(SimVerifier(config: config).verifyActivation(replica: replica).passed)
    }

    @Test func replicaPhasesAreEnforced() throws {
        let config = smallConfig()
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        #expect(throws: SimError.self) { try replica.activate(clock: clock) }
        try replica.configure(header: header(for: guest), config: try guest.domainConfig())
        try replica.configure(header: header(for: guest), config: try guest.domainConfig())  // same guest again: fine
        var other = config
        other.seed += 1
        #expect(throws: SimError.self) { try replica.configure(header: header(for: guest), config: other.encode()) }
        #expect(throws: SimError.self) { try replica.activate(clock: clock) }  // nothing committed yet
        replica.discard()
        #expect(replica.committedCopy(0) == nil)
        #expect(throws: SimError.self) { try replica.configure(header: header(for: guest), config: config.encode()) }
    }

    @Test func packetVerificationCatchesForgeriesDuplicatesAndI1() throws {
        let config = smallConfig()
        let recorder = SimPacketRecorder()
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: SimOutputBuffer(sink: recorder, holding: false), autoRun: false)
        guest.stepAll(ops: 4_000)
        let checkpoint = try guest.captureState(clock: ManualClock())
        let before = recorder.received
        guest.stepAll(ops: 2_000)
        let after = Array(recorder.received.dropFirst(before.count))
        let verifier = SimVerifier(config: config)
        #expect(verifier.verifyPackets(fromPrimary: before, fromActivated: after, activated: checkpoint).passed)
        #expect(verifier.verifyPackets(observed: before + after, activated: checkpoint).counter("gaps") == 0)

        // Output of an uncommitted epoch released by the primary.
        let leaked = verifier.verifyPackets(fromPrimary: before + [after[0]], fromActivated: after, activated: checkpoint)
        #expect(leaked.mismatches.contains { $0.hasPrefix("I1:") }, "\(leaked)")
        #expect(leaked.mismatches.contains { $0.contains("observed twice") })

        var forged = before[3]
        forged.digest ^= 1
        let forgery = verifier.verifyPackets(observed: [forged], activated: checkpoint)
        #expect(forgery.mismatches.contains { $0.hasPrefix("vCPU \(forged.vcpu) seq \(forged.seq): expected") }, "\(forgery)")
        #expect(forgery.counter("gaps") == forged.seq)

        // A rewound guest re-emitting old sequence numbers.
        let rewound = verifier.verifyPackets(fromPrimary: [], fromActivated: [before[0]], activated: checkpoint)
        #expect(rewound.mismatches.contains { $0.contains("went back in time") })

        // A corrupt sequence number far beyond anything does not replay forever.
        var far = before[0]
        far.seq = 1 << 40
        var bounded = verifier
        bounded.maxReplayOps = 100_000
        #expect(!bounded.verifyPackets(observed: [far], activated: checkpoint).passed)
    }

    @Test func aSharedReplayMovesForwardAcrossVerifications() throws {
        let config = smallConfig()
        let clock = ManualClock()
        let recorder = SimPacketRecorder()
        let guest = try SimGuest(config: config, clock: clock, nic: SimOutputBuffer(sink: recorder, holding: false), autoRun: false)
        let replay = try SimReplay(config: config)
        let verifier = SimVerifier(config: config)
        var verified = 0
        for round in 1...4 {
            guest.stepAll(ops: UInt64(round) * 1_000)
            let state = try guest.captureState(clock: clock)
            let report = verifier.verifyActivation(guest: guest, committed: state, replay: replay)
            #expect(report.passed, "\(report)")
            let fresh = Array(recorder.received.dropFirst(verified))
            #expect(verifier.verifyPackets(observed: fresh, activated: state, replay: replay).passed)
            verified += fresh.count
            for vcpu in 0..<config.vcpus { replay.forgetPackets(vcpu: vcpu, below: replay.emittedPackets(vcpu: vcpu)) }
        }
        #expect(replay.opCounts == (try guest.registers()).map(\.opCount))
        // Forgotten packets are not vouched for, and a replay past the committed state is refused.
        #expect(!verifier.verifyPackets(observed: [recorder.received[0]], activated: try guest.captureState(clock: clock), replay: replay).passed)
        let early = try SimGuest(config: config, clock: clock, nic: nil, autoRun: false)
        early.stepAll(ops: 10)
        let refused = verifier.verifyActivation(guest: early, committed: try early.captureState(clock: clock), replay: replay)
        #expect(refused.mismatches.contains { $0.contains("past the committed op") }, "\(refused)")
    }
}
