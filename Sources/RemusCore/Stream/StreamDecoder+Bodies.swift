// Body layouts of the v1 record types (Docs/stream-format.md, "Record bodies"). Every read is
// bounds-checked against the body length first; small records become values, PAGE_BATCH and
// OPAQUE_PAYLOAD become views into the decoder's buffer.

/// A checked cursor-free reader over one record body.
struct BodyReader {
    let body: UnsafeRawBufferPointer
    let type: RecordType
    let offset: UInt64
    /// Whether the stream's minor is newer than ours, so trailing bytes are fields we do not know.
    let allowsTrailing: Bool

    var count: Int { body.count }

    func malformed(_ detail: String) -> StreamDecodeError {
        StreamDecodeError(.malformedBody, typeCode: type.rawValue, offset: offset, detail)
    }

    /// Requires `n` bytes from `at` to lie in the body.
    func require(_ at: Int, _ n: Int, _ what: @autoclosure () -> String) throws(StreamDecodeError) {
        guard at >= 0, n >= 0, n <= count - at else {
            throw malformed("\(what()) needs bytes \(at)..<\(at + n) of a \(count)-byte body")
        }
    }

    /// The integer at `at` (the caller has checked the bounds).
    @inline(__always)
    func le<T: FixedWidthInteger>(_ at: Int, as type: T.Type = T.self) -> T {
        // SAFETY: every caller checked `at + size ≤ count` (fixed fields against minimumBody,
        // variable ones with require()); an empty body never reaches here (minimumBody > 0).
        body.baseAddress.map { $0.le(at, as: T.self) } ?? 0
    }

    /// Requires the body to end exactly at `used`, or (for a newer minor) at least there.
    func requireEnd(_ used: Int) throws(StreamDecodeError) {
        guard used <= count else { throw malformed("fields need \(used) bytes, the body has \(count)") }
        guard used == count || allowsTrailing else {
            throw malformed("\(count - used) bytes after the last field; a 1.\(StreamVersion.minor) stream has none")
        }
    }

    func requireZero<T: FixedWidthInteger>(_ at: Int, as type: T.Type) throws(StreamDecodeError) {
        let value = le(at, as: T.self)
        guard value == 0 else { throw malformed("reserved field at body byte \(at) is \(hex(value)), must be 0") }
    }

    func bytes(_ at: Int, _ n: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(rebasing: body[at..<(at + n)]))
    }

    func view(_ at: Int, _ n: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: body[at..<(at + n)])
    }

    func string(_ at: Int, _ n: Int, _ what: String) throws(StreamDecodeError) -> String {
        try require(at, n, what)
        guard let s = String(validating: view(at, n), as: UTF8.self) else { throw malformed("\(what) is not valid UTF-8") }
        return s
    }
}

extension StreamDecoder {
    /// Parses a body whose CRC and padding were checked.
    func parseBody(_ r: inout BodyReader, header: StreamHeader) throws(StreamDecodeError) -> RecordContent {
        switch r.type {
        case .checkpointBegin:
            try r.requireEnd(16)
            let code = r.le(8, as: UInt16.self)
            guard let kind = CheckpointKind(rawValue: code) else { throw r.malformed("unknown checkpoint kind \(code)") }
            try r.requireZero(10, as: UInt16.self)
            try r.requireZero(12, as: UInt32.self)
            return .checkpointBegin(CheckpointBegin(epoch: r.le(0), kind: kind))

        case .checkpointEnd:
            try r.requireEnd(24)
            return .checkpointEnd(CheckpointEnd(epoch: r.le(0), recordCount: r.le(8), digest: r.le(12), payloadBytes: r.le(16)))

        case .pageBatch:
            return .pageBatch(try parsePageBatch(r, header: header))

        case .vcpuState:
            return .vcpuState(VCPUState(vcpu: r.le(0), format: r.le(4), bytes: r.bytes(8, r.count - 8)))

        case .deviceState:
            let nameLength = Int(r.le(0, as: UInt16.self))
            try r.requireZero(2, as: UInt16.self)
            try r.requireZero(4, as: UInt32.self)
            guard nameLength > 0, nameLength <= StreamLimits.maxString else {
                throw r.malformed("device name of \(nameLength) bytes; 1...\(StreamLimits.maxString) allowed")
            }
            let name = try r.string(8, nameLength, "device name")
            let nameEnd = align8(8 + nameLength)
            try r.require(8 + nameLength, nameEnd - 8 - nameLength, "device name padding")
            for i in (8 + nameLength)..<nameEnd where r.le(i, as: UInt8.self) != 0 {
                throw StreamDecodeError(.nonZeroPadding, typeCode: r.type.rawValue, offset: r.offset, "device name padding byte at body byte \(i) is not zero")
            }
            return .deviceState(DeviceState(name: name, bytes: r.bytes(nameEnd, r.count - nameEnd)))

        case .clock:
            try r.requireEnd(40)
            try r.requireZero(20, as: UInt32.self)
            return .clock(ClockState(
                guestMonotonicNs: r.le(0), guestWallNs: r.le(8), tscKHz: r.le(16), hostMonotonicNs: r.le(24),
                hostWallNs: r.le(32)))

        case .memoryLayout:
            let rangeCount = Int(r.le(8, as: UInt32.self))
            try r.requireZero(12, as: UInt32.self)
            guard rangeCount <= StreamLimits.maxLayoutRanges else {
                throw r.malformed("\(rangeCount) ranges; at most \(StreamLimits.maxLayoutRanges)")
            }
            try r.requireEnd(16 + 16 * rangeCount)
            var ranges: [PFNRange] = []
            ranges.reserveCapacity(rangeCount)
            for i in 0..<rangeCount {
                ranges.append(PFNRange(start: r.le(16 + 16 * i), count: r.le(24 + 16 * i)))
            }
            if let problem = layoutProblem(ranges) { throw r.malformed(problem) }
            return .memoryLayout(MemoryLayout(generation: r.le(0), ranges: ranges))

        case .opaquePayload:
            let code = r.le(0, as: UInt32.self)
            guard let stream = OpaqueStream(rawValue: code) else { throw r.malformed("unknown opaque stream id \(code)") }
            return .opaquePayload(OpaquePayloadView(stream: stream, sequence: r.le(4), bytes: r.view(8, r.count - 8)))

        case .domainConfig:
            let code = r.le(0, as: UInt32.self)
            guard let format = DomainConfig.Format(rawValue: code) else { throw r.malformed("unknown domain config format \(code)") }
            try r.requireZero(4, as: UInt32.self)
            return .domainConfig(DomainConfig(format: format, bytes: r.bytes(8, r.count - 8)))

        case .diskDescriptor:
            let nameLength = Int(r.le(16, as: UInt16.self))
            try r.requireZero(18, as: UInt16.self)
            try r.requireZero(20, as: UInt32.self)
            guard nameLength > 0, nameLength <= StreamLimits.maxDiskName else {
                throw r.malformed("disk name of \(nameLength) bytes; 1...\(StreamLimits.maxDiskName) allowed")
            }
            let name = try r.string(24, nameLength, "disk name")
            try r.requireEnd(24 + nameLength)
            let blockSize = r.le(4, as: UInt32.self)
            let size = r.le(8, as: UInt64.self)
            guard StreamLimits.diskBlockSizes.contains(blockSize) else {
                throw r.malformed("disk \"\(name)\": block size \(blockSize) is not one of \(StreamLimits.diskBlockSizes.sorted())")
            }
            guard size > 0, size <= StreamLimits.maxDiskBytes, size % UInt64(blockSize) == 0 else {
                throw r.malformed("disk \"\(name)\": size \(size) bytes is not a positive multiple of its block size \(blockSize) up to \(StreamLimits.maxDiskBytes)")
            }
            return .diskDescriptor(DiskDescriptor(disk: r.le(0), blockSize: blockSize, sizeBytes: size, name: name))

        case .diskWrite:
            let length = Int(r.le(4, as: UInt32.self))
            guard length > 0, length <= StreamLimits.maxDiskWriteBytes else {
                throw r.malformed("\(length) data bytes; 1...\(StreamLimits.maxDiskWriteBytes) allowed")
            }
            try r.requireEnd(16 + length)
            return .diskWrite(DiskWriteView(disk: r.le(0), offset: r.le(8), data: r.view(16, length)))

        case .diskCommand:
            try r.requireEnd(24)
            let code = r.le(4, as: UInt16.self)
            guard let kind = DiskCommand.Kind(rawValue: code) else { throw r.malformed("unknown disk command \(code)") }
            try r.requireZero(6, as: UInt16.self)
            return .diskCommand(DiskCommand(disk: r.le(0), kind: kind, offset: r.le(8), length: r.le(16)))

        case .ack:
            try r.requireEnd(16)
            return .ack(Ack(epoch: r.le(0), backupMonotonicNs: r.le(8)))

        case .heartbeat:
            try r.requireEnd(16)
            return .heartbeat(Heartbeat(sequence: r.le(0), senderMonotonicNs: r.le(8)))

        case .streamEnd:
            let code = r.le(0, as: UInt32.self)
            guard let reason = StreamEndReason(rawValue: code) else { throw r.malformed("unknown stream end reason \(code)") }
            try r.requireZero(4, as: UInt32.self)
            let messageLength = Int(r.le(16, as: UInt32.self))
            try r.requireZero(20, as: UInt32.self)
            guard messageLength <= StreamLimits.maxString else {
                throw r.malformed("message of \(messageLength) bytes; at most \(StreamLimits.maxString)")
            }
            let message = try r.string(24, messageLength, "message")
            try r.requireEnd(24 + messageLength)
            return .streamEnd(StreamEnd(reason: reason, lastEpoch: r.le(8), message: message))

        case .error:
            let messageLength = Int(r.le(4, as: UInt32.self))
            guard messageLength <= StreamLimits.maxString else {
                throw r.malformed("message of \(messageLength) bytes; at most \(StreamLimits.maxString)")
            }
            let message = try r.string(8, messageLength, "message")
            try r.requireEnd(8 + messageLength)
            return .error(PeerError(code: r.le(0), message: message))
        }
    }

    /// Checks a PAGE_BATCH body completely and returns its view.
    private func parsePageBatch(_ r: BodyReader, header: StreamHeader) throws(StreamDecodeError) -> PageBatchView {
        let count = Int(r.le(0, as: UInt32.self))
        try r.requireZero(4, as: UInt32.self)
        guard count >= 1, count <= StreamLimits.maxPagesPerBatch else {
            throw r.malformed("page count \(count) outside 1...\(StreamLimits.maxPagesPerBatch)")
        }
        let indexEnd = Wire.batchPrefixBytes + Wire.batchEntryBytes * count
        try r.require(0, indexEnd, "index of \(count) entries")
        let pageSize = Int(header.pageSize)
        let deltaAllowed = header.features.contains(.deltaPages)
        var dataOffset = indexEnd
        var previousPFN: PFN?
        for i in 0..<count {
            let at = Wire.batchPrefixBytes + Wire.batchEntryBytes * i
            let word = r.le(at, as: UInt64.self)
            let length = Int(r.le(at + 8, as: UInt32.self))
            try r.requireZero(at + 12, as: UInt32.self)
            let pfn = word & (Wire.pfnLimit - 1)
            guard (word >> 52) & 0xFF == 0 else {
                throw r.malformed("entry \(i): bits 52-59 of the PFN word \(hex(word)) are not zero (PFNs are below 2^52)")
            }
            guard let encoding = PageEncoding(rawValue: UInt8(word >> 60)) else {
                throw r.malformed("entry \(i) (PFN \(pfn)): unknown page encoding \(word >> 60)")
            }
            if let previousPFN, pfn <= previousPFN {
                throw r.malformed("entry \(i): PFN \(pfn) does not follow PFN \(previousPFN) (PFNs strictly increase within a batch)")
            }
            previousPFN = pfn
            switch encoding {
            case .raw:
                guard length == pageSize else { throw r.malformed("entry \(i) (PFN \(pfn)): raw page of \(length) bytes, page size is \(pageSize)") }
            case .zero, .absent:
                guard length == 0 else { throw r.malformed("entry \(i) (PFN \(pfn)): \(encoding) page with \(length) data bytes") }
            case .delta:
                guard deltaAllowed else {
                    throw r.malformed("entry \(i) (PFN \(pfn)): delta page, but the stream header did not enable delta pages")
                }
                guard length > 0, length < pageSize else {
                    throw r.malformed("entry \(i) (PFN \(pfn)): delta of \(length) bytes; 1...\(pageSize - 1) allowed")
                }
            }
            let padded = align8(length)
            try r.require(dataOffset, padded, "entry \(i) (PFN \(pfn)) data")
            for k in (dataOffset + length)..<(dataOffset + padded) where r.le(k, as: UInt8.self) != 0 {
                throw StreamDecodeError(.nonZeroPadding, typeCode: r.type.rawValue, offset: r.offset,
                    "padding after entry \(i)'s data (PFN \(pfn)) at body byte \(k) is not zero")
            }
            if encoding == .delta {
                do throws(PageDeltaError) {
                    try PageDelta.validate(r.view(dataOffset, length), pageSize: pageSize)
                } catch {
                    throw r.malformed("entry \(i) (PFN \(pfn)): \(error)")
                }
            }
            // SAFETY: i < count ≤ maxPagesPerBatch, the capacity of batchOffsets; offsets fit
            // UInt32 because bodies are at most StreamLimits.maxRecordBody bytes.
            batchOffsets[i] = UInt32(dataOffset)
            dataOffset += padded
        }
        try r.requireEnd(dataOffset)
        guard let body = r.body.baseAddress else { throw r.malformed("empty body") }
        return PageBatchView(pageSize: pageSize, count: count, body: body, dataOffsets: UnsafePointer(batchOffsets))
    }
}
