// The backup's buffer of one epoch's disk operations while its checkpoint arrives: memory up to a
// bound, then a spill file. Nothing here reaches a disk image; an epoch whose checkpoint does not
// complete is thrown away with `reset()` (I2, I9).
import RemusCore
import RemusSystem

/// One epoch's disk operations, in arrival order, as `DiskEntry` records: the first
/// `memoryBound` bytes in memory, the rest in a spill file (created on first use, emptied by
/// `reset`). How much a primary can make it hold is bounded by the stream validator
/// (`CheckpointValidator.maxDiskBytesPerCheckpoint`), checked before each record is staged.
///
/// `@unchecked Sendable`: used by one thread at a time, handed over whole (the connection's reader
/// stages, then waits while the backup's disk worker copies the epoch into the redo log).
public final class DiskEpochStaging: @unchecked Sendable {
    /// Bytes kept in memory before operations spill to the file.
    public let memoryBound: Int
    /// The spill file's path.
    public let spillPath: String
    private var memory = DiskOperations()
    private var spill: DiskFile?
    /// Bytes in the spill file.
    public private(set) var spilledBytes: UInt64 = 0
    /// Operations staged.
    public private(set) var entryCount = 0

    /// - Parameters:
    ///   - memoryBound: bytes of operations kept in memory (the rest spills).
    ///   - spillPath: where the spill file goes (created when first needed).
    public init(memoryBound: Int, spillPath: String) {
        self.memoryBound = memoryBound
        self.spillPath = spillPath
    }

    /// Bytes staged (memory and spill file).
    public var stagedBytes: UInt64 { UInt64(memory.bytes.count) + spilledBytes }

    /// Forgets everything staged (the epoch was committed into the redo log, or discarded).
    public func reset() throws {
        memory.removeAll(keepingCapacityUpTo: memoryBound)
        if spilledBytes > 0 { try spill?.truncate(to: 0) }
        spilledBytes = 0
        entryCount = 0
    }

    /// Stages a write of `data` at `offset` of `disk`.
    public func appendWrite(disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer) throws {
        try append(DiskEntry(kind: .write, disk: disk, offset: offset, length: UInt64(data.count)), data: data)
    }

    /// Stages a flush, discard or write-zeroes.
    public func append(_ command: DiskCommand) throws {
        try append(DiskEntry(command), data: UnsafeRawBufferPointer(start: nil, count: 0))
    }

    /// Stages what a served disk reported (`NBDServer`'s records), in its order.
    public func append(_ mutation: DiskMutation) throws {
        switch mutation {
        case .write(let w): try w.data.withUnsafeBytes { try appendWrite(disk: w.disk, offset: w.offset, data: $0) }
        case .command(let c): try append(c)
        }
    }

    private func append(_ entry: DiskEntry, data: UnsafeRawBufferPointer) throws {
        let header = entry.bytes
        let padding = entry.storedDataBytes - data.count
        let total = header.count + data.count + padding
        // Once anything spilled, everything after it spills too: the order stays memory, then file.
        if spilledBytes == 0 && memory.bytes.count + total <= memoryBound {
            memory.append(entry, data: data)
        } else {
            let file = try spillFile()
            try header.withUnsafeBytes { h in try file.write(h, at: spilledBytes) }
            try file.write(data, at: spilledBytes + UInt64(header.count))
            if padding > 0 {
                try [UInt8](repeating: 0, count: padding).withUnsafeBytes { p in
                    try file.write(p, at: spilledBytes + UInt64(header.count + data.count))
                }
            }
            spilledBytes += UInt64(total)
        }
        entryCount += 1
    }

    private func spillFile() throws -> DiskFile {
        if let spill { return spill }
        let file = try DiskFile(path: spillPath, create: true)
        try file.truncate(to: 0)
        spill = file
        return file
    }

    /// Calls `body` with each staged operation in order: its entry and (for a write) its data, a
    /// view valid during the call; spilled entries are read into `scratch`, which holds at least
    /// one DISK_WRITE's data (`StreamLimits.maxDiskWriteBytes`).
    func forEachEntry(scratch: UnsafeMutableRawBufferPointer, _ body: (DiskEntry, UnsafeRawBufferPointer) throws -> Void) throws {
        try memory.forEach(body)
        guard let spill else { return }
        var at: UInt64 = 0
        while at < spilledBytes {
            guard let (entry, data, next) = try spill.readEntry(at: at, scratch: scratch) else {
                throw DiskLogError("the spill file \(spillPath) holds a malformed entry at offset \(at)")
            }
            try body(entry, data)
            at = next
        }
    }

    /// Calls `body` with the staged bytes in order: the memory part, then the spill file in
    /// pieces of at most `chunkBytes` (read into `scratch`).
    func forEachChunk(scratch: UnsafeMutableRawBufferPointer, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        try memory.bytes.withUnsafeBytes { m in if m.count > 0 { try body(m) } }
        guard let spill else { return }
        var done: UInt64 = 0
        while done < spilledBytes {
            let n = Int(min(UInt64(scratch.count), spilledBytes - done))
            let piece = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])
            try spill.read(into: piece, at: done)
            try body(UnsafeRawBufferPointer(piece))
            done += UInt64(n)
        }
    }
}
