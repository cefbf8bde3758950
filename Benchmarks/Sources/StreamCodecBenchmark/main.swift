// Throughput and allocations of the stream codec's hot paths, as ratios against memcpy of the same
// bytes measured in the same run (DESIGN.md: benchmarks report ratios to physical limits, never a
// wall-clock pass/fail). One PAGE_BATCH of 1024 × 4 KiB pages (4 MiB) is the unit of work.
import CMallocCounter
import Glibc
import RemusCore

let pageSize = 4096
let pageCount = 1024
let batchBytes = pageSize * pageCount
let repetitions = Int(CommandLine.arguments.dropFirst().first ?? "") ?? 31

// MARK: - Measurement

@inline(never)
func blackHole<T>(_ value: T) { withExtendedLifetime(value) {} }

func nowNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

struct Throughput {
    /// GB/s (10^9 bytes per second) per repetition, sorted.
    var samples: [Double]
    var median: Double { samples[samples.count / 2] }
    var p10: Double { samples[samples.count / 10] }
    var p90: Double { samples[samples.count * 9 / 10] }
}

/// Runs `body` (which processes `bytes` bytes) in `repetitions` timed rounds after a warm-up and
/// returns the throughput of each round. `body` returns the nanoseconds to count (so a round can
/// exclude its own setup) or nil to time the whole call.
func measure(bytes: Int, iterations: Int = 8, _ body: () -> UInt64?) -> Throughput {
    for _ in 0..<iterations { _ = body() }
    var samples: [Double] = []
    for _ in 0..<repetitions {
        var counted: UInt64 = 0
        for _ in 0..<iterations {
            let t0 = nowNs()
            let inner = body()
            counted += inner ?? (nowNs() - t0)
        }
        samples.append(Double(bytes * iterations) / Double(max(counted, 1)))
    }
    return Throughput(samples: samples.sorted())
}

/// Allocations per page over `rounds` calls of `body`, each handling `pages` pages.
func allocationsPerPage(rounds: Int = 20, pages: Int = pageCount, _ body: () -> Void) -> Double {
    body()
    let before = remus_bench_allocations()
    for _ in 0..<rounds { body() }
    return Double(remus_bench_allocations() - before) / Double(rounds * pages)
}

// MARK: - Workloads

// The benchmark is single-threaded: its globals are never shared between threads.
nonisolated(unsafe) var gen = SplitMix64(seed: 2026)

func fillRandom(_ page: UnsafeMutableRawBufferPointer) {
    for w in 0..<(page.count / 8) { page.storeBytes(of: gen.next() | 1, toByteOffset: w * 8, as: UInt64.self) }
}

/// An arena of `pageCount` raw pages, PFNs 0, 2, 4, … (the arena lays them out contiguously).
func makeArena(_ fill: (Int, UnsafeMutableRawBufferPointer) -> Void) -> StagingArena {
    let arena = StagingArena(pageSize: pageSize, capacityPages: pageCount)
    arena.reset(epoch: 1, kind: .checkpoint)
    for i in 0..<pageCount {
        if let page = arena.append(pfn: PFN(i * 2), encoding: .raw) { fill(i, page) }
    }
    return arena
}

/// The receiver's copies (delta bases), indexed by PFN / 2.
nonisolated(unsafe) let bases = UnsafeMutableRawBufferPointer.allocate(byteCount: batchBytes, alignment: 4096)
fillRandom(bases)
func base(_ index: Int) -> UnsafeRawBufferPointer {
    UnsafeRawBufferPointer(rebasing: bases[(index * pageSize)..<((index + 1) * pageSize)])
}

let randomArena = makeArena { _, page in fillRandom(page) }
let zeroArena = makeArena { _, page in page.initializeMemory(as: UInt8.self, repeating: 0) }
enum Mix: String, CaseIterable {
    case unchanged = "unchanged pages"
    case sparse = "sparse: 8 random bytes changed"
    case medium = "medium: 2 runs of 256 bytes changed"
    case dense = "dense: every byte changed"
}
func mixArena(_ mix: Mix) -> StagingArena {
    makeArena { i, page in
        page.copyMemory(from: base(i))
        switch mix {
        case .unchanged: break
        case .sparse:
            for _ in 0..<8 { page[Int.random(in: 0..<pageSize, using: &gen)] ^= UInt8.random(in: 1...255, using: &gen) }
        case .medium:
            for _ in 0..<2 {
                let start = Int.random(in: 0..<(pageSize - 256), using: &gen)
                for k in start..<(start + 256) { page[k] ^= 0xA5 }
            }
        case .dense:
            for k in 0..<pageSize { page[k] = ~page[k] }
        }
    }
}
let mixArenas = Dictionary(uniqueKeysWithValues: Mix.allCases.map { ($0, mixArena($0)) })
func deltaBase(_ pfn: PFN) -> UnsafeRawBufferPointer? { base(Int(pfn / 2)) }

/// Holds the noncopyable codec values so measurement closures can use them.
final class Codec {
    var encoder = StreamEncoder(pageSize: pageSize, features: [.deltaPages])
    var decoder = StreamDecoder(initialCapacity: 8 << 20)
    var contiguous: [UInt8] = []
}
nonisolated(unsafe) let codec = Codec()

// MARK: - Runs

print("stream codec benchmark: 1 PAGE_BATCH = \(pageCount) pages × \(pageSize) B = \(batchBytes >> 20) MiB; \(repetitions) repetitions × 8 batches")
let cpu = (try? String(decoding: readFile("/proc/cpuinfo"), as: UTF8.self))?.split(separator: "\n").first { $0.hasPrefix("model name") }
print("cpu: \(cpu.map { String($0.split(separator: ":").last ?? "").trimmingCharacters() } ?? "unknown"), \(sysconf(Int32(_SC_NPROCESSORS_ONLN))) online")

func readFile(_ path: String) throws -> [UInt8] {
    guard let f = fopen(path, "r") else { return [] }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&buffer, 1, buffer.count, f)
        if n <= 0 { break }
        out += buffer[0..<n]
    }
    return out
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while s.first == " " || s.first == "\t" { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        return String(s)
    }
}

// Sanity: the allocation counter sees Swift allocations.
let probeBefore = remus_bench_allocations()
blackHole([Int](repeating: 7, count: 1000))
precondition(remus_bench_allocations() > probeBefore, "the malloc interposer is not in effect")

// The arena stores consecutive raw pages contiguously: its first page starts the whole 4 MiB.
let source = UnsafeRawBufferPointer(start: randomArena.pageData(0).baseAddress, count: batchBytes)
precondition(randomArena.pageData(pageCount - 1).baseAddress == source.baseAddress! + (pageCount - 1) * pageSize)
let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: batchBytes, alignment: 4096)

struct Row {
    var name: String
    var throughput: Throughput
    var allocations: Double?
    var note = ""
}
var rows: [Row] = []

let memcpyResult = measure(bytes: batchBytes) {
    destination.copyMemory(from: source)
    blackHole(destination.baseAddress)
    return nil
}
rows.append(Row(name: "memcpy 4 MiB (reference)", throughput: memcpyResult, allocations: nil))

// Encode to iovec segments: zero detection + CRC over the page data, no copy.
rows.append(Row(
    name: "PAGE_BATCH encode → iovec (raw pages)",
    throughput: measure(bytes: batchBytes) {
        blackHole(codec.encoder.encodePageBatch(randomArena, entries: 0..<pageCount).header)
        return nil
    },
    allocations: allocationsPerPage { blackHole(codec.encoder.encodePageBatch(randomArena, entries: 0..<pageCount).header) }))

// Encode into one contiguous buffer (tests and golden files; copies the pages).
rows.append(Row(
    name: "PAGE_BATCH encode → contiguous buffer",
    throughput: measure(bytes: batchBytes) {
        codec.contiguous.removeAll(keepingCapacity: true)
        codec.encoder.appendPageBatch(randomArena, entries: 0..<pageCount, into: &codec.contiguous)
        return nil
    },
    allocations: allocationsPerPage {
        codec.contiguous.removeAll(keepingCapacity: true)
        codec.encoder.appendPageBatch(randomArena, entries: 0..<pageCount, into: &codec.contiguous)
    }))

// Decode: a stream header once, then the same batch record again and again.
var streamHeaderBytes: [UInt8] = []
try StreamEncoder.appendHeader(
    StreamHeader(features: [.deltaPages], pageSize: UInt32(pageSize), backend: .simulated, role: .primary, guestUUID: .zero, guestName: "bench", senderVersion: "bench"),
    into: &streamHeaderBytes)
codec.contiguous.removeAll(keepingCapacity: true)
codec.encoder.appendPageBatch(randomArena, entries: 0..<pageCount, into: &codec.contiguous)
let record = codec.contiguous
_ = streamHeaderBytes.withUnsafeBytes { codec.decoder.append($0) }
guard case .header? = try codec.decoder.next() else { fatalError("no header") }

/// Puts the record into the decoder's buffer the way read(2) would; returns the copy's duration.
func receiveRecord() -> UInt64 {
    let t0 = nowNs()
    var offset = 0
    while offset < record.count {
        let space = codec.decoder.writableSpace()
        let n = min(space.count, record.count - offset)
        record.withUnsafeBytes { space.baseAddress!.copyMemory(from: $0.baseAddress! + offset, byteCount: n) }
        codec.decoder.commit(n)
        offset += n
    }
    return nowNs() - t0
}

func decodeRecord() {
    guard case .record(let r)? = try? codec.decoder.next(), case .pageBatch(let batch) = r.content, batch.count == pageCount else {
        fatalError("batch not decoded")
    }
    blackHole(batch[pageCount - 1].data.baseAddress)
}

rows.append(Row(
    name: "PAGE_BATCH decode + CRC verify (bytes already in buffer)",
    throughput: measure(bytes: batchBytes) {
        _ = receiveRecord()
        let t0 = nowNs()
        decodeRecord()
        return nowNs() - t0
    },
    allocations: allocationsPerPage {
        _ = receiveRecord()
        decodeRecord()
    }))
rows.append(Row(
    name: "PAGE_BATCH receive (copy in, as read(2)) + decode",
    throughput: measure(bytes: batchBytes) {
        _ = receiveRecord()
        decodeRecord()
        return nil
    },
    allocations: nil))

// Zero-page detection: raw arena pages that are all zero go out as .zero.
rows.append(Row(
    name: "PAGE_BATCH encode, all-zero pages (zero detection)",
    throughput: measure(bytes: batchBytes) {
        blackHole(codec.encoder.encodePageBatch(zeroArena, entries: 0..<pageCount).zeroPages)
        return nil
    },
    allocations: allocationsPerPage { blackHole(codec.encoder.encodePageBatch(zeroArena, entries: 0..<pageCount).header) }))

// Delta pages.
let deltaOut = UnsafeMutableRawBufferPointer.allocate(byteCount: pageSize * pageCount, alignment: 8)
var deltaRows: [(Mix, Throughput, Throughput?, Double, Double)] = []
for mix in Mix.allCases {
    let arena = mixArenas[mix]!
    var lengths = [Int](repeating: 0, count: pageCount)
    func encodeAll() {
        for i in 0..<pageCount {
            let out = UnsafeMutableRawBufferPointer(rebasing: deltaOut[(i * pageSize)..<((i + 1) * pageSize)])
            lengths[i] = PageDelta.encode(page: arena.pageData(i), base: base(i), into: out) ?? 0
        }
    }
    let encode = measure(bytes: batchBytes) {
        encodeAll()
        return nil
    }
    let allocs = allocationsPerPage { encodeAll() }
    encodeAll()
    let sent = lengths.reduce(0) { $0 + ($1 == 0 ? pageSize : $1) }
    var apply: Throughput?
    if lengths.allSatisfy({ $0 > 0 }) {
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: batchBytes, alignment: 4096)
        scratch.copyMemory(from: UnsafeRawBufferPointer(bases))
        apply = measure(bytes: batchBytes) {
            // Applying the same delta twice restores the page: content stays valid.
            for i in 0..<pageCount {
                let delta = UnsafeRawBufferPointer(rebasing: deltaOut[(i * pageSize)..<(i * pageSize + lengths[i])])
                try! PageDelta.apply(delta, to: UnsafeMutableRawBufferPointer(rebasing: scratch[(i * pageSize)..<((i + 1) * pageSize)]))
            }
            return nil
        }
    }
    deltaRows.append((mix, encode, apply, Double(sent) / Double(batchBytes), allocs))
}

let sparseArena = mixArenas[.sparse]!
rows.append(Row(
    name: "PAGE_BATCH encode → iovec with delta (sparse mix)",
    throughput: measure(bytes: batchBytes) {
        blackHole(codec.encoder.encodePageBatch(sparseArena, entries: 0..<pageCount, deltaBase: deltaBase).header)
        return nil
    },
    allocations: allocationsPerPage { blackHole(codec.encoder.encodePageBatch(sparseArena, entries: 0..<pageCount, deltaBase: deltaBase).header) }))

// MARK: - Report

func f(_ x: Double) -> String {
    let scaled = (x * 100).rounded() / 100
    return String(scaled)
}
func percent(_ x: Double) -> String { "\(Int((x * 100).rounded()))%" }
/// Allocations per page, exact when zero (one allocation per batch would show as 0.001).
func allocs(_ x: Double) -> String { x == 0 ? "0" : String((x * 10000).rounded() / 10000) }
let reference = memcpyResult.median

print("")
print("| operation | median GB/s | p10–p90 GB/s | vs memcpy | allocs/page |")
print("| --- | ---: | ---: | ---: | ---: |")
for row in rows {
    let allocations = row.allocations.map { allocs($0) } ?? "–"
    print("| \(row.name) | \(f(row.throughput.median)) | \(f(row.throughput.p10))–\(f(row.throughput.p90)) | \(percent(row.throughput.median / reference)) | \(allocations) |")
}
print("")
print("| delta mix (1024 pages) | encode GB/s (p10–p90) | vs memcpy | apply GB/s of page bytes (p10–p90) | bytes sent / page bytes | allocs/page |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for (mix, encode, apply, ratio, allocations) in deltaRows {
    let applyText = apply.map { "\(f($0.median)) (\(f($0.p10))–\(f($0.p90)))" } ?? "– (sent raw)"
    print("| \(mix.rawValue) | \(f(encode.median)) (\(f(encode.p10))–\(f(encode.p90))) | \(percent(encode.median / reference)) | \(applyText) | \(f(ratio)) | \(allocs(allocations)) |")
}
