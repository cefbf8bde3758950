import Foundation
import RemusCore
import RemusDrill
import RemusNetbuf
@testable import RemusRuntime
import RemusSim
import Testing
import RemusTestSupport

/// The built `remusd` next to the test bundle.
private var remusd: String {
    URL(fileURLWithPath: ProcessEnvironment.executablePath).deletingLastPathComponent().appendingPathComponent("remusd").path
}

private let testbedCommand = "bash Tests/Testbed/run.sh"

private func packet(_ vcpu: UInt32, _ seq: UInt64) -> SimPacket {
    SimPacket(vcpu: vcpu, seq: seq, opCount: seq * 64 + 3, digest: 0x1234_5678_9ABC_DEF0 ^ seq)
}


/// Sends raw datagrams to 127.0.0.1:`port`.
private func sendDatagrams(_ datagrams: [[UInt8]], to port: UInt16) throws {
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    guard fd >= 0 else { throw SystemError(call: "socket", errno: errno) }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
    for d in datagrams {
        // SAFETY: sockaddr_in is a plain C struct; sendto reads its size in bytes.
        let n = d.withUnsafeBytes { b in
            withUnsafePointer(to: &address) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, b.baseAddress, b.count, 0, $0, socklen_t(Swift.MemoryLayout<sockaddr_in>.size)) }
            }
        }
        guard n == d.count else { throw SystemError(call: "sendto", errno: errno) }
    }
}

@Suite("The simulated NIC over a tap: datagrams and the UDP observer")
struct SimNICDatagramTests {
    @Test("A datagram is the pid (u64 LE) and one 32-byte packet, and decodes back")
    func datagramLayout() throws {
        var bytes = [UInt8](repeating: 0, count: SimNICDatagram.size)
        let p = packet(1, 77)
        bytes.withUnsafeMutableBytes { SimNICDatagram.encode(pid: 0x0102_0304_0506_0708, packet: p, into: $0) }
        #expect(bytes.count == 40)
        #expect(Array(bytes[0..<8]) == [8, 7, 6, 5, 4, 3, 2, 1])
        #expect(Array(bytes[8...]) == p.encode())
        #expect(SimNICDatagram.decode(bytes) == SimNICDatagram(pid: 0x0102_0304_0506_0708, packet: p))
        #expect(SimNICDatagram.decode(Array(bytes.dropLast())) == nil, "39 bytes")
        #expect(SimNICDatagram.decode(bytes + [0]) == nil, "41 bytes")
        var wrongMarker = bytes
        wrongMarker[12] ^= 0xFF
        #expect(SimNICDatagram.decode(wrongMarker) == nil, "the SimPacket marker is checked")
    }

    @Test("The observer receives UDP datagrams on its port, tags them by pid, and counts malformed ones")
    func observerReceivesDatagrams() throws {
        let observer = try PacketObserver(udp: true)
        var datagrams: [[UInt8]] = []
        for seq in 0..<300 as Range<UInt64> {
            var d = [UInt8](repeating: 0, count: SimNICDatagram.size)
            d.withUnsafeMutableBytes { SimNICDatagram.encode(pid: seq < 200 ? 4242 : 4343, packet: packet(UInt32(seq % 2), seq), into: $0) }
            datagrams.append(d)
        }
        datagrams.insert(Array(repeating: 0x55, count: 40), at: 10)
        datagrams.insert(Array("not a packet".utf8), at: 20)
        try sendDatagrams(datagrams, to: observer.endpoint.port)
        #expect(eventually(deadline: .after(seconds: 10)) { observer.datagramCounts().received == 302 }, "counts: \(observer.datagramCounts())")
        let counts = observer.datagramCounts()
        #expect(counts.malformed == 2)
        let seen = observer.packets()
        #expect(seen.count == 300)
        #expect(seen.filter { $0.pid == 4242 }.map(\.packet.seq) == Array(0..<200))
        #expect(seen.filter { $0.pid == 4343 }.map(\.packet.seq) == Array(200..<300))
        #expect(seen.allSatisfy { $0.packet == packet(UInt32($0.packet.seq % 2), $0.packet.seq) })
    }

    @Test("The TCP path still works beside UDP: pid first, then packets")
    func observerKeepsTCP() throws {
        let observer = try PacketObserver(udp: true)
        let sink = TCPPacketSink(endpoint: observer.endpoint)
        sink.deliver((0..<5).map { packet(0, $0) })
        #expect(eventually(deadline: .after(seconds: 10)) { observer.packets().count == 5 })
        #expect(observer.packets().allSatisfy { $0.pid == UInt64(getpid()) })
        #expect(observer.datagramCounts().received == 0)
    }

    @Test("A tap sink's frames cross the kernel into the observer, tagged with this process's pid",
          .enabled(if: Namespace.available, "needs root (a throwaway network namespace) and /dev/net/tun"))
    func tapSinkReachesTheObserver() throws {
        let (addressing, result): (UDPFrameAddressing, [PacketObserver.Observed]) = try Namespace.run {
            try TapAdministration.create("nic0")
            try TapAdministration.configure("nic0", address: IPv4Address(10, 99, 0, 1), prefixLength: 24)
            let observer = try PacketObserver(udp: true)
            let sink = TapPacketSink(device: try TapDevice(attaching: "nic0"), port: observer.endpoint.port)
            sink.deliver((0..<100).map { packet(UInt32($0 % 3), $0) })
            _ = eventually(deadline: .after(seconds: 10)) { observer.packets().count >= 100 }
            return (sink.addressing, observer.packets())
        }
        #expect(addressing.source == IPv4Address(10, 99, 0, 2) && addressing.destination == IPv4Address(10, 99, 0, 1))
        #expect(addressing.sourceMAC == TapPacketSink.guestMAC && addressing.sourceMAC[0] & 0x03 == 0x02, "unicast, locally administered")
        #expect(result.count == 100)
        #expect(result.allSatisfy { $0.pid == UInt64(getpid()) })
        #expect(result.map(\.packet) == (0..<100).map { packet(UInt32($0 % 3), $0) })
    }
}

@Suite("Tap-backed NIC options of the command line", .serialized)
struct SimNICTapCommandTests {
    @Test("protect and receive refuse a missing tap with what to do; nothing starts")
    func missingTap() throws {
        let (status, output) = try runTestShell("'\(remusd)' protect g 127.0.0.1:1 --insecure-plaintext --backend sim --sim-memory 8 --sim-nic-tap rmsnone9 --nic-sink 127.0.0.1:9 --status-socket /tmp/rmsnone9.sock 2>&1")
        #expect(status != 0)
        #expect(output.contains("tap 'rmsnone9' does not exist") && output.contains("ip tuntap add mode tap rmsnone9"), "\(output)")
        let (rs, ro) = try runTestShell("'\(remusd)' receive --listen 127.0.0.1:0 --insecure-plaintext --sim-nic-tap rmsnone9 --nic-sink 127.0.0.1:9 --status-socket /tmp/rmsnone9r.sock 2>&1")
        #expect(rs != 0 && ro.contains("does not exist"), "\(ro)")
    }

    @Test("Contradictory or incomplete tap options are refused")
    func invalidOptions() throws {
        for (args, expected) in [
            ("--sim-nic-tap rt0", "needs --nic-sink"),
            ("--netbuf eth0", "--netbuf needs --sim-nic-tap"),
            ("--sim-nic-tap rt0 --nic-sink 127.0.0.1:9 --netbuf rt1", "must include the --sim-nic-tap tap 'rt0'"),
            ("--sim-nic-tap rt0 --nic-sink 127.0.0.1:9 --unsafe --no-netbuf --netbuf rt0", "contradict"),
            ("--sim-nic-tap rt0 --nic-sink 127.0.0.1:9 --netbuf-limit 0", "--netbuf-limit"),
        ] {
            let (status, output) = try runTestShell("'\(remusd)' protect g 127.0.0.1:1 --insecure-plaintext --backend sim \(args) 2>&1")
            #expect(status != 0 && output.contains(expected), "\(args): \(output)")
        }
    }

    @Test("The drill names the taps it needs and how to create them")
    func drillNeedsTaps() throws {
        let (status, output) = try runTestShell("'\(remusd)' drill --failovers 2 --sim-nic-taps rmsz 2>&1")
        #expect(status != 0)
        #expect(output.contains("rmsz0 … rmsz3") && output.contains("ip tuntap add mode tap rmsz$i") && output.contains(testbedCommand), "\(output)")
    }

    @Test("Over a tap on a kernel without sch_plug, protect says to run inside the testbed",
          .enabled(if: Namespace.available, "needs root (a throwaway network namespace) and /dev/net/tun"))
    func noPlugNamesTheTestbed() throws {
        let (status, output): (Int32, String) = try Namespace.run {
            try TapAdministration.create("nic1")
            try TapAdministration.configure("nic1", address: IPv4Address(10, 99, 1, 1), prefixLength: 24)
            // Spawned from this thread, the process lives in the throwaway namespace too.
            return try runTestShell("timeout 20 '\(remusd)' protect g 127.0.0.1:1 --insecure-plaintext --backend sim --sim-memory 8 --sim-nic-tap nic1 --nic-sink 127.0.0.1:9 --status-socket /tmp/rmsnic1-\(getpid()).sock 2>&1")
        }
        guard !output.contains("protecting 'g'") else {
            // This kernel has sch_plug: the plug path is the testbed's drill, not this check.
            return
        }
        #expect(status != 0)
        #expect(output.contains("no 'plug' qdisc") && output.contains(testbedCommand), "\(output)")
    }
}

/// A throwaway network namespace for the calling test, on a thread of its own
/// (`unshare(CLONE_NEWNET)` moves only the calling thread; its children inherit it).
enum Namespace {
    static let available: Bool = access("/dev/net/tun", R_OK | W_OK) == 0 && ((try? run { true }) ?? false)

    static func run<R: Sendable>(_ body: @escaping @Sendable () throws -> R) throws -> R {
        let box = ResultBox<R>()
        startThread(name: "netns") {
            typealias Unshare = @convention(c) (Int32) -> Int32
            // glibc declares unshare only under _GNU_SOURCE, which Swift's Glibc does not set.
            guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "unshare") else {
                box.set(.failure(SystemError(call: "dlsym(unshare)", errno: ENOSYS)))
                return
            }
            // SAFETY: glibc's unshare has the C signature int unshare(int flags); 0x40000000 is CLONE_NEWNET.
            guard unsafeBitCast(symbol, to: Unshare.self)(0x4000_0000) == 0 else {
                box.set(.failure(SystemError(call: "unshare(CLONE_NEWNET)", errno: errno)))
                return
            }
            box.set(Result {
                // The observer's TCP side listens on 127.0.0.1: loopback must be up.
                let socket = try NetlinkSocket()
                if let lo = try socket.link(named: "lo") { try socket.setUp(index: lo.index) }
                return try body()
            })
        }
        return try box.wait().get()
    }

    private final class ResultBox<R: Sendable>: @unchecked Sendable {  // guarded by monitor
        private let monitor = MonitorLock()
        private var result: Result<R, any Error>?
        func set(_ r: Result<R, any Error>) { monitor.withLock { result = r; monitor.broadcast() } }
        func wait() -> Result<R, any Error> {
            monitor.withLock {
                while result == nil { monitor.wait(untilMonotonic: nil) }
                return result!
            }
        }
    }
}
