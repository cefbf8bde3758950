import Foundation
import RemusCore
import RemusDrill
@testable import RemusRuntime
import RemusTestSupport
import Testing

/// The built `remusd` next to the test bundle.
private var remusdPath: String {
    URL(fileURLWithPath: ProcessEnvironment.executablePath).deletingLastPathComponent().appendingPathComponent("remusd").path
}

private let heartbeatMs: UInt64 = 50
private let timeoutMs: UInt64 = 400

/// A primary and a backup on loopback sharing one run directory, so `remusd stop` finds the primary.
private struct Pair {
    let directory: String
    let backup: ChildProcess
    let primary: ChildProcess
    var backupSocket: String { directory + "/backup.sock" }
    var primarySocket: String { directory + "/g1.sock" }
    var backupLog: String { (try? String(contentsOfFile: directory + "/backup.log", encoding: .utf8)) ?? "" }
    var primaryLog: String { (try? String(contentsOfFile: directory + "/primary.log", encoding: .utf8)) ?? "" }

    static func start() throws -> Pair {
        let dir = NSTemporaryDirectory() + "remusd-hang-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let port = try freePorts(1)[0]
        let timing = ["--heartbeat", "\(heartbeatMs)", "--timeout", "\(timeoutMs)"]
        // --unsafe-no-fence: a backup that wrongly counts the primary as lost goes ACTIVE at once,
        // which makes the mistake visible.
        let backup = try ChildProcess(
            arguments: [remusdPath, "receive", "--listen", "127.0.0.1:\(port)", "--unsafe-no-fence",
                        "--status-socket", dir + "/backup.sock"] + timing,
            outputFile: dir + "/backup.log", environment: ["REMUSD_RUN_DIR": dir])
        try waitForFile(dir + "/backup.sock", what: "the backup to listen", deadlineMs: 10_000)
        let primary = try ChildProcess(
            arguments: [remusdPath, "protect", "g1", "127.0.0.1:\(port)", "--sim-memory", "64", "--sim-vcpus", "1"] + timing,
            outputFile: dir + "/primary.log", environment: ["REMUSD_RUN_DIR": dir])
        return Pair(directory: dir, backup: backup, primary: primary)
    }

    /// Polls a status socket until its text satisfies `condition` or the deadline passes; returns the last text.
    func poll(_ socket: String, deadlineMs: UInt64, until condition: (String) -> Bool) -> String {
        let clock = SystemClock()
        let deadline = clock.monotonicNs() + deadlineMs * 1_000_000
        var text = ""
        while clock.monotonicNs() < deadline {
            text = (try? StatusSocket.query(socket)) ?? ""
            if condition(text) { return text }
            pauseBriefly(ms: 20)
        }
        return text
    }

    /// Waits for the primary process to exit; returns whether it did within the deadline.
    func primaryExits(withinMs ms: UInt64) -> Bool {
        let clock = SystemClock()
        let deadline = clock.monotonicNs() + ms * 1_000_000
        while clock.monotonicNs() < deadline {
            if primary.poll() != nil { return true }
            pauseBriefly(ms: 10)
        }
        return primary.poll() != nil
    }

    func cleanUp() {
        backup.signal(SIGCONT)
        for process in [primary, backup] {
            process.signal(SIGKILL)
            process.wait()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

@Suite("Processes that must not hang", .serialized)
struct HangTests {
    /// `remusd stop` against a frozen backup: the backup gets one timeout to close its side, then
    /// the primary closes its own and exits. When the backup thaws it must read the STREAM_END
    /// queued in its socket, not count its own stall as the primary's silence and take over.
    @Test func stopAgainstAFrozenBackupEndsAndTheThawedBackupDoesNotTakeOver() throws {
        let pair = try Pair.start()
        defer { pair.cleanUp() }
        let protecting = pair.poll(pair.primarySocket, deadlineMs: 30_000) { $0.contains("PROTECTED") }
        try #require(protecting.contains("PROTECTED"), "the primary never got protected:\n\(protecting)\n\(pair.primaryLog)")
        // At least one committed checkpoint, so a wrong takeover would have something to activate.
        let receiving = pair.poll(pair.backupSocket, deadlineMs: 10_000) { $0.contains("RECEIVING (committed") }
        try #require(receiving.contains("RECEIVING (committed"), "the backup committed nothing:\n\(receiving)")

        pair.backup.signal(SIGSTOP)
        let (status, answer) = try runTestShell("REMUSD_RUN_DIR='\(pair.directory)' '\(remusdPath)' stop g1 2>&1")
        #expect(status == 0, "\(answer)")
        // One timeout for the backup to close its side, plus a generous margin for a loaded machine.
        let exited = pair.primaryExits(withinMs: timeoutMs + 5_000)
        #expect(exited, "the primary stayed in STOPPING against a frozen backup:\n\(pair.primaryLog)")

        // Frozen for well over its own timeout: the thawed backup's first tick is long overdue.
        pauseBriefly(ms: 2 * timeoutMs)
        pair.backup.signal(SIGCONT)
        let after = pair.poll(pair.backupSocket, deadlineMs: 5_000) { $0.contains("STOPPED") || $0.contains("ACTIV") }
        #expect(!after.contains("ACTIV"), "the backup took over after a planned stop:\n\(after)\n\(pair.backupLog)")
        #expect(after.contains("STOPPED"), "the backup did not see the planned stop:\n\(after)\n\(pair.backupLog)")
        #expect(pair.backupLog.contains("the primary stopped protection"), "\(pair.backupLog)")
    }
}
