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
        /// Backup: part-way through applying disk N (half its entries applied, nothing synced): wait for
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

    /// A backup that finished a logged epoch at its start: copies each image of `directory` (its
    /// files not named with a leading dot) to `<dir>/inject-<pid>.recovered-<name>`, as the
    /// restart left them, before a primary's full copy overwrites them.
    static func afterRecovery(directory images: String) {
        guard let directory, let dir = opendir(images) else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            guard !name.hasPrefix("."), entry.pointee.d_type == UInt8(DT_REG) else { continue }
            let copy = armingPath(directory, pid: getpid()) + ".recovered-" + name
            do { try copyFile(images + "/" + name, to: copy) } catch {
                Log.error("injected fault: copying the recovered image \(name) failed: \(error)")
            }
        }
    }

    private static func copyFile(_ from: String, to: String) throws {
        guard let bytes = readBytes(from) else { throw ProtocolError("cannot read \(from)") }
        try writeFile(to + ".tmp", bytes)
        try renameFile(to + ".tmp", to)
    }

    /// A whole file's bytes (an image of the drill's 16 MiB disk), nil when it cannot be read.
    package static func readBytes(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { return nil }
            if n == 0 { return out }
            out += buffer[0..<n]
        }
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
    /// apply point and a record with entries, applies the first half of them (none of a record of
    /// one: the drill's default guest writes one block per epoch) and stops as armed.
    /// `committed` gives the committed state (memory N, whose apply this is); with the kill, it is
    /// written first to `<dir>/inject-<pid>.committed` (the activation report's format) for the
    /// drill to check the image the restarted backup finishes (`afterRecovery`).
    static func atDiskApply(_ disks: BackupDisks, epoch: Epoch, committed: (@Sendable () -> [String: String]?)?) {
        let entries = disks.pendingEntries
        guard directory != nil, entries >= 1 else { return }
        let point: Point
        if armed(.holdDiskApply) { point = .holdDiskApply } else if armed(.killDuringDiskApply) { point = .killDuringDiskApply } else { return }
        do { try disks.applyPart(entries: entries / 2) } catch {
            Log.error("injected fault \(point.rawValue): the partial apply failed: \(error)")
            return
        }
        if point == .killDuringDiskApply, let fields = committed?() {
            do { try ActivationReport(fields: fields).write(to: armingPath(directory!, pid: getpid()) + ".committed") } catch {
                Log.error("injected fault \(point.rawValue): writing the committed state failed: \(error)")
            }
        }
        fire(point, epoch: epoch, detail: "\(entries / 2) of \(entries) entries applied")
        if point == .killDuringDiskApply { killSelf() }
        let go = armingPath(directory!, pid: getpid()) + ".go"
        let clock = SystemClock()
        let deadline = clock.monotonicNs() + 60_000_000_000
        while access(go, F_OK) != 0 && clock.monotonicNs() < deadline { pauseBriefly(ms: 2) }
        Log.warning("injected fault \(point.rawValue): finishing the apply of checkpoint \(epoch)")
    }
}
