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
