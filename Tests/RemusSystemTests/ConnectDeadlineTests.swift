import Glibc
import RemusSystem
import Testing

/// A network namespace whose loopback drops every SYN to `port` (nft or iptables), for as long
/// as the value lives. Nil, with the reason, when we are not root or a tool is missing.
private final class BlackHoleNamespace {
    let name = "rms-bh-\(getpid())"
    let port: UInt16 = 9

    /// What this host lacks for the test, nil when it has everything (checked without changing anything).
    static var missing: String? {
        guard getuid() == 0 else { return "needs root to create a network namespace" }
        guard access("/usr/sbin/ip", X_OK) == 0 || access("/sbin/ip", X_OK) == 0 else { return "needs ip (iproute2)" }
        guard access("/usr/sbin/nft", X_OK) == 0 || access("/usr/sbin/iptables", X_OK) == 0 else {
            return "needs nft or iptables to drop SYNs (apt-get install nftables)"
        }
        return nil
    }

    static func make() -> (BlackHoleNamespace?, String) {
        if let missing { return (nil, missing) }
        let namespace = BlackHoleNamespace()
        _ = try? runShell("ip netns del \(namespace.name) 2>/dev/null", timeoutMs: 5000)
        guard shell("ip netns add \(namespace.name) && ip -n \(namespace.name) link set lo up") else {
            return (nil, "ip netns add failed (no permission to create network namespaces here)")
        }
        let drop: String
        if access("/usr/sbin/nft", X_OK) == 0 {
            drop = "nft add table inet rms && nft add chain inet rms input '{ type filter hook input priority 0; }' "
                + "&& nft add rule inet rms input tcp dport \(namespace.port) drop"
        } else if access("/usr/sbin/iptables", X_OK) == 0 {
            drop = "iptables -A INPUT -p tcp --dport \(namespace.port) -j DROP"
        } else {
            return (nil, "needs nft or iptables to drop SYNs (apt-get install nftables)")
        }
        guard shell("ip netns exec \(namespace.name) sh -c \"\(drop)\"") else {
            return (nil, "could not install the DROP rule in the namespace (nf_tables/iptables unavailable in this kernel)")
        }
        return (namespace, "")
    }

    deinit { _ = shell("ip netns del \(name)") }

    /// Runs `body` on a thread that has entered the namespace (setns is per thread).
    func run<T: Sendable>(_ body: @escaping @Sendable () -> T) throws -> T {
        let box = ResultBox<T>()
        let path = "/var/run/netns/\(name)"
        let thread = try JoinableThread(name: "in-netns") {
            let fd = open(path, O_RDONLY)
            guard fd >= 0, enterNetworkNamespace(fd) == 0 else {
                box.set(nil)
                return
            }
            close(fd)
            box.set(body())
        }
        thread.join()
        guard let value = box.get() else { throw SystemError(call: "setns(\(path))", errno: EPERM) }
        return value
    }
}

/// setns is behind _GNU_SOURCE in Glibc's module: looked up at run time.
private func enterNetworkNamespace(_ fd: Int32) -> Int32 {
    typealias SetNS = @convention(c) (Int32, Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { return -1 }  // RTLD_DEFAULT (NULL)
    return unsafeBitCast(symbol, to: SetNS.self)(fd, 0x4000_0000)  // CLONE_NEWNET
}

private final class ResultBox<T>: @unchecked Sendable {  // written by one thread before join, read after
    private var value: T?
    func set(_ v: T?) { value = v }
    func get() -> T? { value }
}

private func shell(_ command: String) -> Bool {
    (try? runShell(command + " >/dev/null 2>&1", timeoutMs: 10_000))?.succeeded ?? false
}

@Suite("Outbound connects have a deadline", .serialized)
struct ConnectDeadlineTests {
    @Test("A host that drops SYNs costs the deadline, and the error says 'no answer within N ms'",
          .enabled(if: BlackHoleNamespace.missing == nil, Comment(rawValue: BlackHoleNamespace.missing ?? "")))
    func blackHoledConnectFailsWithinItsDeadline() throws {
        let (namespace, why) = BlackHoleNamespace.make()
        // The prerequisites are there (the trait checked them): a namespace that still cannot be
        // made is a failure, not a skip.
        guard let namespace else {
            Issue.record("could not set up the black-holed namespace: \(why)")
            return
        }
        let result: (error: SystemError?, elapsedMs: UInt64) = try namespace.run {
            let start = monotonicNanoseconds()
            do throws(SystemError) {
                _ = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: 9), deadline: .after(milliseconds: 300))
                return (nil, (monotonicNanoseconds() - start) / 1_000_000)
            } catch {
                return (error, (monotonicNanoseconds() - start) / 1_000_000)
            }
        }
        let error = try #require(result.error, "a connect to a port whose SYNs are dropped cannot succeed")
        #expect(error.isTimeout, "\(error)")
        #expect(error.description.contains("no answer within 300 ms"), "\(error)")
        #expect(result.elapsedMs >= 290 && result.elapsedMs < 1500, "took \(result.elapsedMs) ms for a 300 ms deadline")
    }

    @Test("A refused port fails at once with ECONNREFUSED, not a timeout")
    func refusedConnectFailsFast() throws {
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let port = listener.port
        listener.shutdown()
        _ = consume listener
        let start = monotonicNanoseconds()
        let error = try #require(throws: SystemError.self) {
            try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
        }
        #expect(error.errno == .connectionRefused, "\(error)")
        #expect((monotonicNanoseconds() - start) / 1_000_000 < 1000)
    }

    @Test("A connect that is answered hands back a working blocking channel")
    func answeredConnectCarriesBytes() throws {
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let client = try TCPChannel.connect(to: listener.endpoint, deadline: .after(milliseconds: 5000))
        let server = try listener.accept()
        try client.write(Array("ping".utf8))
        var buffer = [UInt8](repeating: 0, count: 4)
        var got = 0
        while got < 4 {
            let n = try buffer.withUnsafeMutableBytes { try server.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[got...])) }
            #expect(n > 0)
            if n == 0 { break }
            got += n
        }
        #expect(String(decoding: buffer, as: UTF8.self) == "ping")
    }
}
