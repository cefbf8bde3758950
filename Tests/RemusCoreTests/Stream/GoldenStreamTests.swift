import Foundation
import Testing
@testable import RemusCore

/// Bytes of a committed golden file.
private func golden(_ name: String) throws -> [UInt8] {
    let url = try #require(Bundle.module.url(forResource: name, withExtension: nil, subdirectory: "Golden"), "golden file \(name) is bundled")
    return [UInt8](try Data(contentsOf: url))
}

/// Expected decoded content, written out by hand from the format description (not from the generator).
private enum Expect: Equatable {
    case record(StreamRecord)
    /// Pages: PFN, encoding, and for raw/delta the page content after applying (delta: to `base`).
    case pages([(PFN, PageEncoding, [UInt8]?)])
    case skipped

    static func == (a: Expect, b: Expect) -> Bool {
        switch (a, b) {
        case (.record(let x), .record(let y)): return x == y
        case (.skipped, .skipped): return true
        case (.pages(let x), .pages(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 && $0.2 == $1.2 }
        default: return false
        }
    }
}

/// Decodes a golden stream, applying deltas against `receiver` the way a backup would.
private func decodeGolden(_ bytes: [UInt8], receiver: PageStore) throws -> (StreamHeader?, [Expect], skipped: Int) {
    var decoder = StreamDecoder()
    var header: StreamHeader?
    var items: [Expect] = []
    var staged: [(PFN, [UInt8])] = []
    try bytes.withUnsafeBytes { raw in
        try decoder.feed(raw) { item in
            switch item {
            case .header(let h): header = h
            case .record(let r):
                switch r.content {
                case .pageBatch(let batch):
                    var pages: [(PFN, PageEncoding, [UInt8]?)] = []
                    for page in batch {
                        switch page.encoding {
                        case .raw:
                            pages.append((page.pfn, .raw, Array(page.data)))
                            staged.append((page.pfn, Array(page.data)))
                        case .delta:
                            var content = try #require(receiver.bytes(page.pfn), "delta base for PFN \(page.pfn)")
                            try content.withUnsafeMutableBytes { try PageDelta.apply(page.data, to: $0) }
                            pages.append((page.pfn, .delta, content))
                            staged.append((page.pfn, content))
                        case .zero, .absent:
                            #expect(page.data.isEmpty)
                            pages.append((page.pfn, page.encoding, nil))
                        }
                    }
                    items.append(.pages(pages))
                case .checkpointEnd:
                    // Commit: staged pages become the receiver's copies (the delta bases).
                    for (pfn, content) in staged { receiver.set(pfn, content) }
                    staged = []
                    items.append(.record(r.content.ownedRecord!))
                case .skippedOptional: items.append(.skipped)
                default: items.append(.record(r.content.ownedRecord!))
                }
            }
        }
    }
    try decoder.finish()
    return (header, items, decoder.skippedOptionalRecords)
}

private func validates(_ bytes: [UInt8], _ direction: CheckpointValidator.Direction) -> Bool {
    validate(bytes, direction: direction).error == nil
}

@Suite("Golden v1 streams")
struct GoldenStreamTests {
    @Test func goldenV1_0PrimaryStreamDecodesToItsExactContent() throws {
        let bytes = try golden("v1.0-primary.rstream")
        let (header, items, skipped) = try decodeGolden(bytes, receiver: PageStore())
        #expect(header == StreamHeader(
            major: 1, minor: 0, features: [.deltaPages], pageSize: 4096, backend: .simulated, role: .primary,
            guestUUID: GuestUUID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210),
            guestName: "golden-guest", senderVersion: "remusd 1.0 golden"))
        #expect(skipped == 0)
        func page(_ seed: Int) -> [UInt8] { (0..<4096).map { UInt8((($0 * 31) + seed * 17) % 251) } }
        var changed0 = page(0)
        for i in 8...15 { changed0[i] = 0xA5 }
        for i in 4000...4003 { changed0[i] = 0x5A }
        var changed1 = page(11)
        changed1[2048] ^= 0xFF
        let clock1 = ClockState(guestMonotonicNs: 1_000_000_000, guestWallNs: 1_750_000_000_000_000_000, tscKHz: 2_100_000, hostMonotonicNs: 77_000_000_000, hostWallNs: 1_750_000_000_500_000_000)
        let clock2 = ClockState(guestMonotonicNs: 1_100_000_000, guestWallNs: 1_750_000_000_100_000_000, tscKHz: 2_100_000, hostMonotonicNs: 77_100_000_000, hostWallNs: 1_750_000_000_600_000_000)
        let expected: [Expect] = [
            .record(.domainConfig(DomainConfig(format: .simulated, bytes: Array("{\"vcpus\":2,\"pages\":64}".utf8)))),
            .record(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy))),
            .pages([(0, .raw, page(0)), (1, .raw, page(1)), (2, .zero, nil), (3, .zero, nil)]),
            .record(.checkpointEnd(CheckpointEnd(epoch: 0, recordCount: 1, digest: 0xB7CD_6370, payloadBytes: 8264))),
            .record(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 1_000_000))),
            .record(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint))),
            .record(.clock(clock1)),
            .record(.memoryLayout(MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: 8), PFNRange(start: 16, count: 48)]))),
            .record(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: Array(0..<32)))),
            .record(.vcpuState(VCPUState(vcpu: 1, format: 1, bytes: Array(32..<64)))),
            .record(.deviceState(DeviceState(name: "nic0", bytes: [0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3]))),
            .record(.heartbeat(Heartbeat(sequence: 2, senderMonotonicNs: 2_000_000))),
            .pages([(0, .delta, changed0), (1, .raw, page(11)), (5, .absent, nil), (6, .raw, page(6))]),
            .record(.opaquePayload(OpaquePayload(stream: .libxc, sequence: 0, bytes: Array("libxc-chunk-0".utf8)))),
            .record(.checkpointEnd(CheckpointEnd(epoch: 1, recordCount: 7, digest: 0x5C4C_B3A4, payloadBytes: 8500))),
            .record(.checkpointBegin(CheckpointBegin(epoch: 2, kind: .final))),
            .record(.clock(clock2)),
            .record(.memoryLayout(MemoryLayout(generation: 2, ranges: [PFNRange(start: 0, count: 8)]))),
            .record(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: Array(64..<96)))),
            .pages([(1, .delta, changed1)]),
            .record(.checkpointEnd(CheckpointEnd(epoch: 2, recordCount: 4, digest: 0x200A_6F23, payloadBytes: 152))),
            .record(.streamEnd(StreamEnd(reason: .switchover, lastEpoch: 2, message: "switchover to backup"))),
        ]
        #expect(items.count == expected.count)
        for (i, (got, want)) in zip(items, expected).enumerated() {
            #expect(got == want, "item \(i)")
        }
        #expect(validates(bytes, .primaryToBackup))
        #expect(bytes.count == 17_592)
    }

    @Test func goldenV1_0BackupStreamDecodesToItsExactContent() throws {
        let bytes = try golden("v1.0-backup.rstream")
        let (header, items, _) = try decodeGolden(bytes, receiver: PageStore())
        #expect(header?.role == .backup && header?.features == [.deltaPages] && header?.guestName == "golden-guest")
        #expect(items == [
            .record(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 500))),
            .record(.ack(Ack(epoch: 1, backupMonotonicNs: 1_500))),
            .record(.ack(Ack(epoch: 2, backupMonotonicNs: 2_500))),
            .record(.streamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 2, message: "backup stopping"))),
        ])
        #expect(validates(bytes, .backupToPrimary))
    }

    @Test func goldenV1_1StreamFromALaterMinorIsReadByThisBuild() throws {
        let bytes = try golden("v1.1-primary-future-minor.rstream")
        let (header, items, skipped) = try decodeGolden(bytes, receiver: PageStore())
        #expect(header?.minor == 1 && header?.backend == .xen && header?.senderVersion == "remusd 1.1 (synthetic)")
        #expect(skipped == 2)
        let clock1 = ClockState(guestMonotonicNs: 1_000_000_000, guestWallNs: 1_750_000_000_000_000_000, tscKHz: 2_100_000, hostMonotonicNs: 77_000_000_000, hostWallNs: 1_750_000_000_500_000_000)
        let expectedHead: [Expect] = [
            .skipped,
            .record(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint))),
            .record(.clock(clock1)),
            .skipped,
            .record(.memoryLayout(MemoryLayout(generation: 5, ranges: [PFNRange(start: 0, count: 4)]))),
        ]
        #expect(Array(items.prefix(5)) == expectedHead)
        guard case .record(.checkpointEnd(let end)) = items[5] else {
            Issue.record("no END at item 5")
            return
        }
        #expect(end.epoch == 1 && end.recordCount == 3 && end.payloadBytes == 48 + 3 + 32)
        #expect(items[6] == .record(.streamEnd(StreamEnd(reason: .shutdown, lastEpoch: 1, message: ""))))
        #expect(validates(bytes, .primaryToBackup), "the unknown optional record inside the checkpoint counts towards its digest")
    }

    @Test func goldenV1_0PrimaryStreamWithDisksDecodesToItsExactContent() throws {
        let bytes = try golden("v1.0-primary-disks.rstream")
        let (header, items, skipped) = try decodeGolden(bytes, receiver: PageStore())
        #expect(header == StreamHeader(
            major: 1, minor: 0, features: [.deltaPages, .disks], pageSize: 4096, backend: .simulated, role: .primary,
            guestUUID: GuestUUID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210),
            guestName: "golden-guest", senderVersion: "remusd 1.0 golden"))
        #expect(skipped == 0)
        func block(_ seed: Int, count: Int = 512) -> [UInt8] { (0..<count).map { UInt8(($0 * 7 + seed) % 256) } }
        let page0 = (0..<4096).map { UInt8(($0 * 31) % 251) }
        let expected: [Expect] = [
            .record(.domainConfig(DomainConfig(format: .simulated, bytes: Array("{\"vcpus\":1,\"pages\":8}".utf8)))),
            .record(.diskDescriptor(DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 4096, name: "xvda"))),
            .record(.diskDescriptor(DiskDescriptor(disk: 1, blockSize: 4096, sizeBytes: 1_048_576, name: "scratch"))),
            .record(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy))),
            .record(.diskWrite(DiskWrite(disk: 0, offset: 0, data: block(1, count: 4096)))),
            .pages([(0, .raw, page0)]),
            .record(.checkpointEnd(CheckpointEnd(epoch: 0, recordCount: 2, digest: 0x7288_53F8, payloadBytes: 8232))),
            .record(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint))),
            .record(.clock(ClockState(guestMonotonicNs: 1_000_000_000, guestWallNs: 1_750_000_000_000_000_000, tscKHz: 2_100_000, hostMonotonicNs: 77_000_000_000, hostWallNs: 1_750_000_000_500_000_000))),
            .record(.memoryLayout(MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: 8)]))),
            .record(.diskWrite(DiskWrite(disk: 0, offset: 1024, data: block(2)))),
            .record(.diskCommand(DiskCommand(disk: 0, kind: .flush, offset: 0, length: 0))),
            .record(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: Array(0..<16)))),
            .record(.diskCommand(DiskCommand(disk: 1, kind: .discard, offset: 8192, length: 16384))),
            .record(.diskCommand(DiskCommand(disk: 0, kind: .writeZeroes, offset: 3584, length: 512))),
            .record(.diskWrite(DiskWrite(disk: 1, offset: 524_288, data: block(3, count: 4096)))),
            .record(.checkpointEnd(CheckpointEnd(epoch: 1, recordCount: 8, digest: 0xAC06_7ECA, payloadBytes: 4808))),
            .record(.streamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 1, message: ""))),
        ]
        #expect(items.count == expected.count)
        for (i, (got, want)) in zip(items, expected).enumerated() {
            #expect(got == want, "item \(i)")
        }
        #expect(validates(bytes, .primaryToBackup))
        #expect(bytes.count == 13_616)
    }

    @Test func currentEncoderStillWritesTheGoldenBytes() throws {
        for (name, make) in Golden.files {
            #expect(try golden(name) == make(), "\(name): the v1 writer's bytes changed; a format change needs a new version and new golden files")
        }
    }

    /// Writes the golden files into the source tree. Run once per released version.
    @Test(.enabled(if: ProcessInfo.processInfo.environment["REMUS_WRITE_GOLDEN"] == "1"))
    func writeGoldenFiles() throws {
        let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Golden")
        for (name, make) in Golden.files {
            try Data(make()).write(to: directory.appendingPathComponent(name))
        }
    }
}
