// Guest-physical memory: a sparse anonymous mapping and the per-page logs kept beside it. Every
// raw pointer into guest memory lives in this file.

import Glibc
import RemusCore
import Synchronization
import RemusSystem

/// A fixed-size bit set whose words are atomics, shared by the vCPU threads and the capture thread.
///
/// `@unchecked Sendable`: the words are only ever accessed through `Atomic` operations; the pointer
/// itself never changes after `init` and is freed in `deinit` when no thread holds the bitmap.
final class AtomicBitmap: @unchecked Sendable {
    let bitCount: UInt64
    let wordCount: Int
    private let words: UnsafeMutablePointer<Atomic<UInt64>>

    init(bitCount: UInt64) {
        self.bitCount = bitCount
        wordCount = Int((bitCount + 63) / 64)
        words = .allocate(capacity: max(wordCount, 1))
        // SAFETY: every word of the fresh allocation is initialised exactly once before any use;
        // `deinit` deinitialises the same count.
        for i in 0..<max(wordCount, 1) { (words + i).initialize(to: Atomic(0)) }
    }

    deinit {
        words.deinitialize(count: max(wordCount, 1))
        words.deallocate()
    }

    @inline(__always) private static func mask(_ bit: UInt64) -> UInt64 { 1 << (bit & 63) }

    /// Whether `bit` is set (acquire: what the setter wrote before setting it is visible).
    @inline(__always)
    func test(_ bit: UInt64) -> Bool {
        words[Int(bit >> 6)].load(ordering: .acquiring) & Self.mask(bit) != 0
    }

    /// Sets `bit` (release) and tells whether it was clear.
    @inline(__always) @discardableResult
    func set(_ bit: UInt64) -> Bool {
        words[Int(bit >> 6)].bitwiseOr(Self.mask(bit), ordering: .releasing).oldValue & Self.mask(bit) == 0
    }

    /// Sets `bit` unless it already is. Only for bits that a single thread sets and clears (a page's
    /// owner): then the plain check cannot miss a concurrent change to the same bit.
    @inline(__always)
    func setIfClear(_ bit: UInt64) {
        if words[Int(bit >> 6)].load(ordering: .relaxed) & Self.mask(bit) == 0 {
            words[Int(bit >> 6)].bitwiseOr(Self.mask(bit), ordering: .releasing)
        }
    }

    /// Clears `bit` (release).
    @inline(__always)
    func clear(_ bit: UInt64) {
        words[Int(bit >> 6)].bitwiseAnd(~Self.mask(bit), ordering: .releasing)
    }

    /// The 64 bits of word `index`.
    @inline(__always)
    func word(_ index: Int) -> UInt64 { words[index].load(ordering: .acquiring) }

    /// Takes word `index` and leaves it zero, in one atomic step.
    @inline(__always)
    func takeWord(_ index: Int) -> UInt64 { words[index].exchange(0, ordering: .acquiringAndReleasing) }

    /// Sets every bit below `bitCount`.
    func setAll() {
        for i in 0..<wordCount {
            let valid = min(64, bitCount - UInt64(i) * 64)
            let bits: UInt64 = valid == 64 ? ~0 : (1 << valid) - 1
            words[i].bitwiseOr(bits, ordering: .releasing)
        }
    }

    /// Clears every bit.
    func clearAll() {
        for i in 0..<wordCount { words[i].store(0, ordering: .releasing) }
    }
}

/// A guest's memory: `pageCount` pages mapped `MAP_NORESERVE`, so only touched pages cost RAM.
///
/// Beside the pages it keeps three per-page logs:
/// - `dirty`: set after every store and balloon transition; harvested (taken and cleared) word by word.
/// - `written`: set before the first store to a page since it was (re)populated. A page without it
///   is known to be zero and is captured as `.zero` without reading it.
/// - `absent`: the page is given back (not populated): its content is discarded, it reads as absent.
///
/// `@unchecked Sendable`: vCPU threads store into pages of their own region only; other threads
/// read pages while the vCPUs are parked (the park handshake orders the accesses) or, for a live
/// pre-copy round, read racily like a hypervisor's DMA does — a page changed during the copy is
/// dirty again and is sent again. The logs are atomics.
final class GuestMemory: @unchecked Sendable {
    let pageSize: Int
    let pageCount: UInt64
    let byteCount: Int
    let dirty: AtomicBitmap
    let written: AtomicBitmap
    let absent: AtomicBitmap
    private let base: UnsafeMutableRawPointer

    init(pageSize: Int, pageCount: UInt64) throws(SimError) {
        self.pageSize = pageSize
        self.pageCount = pageCount
        byteCount = pageSize * Int(pageCount)
        let mapped = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapped, mapped != MAP_FAILED else { throw .system(.last("mmap(\(byteCount) bytes)")) }
        base = mapped
        dirty = AtomicBitmap(bitCount: pageCount)
        written = AtomicBitmap(bitCount: pageCount)
        absent = AtomicBitmap(bitCount: pageCount)
    }

    deinit {
        // SAFETY: `base` came from mmap of `byteCount` bytes and nobody holds a pointer into it once
        // the last reference to this object is gone.
        munmap(base, byteCount)
    }

    /// The bytes of page `pfn`.
    @inline(__always)
    func page(_ pfn: PFN) -> UnsafeMutableRawPointer {
        precondition(pfn < pageCount, "PFN \(pfn) outside guest memory of \(pageCount) pages")
        // SAFETY: pfn < pageCount, so the page lies inside the mapping.
        return base + Int(pfn) * pageSize
    }

    // MARK: The vCPU's view

    /// Stores `value` into 8-byte word `word` of page `pfn`; tells whether the page became dirty.
    @inline(__always)
    func store(pfn: PFN, word: UInt64, value: UInt64) -> Bool {
        // Order matters for a live harvest: `written` before the data, `dirty` (release) after it, so
        // a harvest that takes the dirty bit also sees the data and the written bit.
        written.setIfClear(pfn)
        // SAFETY: word < pageSize / 8 by construction of the workload; the page is inside the mapping
        // and only this vCPU writes it.
        (base + Int(pfn) * pageSize + Int(word) * 8).storeBytes(of: value, as: UInt64.self)
        return dirty.set(pfn)
    }

    /// Loads 8-byte word `word` of page `pfn`.
    @inline(__always)
    func load(pfn: PFN, word: UInt64) -> UInt64 {
        // SAFETY: as in `store`; the word is 8-byte aligned because pages are.
        (base + Int(pfn) * pageSize + Int(word) * 8).load(as: UInt64.self)
    }

    /// Gives page `pfn` back to the host: its content is discarded and it becomes absent. Tells
    /// whether the page became dirty.
    @discardableResult
    func giveBack(_ pfn: PFN) -> Bool {
        absent.set(pfn)
        written.clear(pfn)
        discard(pfn)
        return dirty.set(pfn)
    }

    /// Takes page `pfn` again: populated, zero-filled. Tells whether the page became dirty.
    @discardableResult
    func takeBack(_ pfn: PFN) -> Bool {
        absent.clear(pfn)
        return dirty.set(pfn)
    }

    /// Drops the page's content; it reads as zeros afterwards and costs no RAM.
    func discard(_ pfn: PFN) {
        let p = page(pfn)
        // SAFETY: p is page-aligned (mmap base, page size a multiple of the host's) and the range is
        // one page inside the mapping.
        if madvise(p, pageSize, MADV_DONTNEED) != 0 {
            p.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
        }
    }

    // MARK: Whole-page access (capture, commit, verification)

    /// Copies page `pfn` to `destination` (`pageSize` bytes).
    @inline(__always)
    func copyPage(_ pfn: PFN, to destination: UnsafeMutableRawBufferPointer) {
        precondition(destination.count >= pageSize)
        // SAFETY: source is one page inside the mapping; destination holds at least pageSize bytes and
        // does not overlap guest memory (it belongs to a staging arena).
        memcpy(destination.baseAddress!, page(pfn), pageSize)
    }

    /// Overwrites page `pfn` with `source` (`pageSize` bytes).
    @inline(__always)
    func writePage(_ pfn: PFN, from source: UnsafeRawBufferPointer) {
        precondition(source.count >= pageSize)
        // SAFETY: destination is one page inside the mapping; the source is a staging arena's page.
        memcpy(page(pfn), source.baseAddress!, pageSize)
    }

    /// Fills page `pfn` with zeros.
    func zeroPage(_ pfn: PFN) {
        // SAFETY: one page inside the mapping.
        page(pfn).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
    }

    /// A read-only view of page `pfn`.
    func pageBytes(_ pfn: PFN) -> UnsafeRawBufferPointer {
        // SAFETY: one page inside the mapping, valid as long as this object lives.
        UnsafeRawBufferPointer(start: page(pfn), count: pageSize)
    }

    /// Whether page `pfn` holds only zero bytes (reads the page).
    func isZeroPage(_ pfn: PFN) -> Bool {
        PageHash.isZero(pageBytes(pfn))
    }
}

/// The page and memory digests the verifier and tests compare.
public enum PageHash {
    /// Whether every byte is zero.
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        let words = bytes.count / 8
        var acc: UInt64 = 0
        // SAFETY: every load reads 8 bytes at offset ≤ count − 8 (unaligned loads: any buffer works).
        for i in 0..<words { acc |= base.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) }
        for i in (words * 8)..<bytes.count { acc |= UInt64(bytes[i]) }
        return acc == 0
    }

    /// A 64-bit hash of one page's bytes and its PFN.
    public static func page(_ bytes: UnsafeRawBufferPointer, pfn: PFN) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325 ^ pfn
        if let base = bytes.baseAddress {
            let words = bytes.count / 8
            // SAFETY: as in `isZero`.
            for i in 0..<words {
                h = (h ^ base.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) &* 0x0000_0100_0000_01B3
                h ^= h >> 29
            }
            for i in (words * 8)..<bytes.count { h = (h ^ UInt64(bytes[i])) &* 0x0000_0100_0000_01B3 }
        }
        return mix64(h ^ UInt64(bytes.count))
    }

    /// Folds one page's hash into a memory digest. A memory digest folds, in ascending PFN order,
    /// every populated page that is not all zero; starting value `memorySeed`.
    public static func fold(_ digest: UInt64, pageHash: UInt64) -> UInt64 {
        mix64(digest ^ pageHash) &+ 0x9E37_79B9_7F4A_7C15
    }

    /// Starting value of a memory digest.
    public static let memorySeed: UInt64 = 0x5349_4D4D_454D_0001
}

extension GuestMemory {
    /// The memory digest (see `PageHash.fold`): reads every populated page.
    func digest() -> UInt64 {
        var d = PageHash.memorySeed
        for pfn in 0..<pageCount where !absent.test(pfn) {
            let bytes = pageBytes(pfn)
            if !PageHash.isZero(bytes) { d = PageHash.fold(d, pageHash: PageHash.page(bytes, pfn: pfn)) }
        }
        return d
    }
}
