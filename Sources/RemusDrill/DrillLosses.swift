import RemusCore
import RemusRuntime
import RemusSim

extension DrillVerifier {
    /// The next NIC sequence number of every vCPU in an activation report's committed state.
    static func nextSequences(_ report: ActivationReport) -> [UInt64]? {
        report.committedState()?.vcpus.map { (try? SimRegisters($0))?.nicSeq ?? 0 }
    }

    /// Packets the dead primary emitted and never released: per vCPU, the sequence numbers from
    /// where it started (the previous activation's next sequence, 0 for the first primary) up to
    /// the activated checkpoint's next sequence that nobody outside ever saw.
    static func unreleased(observed: [PacketObserver.Observed], from start: [UInt64], to next: [UInt64]) -> Int {
        var seen = Set<UInt64>()
        var missing = 0
        for v in next.indices {
            seen.removeAll(keepingCapacity: true)
            for o in observed where Int(o.packet.vcpu) == v { seen.insert(o.packet.seq) }
            let from = v < start.count ? start[v] : 0
            guard next[v] > from else { continue }
            for seq in from..<next[v] where !seen.contains(seq) { missing += 1 }
        }
        return missing
    }
}
