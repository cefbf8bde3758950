import Foundation
import RemusDrill  // freePorts, waitForFile
@testable import RemusRuntime
import RemusTestSupport
import Testing

@Suite("The backup's accept loop", .serialized)
struct AcceptLoopTests {
    @Test("Out of descriptors (prlimit --nofile=64, 80 connections) the backup keeps listening; a real primary is protected afterwards",
          .enabled(if: access("/usr/bin/prlimit", X_OK) == 0, "needs prlimit (util-linux)"))
    func acceptSurvivesDescriptorExhaustion() throws {
        let dir = NSTemporaryDirectory() + "remusd-accept-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freePorts(1)[0]
        let env = ["REMUSD_RUN_DIR": dir]
        let backup = try ChildProcess(
            arguments: ["/usr/bin/prlimit", "--nofile=64:64", remusdBinary, "receive", "--listen", "127.0.0.1:\(port)",
                        "--heartbeat", "50", "--timeout", "300", "--unsafe-no-fence", "--status-socket", dir + "/backup.sock",
                        // Idle connections are held for the whole test (the handshake deadline would
                        // drop them after 3 s and end the burst early).
                        "--tls-handshake-timeout", "120000",
                        // The cap on pending connections (16 by default) would refuse them before
                        // the descriptors run out; this test is about running out.
                        "--max-pending-connections", "200"] + tlsArguments("backup"),
            outputFile: dir + "/backup.log", environment: env)
        defer { backup.signal(SIGKILL); backup.wait() }
        try waitForFile(dir + "/backup.sock", what: "the backup", deadlineMs: 30_000)
        func log() -> String { (try? String(contentsOfFile: dir + "/backup.log", encoding: .utf8)) ?? "" }

        // 80 idle connections: each accepted one holds a descriptor in the backup until we close it.
        var held: [TCPChannel] = []
        for _ in 0..<80 {
            // Short: once the accept queue is full too, further SYNs are dropped.
            if let channel = try? TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 300)) {
                held.append(channel)
            }
        }
        #expect(eventually(deadline: .after(seconds: 10)) { log().contains("EMFILE") }, "the backup never ran out of descriptors:\n\(log())")
        // One warning per burst, not one per retry. On a loaded machine a client may give up on a
        // connect the kernel had already completed; the backup then takes that connection, reads
        // its end, frees the descriptor and rightly reports a recovery before the next burst.
        // So: every warning but the current burst's is followed by its "again" line.
        let snapshot = log()
        let warnings = snapshot.components(separatedBy: "still listening and retrying").count - 1
        let recoveries = snapshot.components(separatedBy: "accepting primaries on 127.0.0.1:\(port) again").count - 1
        #expect(warnings >= 1 && (warnings == recoveries || warnings == recoveries + 1),
                "one warning per burst, not one per retry (\(warnings) warnings, \(recoveries) recoveries):\n\(snapshot)")
        for channel in held { channel.shutdown() }
        held.removeAll()

        let primary = try ChildProcess(
            arguments: [remusdBinary, "protect", "g", "127.0.0.1:\(port)", "--sim-memory", "64", "--interval", "50",
                        "--heartbeat", "50", "--timeout", "300", "--status-socket", dir + "/g.sock"] + tlsArguments("primary"),
            outputFile: dir + "/primary.log", environment: env)
        defer { primary.signal(SIGKILL); primary.wait() }
        let protected = eventually(deadline: .after(seconds: 20), pollEveryMs: 50) {
            (try? StatusSocket.query(dir + "/g.sock", timeoutMs: 2000))?.contains("state: PROTECTED") ?? false
        }
        let primaryLog = (try? String(contentsOfFile: dir + "/primary.log", encoding: .utf8)) ?? ""
        #expect(protected, "primary log:\n\(primaryLog)\nbackup log:\n\(log())")
        let status = (try? StatusSocket.query(dir + "/backup.sock", timeoutMs: 2000)) ?? ""
        #expect(status.contains("accept: ok (recovered"), "\(status)")
        #expect(log().contains("accepting primaries on 127.0.0.1:\(port) again"))
    }
}
