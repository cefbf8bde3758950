import RemusCore
@testable import RemusXen
import Testing

// The framer is checked against streams built here from the specifications
// (docs/specs/libxc-migration-stream.pandoc, libxl-migration-stream.pandoc in Xen's tree), not
// against bytes the framer itself produced.

/// A libxc v3 stream built record by record; it knows where each CHECKPOINT record ends.
private struct LibxcStreamBuilder {
    static let pageData: UInt32 = 0x01
    static let x86PVVCPUBasic: UInt32 = 0x04
    static let verify: UInt32 = 0x0d
    static let checkpoint: UInt32 = 0x0e

    private(set) var bytes: [UInt8]
    /// Stream offsets just past each CHECKPOINT record: where the primary must cut.
    private(set) var checkpointEnds: [Int] = []

    /// The 24-byte image header and the 16-byte domain header, with fields to spoil on purpose.
    init(marker: [UInt8] = Array(repeating: 0xff, count: 8), ident: String = "XENF", version: UInt32 = 3, options: UInt16 = 0) {
        precondition(marker.count == 8 && ident.utf8.count == 4)
        bytes = marker + Array(ident.utf8)
        bytes += withUnsafeBytes(of: version.bigEndian) { Array($0) }
        bytes += withUnsafeBytes(of: options.bigEndian) { Array($0) }
        bytes += [UInt8](repeating: 0, count: 6)
        // Domain header: type x86 PV (1), page_shift 12, reserved, Xen 4.17; little-endian.
        bytes += le32(1) + [12, 0] + [0, 0] + le32(4) + le32(17)
        precondition(bytes.count == 40)
    }

    /// A record: type and body length as little-endian u32s, the body, zeros up to 8 bytes.
    mutating func record(type: UInt32, body: [UInt8]) {
        bytes += le32(type) + le32(UInt32(body.count)) + body
        bytes += [UInt8](repeating: 0, count: (8 - body.count % 8) % 8)
    }

    /// A record header that claims `length` body bytes, without the body.
    mutating func recordHeader(type: UInt32, length: UInt32) {
        bytes += le32(type) + le32(length)
    }

    mutating func checkpoint() {
        record(type: Self.checkpoint, body: [])
        checkpointEnds.append(bytes.count)
    }

    mutating func end() { record(type: 0, body: []) }

    private func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
}

/// `count` bytes that are not all alike, from `seed`.
private func noise(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
}

/// Two checkpoints and an END, with bodies of odd lengths, a body-less record, and a body that
/// holds the bytes of a CHECKPOINT record header (the framer must skip bodies, not search them).
///
/// Layout, worked out by hand from the specification:
///   0     image header (24) + domain header (16)
///   40    PAGE_DATA, 4109-byte body padded to 4112      → ends at 4160
///   4160  X86_PV_VCPU_BASIC, 3-byte body padded to 8    → 4176
///   4176  VERIFY, no body                               → 4184
///   4184  CHECKPOINT                                    → 4192  (first cut)
///   4192  PAGE_DATA, 21 bytes: fake CHECKPOINT headers  → 4224
///   4224  PAGE_DATA, 4097-byte body padded to 4104      → 8336
///   8336  CHECKPOINT                                    → 8344  (second cut)
///   8344  END                                           → 8352
private func sampleStream() -> LibxcStreamBuilder {
    var s = LibxcStreamBuilder()
    s.record(type: LibxcStreamBuilder.pageData, body: noise(4109, seed: 1))
    s.record(type: LibxcStreamBuilder.x86PVVCPUBasic, body: [1, 2, 3])
    s.record(type: LibxcStreamBuilder.verify, body: [])
    s.checkpoint()
    let fakeCheckpointHeader: [UInt8] = [0x0e, 0, 0, 0, 0, 0, 0, 0]
    s.record(type: LibxcStreamBuilder.pageData, body: fakeCheckpointHeader + fakeCheckpointHeader + [0x0e, 0, 0, 0, 0])
    s.record(type: LibxcStreamBuilder.pageData, body: noise(4097, seed: 2))
    s.checkpoint()
    s.end()
    return s
}

/// What the framer reported while following a stream handed to it in pieces.
private struct Followed {
    /// Stream offsets at which `consume` said a checkpoint ended.
    var cuts: [Int] = []
    var framer = LibxcStreamFramer()
    /// Bytes the framer took in all.
    var taken = 0
}

/// Hands `stream` to a framer in pieces of the given sizes (the last piece is whatever is left),
/// calling `consume` on each piece until it has taken all of it, as the primary does.
private func follow(_ stream: [UInt8], pieces: some Sequence<Int>, sourceLocation: SourceLocation = #_sourceLocation) throws -> Followed {
    var result = Followed()
    var sizes = pieces.makeIterator()
    var at = 0
    while at < stream.count {
        let pieceEnd = min(stream.count, at + max(1, sizes.next() ?? stream.count))
        while at < pieceEnd {
            let (taken, checkpoint) = try stream.withUnsafeBytes { raw in
                try result.framer.consume(UnsafeRawBufferPointer(rebasing: raw[at..<pieceEnd]))
            }
            guard taken > 0 else {
                Issue.record("consume took nothing of \(pieceEnd - at) bytes at offset \(at)", sourceLocation: sourceLocation)
                return result
            }
            at += taken
            result.taken = at
            if checkpoint {
                result.cuts.append(at)
            } else if at < pieceEnd && !result.framer.ended {
                Issue.record("consume stopped at offset \(at) inside a piece without a checkpoint or END", sourceLocation: sourceLocation)
                return result
            }
        }
    }
    return result
}

/// The framer's error for `stream` handed over in `pieces`, or nil (recorded as an issue).
private func failure(_ what: String, _ stream: [UInt8], pieces: some Sequence<Int>, sourceLocation: SourceLocation = #_sourceLocation) -> LibxcStreamError? {
    do {
        let followed = try follow(stream, pieces: pieces, sourceLocation: sourceLocation)
        Issue.record("\(what): the framer accepted the stream (\(followed.taken) bytes, \(followed.cuts.count) checkpoints)", sourceLocation: sourceLocation)
        return nil
    } catch let error as LibxcStreamError {
        return error
    } catch {
        Issue.record("\(what): unexpected error \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Piece sizes from `seed`: mostly small (splitting headers), sometimes a few KiB (whole records).
private func randomPieces(seed: UInt64) -> [Int] {
    var rng = SplitMix64(seed: seed)
    return (0..<20_000).map { _ in
        switch rng.next() % 8 {
        case 0...4: Int(rng.next() % 16) + 1
        case 5, 6: Int(rng.next() % 200) + 1
        default: Int(rng.next() % 6000) + 1
        }
    }
}

/// Ways of handing a stream over: all at once, one byte at a time, and seeded random pieces.
private func everyFeeding(_ count: Int) -> [(String, [Int])] {
    [("whole", [count]), ("byte by byte", Array(repeating: 1, count: count))]
        + (1...24).map { ("random pieces, seed \($0)", randomPieces(seed: UInt64($0))) }
}

extension RemusXenTests {
@Suite("libxc stream framing")
struct LibxcStreamFramerTests {
    @Test("The sample stream has the layout worked out by hand")
    func sampleLayout() {
        let s = sampleStream()
        #expect(s.bytes.count == 8352)
        #expect(s.checkpointEnds == [4192, 8344])
    }

    @Test("Checkpoints are cut just past each CHECKPOINT record, however the bytes arrive")
    func cutsDoNotDependOnHowBytesArrive() throws {
        let stream = sampleStream().bytes
        for (feeding, pieces) in everyFeeding(stream.count) {
            let followed = try follow(stream, pieces: pieces)
            #expect(followed.cuts == [4192, 8344], "\(feeding)")
            #expect(followed.framer.checkpoints == 2, "\(feeding)")
            #expect(followed.framer.ended, "\(feeding)")
            #expect(followed.framer.offset == stream.count, "\(feeding)")
        }
    }

    @Test("One buffer holding everything is taken a checkpoint at a time, then up to END")
    func wholeBufferStopsAtEachCheckpoint() throws {
        let stream = sampleStream().bytes
        var framer = LibxcStreamFramer()
        var at = 0
        var answers: [(Int, Bool)] = []
        for _ in 0..<3 {
            let answer = try stream.withUnsafeBytes { try framer.consume(UnsafeRawBufferPointer(rebasing: $0[at...])) }
            answers.append(answer)
            at += answer.taken
        }
        #expect(answers.map(\.0) == [4192, 8344 - 4192, 8])
        #expect(answers.map(\.1) == [true, true, false])
        #expect(framer.ended && framer.checkpoints == 2)
    }

    @Test("END counts only once its last byte arrived")
    func endNeedsItsLastByte() throws {
        let stream = sampleStream().bytes
        var framer = LibxcStreamFramer()
        var at = 0
        while at < stream.count - 1 {
            at += try stream.withUnsafeBytes { try framer.consume(UnsafeRawBufferPointer(rebasing: $0[at..<(stream.count - 1)])).taken }
        }
        #expect(!framer.ended)
        #expect(framer.checkpoints == 2)
        let last = try stream.withUnsafeBytes { try framer.consume(UnsafeRawBufferPointer(rebasing: $0[(stream.count - 1)...])) }
        #expect(last.taken == 1 && last.checkpoint == false)
        #expect(framer.ended)
    }

    @Test("Random streams: the cuts match the builder's record arithmetic for every seed and feeding")
    func randomStreamsAgainstTheBuilder() throws {
        let types: [UInt32] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x0a, 0x0b, 0x0d, 0x0f, 0x8000_0001]
        for seed in UInt64(1)...60 {
            var rng = SplitMix64(seed: seed &* 7919)
            var s = LibxcStreamBuilder()
            for _ in 0..<Int(rng.next() % 40) {
                if rng.next() % 5 == 0 {
                    s.checkpoint()
                    continue
                }
                let length = rng.next() % 10 == 0 ? Int(rng.next() % 20_000) : Int(rng.next() % 64)
                s.record(type: types[Int(rng.next() % UInt64(types.count))], body: noise(length, seed: rng.next()))
            }
            s.checkpoint()
            s.end()
            for (feeding, pieces) in [("whole", [s.bytes.count]), ("random", randomPieces(seed: seed))] {
                let followed = try follow(s.bytes, pieces: pieces)
                #expect(followed.cuts == s.checkpointEnds, "seed \(seed), \(feeding)")
                #expect(followed.framer.checkpoints == s.checkpointEnds.count, "seed \(seed), \(feeding)")
                #expect(followed.framer.ended && followed.framer.offset == s.bytes.count, "seed \(seed), \(feeding)")
            }
        }
    }

    @Test("A record may claim exactly 128 MiB; the framer then waits for its body")
    func largestBodyIsAccepted() throws {
        var s = LibxcStreamBuilder()
        s.recordHeader(type: LibxcStreamBuilder.pageData, length: 128 << 20)
        let followed = try follow(s.bytes, pieces: [s.bytes.count])
        #expect(followed.taken == 48 && followed.cuts.isEmpty && !followed.framer.ended)
    }

    /// Each spoiled stream, and what its error must say.
    static let spoiled: [(String, [UInt8], [String])] = {
        var cases: [(String, [UInt8], [String])] = []
        func withSample(_ builder: LibxcStreamBuilder) -> [UInt8] {
            builder.bytes + sampleStream().bytes[40...]
        }
        var marker = [UInt8](repeating: 0xff, count: 8)
        marker[3] = 0xfe
        cases.append(("bad marker", withSample(LibxcStreamBuilder(marker: marker)), ["no libxc image header", "ff×8"]))
        cases.append(("not XENF", withSample(LibxcStreamBuilder(ident: "XENG")), ["no libxc image header", "\"XENF\""]))
        cases.append(("version 2", withSample(LibxcStreamBuilder(version: 2)), ["version 2", "version 3"]))
        cases.append(("big-endian", withSample(LibxcStreamBuilder(options: 1)), ["big-endian"]))
        var tooLong = LibxcStreamBuilder()
        tooLong.record(type: LibxcStreamBuilder.verify, body: [])
        tooLong.recordHeader(type: LibxcStreamBuilder.pageData, length: (128 << 20) + 1)
        cases.append(("128 MiB + 1", tooLong.bytes + noise(64, seed: 3), ["record type 1", "stream offset 48", "134217729 bytes", "128 MiB"]))
        var huge = LibxcStreamBuilder()
        huge.recordHeader(type: LibxcStreamBuilder.pageData, length: .max)
        cases.append(("4 GiB - 1", huge.bytes, ["4294967295 bytes", "128 MiB"]))
        cases.append(("bytes after END", sampleStream().bytes + [0], ["bytes after the END record", "stream offset 8352"]))
        return cases
    }()

    @Test("A stream that does not follow the format is refused with an error naming the problem, however it arrives")
    func spoiledStreamsAreRefused() {
        for (name, stream, fragments) in Self.spoiled {
            let whole = failure("\(name), whole", stream, pieces: [stream.count])
            let bytewise = failure("\(name), byte by byte", stream, pieces: Array(repeating: 1, count: stream.count))
            let random = failure("\(name), random pieces", stream, pieces: randomPieces(seed: 5))
            for fragment in fragments {
                #expect(whole?.description.contains(fragment) == true, "\(name): \(whole?.description ?? "no error")")
            }
            #expect(bytewise == whole, "\(name): byte by byte")
            #expect(random == whole, "\(name): random pieces")
        }
    }

    @Test("A spoiled header is refused before any record is followed")
    func badHeaderStopsEverything() throws {
        let stream = LibxcStreamBuilder(version: 2).bytes
        var framer = LibxcStreamFramer()
        // 39 bytes: the header is not complete, so nothing can be judged yet.
        let first = try stream.withUnsafeBytes { try framer.consume(UnsafeRawBufferPointer(rebasing: $0[..<39])) }
        #expect(first.taken == 39 && !first.checkpoint)
        #expect(throws: LibxcStreamError.self) {
            _ = try stream.withUnsafeBytes { try framer.consume(UnsafeRawBufferPointer(rebasing: $0[39...])) }
        }
    }

    @Test("libxl's stream header, LIBXC_CONTEXT and CHECKPOINT_END are the specification's bytes")
    func libxlRecordsMatchTheSpecification() {
        // libxl__sr_hdr: ident 0x4c6962786c466d74 ("LibxlFmt"), version 2, options 0; all big-endian.
        let ident = withUnsafeBytes(of: UInt64(0x4c69_6278_6c46_6d74).bigEndian) { Array($0) }
        #expect(ident == Array("LibxlFmt".utf8))
        #expect(LibxlStream.header == ident + [0x00, 0x00, 0x00, 0x02] + [0x00, 0x00, 0x00, 0x00])
        #expect(LibxlStream.header.count == 16)
        // libxl__sr_rec_hdr: type and length, little-endian; LIBXC_CONTEXT = 1, CHECKPOINT_END = 4.
        #expect(LibxlStream.libxcContext == [0x01, 0, 0, 0, 0, 0, 0, 0])
        #expect(LibxlStream.checkpointEnd == [0x04, 0, 0, 0, 0, 0, 0, 0])
        #expect(LibxlStream.preamble == LibxlStream.header + LibxlStream.libxcContext)
    }
}
}
