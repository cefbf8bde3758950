import Testing
@testable import RemusCore

/// The naive oracle for applying a delta: parse with explicit checks, XOR byte by byte into a copy.
/// Returns nil for anything malformed.
func naiveApply(_ delta: [UInt8], to base: [UInt8]) -> [UInt8]? {
    guard !delta.isEmpty, delta.count < base.count else { return nil }
    var page = base
    var p = 0
    var word = 0
    while p < delta.count {
        guard p + 4 <= delta.count else { return nil }
        let skip = Int(delta[p]) | Int(delta[p + 1]) << 8
        let literals = Int(delta[p + 2]) | Int(delta[p + 3]) << 8
        p += 4
        guard skip + literals > 0, word + skip + literals <= base.count / 8, p + literals * 8 <= delta.count else { return nil }
        word += skip
        for k in 0..<(literals * 8) { page[word * 8 + k] ^= delta[p + k] }
        word += literals
        p += literals * 8
    }
    return page
}

private func encode(_ page: [UInt8], _ base: [UInt8]) -> [UInt8]? {
    var out = [UInt8](repeating: 0xEE, count: page.count)
    let n = page.withUnsafeBytes { p in base.withUnsafeBytes { b in out.withUnsafeMutableBytes { PageDelta.encode(page: p, base: b, into: $0) } } }
    return n.map { Array(out[0..<$0]) }
}

private func apply(_ delta: [UInt8], _ base: [UInt8]) -> Result<[UInt8], PageDeltaError> {
    var page = base
    var failure: PageDeltaError?
    delta.withUnsafeBytes { d in
        page.withUnsafeMutableBytes { p in
            do throws(PageDeltaError) { try PageDelta.apply(d, to: p) } catch { failure = error }
        }
    }
    guard let failure else { return .success(page) }
    #expect(page == base, "a rejected delta leaves the page untouched")
    return .failure(failure)
}

@Suite("Page delta")
struct PageDeltaTests {
    @Test func encodeMatchesTheNaiveOracleAndRoundTrips() {
        var g = SeededGenerator(seed: 0xDE17A)
        var encodedCount = 0
        var rawCount = 0
        for i in 0..<2000 {
            let size = [4096, 16384, 65536][i % 7 == 0 ? (i / 7) % 3 : 0]
            let base = g.bytes(size)
            let page = mutatedPage(base, &g)
            let fast = encode(page, base)
            let oracle = naiveDelta(page: page, base: base)
            #expect(fast == oracle, "optimised and naive encoders agree (iteration \(i))")
            if let fast {
                encodedCount += 1
                #expect(fast.count < size && fast.count > 0)
                #expect((try? apply(fast, base).get()) == page)
                #expect(naiveApply(fast, to: base) == page)
            } else {
                rawCount += 1
            }
        }
        #expect(encodedCount > 500 && rawCount > 100, "both outcomes exercised: \(encodedCount) deltas, \(rawCount) raw")
    }

    @Test func unchangedPageEncodesAsOneSkippingRun() {
        let base = patternPage(4)
        #expect(encode(base, base) == [0x00, 0x02, 0x00, 0x00])  // skip 512 words, no literals
    }

    @Test func deltaJustUnderAPageIsKeptAndAtAPageIsRefused() {
        let base = [UInt8](repeating: 0, count: 4096)
        // Every other word changed: 256 runs of {1 skip, 1 literal} = 256 × 12 = 3072 bytes.
        var sparse = base
        for w in stride(from: 1, to: 512, by: 2) { sparse[w * 8] = 1 }
        #expect(encode(sparse, base)?.count == 3072)
        // Every word changed: 4 + 4096 bytes, not shorter than the page.
        #expect(encode([UInt8](repeating: 1, count: 4096), base) == nil)
        // All but the first word: 4 + 511 × 8 = 4092 bytes, just shorter.
        var most = [UInt8](repeating: 1, count: 4096)
        for k in 0..<8 { most[k] = 0 }
        #expect(encode(most, base)?.count == 4092)
    }

    @Test func malformedDeltasAreRejectedAndLeaveThePageIntact() {
        let base = patternPage(1)
        func le16(_ v: Int) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8)] }
        let literal = [UInt8](repeating: 0xFF, count: 8)
        let cases: [(String, [UInt8])] = [
            ("empty", []),
            ("a page long", [UInt8](repeating: 0, count: 4096)),
            ("header cut", [1, 0]),
            ("empty run", le16(0) + le16(0)),
            ("literal cut", le16(0) + le16(1) + [1, 2, 3]),
            ("literals past the delta", le16(0) + le16(2) + literal),
            ("skip past the page", le16(513) + le16(0)),
            ("runs past the page", le16(511) + le16(1) + literal + le16(1) + le16(0)),
            ("literal past the page", le16(512) + le16(1) + literal),
            ("trailing byte", le16(0) + le16(1) + literal + [0]),
        ]
        for (name, delta) in cases {
            guard case .failure = apply(delta, base) else {
                Issue.record("malformed delta accepted: \(name)")
                continue
            }
            #expect(naiveApply(delta, to: base) == nil, "oracle agrees: \(name)")
        }
        #expect((try? apply(le16(511) + le16(1) + literal, base).get()) == naiveApply(le16(511) + le16(1) + literal, to: base))
    }

    @Test func randomDeltaBytesNeverWriteOutOfBoundsAndMatchTheOracle() {
        var g = SeededGenerator(seed: 0xBAD)
        let base = patternPage(2, size: 4096)
        var accepted = 0
        for _ in 0..<20_000 {
            var delta = g.bytes(Int.random(in: 0...64, using: &g))
            // Bias run headers towards plausible values so some are valid.
            if delta.count >= 4, Bool.random(using: &g) {
                delta[1] = 0
                delta[3] = 0
                delta[2] = UInt8.random(in: 0...((UInt8(truncatingIfNeeded: (delta.count - 4) / 8))), using: &g)
            }
            let result = apply(delta, base)
            let oracle = naiveApply(delta, to: base)
            switch result {
            case .success(let page):
                accepted += 1
                #expect(page == oracle)
            case .failure:
                #expect(oracle == nil)
            }
        }
        #expect(accepted > 100)
    }
}
