import CXen
import RemusCore
@testable import RemusXen
import Testing

// The decisions the Xen primary makes about a guest before and during its checkpointed save,
// each a pure function checked here without Xen: the guest's kind, whether the hypervisor can
// checkpoint it, how it is suspended, and how a checkpoint's records are ordered.

extension RemusXenTests {
@Suite("Xen guest kinds, refusals and suspend methods")
struct XenGuestKindTests {
    // MARK: - kind

    @Test("The kind comes from Xen's HVM flag and libxl's type: PV, PVH, HVM")
    func kindFromFlagsAndConfig() throws {
        func kind(_ hvm: Bool, _ type: libxl_domain_type, _ dm: libxl_device_model_version = LIBXL_DEVICE_MODEL_VERSION_QEMU_XEN) throws -> XenGuestKind {
            try XenGuestKind.classify(domain: "g", hvmContainer: hvm, configType: type, deviceModel: dm)
        }
        #expect(try kind(false, LIBXL_DOMAIN_TYPE_PV) == .pv)
        #expect(try kind(true, LIBXL_DOMAIN_TYPE_PVH) == .pvh)
        // libxl fills in a device model version for PVH too; the type decides.
        #expect(try kind(true, LIBXL_DOMAIN_TYPE_PVH, LIBXL_DEVICE_MODEL_VERSION_QEMU_XEN_TRADITIONAL) == .pvh)
        #expect(try kind(true, LIBXL_DOMAIN_TYPE_HVM) == .hvm)
        #expect(try kind(true, LIBXL_DOMAIN_TYPE_HVM, LIBXL_DEVICE_MODEL_VERSION_UNKNOWN) == .hvm)
        // The hypervisor's flag is the truth about PV.
        #expect(try kind(false, LIBXL_DOMAIN_TYPE_HVM) == .pv)
        #expect(XenGuestKind.pvh.description == "PVH")
    }

    @Test("An HVM container libxl calls PV, and HVM on qemu-traditional, are refused with what to do")
    func kindRefusals() {
        do {
            _ = try XenGuestKind.classify(domain: "g", hvmContainer: true, configType: LIBXL_DOMAIN_TYPE_PV, deviceModel: LIBXL_DEVICE_MODEL_VERSION_QEMU_XEN)
            Issue.record("an HVM container with a PV configuration was accepted")
        } catch {
            #expect(error.description.contains("HVM container"))
            #expect(error.description.contains("type 'pv'"))
            #expect(error.description.contains("Nothing was changed"))
        }
        do {
            _ = try XenGuestKind.classify(domain: "g", hvmContainer: true, configType: LIBXL_DOMAIN_TYPE_HVM, deviceModel: LIBXL_DEVICE_MODEL_VERSION_QEMU_XEN_TRADITIONAL)
            Issue.record("qemu-traditional was accepted")
        } catch {
            #expect(error.description.contains("qemu-xen-traditional"))
            #expect(error.description.contains("device_model_version = \"qemu-xen\""))
            #expect(error.description.contains("Nothing was changed"))
        }
    }

    @Test("The guest is reported by name, kind and memory")
    func summaryLine() {
        let guest = GuestDescriptor(name: "guest", uuid: GuestUUID(high: 1, low: 2), backend: .xen, pageSize: 4096, pageCount: 32768)
        #expect(XenPrimaryGuest.summary(of: guest, kind: .pvh) == "'guest' (PVH, 128 MiB)")
        let big = GuestDescriptor(name: "db", uuid: GuestUUID(high: 1, low: 2), backend: .xen, pageSize: 4096, pageCount: 1 << 20)
        #expect(XenPrimaryGuest.summary(of: big, kind: .hvm) == "'db' (HVM, 4096 MiB)")
    }

    // MARK: - paging

    @Test("Physinfo's capability bits are read as shadow and HAP")
    func pagingFromCapabilities() {
        let shadow = UInt32(XEN_SYSCTL_PHYSCAP_shadow), hap = UInt32(XEN_SYSCTL_PHYSCAP_hap)
        let hvmPv = UInt32(XEN_SYSCTL_PHYSCAP_hvm | XEN_SYSCTL_PHYSCAP_pv)
        #expect(XenPagingSupport(capabilities: hvmPv | hap) == XenPagingSupport(shadow: false, hap: true))
        #expect(XenPagingSupport(capabilities: hvmPv | shadow) == XenPagingSupport(shadow: true, hap: false))
        #expect(XenPagingSupport(capabilities: hvmPv | shadow | hap) == XenPagingSupport(shadow: true, hap: true))
    }

    @Test("A PV guest without shadow paging is refused: why, Xen's words, what stayed safe, PVH/HVM when HAP is there")
    func pvRefusedWithoutShadow() throws {
        let version = XenVersion(major: 4, minor: 17, extra: ".7")
        let noShadowHap = XenPagingSupport(shadow: false, hap: true)
        let refusal = try #require(noShadowHap.refusal(kind: .pv, domain: "web", version: version))
        let text = refusal.description
        #expect(text.contains("domain 'web' is a PV guest"))
        #expect(text.contains("shadow paging for log-dirty"), "what: \(text)")
        #expect(text.contains("Xen 4.17.7"), "names the hypervisor: \(text)")
        #expect(text.contains("XSA-495"))
        #expect(text.contains("\"Failed to enable logdirty: 95\""), "Xen's own words: \(text)")
        #expect(text.contains("Nothing was changed: the guest runs on unprotected"), "what stayed safe: \(text)")
        #expect(text.contains("type = \"pvh\""), "what to do: \(text)")
        #expect(text.contains("which this host has"), "PVH/HVM offered only with HAP: \(text)")

        // Without HAP either, PVH/HVM are not offered as working here.
        let neither = try #require(XenPagingSupport(shadow: false, hap: false).refusal(kind: .pv, domain: "web", version: version))
        #expect(!neither.description.contains("which this host has"))
        #expect(neither.description.contains("does not offer either"))
        #expect(neither.description.contains("Nothing was changed"))
    }

    @Test("Where the hypervisor has what a kind needs, nothing is refused")
    func acceptedWherePagingFits() {
        let v = XenVersion(major: 4, minor: 20, extra: ".4")
        #expect(XenPagingSupport(shadow: true, hap: false).refusal(kind: .pv, domain: "g", version: v) == nil)
        #expect(XenPagingSupport(shadow: false, hap: true).refusal(kind: .pvh, domain: "g", version: v) == nil)
        #expect(XenPagingSupport(shadow: false, hap: true).refusal(kind: .hvm, domain: "g", version: v) == nil)
        #expect(XenPagingSupport(shadow: true, hap: false).refusal(kind: .hvm, domain: "g", version: v) == nil, "HVM falls back to shadow paging")
        let refusal = XenPagingSupport(shadow: false, hap: false).refusal(kind: .pvh, domain: "g", version: v)
        #expect(refusal?.description.contains("offers neither") == true)
        #expect(refusal?.description.contains("+svm,+npt") == true)
    }

    // MARK: - suspend method

    @Test("The suspend event channel is used whenever the guest offers one, for PV, PVH and HVM")
    func eventChannelFirst() throws {
        for kind in [XenGuestKind.pv, .pvh, .hvm] {
            #expect(try SuspendMethod.choose(domid: 3, kind: kind, evtchnPort: 5, callbackIRQ: 0, acpiSState: 0) == .eventChannel(guestPort: 5))
        }
        #expect(SuspendMethod.eventChannel(guestPort: 5).description == "event channel 5")
    }

    @Test("Without an event channel: xenstore, except HVM without PV drivers, which Xen suspends")
    func fallbacks() throws {
        #expect(try SuspendMethod.choose(domid: 3, kind: .pv, evtchnPort: nil, callbackIRQ: 0, acpiSState: 0) == .xenstore)
        #expect(try SuspendMethod.choose(domid: 3, kind: .pvh, evtchnPort: nil, callbackIRQ: 0, acpiSState: 0) == .xenstore)
        #expect(try SuspendMethod.choose(domid: 3, kind: .hvm, evtchnPort: nil, callbackIRQ: 0, acpiSState: 0) == .shutdownHypercall)
        #expect(try SuspendMethod.choose(domid: 3, kind: .hvm, evtchnPort: nil, callbackIRQ: 0x0200_0000_0000_00f3, acpiSState: 0) == .xenstore)
        #expect(SuspendMethod.xenstore.description == "xenstore control/shutdown")
        #expect(SuspendMethod.shutdownHypercall.description == "xc_domain_shutdown (no PV drivers)")
    }

    @Test("An HVM container suspended cooperatively without HVM_PARAM_CALLBACK_IRQ is marked cancelled by remusd; libxc does it otherwise")
    func cancellationMark() {
        let cooperative: [SuspendMethod] = [.xenstore, .eventChannel(guestPort: 5)]
        for method in cooperative {
            // A PVH (or HVM) guest on per-vCPU upcall vectors that left the parameter 0: libxc
            // would resume it with RAX 0, a completed suspend.
            #expect(SuspendMethod.mustMarkCancelled(kind: .pvh, method: method, callbackIRQ: 0))
            #expect(SuspendMethod.mustMarkCancelled(kind: .hvm, method: method, callbackIRQ: 0))
            // libxc's modify_returncode sets RAX itself: PV always, HVM containers with a callback.
            #expect(!SuspendMethod.mustMarkCancelled(kind: .pv, method: method, callbackIRQ: 0))
            #expect(!SuspendMethod.mustMarkCancelled(kind: .pvh, method: method, callbackIRQ: 1))
            #expect(!SuspendMethod.mustMarkCancelled(kind: .hvm, method: method, callbackIRQ: 0x0200_0000_0000_00f3))
        }
        // Stopped by Xen, not in a hypercall: its RAX is the guest's own and stays untouched.
        #expect(!SuspendMethod.mustMarkCancelled(kind: .hvm, method: .shutdownHypercall, callbackIRQ: 0))
        #expect(!SuspendMethod.mustMarkCancelled(kind: .pvh, method: .shutdownHypercall, callbackIRQ: 0))
    }

    @Test("A guest in ACPI sleep is not checkpointed, and the message says how to wake it")
    func acpiSleepRefused() throws {
        for kind in [XenGuestKind.pvh, .hvm] {
            do {
                _ = try SuspendMethod.choose(domid: 7, kind: kind, evtchnPort: 5, callbackIRQ: 1, acpiSState: 3)
                Issue.record("a sleeping \(kind) guest was suspended")
            } catch {
                #expect(error.description.contains("domain 7 is asleep (ACPI S3)"))
                #expect(error.description.contains("abandoned"))
                #expect(error.description.contains("xl trigger 7 power"))
            }
        }
        // PV guests have no ACPI state; the parameter is not theirs.
        #expect(try SuspendMethod.choose(domid: 7, kind: .pv, evtchnPort: nil, callbackIRQ: 0, acpiSState: 3) == .xenstore)
    }

    @Test("The event channel key's value is read as a positive port, anything else as none")
    func eventChannelKey() {
        #expect(SuspendMethod.guestPort(xenstoreValue: "5") == 5)
        #expect(SuspendMethod.guestPort(xenstoreValue: " 12\n") == 12)
        #expect(SuspendMethod.guestPort(xenstoreValue: nil) == nil)
        #expect(SuspendMethod.guestPort(xenstoreValue: "") == nil)
        #expect(SuspendMethod.guestPort(xenstoreValue: "0") == nil)
        #expect(SuspendMethod.guestPort(xenstoreValue: "-1") == nil)
        #expect(SuspendMethod.guestPort(xenstoreValue: "5x") == nil)
    }

    // MARK: - records of a checkpoint

    @Test("An HVM checkpoint ends as libxl's does: libxc records, CHECKPOINT, emulator records, CHECKPOINT_END")
    func emulatorRecordsBeforeCheckpointEnd() throws {
        var libxc: [UInt8] = []
        libxc += record(type: 0x01, body: [UInt8](repeating: 0xAB, count: 13))  // PAGE_DATA
        libxc += record(type: 0x0e, body: [])  // CHECKPOINT
        let emulator = record(type: 2, body: le32(0) + le32(0) + Array("physmap\0x\0".utf8))
            + record(type: 3, body: le32(0) + le32(0) + [UInt8](repeating: 0x5A, count: 21))
        try LibxlStream.checkEmulatorRecords(emulator)

        var checkpoint = libxc
        LibxlStream.endCheckpoint(&checkpoint, emulatorRecords: emulator)
        #expect(Array(checkpoint[..<libxc.count]) == libxc, "libxenguest's bytes come first, untouched")
        #expect(try recordTypes(Array(checkpoint[libxc.count...])) == [2, 3, 4])
        #expect(Array(checkpoint.suffix(8)) == LibxlStream.checkpointEnd)

        // PV and PVH: CHECKPOINT_END right after libxenguest's CHECKPOINT.
        var plain = libxc
        LibxlStream.endCheckpoint(&plain, emulatorRecords: [])
        #expect(plain == libxc + LibxlStream.checkpointEnd)
    }

    @Test("Device model bytes that are not one optional XENSTORE_DATA then one CONTEXT never enter the stream")
    func malformedEmulatorRecords() {
        let context = record(type: 3, body: le32(0) + le32(0) + [1, 2, 3])
        let xenstore = record(type: 2, body: le32(0) + le32(0) + [0])
        #expect(throws: Never.self) { try LibxlStream.checkEmulatorRecords(context) }
        let bad: [(String, [UInt8])] = [
            ("nothing", []),
            ("no context", xenstore),
            ("context first", context + xenstore),
            ("two contexts", context + context),
            ("another type", record(type: 4, body: []) + context),
            ("truncated", Array(context.dropLast(8))),
            ("half a header", context + [3, 0, 0]),
            ("body shorter than id and index", record(type: 3, body: [1, 2, 3, 4])),
        ]
        for (what, bytes) in bad {
            #expect(throws: LibxcStreamError.self, "\(what)") { try LibxlStream.checkEmulatorRecords(bytes) }
        }
    }

    // MARK: - the device model around a checkpoint

    @Test("A device model that fails to save is restarted, and the error says the checkpoint is abandoned and the guest resumed")
    func deviceModelFailureRestartsIt() throws {
        let fake = FakeDeviceModel()
        fake.captureFailure = FakeDeviceModel.Failure(text: "QMP xen-save-devices-state: timed out after 30 s")
        let model = CheckpointDeviceModel(fake, domid: 9)
        guard case .failure(let error) = model.capture() else {
            Issue.record("a failed save produced records")
            return
        }
        #expect(fake.calls == ["capture", "resume"])
        #expect(!model.stopped)
        #expect(error.description.contains("domain 9 could not save its state"))
        #expect(error.description.contains("timed out after 30 s"), "keeps the cause: \(error)")
        #expect(error.description.contains("abandoned (the backup keeps the last committed one)"))
        #expect(error.description.contains("the guest is resumed here"))
    }

    @Test("Malformed device model records count as a failed save; a restart that fails is said so")
    func deviceModelBadRecordsAndFailedRestart() throws {
        let fake = FakeDeviceModel()
        fake.records = [9, 9, 9]
        fake.resumeFailure = FakeDeviceModel.Failure(text: "QMP cont: connection reset")
        let model = CheckpointDeviceModel(fake, domid: 9)
        guard case .failure(let error) = model.capture() else {
            Issue.record("malformed records were accepted")
            return
        }
        #expect(error.description.contains("too short"), "\(error)")
        #expect(error.description.contains("did not restart"))
        #expect(model.stopped, "still stopped: ending the save tries again")
        fake.resumeFailure = nil
        #expect(model.resume() == nil)
        #expect(!model.stopped)
        #expect(fake.calls == ["capture", "resume", "resume"])
    }

    @Test("A checkpoint's device model: save, then restart once; log-dirty failures are reported")
    func deviceModelHappyPath() throws {
        let fake = FakeDeviceModel()
        fake.records = record(type: 3, body: le32(0) + le32(0) + [7])
        let model = CheckpointDeviceModel(fake, domid: 4)
        #expect(model.resume() == nil, "nothing to restart before a save")
        #expect(fake.calls.isEmpty)
        #expect(model.setLogDirty(true) == nil)
        guard case .success(let records) = model.capture() else {
            Issue.record("the save failed")
            return
        }
        #expect(records == fake.records)
        #expect(model.stopped)
        #expect(model.resume() == nil)
        #expect(model.resume() == nil)
        #expect(fake.calls == ["logdirty on", "capture", "resume"])
        fake.logDirtyFailure = FakeDeviceModel.Failure(text: "no such command")
        let failure = try #require(model.setLogDirty(false))
        #expect(failure.contains("could not turn its log-dirty mode off: no such command"))
    }

    // MARK: - helpers

    private func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// A record of either level's framing: type, length, body, zeros to 8 bytes.
    private func record(type: UInt32, body: [UInt8]) -> [UInt8] {
        le32(type) + le32(UInt32(body.count)) + body + [UInt8](repeating: 0, count: (8 - body.count % 8) % 8)
    }

    /// The types of the libxl records in `bytes`, which must be whole records.
    private func recordTypes(_ bytes: [UInt8]) throws -> [UInt32] {
        var at = 0
        var types: [UInt32] = []
        while at < bytes.count {
            try #require(bytes.count - at >= 8)
            let type = bytes[at..<(at + 4)].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let length = Int(bytes[(at + 4)..<(at + 8)].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            types.append(type)
            at += 8 + ((length + 7) & ~7)
        }
        #expect(at == bytes.count)
        return types
    }
}
}

/// A device model that does what a test tells it, and remembers what it was asked.
final class FakeDeviceModel: XenDeviceModel, @unchecked Sendable {  // used by one test thread
    struct Failure: Error, CustomStringConvertible { let text: String; var description: String { text } }
    var records: [UInt8] = []
    var captureFailure: Failure?
    var resumeFailure: Failure?
    var logDirtyFailure: Failure?
    private(set) var calls: [String] = []

    func setLogDirty(_ enabled: Bool) throws {
        if let logDirtyFailure { throw logDirtyFailure }
        calls.append("logdirty \(enabled ? "on" : "off")")
    }

    func captureRecords() throws -> [UInt8] {
        calls.append("capture")
        if let captureFailure { throw captureFailure }
        return records
    }

    func resume() throws {
        calls.append("resume")
        if let resumeFailure { throw resumeFailure }
    }
}
