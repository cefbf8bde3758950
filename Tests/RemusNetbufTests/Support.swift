import Glibc
import RemusNetbuf
import Testing
import RemusSystem
import RemusTestSupport

/// Where the tests that need a kernel with sch_plug run.
let testbedCommand = "bash Tests/Testbed/run.sh"

/// Runs `body` on a new thread that first moves into a fresh, empty network namespace
/// (`unshare(CLONE_NEWNET)` affects only the calling thread). Netlink sockets opened by `body`
/// belong to that namespace; it disappears with the last of them, so nothing leaks to the host.
func inThrowawayNetns<R: Sendable>(_ body: @escaping @Sendable () throws -> R) throws -> R {
    let job = NetnsJob(body: { try body() })
    var thread = pthread_t()
    // SAFETY: the retained job is released by the thread; we join before reading its result.
    let rc = pthread_create(&thread, nil, { raw in
        let job = Unmanaged<NetnsJob>.fromOpaque(raw!).takeRetainedValue()
        if unshareNetworkNamespace() != 0 {
            job.result = .failure(NetnsUnavailable(errno: errno))
            return nil
        }
        // A quiet namespace: without IPv6 new interfaces send no DAD, MLD or router
        // solicitations, so the packets a test counts are the ones it sent. (/proc/sys/net
        // belongs to the namespace of the thread that opens it.)
        for key in ["all", "default"] { writeSysctl("/proc/sys/net/ipv6/conf/\(key)/disable_ipv6", "1") }
        job.result = Result { try job.body() }
        return nil
    }, Unmanaged.passRetained(job).toOpaque())
    precondition(rc == 0, "pthread_create failed: \(rc)")
    pthread_join(thread, nil)
    return try job.result!.get() as! R
}

/// Best effort: a kernel without IPv6 has nothing to quieten.
private func writeSysctl(_ path: String, _ value: String) {
    let fd = open(path, O_WRONLY)
    guard fd >= 0 else { return }
    _ = value.withCString { write(fd, $0, strlen($0)) }
    close(fd)
}

/// `unshare(CLONE_NEWNET)`: glibc declares it only under _GNU_SOURCE, which Swift's Glibc
/// module does not set, so look it up at run time.
private func unshareNetworkNamespace() -> Int32 {
    typealias Unshare = @convention(c) (Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "unshare") else { return -1 }
    let cloneNewNet: Int32 = 0x4000_0000
    // SAFETY: glibc's unshare has the C signature int unshare(int flags).
    return unsafeBitCast(symbol, to: Unshare.self)(cloneNewNet)
}

/// A closure and its result, handed to one thread and read after joining it.
/// @unchecked Sendable: written by the worker thread only, read after pthread_join (a full barrier).
private final class NetnsJob: @unchecked Sendable {
    let body: () throws -> Any
    var result: Result<Any, any Error>?
    init(body: @escaping () throws -> Any) { self.body = body }
}

struct NetnsUnavailable: Error, CustomStringConvertible {
    let errno: Int32
    var description: String { "unshare(CLONE_NEWNET): \(String(cString: strerror(errno)))" }
}

/// What the machine running the tests can do, probed once, honestly: by trying.
enum Kernel {
    /// A throwaway namespace can be created and configured (root: CAP_SYS_ADMIN + CAP_NET_ADMIN),
    /// and ifb devices exist.
    static let canBuildNamespaces: Bool = {
        (try? inThrowawayNetns {
            let socket = try NetlinkSocket()
            try socket.addLink(name: "probe0", kind: "ifb")
            return true
        }) ?? false
    }()

    /// The kernel has the plug qdisc: creating one succeeds. ENOENT/EOPNOTSUPP mean it does not.
    static let hasPlug: Bool = {
        guard canBuildNamespaces else { return false }
        return (try? inThrowawayNetns {
            let socket = try NetlinkSocket()
            try socket.addLink(name: "probe0", kind: "ifb")
            guard let ifb = try socket.link(named: "probe0") else { return false }
            do throws(NetlinkError) {
                try socket.addPlugQdisc(ifindex: ifb.index, limitBytes: 10_000)
                return true
            } catch {
                if error.isNotFound || error.isNotSupported { return false }
                throw error
            }
        }) ?? false
    }()

    static let namespaceSkipMessage: Comment =
        "needs root (CAP_SYS_ADMIN for a throwaway network namespace, CAP_NET_ADMIN inside it) and the ifb module"
    static let plugSkipMessage: Comment =
        "this kernel has no sch_plug qdisc; run the plug tests in the QEMU testbed: bash Tests/Testbed/run.sh"
}


/// Everything about the namespace's interfaces that setup may touch, to compare before/after.
struct NetworkSnapshot: Equatable, CustomStringConvertible {
    struct LinkState: Equatable { var index: Int32; var name: String; var kind: String?; var alias: String?; var isUp: Bool }
    struct QdiscState: Equatable { var ifindex: Int32; var kind: String; var handle: UInt32; var parent: UInt32 }
    struct FilterState: Equatable { var ifindex: Int32; var kind: String; var priority: UInt16; var ethProtocol: UInt16; var handle: UInt32 }

    var links: [LinkState]
    var qdiscs: [QdiscState]
    var filters: [FilterState]

    init(_ socket: NetlinkSocket) throws {
        let all = try socket.links()
        links = all.map { LinkState(index: $0.index, name: $0.name, kind: $0.kind, alias: $0.alias, isUp: $0.isUp) }
        let qdiscList = try socket.qdiscs()
        qdiscs = qdiscList.map { QdiscState(ifindex: $0.ifindex, kind: $0.kind, handle: $0.handle, parent: $0.parent) }
        filters = []
        for q in qdiscList where q.kind == "ingress" {
            filters += try socket.filters(ifindex: q.ifindex, parent: TCHandle.ingress).map {
                FilterState(ifindex: $0.ifindex, kind: $0.kind, priority: $0.priority, ethProtocol: $0.ethProtocol, handle: $0.handle)
            }
        }
    }

    var description: String { "links: \(links)\nqdiscs: \(qdiscs)\nfilters: \(filters)" }
}

/// A veth pair `guest` ⇄ `peer`, both up: `guest` plays the host side of a guest's interface
/// (a vif), `peer` the guest's own NIC, from which test frames are sent.
func makeVethPair(_ socket: NetlinkSocket, guest: String = "vif1", peer: String = "eth1") throws -> (guest: NetlinkSocket.Link, peer: NetlinkSocket.Link) {
    try socket.addVethPair(guest, peer: peer)
    let g = try #require(try socket.link(named: guest))
    let p = try #require(try socket.link(named: peer))
    try socket.setUp(index: g.index)
    try socket.setUp(index: p.index)
    return (g, p)
}
