import RemusCore

/// What a backup activated (`remusd receive --activation-report <path>`): timings, the committed
/// state, the in-process verification of memory and registers against a replay, and a clock
/// reading. A line-based text file: `key value`. The daemon writes it; the drill's verifier and
/// the process tests read it, so the format's writer and reader live together here.
package struct ActivationReport {
    package var fields: [String: String] = [:]

    init(fields: [String: String] = [:]) { self.fields = fields }

    /// - Parameters:
    ///   - fencedAt: when the fence succeeded (or the activation began, without one).
    ///   - preparedAt: when the replica was ready to run, built while the fence ran; nil when it
    ///     was not prepared ahead.
    ///   - unpauseStartedAt: when the activation (the unpause) began.
    ///   - diskApply: with disks, how long the apply of `epoch`'s disk writes took on the backup and
    ///     when it finished (before the loss when the backup kept up).
    static func before(epoch: Epoch, lastHeardAt: UInt64, lossDetectedAt: UInt64, lostWhileStaging: Bool, fencedAt: UInt64,
                       preparedAt: UInt64? = nil, unpauseStartedAt: UInt64,
                       diskApply: (tookNs: UInt64, at: UInt64)? = nil) -> ActivationReport {
        var r = ActivationReport()
        r.fields["epoch"] = "\(epoch)"
        r.fields["last_heard_ns"] = "\(lastHeardAt)"
        r.fields["loss_detected_ns"] = "\(lossDetectedAt)"
        r.fields["fenced_ns"] = "\(fencedAt)"
        if let preparedAt { r.fields["prepared_ns"] = "\(preparedAt)" }
        if let diskApply {
            r.fields["disk_apply_ns"] = "\(diskApply.tookNs)"
            r.fields["disk_applied_ns"] = "\(diskApply.at)"
        }
        r.fields["unpause_started_ns"] = "\(unpauseStartedAt)"
        r.fields["lost_while_staging"] = lostWhileStaging ? "1" : "0"
        return r
    }

    /// Adds the activation time and the backend's check of the activated guest (its fields, see
    /// `BackupReplica.verifyActivation`; nil when the backend has none).
    func completed(activatedAt: UInt64, verification: [String: String]?) -> ActivationReport {
        var r = self
        r.fields["activated_ns"] = "\(activatedAt)"
        guard let verification else {
            r.fields["verified"] = "not a simulated guest"
            return r
        }
        r.fields.merge(verification) { _, checked in checked }
        return r
    }

    func write(to path: String) throws {
        let text = fields.keys.sorted().map { "\($0) \(fields[$0]!)" }.joined(separator: "\n") + "\n"
        // Written under a temporary name and renamed, so a reader never sees half a report.
        let tmp = path + ".tmp"
        try writeFile(tmp, Array(text.utf8))
        try renameFile(tmp, path)
    }

    package static func read(from path: String) throws -> ActivationReport {
        guard let text = readWholeFile(path) else { throw ProtocolError("cannot read the activation report \(path)") }
        var r = ActivationReport()
        for line in text.split(separator: "\n") {
            guard let space = line.firstIndex(of: " ") else { continue }
            r.fields[String(line[..<space])] = String(line[line.index(after: space)...])
        }
        return r
    }

    package func number(_ key: String) -> UInt64? { fields[key].flatMap { UInt64($0) } }

    /// The committed state as recorded.
    package func committedState() -> GuestState? {
        var vcpus: [VCPUState] = []
        var devices: [DeviceState] = []
        for (key, value) in fields.sorted(by: { $0.key < $1.key }) {
            if key.hasPrefix("vcpu."), let id = UInt32(key.dropFirst(5)) {
                let parts = value.split(separator: " ")
                guard parts.count == 2, let format = UInt32(parts[0]), let bytes = unhex(parts[1]) else { return nil }
                vcpus.append(VCPUState(vcpu: id, format: format, bytes: bytes))
            } else if key.hasPrefix("device.") {
                guard let bytes = unhex(Substring(value)) else { return nil }
                devices.append(DeviceState(name: String(key.dropFirst(7)), bytes: bytes))
            }
        }
        vcpus.sort { $0.vcpu < $1.vcpu }
        guard let clockText = fields["clock"], let layoutText = fields["layout"] else { return nil }
        let c = clockText.split(separator: " ")
        guard c.count == 5, let gm = UInt64(c[0]), let gw = Int64(c[1]), let tsc = UInt32(c[2]), let hm = UInt64(c[3]), let hw = Int64(c[4]) else { return nil }
        let l = layoutText.split(separator: " ", maxSplits: 1)
        guard let generation = UInt64(l.first ?? "") else { return nil }
        var ranges: [PFNRange] = []
        if l.count == 2 {
            for part in l[1].split(separator: ",") {
                let se = part.split(separator: ":")
                guard se.count == 2, let s = UInt64(se[0]), let n = UInt64(se[1]) else { return nil }
                ranges.append(PFNRange(start: s, count: n))
            }
        }
        return GuestState(vcpus: vcpus, devices: devices,
                          clock: ClockState(guestMonotonicNs: gm, guestWallNs: gw, tscKHz: tsc, hostMonotonicNs: hm, hostWallNs: hw),
                          layout: MemoryLayout(generation: generation, ranges: ranges))
    }
}

func hex(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    out.reserveCapacity(bytes.count * 2)
    for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
    return bytes.isEmpty ? "-" : String(decoding: out, as: UTF8.self)
}

package func unhex(_ text: Substring) -> [UInt8]? {
    if text == "-" { return [] }
    let u = Array(text.utf8)
    guard u.count % 2 == 0 else { return nil }
    var out = [UInt8]()
    out.reserveCapacity(u.count / 2)
    func v(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: return c - 48
        case 97...102: return c - 87
        default: return nil
        }
    }
    var i = 0
    while i < u.count {
        guard let h = v(u[i]), let l = v(u[i + 1]) else { return nil }
        out.append(h << 4 | l)
        i += 2
    }
    return out
}

extension String {
    package func replacingNewlines() -> String { split(separator: "\n").joined(separator: " | ") }
}
