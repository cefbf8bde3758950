import Foundation
import RemusCore
import RemusDrill  // freePorts, waitForFile
@testable import RemusRuntime
import Testing
import RemusTestSupport

/// A receive/protect pair on loopback, each a real remusd process.
private struct Pair {
    let directory: String
    let backup: ChildProcess
    let primary: ChildProcess

    static func start(backupArguments: [String] = ["--unsafe-no-fence"], primaryArguments: [String]) throws -> Pair {
        let dir = NSTemporaryDirectory() + "remusd-pair-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let port = try freePorts(1)[0]
        let env = ["REMUSD_RUN_DIR": dir]
        let backup = try ChildProcess(
            arguments: [remusdBinary, "receive", "--listen", "127.0.0.1:\(port)", "--heartbeat", "50", "--timeout", "300",
                        "--status-socket", dir + "/backup.sock"] + tlsArguments("backup") + backupArguments,
            outputFile: dir + "/backup.log", environment: env)
        try waitForFile(dir + "/backup.sock", what: "the backup", deadlineMs: 30_000)
        let primary = try ChildProcess(
            arguments: [remusdBinary, "protect", "g", "127.0.0.1:\(port)", "--sim-memory", "128", "--interval", "50",
                        "--heartbeat", "50", "--timeout", "300", "--status-socket", dir + "/g.sock"] + tlsArguments("primary") + primaryArguments,
            outputFile: dir + "/primary.log", environment: env)
        return Pair(directory: dir, backup: backup, primary: primary)
    }

    func log(_ name: String) -> String { (try? String(contentsOfFile: directory + "/\(name).log", encoding: .utf8)) ?? "" }
    func status(_ name: String) -> String { (try? StatusSocket.query(directory + "/\(name).sock")) ?? "" }


    func stop() {
        for p in [primary, backup] { p.signal(SIGKILL); p.wait() }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

@Suite("Bad days, with real processes", .serialized)
struct BadDaysTests {
    @Test func drillSurvivesEveryFaultInTurn() throws {
        let (status, output) = try runTestShell("'\(remusdBinary)' drill --failovers 5 --seed 21 --quiet --sim-memory 128 --fault crash switchover silence backup-kill overload 2>&1")
        #expect(status == 0, "\(output)")
        #expect(output.contains("drill: 5 passed, 0 failed"))
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd"),
                   "needs etcd for the witness: apt-get install etcd-server, or run scripts/test.sh (it installs it)"))
    func partitionWithAWitnessLeavesExactlyOneRunningCopy() throws {
        // Each partition round cuts the primary off from its backup and from etcd; the drill checks
        // the primary self-fenced before the backup activated, then verifies the takeover as usual.
        let (status, output) = try runTestShell("'\(remusdBinary)' drill --failovers 4 --seed 33 --quiet --sim-memory 128 --fault partition crash 2>&1")
        #expect(status == 0, "\(output)")
        #expect(output.contains("drill: 4 passed, 0 failed"))
        #expect(output.components(separatedBy: "primary self-fenced").count - 1 == 2, "\(output)")
    }

    @Test func stopEndsProtectionAndTheBackupNeverActivates() throws {
        let pair = try Pair.start(primaryArguments: [])
        defer { pair.stop() }
        #expect(eventually(deadline: .after(seconds: 20)) { pair.status("g").contains("state: PROTECTED") })
        let (rc, reply) = try runTestShell("REMUSD_RUN_DIR='\(pair.directory)' '\(remusdBinary)' stop g 2>&1")
        #expect(rc == 0 && reply.contains("the backup discards its image"), "\(reply)")
        #expect(eventually(deadline: .after(seconds: 10)) { pair.log("backup").contains("will not be activated") })
        // Long past the timeout, with --unsafe-no-fence, it still has not activated.
        pauseBriefly(ms: 600)
        #expect(!pair.log("backup").contains("ACTIVATED"))
        #expect(pair.status("backup").contains("STOPPED"))
    }

    @Test func abortPolicyStopsProtectingAndKeepsTheGuestRunning() throws {
        let pair = try Pair.start(primaryArguments: ["--sim-dirty-rate", "0", "--max-pause", "1", "--on-overload", "abort"])
        defer { pair.stop() }
        #expect(eventually(deadline: .after(seconds: 20)) { pair.log("primary").contains("protection ABORTED") }, "\(pair.log("primary"))")
        #expect(eventually(deadline: .after(seconds: 10)) { pair.log("backup").contains("will not be activated") })
        #expect(pair.primary.poll() == nil, "the primary daemon and its guest keep running")
        #expect(pair.status("g").contains("STOPPED"))
    }

    @Test func degradePolicyLengthensEpochsInsteadOfSlowingTheGuest() throws {
        let pair = try Pair.start(primaryArguments: ["--sim-dirty-rate", "0", "--max-pause", "1", "--on-overload", "degrade"])
        defer { pair.stop() }
        #expect(eventually(deadline: .after(seconds: 20)) { pair.log("primary").contains("epochs lengthened") }, "\(pair.log("primary"))")
        #expect(!pair.status("g").contains("guest speed"), "degrade never throttles the guest")
        #expect(pair.status("g").contains("state: PROTECTED"))
    }

    @Test func withoutAFenceTheBackupWaitsForTheOperator() throws {
        let pair = try Pair.start(backupArguments: [], primaryArguments: [])
        defer { pair.stop() }
        // A checkpoint committed on the backup, not merely taken on the primary: a primary lost
        // before that leaves nothing to activate (found under load: the kill came first).
        try #require(eventually(deadline: .after(seconds: 20)) { pair.status("backup").contains("RECEIVING (committed") },
                     "\(pair.status("backup"))\n\(pair.log("backup"))")
        pair.primary.signal(SIGKILL)
        pair.primary.wait()
        #expect(eventually(deadline: .after(seconds: 10)) { pair.status("backup").contains("waiting for 'remusd failover --activate'") },
                "\(pair.status("backup"))\n\(pair.log("backup"))")
        #expect(!pair.log("backup").contains("ACTIVATED"))
        let (rc, reply) = try runTestShell("REMUSD_RUN_DIR='\(pair.directory)' '\(remusdBinary)' failover --activate --socket '\(pair.directory)/backup.sock' 2>&1")
        #expect(rc == 0, "\(reply)")
        #expect(eventually(deadline: .after(seconds: 10)) { pair.log("backup").contains("ACTIVATED") })
    }
}
