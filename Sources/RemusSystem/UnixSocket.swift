import Glibc

/// Calls `body` with a `sockaddr_un` for `path`: the one builder of Unix socket addresses.
/// Throws ENAMETOOLONG for a path that does not fit `sun_path` with its NUL.
public func withUnixAddress<R>(
    _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> R
) throws(SystemError) -> R {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
        throw SystemError(call: "sockaddr_un(\(path))", errno: .fileNameTooLong,
                          detail: "a Unix socket path must be 1 to \(MemoryLayout.size(ofValue: address.sun_path) - 1) bytes")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    return try withUnsafePointer(to: &address) { (p) throws(SystemError) in
        // SAFETY: sockaddr_un begins with the sockaddr header; the length passed covers the struct.
        try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa) throws(SystemError) in
            try body(sa, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
}

/// Who is at the other end of a Unix socket (SO_PEERCRED), as the kernel recorded it at connect.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
}

/// A listening Unix stream socket whose file is created with `mode` whatever the umask.
public final class UnixListener: Sendable {
    private let descriptor: OwnedDescriptor
    public let path: String

    /// Binds `path` (an old socket file there is replaced) and listens. The socket is bound under
    /// a private name in the same directory, given `mode`, made to listen and only then renamed
    /// to `path`: whoever sees the file can connect at once, and nobody can while the file has the
    /// umask's mode. (A client that waited for the file used to meet ECONNREFUSED between bind and
    /// listen on a loaded machine.)
    public init(path: String, mode: mode_t = 0o600, backlog: Int32 = 16) throws(SystemError) {
        self.path = path
        let socket = OwnedDescriptor(adopting: try syscall("socket(AF_UNIX)") {
            Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
        let fd = socket.raw
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let provisional = directory + "/.\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock~"
        // Where the provisional name does not fit sun_path, the socket is bound where it stays.
        let bound = provisional.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) ? provisional : path
        if bound == path { unlink(path) }
        _ = try withUnixAddress(bound) { (sa, length) throws(SystemError) in try syscall("bind(\(bound))") { bind(fd, sa, length) } }
        do {
            try syscall("chmod(\(bound), \(String(mode, radix: 8)))") { chmod(bound, mode) }
            try syscall("listen(\(bound))") { listen(fd, backlog) }
            if bound != path { try syscall("rename(\(bound), \(path))") { rename(bound, path) } }
        } catch {
            unlink(bound)
            throw error
        }
        descriptor = socket
    }

    /// Waits for the next connection and says who made it.
    public func accept() throws(SystemError) -> UnixConnection {
        let client = OwnedDescriptor(adopting: try syscall("accept(\(path))") { Glibc.accept(descriptor.raw, nil, nil) })
        _ = fcntl(client.raw, F_SETFD, FD_CLOEXEC)  // accept4 is hidden behind _GNU_SOURCE
        return try UnixConnection(client)
    }

    /// Makes a blocked `accept` fail so its thread can end.
    public func shutdown() { _ = Glibc.shutdown(descriptor.raw, Int32(SHUT_RDWR)) }
}

/// One connected Unix stream socket; every read and write is bounded by a deadline.
public final class UnixConnection: Sendable {
    private let descriptor: OwnedDescriptor
    /// The process at the other end.
    public let peer: PeerCredentials

    init(_ descriptor: consuming OwnedDescriptor) throws(SystemError) {
        let fd = descriptor.raw
        let flags = try syscall("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        try syscall("fcntl(F_SETFL, O_NONBLOCK)") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        // struct ucred is behind _GNU_SOURCE in the C headers: three 32-bit fields, pid, uid, gid.
        var credentials: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout.size(ofValue: credentials))
        try syscall("getsockopt(SO_PEERCRED)") { getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) }
        peer = PeerCredentials(pid: credentials.0, uid: credentials.1, gid: credentials.2)
        self.descriptor = descriptor
    }

    /// A connected pair: our end, and the other end's descriptor for someone else to use (the
    /// kernel's NBD client). The caller closes that descriptor.
    public static func socketPair() throws(SystemError) -> (UnixConnection, Int32) {
        var fds: [Int32] = [-1, -1]
        _ = try syscall("socketpair(AF_UNIX)") { Glibc.socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        do {
            return (try UnixConnection(OwnedDescriptor(adopting: fds[0])), fds[1])
        } catch {
            close(fds[1])
            throw error
        }
    }

    /// Connects to the socket at `path`, waiting at most until `deadline`.
    public static func connect(path: String, deadline: Deadline) throws(SystemError) -> UnixConnection {
        let socket = OwnedDescriptor(adopting: try syscall("socket(AF_UNIX)") {
            Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        })
        let fd = socket.raw
        let call = "connect(\(path))"
        // A Unix connect does not go on in the background: EAGAIN means the listener's queue is
        // full, and the connect is tried again (briefly spaced) until the deadline.
        while true {
            let started = try withUnixAddress(path) { (sa, length) throws(SystemError) in
                try syscallOrWouldBlock(call) { Glibc.connect(fd, sa, length) }
            }
            if case .done = started { return try UnixConnection(socket) }
            let left = deadline.remainingNs
            if left == 0 { throw SystemError(call: call, errno: .timedOut, detail: "no answer within \(deadline.budgetMs) ms") }
            sleepNanoseconds(min(left, 5_000_000))
        }
    }

    /// Reads until a newline, end of input or `limit` bytes, whichever comes first. Throws
    /// ETIMEDOUT when the deadline passes before any of them.
    public func readLine(limit: Int, until deadline: Deadline) throws(SystemError) -> [UInt8] {
        var received: [UInt8] = []
        while received.count < limit && !received.contains(10) {
            let chunk = try read(upTo: limit - received.count, until: deadline)
            if chunk.isEmpty { break }
            received += chunk
        }
        return received
    }

    /// Reads everything up to end of input (at most `limit` bytes) before the deadline.
    public func readAll(limit: Int, until deadline: Deadline) throws(SystemError) -> [UInt8] {
        var received: [UInt8] = []
        while received.count < limit {
            let chunk = try read(upTo: limit - received.count, until: deadline)
            if chunk.isEmpty { break }
            received += chunk
        }
        return received
    }

    /// One read of at most `count` bytes (4096 at most per call), waiting until some arrive;
    /// empty at end of input. Throws ETIMEDOUT when the deadline passes first. For protocols
    /// that frame their own messages (QMP's lines may arrive several to a read).
    public func read(upTo count: Int, until deadline: Deadline) throws(SystemError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: min(count, 4096))
        let fd = descriptor.raw
        while true {
            let result = try syscallOrWouldBlock("read(unix socket)") {
                buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            }
            if case .done(let n) = result { return Array(buffer[0..<n]) }
            guard try waitReady(fd, events: Int16(POLLIN), until: deadline, call: "read(unix socket)") else {
                throw SystemError(call: "read(unix socket)", errno: .timedOut, detail: "nothing within \(deadline.budgetMs) ms")
            }
        }
    }

    /// Fills `buffer` whole before the deadline, straight into the caller's memory (for bulk
    /// payloads). Returns false when the peer ended its side before the first byte; ending it
    /// later, mid-buffer, is an error (EPIPE, "cut short"). Throws ETIMEDOUT at the deadline.
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, until deadline: Deadline) throws(SystemError) -> Bool {
        let fd = descriptor.raw
        var done = 0
        while done < buffer.count {
            let result = try syscallOrWouldBlock("read(unix socket)") { Glibc.read(fd, buffer.baseAddress! + done, buffer.count - done) }
            switch result {
            case .done(0) where done == 0:
                return false
            case .done(0):
                throw SystemError(call: "read(unix socket)", errno: .brokenPipe, detail: "the peer closed \(done) bytes into \(buffer.count)")
            case .done(let n):
                done += n
            default:
                guard try waitReady(fd, events: Int16(POLLIN), until: deadline, call: "read(unix socket)") else {
                    throw SystemError(call: "read(unix socket)", errno: .timedOut, detail: "\(done) of \(buffer.count) bytes within \(deadline.budgetMs) ms")
                }
            }
        }
        return true
    }

    /// Writes every byte before the deadline.
    public func write(_ bytes: [UInt8], until deadline: Deadline) throws(SystemError) {
        let fd = descriptor.raw
        var offset = 0
        while offset < bytes.count {
            let result = try syscallOrWouldBlock("write(unix socket)") {
                bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            }
            if case .done(let n) = result { offset += n; continue }
            guard try waitReady(fd, events: Int16(POLLOUT), until: deadline, call: "write(unix socket)") else {
                throw SystemError(call: "write(unix socket)", errno: .timedOut, detail: "not taken within \(deadline.budgetMs) ms")
            }
        }
    }

    /// Writes every byte of `parts`, in order, before the deadline: one sendmsg for all of them
    /// where the socket takes them (no copy into one buffer first).
    public func write(_ parts: [UnsafeRawBufferPointer], until deadline: Deadline) throws(SystemError) {
        let fd = descriptor.raw
        let segments = UnsafeMutableBufferPointer<iovec>.allocate(capacity: max(parts.count, 1))
        defer { segments.deallocate() }
        for (i, part) in parts.enumerated() {
            segments[i] = iovec(iov_base: UnsafeMutableRawPointer(mutating: part.baseAddress), iov_len: part.count)
        }
        var index = 0
        while index < parts.count && segments[index].iov_len == 0 { index += 1 }
        while index < parts.count {
            var message = msghdr()
            message.msg_iov = segments.baseAddress! + index
            message.msg_iovlen = parts.count - index
            let result = try syscallOrWouldBlock("sendmsg(unix socket)") { sendmsg(fd, &message, Int32(MSG_NOSIGNAL)) }
            if case .done(let n) = result {
                skipWritten(n, in: UnsafeMutableBufferPointer(rebasing: segments[0..<parts.count]), from: &index)
                continue
            }
            guard try waitReady(fd, events: Int16(POLLOUT), until: deadline, call: "sendmsg(unix socket)") else {
                throw SystemError(call: "sendmsg(unix socket)", errno: .timedOut, detail: "not taken within \(deadline.budgetMs) ms")
            }
        }
    }

    /// Ends our direction (the peer reads end of input) and keeps reading.
    public func shutdownWrite() { _ = Glibc.shutdown(descriptor.raw, Int32(SHUT_WR)) }

    /// Ends both directions: a read or wait on another thread returns at once.
    public func shutdown() { _ = Glibc.shutdown(descriptor.raw, Int32(SHUT_RDWR)) }

    /// Waits until input (or its end) is there to read; false when the deadline passed first.
    public func waitReadable(until deadline: Deadline) throws(SystemError) -> Bool {
        try waitReady(descriptor.raw, events: Int16(POLLIN), until: deadline, call: "poll(unix socket)")
    }
}

/// The owner and mode of a file, without following a symbolic link at its end.
public struct FileOwnership: Sendable, Equatable {
    public var uid: UInt32
    public var mode: UInt32
    /// S_IFDIR, S_IFSOCK, S_IFLNK, … of `mode`.
    public var type: UInt32 { mode & UInt32(S_IFMT) }
    /// The permission bits.
    public var permissions: UInt32 { mode & 0o7777 }

    /// lstat of `path`.
    public static func of(_ path: String) throws(SystemError) -> FileOwnership {
        var info = stat()
        try syscall("lstat(\(path))") { lstat(path, &info) }
        return FileOwnership(uid: info.st_uid, mode: info.st_mode)
    }
}
