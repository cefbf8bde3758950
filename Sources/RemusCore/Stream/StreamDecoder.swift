// The reading half of the codec: framing. Bytes go in (copied with append, or read(2) straight
// into the decoder's buffer), items come out of next(): the stream header, then records whose
// lengths, CRCs and padding were checked. Body layouts are parsed in StreamDecoder+Bodies.swift.
//
// Memory: one buffer that starts at `initialCapacity` and grows only to hold a record whose length
// passed every check, never beyond 16 + StreamLimits.maxRecordBody bytes (I8: nothing is allocated
// from an unchecked length).

/// Decodes stream format v1 incrementally.
///
/// Feed bytes with `append(_:)` or with `writableSpace()` + `commit(_:)` (read(2) into the
/// decoder's own buffer, no copy), then call `next()` until it returns nil ("need more"). Items
/// that point into the buffer (page batches, opaque payloads) stay valid until the next call of
/// any mutating method. At end of input call `finish()`: it reports a stream cut mid-record.
///
/// After an error every further `next()` and `finish()` throws the same error: a stream cannot be
/// resynchronised, the connection must be closed.
///
/// `@unchecked Sendable`: the decoder owns its buffers uniquely (it is `~Copyable`), so sending it
/// to another thread transfers them; views it returned are not Sendable and cannot follow.
public struct StreamDecoder: ~Copyable, @unchecked Sendable {
    /// Largest buffer the decoder ever holds: a record header plus the largest body (already a
    /// multiple of 8, so no padding).
    public static let maximumBufferBytes = RecordHeader.size + align8(StreamLimits.maxRecordBody)

    /// The stream header, once decoded.
    public private(set) var header: StreamHeader?
    /// Records of unknown types without the MANDATORY flag that were checked and skipped.
    public private(set) var skippedOptionalRecords = 0
    /// Stream bytes consumed by returned items.
    public var bytesConsumed: UInt64 { consumed }
    /// Largest record body this decoder takes, bytes: `StreamLimits.maxRecordBody` unless a
    /// reader lowers it (a backup does until it accepted the primary's hello, so a peer it has
    /// not accepted can make it hold no more than a DOMAIN_CONFIG).
    public var recordBodyLimit: Int = StreamLimits.maxRecordBody

    /// Bytes of the stream header or record being received, header included, once its length
    /// is in; nil between items (no byte of the next one buffered).
    public var pendingItemBytes: Int? {
        let available = end - start
        guard available > 0 else { return nil }
        let p = UnsafeRawPointer(buffer + start)
        if header == nil { return available >= 16 ? Int(p.le(12, as: UInt32.self)) : Wire.headerMinimumBytes }
        guard available >= RecordHeader.size else { return RecordHeader.size }
        return RecordHeader.size + align8(Int(min(p.le(8, as: UInt32.self), UInt32(StreamLimits.maxRecordBody))))
    }

    var buffer: UnsafeMutableRawPointer
    var capacity: Int
    /// First unconsumed byte in `buffer`.
    var start = 0
    /// One past the last valid byte in `buffer`.
    var end = 0
    /// Stream offset of `buffer[start]`.
    var consumed: UInt64 = 0
    var failure: StreamDecodeError?
    /// Data offsets of the last PAGE_BATCH's entries, for its view.
    let batchOffsets: UnsafeMutablePointer<UInt32>
    #if REMUS_FUZZING
    /// Fuzzing builds only: accept records whatever their CRC, so the fuzzer reaches the parsers.
    var verifiesChecksums = true
    #endif

    /// - Parameter initialCapacity: bytes of buffer to start with (at least 64 KiB is used; larger
    ///   lets one read(2) take more records). The buffer grows for large records as they announce
    ///   themselves, up to `maximumBufferBytes`.
    public init(initialCapacity: Int = 256 << 10) {
        capacity = min(max(initialCapacity, 64 << 10), Self.maximumBufferBytes)
        buffer = .allocate(byteCount: capacity, alignment: 16)
        batchOffsets = .allocate(capacity: StreamLimits.maxPagesPerBatch)
    }

    deinit {
        buffer.deallocate()
        batchOffsets.deallocate()
    }

    // MARK: - Input

    /// Copies as many of `bytes` as fit into the buffer and returns how many it took.
    ///
    /// Returns less than `bytes.count` only when complete items wait in the buffer: call `next()`
    /// until it returns nil, then append the rest. `feed(_:_:)` does this loop.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) -> Int {
        guard let source = bytes.baseAddress, !bytes.isEmpty else { return 0 }
        makeRoom()
        let n = min(bytes.count, capacity - end)
        // SAFETY: n ≤ capacity - end, so the copy stays inside the buffer.
        (buffer + end).copyMemory(from: source, byteCount: n)
        end += n
        return n
    }

    /// Space to read(2) into, at the end of the buffer. Follow with `commit(_:)`.
    ///
    /// Call it after `next()` returned nil: the space is then never empty and at least what the
    /// record being received still needs (once its header is in). Reads are shaped so that a
    /// stream of large records is not copied twice: bytes read past a record's end must be moved
    /// to the buffer's front when the next large record does not fit behind them. So a record of
    /// `boundedReadBytes` or more gets exactly what it still needs, and a read between items
    /// takes at most `boundedReadBytes / 2`: a large record then starts near the buffer's front,
    /// where `reserveRecord` leaves room for it. Valid until the next mutating call.
    public mutating func writableSpace() -> UnsafeMutableRawBufferPointer {
        makeRoom()
        var room = capacity - end
        if let pending = pendingItemBytes {
            if header != nil, pending >= Self.boundedReadBytes, start + pending > end { room = min(room, start + pending - end) }
        } else {
            room = min(room, Self.boundedReadBytes / 2)
        }
        return UnsafeMutableRawBufferPointer(start: buffer + end, count: room)
    }

    /// Records from this size on are read up to their end and no further (see `writableSpace`).
    public static let boundedReadBytes = 128 << 10

    /// Bytes moved to the buffer's front to make room (a measure of the reads' fit).
    public private(set) var compactedBytes: UInt64 = 0

    /// Declares that `count` bytes were written at the start of the last `writableSpace()`.
    public mutating func commit(_ count: Int) {
        precondition(count >= 0 && count <= capacity - end, "committed \(count) bytes into \(capacity - end) bytes of space")
        end += count
    }

    /// Appends all of `bytes`, calling `body` with every item that becomes complete, in order.
    /// Items are valid only during the call of `body` that receives them.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ body: (StreamItem) throws -> Void) throws {
        var rest = bytes
        while true {
            let taken = append(rest)
            rest = UnsafeRawBufferPointer(rebasing: rest[taken...])
            var produced = false
            while let item = try next() {
                produced = true
                try body(item)
            }
            if rest.isEmpty { return }
            // next() returned nil with bytes left: the pending item is incomplete and fits the
            // buffer, so append can always take more. Not progressing would be a decoder bug.
            precondition(taken > 0 || produced, "stream decoder made no progress")
        }
    }

    /// Moves unconsumed bytes to the front when that is needed to offer room.
    private mutating func makeRoom() {
        if start == end {
            start = 0
            end = 0
        } else if start > 0 && capacity - end < min(64 << 10, capacity / 4) {
            compact()
        }
    }

    private mutating func compact() {
        guard start > 0 else { return }
        // SAFETY: [start, end) lies inside the buffer; copyMemory has memmove semantics (overlap allowed).
        buffer.copyMemory(from: buffer + start, byteCount: end - start)
        compactedBytes += UInt64(end - start)
        end -= start
        start = 0
    }

    /// Makes the buffer hold `total` bytes from `start` (already length-checked by the caller).
    private mutating func reserveRecord(_ total: Int) {
        precondition(total <= Self.maximumBufferBytes, "record of \(total) bytes passed the length checks")
        if start + total <= capacity { return }
        compact()
        if total <= capacity { return }
        // Room for the small items a read between items may bring before the record (see
        // `writableSpace`), so the next record this large fits without moving it.
        let newCapacity = min(Self.maximumBufferBytes, max(total + Self.boundedReadBytes / 2, capacity * 2))
        let newBuffer = UnsafeMutableRawPointer.allocate(byteCount: newCapacity, alignment: 16)
        newBuffer.copyMemory(from: buffer, byteCount: end)
        buffer.deallocate()
        buffer = newBuffer
        capacity = newCapacity
    }

    // MARK: - Output

    /// The next complete item, or nil when more input is needed.
    ///
    /// Throws a `StreamDecodeError` naming the record and its stream offset when the stream is
    /// invalid; the decoder then stays failed.
    public mutating func next() throws(StreamDecodeError) -> StreamItem? {
        if let failure { throw failure }
        do throws(StreamDecodeError) {
            if header == nil { return try nextHeader() }
            return try nextRecord()
        } catch {
            failure = error
            throw error
        }
    }

    /// Declares the end of input. Throws `.truncated` when the input stopped inside the stream
    /// header or a record (call it after `next()` returned nil), or the decoder's earlier error.
    public mutating func finish() throws(StreamDecodeError) {
        if let failure { throw failure }
        let available = end - start
        let error: StreamDecodeError
        if header == nil {
            let needed = available >= 16 ? Int(UnsafeRawPointer(buffer + start).le(12, as: UInt32.self)) : Wire.headerMinimumBytes
            error = StreamDecodeError(.truncated, typeCode: nil, offset: consumed,
                "input ended after \(available) bytes of the stream header (at least \(needed) expected)")
        } else if available == 0 {
            return
        } else if available < RecordHeader.size {
            error = StreamDecodeError(.truncated, typeCode: nil, offset: consumed,
                "input ended after \(available) of the 16 record header bytes")
        } else {
            let p = UnsafeRawPointer(buffer + start)
            let typeCode = p.le(0, as: UInt32.self)
            let total = RecordHeader.size + align8(Int(p.le(8, as: UInt32.self)))
            error = StreamDecodeError(.truncated, typeCode: typeCode, offset: consumed,
                "input ended mid-record (\(available) of \(total) bytes received)")
        }
        failure = error
        throw error
    }

    // MARK: - Stream header

    private mutating func nextHeader() throws(StreamDecodeError) -> StreamItem? {
        let available = end - start
        let p = UnsafeRawPointer(buffer + start)
        let seen = min(available, Wire.magic.count)
        for i in 0..<seen where p.load(fromByteOffset: i, as: UInt8.self) != Wire.magic[i] {
            let bytes = UnsafeRawBufferPointer(start: p, count: seen)
            let text = String(decoding: bytes.map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: ".") }, as: UTF8.self)
            throw StreamDecodeError(.badMagic, typeCode: nil, offset: consumed,
                "not a remusd stream: first bytes \(bytes.map { hex($0).dropFirst(2) }.joined(separator: " ")) (\"\(text)\"), expected 89 52 45 4d 55 53 0d 0a (\"\\x89REMUS\\r\\n\")")
        }
        guard available >= 16 else { return nil }
        let major = p.le(8, as: UInt16.self)
        let minor = p.le(10, as: UInt16.self)
        guard major == StreamVersion.major else {
            throw StreamDecodeError(.unsupportedMajor, typeCode: nil, offset: consumed,
                "stream format version \(major).\(minor) is not readable by this build, which reads major version \(StreamVersion.major) (writes \(StreamVersion.major).\(StreamVersion.minor)); use remusd of the same major version on both hosts")
        }
        let length = Int(p.le(12, as: UInt32.self))
        guard length >= Wire.headerMinimumBytes, length % 8 == 0, length <= StreamLimits.maxStreamHeader else {
            throw StreamDecodeError(.badHeader, typeCode: nil, offset: consumed,
                "header length \(length) is not a multiple of 8 in \(Wire.headerMinimumBytes)...\(StreamLimits.maxStreamHeader)")
        }
        guard available >= length else { return nil }
        let stored = p.le(length - 4, as: UInt32.self)
        let computed = CRC32C.extend(0, p, length - 4)
        if stored != computed && checksumsEnforced {
            throw StreamDecodeError(.badHeader, typeCode: nil, offset: consumed,
                "CRC32C mismatch (expected \(hex(stored)), computed \(hex(computed)))")
        }
        let parsed = try parseHeader(p, length: length, minor: minor)
        header = parsed
        start += length
        consumed += UInt64(length)
        return .header(parsed)
    }

    private func parseHeader(_ p: UnsafeRawPointer, length: Int, minor: UInt16) throws(StreamDecodeError) -> StreamHeader {
        func bad(_ detail: String) -> StreamDecodeError {
            StreamDecodeError(.badHeader, typeCode: nil, offset: consumed, detail)
        }
        let features = StreamFeatures(rawValue: p.le(16, as: UInt64.self))
        let pageSize = p.le(24, as: UInt32.self)
        guard StreamLimits.pageSizes.contains(pageSize) else {
            throw bad("page size \(pageSize) is not one of \(StreamLimits.pageSizes.sorted())")
        }
        let backendCode = p.le(28, as: UInt16.self)
        guard let backend = BackendKind(rawValue: backendCode) else { throw bad("unknown backend kind \(backendCode)") }
        let roleCode = p.le(30, as: UInt16.self)
        guard let role = StreamRole(rawValue: roleCode) else { throw bad("unknown role \(roleCode)") }
        let uuid = GuestUUID(
            high: UInt64(bigEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self)),
            low: UInt64(bigEndian: p.loadUnaligned(fromByteOffset: 40, as: UInt64.self)))
        let nameLength = Int(p.le(48, as: UInt16.self))
        let versionLength = Int(p.le(50, as: UInt16.self))
        guard nameLength <= Wire.maxHeaderString, versionLength <= Wire.maxHeaderString else {
            throw bad("guest name of \(nameLength) or sender version of \(versionLength) bytes; at most \(Wire.maxHeaderString) each")
        }
        let stringsEnd = Wire.headerFixedBytes + nameLength + versionLength
        guard stringsEnd + 4 <= length else {
            throw bad("strings of \(nameLength) + \(versionLength) bytes do not fit a \(length)-byte header")
        }
        guard let name = String(validating: UnsafeRawBufferPointer(start: p + Wire.headerFixedBytes, count: nameLength), as: UTF8.self)
        else { throw bad("guest name is not valid UTF-8") }
        guard let version = String(validating: UnsafeRawBufferPointer(start: p + Wire.headerFixedBytes + nameLength, count: versionLength), as: UTF8.self)
        else { throw bad("sender version is not valid UTF-8") }
        if minor <= StreamVersion.minor {
            // A header of a minor we know has no fields after the strings: exact length, zero padding.
            guard length == align8(stringsEnd + 4) else {
                throw bad("header length \(length) for version 1.\(minor) with \(nameLength) + \(versionLength) string bytes should be \(align8(stringsEnd + 4))")
            }
            for i in stringsEnd..<(length - 4) where p.load(fromByteOffset: i, as: UInt8.self) != 0 {
                throw StreamDecodeError(.nonZeroPadding, typeCode: nil, offset: consumed, "stream header padding byte \(i) is not zero")
            }
        }
        return StreamHeader(
            major: StreamVersion.major, minor: minor, features: features, pageSize: pageSize, backend: backend,
            role: role, guestUUID: uuid, guestName: name, senderVersion: version)
    }

    // MARK: - Records

    private mutating func nextRecord() throws(StreamDecodeError) -> StreamItem? {
        guard let header else { return nil }
        guard end - start >= RecordHeader.size else { return nil }
        let offset = consumed
        var p = UnsafeRawPointer(buffer + start)
        let typeCode = p.le(0, as: UInt32.self)
        let flags = p.le(4, as: UInt16.self)
        let reserved = p.le(6, as: UInt16.self)
        let lengthField = p.le(8, as: UInt32.self)
        let storedCRC = p.le(12, as: UInt32.self)
        let type = RecordType(rawValue: typeCode)
        func error(_ kind: StreamDecodeError.Kind, _ detail: String) -> StreamDecodeError {
            StreamDecodeError(kind, typeCode: typeCode, offset: offset, detail)
        }

        // Everything the header alone can tell, before a byte of the body is awaited or allocated.
        guard flags & ~RecordHeader.mandatoryFlag == 0 else {
            throw error(.badRecordHeader, "unknown flag bits \(hex(flags & ~RecordHeader.mandatoryFlag)) (v1 defines only MANDATORY, bit 0)")
        }
        guard reserved == 0 else { throw error(.badRecordHeader, "reserved header field is \(hex(reserved)), must be 0") }
        guard lengthField <= UInt32(StreamLimits.maxRecordBody) else {
            throw error(.lengthOverLimit, "body length \(lengthField) exceeds the limit of \(StreamLimits.maxRecordBody) bytes")
        }
        let length = Int(lengthField)
        guard length <= recordBodyLimit else {
            throw error(.lengthOverLimit, "body length \(length) exceeds this reader's limit of \(recordBodyLimit) bytes (a backup takes no larger record before it accepted the primary's hello)")
        }
        if let type {
            let limit = type.maximumBody(pageSize: Int(header.pageSize))
            guard length <= limit else {
                throw error(.lengthOverLimit, "body length \(length) exceeds the \(type.wireName) limit of \(limit) bytes")
            }
            guard length >= type.minimumBody else {
                throw error(.malformedBody, "body of \(length) bytes is shorter than the \(type.minimumBody) bytes of its fields")
            }
            guard flags & RecordHeader.mandatoryFlag != 0 else {
                throw error(.badRecordHeader, "MANDATORY flag clear on a v1 record type (v1 writes every record type as mandatory)")
            }
        }
        let total = RecordHeader.size + align8(length)
        if end - start < total {
            reserveRecord(total)
            return nil
        }

        // The whole record is here.
        p = UnsafeRawPointer(buffer + start)
        let body = UnsafeRawBufferPointer(start: p + RecordHeader.size, count: length)
        let computed = CRC32C.extend(CRC32C.extend(0, p, 12), body)
        if computed != storedCRC && checksumsEnforced {
            throw error(.crcMismatch, "CRC32C mismatch (expected \(hex(storedCRC)), computed \(hex(computed)))")
        }
        let bodyStart = p + RecordHeader.size
        for i in length..<align8(length) where bodyStart.load(fromByteOffset: i, as: UInt8.self) != 0 {
            throw error(.nonZeroPadding, "padding byte \(i - length) after the \(length)-byte body is not zero")
        }
        let recordHeader = RecordHeader(typeCode: typeCode, flags: flags, bodyLength: lengthField, crc: storedCRC)
        start += total
        consumed += UInt64(total)

        guard let type else {
            if recordHeader.isMandatory {
                throw error(.unknownMandatoryRecord, "unknown record type \(hex(typeCode)) marked mandatory; this build reads stream format \(StreamVersion.major).\(StreamVersion.minor), the sender writes 1.\(header.minor)")
            }
            skippedOptionalRecords += 1
            return .record(DecodedRecord(offset: offset, header: recordHeader, content: .skippedOptional))
        }
        var reader = BodyReader(body: body, type: type, offset: offset, allowsTrailing: header.minor > StreamVersion.minor)
        let content = try parseBody(&reader, header: header)
        return .record(DecodedRecord(offset: offset, header: recordHeader, content: content))
    }

    /// Whether CRC mismatches are errors (always, except in fuzzing builds that turn them off).
    var checksumsEnforced: Bool {
        #if REMUS_FUZZING
        return verifiesChecksums
        #else
        return true
        #endif
    }
}
