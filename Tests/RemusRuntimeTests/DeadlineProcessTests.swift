import Foundation
import RemusCore
import RemusDrill
@testable import RemusRuntime
import RemusTestSupport
import Testing

/// Every wait has a deadline, proven on real processes: a backup host that drops SYNs, and a fence
/// command that never returns.
@Suite("Deadlines on real processes", .serialized)
struct DeadlineProcessTests {
    @Test("A primary pointed at a black-holed backup says it is unreachable within the connect deadline, and answers status and stop meanwhile",
          .enabled(if: BlackHoleNamespace.missing == nil, Comment(rawValue: BlackHoleNamespace.missing ?? "")))
    func blackHoledBackupIsReportedAndTheDaemonStaysResponsive() throws {
        let (made, why) = BlackHoleNamespace.make()
        guard let namespace = made else {
            Issue.record("could not set up the black-holed namespace: \(why)")
            return
        }
        // The pair's own backup is never reached: the primary runs inside the namespace, where
        // the backup's address drops every SYN. Its status socket is a file, reachable from here.
        let pair = try DaemonPair(backupArguments: [], tag: "blackhole")
        defer { pair.stop() }
        try pair.startPrimary(["--sim-memory", "16", "--sim-vcpus", "1", "--connect-timeout", "500"],
                              backup: "127.0.0.1:\(namespace.port)", launcher: ["/usr/sbin/ip", "netns", "exec", namespace.name])
        // The first attempt is given up at its deadline; without one a dropped SYN costs minutes.
        let reported = eventually(deadline: .after(seconds: 5)) { pair.primaryLog.contains("cannot reach the backup") && pair.primaryLog.contains("within 500 ms") }
        #expect(reported, "the unreachable backup was not reported within the connect deadline:\n\(pair.primaryLog)")
        // Meanwhile the daemon answers: status says it runs unprotected, stop ends it.
        let status = pair.primaryStatus
        #expect(status.contains("DEGRADED") || status.contains("CONNECTING"), "\(status)")
        let (code, answer) = try runRemusd(["stop", "g1"], runDir: pair.directory, timeoutMs: 10_000)
        #expect(code == 0, "\(answer)")
        #expect(pair.primaryExits(within: .after(seconds: 5)), "the primary did not stop:\n\(pair.primaryLog)")
    }

    @Test("A fence command that never returns is killed with its process group at --fence-timeout, counted as failed and retried; the guest stays down")
    func hungFenceIsKilledAndRetried() throws {
        // A marker no other test runs, so its processes can be counted.
        let marker = "sleep 61.\(Int.random(in: 100...999))"
        let pair = try DaemonPair(backupArguments: ["--fence", "\(marker) & \(marker); true", "--fence-timeout", "400",
                                                    "--heartbeat", "50", "--timeout", "400"], tag: "fence")
        defer {
            pair.stop()
            _ = try? runTestShell("pkill -f '\(marker)'", timeoutMs: 5_000)
        }
        try pair.startPrimary(["--sim-memory", "16", "--sim-vcpus", "1", "--heartbeat", "50", "--timeout", "400", "--interval", "50"])
        #expect(eventually(deadline: .after(seconds: 30)) { pair.backupStatus.contains("RECEIVING (committed") }, "\(pair.backupStatus)\n\(pair.backupLog)")
        pair.primary?.signal(SIGKILL)
        // Each attempt ends at its deadline: a third attempt means two were killed and retried.
        let retried = eventually(deadline: .after(seconds: 15)) { pair.backupStatus.contains("attempt 3") }
        #expect(retried, "\(pair.backupStatus)\n\(pair.backupLog.suffix(2000))")
        #expect(pair.backupLog.contains("timed out after 400 ms"), "\(pair.backupLog.suffix(2000))")
        #expect(!pair.backupStatus.contains("ACTIV"), "a hung fence counted as fenced:\n\(pair.backupStatus)")
        // Killed with their group: only the running attempt's two sleeps may be alive, never the
        // earlier attempts' (the shell's background child included).
        let (_, count) = try runTestShell("pgrep -fc '^\(marker)$' || true", timeoutMs: 5_000)
        #expect((Int(count.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 99) <= 2, "fence processes left behind: \(count)")
    }
}
