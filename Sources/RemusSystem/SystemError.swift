import Glibc
@_exported import struct SystemPackage.Errno
import SystemPackage

/// A failed system call: which call, and the errno it left. The one errno-carrying error of
/// remusd; backends and outputs wrap it in their own error types for the cases that are theirs.
public struct SystemError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The call that failed, e.g. "connect(10.0.0.2:7788)".
    public var call: String
    /// The errno the call left.
    public var errno: Errno
    /// What happened, when strerror's text would not say it (e.g. "no answer within 500 ms").
    public var detail: String?

    public init(call: String, errno: Errno, detail: String? = nil) {
        self.call = call
        self.errno = errno
        self.detail = detail
    }

    public init(call: String, errno: Int32, detail: String? = nil) {
        self.init(call: call, errno: Errno(rawValue: errno), detail: detail)
    }

    /// The error the last failed call left in `errno` (read it before any other call).
    public static func last(_ call: String) -> SystemError {
        SystemError(call: call, errno: Glibc.errno)
    }

    /// E.g. "open(/x): No such file or directory (ENOENT)"; unnamed values show "(errno N)".
    public var description: String { "\(call): \(detail ?? errno.description) (\(errno.symbol))" }

    /// The operation ran out of time (ETIMEDOUT), e.g. a connect nobody answered.
    public var isTimeout: Bool { errno == .timedOut }
}

extension Errno {
    /// The C name ("ENOENT"), or "errno N" for a value without one here.
    public var symbol: String {
        switch rawValue {
        case Glibc.EPERM: "EPERM"
        case Glibc.ENOENT: "ENOENT"
        case Glibc.ESRCH: "ESRCH"
        case Glibc.EINTR: "EINTR"
        case Glibc.EIO: "EIO"
        case Glibc.ENXIO: "ENXIO"
        case Glibc.E2BIG: "E2BIG"
        case Glibc.EBADF: "EBADF"
        case Glibc.ECHILD: "ECHILD"
        case Glibc.EAGAIN: "EAGAIN"
        case Glibc.ENOMEM: "ENOMEM"
        case Glibc.EACCES: "EACCES"
        case Glibc.EFAULT: "EFAULT"
        case Glibc.EBUSY: "EBUSY"
        case Glibc.EEXIST: "EEXIST"
        case Glibc.ENODEV: "ENODEV"
        case Glibc.ENOTDIR: "ENOTDIR"
        case Glibc.EINVAL: "EINVAL"
        case Glibc.ENFILE: "ENFILE"
        case Glibc.EMFILE: "EMFILE"
        case Glibc.ENOSPC: "ENOSPC"
        case Glibc.EPIPE: "EPIPE"
        case Glibc.ERANGE: "ERANGE"
        case Glibc.ENAMETOOLONG: "ENAMETOOLONG"
        case Glibc.ENOSYS: "ENOSYS"
        case Glibc.EOPNOTSUPP: "EOPNOTSUPP"
        case Glibc.ENOBUFS: "ENOBUFS"
        case Glibc.EADDRINUSE: "EADDRINUSE"
        case Glibc.EADDRNOTAVAIL: "EADDRNOTAVAIL"
        case Glibc.ENETUNREACH: "ENETUNREACH"
        case Glibc.ECONNABORTED: "ECONNABORTED"
        case Glibc.ECONNRESET: "ECONNRESET"
        case Glibc.ECONNREFUSED: "ECONNREFUSED"
        case Glibc.ETIMEDOUT: "ETIMEDOUT"
        case Glibc.EHOSTUNREACH: "EHOSTUNREACH"
        case Glibc.EINPROGRESS: "EINPROGRESS"
        default: "errno \(rawValue)"
        }
    }
}

/// What a non-blocking call did: its result, or "would block" (try again when ready).
public enum IOResult<T: Sendable>: Sendable {
    case done(T)
    case wouldBlock
}

/// The one place system calls pass through: reads errno at once and retries EINTR.
/// Returns the call's result, or throws SystemError for -1.
@discardableResult
@inline(__always)
public func syscall<T: BinaryInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(call: call(), errno: code)
    }
}

/// `syscall` for a non-blocking descriptor: EAGAIN/EWOULDBLOCK (and a connect's EINPROGRESS or
/// EALREADY) come back as `.wouldBlock`, a value, not an error.
@inline(__always)
public func syscallOrWouldBlock<T: BinaryInteger & Sendable>(
    _ call: @autoclosure () -> String, _ body: () -> T
) throws(SystemError) -> IOResult<T> {
    while true {
        let result = body()
        if result != -1 { return .done(result) }
        let code = Glibc.errno
        switch code {
        case EINTR: continue
        case EAGAIN, EWOULDBLOCK, EINPROGRESS, EALREADY: return .wouldBlock
        default: throw SystemError(call: call(), errno: code)
        }
    }
}
