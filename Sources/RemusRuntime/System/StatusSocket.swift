import Glibc

/// Where daemons put their status sockets: $REMUSD_RUN_DIR, else /run/remusd as root, else /tmp/remusd-<uid>.
public enum RunDirectory {
    public static var path: String {
        if let dir = ProcessEnvironment.current["REMUSD_RUN_DIR"], !dir.isEmpty { return dir }
        return getuid() == 0 ? "/run/remusd" : "/tmp/remusd-\(getuid())"
    }

    /// Creates the directory if needed.
    public static func ensure() throws {
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw SystemError(call: "mkdir(\(path))", errno: errno) }
    }

    /// Status socket path for a daemon name.
    public static func socketPath(for name: String) -> String {
        "\(path)/\(name.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." ? $0 : "_" }.reduce(into: "") { $0.append($1) }).sock"
    }

    /// Every status socket present.
    public static func sockets() -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var out: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            if name.hasSuffix(".sock") { out.append("\(path)/\(name)") }
        }
        return out.sorted()
    }
}

/// A Unix socket that answers every connection with a status snapshot (text lines) and closes.
/// Also accepts one-line commands ("stop", "failover", "activate") for the control subcommands.
public final class StatusSocket: @unchecked Sendable {  // fd and path are immutable; handlers are called on its own thread
    private let fd: Int32
    public let path: String
    /// Requests being answered now (guarded by `monitor`), so a daemon can finish its replies before exiting.
    private let monitor = MonitorLock()
    private var serving = 0

    /// - Parameters:
    ///   - snapshot: the status text, called on the socket's thread.
    ///   - command: handles a command line and returns the reply.
    public init(path: String, snapshot: @escaping @Sendable () -> String, command: @escaping @Sendable (String) -> String) throws {
        self.path = path
        try RunDirectory.ensure()
        unlink(path)
        fd = try syscall("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0) }
        let fd = self.fd
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw SystemError(call: "bind(\(path)): path too long", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        try withUnsafePointer(to: &address) { (p) throws in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws in
                try syscall("bind(\(path))") { bind(fd, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        try syscall("listen(\(path))") { listen(fd, 8) }
        let monitor = self.monitor
        startThread(name: "status") { [unowned self] in
            while true {
                let client = Glibc.accept(fd, nil, nil)
                if client < 0 {
                    if errno == EINTR { continue }
                    return
                }
                monitor.withLock { self.serving += 1 }
                defer { monitor.withLock { self.serving -= 1; monitor.broadcast() } }
                var buffer = [UInt8](repeating: 0, count: 256)
                // A status reader sends nothing and half-closes; a control client sends one line.
                var received: [UInt8] = []
                while received.count < 256 {
                    let n = buffer.withUnsafeMutableBytes { read(client, $0.baseAddress, $0.count) }
                    if n <= 0 { break }
                    received += buffer[0..<n]
                    if received.contains(10) { break }
                }
                let line = String(decoding: received, as: UTF8.self).trimmingWhitespace()
                let reply = line.isEmpty ? snapshot() : command(line)
                let out = Array(reply.utf8)
                _ = out.withUnsafeBytes { write(client, $0.baseAddress, $0.count) }
                close(client)
            }
        }
    }

    deinit {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
        unlink(path)
    }

    /// Removes the socket file, after the replies in progress (at most `timeoutMs`) went out.
    public func remove(timeoutMs: UInt64 = 1000) {
        let deadline = SystemClock().monotonicNs() + timeoutMs * 1_000_000
        monitor.withLock {
            while serving > 0 && SystemClock().monotonicNs() < deadline { monitor.wait(untilMonotonic: deadline) }
        }
        unlink(path)
    }

    /// Connects to a status socket, sends `command` (empty for a snapshot) and returns the reply.
    public static func query(_ path: String, command: String = "") throws -> String {
        let fd = try syscall("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0) }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes.prefix(raw.count - 1))
        }
        try withUnsafePointer(to: &address) { (p) throws in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws in
                try syscall("connect(\(path))") { connect(fd, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        let request = Array((command + "\n").utf8)
        if command.isEmpty { Glibc.shutdown(fd, Int32(SHUT_WR)) } else { _ = request.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 { out += buffer[0..<n] } else if n == 0 || errno != EINTR { break }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
