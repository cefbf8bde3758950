import Glibc

/// A child process started with posix_spawn in a process group of its own, with an empty
/// signal mask and default signal dispositions: it does not inherit the daemon's blocked
/// SIGINT/SIGTERM or ignored SIGPIPE, and its whole group can be signalled at once.
public final class ChildProcess: @unchecked Sendable {  // pid is immutable; reaping is guarded by `monitor`
    public let pid: pid_t
    private let monitor = MonitorLock()
    private var status: Int32?
    /// The read end of the child's combined standard output and error (`captureOutput`).
    private var output: OwnedDescriptor?

    /// Signals reset to their default disposition in the child.
    static let defaultedSignals: [Int32] = [SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD, SIGALRM, SIGUSR1, SIGUSR2]

    /// Starts `arguments[0]` (a path) with the rest as arguments; standard output and error go to
    /// `outputFile` when given (appended), into a pipe read by `run` with `captureOutput`, else
    /// they are inherited. Standard input is /dev/null.
    public init(arguments: [String], outputFile: String? = nil, environment: [String: String] = [:], captureOutput: Bool = false) throws(SystemError) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var pipeEnds: [Int32] = [-1, -1]
        if captureOutput {
            try syscall("pipe") { pipe(&pipeEnds) }
            // Not inherited by children spawned meanwhile from other threads (the child's copy is dup2'd).
            for end in pipeEnds { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
            posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 1)
            posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 2)
        } else if let outputFile {
            posix_spawn_file_actions_addopen(&actions, 1, outputFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)
        var defaulted = sigset_t()
        sigemptyset(&defaulted)
        for signal in Self.defaultedSignals { sigaddset(&defaulted, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaulted)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))

        var env = ProcessEnvironment.current
        for (k, v) in environment { env[k] = v }
        let envStrings = env.map { "\($0.key)=\($0.value)" }
        var pid = pid_t()
        let rc = withCStrings(arguments) { argv in
            withCStrings(envStrings) { envp in posix_spawn(&pid, arguments[0], &actions, &attributes, argv, envp) }
        }
        if captureOutput { close(pipeEnds[1]) }
        guard rc == 0 else {
            if captureOutput { close(pipeEnds[0]) }
            throw SystemError(call: "posix_spawn(\(arguments[0]))", errno: rc)
        }
        self.pid = pid
        if captureOutput { output = OwnedDescriptor(adopting: pipeEnds[0]) }
    }

    /// Sends a signal to the child.
    public func signal(_ sig: Int32) { kill(pid, sig) }

    /// Sends a signal to the child's whole process group (it and whatever it started).
    public func signalGroup(_ sig: Int32) { kill(-pid, sig) }

    /// Whether any process of the child's group is still alive (reaped or not).
    public var groupExists: Bool { kill(-pid, 0) == 0 || errno == EPERM }

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

    /// Waits for the exit until `deadline`; nil if the child still runs then. Checks every few
    /// milliseconds (there is no descriptor to poll for a child without pidfd).
    public func wait(until deadline: Deadline) -> Int32? {
        var pause: UInt64 = 1_000_000
        while true {
            if let status = poll() { return status }
            let left = deadline.remainingNs
            if left == 0 { return nil }
            sleepNanoseconds(min(pause, left))
            pause = min(pause * 2, 20_000_000)
        }
    }

    /// Reads the captured output until the child exits and its group closed the pipe, or until
    /// the deadline. At most `outputLimit` bytes are kept; the rest is read and dropped, so a
    /// chatty child never blocks on a full pipe. On timeout the whole process group gets
    /// SIGTERM, then SIGKILL after `grace`, and the outcome says so.
    public func run(timeout: Deadline, outputLimit: Int = 64 << 10, grace: UInt64 = 500_000_000) -> ChildOutcome {
        var kept: [UInt8] = []
        var dropped = 0
        if let fd = output?.raw {
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            var chunk = [UInt8](repeating: 0, count: 4096)
            /// Reads what is there now; true at end of input.
            func drain() -> Bool {
                while true {
                    let result = try? syscallOrWouldBlock("read(child output)") {
                        chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    }
                    guard case .done(let n)? = result else { return false }
                    if n == 0 { return true }
                    let keep = min(n, max(outputLimit - kept.count, 0))
                    kept += chunk[0..<keep]
                    dropped += n - keep
                }
            }
            while true {
                // Slices of 20 ms, so a child that exited while a background grandchild keeps the
                // pipe open does not hold us until the deadline.
                let slice = Deadline(afterNanoseconds: min(timeout.remainingNs, 20_000_000))
                guard (try? waitReady(fd, events: Int16(POLLIN), until: slice, call: "read(child output)")) != nil else { break }
                if drain() || timeout.hasPassed { break }
                if poll() != nil {
                    _ = drain()  // what it wrote just before it exited
                    break
                }
            }
        }
        if let status = wait(until: timeout) {
            return ChildOutcome(status: status, output: kept, droppedBytes: dropped, timedOutAfterMs: nil)
        }
        signalGroup(SIGTERM)
        let status = wait(until: Deadline(afterNanoseconds: grace)) ?? {
            signalGroup(SIGKILL)
            return wait()
        }()
        // Whatever of the group outlived its leader goes too.
        signalGroup(SIGKILL)
        return ChildOutcome(status: status, output: kept, droppedBytes: dropped, timedOutAfterMs: timeout.budgetMs)
    }

    /// Exit code if it exited normally.
    public static func exitCode(_ status: Int32) -> Int32? { (status & 0x7f) == 0 ? (status >> 8) & 0xff : nil }
    /// Signal number if a signal ended it.
    public static func terminatingSignal(_ status: Int32) -> Int32? {
        let sig = status & 0x7f
        return sig != 0 && sig != 0x7f ? sig : nil
    }
}

/// How a child run with a deadline ended.
public struct ChildOutcome: Sendable {
    /// The raw wait status.
    public var status: Int32
    /// The first bytes of its combined output (up to the limit).
    public var output: [UInt8]
    /// Bytes of output past the limit, read and dropped.
    public var droppedBytes: Int
    /// Set when the deadline passed and the group was killed: the budget in milliseconds.
    public var timedOutAfterMs: UInt64?

    /// The exit code, or 128 + signal for a child a signal ended.
    public var exitCode: Int32 {
        ChildProcess.exitCode(status) ?? (128 + (ChildProcess.terminatingSignal(status) ?? 0))
    }

    /// True only for a child that exited 0 by itself in time.
    public var succeeded: Bool { timedOutAfterMs == nil && ChildProcess.exitCode(status) == 0 }

    /// The output as text, with a note when some was dropped.
    public var text: String {
        String(decoding: output, as: UTF8.self) + (droppedBytes > 0 ? "… (\(droppedBytes) more bytes dropped)" : "")
    }

    /// E.g. "exited 0", "exited 3", "killed by signal 9", "timed out after 5000 ms (process group killed)".
    public var summary: String {
        if let ms = timedOutAfterMs { return "timed out after \(ms) ms (process group killed)" }
        if let code = ChildProcess.exitCode(status) { return "exited \(code)" }
        return "killed by signal \(ChildProcess.terminatingSignal(status) ?? 0)"
    }
}

/// Runs `/bin/sh -c command` in its own process group with a deadline, capturing the first
/// `outputLimit` bytes of its combined output.
public func runShell(_ command: String, timeoutMs: Int, outputLimit: Int = 64 << 10) throws(SystemError) -> ChildOutcome {
    let deadline = Deadline.after(milliseconds: timeoutMs)
    let child = try ChildProcess(arguments: ["/bin/sh", "-c", command], captureOutput: true)
    return child.run(timeout: deadline, outputLimit: outputLimit)
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
