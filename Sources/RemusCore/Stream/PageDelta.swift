// The delta page encoding: a page XORed with the receiver's latest copy of it, run-length coded
// over 8-byte words. Pages a guest rewrites usually change in a few places, so the XOR is mostly
// zero words.
//
// Layout (all of the delta's bytes, no header of its own):
//   run*        run = zeroWords u16, literalWords u16, then literalWords × 8 bytes
// Applying a run skips `zeroWords` words (unchanged), then XORs the next `literalWords` words with
// the literal bytes (byte-wise: literal byte k = new byte k XOR base byte k). Runs are applied in
// order from word 0; words after the last run are unchanged. A valid delta has at least one run,
// every run has zeroWords + literalWords > 0, the runs cover at most the page's words, the last
// run's literals end exactly at the delta's end, and the delta is shorter than a page.

/// Why a delta was rejected: it is malformed for the page it is meant for.
public struct PageDeltaError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What was wrong, with byte offsets inside the delta.
    public var detail: String
    /// - Parameter detail: what was wrong.
    public init(_ detail: String) { self.detail = detail }
    /// "malformed page delta: …".
    public var description: String { "malformed page delta: \(detail)" }
}

/// Encodes and applies the `.delta` page encoding.
public enum PageDelta {
    /// Bytes of one run header.
    static let runHeaderBytes = 4

    /// Encodes `page` against `base` (the receiver's current copy) into `output`.
    ///
    /// - Parameters:
    ///   - page: the new content; a multiple of 8 bytes, at most 524,288.
    ///   - base: the copy the receiver holds, same size as `page`.
    ///   - output: room for at least `page.count` bytes; only the returned count is meaningful.
    /// - Returns: the delta's length in bytes (1 ..< page.count), or nil when the delta would not
    ///   be shorter than the page (send it raw instead). Allocates nothing.
    public static func encode(
        page: UnsafeRawBufferPointer, base: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer
    ) -> Int? {
        let size = page.count
        precondition(size % 8 == 0 && size / 8 <= Int(UInt16.max), "page size \(size) not encodable as a delta")
        precondition(base.count == size, "delta base is \(base.count) bytes, page is \(size)")
        precondition(output.count >= size, "delta output of \(output.count) bytes for a \(size)-byte page")
        guard let a = page.baseAddress, let b = base.baseAddress, let o = output.baseAddress else { return nil }
        let words = size / 8
        var i = 0
        var out = 0
        // SAFETY: word indices stay below `words` (all three buffers hold at least `size` bytes);
        // output writes stay below `size`: a literal is written only when out + 8 < size, and a run
        // header only at an offset before its first literal.
        while i < words {
            let runStart = i
            while i < words && a.loadUnaligned(fromByteOffset: i &* 8, as: UInt64.self)
                == b.loadUnaligned(fromByteOffset: i &* 8, as: UInt64.self)
            {
                i &+= 1
            }
            if i == words { break }
            let headerAt = out
            out &+= runHeaderBytes
            let literalStart = i
            while i < words {
                let x = a.loadUnaligned(fromByteOffset: i &* 8, as: UInt64.self)
                    ^ b.loadUnaligned(fromByteOffset: i &* 8, as: UInt64.self)
                if x == 0 { break }
                if out &+ 8 >= size { return nil }
                o.storeBytes(of: x, toByteOffset: out, as: UInt64.self)
                out &+= 8
                i &+= 1
            }
            o.storeLE(UInt16(truncatingIfNeeded: literalStart &- runStart), at: headerAt)
            o.storeLE(UInt16(truncatingIfNeeded: i &- literalStart), at: headerAt &+ 2)
        }
        if out == 0 {
            // The page did not change: one run that skips every word (an empty delta is invalid).
            o.storeLE(UInt16(truncatingIfNeeded: words), at: 0)
            o.storeLE(UInt16(0), at: 2)
            out = runHeaderBytes
        }
        return out
    }

    /// Checks a delta's structure for a page of `pageSize` bytes without applying it.
    public static func validate(_ delta: UnsafeRawBufferPointer, pageSize: Int) throws(PageDeltaError) {
        guard pageSize > 0, pageSize % 8 == 0 else { throw PageDeltaError("page size \(pageSize) is not a multiple of 8") }
        guard delta.count > 0 else { throw PageDeltaError("empty delta") }
        guard delta.count < pageSize else {
            throw PageDeltaError("delta of \(delta.count) bytes is not shorter than the \(pageSize)-byte page")
        }
        guard let d = delta.baseAddress else { throw PageDeltaError("empty delta") }
        let words = pageSize / 8
        var p = 0
        var covered = 0
        while p < delta.count {
            guard p + runHeaderBytes <= delta.count else {
                throw PageDeltaError("run header at byte \(p) cut off by the delta's end (\(delta.count) bytes)")
            }
            let skip = Int(d.le(p, as: UInt16.self))
            let literals = Int(d.le(p + 2, as: UInt16.self))
            guard skip + literals > 0 else { throw PageDeltaError("empty run at byte \(p)") }
            covered += skip + literals
            guard covered <= words else {
                throw PageDeltaError("runs up to byte \(p) cover \(covered) words; the page has \(words)")
            }
            p += runHeaderBytes
            guard literals * 8 <= delta.count - p else {
                throw PageDeltaError("\(literals) literal words at byte \(p) run past the delta's end (\(delta.count) bytes)")
            }
            p += literals * 8
        }
    }

    /// Applies `delta` to `page` in place (`page` holds the base and becomes the new content).
    ///
    /// The whole delta is checked before the first byte is written: on error `page` is unchanged.
    public static func apply(_ delta: UnsafeRawBufferPointer, to page: UnsafeMutableRawBufferPointer) throws(PageDeltaError) {
        try validate(delta, pageSize: page.count)
        guard let d = delta.baseAddress, let out = page.baseAddress else { return }
        var p = 0
        var word = 0
        // SAFETY: validate() proved every run header and literal lies inside `delta` and that the
        // runs cover at most page.count / 8 words, so every load and store below is in bounds.
        while p < delta.count {
            let skip = Int(d.le(p, as: UInt16.self))
            let literals = Int(d.le(p + 2, as: UInt16.self))
            p &+= runHeaderBytes
            word &+= skip
            for k in 0..<literals {
                let at = (word &+ k) &* 8
                let x = d.loadUnaligned(fromByteOffset: p &+ k &* 8, as: UInt64.self)
                out.storeBytes(of: out.loadUnaligned(fromByteOffset: at, as: UInt64.self) ^ x, toByteOffset: at, as: UInt64.self)
            }
            word &+= literals
            p &+= literals &* 8
        }
    }
}
