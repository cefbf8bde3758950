import Foundation
import RemusDrill
@testable import RemusRuntime
import RemusTestSupport
import Synchronization
import Testing

/// A fresh directory of ours (0700), removed by `cleanup`.
private func scratchDirectory() throws -> String {
    var template = Array("/tmp/remusd-ctl-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw SystemError.last("mkdtemp") }
    return String(cString: made)
}

private func cleanup(_ dir: String) { try? FileManager.default.removeItem(atPath: dir) }

private func mode(_ path: String) throws -> UInt32 { try FileOwnership.of(path).permissions }

@Suite("The control socket", .serialized)
struct ControlSocketTests {
    @Test("Under umask 000 a daemon makes its run directory 0700 and its socket 0600")
    func socketModeIgnoresUmask() throws {
        let parent = try scratchDirectory()
        defer { cleanup(parent) }
        let run = parent + "/run", port = try freePorts(1)[0]
        let socket = run + "/receive-\(port).sock"
        // The umask is the daemon's own, set by its shell: the test process's umask is shared with
        // every test running alongside (a umask 000 there once made their directories 0777).
        let daemon = try ChildProcess(
            arguments: ["/bin/sh", "-c", "umask 000; exec \"$0\" \"$@\"", remusdBinary, "receive", "--listen", "127.0.0.1:\(port)", "--insecure-plaintext"],
            outputFile: parent + "/daemon.log", environment: ["REMUSD_RUN_DIR": run])
        defer { daemon.signal(SIGKILL); daemon.wait() }
        try waitForFile(socket, what: "the daemon's socket", deadlineMs: 30_000, madeBy: daemon, log: parent + "/daemon.log")
        #expect(try mode(run) == 0o700)
        #expect(try mode(socket) == 0o600)
        #expect(try StatusSocket.query(socket).contains("state: LISTENING"))
    }

    @Test("A run directory we create is 0700; one others may write is refused")
    func runDirectoryIsPrivate() throws {
        let parent = try scratchDirectory()
        defer { cleanup(parent) }
        try RunDirectory.ensure(parent + "/run")
        #expect(try mode(parent + "/run") == 0o700)
        try RunDirectory.ensure(parent + "/run")  // ours and private: accepted again

        chmod(parent + "/run", 0o777)
        let error = #expect(throws: ControlSocketError.self) { try RunDirectory.ensure(parent + "/run") }
        #expect(error?.description.contains("group or others may write it") == true, "\(String(describing: error))")
        #expect(error?.description.contains("chmod 700") == true)
    }

    @Test("Whoever sees the socket file can connect at once: it appears listening, and nothing else is left beside it")
    func theFileAppearsOnlyWhenListening() throws {
        let dir = try scratchDirectory()
        defer { cleanup(dir) }
        let path = dir + "/race.sock"
        // A watcher connects the moment the file appears, as the tests and operators' scripts do.
        // Before the fix the file appeared at bind and the connect could meet ECONNREFUSED.
        for round in 0..<200 {
            let refused = Mutex<String?>(nil)
            let watcher = try JoinableThread(name: "watcher") {
                let deadline = Deadline.after(seconds: 10)
                while access(path, F_OK) != 0 && !deadline.hasPassed {}
                do { _ = try UnixConnection.connect(path: path, deadline: deadline) } catch { refused.withLock { $0 = "\(error)" } }
            }
            let listener = try UnixListener(path: path, mode: 0o600)
            watcher.join()
            #expect(refused.withLock { $0 } == nil, "round \(round): \(refused.withLock { $0 } ?? "")")
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["race.sock"])
            listener.shutdown()
            unlink(path)
        }
    }

    @Test("A run directory another user owns is refused with what to do",
          .enabled(if: getuid() == 0, "needs root to chown a directory to another user"))
    func foreignRunDirectoryIsRefused() throws {
        let parent = try scratchDirectory()
        defer { cleanup(parent) }
        mkdir(parent + "/run", 0o700)
        chown(parent + "/run", 65534, 65534)
        let error = #expect(throws: ControlSocketError.self) { try RunDirectory.ensure(parent + "/run") }
        #expect(error?.description.contains("belongs to uid 65534, not to this user") == true, "\(String(describing: error))")
        #expect(error?.description.contains("no daemon was started") == true)
    }

    @Test("Clients refuse a socket that belongs to neither root nor us",
          .enabled(if: getuid() == 0, "needs root to chown a socket to another user"))
    func clientRefusesForeignSocket() throws {
        let dir = try scratchDirectory()
        defer { cleanup(dir) }
        let called = Counter()
        let socket = try StatusSocket(path: dir + "/f.sock", snapshot: { called.bump(); return "fake status\n" }, command: { _ in "" })
        defer { socket.remove() }
        chown(dir + "/f.sock", 65534, 65534)
        let error = #expect(throws: ControlSocketError.self) { try StatusSocket.query(dir + "/f.sock") }
        #expect(error?.description.contains("belongs to uid 65534, neither root nor you") == true, "\(String(describing: error))")
        #expect(called.value == 0, "the client must not even connect")
    }

    @Test("The server refuses a peer whose uid is neither root nor ours (SO_PEERCRED)",
          .enabled(if: getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0, "needs root and setpriv to connect as uid 65534"))
    func serverRefusesForeignPeer() throws {
        // A socket left open to everybody (a wrong mode from elsewhere): only the peer check stands.
        let dir = try scratchDirectory()
        defer { cleanup(dir) }
        chmod(dir, 0o755)
        let commands = Counter()
        let socket = try StatusSocket(path: dir + "/p.sock", snapshot: { "secret status\n" }, command: { _ in commands.bump(); return "stopped\n" })
        defer { socket.remove() }
        chmod(dir + "/p.sock", 0o666)
        let (_, output) = try runTestShell(
            "setpriv --reuid=65534 --regid=65534 --clear-groups '\(remusdBinary)' status --socket '\(dir)/p.sock' 2>&1", timeoutMs: 20_000)
        #expect(output.contains("refused: uid 65534 may not use this daemon's control socket"), "\(output)")
        #expect(!output.contains("secret status"))
        #expect(commands.value == 0)
    }

    @Test("An idle client (connects, never sends) does not hold up the next one")
    func idleClientDoesNotBlockOthers() throws {
        let dir = try scratchDirectory()
        defer { cleanup(dir) }
        let socket = try StatusSocket(path: dir + "/i.sock", snapshot: { "state: fine\n" }, command: { _ in "" })
        defer { socket.remove() }
        let idle = try UnixConnection.connect(path: dir + "/i.sock", deadline: .after(milliseconds: 1000))
        let start = monotonicNanoseconds()
        let reply = try StatusSocket.query(dir + "/i.sock", timeoutMs: 2000)
        let elapsedMs = (monotonicNanoseconds() - start) / 1_000_000
        #expect(reply == "state: fine\n")
        #expect(elapsedMs < 1000, "waited \(elapsedMs) ms behind an idle client (its read deadline is \(StatusSocket.readDeadlineMs) ms)")
        // The idle one is dropped at its read deadline, with nothing sent to it.
        let leftover = try idle.readAll(limit: 100, until: .after(milliseconds: StatusSocket.readDeadlineMs + 2000))
        #expect(leftover.isEmpty)
    }
}

private final class Counter: @unchecked Sendable {  // guarded by lock
    private let lock = MonitorLock()
    private var count = 0
    func bump() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}
