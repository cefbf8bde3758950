import Glibc
@testable import RemusXen
import RemusSystem
import Synchronization
import Testing

// libxl's emulator records checked against bytes written out by hand from
// docs/specs/libxl-migration-stream.pandoc, and the device model driven end to end against a
// fake monitor and a fake xenstore.

@Suite("libxl emulator records")
struct EmulatorRecordTests {
    @Test("EMULATOR_CONTEXT: header, QEMU-upstream sub-header, the state, zeros up to 8 bytes")
    func contextRecordBytes() {
        #expect(LibxlStream.emulatorContext([0xaa, 0xbb, 0xcc]) == [
            3, 0, 0, 0, 11, 0, 0, 0,   // type 3, length = 8 (sub-header) + 3
            2, 0, 0, 0, 0, 0, 0, 0,    // emulator_id QEMU_UPSTREAM, index 0
            0xaa, 0xbb, 0xcc, 0, 0, 0, 0, 0,
        ])
    }

    @Test("a body that already ends on 8 bytes gets no padding; an empty state still has its sub-header")
    func padding() {
        let eight = LibxlStream.emulatorContext([1, 2, 3, 4, 5, 6, 7, 8])
        #expect(eight.count == 8 + 8 + 8)
        #expect(Array(eight[4..<8]) == [16, 0, 0, 0])
        #expect(Array(eight[16...]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(LibxlStream.emulatorContext([]) == [3, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
        for n in 0..<20 {
            let record = LibxlStream.emulatorContext(ArraySlice(repeating: 0x55, count: n))
            #expect(record.count % 8 == 0)
            #expect(record.count == 16 + (n + 7) / 8 * 8)
        }
    }

    @Test("EMULATOR_XENSTORE_DATA: NUL-terminated keys and values after the sub-header")
    func xenstoreRecordBytes() {
        let record = LibxlStream.emulatorXenStoreData([.init(key: "a", value: "bc")])
        #expect(record == [
            2, 0, 0, 0, 13, 0, 0, 0,   // type 2, length = 8 + 5
            2, 0, 0, 0, 0, 0, 0, 0,
            0x61, 0, 0x62, 0x63, 0, 0, 0, 0,
        ])
        // A value is cut at a NUL, as libxl's strlen would.
        #expect(LibxlStream.emulatorXenStoreData([.init(key: "k", value: "v\u{0}w")]) ==
            LibxlStream.emulatorXenStoreData([.init(key: "k", value: "v")]))
    }

    @Test("no keys, no record")
    func noKeysNoRecord() {
        #expect(LibxlStream.emulatorXenStoreData([]) == [])
    }

    @Test("the keys are each physmap entry's start_addr, size and name, in the listing's order")
    func keySelection() throws {
        let store = [
            "physmap/f0000000/start_addr": "f0000000", "physmap/f0000000/size": "800000", "physmap/f0000000/name": "vga.vram",
            "physmap/fc000000/start_addr": "fc000000", "physmap/fc000000/size": "10000", "physmap/fc000000/name": "rom",
            "physmap/fc000000/other": "ignored", "state": "running",
        ]
        let pairs = try LibxlStream.emulatorXenStorePairs(physmapEntries: ["fc000000", "f0000000"]) { store[$0] }
        #expect(pairs.map(\.key) == [
            "physmap/fc000000/start_addr", "physmap/fc000000/size", "physmap/fc000000/name",
            "physmap/f0000000/start_addr", "physmap/f0000000/size", "physmap/f0000000/name",
        ])
        #expect(pairs.map(\.value) == ["fc000000", "10000", "rom", "f0000000", "800000", "vga.vram"])
        #expect(try LibxlStream.emulatorXenStorePairs(physmapEntries: []) { store[$0] } == [])
    }

    @Test("a physmap entry missing one of its keys fails, naming the key")
    func missingKeyFails() {
        do {
            _ = try LibxlStream.emulatorXenStorePairs(physmapEntries: ["f0000000"]) { $0.hasSuffix("/size") ? nil : "x" }
            Issue.record("a missing size was accepted")
        } catch {
            #expect(error.description.contains("physmap/f0000000/size"))
        }
    }
}

/// A xenstore of a few keys.
private final class FakeStore: DeviceModelStore {
    let keys: [String: String]
    init(_ keys: [String: String]) { self.keys = keys }

    func read(_ path: String) -> String? { keys[path] }

    func directory(_ path: String) -> [String]? {
        let prefix = path + "/"
        let children = keys.keys.filter { $0.hasPrefix(prefix) }.map { String($0.dropFirst(prefix.count).prefix(while: { $0 != "/" })) }
        return children.isEmpty ? nil : Array(Set(children)).sorted()
    }
}

/// What a fake monitor does with `xen-save-devices-state`: writes `state` to the file named,
/// after checking remusd made it 0600, then answers.
private func saveDevices(_ peer: FakeQMPPeer, state: [UInt8]) throws {
    let request = try peer.receive()
    guard let filename = request.flatMap({ QMPValue.parse(Array($0.utf8)) })?["arguments"]?["filename"]?.stringValue else {
        try peer.send(#"{"error": {"class": "GenericError", "desc": "no filename"}}"# + "\r\n")
        return
    }
    var info = stat()
    guard lstat(filename, &info) == 0, info.st_mode & 0o777 == 0o600, info.st_size == 0 else {
        try peer.send(#"{"error": {"class": "GenericError", "desc": "state file not prepared"}, "id": \#(peer.id(of: request))}"# + "\r\n")
        return
    }
    try writeFile(filename, state)
    try peer.send(#"{"return": {}, "id": \#(peer.id(of: request))}"# + "\r\n")
}

@Suite("HVM device model over QMP")
struct QMPDeviceModelTests {
    static let domid: UInt32 = 7
    static let root = "/local/domain/0/device-model/7"

    private func model(_ path: String, store: [String: String] = [:], maxStateBytes: Int = 1 << 20) -> QMPDeviceModel {
        QMPDeviceModel(domid: Self.domid, socketPath: path, stateFilePath: String(path[..<path.lastIndex(of: "/")!]) + "/qemu-save.7",
                       deadlineNs: 5_000_000_000, store: FakeStore(store), maxStateBytes: maxStateBytes)
    }

    @Test("log-dirty, capture and resume send what libxl sends, one connection each")
    func commandsAsLibxlSendsThem() throws {
        let state: [UInt8] = Array("QEVM device state".utf8)
        let server = try withFakeMonitor(connections: 3, { peer in
            try peer.handshake()
            switch try peer.receive() {
            case let request? where request.contains("\"stop\""):
                try peer.send(#"{"return": {}, "id": \#(peer.id(of: request))}"# + "\r\n")
                try saveDevices(peer, state: state)
            case let request:
                try peer.send(#"{"return": {}, "id": \#(peer.id(of: request))}"# + "\r\n")
            }
            peer.waitForHangUp()
        }) { path in
            let model = model(path, store: [
                Self.root + "/physmap/f0000000/start_addr": "f0000000",
                Self.root + "/physmap/f0000000/size": "800000",
                Self.root + "/physmap/f0000000/name": "vga.vram",
            ])
            try model.setLogDirty(true)
            let records = try model.captureRecords()
            #expect(records == LibxlStream.emulatorXenStoreData([
                .init(key: "physmap/f0000000/start_addr", value: "f0000000"),
                .init(key: "physmap/f0000000/size", value: "800000"),
                .init(key: "physmap/f0000000/name", value: "vga.vram"),
            ]) + LibxlStream.emulatorContext(state[...]))
            #expect(access(model.stateFilePath, F_OK) != 0, "the state file is removed once read")
            try model.resume()
        }
        #expect(server.scriptError == nil)
        let commands = server.requests.filter { !$0.contains("qmp_capabilities") }
        #expect(commands.count == 4)
        #expect(commands.first == #"{"arguments":{"enable":true},"execute":"xen-set-global-dirty-log","id":2}"#)
        #expect(commands.dropFirst().first == #"{"execute":"stop","id":2}"#)
        #expect(commands.dropFirst(2).first?.hasPrefix(#"{"arguments":{"filename":""#) == true)
        #expect(commands.dropFirst(2).first?.hasSuffix(#"/qemu-save.7","live":false},"execute":"xen-save-devices-state","id":3}"#) == true)
        #expect(commands.last == #"{"execute":"cont","id":2}"#)
    }

    @Test("without physmap keys the capture is EMULATOR_CONTEXT alone")
    func contextAloneWithoutKeys() throws {
        let state: [UInt8] = [1, 2, 3, 4, 5]
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.answer()
            try saveDevices(peer, state: state)
            peer.waitForHangUp()
        }) { path in
            let records = try model(path).captureRecords()
            #expect(records == LibxlStream.emulatorContext(state[...]))
        }
    }

    @Test("a device state over the bound is refused with the bound in the message")
    func oversizedStateIsRefused() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            try peer.answer()
            try saveDevices(peer, state: [UInt8](repeating: 7, count: 2000))
            peer.waitForHangUp()
        }) { path in
            do {
                _ = try model(path, maxStateBytes: 1000).captureRecords()
                Issue.record("a 2000-byte state passed a 1000-byte bound")
            } catch {
                #expect("\(error)".contains("2000 bytes, over remusd's bound of 1000 bytes"))
            }
        }
    }

    @Test("QEMU refusing to stop comes back with domain, operation and QEMU's words")
    func qemuRefusalIsReported() throws {
        try withFakeMonitor({ peer in
            try peer.handshake()
            let request = try peer.receive()
            try peer.send(#"{"error": {"class": "GenericError", "desc": "no way"}, "id": \#(peer.id(of: request))}"# + "\r\n")
            peer.waitForHangUp()
        }) { path in
            do {
                _ = try model(path).captureRecords()
                Issue.record("a refused stop was accepted")
            } catch let error as XenDeviceModelError {
                #expect(error.qmp?.kind == .qemu(class: "GenericError", desc: "no way"))
                #expect(error.qmp?.command == "stop")
                #expect(error.description.contains("domain 7"))
                #expect(error.description.contains("saving its device state"))
            }
        }
    }

    @Test("no monitor: the probe fails at once with the socket path")
    func probeWithoutMonitor() {
        let model = QMPDeviceModel(domid: 7, socketPath: "/tmp/remusxen-no-such-dir/qmp-libxl-7", stateFilePath: "/tmp/remusxen-no-such-dir/s",
                                   deadlineNs: 1_000_000_000, store: FakeStore([:]))
        do {
            _ = try model.probe()
            Issue.record("probe succeeded without a monitor")
        } catch let error as XenDeviceModelError {
            #expect(error.qmp?.kind == .cannotConnect(.noSuchFileOrDirectory))
            #expect(error.description.contains("/tmp/remusxen-no-such-dir/qmp-libxl-7"))
        } catch {
            Issue.record("unexpected \(error)")
        }
    }
}
