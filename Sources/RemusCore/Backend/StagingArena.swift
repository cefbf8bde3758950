/// Preallocated memory that holds one checkpoint's pages between capture and shipping (primary)
/// or between receipt and commit (backup).
///
/// Capture copies pages in while the guest is suspended; the arena is then handed to the shipping
/// thread and reset for reuse. Nothing is allocated per page.
///
/// `@unchecked Sendable`: an arena is owned by one thread at a time; the runtime hands it from the
/// capture thread to the shipping thread and back through a queue, never sharing it concurrently.
public final class StagingArena: @unchecked Sendable {
    /// One captured page: where it came from and how it is stored.
    public struct Entry: Equatable, Sendable {
        public var pfn: PFN
        /// `.raw` (data in the arena), `.zero` or `.absent` (no data).
        public var encoding: PageEncoding
        /// Byte offset of the page's data in the arena (meaningful for `.raw`).
        public var offset: Int
    }

    /// Page size in bytes.
    public let pageSize: Int
    /// Most pages the arena can hold.
    public let capacityPages: Int
    /// The epoch the content belongs to.
    public var epoch: Epoch = 0
    /// The kind of checkpoint the content belongs to.
    public var kind: CheckpointKind = .checkpoint
    /// Number of pages held.
    public private(set) var count: Int = 0
    /// Bytes of page data held.
    public private(set) var dataBytes: Int = 0

    /// What `seal()` found in one raw page: its CRC32C register and whether it is all zero.
    public struct PageSeal: Equatable, Sendable {
        /// `CRC32C.register(of:)` the page's data.
        public var register: UInt32
        /// Every byte is zero (it travels as `.zero`).
        public var isZero: Bool
    }

    /// Whether `seal()` ran since the last change: then every raw page's checksum and zero
    /// test are known, and shipping reads each page only to send it.
    public private(set) var isSealed = false

    private let data: UnsafeMutableRawPointer
    private let entries: UnsafeMutablePointer<Entry>
    private let seals: UnsafeMutablePointer<PageSeal>

    /// - Parameters:
    ///   - pageSize: bytes per page.
    ///   - capacityPages: most pages one checkpoint may hold (the `--max-checkpoint` bound).
    public init(pageSize: Int, capacityPages: Int) {
        precondition(pageSize > 0 && capacityPages > 0)
        self.pageSize = pageSize
        self.capacityPages = capacityPages
        // Large allocations come straight from mmap: untouched capacity costs no memory.
        data = .allocate(byteCount: pageSize * capacityPages, alignment: 4096)
        entries = .allocate(capacity: capacityPages)
        seals = .allocate(capacity: capacityPages)
    }

    deinit {
        data.deallocate()
        entries.deallocate()
        seals.deallocate()
    }

    /// Empties the arena for a new checkpoint.
    public func reset(epoch: Epoch, kind: CheckpointKind) {
        self.epoch = epoch
        self.kind = kind
        count = 0
        dataBytes = 0
        isSealed = false
    }

    /// Whether `pages` more pages fit.
    public func hasRoom(for pages: Int) -> Bool { count + pages <= capacityPages }

    /// Appends a page and returns where its `pageSize` bytes go (nil for `.zero` and `.absent`).
    /// The caller checks `hasRoom` first; appending past capacity is a programming error.
    @discardableResult
    public func append(pfn: PFN, encoding: PageEncoding) -> UnsafeMutableRawBufferPointer? {
        precondition(count < capacityPages, "staging arena full (\(capacityPages) pages)")
        precondition(encoding != .delta, "the arena holds decoded pages only")
        isSealed = false
        var offset = 0
        var destination: UnsafeMutableRawBufferPointer?
        if encoding == .raw {
            offset = dataBytes
            destination = UnsafeMutableRawBufferPointer(start: data + offset, count: pageSize)
            dataBytes += pageSize
        }
        entries[count] = Entry(pfn: pfn, encoding: encoding, offset: offset)
        count += 1
        return destination
    }

    /// Checksums every raw page and tests it for zero, once, after the last page was written
    /// (the primary: right after the guest resumed, while the pages are still in the cache), so
    /// that the writer never reads a page except to send it. Appending or resetting unseals.
    public func seal() {
        for i in 0..<count where entries[i].encoding == .raw {
            let page = UnsafeRawBufferPointer(start: data + entries[i].offset, count: pageSize)
            // SAFETY: i < count ≤ capacityPages, the capacity of `seals`.
            seals[i] = isZeroPage(page) ? PageSeal(register: 0, isZero: true) : PageSeal(register: CRC32C.register(of: page), isZero: false)
        }
        isSealed = true
    }

    /// What `seal()` found in the raw page at `index`; nil when the arena is not sealed.
    public func pageSeal(_ index: Int) -> PageSeal? {
        precondition(index < count && entries[index].encoding == .raw)
        return isSealed ? seals[index] : nil
    }

    /// The entry at `index`.
    public func entry(_ index: Int) -> Entry {
        precondition(index < count)
        return entries[index]
    }

    /// The data of the raw page at `index`.
    public func pageData(_ index: Int) -> UnsafeRawBufferPointer {
        let e = entry(index)
        precondition(e.encoding == .raw, "page \(e.pfn) has no data (\(e.encoding))")
        return UnsafeRawBufferPointer(start: data + e.offset, count: pageSize)
    }
}
