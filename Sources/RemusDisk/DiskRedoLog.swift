// The backup's redo log: how a committed epoch's disk operations become durable before the ACK
// and reach the disk images after it, surviving a crash in between or during the apply (I9).
import RemusCore
import RemusSystem

/// The backup's disk images of one stream, indexed by disk number.
public final class DiskImages {
    /// What the primary described, in disk-number order.
    public let descriptors: [DiskDescriptor]
    /// The image of each disk.
    public let files: [DiskFile]

    /// - Parameters:
    ///   - descriptors: the stream's disks, numbered 0, 1, 2, …
    ///   - files: each disk's open image, in the same order.
    public init(descriptors: [DiskDescriptor], files: [DiskFile]) {
        precondition(descriptors.count == files.count, "\(descriptors.count) disks with \(files.count) images")
        self.descriptors = descriptors
        self.files = files
    }

    /// The image `entry` goes to, after checking that it lies inside its disk (what we logged or
    /// staged always does; a damaged or foreign log might not). `source` names the entry's origin
    /// in the error.
    func image(for entry: DiskEntry, from source: @autoclosure () -> String) throws -> DiskFile {
        guard Int(entry.disk) < files.count else {
            throw DiskLogError("\(source()) names disk \(entry.disk); the stream has \(files.count)")
        }
        let d = descriptors[Int(entry.disk)]
        let length = entry.kind == .flush ? 0 : entry.length
        guard entry.offset <= d.sizeBytes, length <= d.sizeBytes - entry.offset,
              entry.kind != .write || length <= UInt64(StreamLimits.maxDiskWriteBytes) else {
            throw DiskLogError("\(source()): \(entry.kind) of \(length) bytes at \(entry.offset) does not fit disk \(entry.disk) (\(d.sizeBytes) bytes)")
        }
        return files[Int(entry.disk)]
    }
}

extension DiskFile {
    /// Reads the entry stored at `offset` (the layout of the redo log and of a staging spill
    /// file): its header, and for a write its data into `scratch`, a view valid until `scratch`
    /// is reused. Nil when the header is malformed or a write's data would not fit `scratch`.
    func readEntry(at offset: UInt64, scratch: UnsafeMutableRawBufferPointer) throws -> (entry: DiskEntry, data: UnsafeRawBufferPointer, next: UInt64)? {
        let head = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<DiskEntry.headerBytes])
        try read(into: head, at: offset)
        guard let entry = DiskEntry(UnsafeRawBufferPointer(head)),
              entry.kind != .write || entry.length <= UInt64(scratch.count) else { return nil }
        let dataAt = offset + UInt64(DiskEntry.headerBytes)
        var data = UnsafeRawBufferPointer(start: nil, count: 0)
        if entry.kind == .write {
            let view = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<Int(entry.length)])
            try read(into: view, at: dataAt)
            data = UnsafeRawBufferPointer(view)
        }
        return (entry, data, dataAt + UInt64(entry.storedDataBytes))
    }

    /// Sets `entry`'s range to its content: a write's `data`, zeros for a discard or write-zeroes;
    /// a flush changes nothing here (whoever applies an epoch syncs the image after it).
    func apply(_ entry: DiskEntry, data: UnsafeRawBufferPointer) throws(SystemError) {
        switch entry.kind {
        case .write: try write(data, at: entry.offset)
        case .discard, .writeZeroes: try zero(at: entry.offset, length: entry.length)
        case .flush: break
        }
    }
}

/// Why the redo log could not be read back or applied.
public struct DiskLogError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// A durable log holding the last committed epoch's disk operations until the images hold them.
///
/// The file: a 64-byte header at 0 ("applied": the sequence and epoch last applied to the
/// images), a 64-byte record header at 4096 (sequence, epoch, entry bytes and count, the entries'
/// CRC32C) and the entries (`DiskEntry` layout) after it. Each committed epoch, on the loop thread:
/// 1. `log(_:epoch:)`: the staged entries, then their record header, then fdatasync — before the
///    ACK. A crash part-way leaves a record whose CRC fails: nothing of it is ever applied, and
///    the images hold the previous epoch completely (step 2 of that epoch finished first).
/// 2. `applyLogged(to:)`: every entry onto its image in order, fdatasync of each image, then
///    "applied = sequence" into the header. A crash part-way is repaired by applying the whole
///    record again (`recover`): every entry sets its range to fixed content, so applying a prefix
///    of the entries and then all of them gives the same images as applying them once.
/// "applied" becomes durable with the next fdatasync of the log (the next epoch's step 1, or
/// `syncHeader`); until then a crash only applies that record once more, which changes nothing.
public final class DiskRedoLog {
    static let magic: [UInt8] = Array("REMUSLOG".utf8)
    static let recordMagic: [UInt8] = Array("REMUSEPO".utf8)
    static let recordOffset: UInt64 = 4096
    static let entriesOffset: UInt64 = recordOffset + 64
    static let version: UInt32 = 1

    /// The log file.
    public let file: DiskFile
    /// Sequence number of the last record applied to the images (0: none).
    public private(set) var appliedSequence: UInt64 = 0
    /// Epoch of the last record applied to the images.
    public private(set) var appliedEpoch: Epoch = 0
    /// The record logged and not yet applied, if any.
    public private(set) var pending: Record?
    /// Scratch for copying entries (a write's data is at most `StreamLimits.maxDiskWriteBytes`).
    private let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: StreamLimits.maxDiskWriteBytes, alignment: 4096)

    /// One logged epoch.
    public struct Record: Equatable, Sendable {
        public var sequence: UInt64
        public var epoch: Epoch
        public var entryBytes: UInt64
        public var entryCount: UInt32
        public var crc: UInt32
    }

    /// Opens the log at `path` (creating an empty one), and finds a record that was logged but
    /// not applied before this process started (`pending`: apply it with `applyLogged` before
    /// the images are used).
    public init(path: String) throws {
        file = try DiskFile(path: path, create: true)
        if try file.size() < Self.entriesOffset {
            try file.truncate(to: Self.entriesOffset)
            try writeHeader()
            try file.sync()
            return
        }
        let header = try readBlock(at: 0)
        guard Array(header[0..<8]) == Self.magic, le32(header, 8) == Self.version else {
            throw DiskLogError("\(path) is not a remusd disk redo log (version \(Self.version)); nothing was applied — move it away if it is not needed")
        }
        guard crc(header) == le32(header, 60) else {
            throw DiskLogError("the header of the redo log \(path) fails its CRC32C; nothing was applied — the disk images' state is unknown: resynchronise them")
        }
        appliedSequence = le64(header, 16)
        appliedEpoch = le64(header, 24)
        if let record = try readRecord(), record.sequence > appliedSequence, try entriesIntact(record) {
            pending = record
        }
    }

    deinit { scratch.deallocate() }

    // MARK: - Logging and applying

    /// Makes `staging`'s entries durable as the record of `epoch` (then the caller applies memory
    /// and acknowledges). The previous record must have been applied.
    public func log(_ staging: DiskEpochStaging, epoch: Epoch) throws {
        precondition(pending == nil, "logging epoch \(epoch) over the unapplied record of epoch \(pending?.epoch ?? 0)")
        var crc: UInt32 = 0
        var at = Self.entriesOffset
        try staging.forEachChunk(scratch: scratch) { chunk in
            try file.write(chunk, at: at)
            crc = CRC32C.extend(crc, chunk)
            at += UInt64(chunk.count)
        }
        let record = Record(sequence: appliedSequence + 1, epoch: epoch, entryBytes: at - Self.entriesOffset,
                            entryCount: UInt32(staging.entryCount), crc: crc)
        try writeRecordHeader(record)
        try file.sync()
        pending = record
    }

    /// Forgets the pending record without applying it (its epoch's memory could not be
    /// committed): it is marked applied, durably, so no recovery ever applies it.
    public func void() throws {
        guard let record = pending else { return }
        appliedSequence = record.sequence
        try writeHeader()
        try file.sync()
        pending = nil
    }

    /// Applies the pending record to `images`, durably, and records it as applied. Does nothing
    /// when no record is pending. On an error the record stays pending: applying it again later
    /// is safe.
    public func applyLogged(to images: DiskImages) throws {
        try applyLogged(to: images, stoppingAfter: nil)
    }

    /// `applyLogged`, or with `stoppingAfter` only that many entries and nothing after them
    /// (no sync, "applied" unchanged): the state a crash part-way through the apply leaves.
    func applyLogged(to images: DiskImages, stoppingAfter limit: Int?) throws {
        guard let record = pending else { return }
        var touched = Set<Int>()
        var at = Self.entriesOffset
        let end = Self.entriesOffset + record.entryBytes
        for index in 0..<Int(record.entryCount) {
            if let limit, index == limit { return }
            guard end - at >= UInt64(DiskEntry.headerBytes) else {
                throw DiskLogError("redo log record \(record.sequence) (epoch \(record.epoch)) ends inside an entry header")
            }
            guard let (entry, data, next) = try file.readEntry(at: at, scratch: scratch) else {
                throw DiskLogError("redo log record \(record.sequence) (epoch \(record.epoch)): malformed entry at log offset \(at)")
            }
            let disk = try images.image(for: entry, from: "redo log record \(record.sequence) (epoch \(record.epoch))")
            touched.insert(Int(entry.disk))
            try disk.apply(entry, data: data)  // a flush: the whole epoch is made durable below
            at = next
        }
        if limit != nil { return }
        for index in touched.sorted() { try images.files[index].sync() }
        appliedSequence = record.sequence
        appliedEpoch = record.epoch
        try writeHeader()
        pending = nil
    }

    /// Makes "applied" durable now (before a takeover hands the images to the guest).
    public func syncHeader() throws { try file.sync() }

    // MARK: - File layout

    private func writeHeader() throws {
        var h = [UInt8](repeating: 0, count: 64)
        h.replaceSubrange(0..<8, with: Self.magic)
        put32(&h, 8, Self.version)
        put64(&h, 16, appliedSequence)
        put64(&h, 24, appliedEpoch)
        put32(&h, 60, crc(h))
        try h.withUnsafeBytes { b in try file.write(b, at: 0) }
    }

    private func writeRecordHeader(_ r: Record) throws {
        var h = [UInt8](repeating: 0, count: 64)
        h.replaceSubrange(0..<8, with: Self.recordMagic)
        put64(&h, 8, r.sequence)
        put64(&h, 16, r.epoch)
        put64(&h, 24, r.entryBytes)
        put32(&h, 32, r.entryCount)
        put32(&h, 36, r.crc)
        put32(&h, 60, crc(h))
        try h.withUnsafeBytes { b in try file.write(b, at: Self.recordOffset) }
    }

    private func readBlock(at offset: UInt64) throws -> [UInt8] {
        var block = [UInt8](repeating: 0, count: 64)
        try block.withUnsafeMutableBytes { b in try file.read(into: b, at: offset) }
        return block
    }

    /// The record at `recordOffset`, nil when there is none or its header fails its CRC (a torn write).
    private func readRecord() throws -> Record? {
        let h = try readBlock(at: Self.recordOffset)
        guard Array(h[0..<8]) == Self.recordMagic, crc(h) == le32(h, 60) else { return nil }
        return Record(sequence: le64(h, 8), epoch: le64(h, 16), entryBytes: le64(h, 24), entryCount: le32(h, 32), crc: le32(h, 36))
    }

    /// Whether the record's entries are all there with their CRC.
    private func entriesIntact(_ record: Record) throws -> Bool {
        guard try file.size() >= Self.entriesOffset + record.entryBytes else { return false }
        var crc: UInt32 = 0
        var done: UInt64 = 0
        while done < record.entryBytes {
            let n = Int(min(UInt64(scratch.count), record.entryBytes - done))
            let piece = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])
            try file.read(into: piece, at: Self.entriesOffset + done)
            crc = CRC32C.extend(crc, UnsafeRawBufferPointer(piece))
            done += UInt64(n)
        }
        return crc == record.crc
    }

    private func crc(_ block: [UInt8]) -> UInt32 { block.withUnsafeBytes { CRC32C.extend(0, UnsafeRawBufferPointer(rebasing: $0[0..<60])) } }
}

private func le32(_ b: [UInt8], _ at: Int) -> UInt32 { b.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) } }
private func le64(_ b: [UInt8], _ at: Int) -> UInt64 { b.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) } }
private func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) { b.withUnsafeMutableBytes { $0.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt32.self) } }
private func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) { b.withUnsafeMutableBytes { $0.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt64.self) } }
