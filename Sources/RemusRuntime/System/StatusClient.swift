import Glibc

/// The client side of the status and control sockets, for `remusd status`, `stop` and
/// `failover`: finds a daemon's socket and says plainly when no daemon answers.
public enum StatusClient {
    /// Nobody answered at a status or control socket.
    public struct NoAnswer: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// The guest names of the daemons whose sockets are in the run directory ("receive-7788" for a backup).
    public static func runningNames() -> [String] {
        RunDirectory.sockets().map { path in
            let file = path.split(separator: "/").last.map(String.init) ?? path
            return String(file.dropLast(".sock".count))
        }
    }

    /// Sends `command` to the daemon protecting `guest` (its socket in the run directory, or
    /// `socket` when given) and returns the reply.
    public static func send(_ command: String, toGuest guest: String, socket: String? = nil) throws -> String {
        let path = socket ?? RunDirectory.socketPath(for: guest)
        guard access(path, F_OK) == 0 else {
            let running = runningNames()
            throw NoAnswer(description: "no remusd protects a guest named '\(guest)' on this host (no control socket at \(path)); "
                + (running.isEmpty ? "none is running here" : "running: \(running.joined(separator: ", "))"))
        }
        return try query(path, command: command)
    }

    /// Asks the daemon at `path` (an empty command: for its status).
    public static func query(_ path: String, command: String = "") throws -> String {
        do {
            return try StatusSocket.query(path, command: command)
        } catch let error as SystemError where [ENOENT, ECONNREFUSED, ENOTSOCK].contains(error.errno.rawValue) {
            throw NoAnswer(description: "no daemon answers at \(path) (\(error)): the remusd that made it has exited. "
                + "Start one with 'remusd protect <domain> <backup-host>' (primary) or 'remusd receive' (backup); "
                + "the socket file is stale and can be removed")
        } catch let error as SystemError {
            throw NoAnswer(description: "no daemon answers at \(path) (\(error)); is remusd running there? "
                + "Start one with 'remusd protect <domain> <backup-host>' or 'remusd receive'")
        }
    }
}
