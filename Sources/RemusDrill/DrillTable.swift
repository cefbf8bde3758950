/// The drill's table: one row per failover, then a summary.
package enum DrillTable {
    package static func render(_ results: [FailoverResult]) -> String {
        var rows = [["#", "fault", "epoch", "cut mid-ckpt", "detect ms", "activate ms", "fence ms", "prepare ms", "unpause ms", "uncommitted out", "lost w/ primary", "disk I9", "verified"]]
        for r in results {
            rows.append(["\(r.index)", r.fault.rawValue, "\(r.epoch)", r.cutMidCheckpoint ? "yes" : "no", r.falseAlarm ? "early*" : format(r.detectionMs), format(r.activationMs),
                         r.fenceMs.map(format) ?? "-", r.prepareMs.map(format) ?? "-", r.unpauseMs.map(format) ?? "-",
                         "\(r.releasedUncommitted)", "\(r.discardedWithPrimary)", r.diskVerified.map { $0 ? "yes" : "NO" } ?? "-", r.verified ? "yes" : "NO"])
        }
        let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max() ?? 0 }
        var out = rows.map { row in
            row.enumerated().map { i, cell in String(repeating: " ", count: widths[i] - cell.count) + cell }.joined(separator: "  ")
        }.joined(separator: "\n")
        if !results.isEmpty {
            let detect = results.filter { !$0.falseAlarm }.map(\.detectionMs).sorted()
            let activate = results.map(\.activationMs).sorted()
            func pct(_ a: [Double], _ p: Double) -> String { a.isEmpty ? "-" : format(a[min(Int(Double(a.count - 1) * p), a.count - 1)]) }
            out += "\n\ndetection ms: median \(pct(detect, 0.5)), p90 \(pct(detect, 0.9)), max \(pct(detect, 1))"
            out += "\nactivation ms: median \(pct(activate, 0.5)), p90 \(pct(activate, 0.9)), max \(pct(activate, 1))"
            // Its phases: the fence and the preparation both start at the loss and run in parallel;
            // the unpause follows whichever ends last.
            for (name, values) in [("fence", results.compactMap(\.fenceMs)), ("prepare (alongside the fence)", results.compactMap(\.prepareMs)),
                                   ("unpause", results.compactMap(\.unpauseMs))] where !values.isEmpty {
                let sorted = values.sorted()
                out += "\n  \(name) ms: median \(pct(sorted, 0.5)), p90 \(pct(sorted, 0.9)), max \(pct(sorted, 1))"
            }
            let disks = results.compactMap(\.diskVerified)
            if !disks.isEmpty {
                out += "\ndisk (I9) verified block by block at \(disks.filter { $0 }.count) of \(results.count) failovers"
                for (name, values) in [("disk apply (the committed epoch's writes onto the backup's images)", results.compactMap(\.diskApplyMs)),
                                       ("images at the committed epoch, after the loss (0: before it)", results.compactMap(\.diskReadyMs))] where !values.isEmpty {
                    let sorted = values.sorted()
                    out += "\n  \(name) ms: median \(pct(sorted, 0.5)), p90 \(pct(sorted, 0.9)), max \(pct(sorted, 1))"
                }
            }
            out += "\ncut mid-checkpoint: \(results.filter(\.cutMidCheckpoint).count) of \(results.count)"
            let alarms = results.filter(\.falseAlarm).count
            if alarms > 0 {
                out += "\nearly*: \(alarms) false alarm(s): the backup found the primary silent before it was killed (a loaded host); the fence waited for the real death and the primary held its output, so every check above still applies"
            }
            out += "\noutput from uncommitted state seen outside (I1 violations): \(results.map(\.releasedUncommitted).reduce(0, +))"
            for r in results where !r.problems.isEmpty { out += "\nfailover \(r.index): " + r.problems.joined(separator: "; ") }
            for r in results where !r.notes.isEmpty { out += "\n\(r.index) (\(r.fault.rawValue)): " + r.notes.joined(separator: "; ") }
            if results.contains(where: { $0.fault == .backupKill }) {
                out += "\nbackup-kill rows: detect = backup killed to the primary reporting DEGRADED; activate = backup back to the primary protected again"
            }
        }
        return out
    }
}
