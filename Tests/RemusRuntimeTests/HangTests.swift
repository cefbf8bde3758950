import Foundation
import RemusCore
import RemusDrill
@testable import RemusRuntime
import RemusTestSupport
import Testing

// Short enough to keep the test quick, long enough that a loaded machine (TLS handshakes and
// daemons competing for two cores) does not make a healthy pair look silent: at 400 ms the
// backup once counted the live primary as lost before the stop was even sent.
private let heartbeatMs: UInt64 = 100
private let timeoutMs: UInt64 = 1500

@Suite("Processes that must not hang", .serialized)
struct HangTests {
    /// `remusd stop` against a frozen backup: the backup gets one timeout to close its side, then
    /// the primary closes its own and exits. When the backup thaws it must read the STREAM_END
    /// queued in its socket, not count its own stall as the primary's silence and take over.
    @Test func stopAgainstAFrozenBackupEndsAndTheThawedBackupDoesNotTakeOver() throws {
        let timing = ["--heartbeat", "\(heartbeatMs)", "--timeout", "\(timeoutMs)"]
        // --unsafe-no-fence: a backup that wrongly counts the primary as lost goes ACTIVE at once,
        // which makes the mistake visible.
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence"] + timing, tag: "hang")
        defer { pair.stop() }
        try pair.startPrimary(["--sim-memory", "64", "--sim-vcpus", "1"] + timing)
        try #require(eventually(deadline: .after(seconds: 30)) { pair.primaryStatus.contains("PROTECTED") },
                     "the primary never got protected:\n\(pair.primaryStatus)\n\(pair.primaryLog)")
        // At least one committed checkpoint, so a wrong takeover would have something to activate.
        try #require(eventually(deadline: .after(seconds: 10)) { pair.backupStatus.contains("RECEIVING (committed") },
                     "the backup committed nothing:\n\(pair.backupStatus)")

        pair.backup.signal(SIGSTOP)
        let (status, answer) = try runRemusd(["stop", "g1"], runDir: pair.directory)
        #expect(status == 0, "\(answer)")
        // One timeout for the backup to close its side, plus a generous margin for a loaded machine.
        let exited = pair.primaryExits(within: .after(milliseconds: Int(timeoutMs) + 5_000))
        #expect(exited, "the primary stayed in STOPPING against a frozen backup:\n\(pair.primaryLog)")

        // Frozen for well over its own timeout: the thawed backup's first tick is long overdue.
        pauseBriefly(ms: 2 * timeoutMs)
        pair.backup.signal(SIGCONT)
        var after = ""
        _ = eventually(deadline: .after(seconds: 5)) {
            after = pair.backupStatus
            return after.contains("STOPPED") || after.contains("ACTIV")
        }
        #expect(!after.contains("ACTIV"), "the backup took over after a planned stop:\n\(after)\n\(pair.backupLog)")
        #expect(after.contains("STOPPED"), "the backup did not see the planned stop:\n\(after)\n\(pair.backupLog)")
        #expect(pair.backupLog.contains("the primary stopped protection"), "\(pair.backupLog)")
    }
}
