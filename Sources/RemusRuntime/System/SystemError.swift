import Glibc
import RemusCore

/// A failed system call: which call, and the errno it left.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    /// The call that failed, e.g. "connect(10.0.0.2:7788)".
    public var call: String
    public var errno: Int32
    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call): \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// The one place system calls pass through: reads errno at once and retries EINTR.
/// Returns the call's result, or throws SystemError for -1.
@discardableResult
@inline(__always)
func syscall<T: BinaryInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(call: call(), errno: code)
    }
}

/// Monotonic and wall clocks of this host.
public struct SystemClock: HostClock {
    public init() {}
    public func monotonicNs() -> UInt64 { monotonicNanoseconds() }
    public func wallNs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}
