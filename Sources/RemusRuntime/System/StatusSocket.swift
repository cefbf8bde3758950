import Glibc

/// Where daemons put their status sockets: $REMUSD_RUN_DIR; else /run/remusd as root; else
/// $XDG_RUNTIME_DIR/remusd (a directory only this user can write); else /tmp/remusd-<uid>.
public enum RunDirectory {
    public static var path: String {
        let environment = ProcessEnvironment.current
        if let dir = environment["REMUSD_RUN_DIR"], !dir.isEmpty { return dir }
        if getuid() == 0 { return "/run/remusd" }
        if let runtime = environment["XDG_RUNTIME_DIR"], !runtime.isEmpty { return "\(runtime)/remusd" }
        return "/tmp/remusd-\(getuid())"
    }

    /// Creates the run directory 0700 if it is missing; refuses one that another user owns or
    /// that group or others may write (someone could put a fake status socket there).
    public static func ensure(_ dir: String = path) throws {
        if mkdir(dir, 0o700) == 0 {
            try syscall("chmod(\(dir), 700)") { chmod(dir, 0o700) }
            return
        }
        let code = errno
        guard code == EEXIST else {
            throw ControlSocketError("cannot create the run directory \(dir): \(SystemError(call: "mkdir(\(dir))", errno: code)); "
                + "no daemon was started — create it (mode 0700) or set REMUSD_RUN_DIR to a directory only you can write")
        }
        try checkOwnDirectory(dir)
    }

    /// A directory the daemon may put its socket in: ours, a directory, not group/other-writable.
    static func checkOwnDirectory(_ dir: String) throws {
        let info: FileOwnership
        do { info = try FileOwnership.of(dir) } catch {
            throw ControlSocketError("cannot check the run directory \(dir): \(error); no daemon was started")
        }
        let advice = getuid() == 0
            ? "remove it (rm -r \(dir)) and start again: remusd recreates it 0700"
            : "remove it if you can, or set XDG_RUNTIME_DIR or REMUSD_RUN_DIR to a directory only you can write "
              + "(\(dir) under /tmp can be created by any user first)"
        guard info.type == UInt32(S_IFDIR) else {
            throw ControlSocketError("the run directory \(dir) is not a directory (a symbolic link or a file); no daemon was started — \(advice)")
        }
        guard info.uid == getuid() else {
            throw ControlSocketError("the run directory \(dir) belongs to uid \(info.uid), not to this user (uid \(getuid())): "
                + "another user could fake status replies or catch control commands there; no daemon was started — \(advice)")
        }
        guard info.permissions & 0o022 == 0 else {
            throw ControlSocketError("the run directory \(dir) has mode \(String(info.permissions, radix: 8)): group or others "
                + "may write it and plant a fake socket; no daemon was started — chmod 700 \(dir), or \(advice)")
        }
    }

    /// Status socket path for a daemon name.
    public static func socketPath(for name: String) -> String {
        "\(path)/\(name.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." ? $0 : "_" }.reduce(into: "") { $0.append($1) }).sock"
    }

    /// Every status socket present.
    public static func sockets() -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var out: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            if name.hasSuffix(".sock") { out.append("\(path)/\(name)") }
        }
        return out.sorted()
    }
}

/// A control socket that cannot be used safely, or did not answer; the text says what to do.
public struct ControlSocketError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A Unix socket that answers every connection with a status snapshot (text lines) and closes.
/// Also accepts one-line commands ("stop", "failover", "activate") for the control subcommands.
///
/// The socket is 0600 whatever the umask; a client whose uid is neither root nor ours is
/// refused (SO_PEERCRED); each client has its own thread and a read deadline, and at most
/// `maxClients` are served at once, so one idle client never blocks `remusd stop`.
public final class StatusSocket: @unchecked Sendable {  // listener, path and client slots are immutable references
    private let listener: UnixListener
    public let path: String
    /// The clients being answered now, so a daemon can finish its replies before exiting.
    private let slots = ClientSlots(capacity: StatusSocket.maxClients)

    /// Clients served at once; more are told to retry.
    public static let maxClients = 8
    /// How long a client may take to send its command line, milliseconds.
    public static let readDeadlineMs = 3000

    /// - Parameters:
    ///   - snapshot: the status text, called on the client's thread.
    ///   - command: handles a command line and returns the reply.
    public init(path: String, snapshot: @escaping @Sendable () -> String, command: @escaping @Sendable (String) -> String) throws {
        self.path = path
        let runDirectory = RunDirectory.path
        if path.hasPrefix(runDirectory + "/") && !path.dropFirst(runDirectory.count + 1).contains("/") {
            try RunDirectory.ensure()
        }
        let listener: UnixListener
        do { listener = try UnixListener(path: path, mode: 0o600) } catch {
            throw ControlSocketError("cannot create the status socket \(path): \(error); nothing was started — "
                + "check the directory exists and is writable, or choose another with --status-socket")
        }
        self.listener = listener
        startThread(name: "status") { [self] in acceptClients(snapshot: snapshot, command: command) }
    }

    deinit {
        listener.shutdown()
        unlink(path)
    }

    private func acceptClients(snapshot: @escaping @Sendable () -> String, command: @escaping @Sendable (String) -> String) {
        let ourUID = getuid()
        while true {
            let client: UnixConnection
            do { client = try listener.accept() } catch {
                guard TCPListener.isTransient(error) else { return }  // shut down
                sleepNanoseconds(100_000_000)
                continue
            }
            let quick = Deadline.after(milliseconds: 200)
            guard client.peer.uid == 0 || client.peer.uid == ourUID else {
                let reply = "refused: uid \(client.peer.uid) may not use this daemon's control socket (only root and uid \(ourUID)); run the command as one of them\n"
                try? client.write(Array(reply.utf8), until: quick)
                continue
            }
            // The slot frees before the client sees its reply end: the connection closes only
            // once the thread is done (it holds `client`).
            let admitted = slots.serve(threadName: "status-client") { _ in
                // A status reader sends nothing and half-closes; a control client sends one line.
                guard let received = try? client.readLine(limit: 256, until: .after(milliseconds: Self.readDeadlineMs)) else { return }
                let line = String(decoding: received, as: UTF8.self).trimmingWhitespace()
                let reply = line.isEmpty ? snapshot() : command(line)
                try? client.write(Array(reply.utf8), until: .after(milliseconds: Self.readDeadlineMs))
            }
            if !admitted {
                try? client.write(Array("busy: \(Self.maxClients) control clients are being served; try again\n".utf8), until: quick)
            }
        }
    }

    /// Removes the socket file, after the replies in progress (at most `timeoutMs`) went out.
    public func remove(timeoutMs: UInt64 = 1000) {
        let deadline = monotonicNanoseconds() + timeoutMs * 1_000_000
        slots.waitUntilIdle(untilMonotonic: deadline)
        unlink(path)
    }

    /// Refuses a socket, or a directory holding it, that belongs to neither root nor us: its
    /// replies could be forged and our commands caught.
    static func checkTrusted(_ path: String) throws {
        let me = getuid()
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) }.map { $0.isEmpty ? "/" : $0 } ?? "."
        for (what, file) in [("directory", dir), ("socket", path)] {
            // A missing file is the caller's "no daemon answers" (StatusClient says what to do).
            let info = try FileOwnership.of(file)
            guard info.uid == 0 || info.uid == me else {
                throw ControlSocketError("the status \(what) \(file) belongs to uid \(info.uid), neither root nor you (uid \(me)): "
                    + "it may be another user's fake, so remusd did not talk to it; remove it, or name the daemon's socket with --socket")
            }
        }
        guard try FileOwnership.of(path).type == UInt32(S_IFSOCK) else {
            throw SystemError(call: "connect(\(path))", errno: ENOTSOCK, detail: "not a socket")
        }
    }

    /// Connects to a status socket, sends `command` (empty for a snapshot) and returns the reply,
    /// all within `timeoutMs`.
    public static func query(_ path: String, command: String = "", timeoutMs: Int = 10_000) throws -> String {
        try checkTrusted(path)
        let deadline = Deadline.after(milliseconds: timeoutMs)
        do {
            let connection = try UnixConnection.connect(path: path, deadline: deadline)
            if command.isEmpty { connection.shutdownWrite() } else { try connection.write(Array((command + "\n").utf8), until: deadline) }
            return String(decoding: try connection.readAll(limit: 1 << 20, until: deadline), as: UTF8.self)
        } catch {
            if error.isTimeout {
                throw ControlSocketError("the daemon at \(path) did not answer within \(timeoutMs) ms (\(error)); it may be stuck — check its log")
            }
            throw error
        }
    }
}

extension String {
    package func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
