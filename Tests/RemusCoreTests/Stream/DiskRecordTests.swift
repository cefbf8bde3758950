import Testing
@testable import RemusCore

let diskHeader = streamHeader(features: [.deltaPages, .disks])
let disk0 = DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 1 << 20, name: "xvda")
let disk1 = DiskDescriptor(disk: 1, blockSize: 4096, sizeBytes: 64 << 10, name: "xvdb")

/// A stream with two disks and a checkpoint carrying `records` (plus the required CLOCK and
/// MEMORY_LAYOUT), closed by a computed END.
func diskStream(
    header: StreamHeader = diskHeader, disks: [DiskDescriptor] = [disk0, disk1], kind: CheckpointKind = .checkpoint,
    _ records: [StreamRecord]
) throws -> [UInt8] {
    try buildStream(header) { e, out in
        for d in disks { try e.append(.diskDescriptor(d), into: &out) }
        try e.append(.checkpointBegin(CheckpointBegin(epoch: kind == .precopy ? 0 : 1, kind: kind)), into: &out)
        if kind != .precopy {
            try e.append(.clock(sampleClock), into: &out)
            try e.append(.memoryLayout(sampleLayout), into: &out)
        }
        for r in records { try e.append(r, into: &out) }
        try e.endCheckpoint(into: &out)
    }
}

func write(_ disk: UInt32, at offset: UInt64, _ count: Int, fill: UInt8 = 0xAB) -> StreamRecord {
    .diskWrite(DiskWrite(disk: disk, offset: offset, data: [UInt8](repeating: fill, count: count)))
}

func command(_ disk: UInt32, _ kind: DiskCommand.Kind, at offset: UInt64 = 0, _ length: UInt64 = 0) -> StreamRecord {
    .diskCommand(DiskCommand(disk: disk, kind: kind, offset: offset, length: length))
}

@Suite("Disk records: encoding, limits, ordering")
struct DiskRecordTests {
    @Test func diskRecordsRoundTripFedWholeAndOneByteAtATime() throws {
        let records = [write(0, at: 512, 1024, fill: 1), command(0, .flush), command(1, .discard, at: 4096, 8192),
                       command(1, .writeZeroes, at: 0, 4096), write(1, at: 60 << 10, 4096, fill: 7)]
        let bytes = try diskStream(records)
        let whole = decode(bytes)
        #expect(whole.error == nil, "\(String(describing: whole.error))")
        #expect(decode(bytes, feeding: .oneByte).items == whole.items)
        let decoded = whole.items.compactMap { $0.content?.record }
        #expect(Array(decoded.prefix(2)) == [.diskDescriptor(disk0), .diskDescriptor(disk1)])
        #expect(Array(decoded.dropFirst(5).prefix(records.count)) == records)
        let events = validate(bytes)
        #expect(events.error == nil, "\(String(describing: events.error))")
        #expect(events.events == ["open", "disk(0)", "disk(1)", "begin(1)", "clock", "layout", "write(0@512+1024)", "flush(0@0+0)",
                                  "discard(1@4096+8192)", "writeZeroes(1@0+4096)", "write(1@61440+4096)", "complete(1)"])
    }

    @Test func diskRecordsAreMandatorySoAReaderThatDoesNotKnowThemRefusesThem() throws {
        var encoder = StreamEncoder(pageSize: 4096, features: [.disks])
        for record in [write(0, at: 0, 512), command(0, .flush), StreamRecord.diskDescriptor(disk0)] {
            var out: [UInt8] = []
            try encoder.append(record, into: &out)
            let flags = out.withUnsafeBytes { UnsafeRawPointer($0.baseAddress!).le(4, as: UInt16.self) }
            #expect(flags == RecordHeader.mandatoryFlag, "\(record.type.wireName) is written MANDATORY")
        }
        // What a reader that does not know a type does with a mandatory one: it refuses the stream.
        let unknown = headerBytes(diskHeader) + rawRecord(type: 0x0D, body: [UInt8](repeating: 0, count: 16))
        let outcome = decode(unknown)
        #expect(outcome.error?.kind == .unknownMandatoryRecord)
    }

    @Test func aBackupThatDidNotOfferDisksRefusesAPrimaryThatEnablesThem() throws {
        var validator = CheckpointValidator(direction: .primaryToBackup, offeredFeatures: [.deltaPages])
        #expect(throws: StreamDecodeError.self) { _ = try validator.validate(.header(diskHeader)) }
        do {
            _ = try validator.validate(.header(diskHeader))
        } catch {
            #expect(error.kind == .badHeader)
            #expect(error.detail.contains("did not offer"))
        }
    }

    @Test func diskRecordsWithoutTheNegotiatedFeatureAreRefusedNotIgnored() throws {
        let noDisks = streamHeader(features: [.deltaPages])
        let descriptor = try buildStream(noDisks) { e, out in try e.append(.diskDescriptor(disk0), into: &out) }
        let refused = validate(descriptor).error
        #expect(refused?.kind == .outOfOrder)
        #expect(refused?.description.contains("DISK_DESCRIPTOR, but the stream header did not enable disk records") == true)
        let writeOnly = try diskStream(header: noDisks, disks: [], [write(0, at: 0, 512)])
        #expect(validate(writeOnly).error?.description.contains("DISK_WRITE, but the stream header did not enable disk records") == true)
    }

    @Test func descriptorsComeBeforeTheFirstCheckpointNumberedFromZeroWithDistinctNames() throws {
        let late = try buildStream(diskHeader) { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
            try e.endCheckpoint(into: &out)
            try e.append(.diskDescriptor(disk0), into: &out)
        }
        #expect(validate(late).error?.detail == "DISK_DESCRIPTOR after the first CHECKPOINT_BEGIN")
        let skipped = try diskStream(disks: [disk1], [])
        #expect(validate(skipped).error?.detail == "DISK_DESCRIPTOR for disk 1, expected disk 0 (disks are numbered in order from 0)")
        var twin = disk1
        twin.name = disk0.name
        let sameName = try diskStream(disks: [disk0, twin], [])
        #expect(validate(sameName).error?.kind == .duplicateRecord)
        let many = (0...StreamLimits.maxDisks).map { DiskDescriptor(disk: UInt32($0), blockSize: 512, sizeBytes: 512, name: "d\($0)") }
        let tooMany = try diskStream(disks: many, [])
        #expect(validate(tooMany).error?.kind == .lengthOverLimit)
    }

    @Test func operationsMustLieInsideACheckpointOnADescribedDiskAlignedAndInRange() throws {
        func error(_ records: [StreamRecord]) throws -> StreamDecodeError? { validate(try diskStream(records)).error }
        #expect(try error([write(2, at: 0, 512)])?.detail == "disk 2 in checkpoint 1, but the stream described 2 disk(s)")
        #expect(try error([write(0, at: 100, 512)])?.kind == .malformedBody, "offset not aligned")
        #expect(try error([write(1, at: 0, 512)])?.kind == .malformedBody, "length not a multiple of 4096")
        #expect(try error([write(0, at: (1 << 20) - 512, 1024)])?.detail.contains("ends beyond the disk's 1048576 bytes") == true)
        #expect(try error([command(0, .discard, at: 1 << 20, 512)])?.kind == .malformedBody, "starts at the end")
        #expect(try error([command(0, .writeZeroes, at: 512, UInt64.max - 511)])?.kind == .malformedBody, "no overflow past the end")
        #expect(try error([command(0, .discard, at: 0, 0)])?.kind == .malformedBody, "empty range")
        #expect(try error([command(0, .flush, at: 512, 0)])?.kind == .malformedBody, "a flush has no range")
        #expect(try error([command(0, .flush), write(0, at: 0, 512), command(0, .writeZeroes, at: 0, 1 << 20)]) == nil)
        let outside = try buildStream(diskHeader) { e, out in
            try e.append(.diskDescriptor(disk0), into: &out)
            try e.append(write(0, at: 0, 512), into: &out)
        }
        #expect(validate(outside).error?.detail == "DISK_WRITE outside a checkpoint")
        // Pre-copy rounds carry disk contents too (the initial copy).
        #expect(validate(try diskStream(kind: .precopy, [write(0, at: 0, 4096)])).error == nil)
    }

    @Test func theDecoderChecksEachDiskBodyOnItsOwn() throws {
        func body(_ build: (inout [UInt8]) -> Void) -> [UInt8] {
            var b: [UInt8] = []
            build(&b)
            return b
        }
        func refused(_ type: RecordType, _ b: [UInt8]) -> StreamDecodeError? {
            decode(headerBytes(diskHeader) + rawRecord(type: type.rawValue, body: b)).error
        }
        // DISK_WRITE: the data length field must match the body; zero bytes is no write.
        let longer = body { $0.appendLE(UInt32(0)); $0.appendLE(UInt32(600)); $0.appendLE(UInt64(0)); $0 += [UInt8](repeating: 1, count: 512) }
        #expect(refused(.diskWrite, longer)?.kind == .malformedBody)
        let empty = body { $0.appendLE(UInt32(0)); $0.appendLE(UInt32(0)); $0.appendLE(UInt64(0)) }
        #expect(refused(.diskWrite, empty)?.kind == .malformedBody)
        // DISK_DESCRIPTOR: block size, size, name.
        func descriptor(block: UInt32, size: UInt64, name: [UInt8]) -> [UInt8] {
            body { $0.appendLE(UInt32(0)); $0.appendLE(block); $0.appendLE(size); $0.appendLE(UInt16(name.count)); $0.appendLE(UInt16(0)); $0.appendLE(UInt32(0)); $0 += name }
        }
        #expect(refused(.diskDescriptor, descriptor(block: 512, size: 4096, name: Array("ok".utf8))) == nil)
        #expect(refused(.diskDescriptor, descriptor(block: 1024, size: 4096, name: Array("a".utf8)))?.kind == .malformedBody)
        #expect(refused(.diskDescriptor, descriptor(block: 512, size: 1000, name: Array("a".utf8)))?.kind == .malformedBody)
        #expect(refused(.diskDescriptor, descriptor(block: 512, size: 0, name: Array("a".utf8)))?.kind == .malformedBody)
        #expect(refused(.diskDescriptor, descriptor(block: 512, size: 4096, name: []))?.kind == .malformedBody)
        #expect(refused(.diskDescriptor, descriptor(block: 512, size: 4096, name: [0xFF, 0xFE]))?.kind == .malformedBody)
        // DISK_COMMAND: known kinds, zero reserved field.
        let unknown = body { $0.appendLE(UInt32(0)); $0.appendLE(UInt16(9)); $0.appendLE(UInt16(0)); $0.appendLE(UInt64(0)); $0.appendLE(UInt64(0)) }
        #expect(refused(.diskCommand, unknown)?.detail == "unknown disk command 9")
        let reserved = body { $0.appendLE(UInt32(0)); $0.appendLE(UInt16(1)); $0.appendLE(UInt16(1)); $0.appendLE(UInt64(0)); $0.appendLE(UInt64(0)) }
        #expect(refused(.diskCommand, reserved)?.kind == .malformedBody)
    }

    @Test func anOversizedDiskWriteIsRejectedFromItsHeaderBeforeTheBodyIsAwaited() throws {
        var decoder = StreamDecoder()
        let limit = RecordType.diskWrite.maximumBody(pageSize: 4096)
        #expect(limit == 16 + StreamLimits.maxDiskWriteBytes + 4096)
        let bytes = headerBytes(diskHeader) + rawRecord(type: RecordType.diskWrite.rawValue, length: UInt32(limit + 1), body: []).prefix(16)
        _ = bytes.withUnsafeBytes { decoder.append($0) }
        _ = try decoder.next()
        #expect(throws: StreamDecodeError.self) { try decoder.next() }
        #expect(decoder.capacity < limit, "nothing was allocated for the announced body")
        var encoder = StreamEncoder(pageSize: 4096, features: [.disks])
        var out: [UInt8] = []
        #expect(throws: StreamEncodeError.self) { try encoder.append(write(0, at: 0, StreamLimits.maxDiskWriteBytes + 512), into: &out) }
        #expect(out.isEmpty)
    }

    @Test func theBoundPerCheckpointCountsDiskRecordBytesAndStartsAgainEachCheckpoint() throws {
        // Three 4 KiB writes are 3 × (16 + 4096) bytes of records; a bound of 10,000 takes two.
        let bytes = try buildStream(diskHeader) { e, out in
            try e.append(.diskDescriptor(DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: 1 << 20, name: "xvda")), into: &out)
            for epoch in 1...2 {
                try e.append(.checkpointBegin(CheckpointBegin(epoch: UInt64(epoch), kind: .checkpoint)), into: &out)
                try e.append(.clock(sampleClock), into: &out)
                try e.append(.memoryLayout(sampleLayout), into: &out)
                for i in 0..<(epoch == 1 ? 2 : 3) { try e.append(write(0, at: UInt64(i) * 4096, 4096), into: &out) }
                try e.endCheckpoint(into: &out)
            }
        }
        var decoder = StreamDecoder()
        var validator = CheckpointValidator(direction: .primaryToBackup, maxDiskBytesPerCheckpoint: 10_000)
        var completed: [Epoch] = []
        var failure: StreamDecodeError?
        do {
            try bytes.withUnsafeBytes { raw in
                try decoder.feed(raw) { item in
                    if case .checkpointComplete(let end) = try validator.validate(item) { completed.append(end.epoch) }
                }
            }
        } catch let error as StreamDecodeError { failure = error }
        #expect(completed == [1], "the first checkpoint fits; the second is refused at its third write")
        #expect(failure?.kind == .lengthOverLimit)
        #expect(failure?.description == "DISK_WRITE at stream offset \(failure?.offset ?? 0): checkpoint 2 carries more than 10000 bytes of disk records, this backup's bound per checkpoint; record rejected")
    }

    @Test func theDigestCommitsToEveryDiskRecordAndItsOrder() throws {
        let bytes = try diskStream([write(0, at: 0, 512, fill: 1), write(0, at: 0, 512, fill: 2), command(0, .flush)])
        let (header, records) = splitRecords(bytes)
        // records: 2 descriptors, BEGIN, CLOCK, LAYOUT, write 1, write 2, flush, END.
        var swapped = records
        swapped.swapAt(5, 6)
        let reordered = validate(header + swapped.joined())
        #expect(reordered.error?.kind == .digestMismatch, "two writes to the same block in the other order are another disk")
        var dropped = records
        dropped.remove(at: 7)
        #expect(validate(header + dropped.joined()).error?.kind == .countMismatch)
    }

    @Test("An OPAQUE_PAYLOAD encoded as its header, the data and the padding written after it (writev) is byte for byte appendOpaquePayload's, digest included")
    func opaquePayloadHeaderPlusDataEqualsTheWholeRecord() throws {
        var g = SeededGenerator(seed: 13)
        var whole = StreamEncoder(pageSize: 4096, features: [])
        var split = StreamEncoder(pageSize: 4096, features: [])
        var wholeBytes: [UInt8] = []
        var splitBytes: [UInt8] = []
        let begin = StreamRecord.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy))
        try whole.append(begin, into: &wholeBytes)
        try split.append(begin, into: &splitBytes)
        // Every length modulo 8, so every padding from 0 to 7 bytes, and a chunk of the writer's size.
        for (sequence, count) in ((0..<16).map { 1 + $0 + Int(g.next() % 4096) } + [1 << 20]).enumerated() {
            let data = (0..<count).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            try data.withUnsafeBytes { d in
                try whole.appendOpaquePayload(stream: OpaqueStream.libxl, sequence: UInt32(sequence), bytes: d, into: &wholeBytes)
                let padding = try split.appendOpaquePayloadHeader(stream: OpaqueStream.libxl, sequence: UInt32(sequence), bytes: d, into: &splitBytes)
                #expect(padding == (8 - count % 8) % 8)
                splitBytes.append(contentsOf: d)
                splitBytes.append(contentsOf: repeatElement(0, count: padding))
            }
            #expect(splitBytes == wholeBytes)
        }
        #expect(try split.endCheckpoint(into: &splitBytes) == whole.endCheckpoint(into: &wholeBytes))
        #expect(splitBytes == wholeBytes)
        let tooLong = [UInt8](repeating: 1, count: RecordType.opaquePayload.maximumBody(pageSize: 4096))
        #expect(throws: StreamEncodeError.self) {
            try tooLong.withUnsafeBytes { _ = try split.appendOpaquePayloadHeader(stream: .libxl, sequence: 99, bytes: $0, into: &splitBytes) }
        }
    }

    @Test("A DISK_WRITE encoded as its header with the data written after it (writev) is byte for byte appendDiskWrite's, digest included")
    func diskWriteHeaderPlusDataEqualsTheWholeRecord() throws {
        var g = SeededGenerator(seed: 12)
        var whole = StreamEncoder(pageSize: 4096, features: [.disks])
        var split = StreamEncoder(pageSize: 4096, features: [.disks])
        var wholeBytes: [UInt8] = []
        var splitBytes: [UInt8] = []
        let begin = StreamRecord.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy))
        try whole.append(begin, into: &wholeBytes)
        try split.append(begin, into: &splitBytes)
        for _ in 0..<20 {
            let count = 8 * Int(1 + g.next() % 8192)
            let data = (0..<count).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let disk = UInt32(g.next() % 4)
            let offset = (g.next() % 4096) * 512
            try data.withUnsafeBytes { d in
                try whole.appendDiskWrite(disk: disk, offset: offset, data: d, into: &wholeBytes)
                try split.appendDiskWriteHeader(disk: disk, offset: offset, data: d, into: &splitBytes)
                splitBytes.append(contentsOf: d)
            }
            #expect(splitBytes == wholeBytes)
        }
        #expect(try split.endCheckpoint(into: &splitBytes) == whole.endCheckpoint(into: &wholeBytes))
        #expect(splitBytes == wholeBytes)
    }
}
