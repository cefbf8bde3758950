import Glibc
import RemusCore
import RemusDisk

/// Kill points for `remusd drill --inject …` and the tests: compiled in, inert unless the
/// environment names a directory in `REMUSD_INJECT_DIR` (the drill sets it only when asked to
/// inject one). Even then a process stops at a point only once armed for it: the file
/// `<dir>/inject-<pid>` holds the point's name. When the point is reached the process consumes the
/// arming, writes `<dir>/inject-<pid>.fired` (`epoch N`, `at_ns` on CLOCK_MONOTONIC, and what it
/// held) and then stops as the point says. See Docs/disks.md, "Kill points".
package enum InjectedFault {
    package enum Point: String, Sendable, CaseIterable {
        /// Primary: after checkpoint N's disk records were written, before its CHECKPOINT_END: stop
        /// (SIGSTOP) for the drill to kill. Stopped, not dead: a process killed with unread input
        /// resets its connection, and the kernel drops what it had not yet sent (the backup could
        /// be reading an earlier checkpoint still); stopped, the kernel delivers all of it and the
        /// backup declares the primary lost by its silence, checkpoint N open.
        case killAfterDiskRecords = "kill-after-disk-records"
        /// Backup: part-way through applying disk N (one entry applied, nothing synced): wait for
        /// `<dir>/inject-<pid>.go` (at most 60 s), then finish the apply.
        case holdDiskApply = "hold-disk-apply"
        /// Backup: part-way through applying disk N: SIGKILL itself.
        case killDuringDiskApply = "kill-during-disk-apply"
    }

    /// `REMUSD_INJECT_DIR`, read once; nil (production): every hook is a nil check.
    package static let directory: String? = getenv("REMUSD_INJECT_DIR").map { String(cString: $0) }

    /// The arming file of process `pid` under `directory`.
    package static func armingPath(_ directory: String, pid: Int32) -> String { "\(directory)/inject-\(pid)" }

    /// Whether this process is armed for `point` (always false without `REMUSD_INJECT_DIR`).
    static func armed(_ point: Point) -> Bool {
        guard let directory else { return false }
        return readWholeFile(armingPath(directory, pid: getpid()))?.trimmingWhitespace() == point.rawValue
    }

    /// Records that the armed point was reached at `epoch`, consuming the arming.
    static func fire(_ point: Point, epoch: Epoch, detail: String) {
        guard let directory else { return }
        let arming = armingPath(directory, pid: getpid())
        unlink(arming)
        let text = "point \(point.rawValue)\nepoch \(epoch)\nat_ns \(SystemClock().monotonicNs())\ndetail \(detail)\n"
        do {
            try writeFile(arming + ".fired.tmp", Array(text.utf8))
            try renameFile(arming + ".fired.tmp", arming + ".fired")
        } catch {
            Log.error("injected fault \(point.rawValue): writing \(arming).fired failed: \(error)")
        }
        Log.warning("injected fault \(point.rawValue) reached at checkpoint \(epoch) (\(detail))")
    }

    /// SIGSTOP of this process (sent to this thread, so it stops before it returns; the whole
    /// process stops with it); continued, this thread still never goes on.
    static func stopSelf() -> Never {
        raise(SIGSTOP)
        while true { pause() }
    }

    /// SIGKILL of this process: what a crash at this point looks like.
    static func killSelf() -> Never {
        kill(getpid(), SIGKILL)
        while true { pause() }
    }

    /// The backup's disk worker, before applying the logged record of `epoch`: with an armed
    /// apply point and a record of at least two entries, applies one entry and stops as armed.
    static func atDiskApply(_ disks: BackupDisks, epoch: Epoch) {
        guard directory != nil, disks.pendingEntries >= 2 else { return }
        let point: Point
        if armed(.holdDiskApply) { point = .holdDiskApply } else if armed(.killDuringDiskApply) { point = .killDuringDiskApply } else { return }
        do { try disks.applyPart(entries: 1) } catch {
            Log.error("injected fault \(point.rawValue): the partial apply failed: \(error)")
            return
        }
        fire(point, epoch: epoch, detail: "1 of \(disks.pendingEntries) entries applied")
        if point == .killDuringDiskApply { killSelf() }
        let go = armingPath(directory!, pid: getpid()) + ".go"
        let clock = SystemClock()
        let deadline = clock.monotonicNs() + 60_000_000_000
        while access(go, F_OK) != 0 && clock.monotonicNs() < deadline { pauseBriefly(ms: 2) }
        Log.warning("injected fault \(point.rawValue): finishing the apply of checkpoint \(epoch)")
    }
}
