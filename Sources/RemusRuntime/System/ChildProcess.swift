import Glibc

/// A child process started with posix_spawn.
public final class ChildProcess: @unchecked Sendable {  // pid is immutable; reaping is guarded by `monitor`
    public let pid: pid_t
    private let monitor = MonitorLock()
    private var status: Int32?

    /// Starts `arguments[0]` (a path) with the rest as arguments; standard output and error go to
    /// `outputFile` when given (appended), else they are inherited.
    public init(arguments: [String], outputFile: String? = nil, environment: [String: String] = [:]) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let outputFile {
            posix_spawn_file_actions_addopen(&actions, 1, outputFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        var env = ProcessEnvironment.current
        for (k, v) in environment { env[k] = v }
        let envStrings = env.map { "\($0.key)=\($0.value)" }
        var pid = pid_t()
        let rc = withCStrings(arguments) { argv in
            withCStrings(envStrings) { envp in posix_spawn(&pid, arguments[0], &actions, nil, argv, envp) }
        }
        guard rc == 0 else { throw SystemError(call: "posix_spawn(\(arguments[0]))", errno: rc) }
        self.pid = pid
    }

    /// Sends a signal.
    public func signal(_ sig: Int32) { kill(pid, sig) }

    /// Waits for the exit and returns the raw wait status.
    @discardableResult
    public func wait() -> Int32 {
        monitor.withLock {
            if let status { return status }
            var s: Int32 = 0
            while waitpid(pid, &s, 0) == -1 && errno == EINTR {}
            status = s
            return s
        }
    }

    /// The wait status if the child has exited, without blocking.
    public func poll() -> Int32? {
        monitor.withLock {
            if let status { return status }
            var s: Int32 = 0
            if waitpid(pid, &s, WNOHANG) == pid {
                status = s
                return s
            }
            return nil
        }
    }

    /// Exit code if it exited normally.
    public static func exitCode(_ status: Int32) -> Int32? { (status & 0x7f) == 0 ? (status >> 8) & 0xff : nil }
    /// Signal number if a signal ended it.
    public static func terminatingSignal(_ status: Int32) -> Int32? {
        let sig = status & 0x7f
        return sig != 0 && sig != 0x7f ? sig : nil
    }
}

/// Runs `/bin/sh -c command`, capturing combined output (first 64 KiB). Returns exit code (or
/// 128 + signal) and the output.
public func runShell(_ command: String) throws -> (status: Int32, output: String) {
    var fds: [Int32] = [0, 0]
    try syscall("pipe") { pipe(&fds) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
    posix_spawn_file_actions_addclose(&actions, fds[0])
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    var pid = pid_t()
    let args = ["/bin/sh", "-c", command]
    let envStrings = ProcessEnvironment.current.map { "\($0.key)=\($0.value)" }
    let rc = withCStrings(args) { argv in withCStrings(envStrings) { envp in posix_spawn(&pid, "/bin/sh", &actions, nil, argv, envp) } }
    close(fds[1])
    guard rc == 0 else {
        close(fds[0])
        throw SystemError(call: "posix_spawn(/bin/sh -c \(command))", errno: rc)
    }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
        if n > 0 {
            if output.count < 65536 { output += chunk[0..<n] }
        } else if n == 0 || errno != EINTR {
            break
        }
    }
    close(fds[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
    let code = ChildProcess.exitCode(status) ?? (128 + (ChildProcess.terminatingSignal(status) ?? 0))
    return (code, String(decoding: output, as: UTF8.self))
}

/// This process's environment.
public enum ProcessEnvironment {
    public static var current: [String: String] {
        var out: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { out[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return out
    }

    /// The running executable's path.
    public static var executablePath: String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    }
}

private func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
