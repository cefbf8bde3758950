import Glibc
import SystemPackage

/// A file descriptor owned by exactly one value: closed when that value goes away, unless
/// handed on with `release()`.
public struct OwnedDescriptor: ~Copyable, Sendable {
    /// The descriptor, for calls; valid while this value lives.
    public let fileDescriptor: FileDescriptor

    /// Takes ownership of `raw`, an open descriptor nobody else closes.
    public init(adopting raw: Int32) { fileDescriptor = FileDescriptor(rawValue: raw) }

    /// The raw number, for C calls.
    public var raw: Int32 { fileDescriptor.rawValue }

    /// Gives up ownership without closing; the caller now owns the number.
    public consuming func release() -> Int32 {
        let raw = fileDescriptor.rawValue
        discard self
        return raw
    }

    deinit {
        // close is not retried on EINTR: Linux releases the number even then.
        try? fileDescriptor.close()
    }
}

/// A point in CLOCK_MONOTONIC time by which an operation must be done, with the budget it was
/// given (for messages such as "no answer within 500 ms").
public struct Deadline: Sendable, Equatable {
    /// The deadline, monotonic nanoseconds.
    public let monotonicNs: UInt64
    /// The time allowed when the deadline was set, nanoseconds.
    public let budgetNs: UInt64

    /// `nanoseconds` from now.
    public init(afterNanoseconds nanoseconds: UInt64) {
        budgetNs = nanoseconds
        monotonicNs = monotonicNanoseconds() &+ nanoseconds
    }

    /// `milliseconds` from now.
    public static func after(milliseconds: Int) -> Deadline {
        Deadline(afterNanoseconds: UInt64(max(milliseconds, 0)) * 1_000_000)
    }

    /// `seconds` from now.
    public static func after(seconds: Double) -> Deadline {
        Deadline(afterNanoseconds: UInt64(max(seconds, 0) * 1e9))
    }

    /// The budget in milliseconds, for messages.
    public var budgetMs: UInt64 { budgetNs / 1_000_000 }

    /// Nanoseconds left (0 once passed).
    public var remainingNs: UInt64 {
        let now = monotonicNanoseconds()
        return monotonicNs > now ? monotonicNs - now : 0
    }

    public var hasPassed: Bool { remainingNs == 0 }

    /// The time left as a poll(2) timeout: milliseconds, rounded up, at least 1 while time is left.
    public var pollTimeoutMs: Int32 {
        Int32(min((remainingNs + 999_999) / 1_000_000, UInt64(Int32.max)))
    }
}

/// Waits until `fd` is ready for `events` (POLLIN, POLLOUT) or the deadline passes. Returns
/// false at the deadline. Hang-up and errors count as ready: the next call reports them.
public func waitReady(_ fd: Int32, events: Int16, until deadline: Deadline, call: @autoclosure () -> String) throws(SystemError) -> Bool {
    while true {
        let timeout = deadline.pollTimeoutMs
        if timeout == 0 { return false }
        var entry = pollfd(fd: fd, events: events, revents: 0)
        if try syscall("poll(\(call()))", { poll(&entry, 1, timeout) }) > 0 { return true }
    }
}

/// Sleeps `nanoseconds` (a bounded back-off; resumes after a signal for the rest of the time).
public func sleepNanoseconds(_ nanoseconds: UInt64) {
    var request = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) == -1 && errno == EINTR { request = remaining }
}

/// Sleeps `ms` milliseconds plus `us` microseconds: a bounded pause between polls (a witness
/// renewal, a key still held by another host, a drill waiting for a file), never a substitute
/// for waiting on the event itself.
public func pauseBriefly(ms: UInt64 = 0, us: UInt64 = 0) {
    sleepNanoseconds((ms * 1000 + us) * 1000)
}
