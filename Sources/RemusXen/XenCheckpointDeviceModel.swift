/// An HVM guest's device model as the checkpointed save drives it: log-dirty on and off, its
/// state per checkpoint, and its restart, each turned into an outcome the save can act on.
/// It remembers whether the device model is stopped, so that a failed or abandoned checkpoint
/// never leaves it so.
///
/// Used by one thread at a time: the save thread while libxenguest runs, then the shell that
/// ends the save (after the save thread has finished).
final class CheckpointDeviceModel {
    let model: any XenDeviceModel
    let domid: UInt32
    /// Whether `capture` stopped the device model and nothing has restarted it yet.
    private(set) var stopped = false

    init(_ model: any XenDeviceModel, domid: UInt32) {
        self.model = model
        self.domid = domid
    }

    /// libxenguest's `switch_qemu_logdirty`: QEMU marks the guest pages it writes (DMA) dirty
    /// from now on (or stops). Returns why it failed, nil on success.
    func setLogDirty(_ enabled: Bool) -> String? {
        do {
            try model.setLogDirty(enabled)
            return nil
        } catch {
            return "the device model (QEMU) of domain \(domid) could not turn its log-dirty mode \(enabled ? "on" : "off"): \(error)"
        }
    }

    /// The device model's records for the checkpoint being taken (the guest's vCPUs are
    /// suspended): it stops and saves its state. On failure it is restarted at once and the
    /// error says the checkpoint is abandoned; nothing of it enters the stream.
    func capture() -> Result<[UInt8], XenBackendError> {
        stopped = true
        let records: [UInt8]
        do {
            records = try model.captureRecords()
            try LibxlStream.checkEmulatorRecords(records)
        } catch {
            let restarted = resume() == nil
            return .failure(XenBackendError("the device model (QEMU) of domain \(domid) could not save its state for this checkpoint: \(error). The checkpoint is abandoned (the backup keeps the last committed one); the guest is resumed here\(restarted ? "" : ", but its device model did not restart (see the next error)"). remusd starts a new checkpointed save; if this repeats, look at QEMU's log (/var/log/xen/qemu-dm-*.log)"))
        }
        return .success(records)
    }

    /// Restarts a device model `capture` stopped (nothing to do otherwise). Returns why it
    /// failed, nil on success.
    func resume() -> String? {
        guard stopped else { return nil }
        do {
            try model.resume()
            stopped = false
            return nil
        } catch {
            return "the device model (QEMU) of domain \(domid) did not continue after the checkpoint: \(error); the guest's emulated devices stay stopped until it does (QMP 'cont' on /var/run/xen/qmp-libxl-\(domid))"
        }
    }
}
