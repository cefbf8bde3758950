import Foundation
import Testing

/// `remusd` does not link the Xen libraries (CXen opens them when the Xen backend is first used),
/// so a host without Xen runs the simulated guest with the same binary. Proven by running the
/// binary in a private mount namespace where every Xen library is an empty file.
@Suite("remusd without the Xen libraries")
struct WithoutXenTests {
    static let unshare = "/usr/bin/unshare"
    static var available: Bool { getuid() == 0 && FileManager.default.isExecutableFile(atPath: unshare) }

    /// The built `remusd` next to the test bundle.
    static var remusd: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("remusd").path
    }

    /// Runs `script` under `unshare -m` after bind-mounting /dev/null over every libxen* in the
    /// library directories, so a dlopen of any of them fails as on a host without Xen. The
    /// child is killed if it runs past `seconds`.
    static func runWithXenHidden(_ script: String, seconds: Double) throws -> (status: Int32, output: String) {
        let hide = """
            set -e
            n=0
            for f in /lib/x86_64-linux-gnu/libxen* /usr/lib/x86_64-linux-gnu/libxen*; do
              [ -e "$f" ] || continue
              mount --bind /dev/null "$f"; n=$((n+1))
            done
            echo "hidden: $n"
            set +e
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: unshare)
        process.arguments = ["-m", "--propagation", "private", "sh", "-c", hide + "\n" + script]
        let log = NSTemporaryDirectory() + "remusd-noxen-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        FileManager.default.createFile(atPath: log, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: log) }
        let file = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = file
        process.standardError = file
        try process.run()
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        try file.close()
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return (process.terminationStatus, output)
    }

    @Test("the simulated drill runs with every Xen library hidden",
          .enabled(if: available, "needs root and unshare(1) for a private mount namespace"))
    func drillRunsWithoutXen() throws {
        let (status, output) = try Self.runWithXenHidden(
            """
            "\(Self.remusd)" drill --failovers 2 --sim-memory 64 --quiet; echo "drill exit: $?"
            """, seconds: 120)
        #expect(status == 0, "\(output)")
        // The libraries really were hidden: with none present the check would prove nothing.
        let hidden = output.split(separator: "\n").first { $0.hasPrefix("hidden: ") }.flatMap { Int($0.dropFirst(8)) } ?? 0
        #expect(hidden > 0, "no Xen library was found to hide: \(output)")
        #expect(output.contains("drill exit: 0"), "\(output)")
        #expect(output.contains("2 passed, 0 failed"), "\(output)")
    }

    @Test("asking for the Xen backend without Xen says what is missing and changes nothing",
          .enabled(if: available, "needs root and unshare(1) for a private mount namespace"))
    func xenBackendRefusedWithoutXen() throws {
        let (_, output) = try Self.runWithXenHidden(
            """
            "\(Self.remusd)" protect g1 127.0.0.1:1 --insecure-plaintext --backend xen; echo "protect exit: $?"
            """, seconds: 30)
        #expect(output.contains("protect exit: ") && !output.contains("protect exit: 0"), "\(output)")
        #expect(output.contains("Nothing was changed"), "\(output)")
    }
}
