import Glibc
import RemusRuntime

// The drill's small steps: files it waits for or creates, free ports, numbers in its lines.
// Tools, not production code: the daemons never call them.

/// `v` rounded to one decimal, for the drill's lines and table.
func format(_ v: Double) -> String {
    let r = (v * 10).rounded() / 10
    return String(r)
}

/// Polls for `path` to exist until `deadlineMs` passes, or until `process` (the one that makes
/// it) has exited: a daemon that failed at start fails the wait at once, not at its deadline.
package func waitForFile(_ path: String, what: String, deadlineMs: UInt64, madeBy process: ChildProcess? = nil, log: String? = nil) throws {
    let clock = SystemClock()
    let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
    while access(path, F_OK) != 0 {
        if let status = process?.poll() {
            throw ProtocolError("gave up waiting for \(what) (\(path)): the process ended (\(ChildProcess.exitCode(status).map { "exit code \($0)" } ?? "signal \(status & 0x7f)"))" + (log.map { "; see \($0)" } ?? ""))
        }
        if clock.monotonicNs() > deadline { throw ProtocolError("timed out after \(deadlineMs) ms waiting for \(what) (\(path))") }
        pauseBriefly(ms: 2)
    }
}

/// Creates `path` if it does not exist (the drill's local fence: `test -e fenced-<g>`).
func touch(_ path: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT, 0o644)
    guard fd >= 0 else { throw SystemError(call: "open(\(path))", errno: errno) }
    close(fd)
}

/// Removes the drill's work directory and everything in it.
func removeTree(_ path: String) {
    _ = try? runShell("rm -rf '\(path)'", timeoutMs: 60_000)
}

/// Free TCP ports on loopback (bound and released; the drill uses them a moment later).
///
/// They are taken below the kernel's ephemeral range (ip_local_port_range), where no port-0 bind
/// or outgoing connection of this machine can take them between now and their use, and each is
/// claimed for the life of this process (`PortClaims`): another process that picks ports here
/// meanwhile — a drill beside the test suite, tests running in parallel — never gets one of them.
package func freePorts(_ count: Int) throws -> [UInt16] {
    let range = readWholeFile("/proc/sys/net/ipv4/ip_local_port_range")?.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" })
    let ephemeralLow = range.flatMap { $0.first }.flatMap { Int($0) } ?? 32768
    let low = 10_000, high = max(ephemeralLow, low + 2 * count + 100)
    var candidate = low + Int.random(in: 0..<max(high - low - count, 1))
    var ports: [UInt16] = []
    var listeners: [TCPListener] = []
    var attempts = 0
    while ports.count < count {
        attempts += 1
        if attempts > 20 * count + 1000 { throw ProtocolError("no \(count) free ports below \(high) on 127.0.0.1") }
        if candidate >= high { candidate = low }
        if PortClaims.claim(candidate), let l = try? TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: UInt16(candidate))) {
            listeners.append(l)
            ports.append(l.port)
        }
        candidate += 1
    }
    return ports
}

/// Loopback ports this process picked for its daemons, claimed until it ends: an exclusive
/// `flock` on `/tmp/remusd-port-claims/<port>`, held through a descriptor kept open (close-on-exec,
/// so children do not keep it). The kernel lets go of the lock when the process dies, so a claim
/// never outlives its owner and nothing needs cleaning up.
enum PortClaims {
    static let directory = "/tmp/remusd-port-claims"
    private static let lock = MonitorLock()
    nonisolated(unsafe) private static var held: [Int: Int32] = [:]  // guarded by lock

    /// Whether `port` is now this process's (already, or newly); false when another process holds it.
    static func claim(_ port: Int) -> Bool {
        lock.withLock {
            if held[port] != nil { return false }  // handed out before: not twice
            // World-writable and sticky, like /tmp: test processes of other users may claim too.
            if mkdir(directory, 0o1777) == 0 { chmod(directory, 0o1777) }
            let fd = open("\(directory)/\(port)", O_RDWR | O_CREAT | O_CLOEXEC, 0o666)
            // No claims directory (an unwritable /tmp): fall back to the bind check alone.
            guard fd >= 0 else { return true }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
                close(fd)
                return false
            }
            held[port] = fd
            return true
        }
    }
}
