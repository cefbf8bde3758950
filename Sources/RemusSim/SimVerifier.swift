// The drill's verifier: proves an activated guest's memory, registers, layout, packets and clock
// against a replay of the workload.

import Glibc
import RemusCore

/// The outcome of one verification: pass, or the mismatches found (which pfn / vCPU / seq,
/// expected vs found), plus counters.
public struct SimReport: Equatable, Sendable, CustomStringConvertible {
    /// A named count the check measured (pages compared, packets observed, gaps, …).
    public struct Counter: Equatable, Sendable {
        public var name: String
        public var value: UInt64
    }

    /// What was checked: "activation", "packets" or "clock".
    public let check: String
    /// The first `listLimit` mismatches, each a sentence.
    public private(set) var mismatches: [String] = []
    /// Every mismatch found, including those not listed.
    public private(set) var mismatchCount = 0
    /// Counters in the order they were recorded.
    public private(set) var counters: [Counter] = []
    /// Most mismatches listed.
    public let listLimit: Int

    /// Whether nothing was wrong.
    public var passed: Bool { mismatchCount == 0 }

    init(check: String, listLimit: Int = 20) {
        self.check = check
        self.listLimit = listLimit
    }

    mutating func fail(_ mismatch: String) {
        mismatchCount += 1
        if mismatches.count < listLimit { mismatches.append(mismatch) }
    }

    mutating func count(_ name: String, _ value: UInt64) {
        if let i = counters.firstIndex(where: { $0.name == name }) {
            counters[i].value = value
        } else {
            counters.append(Counter(name: name, value: value))
        }
    }

    /// The counter called `name`, if recorded.
    public func counter(_ name: String) -> UInt64? { counters.first { $0.name == name }?.value }

    public var description: String {
        let facts = counters.map { "\($0.name) \($0.value)" }.joined(separator: ", ")
        var text = "\(check): \(passed ? "PASS" : "FAIL, \(mismatchCount) mismatches")" + (facts.isEmpty ? "" : " (\(facts))")
        for m in mismatches { text += "\n  - " + m }
        if mismatchCount > mismatches.count { text += "\n  - … and \(mismatchCount - mismatches.count) more" }
        return text
    }
}

/// Verifies what the drill observed against a replay of the workload from the config's seed.
public struct SimVerifier: Sendable {
    /// The guest's config (the one sent in DOMAIN_CONFIG).
    public let config: SimConfig
    /// Most ops one vCPU is replayed while looking for an observed packet (default 2^32).
    public var maxReplayOps: UInt64 = 1 << 32

    public init(config: SimConfig) { self.config = config }

    private func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    // MARK: Activation

    /// Checks a replica's committed image: memory byte for byte, registers and layout against the
    /// replay at the committed op counts. After activation it checks the activated guest instead
    /// (see `verifyActivation(guest:committed:)`).
    public func verifyActivation(replica: SimReplica, replay: SimReplay? = nil) -> SimReport {
        if let guest = replica.activatedGuest, let committed = replica.committedState {
            return verifyActivation(guest: guest, committed: committed, replay: replay)
        }
        var report = SimReport(check: "activation")
        let outcome = replica.withCommittedMemory { memory, committed -> SimReport in
            guard let committed else {
                report.fail("the replica has no committed checkpoint")
                return report
            }
            guard let (replay, registers) = replayCommitted(committed, replay: replay, into: &report) else { return report }
            compareImage(memory: memory, registers: registers, replay: replay, into: &report)
            return report
        }
        if let outcome { return outcome }
        report.fail("the replica is not configured, or was discarded")
        return report
    }

    /// Checks an activated (or any) guest against the checkpoint it resumed from: the committed
    /// registers, devices and layout must equal the replay at the committed op counts, and the
    /// guest's current memory, registers and layout must equal the replay at the guest's current op
    /// counts (right after activation these are the committed ones; later, the continuation must
    /// still match). The guest must be suspended, shut down or stepped.
    ///
    /// - Parameter replay: a replay of this config to move forward instead of replaying from boot;
    ///   it must not be past the committed op counts. Default: a fresh one.
    public func verifyActivation(guest: SimGuest, committed: GuestState, replay: SimReplay? = nil) -> SimReport {
        var report = SimReport(check: "activation")
        guard guest.config == config else {
            report.fail("the guest's config differs from the verifier's")
            return report
        }
        guard let (replay, committedRegisters) = replayCommitted(committed, replay: replay, into: &report) else { return report }
        let current: [SimRegisters]
        do { current = try guest.registers() } catch {
            report.fail("cannot read the guest's registers: \(error)")
            return report
        }
        for (vcpu, registers) in current.enumerated() where registers.opCount < committedRegisters[vcpu].opCount {
            report.fail("vCPU \(vcpu) is at op \(registers.opCount), before the committed op \(committedRegisters[vcpu].opCount)")
        }
        guard report.passed else { return report }
        report.count("opsSinceActivation", zip(current, committedRegisters).reduce(0) { $0 + $1.0.opCount - $1.1.opCount })
        replay.advance(to: current.map(\.opCount))
        compareImage(memory: guest.memory, registers: current, replay: replay, into: &report)
        return report
    }

    /// I9 for the simulated disk: `image` (the backup's disk as the guest resumes on it) must hold
    /// exactly the writes the workload completed by the committed op counts — each recorded in
    /// committed memory — and none issued after them. (A simulated disk operation completes
    /// within one op and ops never straddle a checkpoint, so nothing is in flight.)
    ///
    /// - Parameter replay: as for `verifyActivation`; it must not be past the committed op counts.
    public func verifyDisk(image: UnsafeRawBufferPointer, committed: GuestState, replay: SimReplay? = nil) -> SimReport {
        var report = SimReport(check: "disk")
        guard config.diskBytes > 0 else {
            report.fail("the guest has no disk")
            return report
        }
        guard image.count == Int(config.diskBytes) else {
            report.fail("the disk image holds \(image.count) bytes, the guest's disk \(config.diskBytes)")
            return report
        }
        guard let (replay, registers) = replayCommitted(committed, replay: replay, into: &report) else { return report }
        let expected = replay.expectedDisk
        let block = SimConfig.diskBlockBytes
        let share = WorkloadShape(config).diskBlocksPerVCPU
        var differing: UInt64 = 0
        for number in 0..<(image.count / block) {
            let range = (number * block)..<((number + 1) * block)
            let found = UnsafeRawBufferPointer(rebasing: image[range])
            let wanted = UnsafeRawBufferPointer(rebasing: expected[range])
            // memcmp: 16 MiB compared byte by byte through Sequence is seconds in a debug build.
            guard memcmp(found.baseAddress!, wanted.baseAddress!, block) != 0 else { continue }
            differing += 1
            let word = { (b: UnsafeRawBufferPointer) in String(b.loadUnaligned(as: UInt64.self), radix: 16) }
            let owner = share > 0 ? UInt64(number) / share : 0
            report.fail("block \(number) (vCPU \(owner)'s share): expected first word 0x\(word(wanted)), found 0x\(word(found)) — "
                + (wanted.allSatisfy { $0 == 0 } ? "a write issued after the checkpoint reached the disk" : "a write completed by the checkpoint is missing or was overwritten"))
        }
        let shape = WorkloadShape(config)
        let completed = (0..<config.vcpus).reduce(UInt64(0)) { sum, vcpu in
            sum + replay.memory.load(pfn: shape.diskCounterPage(UInt32(vcpu)), word: 0)
        }
        report.count("diskBlocks", UInt64(image.count / block))
        report.count("differingBlocks", differing)
        report.count("diskOpsCompleted", completed)
        report.count("committedOps", registers.reduce(0) { $0 + $1.opCount })
        return report
    }

    /// Replays to the committed op counts and compares the committed registers, devices and layout.
    private func replayCommitted(
        _ committed: GuestState, replay shared: SimReplay?, into report: inout SimReport
    ) -> (SimReplay, [SimRegisters])? {
        guard committed.vcpus.count == config.vcpus else {
            report.fail("committed state has \(committed.vcpus.count) vCPUs, the config \(config.vcpus)")
            return nil
        }
        var registers: [SimRegisters] = []
        for state in committed.vcpus {
            do { registers.append(try SimRegisters(state)) } catch {
                report.fail("committed VCPU_STATE \(state.vcpu): \(error)")
                return nil
            }
        }
        guard let replay = makeReplay(shared, into: &report) else { return nil }
        for (vcpu, ops) in replay.opCounts.enumerated() where ops > registers[vcpu].opCount {
            report.fail("the shared replay of vCPU \(vcpu) is at op \(ops), past the committed op \(registers[vcpu].opCount)")
            return nil
        }
        replay.advance(to: registers.map(\.opCount))
        for (vcpu, expected) in replay.registers.enumerated() where registers[vcpu] != expected {
            report.fail("vCPU \(vcpu) committed registers: expected \(expected), found \(registers[vcpu])")
        }
        let expectedLayout = replay.layout
        if committed.layout != expectedLayout {
            report.fail("committed layout: expected generation \(expectedLayout.generation) with \(expectedLayout.ranges.count) "
                + "ranges (\(expectedLayout.pageCount) pages), found generation \(committed.layout.generation) with "
                + "\(committed.layout.ranges.count) ranges (\(committed.layout.pageCount) pages)")
        }
        if let nic = committed.devices.first(where: { $0.name == NICState.name }) {
            if nic != replay.expectedNIC {
                let found = (try? NICState.decode(nic)).map { "\($0)" } ?? "undecodable"
                report.fail("committed nic0: expected next seqs \(replay.registers.map(\.nicSeq)), found \(found)")
            }
        } else {
            report.fail("committed state has no nic0 device")
        }
        report.count("committedOps", registers.reduce(0) { $0 + $1.opCount })
        return (replay, registers)
    }

    /// Compares memory page by page (populated-ness and bytes), registers and layout.
    private func makeReplay(_ shared: SimReplay?, into report: inout SimReport) -> SimReplay? {
        if let shared {
            guard shared.config == config else {
                report.fail("the shared replay is of another config")
                return nil
            }
            return shared
        }
        do { return try SimReplay(config: config) } catch {
            report.fail("cannot build the replay: \(error)")
            return nil
        }
    }

    private func compareImage(memory: GuestMemory, registers: [SimRegisters], replay: SimReplay, into report: inout SimReport) {
        for (vcpu, expected) in replay.registers.enumerated() where registers[vcpu] != expected {
            report.fail("vCPU \(vcpu) registers: expected \(expected), found \(registers[vcpu])")
        }
        let expectedLayout = replay.layout
        let layout = layoutFromRegisters(registers, pageCount: config.pageCount)
        if layout != expectedLayout {
            report.fail("layout: expected \(expectedLayout.ranges.count) ranges (generation \(expectedLayout.generation)), "
                + "found \(layout.ranges.count) (generation \(layout.generation))")
        }
        guard memory.pageCount == replay.memory.pageCount, memory.pageSize == replay.memory.pageSize else {
            report.fail("memory of \(memory.pageCount) × \(memory.pageSize) bytes, expected \(replay.memory.pageCount) × \(replay.memory.pageSize)")
            return
        }
        var actualDigest = PageHash.memorySeed
        var expectedDigest = PageHash.memorySeed
        var populated: UInt64 = 0
        var nonZero: UInt64 = 0
        for pfn in 0..<memory.pageCount {
            let expectedAbsent = replay.memory.absent.test(pfn)
            let actualAbsent = memory.absent.test(pfn)
            if expectedAbsent != actualAbsent {
                report.fail("pfn \(pfn) (\(hex(pfn))): expected \(expectedAbsent ? "absent" : "populated"), "
                    + "found \(actualAbsent ? "absent" : "populated")")
                continue
            }
            if actualAbsent { continue }
            populated += 1
            let actual = memory.pageBytes(pfn)
            let actualZero = PageHash.isZero(actual)
            if !actualZero {
                nonZero += 1
                actualDigest = PageHash.fold(actualDigest, pageHash: PageHash.page(actual, pfn: pfn))
            }
            // Pages the replay never wrote are zero; skip reading them a second time.
            if !replay.memory.written.test(pfn) {
                if !actualZero { report.fail(describePageMismatch(pfn: pfn, expected: nil, found: actual)) }
                continue
            }
            let expected = replay.memory.pageBytes(pfn)
            if !PageHash.isZero(expected) {
                expectedDigest = PageHash.fold(expectedDigest, pageHash: PageHash.page(expected, pfn: pfn))
            }
            // SAFETY: two whole pages of the same size.
            if memcmp(expected.baseAddress!, actual.baseAddress!, actual.count) != 0 {
                report.fail(describePageMismatch(pfn: pfn, expected: expected, found: actual))
            }
        }
        if actualDigest != expectedDigest {
            report.fail("memory digest: expected \(hex(expectedDigest)), found \(hex(actualDigest))")
        }
        report.count("populatedPages", populated)
        report.count("nonZeroPages", nonZero)
        report.count("memoryDigest", actualDigest)
    }

    private func describePageMismatch(pfn: PFN, expected: UnsafeRawBufferPointer?, found: UnsafeRawBufferPointer) -> String {
        let words = found.count / 8
        // SAFETY: both buffers are whole pages of the same size; loads stay below count.
        for i in 0..<words {
            let e = expected?.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) ?? 0
            let f = found.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
            if e != f {
                return "pfn \(pfn) (\(hex(pfn))) differs at byte \(i * 8): expected \(hex(e)), found \(hex(f))"
            }
        }
        return "pfn \(pfn) (\(hex(pfn))) differs"
    }

    // MARK: Packets

    private enum Origin { case primary, activated, unknown }

    /// Checks packets an observer received when the origin of each is known (for example by the
    /// UDP source: the dead primary's process or the activated backup's):
    /// - every packet equals the replay's packet for its (vCPU, seq); no (vCPU, seq) twice;
    /// - packets from the primary all have seq below the activated checkpoint's next seq for their
    ///   vCPU (I1: the primary released only committed output);
    /// - packets from the activated guest have seq at or above it (it resumed, not rewound).
    /// Counter "gaps": sequence numbers below the highest seen that never arrived — output of epochs
    /// the dead primary never released (lost like dropped packets; allowed).
    ///
    /// - Parameter replay: a replay of this config to move forward instead of replaying from boot
    ///   (it must still hold the packets observed; see `SimReplay.forgetPackets`).
    public func verifyPackets(
        fromPrimary: [SimPacket], fromActivated: [SimPacket], activated: GuestState, replay: SimReplay? = nil
    ) -> SimReport {
        verifyPackets(fromPrimary.map { ($0, .primary) } + fromActivated.map { ($0, .activated) }, activated: activated, replay: replay)
    }

    /// Checks packets of unknown origin: content against the replay, duplicates and gaps (no I1
    /// split; see `verifyPackets(fromPrimary:fromActivated:activated:)`).
    public func verifyPackets(observed: [SimPacket], activated: GuestState, replay: SimReplay? = nil) -> SimReport {
        verifyPackets(observed.map { ($0, .unknown) }, activated: activated, replay: replay)
    }

    private func verifyPackets(_ observed: [(SimPacket, Origin)], activated: GuestState, replay shared: SimReplay?) -> SimReport {
        var report = SimReport(check: "packets")
        var nextSeq: [UInt64] = []
        for state in activated.vcpus {
            guard let registers = try? SimRegisters(state) else {
                report.fail("activated VCPU_STATE \(state.vcpu) does not decode")
                return report
            }
            nextSeq.append(registers.nicSeq)
        }
        guard nextSeq.count == config.vcpus else {
            report.fail("activated state has \(nextSeq.count) vCPUs, the config \(config.vcpus)")
            return report
        }
        var highest = [UInt64?](repeating: nil, count: config.vcpus)
        for (packet, _) in observed where Int(packet.vcpu) < config.vcpus {
            highest[Int(packet.vcpu)] = max(highest[Int(packet.vcpu)] ?? 0, packet.seq)
        }
        guard let replay = makeReplay(shared, into: &report) else { return report }
        let storeShare = max(WorkloadShape(config).storeThreshold, 1)
        for (vcpu, top) in highest.enumerated() {
            guard let top else { continue }
            // Generous bound on the ops needed to reach `top`: a corrupt seq must not replay forever.
            let opsPerPacket = max(config.packetEveryStores, 1) * 4 * 65536 / storeShare  // ≤ 2^50: config bounds
            let estimate = top.multipliedReportingOverflow(by: opsPerPacket)
            let limit = estimate.overflow ? maxReplayOps : min(maxReplayOps, estimate.partialValue + 1_000_000)
            replay.advance(vcpu: vcpu, untilPacket: top, opLimit: max(limit, replay.opCounts[vcpu]))
        }
        var seen = Set<SimPacket.Key>()
        var lastSeq: [Origin: [UInt64?]] = [:]
        var reordered: UInt64 = 0
        var distinct = [UInt64](repeating: 0, count: config.vcpus)
        for (packet, origin) in observed {
            let vcpu = Int(packet.vcpu)
            guard vcpu < config.vcpus else {
                report.fail("\(packet): no such vCPU (the guest has \(config.vcpus))")
                continue
            }
            guard seen.insert(packet.key).inserted else {
                report.fail("vCPU \(vcpu) seq \(packet.seq) observed twice")
                continue
            }
            distinct[vcpu] += 1
            var last = lastSeq[origin] ?? [UInt64?](repeating: nil, count: config.vcpus)
            if let previous = last[vcpu], packet.seq < previous { reordered += 1 }
            last[vcpu] = packet.seq
            lastSeq[origin] = last
            if let expected = replay.expectedPacket(vcpu: vcpu, seq: packet.seq) {
                if expected != packet { report.fail("vCPU \(vcpu) seq \(packet.seq): expected \(expected), found \(packet)") }
            } else {
                report.fail("vCPU \(vcpu) seq \(packet.seq): the replay has no such packet (it emitted "
                    + "\(replay.emittedPackets(vcpu: vcpu)) in \(replay.opCounts[vcpu]) ops, or forgot this one)")
            }
            switch origin {
            case .primary where packet.seq >= nextSeq[vcpu]:
                report.fail("I1: the primary released vCPU \(vcpu) seq \(packet.seq), emitted after the activated "
                    + "checkpoint (whose next seq is \(nextSeq[vcpu])): output left before its epoch was committed")
            case .activated where packet.seq < nextSeq[vcpu]:
                report.fail("the activated guest emitted vCPU \(vcpu) seq \(packet.seq), below its checkpoint's next "
                    + "seq \(nextSeq[vcpu]): it went back in time")
            default:
                break
            }
        }
        var gaps: UInt64 = 0
        for vcpu in 0..<config.vcpus {
            if let top = highest[vcpu] { gaps += top + 1 - min(distinct[vcpu], top + 1) }
        }
        report.count("observed", UInt64(observed.count))
        report.count("gaps", gaps)
        report.count("reordered", reordered)
        return report
    }

    // MARK: Clock

    /// Checks invariant I4: the first guest monotonic reading after failover (`firstAfter`, ns) is
    /// not below the checkpoint's (`before.guestMonotonicNs`) and ahead of it by at most the real
    /// time that elapsed (`realElapsedNs`, plus `toleranceNs` for the observer's own reading delay).
    public func verifyClock(before: ClockState, firstAfter: UInt64, realElapsedNs: UInt64, toleranceNs: UInt64 = 0) -> SimReport {
        var report = SimReport(check: "clock")
        if firstAfter < before.guestMonotonicNs {
            report.fail("guest monotonic clock went backwards by \(before.guestMonotonicNs - firstAfter) ns "
                + "(checkpoint \(before.guestMonotonicNs), after failover \(firstAfter))")
        } else {
            let advance = firstAfter - before.guestMonotonicNs
            report.count("advanceNs", advance)
            if advance > realElapsedNs &+ toleranceNs {
                report.fail("guest monotonic clock leapt \(advance) ns across failover, but only \(realElapsedNs) ns "
                    + "of real time passed (tolerance \(toleranceNs) ns)")
            }
        }
        return report
    }
}

extension SimPacket {
    /// (vCPU, seq): what identifies a packet.
    struct Key: Hashable {
        var vcpu: UInt32
        var seq: UInt64
    }

    var key: Key { Key(vcpu: vcpu, seq: seq) }
}
