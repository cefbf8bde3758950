import Testing
@testable import RemusCore

/// A random value of every non-page record type.
func randomRecord(_ type: RecordType, _ g: inout SeededGenerator) -> StreamRecord {
    func u64() -> UInt64 { g.next() }
    func i64() -> Int64 { Int64(bitPattern: g.next()) }
    func u32() -> UInt32 { UInt32(truncatingIfNeeded: g.next()) }
    func blob(_ max: Int) -> [UInt8] { g.bytes(Int.random(in: 0...max, using: &g)) }
    switch type {
    case .checkpointBegin:
        return .checkpointBegin(CheckpointBegin(epoch: u64(), kind: [.precopy, .checkpoint, .final].randomElement(using: &g)!))
    case .checkpointEnd:
        return .checkpointEnd(CheckpointEnd(epoch: u64(), recordCount: u32(), digest: u32(), payloadBytes: u64()))
    case .vcpuState:
        return .vcpuState(VCPUState(vcpu: u32(), format: u32(), bytes: blob(300)))
    case .deviceState:
        var name = g.string(maxBytes: 40)
        if name.isEmpty { name = "d" }
        return .deviceState(DeviceState(name: name, bytes: blob(300)))
    case .clock:
        return .clock(ClockState(guestMonotonicNs: u64(), guestWallNs: i64(), tscKHz: u32(), hostMonotonicNs: u64(), hostWallNs: i64()))
    case .memoryLayout:
        var ranges: [PFNRange] = []
        var next: UInt64 = UInt64.random(in: 0...1000, using: &g)
        for _ in 0..<Int.random(in: 0...20, using: &g) {
            let count = UInt64.random(in: 1...5000, using: &g)
            ranges.append(PFNRange(start: next, count: count))
            next += count + UInt64.random(in: 1...100_000, using: &g)
        }
        return .memoryLayout(MemoryLayout(generation: u64(), ranges: ranges))
    case .opaquePayload:
        return .opaquePayload(OpaquePayload(stream: [.libxc, .libxl].randomElement(using: &g)!, sequence: u32(), bytes: blob(500)))
    case .domainConfig:
        return .domainConfig(DomainConfig(format: [.libxlJSON, .simulated].randomElement(using: &g)!, bytes: blob(300)))
    case .diskDescriptor:
        var name = g.string(maxBytes: 60)
        if name.isEmpty { name = "xvda" }
        let block: UInt32 = Bool.random(using: &g) ? 512 : 4096
        return .diskDescriptor(DiskDescriptor(disk: u32(), blockSize: block, sizeBytes: UInt64(block) * UInt64.random(in: 1...(1 << 40), using: &g), name: name))
    case .diskWrite:
        return .diskWrite(DiskWrite(disk: u32(), offset: u64(), data: g.bytes(Int.random(in: 1...2000, using: &g))))
    case .diskCommand:
        return .diskCommand(DiskCommand(disk: u32(), kind: DiskCommand.Kind.allCases.randomElement(using: &g)!, offset: u64(), length: u64()))
    case .ack:
        return .ack(Ack(epoch: u64(), backupMonotonicNs: u64()))
    case .heartbeat:
        return .heartbeat(Heartbeat(sequence: u64(), senderMonotonicNs: u64()))
    case .streamEnd:
        return .streamEnd(StreamEnd(reason: [.plannedStop, .switchover, .shutdown, .error].randomElement(using: &g)!, lastEpoch: u64(), message: g.string(maxBytes: 100)))
    case .error:
        return .error(PeerError(code: u32(), message: g.string(maxBytes: 100)))
    case .pageBatch:
        preconditionFailure("page batches are built from arenas")
    }
}

/// The naive delta encoder the optimised one must match byte for byte: byte-wise comparison,
/// one word at a time, arrays everywhere.
func naiveDelta(page: [UInt8], base: [UInt8]) -> [UInt8]? {
    let words = page.count / 8
    func changed(_ w: Int) -> Bool { (0..<8).contains { page[w * 8 + $0] != base[w * 8 + $0] } }
    func le16(_ v: Int) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8)] }
    var out: [UInt8] = []
    var w = 0
    while w < words {
        var skip = 0
        while w < words && !changed(w) { skip += 1; w += 1 }
        if w == words { break }
        var literals: [UInt8] = []
        var n = 0
        while w < words && changed(w) {
            for b in 0..<8 { literals.append(page[w * 8 + b] ^ base[w * 8 + b]) }
            n += 1
            w += 1
        }
        out += le16(skip) + le16(n) + literals
    }
    if out.isEmpty { out = le16(words) + le16(0) }
    return out.count < page.count ? out : nil
}

/// A page derived from `base` with a change pattern.
func mutatedPage(_ base: [UInt8], _ g: inout SeededGenerator) -> [UInt8] {
    var page = base
    switch Int.random(in: 0..<5, using: &g) {
    case 0: break  // unchanged
    case 1:  // a few bytes
        for _ in 0..<Int.random(in: 1...8, using: &g) { page[Int.random(in: 0..<page.count, using: &g)] ^= UInt8.random(in: 1...255, using: &g) }
    case 2:  // a contiguous region
        let start = Int.random(in: 0..<page.count, using: &g)
        let end = min(page.count, start + Int.random(in: 1...1500, using: &g))
        for i in start..<end { page[i] = UInt8.random(in: 0...255, using: &g) }
    case 3:  // dense random
        page = g.bytes(page.count)
    default:  // every other word
        for w in stride(from: 0, to: page.count / 8, by: 2) { page[w * 8] ^= 0x5A }
    }
    return page
}

@Suite("Stream codec round trips")
struct StreamRoundTripTests {
    @Test func everyRecordTypeRoundTripsWithRandomContents() throws {
        var g = SeededGenerator(seed: 0xC0DEC)
        let types = RecordType.allCases.filter { $0 != .pageBatch }
        for _ in 0..<300 {
            var written: [StreamRecord] = []
            for _ in 0..<Int.random(in: 1...20, using: &g) {
                written.append(randomRecord(types.randomElement(using: &g)!, &g))
            }
            let header = StreamHeader(
                minor: 0, features: StreamFeatures(rawValue: g.next()), pageSize: [4096, 16384, 65536].randomElement(using: &g)!,
                backend: BackendKind.allCases.randomElement(using: &g)!, role: [.primary, .backup].randomElement(using: &g)!,
                guestUUID: GuestUUID(high: g.next(), low: g.next()), guestName: g.string(maxBytes: 255),
                senderVersion: g.string(maxBytes: 255))
            let bytes = try buildStream(header) { e, out in
                for r in written { try e.append(r, into: &out) }
            }
            let outcome = decode(bytes)
            #expect(outcome.error == nil, "\(String(describing: outcome.error))")
            #expect(outcome.items.first == .header(header))
            #expect(outcome.items.dropFirst().map { $0.content?.record } == written.map { $0 })
        }
    }

    @Test func encoderRecordsAreEightByteAlignedAndHeadersAreWhatWasWritten() throws {
        var g = SeededGenerator(seed: 77)
        for type in RecordType.allCases where type != .pageBatch {
            let record = randomRecord(type, &g)
            var encoder = StreamEncoder(pageSize: 4096, features: [])
            var out: [UInt8] = []
            try encoder.append(record, into: &out)
            #expect(out.count % 8 == 0)
            let length = out.withUnsafeBytes { UnsafeRawPointer($0.baseAddress!).le(8, as: UInt32.self) }
            #expect(out.count == 16 + align8(Int(length)), "\(type.wireName)")
            #expect(out.withUnsafeBytes { UnsafeRawPointer($0.baseAddress!).le(0, as: UInt32.self) } == type.rawValue)
        }
    }

    @Test func pageBatchesRoundTripInAllFourEncodingsWithDeltas() throws {
        var g = SeededGenerator(seed: 0xBA7C4)
        var sawEncodings = Set<PageEncoding>()
        for _ in 0..<150 {
            let count = Int.random(in: 1...48, using: &g)
            var pfn = PFN.random(in: 0...100, using: &g)
            var pages: [(PFN, PageEncoding, [UInt8]?)] = []
            let store = PageStore()
            var expected: [(pfn: PFN, encoding: PageEncoding, content: [UInt8]?)] = []
            for _ in 0..<count {
                pfn += PFN.random(in: 1...3, using: &g)
                switch Int.random(in: 0..<6, using: &g) {
                case 0:
                    pages.append((pfn, .zero, nil))
                    expected.append((pfn, .zero, nil))
                case 1:
                    pages.append((pfn, .absent, nil))
                    expected.append((pfn, .absent, nil))
                case 2:
                    pages.append((pfn, .raw, [UInt8](repeating: 0, count: 4096)))
                    expected.append((pfn, .zero, nil))
                case 3:
                    let page = g.bytes(4096)
                    pages.append((pfn, .raw, page))
                    expected.append((pfn, .raw, page))
                default:
                    let base = g.bytes(4096)
                    var page = mutatedPage(base, &g)
                    if page.allSatisfy({ $0 == 0 }) { page[0] = 1 }
                    store.set(pfn, base)
                    pages.append((pfn, .raw, page))
                    expected.append((pfn, naiveDelta(page: page, base: base) == nil ? .raw : .delta, page))
                }
            }
            let arena = makeArena(pages)
            let bytes = buildStream { e, out in
                e.appendPageBatch(arena, entries: 0..<count, deltaBase: store.base, into: &out)
            }
            let outcome = decode(bytes)
            try #require(outcome.error == nil, "\(String(describing: outcome.error))")
            guard case .pageBatch(let decoded)? = outcome.items.last?.content else {
                Issue.record("no page batch decoded")
                continue
            }
            #expect(decoded.map(\.pfn) == expected.map(\.pfn))
            #expect(decoded.map(\.encoding) == expected.map(\.encoding))
            for (page, want) in zip(decoded, expected) {
                sawEncodings.insert(page.encoding)
                switch page.encoding {
                case .raw: #expect(page.data == want.content)
                case .zero, .absent: #expect(page.data.isEmpty)
                case .delta:
                    var applied = store.bytes(page.pfn)!
                    try page.data.withUnsafeBytes { delta in
                        try applied.withUnsafeMutableBytes { try PageDelta.apply(delta, to: $0) }
                    }
                    #expect(applied == want.content, "delta for PFN \(page.pfn) reproduces the page")
                    #expect(page.data == naiveDelta(page: want.content!, base: store.bytes(page.pfn)!))
                }
            }
        }
        #expect(sawEncodings == Set(PageEncoding.allCases))
    }

    @Test func deltaIsNotUsedUnlessNegotiated() throws {
        let base = patternPage(1)
        var page = base
        page[10] ^= 1
        let store = PageStore([4: base])
        let arena = makeArena([(4, .raw, page)])
        let bytes = buildStream(streamHeader(features: [])) { e, out in
            e.appendPageBatch(arena, entries: 0..<1, deltaBase: store.base, into: &out)
        }
        let outcome = decode(bytes)
        #expect(outcome.error == nil)
        #expect(outcome.items.last?.content == .pageBatch([OwnedPage(pfn: 4, encoding: .raw, data: page)]))
    }

    @Test func pageBatchSegmentsReferenceArenaPagesWithoutCopying() throws {
        let pages: [(PFN, PageEncoding, [UInt8]?)] = [
            (1, .raw, patternPage(1)), (2, .raw, patternPage(2)), (3, .zero, nil), (4, .raw, [UInt8](repeating: 0, count: 4096)),
            (6, .raw, patternPage(6)), (8, .absent, nil),
        ]
        let arena = makeArena(pages)
        var encoder = StreamEncoder(pageSize: 4096, features: [])
        let batch = encoder.encodePageBatch(arena, entries: 0..<6)
        // Head, then pages 1–2 merged (adjacent in the arena), then page 6 (after the zero page 4).
        #expect(batch.segments.count == 3)
        #expect(batch.segments[1].base == arena.pageData(0).baseAddress)
        #expect(batch.segments[1].count == 2 * 4096)
        #expect(batch.segments[2].base == arena.pageData(4).baseAddress)
        #expect((batch.rawPages, batch.zeroPages, batch.deltaPages, batch.absentPages) == (3, 2, 0, 1))
        #expect(batch.segments.reduce(0) { $0 + $1.count } == batch.byteCount)
        #expect(Swift.MemoryLayout<StreamSegment>.size == 16 && Swift.MemoryLayout<StreamSegment>.stride == 16, "iovec layout")
    }

    @Test func largePagesCapTheBatchSoItFitsTheRecordLimit() {
        let encoder = StreamEncoder(pageSize: 65536, features: [])
        #expect(encoder.maxPagesPerBatch == 127)
        #expect(8 + encoder.maxPagesPerBatch * (16 + 65536) <= StreamLimits.maxRecordBody)
        let small = StreamEncoder(pageSize: 4096, features: [])
        #expect(small.maxPagesPerBatch == 1024)
    }

    @Test func encoderRefusesValuesTheFormatCannotCarry() {
        var encoder = StreamEncoder(pageSize: 4096, features: [])
        var out: [UInt8] = []
        let tooLong = String(repeating: "x", count: StreamLimits.maxString + 1)
        #expect(throws: StreamEncodeError.self) { try encoder.append(.error(PeerError(code: 1, message: tooLong)), into: &out) }
        #expect(throws: StreamEncodeError.self) { try encoder.append(.deviceState(DeviceState(name: "", bytes: [])), into: &out) }
        let overlapping = MemoryLayout(generation: 1, ranges: [PFNRange(start: 0, count: 10), PFNRange(start: 10, count: 1)])
        #expect(throws: StreamEncodeError.self) { try encoder.append(.memoryLayout(overlapping), into: &out) }
        #expect(throws: StreamEncodeError.self) { try encoder.append(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: [UInt8](repeating: 0, count: (1 << 20) + 1))), into: &out) }
        #expect(out.isEmpty, "nothing is appended when a record is refused")
        var header: [UInt8] = []
        var h = streamHeader()
        h.guestName = String(repeating: "n", count: 256)
        #expect(throws: StreamEncodeError.self) { try StreamEncoder.appendHeader(h, into: &header) }
    }

    @Test func crcFastPathsMatchTheTableAtEveryLengthAndAlignment() {
        var g = SeededGenerator(seed: 5)
        let data = g.bytes(3 * 8192 * 2 + 4096)
        data.withUnsafeBytes { raw in
            for _ in 0..<400 {
                let start = Int.random(in: 0..<64, using: &g)
                let length = Int.random(in: 0...(raw.count - start), using: &g)
                let slice = UnsafeRawBufferPointer(rebasing: raw[start..<(start + length)])
                let seed = UInt32.random(in: 0...UInt32.max, using: &g)
                #expect(CRC32C.extend(seed, slice) == CRC32C.extendPortable(seed, slice))
            }
        }
        // Lengths around every path's thresholds (256-byte folding, 16-byte folds, 768/24576-byte
        // three-way blocks), each at several alignments and with chaining.
        data.withUnsafeBytes { raw in
            for length in [0, 1, 7, 8, 15, 16, 255, 256, 257, 271, 272, 511, 512, 513, 767, 768, 769, 4095, 4096, 4097, 24575, 24576, 24577] {
                for start in [0, 1, 3, 8, 13] {
                    let slice = UnsafeRawBufferPointer(rebasing: raw[start..<(start + length)])
                    #expect(CRC32C.extend(0xDEAD_BEEF, slice) == CRC32C.extendPortable(0xDEAD_BEEF, slice), "length \(length) at \(start)")
                    let half = length / 2
                    let chained = CRC32C.extend(CRC32C.extend(0, UnsafeRawBufferPointer(rebasing: slice[..<half])), UnsafeRawBufferPointer(rebasing: slice[half...]))
                    #expect(chained == CRC32C.extendPortable(0, slice))
                }
            }
        }
        let check = Array("123456789".utf8).withUnsafeBytes { CRC32C.extend(0, $0) }
        #expect(check == 0xE306_9283, "the CRC32C check value")
    }

    /// An emulator may advertise SSE4.2 and run crc32 bit by bit (QEMU's TCG: 159 MB/s against the
    /// table's 800): the table is taken only when it ran over twice as fast, never on a real CPU's
    /// ratio (the instruction about 2x the table) nor on a near tie.
    @Test func theTableReplacesTheInstructionOnlyWhenOverTwiceAsFast() {
        #expect(!CRC32C.prefersTable(instructionNs: 16_000, tableNs: 34_000), "a real CPU: the instruction wins")
        #expect(!CRC32C.prefersTable(instructionNs: 30_000, tableNs: 20_000), "1.5x: not enough to leave the instruction")
        #expect(!CRC32C.prefersTable(instructionNs: 40_000, tableNs: 20_000), "exactly 2x: the instruction stays")
        #expect(CRC32C.prefersTable(instructionNs: 410_000, tableNs: 82_000), "TCG's 5x: the table")
        #expect(!CRC32C.prefersTable(instructionNs: 410_000, tableNs: 0), "a table run too short to time decides nothing")
    }
}
