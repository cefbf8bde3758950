// The deterministic generator of the golden streams in Tests/RemusCoreTests/Golden/. It ran once
// per released format version to produce the committed files; the files, not this code, are the
// reference: GoldenStreamTests decodes them against hand-written expectations. Regenerate only
// for a new version's files (REMUS_WRITE_GOLDEN=1 swift test --filter writeGoldenFiles), never
// to "fix" an existing one.
@testable import RemusCore

enum Golden {
    static let uuid = GuestUUID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)

    /// Page content of the golden streams: byte i of page `seed` is (i * 31 + seed * 17) mod 251.
    static func page(_ seed: Int) -> [UInt8] {
        (0..<4096).map { UInt8((($0 * 31) + seed * 17) % 251) }
    }

    /// Page 0 of checkpoint 1: page(0) with bytes 8...15 and 4000...4003 changed.
    static func page0Changed() -> [UInt8] {
        var p = page(0)
        for i in 8...15 { p[i] = 0xA5 }
        for i in 4000...4003 { p[i] = 0x5A }
        return p
    }

    /// Page 1 of checkpoint 2: page(11) with byte 2048 changed.
    static func page1Changed() -> [UInt8] {
        var p = page(11)
        p[2048] ^= 0xFF
        return p
    }

    static let clock1 = ClockState(guestMonotonicNs: 1_000_000_000, guestWallNs: 1_750_000_000_000_000_000, tscKHz: 2_100_000, hostMonotonicNs: 77_000_000_000, hostWallNs: 1_750_000_000_500_000_000)
    static let clock2 = ClockState(guestMonotonicNs: 1_100_000_000, guestWallNs: 1_750_000_000_100_000_000, tscKHz: 2_100_000, hostMonotonicNs: 77_100_000_000, hostWallNs: 1_750_000_000_600_000_000)
    static let layout1 = MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: 8), PFNRange(start: 16, count: 48)])
    static let layout2 = MemoryLayout(generation: 2, ranges: [PFNRange(start: 0, count: 8)])

    /// v1.0, primary → backup: config, a pre-copy round, checkpoint 1, final checkpoint 2, STREAM_END.
    static func primaryV1_0() -> [UInt8] {
        let header = StreamHeader(
            features: [.deltaPages], pageSize: 4096, backend: .simulated, role: .primary, guestUUID: uuid,
            guestName: "golden-guest", senderVersion: "remusd 1.0 golden")
        var out: [UInt8] = []
        try! StreamEncoder.appendHeader(header, into: &out)
        var e = StreamEncoder(pageSize: 4096, features: [.deltaPages])
        let receiver = PageStore()
        try! e.append(.domainConfig(DomainConfig(format: .simulated, bytes: Array("{\"vcpus\":2,\"pages\":64}".utf8))), into: &out)

        try! e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
        let precopy = makeArena([(0, .raw, page(0)), (1, .raw, page(1)), (2, .zero, nil), (3, .raw, [UInt8](repeating: 0, count: 4096))])
        e.appendPageBatch(precopy, entries: 0..<4, deltaBase: receiver.base, into: &out)
        try! e.endCheckpoint(into: &out)
        receiver.set(0, page(0))
        receiver.set(1, page(1))
        try! e.append(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 1_000_000)), into: &out)

        try! e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
        try! e.append(.clock(clock1), into: &out)
        try! e.append(.memoryLayout(layout1), into: &out)
        try! e.append(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: Array(0..<32))), into: &out)
        try! e.append(.vcpuState(VCPUState(vcpu: 1, format: 1, bytes: Array(32..<64))), into: &out)
        try! e.append(.deviceState(DeviceState(name: "nic0", bytes: [0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3])), into: &out)
        try! e.append(.heartbeat(Heartbeat(sequence: 2, senderMonotonicNs: 2_000_000)), into: &out)
        let one = makeArena([(0, .raw, page0Changed()), (1, .raw, page(11)), (5, .absent, nil), (6, .raw, page(6))])
        e.appendPageBatch(one, entries: 0..<4, deltaBase: receiver.base, into: &out)
        try! e.append(.opaquePayload(OpaquePayload(stream: .libxc, sequence: 0, bytes: Array("libxc-chunk-0".utf8))), into: &out)
        try! e.endCheckpoint(into: &out)
        receiver.set(0, page0Changed())
        receiver.set(1, page(11))

        try! e.append(.checkpointBegin(CheckpointBegin(epoch: 2, kind: .final)), into: &out)
        try! e.append(.clock(clock2), into: &out)
        try! e.append(.memoryLayout(layout2), into: &out)
        try! e.append(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: Array(64..<96))), into: &out)
        e.appendPageBatch(makeArena([(1, .raw, page1Changed())]), entries: 0..<1, deltaBase: receiver.base, into: &out)
        try! e.endCheckpoint(into: &out)
        try! e.append(.streamEnd(StreamEnd(reason: .switchover, lastEpoch: 2, message: "switchover to backup")), into: &out)
        return out
    }

    /// Disk contents of the disk golden stream: block `seed` of 512 bytes is (i * 7 + seed) mod 256.
    static func block(_ seed: Int, count: Int = 512) -> [UInt8] {
        (0..<count).map { UInt8(($0 * 7 + seed) % 256) }
    }

    /// v1.0 with the DISKS feature, primary → backup: config, two disk descriptors, a pre-copy
    /// round with the first disk's initial copy, checkpoint 1 with every disk operation (writes,
    /// flush, discard, write-zeroes) among memory records, STREAM_END.
    static func primaryV1_0Disks() -> [UInt8] {
        let header = StreamHeader(
            features: [.deltaPages, .disks], pageSize: 4096, backend: .simulated, role: .primary, guestUUID: uuid,
            guestName: "golden-guest", senderVersion: "remusd 1.0 golden")
        var out: [UInt8] = []
        try! StreamEncoder.appendHeader(header, into: &out)
        var e = StreamEncoder(pageSize: 4096, features: [.deltaPages, .disks])
        try! e.append(.domainConfig(DomainConfig(format: .simulated, bytes: Array("{\"vcpus\":1,\"pages\":8}".utf8))), into: &out)
        try! e.append(.diskDescriptor(DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 4096, name: "xvda")), into: &out)
        try! e.append(.diskDescriptor(DiskDescriptor(disk: 1, blockSize: 4096, sizeBytes: 1 << 20, name: "scratch")), into: &out)

        try! e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
        try! e.append(.diskWrite(DiskWrite(disk: 0, offset: 0, data: block(1, count: 4096))), into: &out)
        e.appendPageBatch(makeArena([(0, .raw, page(0))]), entries: 0..<1, into: &out)
        try! e.endCheckpoint(into: &out)

        try! e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
        try! e.append(.clock(clock1), into: &out)
        try! e.append(.memoryLayout(MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: 8)])), into: &out)
        try! e.append(.diskWrite(DiskWrite(disk: 0, offset: 1024, data: block(2))), into: &out)
        try! e.append(.diskCommand(DiskCommand(disk: 0, kind: .flush, offset: 0, length: 0)), into: &out)
        try! e.append(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: Array(0..<16))), into: &out)
        try! e.append(.diskCommand(DiskCommand(disk: 1, kind: .discard, offset: 8192, length: 16384)), into: &out)
        try! e.append(.diskCommand(DiskCommand(disk: 0, kind: .writeZeroes, offset: 3584, length: 512)), into: &out)
        try! e.append(.diskWrite(DiskWrite(disk: 1, offset: 1 << 19, data: block(3, count: 4096))), into: &out)
        try! e.endCheckpoint(into: &out)
        try! e.append(.streamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 1, message: "")), into: &out)
        return out
    }

    /// v1.0, backup → primary: heartbeat, two ACKs, STREAM_END.
    static func backupV1_0() -> [UInt8] {
        let header = StreamHeader(
            features: [.deltaPages], pageSize: 4096, backend: .simulated, role: .backup, guestUUID: uuid,
            guestName: "golden-guest", senderVersion: "remusd 1.0 golden")
        var out: [UInt8] = []
        try! StreamEncoder.appendHeader(header, into: &out)
        var e = StreamEncoder(pageSize: 4096, features: [.deltaPages])
        try! e.append(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 500)), into: &out)
        try! e.append(.ack(Ack(epoch: 1, backupMonotonicNs: 1_500)), into: &out)
        try! e.append(.ack(Ack(epoch: 2, backupMonotonicNs: 2_500)), into: &out)
        try! e.append(.streamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 2, message: "backup stopping")), into: &out)
        return out
    }

    /// A stream as a later 1.1 writer could send it: a header field this build does not know,
    /// trailing fields on BEGIN and CLOCK, and unknown optional records inside and outside a
    /// checkpoint. A 1.0 reader must read it.
    static func primaryFutureV1_1() -> [UInt8] {
        let header = StreamHeader(
            minor: 1, features: [], pageSize: 4096, backend: .xen, role: .primary, guestUUID: uuid,
            guestName: "future", senderVersion: "remusd 1.1 (synthetic)")
        var out: [UInt8] = []
        try! StreamEncoder.appendHeader(header, into: &out)
        // Insert an 8-byte extension field before the CRC, fix the length and the CRC.
        out.removeLast(4)
        out += Array("FUTURE!!".utf8)
        let length = UInt32(out.count + 4)
        out.withUnsafeMutableBytes { $0.baseAddress!.storeLE(length, at: 12) }
        let crc = out.withUnsafeBytes { CRC32C.extend(0, $0) }
        out.appendLE(crc)

        var e = StreamEncoder(pageSize: 4096, features: [])
        var digest = CheckpointDigest()
        func raw(_ type: UInt32, flags: UInt16, _ body: [UInt8], counted: Bool) {
            let start = out.count
            try! body.withUnsafeBytes { try e.appendRecord(typeCode: type, flags: flags, body: $0, into: &out) }
            if counted { digest.add(recordHeader(out, at: start)) }
        }
        raw(0x1000, flags: 0, Array("hello".utf8), counted: false)
        var begin: [UInt8] = []
        begin.appendLE(UInt64(1))
        begin.appendLE(CheckpointKind.checkpoint.rawValue)
        begin.appendLE(UInt16(0))
        begin.appendLE(UInt32(0))
        raw(RecordType.checkpointBegin.rawValue, flags: 1, begin + Array("trailing".utf8), counted: false)
        var clock: [UInt8] = []
        for v in [clock1.guestMonotonicNs, UInt64(bitPattern: clock1.guestWallNs), UInt64(clock1.tscKHz), clock1.hostMonotonicNs, UInt64(bitPattern: clock1.hostWallNs)] {
            clock.appendLE(v)
        }
        raw(RecordType.clock.rawValue, flags: 1, clock + [1, 2, 3, 4, 5, 6, 7, 8], counted: true)
        raw(0x1001, flags: 0, [7, 7, 7], counted: true)
        let layoutStart = out.count
        try! e.append(.memoryLayout(MemoryLayout(generation: 5, ranges: [PFNRange(start: 0, count: 4)])), into: &out)
        digest.add(recordHeader(out, at: layoutStart))
        try! e.append(.checkpointEnd(CheckpointEnd(epoch: 1, recordCount: UInt32(digest.recordCount), digest: digest.value, payloadBytes: digest.payloadBytes)), into: &out)
        try! e.append(.streamEnd(StreamEnd(reason: .shutdown, lastEpoch: 1, message: "")), into: &out)
        return out
    }

    static func recordHeader(_ bytes: [UInt8], at start: Int) -> RecordHeader {
        bytes.withUnsafeBytes {
            let p = UnsafeRawPointer($0.baseAddress!) + start
            return RecordHeader(typeCode: p.le(0), flags: p.le(4), bodyLength: p.le(8), crc: p.le(12))
        }
    }

    /// File name → generator, for every golden file.
    static let files: [(name: String, make: @Sendable () -> [UInt8])] = [
        ("v1.0-primary.rstream", primaryV1_0),
        ("v1.0-backup.rstream", backupV1_0),
        ("v1.1-primary-future-minor.rstream", primaryFutureV1_1),
        ("v1.0-primary-disks.rstream", primaryV1_0Disks),
    ]
}
