import Testing
@testable import RemusCore

/// Bytes of a record with the given raw header fields and body (CRC computed unless given).
func rawRecord(type: UInt32, flags: UInt16 = 1, reserved: UInt16 = 0, length: UInt32? = nil, body: [UInt8], crc: UInt32? = nil) -> [UInt8] {
    var out: [UInt8] = []
    out.appendLE(type)
    out.appendLE(flags)
    out.appendLE(reserved)
    out.appendLE(length ?? UInt32(body.count))
    let computed = out.withUnsafeBytes { CRC32C.extend(CRC32C.extend(0, UnsafeRawBufferPointer(rebasing: $0[0..<12])), body.withUnsafeBytes { $0 }) }
    out.appendLE(crc ?? computed)
    out += body
    out += [UInt8](repeating: 0, count: align8(body.count) - body.count)
    return out
}

func headerBytes(_ header: StreamHeader = streamHeader()) -> [UInt8] {
    var out: [UInt8] = []
    try! StreamEncoder.appendHeader(header, into: &out)
    return out
}

@Suite("Stream decoder")
struct StreamDecoderTests {
    let sample = sampleStream()

    @Test func sampleStreamDecodesCompletely() {
        let outcome = decode(sample)
        #expect(outcome.error == nil, "\(String(describing: outcome.error))")
        #expect(outcome.items.count == 22)
        guard case .header(let h)? = outcome.items.first else {
            Issue.record("no header first")
            return
        }
        #expect(h == streamHeader())
    }

    @Test func oneByteAtATimeGivesTheSameItemsAsWholeInput() {
        let whole = decode(sample)
        let bytewise = decode(sample, feeding: .oneByte)
        #expect(bytewise.error == nil)
        #expect(bytewise.items == whole.items)
    }

    @Test func randomChunkSizesGiveTheSameItemsAsWholeInput() {
        let whole = decode(sample)
        var g = SeededGenerator(seed: 42)
        for _ in 0..<40 {
            let sizes = (0..<50).map { _ in Int.random(in: 1...9000, using: &g) }
            let chunked = decode(sample, feeding: .chunks(sizes))
            #expect(chunked.error == nil)
            #expect(chunked.items == whole.items)
        }
    }

    @Test func socketReadsIntoTheDecodersBufferGiveTheSameItems() {
        let whole = decode(sample)
        var g = SeededGenerator(seed: 43)
        for _ in 0..<40 {
            let sizes = (0..<50).map { _ in Int.random(in: 1...70000, using: &g) }
            let reads = decode(sample, feeding: .socketReads(sizes))
            #expect(reads.error == nil)
            #expect(reads.items == whole.items)
        }
    }

    @Test func everyTruncationYieldsAPrefixOfTheRecordsThenTruncated() {
        let whole = decode(sample)
        let offsets = whole.items.compactMap(\.offset).map(Int.init)  // record starts
        let headerEnd = offsets[0]
        for cut in 0..<sample.count {
            let outcome = decode(Array(sample[0..<cut]))
            let complete = cut < headerEnd ? 0 : 1 + offsets.filter { start in
                let index = offsets.firstIndex(of: start)!
                let end = index + 1 < offsets.count ? offsets[index + 1] : sample.count
                return end <= cut
            }.count
            #expect(outcome.items == Array(whole.items.prefix(complete)), "cut at \(cut)")
            if offsets.contains(cut) {
                #expect(outcome.error == nil, "a cut at a record boundary (\(cut)) is a clean end of input")
                continue
            }
            guard let error = outcome.error else {
                Issue.record("cut at \(cut) not reported")
                continue
            }
            #expect(error.kind == .truncated, "cut at \(cut): \(error)")
            if cut < headerEnd {
                #expect(error.offset == 0 && error.typeCode == nil)
                #expect(error.description.hasPrefix("stream header at stream offset 0: input ended"))
            } else {
                let start = offsets.last { $0 <= cut }!
                #expect(error.offset == UInt64(start), "cut at \(cut) names the record at \(start)")
                if cut - start >= 16 {
                    let type = sample.withUnsafeBytes { UnsafeRawPointer($0.baseAddress!).le(start, as: UInt32.self) }
                    #expect(error.typeCode == type)
                    #expect(error.description.contains("at stream offset \(start): input ended mid-record"))
                }
            }
        }
    }

    @Test func everySingleBitFlipIsRejectedWithATypedError() {
        var g = SeededGenerator(seed: 0xF11B)
        var kinds: [StreamDecodeError.Kind: Int] = [:]
        for position in 0..<sample.count {
            var corrupt = sample
            corrupt[position] ^= 1 << UInt8.random(in: 0...7, using: &g)
            let outcome = decode(corrupt)
            guard let error = outcome.error else {
                Issue.record("flip at byte \(position) was accepted")
                continue
            }
            kinds[error.kind, default: 0] += 1
            #expect(outcome.maxBufferCapacity <= StreamDecoder.maximumBufferBytes)
            #expect(error.description.contains("at stream offset"))
        }
        #expect(Set(kinds.keys).isSubset(of: [.badMagic, .unsupportedMajor, .badHeader, .badRecordHeader, .unknownMandatoryRecord, .lengthOverLimit, .crcMismatch, .truncated, .malformedBody, .nonZeroPadding]))
        #expect(kinds[.crcMismatch, default: 0] > sample.count / 2, "most flips land in checksummed bytes: \(kinds)")
    }

    @Test func randomGarbageIsRejectedWithinTheMemoryLimit() {
        var g = SeededGenerator(seed: 0x6A4B)
        let header = headerBytes()
        for i in 0..<3000 {
            var bytes = i % 2 == 0 ? header : []
            bytes += g.bytes(Int.random(in: 0...300, using: &g))
            if i % 3 == 0, bytes.count >= header.count + 16 {
                // A plausible record header with a random length and type.
                bytes.withUnsafeMutableBytes {
                    $0.baseAddress!.storeLE(UInt32.random(in: 1...0x13, using: &g), at: header.count)
                    $0.baseAddress!.storeLE(UInt16(1), at: header.count + 4)
                    $0.baseAddress!.storeLE(UInt16(0), at: header.count + 6)
                }
            }
            let outcome = decode(bytes, feeding: .chunks([Int.random(in: 1...64, using: &g)]))
            #expect(outcome.error != nil || bytes == header, "garbage accepted: \(bytes.prefix(80))")
            #expect(outcome.maxBufferCapacity <= StreamDecoder.maximumBufferBytes)
        }
    }

    @Test func xenGarbageBatchSizeIsRejectedAsLengthOverLimitBeforeAllocation() throws {
        var decoder = StreamDecoder(initialCapacity: 64 << 10)
        let capacityBefore = decoder.capacity
        // Only the 16 header bytes arrive: the length alone must condemn the record.
        let bytes = headerBytes() + rawRecord(type: RecordType.pageBatch.rawValue, length: 1_970_103_633, body: []).prefix(16)
        _ = bytes.withUnsafeBytes { decoder.append($0) }
        #expect(try decoder.next() != nil)
        do {
            _ = try decoder.next()
            Issue.record("length 1970103633 accepted")
        } catch {
            #expect(error.kind == .lengthOverLimit)
            #expect(error.recordType == .pageBatch)
            #expect(error.offset == UInt64(headerBytes().count))
            #expect(error.description.contains("1970103633"))
        }
        #expect(decoder.capacity == capacityBefore, "nothing was allocated for the garbage length")
        #expect(throws: StreamDecodeError.self) { try decoder.next() }  // sticky
    }

    @Test func typeLimitRejectsAnOversizedSmallRecordFromItsHeader() throws {
        var decoder = StreamDecoder()
        let bytes = headerBytes() + rawRecord(type: RecordType.ack.rawValue, length: 1 << 20, body: []).prefix(16)
        _ = bytes.withUnsafeBytes { decoder.append($0) }
        _ = try decoder.next()
        #expect(throws: StreamDecodeError(.lengthOverLimit, typeCode: RecordType.ack.rawValue, offset: UInt64(headerBytes().count),
            "body length 1048576 exceeds the ACK limit of 4112 bytes")) { try decoder.next() }
    }

    @Test func bufferGrowsOnlyToTheAnnouncedCheckedLength() throws {
        var decoder = StreamDecoder(initialCapacity: 64 << 10)
        let arena = makeArena((0..<1000).map { (PFN($0), .raw, patternPage(UInt8($0 % 200))) })
        let bytes = buildStream { e, out in e.appendPageBatch(arena, entries: 0..<1000, into: &out) }
        // Header and the batch's record header only.
        _ = bytes.withUnsafeBytes { decoder.append(UnsafeRawBufferPointer(rebasing: $0[0..<(headerBytes().count + 16)])) }
        _ = try decoder.next()
        #expect(try decoder.next() == nil)
        #expect(decoder.capacity >= bytes.count - headerBytes().count)
        #expect(decoder.capacity <= StreamDecoder.maximumBufferBytes)
        #expect(decoder.writableSpace().count >= bytes.count - headerBytes().count - 16, "room for the rest of the record")
    }

    /// A Xen primary's live phase is a stream of 1 MiB OPAQUE_PAYLOADs. Reads that run past a
    /// record's end made the decoder move the next record's first part to the buffer's front
    /// for nearly every record (a second copy of the guest's memory on the backup); reads now
    /// stop at a large record's end, and small records still share reads.
    @Test func largeRecordsAreReadUpToTheirEndAndNotMovedAgain() throws {
        var g = SeededGenerator(seed: 21)
        let chunks = (0..<12).map { i in (0..<((1 << 20) - 8 * i - (i % 3))).map { _ in UInt8(truncatingIfNeeded: g.next()) } }
        let bytes = try buildStream { e, out in
            for (i, chunk) in chunks.enumerated() {
                try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
                try chunk.withUnsafeBytes { try e.appendOpaquePayload(stream: .libxl, sequence: UInt32(i), bytes: $0, into: &out) }
                try e.endCheckpoint(into: &out)
            }
        }
        let whole = decode(bytes)
        #expect(whole.error == nil)
        for reads in [[300 << 10, 700 << 10, 2 << 20], [64 << 10], [8 << 20]] {
            let outcome = decode(bytes, feeding: .socketReads(reads), initialCapacity: 256 << 10)
            #expect(outcome.error == nil)
            #expect(outcome.items == whole.items, "reads of \(reads)")
            // At most the part of a record read with the small ones before it, once: well under
            // one record, where reading past each end moved about 12 MiB.
            #expect(outcome.compactedBytes < 1 << 20, "reads of \(reads): moved \(outcome.compactedBytes) bytes")
        }
    }

    @Test func badMagicNamesWhatItSaw() {
        let outcome = decode(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        #expect(outcome.error?.kind == .badMagic)
        #expect(outcome.error?.description.contains("\"GET / HT\"") == true, "\(String(describing: outcome.error))")
        #expect(outcome.error?.description.hasPrefix("stream header at stream offset 0: not a remusd stream") == true)
        // Wrong from the first byte: rejected without waiting for 8 bytes.
        var decoder = StreamDecoder()
        _ = [UInt8(ascii: "G")].withUnsafeBytes { decoder.append($0) }
        #expect(throws: StreamDecodeError.self) { try decoder.next() }
    }

    @Test func unsupportedMajorNamesBothVersions() {
        let outcome = decode(headerBytes(StreamHeader(major: 2, minor: 3, features: [], pageSize: 4096, backend: .xen, role: .primary, guestUUID: .zero, guestName: "", senderVersion: "")))
        #expect(outcome.error?.kind == .unsupportedMajor)
        #expect(outcome.error?.description.contains("version 2.3") == true)
        #expect(outcome.error?.description.contains("major version 1") == true)
    }

    @Test func headerLengthIsBoundedBeforeTheRestIsRead() throws {
        var bytes = headerBytes()
        bytes.withUnsafeMutableBytes { $0.baseAddress!.storeLE(UInt32(1 << 20), at: 12) }
        var decoder = StreamDecoder()
        _ = bytes.prefix(16).withUnsafeBytes { decoder.append($0) }
        #expect(throws: StreamDecodeError.self) { try decoder.next() }
        for bad: UInt32 in [0, 8, 52, 60, 4104] {
            var b = headerBytes()
            b.withUnsafeMutableBytes { $0.baseAddress!.storeLE(bad, at: 12) }
            #expect(decode(b).error?.kind == .badHeader, "header length \(bad)")
        }
    }

    @Test func newerMinorHeaderFieldsAndTrailingBodyBytesAreIgnored() throws {
        // A 1.1 header with 16 bytes of a field this build does not know.
        var header = headerBytes(streamHeader(minor: 1))
        header.removeLast(4)
        header += [UInt8](repeating: 0xAB, count: 16)
        let newLength = UInt32(header.count + 4)
        header.withUnsafeMutableBytes { $0.baseAddress!.storeLE(newLength, at: 12) }
        let headerCRC = header.withUnsafeBytes { CRC32C.extend(0, $0) }
        header.appendLE(headerCRC)
        var body: [UInt8] = []
        body.appendLE(UInt64(7))
        body.appendLE(UInt64(99))
        body += [1, 2, 3, 4, 5, 6, 7, 8]  // a trailing field of 1.1
        let ack = rawRecord(type: RecordType.ack.rawValue, body: body)
        let newer = decode(header + ack)
        #expect(newer.error == nil, "\(String(describing: newer.error))")
        #expect(newer.items.last?.content?.record == .ack(Ack(epoch: 7, backupMonotonicNs: 99)))
        // The same trailing bytes in a 1.0 stream are an error: 1.0 has no such field.
        let older = decode(headerBytes() + ack)
        #expect(older.error?.kind == .malformedBody)
        // A shorter body is an error in any version.
        let short = decode(header + rawRecord(type: RecordType.ack.rawValue, body: Array(body.prefix(8))))
        #expect(short.error?.kind == .malformedBody)
    }

    @Test func headerFieldsOutsideV1AreRejected() {
        let base = headerBytes()
        let record = rawRecord(type: RecordType.heartbeat.rawValue, body: [UInt8](repeating: 0, count: 16))
        #expect(decode(base + rawRecord(type: RecordType.heartbeat.rawValue, flags: 3, body: [UInt8](repeating: 0, count: 16))).error?.kind == .badRecordHeader)
        #expect(decode(base + rawRecord(type: RecordType.heartbeat.rawValue, reserved: 1, body: [UInt8](repeating: 0, count: 16))).error?.kind == .badRecordHeader)
        #expect(decode(base + rawRecord(type: RecordType.heartbeat.rawValue, flags: 0, body: [UInt8](repeating: 0, count: 16))).error?.kind == .badRecordHeader)
        #expect(decode(base + record).error == nil)
        var padded = base + rawRecord(type: RecordType.error.rawValue, body: [0, 0, 0, 0, 1, 0, 0, 0, UInt8(ascii: "x")])
        padded[padded.count - 1] = 1
        #expect(decode(padded).error?.kind == .nonZeroPadding)
    }

    @Test func unknownOptionalRecordsAreSkippedAndCountedUnknownMandatoryRejected() {
        let base = headerBytes()
        let optional = decode(base + rawRecord(type: 0x7001, flags: 0, body: [1, 2, 3]) + rawRecord(type: 0x7002, flags: 0, body: []))
        #expect(optional.error == nil)
        #expect(optional.skippedOptional == 2)
        #expect(optional.items.dropFirst().map(\.content) == [.skipped, .skipped])
        let mandatory = decode(base + rawRecord(type: 0x7001, flags: 1, body: [1, 2, 3]))
        #expect(mandatory.error?.kind == .unknownMandatoryRecord)
        #expect(mandatory.error?.description.hasPrefix("record type 0x00007001 at stream offset \(base.count)") == true, "\(String(describing: mandatory.error))")
    }

    @Test func crcMismatchDescriptionNamesRecordOffsetAndBothValues() {
        var bytes = sample
        let offsets = decode(sample).items.compactMap(\.offset)
        // Corrupt the first PAGE_BATCH's data.
        let batchOffset = Int(offsets[2])
        bytes[batchOffset + 16 + 8 + 32 + 100] ^= 0x40
        let error = decode(bytes).error
        #expect(error?.kind == .crcMismatch)
        let text = error?.description ?? ""
        #expect(text.hasPrefix("PAGE_BATCH at stream offset \(batchOffset): CRC32C mismatch (expected 0x"), "\(text)")
        #expect(text.contains(", computed 0x") && text.hasSuffix("); record rejected"))
    }

    @Test func malformedPageBatchesAreRejected() throws {
        let header = headerBytes()
        func batch(_ entries: [(UInt64, UInt32)], data: [UInt8], count: UInt32? = nil) -> [UInt8] {
            var body: [UInt8] = []
            body.appendLE(count ?? UInt32(entries.count))
            body.appendLE(UInt32(0))
            for (word, length) in entries {
                body.appendLE(word)
                body.appendLE(length)
                body.appendLE(UInt32(0))
            }
            return header + rawRecord(type: RecordType.pageBatch.rawValue, body: body + data)
        }
        let page = [UInt8](repeating: 1, count: 4096)
        let zero: UInt64 = 1 << 60
        #expect(decode(batch([(5, 4096)], data: page)).error == nil)
        #expect(decode(batch([], data: [], count: 0)).error?.kind == .malformedBody, "count 0")
        #expect(decode(batch([(5, 4096)], data: page, count: 1025)).error?.kind == .malformedBody, "count over 1024")
        #expect(decode(batch([(5 | zero, 0), (5 | zero, 0)], data: [])).error?.kind == .malformedBody, "PFN repeated in a batch (I3)")
        #expect(decode(batch([(6 | zero, 0), (5 | zero, 0)], data: [])).error?.kind == .malformedBody, "PFNs decreasing")
        #expect(decode(batch([(5, 4000)], data: Array(page.prefix(4000)))).error?.kind == .malformedBody, "short raw page")
        #expect(decode(batch([(5 | zero, 8)], data: [UInt8](repeating: 0, count: 8))).error?.kind == .malformedBody, "zero page with data")
        #expect(decode(batch([(5 | 7 << 60, 0)], data: [])).error?.kind == .malformedBody, "unknown encoding")
        #expect(decode(batch([(5 | 1 << 55, 0)], data: [])).error?.kind == .malformedBody, "PFN above 2^52")
        #expect(decode(batch([(5, 4096)], data: page + [0, 0, 0, 0, 0, 0, 0, 0])).error?.kind == .malformedBody, "trailing bytes in 1.0")
        #expect(decode(batch([(5, 4096), (6, 4096)], data: page)).error?.kind == .malformedBody, "data missing")
        let delta: UInt64 = 2 << 60
        #expect(decode(batch([(5 | delta, 12)], data: [0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0])).error == nil)
        #expect(decode(batch([(5 | delta, 12)], data: [0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 9])).error?.kind == .nonZeroPadding)
        #expect(decode(batch([(5 | delta, 12)], data: [0, 0, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0])).error?.kind == .malformedBody, "delta literal past its end")
        let noDelta = headerBytes(streamHeader(features: []))
        let deltaBatch = batch([(5 | delta, 12)], data: [0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0])
        #expect(decode(noDelta + deltaBatch.dropFirst(header.count)).error?.kind == .malformedBody, "delta without the feature")
    }
}
