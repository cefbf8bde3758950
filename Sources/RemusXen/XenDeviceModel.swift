/// What a checkpointed save needs from an HVM guest's device model (QEMU, driven over QMP), as
/// libxl would do it around each checkpoint. PV and PVH guests have none.
///
/// The save calls, on its own thread:
/// - `setLogDirty(true)` when libxenguest starts the save (its `switch_qemu_logdirty`
///   callback), `setLogDirty(false)` when it ends: QEMU then marks the guest pages it writes
///   (DMA) dirty, so they travel with the next checkpoint;
/// - `captureRecords()` once per checkpoint, after the guest's vCPUs are suspended: the device
///   model stops, saves its state, and the result comes back as libxl's own emulator records
///   (EMULATOR_XENSTORE_DATA when there are keys, then EMULATOR_CONTEXT), which go into the
///   stream just before CHECKPOINT_END, so the backup's libxl restore starts QEMU from the
///   committed checkpoint's device state;
/// - `resume()` after the guest's vCPUs have resumed.
/// Every call ends by itself: each has the deadline the device model was opened with.
protocol XenDeviceModel: AnyObject, Sendable {
    func setLogDirty(_ enabled: Bool) throws
    func captureRecords() throws -> [UInt8]
    func resume() throws
}

/// Opens the device model of HVM domain `domid` (libxl's QMP socket,
/// `/var/run/xen/qmp-libxl-<domid>`); every call it makes ends within `deadlineNs`.
func openDeviceModel(domid: UInt32, log: XenLog, deadlineNs: UInt64) throws -> any XenDeviceModel {
    // Interface first, so the save path and the QMP client can be written side by side; the
    // QMP client replaces this body.
    throw XenBackendError("domain \(domid) has a QEMU device model, which this build cannot drive yet; nothing was changed")
}
