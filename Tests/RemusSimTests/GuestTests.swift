import RemusCore
@testable import RemusSim
import Testing

@Suite("SimGuest: determinism, suspend, dirty log")
struct GuestTests {
    @Test func sameConfigAndOpCountsGiveTheSameMemoryAndRegisters() throws {
        let config = smallConfig()
        func run() throws -> (UInt64, [SimRegisters]) {
            let guest = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
            guest.step(vcpu: 0, ops: 30_000)
            guest.step(vcpu: 1, ops: 12_345)
            return (try guest.memoryDigest(), try guest.registers())
        }
        let first = try run()
        let second = try run()
        #expect(first.0 == second.0)
        #expect(first.1 == second.1)
        #expect(first.1[0].balloonTransitions > 0)

        let replay = try SimReplay(config: config)
        replay.advance(to: [30_000, 12_345])
        #expect(replay.memoryDigest() == first.0)
        #expect(replay.registers == first.1)
    }

    @Test func interleavingDoesNotMatterOnlyOpCountsDo() throws {
        let config = smallConfig()
        let a = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        let b = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        a.step(vcpu: 0, ops: 10_000)
        a.step(vcpu: 1, ops: 10_000)
        for _ in 0..<100 {
            b.step(vcpu: 1, ops: 100)
            b.step(vcpu: 0, ops: 100)
        }
        #expect(try a.memoryDigest() == b.memoryDigest())
        #expect(try a.registers() == b.registers())
    }

    @Test func aDifferentSeedGivesDifferentMemory() throws {
        let a = try SimGuest(config: smallConfig(seed: 1), clock: ManualClock(), nic: nil, autoRun: false)
        let b = try SimGuest(config: smallConfig(seed: 2), clock: ManualClock(), nic: nil, autoRun: false)
        a.stepAll(ops: 5_000)
        b.stepAll(ops: 5_000)
        #expect(try a.memoryDigest() != b.memoryDigest())
        #expect(try a.registers() != b.registers())
    }

    @Test func storeRatioAndWorkingSetAreHonoured() throws {
        var config = smallConfig()
        config.balloonPeriod = 0
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        guest.stepAll(ops: 40_000)
        for r in try guest.registers() {
            let share = Double(r.storeCount) / Double(r.opCount)
            #expect(abs(share - 0.75) < 0.02, "store share \(share)")
        }
        let workingSet = WorkloadShape(config).workingSet
        for pfn in 0..<config.pageCount where !workingSet.contains(pfn) {
            #expect(!guest.memory.written.test(pfn))
        }
    }

    @Test func suspendStopsEveryVCPUUntilResume() throws {
        let config = smallConfig(vcpus: 3)
        let recorder = SimPacketRecorder()
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: SimOutputBuffer(sink: recorder, holding: false))
        defer { guest.shutdown() }
        #expect(guest.waitForProgress(ops: 20_000, timeoutNs: 20 * secondNs))
        #expect(throws: SimError.self) { try guest.captureState(clock: ManualClock()) }

        try guest.suspend()
        #expect(guest.isSuspended)
        let registers = try guest.registers()
        let digest = try guest.memoryDigest()
        let packets = recorder.count
        observationWindow()
        #expect(try guest.registers() == registers)
        #expect(try guest.memoryDigest() == digest)
        #expect(recorder.count == packets)
        #expect(guest.publishedOpCounts == registers.map(\.opCount))

        // Suspending twice in a row is harmless, and resume really lets them run again.
        try guest.suspend()
        try guest.resume()
        let target = registers.map(\.opCount).max()! + 20_000
        #expect(guest.waitForProgress(ops: target, timeoutNs: 20 * secondNs))
        try guest.suspend()
        #expect(try guest.registers().allSatisfy { $0.opCount >= target })
        #expect(try guest.memoryDigest() != digest)

        // What the threads did is exactly what a single-threaded replay does.
        let replay = try SimReplay(config: config)
        replay.advance(to: try guest.registers().map(\.opCount))
        #expect(replay.registers == (try guest.registers()))
        #expect(replay.memoryDigest() == (try guest.memoryDigest()))
    }

    @Test func everyPageWrittenSinceTheLastHarvestIsInTheBitmap() throws {
        // Naive oracle: a full shadow copy, diffed after each round of random ops.
        var config = smallConfig()
        config.memoryBytes = 4 << 20
        config.balloonPeriod = 37
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        try guest.startDirtyLogging()
        try guest.harvestDirty(into: &bitmap)
        let all = bitmap.count
        #expect(all == Int(config.pageCount))
        var shadow = MemoryShadow(guest.memory)
        var prng: UInt64 = 12345
        for round in 0..<12 {
            for vcpu in 0..<config.vcpus { guest.step(vcpu: vcpu, ops: 1 + splitmix(&prng) % 3_000) }
            bitmap.clearAll()
            try guest.harvestDirty(into: &bitmap)
            let changed = shadow.changedPages(guest.memory)
            for pfn in changed {
                let dirty = bitmap.isSet(pfn)
                #expect(dirty, "round \(round): pfn \(pfn) changed but is not dirty")
            }
            #expect(!changed.isEmpty)
            // Only pages of the working set can be dirty.
            let workingSet = WorkloadShape(config).workingSet
            var outside: [PFN] = []
            bitmap.forEachSet { if !workingSet.contains($0) { outside.append($0) } }
            #expect(outside.isEmpty)
            // A harvest clears the log.
            var again = DirtyBitmap(pageCount: config.pageCount)
            try guest.harvestDirty(into: &again)
            let left = again.count
            #expect(left == 0)
            shadow = MemoryShadow(guest.memory)
        }
    }

    @Test func aLiveHarvestMissesNothingThatTheNextOneDoesNotCatch() throws {
        // Pre-copy with running vCPUs: pages copied live into a replica round after round, then a
        // final suspended round. The replica must end up identical.
        let config = smallConfig(vcpus: 3)
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil)
        defer { guest.shutdown() }
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        try replica.configure(header: header(for: guest), config: try guest.domainConfig())
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        let arena = StagingArena(pageSize: config.pageSize, capacityPages: Int(config.pageCount))
        try guest.startDirtyLogging()
        var ops: UInt64 = 0
        for _ in 0..<8 {
            ops += 3_000
            #expect(guest.waitForProgress(ops: ops, timeoutNs: 20 * secondNs))
            bitmap.clearAll()
            try guest.harvestDirty(into: &bitmap)
            arena.reset(epoch: 0, kind: .precopy)
            try guest.capturePages(bitmap, into: arena)
            try replica.commit(arena, state: nil)
        }
        try guest.suspend()
        bitmap.clearAll()
        try guest.harvestDirty(into: &bitmap)
        arena.reset(epoch: 1, kind: .checkpoint)
        try guest.capturePages(bitmap, into: arena)
        try replica.commit(arena, state: try guest.captureState(clock: clock))
        #expect(replica.memoryDigest() == (try guest.memoryDigest()))
        let report = SimVerifier(config: config).verifyActivation(replica: replica)
        #expect(report.passed, "\(report)")
    }

    @Test func captureChecksTheArenaBeforeAppending() throws {
        let config = smallConfig()
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        try guest.startDirtyLogging()
        try guest.harvestDirty(into: &bitmap)
        let small = StagingArena(pageSize: config.pageSize, capacityPages: 10)
        #expect(throws: SimError.self) { try guest.capturePages(bitmap, into: small) }
        #expect(small.count == 0)
        var wrongSize = DirtyBitmap(pageCount: 10)
        #expect(throws: SimError.self) { try guest.harvestDirty(into: &wrongSize) }
    }

    @Test func capturedPagesAreAscendingAndZeroPagesCarryNoData() throws {
        let config = smallConfig()
        let guest = try SimGuest(config: config, clock: ManualClock(), nic: nil, autoRun: false)
        guest.stepAll(ops: 2_000)
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        try guest.startDirtyLogging()
        try guest.harvestDirty(into: &bitmap)
        let arena = StagingArena(pageSize: config.pageSize, capacityPages: Int(config.pageCount))
        arena.reset(epoch: 1, kind: .checkpoint)
        try guest.capturePages(bitmap, into: arena)
        #expect(arena.count == Int(config.pageCount))
        var raw = 0
        for i in 0..<arena.count {
            let e = arena.entry(i)
            #expect(e.pfn == PFN(i))
            if e.encoding == .raw {
                raw += 1
                #expect(arena.pageData(i).elementsEqual(guest.memory.pageBytes(e.pfn)))
            } else if e.encoding == .zero {
                #expect(guest.memory.isZeroPage(e.pfn))
            }
        }
        #expect(raw > 0 && raw < 1024)
        #expect(arena.dataBytes == raw * config.pageSize)
    }

    @Test func aFrozenClockHoldsTheDirtyRateToItsBurst() throws {
        var config = smallConfig()
        config.dirtyRateLimit = 20_000  // 10 000 pages/s per vCPU: a burst of 100 pages each
        config.balloonPeriod = 0
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil)
        defer { guest.shutdown() }
        observationWindow(ms: 50)
        try guest.suspend()
        var bitmap = DirtyBitmap(pageCount: config.pageCount)
        try guest.harvestDirty(into: &bitmap)
        let dirtied = bitmap.count
        #expect(dirtied <= 200)
        let stalled = try guest.registers().map(\.opCount)

        // Time moves: the vCPUs earn pages again and get going.
        try guest.resume()
        for _ in 0..<2_000 {
            clock.advance(secondNs / 100)
            if guest.waitForProgress(ops: stalled.max()! + 50_000, timeoutNs: 2_000_000) { break }
        }
        #expect(guest.waitForProgress(ops: stalled.max()! + 50_000, timeoutNs: 0))
    }

    @Test func theOpRateLimitBoundsOpsByHostTime() throws {
        var config = smallConfig()
        config.opRateLimit = 100_000  // a burst of 1 000 ops per vCPU
        let clock = ManualClock()
        let guest = try SimGuest(config: config, clock: clock, nic: nil)
        defer { guest.shutdown() }
        #expect(guest.waitForProgress(ops: 1_000, timeoutNs: 20 * secondNs))
        observationWindow()
        try guest.suspend()
        #expect(try guest.registers().map(\.opCount) == [1_000, 1_000])
        try guest.resume()
        clock.advance(5_000_000)  // 5 ms: 500 more ops each
        #expect(guest.waitForProgress(ops: 1_500, timeoutNs: 20 * secondNs))
        observationWindow()
        try guest.suspend()
        #expect(try guest.registers().map(\.opCount) == [1_500, 1_500])
    }
}
