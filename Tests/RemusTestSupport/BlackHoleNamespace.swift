import Glibc
import RemusSystem

/// A network namespace whose loopback drops every SYN to `port` (nft or iptables), for as long
/// as the value lives. Nil, with the reason, when we are not root or a tool is missing.
public final class BlackHoleNamespace {
    public let name = "rms-bh-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
    public let port: UInt16 = 9

    /// What this host lacks for the test, nil when it has everything (checked without changing anything).
    public static var missing: String? {
        guard getuid() == 0 else { return "needs root to create a network namespace" }
        guard access("/usr/sbin/ip", X_OK) == 0 || access("/sbin/ip", X_OK) == 0 else { return "needs ip (iproute2)" }
        guard access("/usr/sbin/nft", X_OK) == 0 || access("/usr/sbin/iptables", X_OK) == 0 else {
            return "needs nft or iptables to drop SYNs (apt-get install nftables)"
        }
        return nil
    }

    public static func make() -> (BlackHoleNamespace?, String) {
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
    public func run<T: Sendable>(_ body: @escaping @Sendable () -> T) throws -> T {
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
