// The guest's virtual clock: the host's clocks plus fixed offsets.

import Glibc
import RemusCore

/// The host's real clocks (CLOCK_MONOTONIC and CLOCK_REALTIME).
public struct SystemHostClock: HostClock {
    public init() {}

    public func monotonicNs() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }

    public func wallNs() -> Int64 {
        var t = timespec()
        clock_gettime(CLOCK_REALTIME, &t)
        return Int64(t.tv_sec) &* 1_000_000_000 &+ Int64(t.tv_nsec)
    }
}

/// The guest's clocks as offsets from the host's: guest monotonic = host monotonic + offset
/// (mod 2^64), guest wall = host wall + offset. They run while the guest is suspended for a
/// checkpoint, as a real guest's TSC does.
struct GuestClock: Sendable, Equatable {
    /// Added (wrapping) to the host's monotonic nanoseconds.
    var monotonicOffset: UInt64
    /// Added to the host's wall nanoseconds.
    var wallOffset: Int64

    /// A freshly booted guest: its monotonic clock starts at 0, its wall clock is the host's.
    static func boot(host: any HostClock) -> GuestClock {
        GuestClock(monotonicOffset: 0 &- host.monotonicNs(), wallOffset: 0)
    }

    /// The clock of a guest resumed on a new host from a checkpoint (invariant I4).
    ///
    /// Monotonic time continues from the checkpoint's value plus the real time elapsed since the
    /// replica committed it (`hostNow - committedAtHostNs`, a lower bound of the time since
    /// capture): never backwards, never a leap. Wall time keeps the guest's offset to its host's
    /// wall clock, so it catches up with real time, but never reads earlier than the checkpoint.
    static func resumed(
        from checkpoint: ClockState, committedAtHostNs: UInt64, hostMonotonicNs: UInt64, hostWallNs: Int64
    ) -> GuestClock {
        let elapsed = hostMonotonicNs >= committedAtHostNs ? hostMonotonicNs - committedAtHostNs : 0
        let guestMonotonic = checkpoint.guestMonotonicNs &+ elapsed
        let keptOffset = checkpoint.guestWallNs &- checkpoint.hostWallNs
        let guestWall = max(hostWallNs &+ keptOffset, checkpoint.guestWallNs)
        return GuestClock(monotonicOffset: guestMonotonic &- hostMonotonicNs, wallOffset: guestWall &- hostWallNs)
    }

    /// The guest's clocks at the given host readings, as a CLOCK record.
    func reading(hostMonotonicNs: UInt64, hostWallNs: Int64) -> ClockState {
        ClockState(
            guestMonotonicNs: hostMonotonicNs &+ monotonicOffset, guestWallNs: hostWallNs &+ wallOffset,
            tscKHz: 0, hostMonotonicNs: hostMonotonicNs, hostWallNs: hostWallNs)
    }

    /// The guest's clocks now.
    func reading(_ host: any HostClock) -> ClockState {
        reading(hostMonotonicNs: host.monotonicNs(), hostWallNs: host.wallNs())
    }
}
