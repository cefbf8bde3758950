// The writing half of the codec: the stream header and small records appended into a reusable
// byte array, and PAGE_BATCH records as segments ready for writev (StreamEncoder+PageBatch.swift).

/// Writes stream format v1 and keeps the open checkpoint's digest.
///
/// The encoder does not enforce the record order (the engine decides what to send; the receiver's
/// `CheckpointValidator` enforces the rules). It does track checkpoints: `CHECKPOINT_BEGIN` resets
/// the digest, every following record except HEARTBEAT is counted, and `endCheckpoint(into:)`
/// writes a CHECKPOINT_END that matches what was written.
///
/// Records are appended to a caller-owned `[UInt8]` the caller reuses (`removeAll(keepingCapacity:)`),
/// so a warmed-up encoder allocates nothing. The page-batch buffers are allocated once, in `init`
/// (the delta scratch on first use).
public struct StreamEncoder: ~Copyable {
    /// Page size of the stream in bytes.
    public let pageSize: Int
    /// Features negotiated for this stream (the peer's offer ∩ ours); delta pages are used only when
    /// it contains `.deltaPages`.
    public let features: StreamFeatures
    /// Most pages one PAGE_BATCH from this encoder carries: 1024, or fewer when pages are so large
    /// that a batch of raw pages would exceed `StreamLimits.maxRecordBody`.
    public let maxPagesPerBatch: Int
    /// The open checkpoint's running digest (empty outside a checkpoint).
    public private(set) var digest = CheckpointDigest()
    /// The checkpoint begun and not yet ended, if any.
    public private(set) var openCheckpoint: CheckpointBegin?

    /// Record header, batch prefix and index of the batch being encoded.
    let batchHead: UnsafeMutableRawPointer
    /// The batch's segments: head first, then data.
    let segmentStorage: UnsafeMutablePointer<StreamSegment>
    /// Delta-encoded pages of the batch being encoded, each padded to 8; maxPagesPerBatch pages.
    var deltaScratch: UnsafeMutableRawPointer?
    /// Extends a CRC over one page without reading it (sealed arenas); made on first use.
    var pageShift: CRC32C.Shift?

    /// - Parameters:
    ///   - pageSize: bytes per page, one of `StreamLimits.pageSizes`.
    ///   - features: the negotiated features.
    public init(pageSize: Int, features: StreamFeatures) {
        precondition(StreamLimits.pageSizes.contains(UInt32(truncatingIfNeeded: pageSize)), "page size \(pageSize) not allowed in v1")
        self.pageSize = pageSize
        self.features = features
        let fitting = (StreamLimits.maxRecordBody - Wire.batchPrefixBytes) / (Wire.batchEntryBytes + pageSize)
        maxPagesPerBatch = min(StreamLimits.maxPagesPerBatch, fitting)
        batchHead = .allocate(
            byteCount: RecordHeader.size + Wire.batchPrefixBytes + Wire.batchEntryBytes * maxPagesPerBatch,
            alignment: 8)
        segmentStorage = .allocate(capacity: 1 + maxPagesPerBatch)
    }

    deinit {
        batchHead.deallocate()
        segmentStorage.deallocate()
        deltaScratch?.deallocate()
    }

    // MARK: - Stream header

    /// Appends the stream header (the first bytes in each direction).
    ///
    /// Throws when a string is longer than 255 bytes of UTF-8 or the page size is not allowed.
    public static func appendHeader(_ header: StreamHeader, into out: inout [UInt8]) throws(StreamEncodeError) {
        let name = Array(header.guestName.utf8)
        let version = Array(header.senderVersion.utf8)
        guard name.count <= Wire.maxHeaderString else {
            throw StreamEncodeError(nil, "guest name is \(name.count) bytes of UTF-8; at most \(Wire.maxHeaderString)")
        }
        guard version.count <= Wire.maxHeaderString else {
            throw StreamEncodeError(nil, "sender version is \(version.count) bytes of UTF-8; at most \(Wire.maxHeaderString)")
        }
        guard StreamLimits.pageSizes.contains(header.pageSize) else {
            throw StreamEncodeError(nil, "page size \(header.pageSize) is not one of \(StreamLimits.pageSizes.sorted())")
        }
        let length = align8(Wire.headerFixedBytes + name.count + version.count + 4)
        let start = out.count
        out.reserveCapacity(start + length)
        out.append(contentsOf: Wire.magic)
        out.appendLE(header.major)
        out.appendLE(header.minor)
        out.appendLE(UInt32(length))
        out.appendLE(header.features.rawValue)
        out.appendLE(header.pageSize)
        out.appendLE(header.backend.rawValue)
        out.appendLE(header.role.rawValue)
        Swift.withUnsafeBytes(of: header.guestUUID.high.bigEndian) { out.append(contentsOf: $0) }
        Swift.withUnsafeBytes(of: header.guestUUID.low.bigEndian) { out.append(contentsOf: $0) }
        out.appendLE(UInt16(name.count))
        out.appendLE(UInt16(version.count))
        out.append(contentsOf: name)
        out.append(contentsOf: version)
        out.append(contentsOf: repeatElement(0, count: start + length - 4 - out.count))
        let crc = out.withUnsafeBytes { CRC32C.extend(0, UnsafeRawBufferPointer(rebasing: $0[start..<(start + length - 4)])) }
        out.appendLE(crc)
    }

    // MARK: - Small records

    /// Appends one record. `CHECKPOINT_BEGIN` opens a checkpoint (and resets the digest),
    /// `CHECKPOINT_END` closes it; records in between are counted in the digest.
    ///
    /// Throws when the value cannot be carried (a string or body over its limit, an invalid
    /// memory layout); nothing is appended then.
    public mutating func append(_ record: StreamRecord, into out: inout [UInt8]) throws(StreamEncodeError) {
        switch record {
        case .checkpointBegin(let begin):
            try writeRecord(.checkpointBegin, bodyLength: 16, into: &out) {
                $0.appendLE(begin.epoch)
                $0.appendLE(begin.kind.rawValue)
                $0.appendLE(UInt16(0))
                $0.appendLE(UInt32(0))
            }
            openCheckpoint = begin
            digest = CheckpointDigest()
        case .checkpointEnd(let end):
            try writeRecord(.checkpointEnd, bodyLength: 24, into: &out) {
                $0.appendLE(end.epoch)
                $0.appendLE(end.recordCount)
                $0.appendLE(end.digest)
                $0.appendLE(end.payloadBytes)
            }
            openCheckpoint = nil
            digest = CheckpointDigest()
        case .vcpuState(let state):
            try writeRecord(.vcpuState, bodyLength: 8 + state.bytes.count, into: &out) {
                $0.appendLE(state.vcpu)
                $0.appendLE(state.format)
                $0.append(contentsOf: state.bytes)
            }
        case .deviceState(let device):
            let name = try checkedString(device.name, what: "device name", in: .deviceState, allowEmpty: false)
            let nameEnd = align8(8 + name.count)
            try writeRecord(.deviceState, bodyLength: nameEnd + device.bytes.count, into: &out) {
                $0.appendLE(UInt16(name.count))
                $0.appendLE(UInt16(0))
                $0.appendLE(UInt32(0))
                $0.append(contentsOf: name)
                $0.append(contentsOf: repeatElement(0, count: nameEnd - 8 - name.count))
                $0.append(contentsOf: device.bytes)
            }
        case .clock(let clock):
            try writeRecord(.clock, bodyLength: 40, into: &out) {
                $0.appendLE(clock.guestMonotonicNs)
                $0.appendLE(clock.guestWallNs)
                $0.appendLE(clock.tscKHz)
                $0.appendLE(UInt32(0))
                $0.appendLE(clock.hostMonotonicNs)
                $0.appendLE(clock.hostWallNs)
            }
        case .memoryLayout(let layout):
            guard layout.ranges.count <= StreamLimits.maxLayoutRanges else {
                throw StreamEncodeError(.memoryLayout, "\(layout.ranges.count) ranges; at most \(StreamLimits.maxLayoutRanges)")
            }
            if let problem = layoutProblem(layout.ranges) { throw StreamEncodeError(.memoryLayout, problem) }
            try writeRecord(.memoryLayout, bodyLength: 16 + 16 * layout.ranges.count, into: &out) {
                $0.appendLE(layout.generation)
                $0.appendLE(UInt32(layout.ranges.count))
                $0.appendLE(UInt32(0))
                for range in layout.ranges {
                    $0.appendLE(range.start)
                    $0.appendLE(range.count)
                }
            }
        case .opaquePayload(let payload):
            try writeRecord(.opaquePayload, bodyLength: 8 + payload.bytes.count, into: &out) {
                $0.appendLE(payload.stream.rawValue)
                $0.appendLE(payload.sequence)
                $0.append(contentsOf: payload.bytes)
            }
        case .domainConfig(let config):
            try writeRecord(.domainConfig, bodyLength: 8 + config.bytes.count, into: &out) {
                $0.appendLE(config.format.rawValue)
                $0.appendLE(UInt32(0))
                $0.append(contentsOf: config.bytes)
            }
        case .diskDescriptor(let d):
            let name = Array(d.name.utf8)
            guard !name.isEmpty, name.count <= StreamLimits.maxDiskName else {
                throw StreamEncodeError(.diskDescriptor, "disk name is \(name.count) bytes of UTF-8; 1...\(StreamLimits.maxDiskName) allowed")
            }
            try writeRecord(.diskDescriptor, bodyLength: 24 + name.count, into: &out) {
                $0.appendLE(d.disk)
                $0.appendLE(d.blockSize)
                $0.appendLE(d.sizeBytes)
                $0.appendLE(UInt16(name.count))
                $0.appendLE(UInt16(0))
                $0.appendLE(UInt32(0))
                $0.append(contentsOf: name)
            }
        case .diskWrite(let write):
            try checkDiskWriteLength(write.data.count)
            try writeRecord(.diskWrite, bodyLength: 16 + write.data.count, into: &out) {
                $0.appendLE(write.disk)
                $0.appendLE(UInt32(write.data.count))
                $0.appendLE(write.offset)
                $0.append(contentsOf: write.data)
            }
        case .diskCommand(let command):
            try writeRecord(.diskCommand, bodyLength: 24, into: &out) {
                $0.appendLE(command.disk)
                $0.appendLE(command.kind.rawValue)
                $0.appendLE(UInt16(0))
                $0.appendLE(command.offset)
                $0.appendLE(command.length)
            }
        case .ack(let ack):
            try writeRecord(.ack, bodyLength: 16, into: &out) {
                $0.appendLE(ack.epoch)
                $0.appendLE(ack.backupMonotonicNs)
            }
        case .heartbeat(let beat):
            try writeRecord(.heartbeat, bodyLength: 16, into: &out) {
                $0.appendLE(beat.sequence)
                $0.appendLE(beat.senderMonotonicNs)
            }
        case .streamEnd(let end):
            let message = try checkedString(end.message, what: "message", in: .streamEnd, allowEmpty: true)
            try writeRecord(.streamEnd, bodyLength: 24 + message.count, into: &out) {
                $0.appendLE(end.reason.rawValue)
                $0.appendLE(UInt32(0))
                $0.appendLE(end.lastEpoch)
                $0.appendLE(UInt32(message.count))
                $0.appendLE(UInt32(0))
                $0.append(contentsOf: message)
            }
        case .error(let error):
            let message = try checkedString(error.message, what: "message", in: .error, allowEmpty: true)
            try writeRecord(.error, bodyLength: 8 + message.count, into: &out) {
                $0.appendLE(error.code)
                $0.appendLE(UInt32(message.count))
                $0.append(contentsOf: message)
            }
        }
    }

    /// Appends an OPAQUE_PAYLOAD chunk straight from the caller's bytes.
    public mutating func appendOpaquePayload(
        stream: OpaqueStream, sequence: UInt32, bytes: UnsafeRawBufferPointer, into out: inout [UInt8]
    ) throws(StreamEncodeError) {
        try writeRecord(.opaquePayload, bodyLength: 8 + bytes.count, into: &out) {
            $0.appendLE(stream.rawValue)
            $0.appendLE(sequence)
            $0.append(contentsOf: bytes)
        }
    }

    /// Appends an OPAQUE_PAYLOAD's header and the 8 body bytes before its data, and counts the
    /// whole record: the caller writes `bytes` and then the returned number (0…7) of zero bytes
    /// right after `out` (writev), so a megabyte of a library's stream is not copied into the
    /// buffer first. The bytes are those of `appendOpaquePayload`.
    public mutating func appendOpaquePayloadHeader(
        stream: OpaqueStream, sequence: UInt32, bytes: UnsafeRawBufferPointer, into out: inout [UInt8]
    ) throws(StreamEncodeError) -> Int {
        let bodyLength = 8 + bytes.count
        let limit = RecordType.opaquePayload.maximumBody(pageSize: pageSize)
        guard bodyLength <= limit else {
            throw StreamEncodeError(.opaquePayload, "body of \(bodyLength) bytes; at most \(limit)")
        }
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: RecordHeader.size))
        out.appendLE(stream.rawValue)
        out.appendLE(sequence)
        sealBeforeTrailingData(.opaquePayload, recordStart: start, data: bytes, in: &out)
        return align8(bodyLength) - bodyLength
    }

    /// Appends a DISK_WRITE straight from the caller's bytes (1 … `StreamLimits.maxDiskWriteBytes`;
    /// a longer guest write is split by the caller).
    public mutating func appendDiskWrite(
        disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer, into out: inout [UInt8]
    ) throws(StreamEncodeError) {
        try checkDiskWriteLength(data.count)
        try writeRecord(.diskWrite, bodyLength: 16 + data.count, into: &out) {
            $0.appendLE(disk)
            $0.appendLE(UInt32(data.count))
            $0.appendLE(offset)
            $0.append(contentsOf: data)
        }
    }

    /// Appends a DISK_WRITE's header and body up to its data, and counts the whole record: the
    /// caller writes `data` itself right after `out` (writev), so a 4 MiB piece of the disk copy
    /// is not copied into the buffer first. The bytes are those of `appendDiskWrite`; `data` is
    /// whole 8-byte units (a disk's blocks are 512 or 4096 bytes), so it needs no padding.
    public mutating func appendDiskWriteHeader(
        disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer, into out: inout [UInt8]
    ) throws(StreamEncodeError) {
        try checkDiskWriteLength(data.count)
        precondition(data.count % 8 == 0, "DISK_WRITE data of \(data.count) bytes is not whole 8-byte units")
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: RecordHeader.size))
        out.appendLE(disk)
        out.appendLE(UInt32(data.count))
        out.appendLE(offset)
        sealBeforeTrailingData(.diskWrite, recordStart: start, data: data, in: &out)
    }

    /// Writes the header of the record that starts at `start`, whose body is what follows its
    /// header in `out` and then `data` (which the caller writes after `out`), and counts it.
    private mutating func sealBeforeTrailingData(_ type: RecordType, recordStart start: Int, data: UnsafeRawBufferPointer, in out: inout [UInt8]) {
        let bodyLength = out.count - start - RecordHeader.size + data.count
        let flags = RecordHeader.mandatoryFlag
        let fields = RecordHeader.crcOfFields(typeCode: type.rawValue, flags: flags, bodyLength: UInt32(bodyLength))
        let crc = out.withUnsafeBytes {
            CRC32C.extend(CRC32C.extend(fields, UnsafeRawBufferPointer(rebasing: $0[(start + RecordHeader.size)...])), data)
        }
        let header = RecordHeader(typeCode: type.rawValue, flags: flags, bodyLength: UInt32(bodyLength), crc: crc)
        out.withUnsafeMutableBytes {
            // The record's 16 header bytes were appended by the caller, so the buffer is not empty.
            guard let base = $0.baseAddress else { return }
            header.write(to: base + start)
        }
        countInDigest(header)
    }

    /// Appends the CHECKPOINT_END that closes the open checkpoint, computed from what was written
    /// since its BEGIN, and returns it. The caller must have begun a checkpoint.
    @discardableResult
    public mutating func endCheckpoint(into out: inout [UInt8]) throws(StreamEncodeError) -> CheckpointEnd {
        guard let begin = openCheckpoint else { preconditionFailure("endCheckpoint() without an open checkpoint") }
        guard digest.recordCount <= UInt64(UInt32.max) else {
            throw StreamEncodeError(.checkpointEnd, "\(digest.recordCount) records in checkpoint \(begin.epoch); at most \(UInt32.max)")
        }
        let end = CheckpointEnd(
            epoch: begin.epoch, recordCount: UInt32(digest.recordCount), digest: digest.value,
            payloadBytes: digest.payloadBytes)
        try append(.checkpointEnd(end), into: &out)
        return end
    }

    /// Appends a record of any type code with the given flags and body, as it is: for record
    /// types of later minor versions, and for tests that need streams a v1 writer never produces.
    /// Counted in the open checkpoint's digest like any other record; it never opens or closes a
    /// checkpoint (use `append(_:into:)` for BEGIN and END).
    public mutating func appendRecord(
        typeCode: UInt32, flags: UInt16, body: UnsafeRawBufferPointer, into out: inout [UInt8]
    ) throws(StreamEncodeError) {
        guard body.count <= StreamLimits.maxRecordBody else {
            throw StreamEncodeError(RecordType(rawValue: typeCode), "body of \(body.count) bytes; at most \(StreamLimits.maxRecordBody)")
        }
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: RecordHeader.size))
        out.append(contentsOf: body)
        seal(typeCode: typeCode, flags: flags, recordStart: start, bodyLength: body.count, in: &out)
    }

    // MARK: - Internals

    /// Writes header space, the body (through `body`, which must append exactly `bodyLength`
    /// bytes), padding and the sealed header.
    private mutating func writeRecord(
        _ type: RecordType, bodyLength: Int, into out: inout [UInt8], _ body: (inout [UInt8]) -> Void
    ) throws(StreamEncodeError) {
        let limit = type.maximumBody(pageSize: pageSize)
        guard bodyLength <= limit else {
            throw StreamEncodeError(type, "body of \(bodyLength) bytes; at most \(limit)")
        }
        let start = out.count
        out.reserveCapacity(start + RecordHeader.size + align8(bodyLength))
        out.append(contentsOf: repeatElement(0, count: RecordHeader.size))
        body(&out)
        precondition(out.count - start - RecordHeader.size == bodyLength, "\(type.wireName) body writer wrote \(out.count - start - RecordHeader.size) bytes, announced \(bodyLength)")
        seal(typeCode: type.rawValue, flags: RecordHeader.mandatoryFlag, recordStart: start, bodyLength: bodyLength, in: &out)
    }

    /// Pads the record that starts at `recordStart`, computes its CRC, writes its header and counts
    /// it in the digest.
    private mutating func seal(typeCode: UInt32, flags: UInt16, recordStart start: Int, bodyLength: Int, in out: inout [UInt8]) {
        out.append(contentsOf: repeatElement(0, count: align8(bodyLength) - bodyLength))
        let length = UInt32(bodyLength)
        let bodyStart = start + RecordHeader.size
        let crc = out.withUnsafeBytes {
            CRC32C.extend(
                RecordHeader.crcOfFields(typeCode: typeCode, flags: flags, bodyLength: length),
                UnsafeRawBufferPointer(rebasing: $0[bodyStart..<(bodyStart + bodyLength)]))
        }
        let header = RecordHeader(typeCode: typeCode, flags: flags, bodyLength: length, crc: crc)
        out.withUnsafeMutableBytes {
            // The record's 16 header bytes were appended above, so the buffer is not empty.
            guard let base = $0.baseAddress else { return }
            header.write(to: base + start)
        }
        countInDigest(header)
    }

    /// Counts a written record in the open checkpoint's digest (BEGIN and END are not content).
    mutating func countInDigest(_ header: RecordHeader) {
        guard openCheckpoint != nil,
            header.typeCode != RecordType.checkpointBegin.rawValue,
            header.typeCode != RecordType.checkpointEnd.rawValue
        else { return }
        digest.add(header)
    }

    private func checkDiskWriteLength(_ count: Int) throws(StreamEncodeError) {
        guard count > 0, count <= StreamLimits.maxDiskWriteBytes else {
            throw StreamEncodeError(.diskWrite, "\(count) data bytes; 1...\(StreamLimits.maxDiskWriteBytes) allowed")
        }
    }

    private func checkedString(_ string: String, what: String, in type: RecordType, allowEmpty: Bool) throws(StreamEncodeError) -> [UInt8] {
        let bytes = Array(string.utf8)
        guard bytes.count <= StreamLimits.maxString else {
            throw StreamEncodeError(type, "\(what) is \(bytes.count) bytes of UTF-8; at most \(StreamLimits.maxString)")
        }
        guard allowEmpty || !bytes.isEmpty else { throw StreamEncodeError(type, "\(what) is empty") }
        return bytes
    }
}

/// Why `ranges` is not a valid MEMORY_LAYOUT (nil when it is): every range non-empty, ending at
/// or below 2^52, sorted, non-overlapping and non-adjacent.
func layoutProblem(_ ranges: [PFNRange]) -> String? {
    var previousEnd: UInt64?
    for (i, range) in ranges.enumerated() {
        guard range.count > 0 else { return "range \(i) is empty" }
        guard range.start < Wire.pfnLimit, range.count <= Wire.pfnLimit - range.start else {
            return "range \(i) (start \(range.start), \(range.count) pages) ends beyond PFN 2^52"
        }
        if let previousEnd, range.start <= previousEnd {
            return "range \(i) starts at PFN \(range.start), not after the previous range's end \(previousEnd) (ranges must be sorted, disjoint, non-adjacent)"
        }
        previousEnd = range.start + range.count
    }
    return nil
}
