import RemusCore
import RemusNetbuf
import RemusSim

/// Builds the simulated guest's primary and replica for the daemons.
enum SimulatedBackend {
    static func config(_ p: SimulatedGuestParameters) -> SimConfig {
        var c = SimConfig(memoryBytes: p.memoryBytes, vcpus: p.vcpus, seed: p.seed)
        c.dirtyRateLimit = p.dirtyRate
        return c
    }

    static func sink(_ endpoint: Endpoint?) -> any PacketSink {
        endpoint.map { TCPPacketSink(endpoint: $0) } ?? DiscardingPacketSink()
    }

    /// Where the guest's NIC delivers: frames into the tap of `tap` (to the UDP port of
    /// `nicSink`), or over TCP to `nicSink`, or nowhere.
    static func makeSink(nicSink: Endpoint?, tap: SimNICTapConfiguration?) throws -> any PacketSink {
        guard let tap else { return sink(nicSink) }
        guard let port = nicSink?.port else {
            throw ProtocolError("--sim-nic-tap needs --nic-sink host:port: its port is the UDP port the guest's frames go to; nothing was started")
        }
        do {
            return TapPacketSink(device: try TapDevice(attaching: tap.tap), port: port)
        } catch {
            throw ProtocolError("\(error); nothing was started")
        }
    }

    /// The plug-qdisc output buffer of a tap-backed NIC (it holds from creation); nil when
    /// output is not held (`--unsafe --no-netbuf`).
    static func plugBuffer(_ tap: SimNICTapConfiguration) throws -> PlugOutputBuffer? {
        guard !tap.netbuf.isEmpty else { return nil }
        do {
            return try PlugOutputBuffer(interfaces: tap.netbuf, limitBytes: tap.netbufLimitBytes)
        } catch NetbufError.plugUnavailable(let interface, let cause) {
            throw ProtocolError("\(NetbufError.plugUnavailable(interface: interface, cause)) Nothing was started. "
                + "Build machines' kernels lack sch_plug: run the simulated NIC over a real plug inside the testbed, "
                + "bash Tests/Testbed/run.sh")
        } catch {
            throw ProtocolError("\(error); nothing was started")
        }
    }

    /// Boots a fresh simulated guest; its NIC passes packets straight to `sink` until protection
    /// holds them (`SimOutputBuffer.hold()`), or, over a tap, for ever (the plug holds them).
    static func startGuest(name: String, parameters: SimulatedGuestParameters, sink: any PacketSink, clock: any HostClock) throws -> (guest: SimGuest, output: SimOutputBuffer) {
        let output = SimOutputBuffer(sink: sink, holding: false)
        let guest = try SimGuest(config: config(parameters), clock: clock, nic: output, name: name)
        return (guest, output)
    }

    /// An empty replica whose activated guest will emit into `sink`.
    static func makeReplica(sink: any PacketSink, clock: any HostClock) -> SimReplica {
        SimReplica(clock: clock, nic: SimOutputBuffer(sink: sink, holding: false))
    }

    /// The guest an activated replica runs, with its output buffer.
    static func runningGuest(from replica: any ReplicaTarget) -> (guest: SimGuest, output: SimOutputBuffer)? {
        guard let sim = replica as? SimReplica, let guest = sim.activatedGuest, let nic = guest.nic else { return nil }
        return (guest, nic)
    }
}

/// What a backup activated, written for the drill's verifier: timings, the committed state, the
/// in-process verification of memory and registers against a replay, and a clock reading.
/// A line-based text file: `key value`.
struct ActivationReport {
    var fields: [String: String] = [:]

    static func before(epoch: Epoch, lastHeardAt: UInt64, lossDetectedAt: UInt64, lostWhileStaging: Bool, fencedAt: UInt64) -> ActivationReport {
        var r = ActivationReport()
        r.fields["epoch"] = "\(epoch)"
        r.fields["last_heard_ns"] = "\(lastHeardAt)"
        r.fields["loss_detected_ns"] = "\(lossDetectedAt)"
        r.fields["fenced_ns"] = "\(fencedAt)"
        r.fields["lost_while_staging"] = lostWhileStaging ? "1" : "0"
        return r
    }

    /// Adds the activation time, verifies the activated guest against a replay (suspending it for
    /// the check, after the activation time was taken) and records the committed state.
    func completed(replica: any ReplicaTarget, activatedAt: UInt64, clock: any HostClock) throws -> ActivationReport {
        var r = self
        r.fields["activated_ns"] = "\(activatedAt)"
        guard let sim = replica as? SimReplica, let guest = sim.activatedGuest, let committed = sim.committedState, let config = sim.config else {
            r.fields["verified"] = "not a simulated guest"
            return r
        }
        // I4: the first guest clock reading after resuming, with the host time of that reading.
        let reading = guest.clockNow()
        r.fields["first_guest_monotonic_ns"] = "\(reading.guestMonotonicNs)"
        r.fields["first_reading_host_ns"] = "\(clock.monotonicNs())"
        try guest.suspend()
        let report = SimVerifier(config: config).verifyActivation(guest: guest, committed: committed)
        try guest.resume()
        r.fields["memory_verified"] = report.passed ? "yes" : "no"
        r.fields["memory_report"] = report.description.replacingNewlines()
        r.fields["domain_config"] = hex(config.encode().bytes)
        for v in committed.vcpus { r.fields["vcpu.\(v.vcpu)"] = "\(v.format) \(hex(v.bytes))" }
        for d in committed.devices { r.fields["device.\(d.name)"] = hex(d.bytes) }
        let c = committed.clock
        r.fields["clock"] = "\(c.guestMonotonicNs) \(c.guestWallNs) \(c.tscKHz) \(c.hostMonotonicNs) \(c.hostWallNs)"
        r.fields["layout"] = "\(committed.layout.generation) " + committed.layout.ranges.map { "\($0.start):\($0.count)" }.joined(separator: ",")
        return r
    }

    func write(to path: String) throws {
        let text = fields.keys.sorted().map { "\($0) \(fields[$0]!)" }.joined(separator: "\n") + "\n"
        // Written under a temporary name and renamed, so a reader never sees half a report.
        let tmp = path + ".tmp"
        try writeFile(tmp, Array(text.utf8))
        try renameFile(tmp, path)
    }

    static func read(from path: String) throws -> ActivationReport {
        guard let text = readWholeFile(path) else { throw ProtocolError("cannot read the activation report \(path)") }
        var r = ActivationReport()
        for line in text.split(separator: "\n") {
            guard let space = line.firstIndex(of: " ") else { continue }
            r.fields[String(line[..<space])] = String(line[line.index(after: space)...])
        }
        return r
    }

    func number(_ key: String) -> UInt64? { fields[key].flatMap { UInt64($0) } }

    /// The committed state as recorded.
    func committedState() -> GuestState? {
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

/// The drill's checks of one failover.
enum DrillVerifier {
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
        // Silence detected before the kill: a false alarm under load. It is safe when the checks
        // below pass (the primary held its output, the fence waited for the real death).
        result.falseAlarm = detected < killedAt
        if report.fields["memory_verified"] != "yes" {
            problems.append("memory/registers/layout: \(report.fields["memory_report"] ?? "no verification in the report")")
        }
        guard let state = report.committedState(), let configHex = report.fields["domain_config"], let configBytes = unhex(Substring(configHex)),
              let config = try? SimConfig(DomainConfig(format: .simulated, bytes: configBytes)) else {
            result.problems = problems + ["the activation report has no readable committed state"]
            return result
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

func hex(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    out.reserveCapacity(bytes.count * 2)
    for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
    return bytes.isEmpty ? "-" : String(decoding: out, as: UTF8.self)
}

func unhex(_ text: Substring) -> [UInt8]? {
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
    func replacingNewlines() -> String { split(separator: "\n").joined(separator: " | ") }
}
