import RemusCore
import RemusRuntime
import RemusSim

/// The drill's checks of one failover.
enum DrillVerifier {
    /// The committed state and the guest's config a report (or a kill point's `.committed`) records.
    static func committed(_ report: ActivationReport) -> (GuestState, SimConfig)? {
        guard let state = report.committedState(), let configHex = report.fields["domain_config"], let configBytes = unhex(Substring(configHex)),
              let config = try? SimConfig(DomainConfig(format: .simulated, bytes: configBytes)) else { return nil }
        return (state, config)
    }

    /// I9 for an image a restarted backup finished: a replay to the committed state it was
    /// applying when it died. nil when it verifies, else what differs.
    static func verifyRecoveredDisk(committed report: ActivationReport, image: [UInt8]) -> String? {
        guard let (state, config) = committed(report) else { return "the committed state the dying backup recorded is not readable" }
        let r = image.withUnsafeBytes { SimVerifier(config: config).verifyDisk(image: $0, committed: state) }
        return r.passed ? nil : r.description.replacingNewlines()
    }

    static func verify(report: ActivationReport, killedAt: UInt64, observed: [PacketObserver.Observed], survivorPid: Int32, index: Int) -> FailoverResult {
        var problems: [String] = []
        let epoch = report.number("epoch") ?? 0
        let detected = report.number("loss_detected_ns") ?? 0
        let activated = report.number("activated_ns") ?? 0
        var result = FailoverResult(
            index: index, epoch: epoch, cutMidCheckpoint: report.fields["lost_while_staging"] == "1",
            detectionMs: detected >= killedAt ? Double(detected - killedAt) / 1e6 : 0,
            activationMs: activated >= detected ? Double(activated - detected) / 1e6 : 0,
            releasedUncommitted: 0, discardedWithPrimary: 0, verified: false, problems: [])
        func since(_ key: String, _ from: UInt64) -> Double? {
            report.number(key).map { $0 >= from ? Double($0 - from) / 1e6 : 0 }
        }
        result.fenceMs = since("fenced_ns", detected)
        result.prepareMs = since("prepared_ns", detected)
        result.unpauseMs = report.number("unpause_started_ns").map { activated >= $0 ? Double(activated - $0) / 1e6 : 0 }
        // Silence detected before the kill: a false alarm under load. It is safe when the checks
        // below pass (the primary held its output, the fence waited for the real death).
        result.falseAlarm = detected < killedAt
        if report.fields["memory_verified"] != "yes" {
            problems.append("memory/registers/layout: \(report.fields["memory_report"] ?? "no verification in the report")")
        }
        // I9: the disk as the guest resumed on it against a replay to the committed checkpoint.
        if let disk = report.fields["disk_verified"] {
            result.diskVerified = disk == "yes"
            if disk != "yes" { problems.append("disk (I9): \(report.fields["disk_report"] ?? "no verification in the report")") }
        }
        result.diskApplyMs = report.number("disk_apply_ns").map { Double($0) / 1e6 }
        result.diskReadyMs = since("disk_applied_ns", detected)
        guard let (state, config) = committed(report) else {
            result.problems = problems + ["the activation report has no readable committed state"]
            return result
        }
        if config.diskBytes > 0 && result.diskVerified == nil {
            problems.append("disk (I9): the guest has a disk but the activation report carries no verification of it")
        }
        let verifier = SimVerifier(config: config)
        // I1: every packet from an earlier primary must come from state this checkpoint holds.
        let fromPrimary = observed.filter { $0.pid != UInt64(survivorPid) }.map(\.packet)
        let fromSurvivor = observed.filter { $0.pid == UInt64(survivorPid) }.map(\.packet)
        let packets = verifier.verifyPackets(fromPrimary: fromPrimary, fromActivated: fromSurvivor, activated: state)
        if !packets.passed { problems.append("packets: \(packets.description.replacingNewlines())") }
        let nextSeq = state.vcpus.map { (try? SimRegisters($0))?.nicSeq ?? 0 }
        result.releasedUncommitted = fromPrimary.filter { Int($0.vcpu) < nextSeq.count && $0.seq >= nextSeq[Int($0.vcpu)] }.count
        result.discardedWithPrimary = Int(packets.counter("gaps") ?? 0)
        // I4: the clock continues from the checkpoint, never backwards, never ahead of real time.
        if let first = report.number("first_guest_monotonic_ns"), let readAt = report.number("first_reading_host_ns") {
            let elapsed = readAt >= state.clock.hostMonotonicNs ? readAt - state.clock.hostMonotonicNs : 0
            let clock = verifier.verifyClock(before: state.clock, firstAfter: first, realElapsedNs: elapsed)
            if !clock.passed { problems.append("clock: \(clock.description.replacingNewlines())") }
        } else {
            problems.append("no clock reading after activation in the report")
        }
        result.problems = problems
        result.verified = problems.isEmpty
        return result
    }
}
