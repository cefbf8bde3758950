import Glibc
import RemusCore
import RemusRuntime
import RemusSim
import Synchronization

/// The outside world of a drill: receives every packet a guest's NIC released, tagged with the
/// process that sent it. Over TCP each connection starts with the sender's pid (u64,
/// little-endian), then 32-byte `SimPacket`s. With `udp`, it also receives the tap-backed NICs'
/// frames (`--sim-nic-tap`) as UDP datagrams on 0.0.0.0 at the same port number, each one
/// `SimNICDatagram` (pid, then one packet).
package final class PacketObserver: Sendable {
    package struct Observed: Sendable, Equatable {
        package var pid: UInt64
        package var packet: SimPacket
    }

    /// Where the TCP senders connect (127.0.0.1); its port is also the UDP port.
    package let endpoint: Endpoint
    private let listener: TCPListener
    private let datagrams: UDPSocket?
    private let store = ObservedPackets()

    /// - Parameter udp: also receive UDP datagrams on 0.0.0.0:<endpoint.port>.
    package init(udp: Bool = false) throws {
        (listener, datagrams) = try Self.bind(udp: udp)
        endpoint = listener.endpoint
        let listener = self.listener
        let store = self.store
        // The threads hold the store and the sockets, never the observer, so deinit can stop them.
        startThread(name: "observer") {
            while let ch = try? listener.accept() {
                startThread(name: "observer-conn") { Self.read(ch, into: store) }
            }
        }
        if let datagrams {
            startThread(name: "observer-udp") { Self.receive(datagrams, into: store) }
        }
    }

    deinit {
        listener.shutdown()
        datagrams?.shutdown()
    }

    /// A TCP listener on 127.0.0.1 and, with `udp`, a UDP socket on 0.0.0.0 with the same port
    /// (retried with a new port if that one is taken for UDP).
    private static func bind(udp: Bool) throws -> (TCPListener, UDPSocket?) {
        var attempt = 0
        while true {
            let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
            guard udp else { return (listener, nil) }
            do {
                return (listener, try UDPSocket(port: listener.port))
            } catch let error as SystemError where error.errno == .addressInUse && attempt < 8 {
                attempt += 1
            }
        }
    }

    private static func read(_ ch: TCPChannel, into store: ObservedPackets) {
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var pending: [UInt8] = []
        var pid: UInt64?
        while true {
            let n = (try? buffer.withUnsafeMutableBytes { try ch.read(into: $0) }) ?? 0
            if n <= 0 { return }
            pending += buffer[0..<n]
            var offset = 0
            if pid == nil {
                guard pending.count >= 8 else { continue }
                pid = pending.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
                offset = 8
            }
            var batch: [Observed] = []
            while pending.count - offset >= SimPacket.wireSize {
                let packet = pending.withUnsafeBytes { raw in
                    SimPacket(wire: UnsafeRawBufferPointer(rebasing: raw[offset..<offset + SimPacket.wireSize]))
                }
                if let packet { batch.append(Observed(pid: pid!, packet: packet)) }
                offset += SimPacket.wireSize
            }
            pending.removeFirst(offset)
            store.add(batch, malformed: 0)
        }
    }

    /// Reads datagrams until the socket is shut down: one blocking receive, then whatever else
    /// is queued (up to a batch), then one update of the store.
    private static func receive(_ socket: UDPSocket, into store: ObservedPackets) {
        var buffer = [UInt8](repeating: 0, count: 2048)
        var batch: [Observed] = []
        while true {
            var malformed = 0
            var wait = true  // block for the first datagram of a batch, then take what is queued
            var draining = true
            while draining && batch.count + malformed < 512 {
                switch buffer.withUnsafeMutableBytes({ socket.receive(into: $0, wait: wait) }) {
                case .shutDown:
                    store.add(batch, malformed: malformed, datagrams: true)
                    return
                case .nothingQueued:
                    draining = false
                case .datagram(let n):
                    if let datagram = buffer.withUnsafeBytes({ SimNICDatagram.decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) {
                        batch.append(Observed(pid: datagram.pid, packet: datagram.packet))
                    } else {
                        malformed += 1
                    }
                }
                wait = false
            }
            store.add(batch, malformed: malformed, datagrams: true)
            batch.removeAll(keepingCapacity: true)
        }
    }

    /// Everything received so far, in arrival order per sender.
    package func packets() -> [Observed] { store.packets() }

    /// UDP datagrams received, and how many of them were not a `SimNICDatagram`.
    package func datagramCounts() -> (received: Int, malformed: Int) { store.datagramCounts() }

    /// Waits until nothing has arrived for `ms` (bounded by 50 × ms).
    package func settle(forMs ms: UInt64) { store.settle(forMs: ms) }
}

/// The observer's packets, shared by its reader threads.
private final class ObservedPackets: @unchecked Sendable {  // everything guarded by monitor
    private let monitor = MonitorLock()
    private var received: [PacketObserver.Observed] = []
    private var lastArrival: UInt64 = 0
    private var datagrams = 0
    private var malformed = 0

    func add(_ batch: [PacketObserver.Observed], malformed bad: Int, datagrams counted: Bool = false) {
        guard !batch.isEmpty || bad > 0 else { return }
        let now = SystemClock().monotonicNs()
        monitor.withLock {
            received += batch
            if counted { datagrams += batch.count + bad }
            malformed += bad
            lastArrival = now
            monitor.broadcast()
        }
    }

    func packets() -> [PacketObserver.Observed] { monitor.withLock { received } }
    func datagramCounts() -> (received: Int, malformed: Int) { monitor.withLock { (datagrams, malformed) } }

    func settle(forMs ms: UInt64) {
        let clock = SystemClock()
        let hardDeadline = clock.monotonicNs() + 50 * ms * 1_000_000
        monitor.withLock {
            while true {
                let now = clock.monotonicNs()
                let quietUntil = lastArrival + ms * 1_000_000
                if now >= quietUntil || now >= hardDeadline { return }
                monitor.wait(untilMonotonic: min(quietUntil, hardDeadline))
            }
        }
    }
}

/// A UDP socket bound to 0.0.0.0:`port` with a large receive buffer (a release lets out a whole
/// epoch's frames at once).
final class UDPSocket: Sendable {
    private let fd: Int32
    private let closed = Atomic<Bool>(false)
    /// The port bound.
    let port: UInt16

    init(port: UInt16, receiveBufferBytes: Int32 = 32 << 20) throws {
        let fd = try syscall("socket(UDP)") { socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var size = receiveBufferBytes
        // SO_RCVBUFFORCE passes net.core.rmem_max (root); otherwise the capped SO_RCVBUF.
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(Swift.MemoryLayout<Int32>.size)) != 0 {
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(Swift.MemoryLayout<Int32>.size))
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr = in_addr(s_addr: INADDR_ANY)
        do {
            // SAFETY: sockaddr_in is a plain C struct; bind reads Swift.MemoryLayout<sockaddr_in>.size bytes.
            _ = try withUnsafePointer(to: &address) { (p) throws in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws in
                    try syscall("bind(UDP 0.0.0.0:\(port))") { bind(fd, sa, socklen_t(Swift.MemoryLayout<sockaddr_in>.size)) }
                }
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        self.fd = fd
        self.port = port
    }

    deinit { Glibc.close(fd) }

    enum Received {
        /// A datagram of this many bytes (possibly 0) is in the buffer.
        case datagram(Int)
        /// Nothing is queued (only without waiting).
        case nothingQueued
        /// The socket was shut down.
        case shutDown
    }

    /// Receives one datagram into `buffer`, waiting for one if `wait`.
    func receive(into buffer: UnsafeMutableRawBufferPointer, wait: Bool) -> Received {
        while true {
            let n = recv(fd, buffer.baseAddress, buffer.count, wait ? 0 : Int32(MSG_DONTWAIT))
            if closed.load(ordering: .acquiring) { return .shutDown }
            if n >= 0 { return .datagram(n) }
            let code = errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return .nothingQueued }
            return .shutDown
        }
    }

    /// Makes a blocked `receive` return `.shutDown`.
    func shutdown() {
        closed.store(true, ordering: .releasing)
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }
}

