/// One bit per guest page frame: set when the page must be sent in the next checkpoint.
///
/// Preallocated for the guest's whole PFN space; harvesting and clearing never allocate.
public struct DirtyBitmap: ~Copyable {
    /// Number of page frames covered.
    public let pageCount: UInt64
    private let words: UnsafeMutablePointer<UInt64>
    private let wordCount: Int

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        wordCount = Int((pageCount + 63) / 64)
        words = .allocate(capacity: max(wordCount, 1))
        words.initialize(repeating: 0, count: max(wordCount, 1))
    }

    deinit { words.deallocate() }

    public func isSet(_ pfn: PFN) -> Bool {
        precondition(pfn < pageCount, "PFN \(pfn) outside the bitmap of \(pageCount) pages")
        return words[Int(pfn >> 6)] & (1 << (pfn & 63)) != 0
    }

    public mutating func set(_ pfn: PFN) {
        precondition(pfn < pageCount, "PFN \(pfn) outside the bitmap of \(pageCount) pages")
        words[Int(pfn >> 6)] |= 1 << (pfn & 63)
    }

    public mutating func clear(_ pfn: PFN) {
        precondition(pfn < pageCount, "PFN \(pfn) outside the bitmap of \(pageCount) pages")
        words[Int(pfn >> 6)] &= ~(1 << (pfn & 63))
    }

    /// ORs a whole 64-page word in (backends that keep their own word-sized log).
    public mutating func or(word index: Int, _ bits: UInt64) {
        words[index] |= bits
    }

    /// Number of 64-bit words.
    public var wordCountValue: Int { wordCount }

    /// The 64-page word at `index`.
    public func word(_ index: Int) -> UInt64 { words[index] }

    public mutating func clearAll() {
        words.update(repeating: 0, count: wordCount)
    }

    /// Number of set bits.
    public var count: Int {
        var n = 0
        for i in 0..<wordCount { n += words[i].nonzeroBitCount }
        return n
    }

    /// Moves the lowest set pages, at most `limit` of them, into `destination` (same size) and
    /// clears them here; returns how many moved. Word by word, stopping at the limit.
    public mutating func move(upTo limit: Int, into destination: inout DirtyBitmap) -> Int {
        precondition(destination.pageCount == pageCount, "bitmaps of \(pageCount) and \(destination.pageCount) pages")
        var moved = 0
        var i = 0
        while i < wordCount && moved < limit {
            var w = words[i]
            if w != 0 {
                if w.nonzeroBitCount > limit - moved {
                    // Keep only the lowest (limit - moved) bits of this word.
                    var take: UInt64 = 0
                    for _ in 0..<(limit - moved) {
                        take |= w & (~w &+ 1)
                        w &= w &- 1
                    }
                    w = take
                }
                destination.words[i] |= w
                words[i] &= ~w
                moved += w.nonzeroBitCount
            }
            i += 1
        }
        return moved
    }

    /// Calls `body` for each set PFN in ascending order.
    public func forEachSet(_ body: (PFN) throws -> Void) rethrows {
        for i in 0..<wordCount {
            var w = words[i]
            while w != 0 {
                let bit = UInt64(w.trailingZeroBitCount)
                try body(UInt64(i) << 6 | bit)
                w &= w &- 1
            }
        }
    }
}
