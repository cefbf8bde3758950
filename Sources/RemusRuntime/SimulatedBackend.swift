import RemusCore
import RemusDisk
import RemusNetbuf
import RemusSim

/// Builds the simulated guest's primary and replica for the backend factory.
enum SimulatedBackend {
    /// Boots a fresh simulated guest for `remusd protect`, with its output buffer: over a tap the
    /// plug qdisc holds the guest's frames and the in-process buffer passes them straight into
    /// the tap. Both are set up before the guest runs, so their errors come first.
    static func openPrimary(_ config: ProtectConfiguration, clock: any HostClock) throws -> OpenedGuest {
        let sink = try makeSink(nicSink: config.nicSink, tap: config.simNICTap)
        let plug = try config.simNICTap.flatMap { try plugBuffer($0) }
        let running = try startGuest(name: config.domain, parameters: config.simulated, sink: sink, clock: clock)
        let buffer: any OutputBuffer = plug ?? running.output
        if let tap = config.simNICTap {
            let held = plug.map { p in p.attachments.map { "\($0.interface) (\($0.ifbName))" }.joined(separator: ", ") }
            Log.info("the guest's NIC writes into tap \(tap.tap); " + (held.map { "output held by plug qdiscs on \($0)" } ?? "output NOT held (--unsafe --no-netbuf)"))
        }
        return OpenedGuest(guest: running.guest, output: config.unsafeNoNetbuf ? PassThroughOutput(buffer) : buffer, close: {})
    }

    static func config(_ p: SimulatedGuestParameters) -> SimConfig {
        var c = SimConfig(memoryBytes: p.memoryBytes, vcpus: p.vcpus, seed: p.seed)
        c.dirtyRateLimit = p.dirtyRate
        if p.diskPath != nil { c.diskBytes = p.diskBytes }
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
        let c = config(parameters)
        let disk = try parameters.diskPath.map { path in
            do { return try SimGuest.openDisk(c, path: path, create: true) } catch { throw ProtocolError("\(error)") }
        }
        if let path = parameters.diskPath { Log.info("the guest's disk '\(SimGuest.diskName)' is \(path) (\(c.diskBytes >> 20) MiB), replicated with every checkpoint") }
        let guest = try SimGuest(config: c, clock: clock, nic: output, name: name, disk: disk)
        return (guest, output)
    }

    /// An empty replica whose activated guest will emit into `sink`, and its check of that guest.
    static func makeReplica(sink: any PacketSink, clock: any HostClock) -> BackupReplica {
        let replica = SimReplica(clock: clock, nic: SimOutputBuffer(sink: sink, holding: false))
        // The disk as the guest resumes on it, read before it runs, for the I9 check.
        let snapshot = DiskSnapshot()
        return BackupReplica(
            replica, verifyActivation: { clock in try verifyActivation(of: replica, disk: snapshot.image, clock: clock) },
            committedFields: {
                guard let config = replica.config, let committed = replica.committedState else { return nil }
                return committedFields(config: config, committed: committed)
            },
            attachDisks: { disks, keepSnapshot in
                guard let (descriptor, path) = disks.first, disks.count == 1, let config = replica.config, config.diskBytes == descriptor.sizeBytes else {
                    throw ProtocolError("the simulated guest has one disk of its config's size; the stream described \(disks.map { "'\($0.0.name)' (\($0.0.sizeBytes) bytes)" })")
                }
                let journal = try SimGuest.openDisk(config, path: path, create: false)
                if keepSnapshot {
                    var image = [UInt8](repeating: 0, count: Int(descriptor.sizeBytes))
                    try image.withUnsafeMutableBytes { try journal.read(disk: 0, at: 0, into: $0) }
                    snapshot.image = image
                }
                replica.attachDisk(journal)
            })
    }

    /// The activation report's fields for an activated replica: the first guest clock reading
    /// (I4), the memory and registers verified against a replay (the guest is suspended for the
    /// check, after the activation time was taken), and the committed state.
    static func verifyActivation(of replica: SimReplica, disk: [UInt8]?, clock: any HostClock) throws -> [String: String] {
        guard let guest = replica.activatedGuest, let committed = replica.committedState, let config = replica.config else {
            return ["verified": "the simulated replica holds no activated guest"]
        }
        var fields: [String: String] = [:]
        // I4: the first guest clock reading after resuming, with the host time of that reading.
        let reading = guest.clockNow()
        fields["first_guest_monotonic_ns"] = "\(reading.guestMonotonicNs)"
        fields["first_reading_host_ns"] = "\(clock.monotonicNs())"
        try guest.suspend()
        // One replay for both checks: to the committed op counts for the disk, then on to the
        // guest's current ones for memory.
        let verifier = SimVerifier(config: config)
        let replay = try SimReplay(config: config)
        if config.diskBytes > 0 {
            // I9 on the image as it was when the guest resumed (its continuation rewrites the same blocks).
            let diskReport = disk.map { image in image.withUnsafeBytes { verifier.verifyDisk(image: $0, committed: committed, replay: replay) } }
            fields["disk_verified"] = diskReport?.passed == true ? "yes" : "no"
            fields["disk_report"] = diskReport?.description.replacingNewlines() ?? "the disk was not read before activation"
        }
        let report = verifier.verifyActivation(guest: guest, committed: committed, replay: replay)
        try guest.resume()
        fields["memory_verified"] = report.passed ? "yes" : "no"
        fields["memory_report"] = report.description.replacingNewlines()
        return fields.merging(committedFields(config: config, committed: committed)) { _, c in c }
    }

    /// The committed state and the guest's config as the activation report records them
    /// (`ActivationReport.committedState`).
    static func committedFields(config: SimConfig, committed: GuestState) -> [String: String] {
        var fields: [String: String] = [:]
        fields["domain_config"] = hex(config.encode().bytes)
        for v in committed.vcpus { fields["vcpu.\(v.vcpu)"] = "\(v.format) \(hex(v.bytes))" }
        for d in committed.devices { fields["device.\(d.name)"] = hex(d.bytes) }
        let c = committed.clock
        fields["clock"] = "\(c.guestMonotonicNs) \(c.guestWallNs) \(c.tscKHz) \(c.hostMonotonicNs) \(c.hostWallNs)"
        fields["layout"] = "\(committed.layout.generation) " + committed.layout.ranges.map { "\($0.start):\($0.count)" }.joined(separator: ",")
        return fields
    }
}

/// `--unsafe --no-netbuf`: output is never held back.
final class PassThroughOutput: OutputBuffer {
    private let inner: any OutputBuffer
    init(_ inner: any OutputBuffer) { self.inner = inner }
    func closeEpoch(_ epoch: Epoch) throws {}
    func release(through epoch: Epoch) throws {}
    func releaseAll() throws { try inner.releaseAll() }
    func hold() throws {}
    func statistics() throws -> OutputStatistics { try inner.statistics() }
}

/// The simulated disk's content read before activation, for the activation report's I9 check.
///
/// `@unchecked Sendable`: written on the loop thread before activation, read on it after.
final class DiskSnapshot: @unchecked Sendable {
    var image: [UInt8]?
}
