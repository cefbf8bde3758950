import Glibc
import RemusSystem
import Synchronization

/// Where the device model's xenstore keys are read: xenstored in production, a dictionary in
/// tests. Paths are absolute.
protocol DeviceModelStore: Sendable {
    /// The names of `path`'s children; nil when `path` does not exist.
    func directory(_ path: String) -> [String]?
    /// The value at `path`; nil when it does not exist.
    func read(_ path: String) -> String?
}

/// `DeviceModelStore` over one xenstored connection, opened once for the whole protection.
final class XenStoreDeviceModelStore: DeviceModelStore {
    // XenStoreConnection is a plain class around `struct xs_handle *`; libxenstore allows one
    // caller at a time per handle, which the mutex gives.
    private let connection: Mutex<XenStoreConnection>

    init(log: XenLog) throws(XenError) {
        connection = Mutex(try XenStoreConnection(log: log))
    }

    func directory(_ path: String) -> [String]? { connection.withLock { $0.directory(path) } }
    func read(_ path: String) -> String? { connection.withLock { $0.read(path) } }
}

/// A step of the device model that failed, for one domain: what happened and what to check.
public struct XenDeviceModelError: Error, Sendable, CustomStringConvertible {
    public let domid: UInt32
    /// What remusd was doing, e.g. "saving its device state for this checkpoint".
    public let operation: String
    /// The monitor's failure, when it was one.
    public let qmp: QMPError?
    /// What went wrong, when it was not the monitor.
    public let detail: String?

    public var description: String {
        let cause = qmp.map { "\($0)" } ?? detail ?? "unknown failure"
        return "domain \(domid)'s device model (QEMU): \(operation) failed: \(cause). "
            + "Check that its QEMU still runs (`xl list`, /var/log/xen/qemu-dm-*.log) and that no other "
            + "program holds its monitor socket"
    }
}

/// The device model of an HVM guest, driven over libxl's QMP socket as libxl drives it around a
/// checkpointed save (libxl_dom_save.c, libxl_dom_suspend.c, libxl_qmp.c).
///
/// One connection per call, closed at its end, not one held for the whole protection. QEMU's
/// QMP chardev (`-chardev socket,server=on,wait=off`) serves one client at a time: while a
/// client is connected it accepts no other, and a second client's connect waits in the listen
/// queue without a greeting. libxl connects there too (device hot-plug, `xl qemu-monitor-command`,
/// cd-insert, save, its own resume of the device model), serialised among libxl processes by a
/// lock file remusd does not take. Holding the socket for the guest's whole protection would
/// make each of those `xl` commands hang until its own timeout; connecting per call costs a
/// connect, the greeting and `qmp_capabilities` (a local round trip, well under a millisecond)
/// and leaves the socket free between checkpoints. An `xl` command that holds the socket when a
/// checkpoint needs it makes that checkpoint's call time out at its deadline, a typed error.
///
/// `xen-save-devices-state` is given a file name (not an fd passed with `add-fd`, as libxl
/// does): QEMU opens the file itself, so it must be able to reach it. A device model run with
/// `dm_restrict` (chrooted, unprivileged) cannot, and the save fails with QEMU's own error.
final class QMPDeviceModel: XenDeviceModel {
    /// The largest device state accepted from QEMU by default (64 MiB); a typical HVM guest's
    /// is well under 1 MiB.
    static let defaultMaxStateBytes = 64 << 20

    /// libxl's QMP socket of domain `domid`.
    static func socketPath(domid: UInt32) -> String { "/var/run/xen/qmp-libxl-\(domid)" }
    /// Where QEMU writes the device state, beside libxl's own `qemu-save.<domid>`.
    static func stateFilePath(domid: UInt32) -> String { "/var/lib/xen/remusd-qemu-save.\(domid)" }
    /// The device model's xenstore directory (a device model in dom0: no stub domain).
    static func xenstoreRoot(domid: UInt32) -> String { "/local/domain/0/device-model/\(domid)" }

    let domid: UInt32
    let socketPath: String
    let stateFilePath: String
    let deadlineNs: UInt64
    let store: any DeviceModelStore
    /// The largest device state accepted, bytes.
    let maxStateBytes: Int

    init(domid: UInt32, socketPath: String, stateFilePath: String, deadlineNs: UInt64, store: any DeviceModelStore,
         maxStateBytes: Int = QMPDeviceModel.defaultMaxStateBytes) {
        self.domid = domid
        self.maxStateBytes = maxStateBytes
        self.socketPath = socketPath
        self.stateFilePath = stateFilePath
        self.deadlineNs = deadlineNs
        self.store = store
    }

    /// Connects, reads the greeting, negotiates: the monitor answers. Returns QEMU's version.
    func probe() throws -> QMPValue {
        try withMonitor("connecting to its monitor") { (client, _) throws(QMPError) in client.greeting["version"] ?? .null }
    }

    /// `xen-set-global-dirty-log {"enable": …}`: QEMU marks the guest pages it writes (DMA) in
    /// Xen's log-dirty bitmap, so they travel with the next checkpoint.
    func setLogDirty(_ enabled: Bool) throws {
        try withMonitor(enabled ? "turning its dirty-page logging on" : "turning its dirty-page logging off") { (client, deadline) throws(QMPError) in
            _ = try client.execute("xen-set-global-dirty-log", arguments: ["enable": .bool(enabled)], until: deadline)
        }
    }

    /// `stop`, then `xen-save-devices-state` into `stateFilePath`; returns the file as
    /// EMULATOR_XENSTORE_DATA (when QEMU has physmap keys) and EMULATOR_CONTEXT. QEMU stays
    /// stopped until `resume()`, also after a failure here.
    ///
    /// `live: false`: with `live: true` (what libxl sends for a migration) QEMU releases the
    /// guest's disk images for a destination to take over; a checkpoint keeps running here.
    func captureRecords() throws -> [UInt8] {
        try prepareStateFile()
        defer { unlink(stateFilePath) }
        try withMonitor("saving its device state for this checkpoint") { (client, deadline) throws(QMPError) in
            _ = try client.execute("stop", until: deadline)
            _ = try client.execute("xen-save-devices-state", arguments: [
                "filename": .string(stateFilePath), "live": .bool(false),
            ], until: deadline)
        }
        let state = try readStateFile()
        let pairs = try emulatorXenStorePairs()
        return LibxlStream.emulatorXenStoreData(pairs) + LibxlStream.emulatorContext(state[...])
    }

    /// `cont`: the device model runs again (harmless when it already runs).
    func resume() throws {
        try withMonitor("resuming it") { (client, deadline) throws(QMPError) in
            _ = try client.execute("cont", until: deadline)
        }
    }

    /// The device model's physmap keys as libxl saves them.
    func emulatorXenStorePairs() throws -> [LibxlStream.XenStorePair] {
        let root = Self.xenstoreRoot(domid: domid)
        let entries = store.directory(root + "/physmap") ?? []
        do {
            return try LibxlStream.emulatorXenStorePairs(physmapEntries: entries) { store.read(root + "/" + $0) }
        } catch {
            throw XenDeviceModelError(domid: domid, operation: "reading its xenstore keys under \(root)", qmp: nil, detail: error.description)
        }
    }

    /// One connection for one call, everything within `deadlineNs`.
    private func withMonitor<T>(_ operation: String, _ body: (QMPClient, Deadline) throws(QMPError) -> T) throws -> T {
        let deadline = Deadline(afterNanoseconds: deadlineNs)
        do {
            let client = try QMPClient(path: socketPath, deadline: deadline)
            return try body(client, deadline)
        } catch {
            throw XenDeviceModelError(domid: domid, operation: operation, qmp: error, detail: nil)
        }
    }

    /// An empty file owned by remusd, mode 0600, for QEMU to fill: QEMU opens it with O_TRUNC
    /// and keeps the mode of a file that exists. Refuses a symbolic link at the path.
    private func prepareStateFile() throws {
        do {
            let fd = try syscall("open(\(stateFilePath))") {
                open(stateFilePath, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
            }
            let file = OwnedDescriptor(adopting: fd)
            try syscall("fchmod(\(stateFilePath), 600)") { fchmod(file.raw, 0o600) }
        } catch {
            throw XenDeviceModelError(domid: domid, operation: "preparing the file for its device state", qmp: nil, detail: error.description)
        }
    }

    /// The saved state, at most `maxStateBytes`; refused whole beyond that, before reading it.
    private func readStateFile() throws -> [UInt8] {
        let operation = "reading its saved device state"
        do {
            let file = OwnedDescriptor(adopting: try syscall("open(\(stateFilePath))") { open(stateFilePath, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) })
            var info = stat()
            try syscall("fstat(\(stateFilePath))") { fstat(file.raw, &info) }
            guard info.st_size <= maxStateBytes else {
                throw XenDeviceModelError(domid: domid, operation: operation, qmp: nil, detail:
                    "\(stateFilePath) holds \(info.st_size) bytes, over remusd's bound of \(maxStateBytes) bytes; the device state was not sent")
            }
            // One byte more than the file's size, to notice a file still growing.
            var state = [UInt8](repeating: 0, count: Int(info.st_size) + 1)
            var filled = 0
            while filled < state.count {
                let n = try syscall("read(\(stateFilePath))") {
                    state.withUnsafeMutableBytes { Glibc.read(file.raw, $0.baseAddress! + filled, $0.count - filled) }
                }
                if n == 0 { break }
                filled += n
            }
            guard filled <= Int(info.st_size) else {
                throw XenDeviceModelError(domid: domid, operation: operation, qmp: nil, detail: "\(stateFilePath) grew while it was read")
            }
            guard filled > 0 else {
                throw XenDeviceModelError(domid: domid, operation: operation, qmp: nil, detail: "QEMU reported success but \(stateFilePath) is empty")
            }
            state.removeLast(state.count - filled)
            return state
        } catch let error as SystemError {
            throw XenDeviceModelError(domid: domid, operation: operation, qmp: nil, detail: error.description)
        }
    }
}
