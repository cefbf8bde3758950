import RemusCore
import Testing

@Suite("Dirty bitmap")
struct DirtyBitmapTests {
    /// Moving the lowest `limit` pages word by word equals taking them one by one in PFN order.
    @Test func moveTakesExactlyTheLowestPagesLikeANaiveWalk() {
        var rng = SplitMix64(seed: 42)
        for round in 0..<200 {
            let pageCount = UInt64(1 + rng.next() % 5000)
            var source = DirtyBitmap(pageCount: pageCount)
            var set: [PFN] = []
            let density = rng.next() % 100
            for pfn in 0..<pageCount where rng.next() % 100 < density {
                source.set(pfn)
                set.append(pfn)
            }
            let limit = Int(rng.next() % UInt64(set.count + 3))
            var chunk = DirtyBitmap(pageCount: pageCount)
            let moved = source.move(upTo: limit, into: &chunk)
            let expected = Array(set.prefix(limit))
            #expect(moved == expected.count, "round \(round)")
            var inChunk: [PFN] = []
            chunk.forEachSet { inChunk.append($0) }
            var left: [PFN] = []
            source.forEachSet { left.append($0) }
            #expect(inChunk == expected, "round \(round): moved the wrong pages")
            #expect(left == Array(set.dropFirst(expected.count)), "round \(round): the rest must stay")
        }
    }
}
