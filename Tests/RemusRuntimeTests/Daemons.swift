import Foundation
import RemusDrill
@testable import RemusRuntime
import RemusTestSupport
import RemusTLS

// What the process tests share: the built binary, a run directory per test, and a backup with a
// primary on loopback whose status sockets and logs the tests read.

/// The built `remusd` next to the test bundle (`swift build --build-tests` builds it).
var remusdBinary: String {
    URL(fileURLWithPath: ProcessEnvironment.executablePath).deletingLastPathComponent().appendingPathComponent("remusd").path
}

/// A fresh run directory for one test.
func freshRunDirectory(_ tag: String) throws -> String {
    let path = NSTemporaryDirectory() + "remusd-\(tag)-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// Runs remusd to completion with `REMUSD_RUN_DIR=runDir`, bounded (a command line that should
/// have been refused may start a daemon instead); returns exit status and stdout + stderr.
func runRemusd(_ arguments: [String], runDir: String, timeoutMs: Int = 20_000) throws -> (Int32, String) {
    let quoted = ([remusdBinary] + arguments).map { "'\($0)'" }.joined(separator: " ")
    return try runTestShell("REMUSD_RUN_DIR='\(runDir)' " + quoted + " 2>&1", timeoutMs: timeoutMs)
}

/// The content of a file, empty when it cannot be read.
func contents(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

/// A `remusd receive` and a `remusd protect g1` of a simulated guest towards it, in one run
/// directory (so `remusd stop g1` finds the primary). Every process is killed by `stop()`.
final class DaemonPair {
    let directory: String
    let port: UInt16
    let backup: ChildProcess
    private(set) var primary: ChildProcess?
    var backupSocket: String { directory + "/backup.sock" }
    var primarySocket: String { directory + "/g1.sock" }
    var backupLog: String { contents(directory + "/backup.log") }
    var primaryLog: String { contents(directory + "/primary.log") }
    var backupStatus: String { (try? StatusSocket.query(backupSocket)) ?? "" }
    var primaryStatus: String { (try? StatusSocket.query(primarySocket)) ?? "" }

    init(backupArguments: [String], tag: String = "pair") throws {
        let directory = try freshRunDirectory(tag)
        let port = try freePorts(1)[0]
        self.directory = directory
        self.port = port
        backup = try ChildProcess(
            arguments: [remusdBinary, "receive", "--listen", "127.0.0.1:\(port)", "--status-socket", directory + "/backup.sock"] + tlsArguments("backup") + backupArguments,
            outputFile: directory + "/backup.log", environment: ["REMUSD_RUN_DIR": directory])
        try waitForFile(directory + "/backup.sock", what: "the backup to listen", deadlineMs: 30_000, madeBy: backup, log: directory + "/backup.log")
    }

    /// Starts the primary towards `backup` (default: this pair's backup); `launcher` goes in front
    /// of the command (e.g. `ip netns exec NAME`).
    func startPrimary(_ arguments: [String], backup target: String? = nil, launcher: [String] = []) throws {
        let command = [remusdBinary, "protect", "g1", target ?? "127.0.0.1:\(port)", "--status-socket", primarySocket] + tlsArguments("primary") + arguments
        let argv = launcher.isEmpty ? command : launcher + command
        primary = try ChildProcess(arguments: argv, outputFile: directory + "/primary.log", environment: ["REMUSD_RUN_DIR": directory])
        try waitForFile(primarySocket, what: "the primary to start", deadlineMs: 30_000, madeBy: primary, log: directory + "/primary.log")
    }

    /// Waits for the primary process to exit; returns whether it did before the deadline.
    func primaryExits(within deadline: Deadline) -> Bool {
        eventually(deadline: deadline) { primary?.poll() != nil }
    }

    func stop() {
        for process in [primary, backup].compactMap({ $0 }) {
            process.signal(SIGCONT)
            process.signal(SIGKILL)
            process.wait()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Certificates the process tests share, made once per test run with the code of `remusd certs`:
/// "primary", "backup" (also valid for 127.0.0.1, the address the tests dial) and "intruder".
let testCertificates: CertificateSet = {
    let set = CertificateSet(directory: NSTemporaryDirectory() + "remusd-test-tls-\(getpid())")
    do {
        try set.make([.init(name: "primary"), .init(name: "backup", alternativeNames: ["127.0.0.1"]), .init(name: "intruder")])
    } catch {
        fatalError("the tests' certificates could not be made: \(error)")
    }
    return set
}()

/// `--tls-cert`, `--tls-key` and `--tls-ca` of `name`'s certificate.
func tlsArguments(_ name: String) -> [String] {
    let f = testCertificates.files(for: name)
    return ["--tls-cert", f.certificate, "--tls-key", f.key, "--tls-ca", f.ca]
}

/// A connection to a backup on loopback as a primary would make it: TCP, then mutual TLS as
/// `identity`.
func connectAsPrimary(port: UInt16, identity: String = "primary") throws -> any ByteChannel {
    let context = try TLSContext(.client, files: testCertificates.files(for: identity))
    let tcp = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
    return try TLSChannel.connect(tcp, context: context, expectedName: "127.0.0.1", deadline: .after(milliseconds: 5000))
}
