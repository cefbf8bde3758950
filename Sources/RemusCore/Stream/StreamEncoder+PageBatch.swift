// PAGE_BATCH encoding straight from a StagingArena: the record header and index go into the
// encoder's own buffer, page data is referenced where it lies (raw pages in the arena, deltas in
// a scratch buffer), so shipping a batch is one writev and no page is copied.

/// A run of bytes to write, laid out like `struct iovec` (base address, then length as a
/// pointer-sized integer), so the runtime can pass an array of them to writev(2) unchanged.
@frozen
public struct StreamSegment: Equatable {
    /// First byte.
    public var base: UnsafeRawPointer
    /// Length in bytes.
    public var count: Int
    /// A segment of `count` bytes at `base`.
    public init(base: UnsafeRawPointer, count: Int) {
        self.base = base
        self.count = count
    }
}

/// One encoded PAGE_BATCH, ready to write: `segments` in order are the record's bytes.
///
/// The segments point into the encoder and the arena: they stay valid until the encoder's next
/// page-batch call and while the arena is neither reset nor appended to. On Linux a batch has at
/// most 1 + pages segments (adjacent raw pages of the arena are merged); a writer must be ready
/// to split them over several writev calls (IOV_MAX is 1024) and to continue after partial writes.
public struct EncodedPageBatch {
    /// The record header as written (its CRC covers all segments).
    public let header: RecordHeader
    /// The record's bytes: header and index first, then page data.
    public let segments: UnsafeBufferPointer<StreamSegment>
    /// Pages sent as `.raw`.
    public let rawPages: Int
    /// Pages sent as `.zero` (including raw arena pages found to be all zero).
    public let zeroPages: Int
    /// Pages sent as `.delta`.
    public let deltaPages: Int
    /// Pages sent as `.absent`.
    public let absentPages: Int
    /// Total bytes of the record on the wire.
    public var byteCount: Int { header.wireBytes }
}

extension StreamEncoder {
    /// Encodes arena entries `entries` as one PAGE_BATCH without delta encoding.
    ///
    /// Raw pages that are all zero go out as `.zero`. Allocates nothing.
    /// - Parameters:
    ///   - arena: the captured pages; its page size must be the stream's.
    ///   - entries: 1 … `maxPagesPerBatch` consecutive entries, PFNs strictly increasing.
    public mutating func encodePageBatch(_ arena: StagingArena, entries: Range<Int>) -> EncodedPageBatch {
        encodeBatch(arena, entries: entries, useDelta: false) { _ in nil }
    }

    /// Encodes arena entries `entries` as one PAGE_BATCH, delta-encoding a page against the copy
    /// `deltaBase` returns for its PFN when that is shorter than the page.
    ///
    /// Deltas are used only when the negotiated features contain `.deltaPages`. `deltaBase` must
    /// return exactly what the receiver holds for that PFN (the last content sent and committed),
    /// `pageSize` bytes, or nil. Allocates nothing per page (the delta scratch buffer is allocated
    /// on the first call).
    public mutating func encodePageBatch(
        _ arena: StagingArena, entries: Range<Int>, deltaBase: (PFN) -> UnsafeRawBufferPointer?
    ) -> EncodedPageBatch {
        encodeBatch(arena, entries: entries, useDelta: features.contains(.deltaPages), deltaBase: deltaBase)
    }

    /// Encodes a PAGE_BATCH and appends its bytes to `out` (a copy: for tests and golden files).
    public mutating func appendPageBatch(_ arena: StagingArena, entries: Range<Int>, into out: inout [UInt8]) {
        let batch = encodePageBatch(arena, entries: entries)
        Self.copy(batch, into: &out)
    }

    /// Like `appendPageBatch(_:entries:into:)`, with delta encoding against `deltaBase`.
    public mutating func appendPageBatch(
        _ arena: StagingArena, entries: Range<Int>, deltaBase: (PFN) -> UnsafeRawBufferPointer?, into out: inout [UInt8]
    ) {
        let batch = encodePageBatch(arena, entries: entries, deltaBase: deltaBase)
        Self.copy(batch, into: &out)
    }

    private static func copy(_ batch: EncodedPageBatch, into out: inout [UInt8]) {
        out.reserveCapacity(out.count + batch.byteCount)
        for segment in batch.segments {
            out.append(contentsOf: UnsafeRawBufferPointer(start: segment.base, count: segment.count))
        }
    }

    private mutating func encodeBatch(
        _ arena: StagingArena, entries: Range<Int>, useDelta: Bool, deltaBase: (PFN) -> UnsafeRawBufferPointer?
    ) -> EncodedPageBatch {
        let n = entries.count
        precondition(n > 0 && n <= maxPagesPerBatch, "a PAGE_BATCH holds 1...\(maxPagesPerBatch) pages, not \(n)")
        precondition(entries.lowerBound >= 0 && entries.upperBound <= arena.count, "entries \(entries) outside the arena's 0..<\(arena.count)")
        precondition(arena.pageSize == pageSize, "arena page size \(arena.pageSize), stream page size \(pageSize)")
        // A sealed arena's pages were checksummed and zero-tested after capture: without deltas
        // (whose bytes are computed here) the batch's CRC is combined from those, page data unread.
        let sealed = arena.isSealed && !useDelta
        if sealed && pageShift?.length != pageSize { pageShift = CRC32C.Shift(length: pageSize) }
        if useDelta && deltaScratch == nil {
            deltaScratch = .allocate(byteCount: maxPagesPerBatch * pageSize, alignment: 8)
        }
        let head = batchHead
        let indexStart = RecordHeader.size + Wire.batchPrefixBytes
        let indexEnd = indexStart + Wire.batchEntryBytes * n
        head.storeLE(UInt32(n), at: RecordHeader.size)
        head.storeLE(UInt32(0), at: RecordHeader.size + 4)

        var segmentCount = 1
        var lastSegmentInScratch = false
        var bodyLength = indexEnd - RecordHeader.size
        var deltaUsed = 0
        var counts = (raw: 0, zero: 0, delta: 0, absent: 0)
        var previousPFN: PFN?
        for k in 0..<n {
            let index = entries.lowerBound + k
            let entry = arena.entry(index)
            precondition(entry.pfn < Wire.pfnLimit, "PFN \(entry.pfn) is not below 2^52")
            if let previousPFN {
                precondition(entry.pfn > previousPFN, "arena PFNs not strictly increasing: \(entry.pfn) after \(previousPFN)")
            }
            previousPFN = entry.pfn

            var encoding = entry.encoding
            var length = 0
            var data: UnsafeRawPointer?
            var padded = 0
            var inScratch = false
            if encoding == .raw {
                let page = arena.pageData(index)
                if sealed ? arena.pageSeal(index)!.isZero : isZeroPage(page) {
                    encoding = .zero
                } else if useDelta, let scratch = deltaScratch, let base = deltaBase(entry.pfn), base.count == pageSize,
                    let deltaLength = PageDelta.encode(
                        page: page, base: base,
                        into: UnsafeMutableRawBufferPointer(start: scratch + deltaUsed, count: pageSize))
                {
                    // SAFETY: the scratch holds maxPagesPerBatch pages and each delta plus its
                    // padding takes at most one page (a delta is shorter than a page, and a page
                    // is a multiple of 8), so deltaUsed + padded stays within it.
                    encoding = .delta
                    length = deltaLength
                    padded = align8(deltaLength)
                    (scratch + deltaUsed + deltaLength).initializeMemory(as: UInt8.self, repeating: 0, count: padded - deltaLength)
                    data = UnsafeRawPointer(scratch + deltaUsed)
                    inScratch = true
                    deltaUsed += padded
                } else {
                    length = pageSize
                    padded = pageSize
                    data = page.baseAddress
                }
            }
            switch encoding {
            case .raw: counts.raw += 1
            case .zero: counts.zero += 1
            case .delta: counts.delta += 1
            case .absent: counts.absent += 1
            }
            // SAFETY: batchHead holds the header, prefix and maxPagesPerBatch index entries; k < n ≤ that.
            let at = indexStart + Wire.batchEntryBytes * k
            head.storeLE(entry.pfn | UInt64(encoding.rawValue) << 60, at: at)
            head.storeLE(UInt32(length), at: at + 8)
            head.storeLE(UInt32(0), at: at + 12)
            if let data {
                // Merge with the previous segment when it ends where this one starts in the same
                // buffer (consecutive raw pages of the arena, consecutive deltas).
                let last = segmentStorage[segmentCount - 1]
                if segmentCount > 1 && lastSegmentInScratch == inScratch && last.base + last.count == data {
                    segmentStorage[segmentCount - 1].count += padded
                } else {
                    // SAFETY: at most one segment per page plus the head: segmentStorage holds 1 + maxPagesPerBatch.
                    segmentStorage[segmentCount] = StreamSegment(base: data, count: padded)
                    segmentCount += 1
                    lastSegmentInScratch = inScratch
                }
                bodyLength += padded
            }
        }
        segmentStorage[0] = StreamSegment(base: UnsafeRawPointer(head), count: indexEnd)

        let flags = RecordHeader.mandatoryFlag
        var crc = RecordHeader.crcOfFields(typeCode: RecordType.pageBatch.rawValue, flags: flags, bodyLength: UInt32(bodyLength))
        crc = CRC32C.extend(crc, head + RecordHeader.size, indexEnd - RecordHeader.size)
        if sealed, let shift = pageShift {
            // The data segments are exactly the non-zero raw pages, in entry order.
            for index in entries where arena.entry(index).encoding == .raw {
                let seal = arena.pageSeal(index)!
                if !seal.isZero { crc = CRC32C.extend(crc, register: seal.register, shift: shift) }
            }
        } else {
            for s in 1..<segmentCount {
                crc = CRC32C.extend(crc, segmentStorage[s].base, segmentStorage[s].count)
            }
        }
        let header = RecordHeader(typeCode: RecordType.pageBatch.rawValue, flags: flags, bodyLength: UInt32(bodyLength), crc: crc)
        header.write(to: head)
        countInDigest(header)
        return EncodedPageBatch(
            header: header, segments: UnsafeBufferPointer(start: segmentStorage, count: segmentCount),
            rawPages: counts.raw, zeroPages: counts.zero, deltaPages: counts.delta, absentPages: counts.absent)
    }
}

/// Whether every byte of `page` is zero. `page.count` is a multiple of 64 (every v1 page size).
@inline(__always)
func isZeroPage(_ page: UnsafeRawBufferPointer) -> Bool {
    guard let p = page.baseAddress else { return true }
    var i = 0
    // SAFETY: i + 64 ≤ page.count in every iteration (page sizes are multiples of 64).
    while i < page.count {
        var w = p.loadUnaligned(fromByteOffset: i, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 8, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 16, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 24, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 32, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 40, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 48, as: UInt64.self)
        w |= p.loadUnaligned(fromByteOffset: i &+ 56, as: UInt64.self)
        if w != 0 { return false }
        i &+= 64
    }
    return true
}
