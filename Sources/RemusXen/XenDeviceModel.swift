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
///
/// Refuses, before anything changes, a device model remusd cannot drive: QEMU in a stub domain,
/// qemu-xen-traditional, or a monitor that does not answer.
func openDeviceModel(domid: UInt32, log: XenLog, deadlineNs: UInt64) throws -> any XenDeviceModel {
    let store = try XenStoreDeviceModelStore(log: log)
    if let stubdom = store.read("/local/domain/\(domid)/image/device-model-domid"), stubdom != "0" {
        throw XenBackendError("domain \(domid)'s device model runs in stub domain \(stubdom), which remusd cannot checkpoint; nothing was changed. Protect an HVM guest whose QEMU runs in dom0 (no device_model_stubdomain_override)")
    }
    if let version = store.read("/libxl/\(domid)/dm-version"), version != "qemu_xen" {
        throw XenBackendError("domain \(domid)'s device model is \(version); remusd drives upstream QEMU (qemu_xen) only; nothing was changed")
    }
    let model = QMPDeviceModel(
        domid: domid, socketPath: QMPDeviceModel.socketPath(domid: domid),
        stateFilePath: QMPDeviceModel.stateFilePath(domid: domid), deadlineNs: deadlineNs, store: store)
    _ = try model.probe()
    return model
}
