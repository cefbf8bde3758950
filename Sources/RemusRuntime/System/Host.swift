import Glibc
import RemusCore

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

/// Whether Linux runs under Xen (`/sys/hypervisor/type` is "xen"): `protect`'s default backend.
/// Whether this is a usable dom0 is `XenHost.detect`'s question, asked when the backend opens.
public func xenHypervisorPresent() -> Bool {
    readWholeFile("/sys/hypervisor/type")?.trimmingWhitespace() == "xen"
}
