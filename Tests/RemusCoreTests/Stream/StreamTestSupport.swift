// Shared helpers of the stream codec tests: a seeded generator, owned (comparable) copies of
// decoded items, random records, and a sample stream with every record type.
import Testing
@testable import RemusCore

/// The project's SplitMix64: small, fast, deterministic for a seed.
typealias SeededGenerator = SplitMix64

extension SplitMix64 {
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255, using: &self) } }
    mutating func string(maxBytes: Int) -> String {
        // Mix ASCII and multi-byte scalars; stay within maxBytes of UTF-8.
        let pool: [Character] = ["a", "z", "0", "-", " ", "é", "ß", "中", "🙂"]
        var s = ""
        while true {
            let c = pool.randomElement(using: &self) ?? "a"
            if s.utf8.count + String(c).utf8.count > maxBytes || Int.random(in: 0..<12, using: &self) == 0 { return s }
            s.append(c)
        }
    }
}

/// A decoded page, owned.
struct OwnedPage: Equatable, CustomStringConvertible {
    var pfn: PFN
    var encoding: PageEncoding
    var data: [UInt8]
    var description: String { "\(pfn):\(encoding)(\(data.count))" }
}

/// A decoded item with its views copied, so items can be compared after the decoder moved on.
enum OwnedItem: Equatable {
    case header(StreamHeader)
    case record(offset: UInt64, header: RecordHeader, content: OwnedContent)
}

enum OwnedContent: Equatable {
    case record(StreamRecord)
    case pageBatch([OwnedPage])
    case skipped
}

extension OwnedContent {
    init(_ content: RecordContent) {
        switch content {
        case .pageBatch(let batch): self = .pageBatch(batch.map { OwnedPage(pfn: $0.pfn, encoding: $0.encoding, data: Array($0.data)) })
        case .skippedOptional: self = .skipped
        default: self = .record(content.ownedRecord!)
        }
    }

    /// The content without offsets, for comparisons with what was written.
    var record: StreamRecord? { if case .record(let r) = self { return r } else { return nil } }
}

extension OwnedItem {
    init(_ item: StreamItem) {
        switch item {
        case .header(let h): self = .header(h)
        case .record(let r): self = .record(offset: r.offset, header: r.header, content: OwnedContent(r.content))
        }
    }
    var content: OwnedContent? { if case .record(_, _, let c) = self { return c } else { return nil } }
    var offset: UInt64? { if case .record(let o, _, _) = self { return o } else { return nil } }
}

/// How a test feeds bytes to the decoder.
enum Feeding {
    case whole
    case chunks([Int])
    case oneByte
    /// writableSpace() + commit(), reading at most the given sizes in turn.
    case socketReads([Int])
}

/// What decoding a byte string produced: the items before the end or the first error, and the error.
struct DecodeOutcome {
    var items: [OwnedItem] = []
    var error: StreamDecodeError?
    var skippedOptional = 0
    var maxBufferCapacity = 0
    /// Bytes the decoder moved to its buffer's front.
    var compactedBytes: UInt64 = 0
}

/// Decodes `bytes` completely (calling finish() at the end) and collects what came out.
func decode(_ bytes: [UInt8], feeding: Feeding = .whole, initialCapacity: Int = 64 << 10) -> DecodeOutcome {
    var decoder = StreamDecoder(initialCapacity: initialCapacity)
    var outcome = DecodeOutcome()
    func drain(_ d: inout StreamDecoder) throws(StreamDecodeError) {
        while let item = try d.next() { outcome.items.append(OwnedItem(item)) }
        outcome.maxBufferCapacity = max(outcome.maxBufferCapacity, d.capacity)
    }
    do throws(StreamDecodeError) {
        var position = 0
        var turn = 0
        let sizes: [Int]
        switch feeding {
        case .whole: sizes = [max(bytes.count, 1)]
        case .oneByte: sizes = [1]
        case .chunks(let s), .socketReads(let s): sizes = s.isEmpty ? [1] : s
        }
        while position < bytes.count {
            let want = min(max(sizes[turn % sizes.count], 1), bytes.count - position)
            turn += 1
            var taken = 0
            if case .socketReads = feeding {
                let space = decoder.writableSpace()
                let n = min(want, space.count)
                bytes.withUnsafeBytes { space.baseAddress!.copyMemory(from: $0.baseAddress! + position, byteCount: n) }
                decoder.commit(n)
                taken = n
            } else {
                taken = bytes.withUnsafeBytes { decoder.append(UnsafeRawBufferPointer(rebasing: $0[position..<(position + want)])) }
            }
            position += taken
            try drain(&decoder)
        }
        try drain(&decoder)
        try decoder.finish()
    } catch {
        outcome.error = error
    }
    outcome.skippedOptional = decoder.skippedOptionalRecords
    outcome.compactedBytes = decoder.compactedBytes
    return outcome
}

/// Runs items through a validator; returns the events' kinds and the first error.
func validate(_ bytes: [UInt8], direction: CheckpointValidator.Direction = .primaryToBackup) -> (events: [String], error: StreamDecodeError?) {
    var decoder = StreamDecoder()
    var validator = CheckpointValidator(direction: direction)
    var events: [String] = []
    do {
        try bytes.withUnsafeBytes { raw in
            try decoder.feed(raw) { item in
                let event = try validator.validate(item)
                events.append(eventName(event))
            }
        }
        try decoder.finish()
        return (events, nil)
    } catch let error as StreamDecodeError {
        return (events, error)
    } catch {
        Issue.record("unexpected error type \(error)")
        return (events, nil)
    }
}

func eventName(_ event: CheckpointEvent) -> String {
    switch event {
    case .streamOpened: return "open"
    case .domainConfig: return "config"
    case .diskDescriptor(let d): return "disk(\(d.disk))"
    case .checkpointBegan(let b): return "begin(\(b.epoch))"
    case .content(let c):
        switch c {
        case .pageBatch(let b): return "pages(\(b.count))"
        case .vcpuState(let v): return "vcpu(\(v.vcpu))"
        case .deviceState(let d): return "device(\(d.name))"
        case .clock: return "clock"
        case .memoryLayout: return "layout"
        case .opaquePayload(let o): return "opaque(\(o.sequence))"
        case .diskWrite(let w): return "write(\(w.disk)@\(w.offset)+\(w.data.count))"
        case .diskCommand(let c): return "\(c.kind)(\(c.disk)@\(c.offset)+\(c.length))"
        default: return "content?"
        }
    case .checkpointComplete(let e): return "complete(\(e.epoch))"
    case .heartbeat: return "heartbeat"
    case .ack(let a): return "ack(\(a.epoch))"
    case .streamEnded: return "end"
    case .peerError: return "error"
    case .skipped: return "skipped"
    }
}

// MARK: - Builders

let testUUID = GuestUUID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)

func streamHeader(role: StreamRole = .primary, features: StreamFeatures = [.deltaPages], pageSize: UInt32 = 4096, minor: UInt16 = StreamVersion.minor) -> StreamHeader {
    StreamHeader(
        minor: minor, features: features, pageSize: pageSize, backend: .simulated, role: role, guestUUID: testUUID,
        guestName: "test-guest", senderVersion: "remusd test")
}

/// Builds a stream with an encoder; `body` appends records.
func buildStream(
    _ header: StreamHeader = streamHeader(), _ body: (inout StreamEncoder, inout [UInt8]) throws -> Void
) rethrows -> [UInt8] {
    var out: [UInt8] = []
    try! StreamEncoder.appendHeader(header, into: &out)
    var encoder = StreamEncoder(pageSize: Int(header.pageSize), features: header.features)
    try body(&encoder, &out)
    return out
}

/// A page of `size` bytes following a simple pattern of `seed`.
func patternPage(_ seed: UInt8, size: Int = 4096) -> [UInt8] {
    (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed) &* 13 &+ 1) }
}

/// Fills an arena from `pages` (PFN, encoding, data for raw).
func makeArena(_ pages: [(PFN, PageEncoding, [UInt8]?)], pageSize: Int = 4096) -> StagingArena {
    let arena = StagingArena(pageSize: pageSize, capacityPages: max(pages.count, 1))
    arena.reset(epoch: 1, kind: .checkpoint)
    for (pfn, encoding, data) in pages {
        let destination = arena.append(pfn: pfn, encoding: encoding)
        if let destination, let data {
            data.withUnsafeBytes { destination.copyMemory(from: $0) }
        }
    }
    return arena
}

let sampleClock = ClockState(guestMonotonicNs: 5_000_000_000, guestWallNs: 1_700_000_000_000_000_000, tscKHz: 2_400_000, hostMonotonicNs: 9_000_000_000, hostWallNs: 1_700_000_000_100_000_000)
let sampleLayout = MemoryLayout(generation: 3, ranges: [PFNRange(start: 0, count: 16), PFNRange(start: 32, count: 32)])

/// A primary stream with every primary record type: config, a pre-copy round, two checkpoints
/// (pages in all four encodings, deltas), heartbeats, STREAM_END. Records are in `expected`.
func sampleStream() -> [UInt8] {
    let bases = PageStore([3: patternPage(3), 9: patternPage(9)])
    var changed3 = patternPage(3)
    changed3[100] ^= 0xFF
    changed3[4000] = 1
    return try! buildStream { e, out in
        try e.append(.domainConfig(DomainConfig(format: .simulated, bytes: Array("{\"pages\":64}".utf8))), into: &out)
        try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
        e.appendPageBatch(makeArena([(3, .raw, patternPage(3)), (9, .raw, patternPage(9))]), entries: 0..<2, into: &out)
        try e.endCheckpoint(into: &out)
        try e.append(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 10)), into: &out)
        try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
        try e.append(.clock(sampleClock), into: &out)
        try e.append(.memoryLayout(sampleLayout), into: &out)
        try e.append(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: [1, 2, 3, 4, 5])), into: &out)
        try e.append(.vcpuState(VCPUState(vcpu: 1, format: 1, bytes: Array(repeating: 7, count: 24))), into: &out)
        try e.append(.deviceState(DeviceState(name: "nic0", bytes: [9, 8, 7])), into: &out)
        try e.append(.heartbeat(Heartbeat(sequence: 2, senderMonotonicNs: 20)), into: &out)
        let arena = makeArena([(1, .raw, patternPage(1)), (2, .raw, [UInt8](repeating: 0, count: 4096)), (3, .raw, changed3), (5, .zero, nil), (7, .absent, nil)])
        e.appendPageBatch(arena, entries: 0..<3, deltaBase: bases.base, into: &out)
        e.appendPageBatch(arena, entries: 3..<5, into: &out)
        try e.append(.opaquePayload(OpaquePayload(stream: .libxc, sequence: 0, bytes: Array("xen".utf8))), into: &out)
        try e.endCheckpoint(into: &out)
        try e.append(.checkpointBegin(CheckpointBegin(epoch: 2, kind: .final)), into: &out)
        try e.append(.clock(sampleClock), into: &out)
        try e.append(.memoryLayout(sampleLayout), into: &out)
        try e.endCheckpoint(into: &out)
        try e.append(.streamEnd(StreamEnd(reason: .switchover, lastEpoch: 2, message: "switchover")), into: &out)
    }
}

/// Record boundaries (offsets) of a valid stream: the header's end, then each record's end.
func recordBoundaries(_ bytes: [UInt8]) -> [Int] {
    let outcome = decode(bytes)
    var ends: [Int] = []
    for item in outcome.items {
        if let o = item.offset { ends.append(Int(o)) }
    }
    ends.append(bytes.count)
    return ends
}

/// Splits a valid stream into its header bytes and each record's bytes.
func splitRecords(_ bytes: [UInt8]) -> (header: [UInt8], records: [[UInt8]]) {
    let boundaries = recordBoundaries(bytes)
    let records = (0..<(boundaries.count - 1)).map { Array(bytes[boundaries[$0]..<boundaries[$0 + 1]]) }
    return (Array(bytes[0..<boundaries[0]]), records)
}

/// Pages at stable addresses, to serve as delta bases (what the receiver holds).
final class PageStore {
    private var pages: [PFN: UnsafeMutableRawBufferPointer] = [:]
    init(_ contents: [PFN: [UInt8]] = [:]) {
        for (pfn, bytes) in contents { set(pfn, bytes) }
    }
    deinit { for page in pages.values { page.deallocate() } }
    func set(_ pfn: PFN, _ bytes: [UInt8]) {
        pages[pfn]?.deallocate()
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
        bytes.withUnsafeBytes { page.copyMemory(from: $0) }
        pages[pfn] = page
    }
    func base(_ pfn: PFN) -> UnsafeRawBufferPointer? { pages[pfn].map { UnsafeRawBufferPointer($0) } }
    func bytes(_ pfn: PFN) -> [UInt8]? { pages[pfn].map { Array($0) } }
}
