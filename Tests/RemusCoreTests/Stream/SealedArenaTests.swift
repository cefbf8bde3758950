import Testing
@testable import RemusCore

@Suite struct SealedArenaTests {
    @Test("Extending a CRC by a page's register and the page length's shift equals reading the page")
    func combiningEqualsReading() {
        var g = SeededGenerator(seed: 11)
        for length in [64, 512, 4096, 16384] {
            let shift = CRC32C.Shift(length: length)
            for _ in 0..<20 {
                let page = g.bytes(length)
                let before = UInt32.random(in: 0...UInt32.max, using: &g)
                page.withUnsafeBytes { raw in
                    let read = CRC32C.extendPortable(before, raw)
                    #expect(CRC32C.extend(before, register: CRC32C.register(of: raw), shift: shift) == read, "length \(length)")
                }
            }
        }
    }

    @Test("A sealed arena encodes to the same bytes as the page-reading path: zero pages, absent pages, batch splits, page sizes")
    func sealedEncodingMatchesTheOracle() throws {
        var g = SeededGenerator(seed: 12)
        for pageSize in [4096, 16384] {
            for _ in 0..<12 {
                var pages: [(PFN, PageEncoding, [UInt8]?)] = []
                var pfn: PFN = PFN.random(in: 0..<100, using: &g)
                for _ in 0..<Int.random(in: 1...40, using: &g) {
                    switch Int.random(in: 0..<10, using: &g) {
                    case 0: pages.append((pfn, .zero, nil))
                    case 1: pages.append((pfn, .absent, nil))
                    case 2: pages.append((pfn, .raw, [UInt8](repeating: 0, count: pageSize)))  // found zero at seal
                    case 3:
                        var almost = [UInt8](repeating: 0, count: pageSize)
                        almost[pageSize - 1] = 1  // non-zero only in its last byte
                        pages.append((pfn, .raw, almost))
                    default: pages.append((pfn, .raw, g.bytes(pageSize)))
                    }
                    pfn += PFN.random(in: 1...3, using: &g)
                }
                let plain = makeArena(pages, pageSize: pageSize)
                let sealed = makeArena(pages, pageSize: pageSize)
                sealed.seal()
                #expect(sealed.isSealed && !plain.isSealed)
                let cut = Int.random(in: 0...pages.count, using: &g)
                let ranges = [0..<cut, cut..<pages.count].filter { !$0.isEmpty }
                let oracle = try buildStream(streamHeader(pageSize: UInt32(pageSize))) { e, out in
                    try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
                    for r in ranges { e.appendPageBatch(plain, entries: r, into: &out) }
                    try e.endCheckpoint(into: &out)
                }
                let combined = try buildStream(streamHeader(pageSize: UInt32(pageSize))) { e, out in
                    try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
                    for r in ranges { e.appendPageBatch(sealed, entries: r, into: &out) }
                    try e.endCheckpoint(into: &out)
                }
                #expect(combined == oracle, "page size \(pageSize), \(pages.count) pages cut at \(cut)")
                // And the bytes are a valid stream whose CRCs the decoder checks.
                #expect(validate(combined).error == nil)
            }
        }
    }

    @Test("Appending or resetting unseals: a page written after the seal is checksummed when it is sent")
    func changesUnseal() {
        let arena = StagingArena(pageSize: 4096, capacityPages: 2)
        arena.reset(epoch: 1, kind: .checkpoint)
        let first = arena.append(pfn: 1, encoding: .raw)!
        patternPage(1).withUnsafeBytes { first.copyMemory(from: $0) }
        arena.seal()
        #expect(arena.pageSeal(0) != nil)
        let page = arena.append(pfn: 2, encoding: .raw)!
        patternPage(2).withUnsafeBytes { page.copyMemory(from: $0) }
        #expect(!arena.isSealed && arena.pageSeal(0) == nil)
        arena.seal()
        arena.reset(epoch: 2, kind: .checkpoint)
        #expect(!arena.isSealed)
    }
}
