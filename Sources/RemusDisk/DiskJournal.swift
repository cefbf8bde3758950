// The primary's replicated disks: each operation applied to the local image and appended, in the
// same order, to the running epoch's journal, which the shell seals at each checkpoint (I9).
import Glibc
import RemusCore
import RemusSystem
import Synchronization

/// A protected guest's disks on the primary (`GuestDisks`): what its I/O path calls.
///
/// Each call applies the operation to the local image and appends it to the journal under one
/// lock, so the journal's order is the order the image saw; the call returns (the guest sees the
/// completion) only after both. A write does not wait for the backup: whatever depends on it
/// outside is held by the output buffer until the checkpoint that carries it is acknowledged.
///
/// The journal is bounded (`journalBound` bytes): a guest that writes more than that within one
/// epoch, or while no backup is connected, overflows it; the next seal throws and the shell
/// resynchronises (a new connection restarts the journal with a full copy).
///
/// `@unchecked Sendable`: the journal and its flags are guarded by `lock`; the image files are
/// immutable references whose positioned I/O is thread-safe.
public final class DiskJournal: GuestDisks, @unchecked Sendable {
    /// One disk to serve.
    public struct Disk: Sendable {
        /// The name the backup finds its image by ("xvda").
        public var name: String
        /// The local image (a file or block device).
        public var path: String
        /// The disk's size in bytes: a multiple of `blockSize`.
        public var sizeBytes: UInt64
        /// Logical block size in bytes (512 or 4096).
        public var blockSize: UInt32
        public init(name: String, path: String, sizeBytes: UInt64, blockSize: UInt32 = 4096) {
            self.name = name
            self.path = path
            self.sizeBytes = sizeBytes
            self.blockSize = blockSize
        }
    }

    public let descriptors: [DiskDescriptor]
    private let files: [DiskFile]
    /// Each disk's image, opened and locked, in the order of `descriptors` (an `NBDServer`
    /// serving the journal's disks applies to them).
    public var images: [DiskFile] { files }
    /// Most bytes of journal (entries and data) kept for one epoch.
    public let journalBound: Int
    private let lock = MonitorLock()
    private var journal = DiskOperations()
    private var recording = false
    private var overflowed = false
    /// Local writes handed to `localWriter` so far (`writeApplyingLater`), guarded by `lock`.
    private var localWritesQueued: UInt64 = 0
    /// Local writes done (or failed), guarded by `localDone`.
    private var localWritesDone: UInt64 = 0
    private let localDone = MonitorLock()
    /// Applies `writeApplyingLater`'s writes to the images, in order; started on first use.
    private var localWriter: SerialWorker?
    /// Local writes of `writeApplyingLater` that failed (the image then differs from the journal).
    public let localWriteFailures = Atomic<UInt64>(0)

    /// Opens (with `create`: creates, sparse, when missing) and locks each disk's image.
    /// Nothing is written to an image here. Throws naming the disk and what to do when an image
    /// is missing, smaller than its size, in use, or its name or size is unusable.
    /// - Parameter journalBound: most bytes one epoch's journal may hold (default 256 MiB).
    public convenience init(_ disks: [Disk], create: Bool, journalBound: Int = 256 << 20) throws {
        var descriptors: [DiskDescriptor] = []
        var files: [DiskFile] = []
        for (index, disk) in disks.enumerated() {
            guard StreamLimits.diskBlockSizes.contains(disk.blockSize), disk.sizeBytes > 0,
                  disk.sizeBytes % UInt64(disk.blockSize) == 0, disk.sizeBytes <= StreamLimits.maxDiskBytes else {
                throw DiskLogError("disk '\(disk.name)': \(disk.sizeBytes) bytes is not a positive multiple of its block size \(disk.blockSize) (512 or 4096) up to 2^56; nothing was opened")
            }
            guard (1...StreamLimits.maxDiskName).contains(disk.name.utf8.count) else {
                throw DiskLogError("disk name '\(disk.name)' must be 1…\(StreamLimits.maxDiskName) bytes; nothing was opened")
            }
            let file: DiskFile
            do {
                file = try DiskFile(path: disk.path, create: create)
            } catch {
                throw DiskLogError("disk '\(disk.name)': cannot open its image \(disk.path): \(error); nothing was changed — create it or give another path")
            }
            if let busy = file.lockExclusive() {
                throw DiskLogError("disk '\(disk.name)': its image \(disk.path) is in use: \(busy); nothing was changed — stop the other user first")
            }
            let size = try file.size()
            if size < disk.sizeBytes {
                guard create && size == 0 else {
                    throw DiskLogError("disk '\(disk.name)': its image \(disk.path) holds \(size) bytes, smaller than the disk's \(disk.sizeBytes); nothing was changed — grow the image or declare a smaller disk")
                }
                try file.truncate(to: disk.sizeBytes)
            }
            descriptors.append(DiskDescriptor(disk: UInt32(index), blockSize: disk.blockSize, sizeBytes: disk.sizeBytes, name: disk.name))
            files.append(file)
        }
        self.init(descriptors: descriptors, images: files, journalBound: journalBound)
    }

    /// A journal over images another part of remusd already opened, checked and locked (an
    /// `NBDServer` serving them): it applies operations through `record` only, never itself,
    /// and reads the images for the full copy.
    /// - Parameters:
    ///   - descriptors: the disks, numbered 0, 1, 2, … in order.
    ///   - images: each disk's image, in the same order.
    public init(descriptors: [DiskDescriptor], images: [DiskFile], journalBound: Int = 256 << 20) {
        precondition(descriptors.count == images.count && descriptors.enumerated().allSatisfy { $0.element.disk == UInt32($0.offset) },
                     "disks must be numbered 0, 1, 2, … with one image each")
        self.descriptors = descriptors
        files = images
        self.journalBound = journalBound
    }

    // MARK: - The guest's I/O path

    /// Writes `data` at `offset` of `disk` (offset and length multiples of its block size, inside
    /// it; a write longer than a DISK_WRITE's 4 MiB is journaled as several).
    public func write(disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer) throws {
        try check(disk, offset, UInt64(data.count))
        try lock.withLock {
            try files[Int(disk)].write(data, at: offset)
            journalWrite(disk: disk, offset: offset, data: data)
        }
    }

    /// Journals a write now and applies it to the local image soon after, in order, on a worker
    /// thread: for a caller that must not wait for host I/O (the simulated guest's vCPU, which
    /// parks for a checkpoint only between ops: a `pwrite` held up by the filesystem's journal
    /// stretched its checkpoint pauses). I9 needs the journal entry, which carries the data; the
    /// local image is read only for a full copy, and `restartJournal` and `read` first wait for
    /// every write journaled before them.
    public func writeApplyingLater(disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer) throws {
        try check(disk, offset, UInt64(data.count))
        let copy = [UInt8](data)
        let file = files[Int(disk)]
        lock.withLock {
            journalWrite(disk: disk, offset: offset, data: data)
            if localWriter == nil { localWriter = SerialWorker(name: "disk-local-writes") }
            localWritesQueued += 1
            // Queued under `lock`: the images see the writes in the journal's order.
            localWriter?.run { [self] in
                do { try copy.withUnsafeBytes { try file.write($0, at: offset) } } catch { localWriteFailures.add(1, ordering: .relaxed) }
                localDone.withLock {
                    localWritesDone += 1
                    localDone.broadcast()
                }
            }
        }
    }

    /// Waits until every write `writeApplyingLater` journaled so far reached the local image.
    public func waitForLocalWrites() {
        let queued = lock.withLock { localWritesQueued }
        localDone.withLock { while localWritesDone < queued { localDone.wait() } }
    }

    /// Journals an operation the caller already applied to the local image, in the order it
    /// applied them (an `NBDServer`'s `record`: called before its reply leaves). Throws for an
    /// operation outside its disk (the server then answers EIO).
    public func record(_ operation: CompletedDiskOperation) throws {
        switch operation {
        case .write(let disk, let offset, let data):
            try check(disk, offset, UInt64(data.count))
            guard data.count <= StreamLimits.maxDiskWriteBytes else {
                throw DiskLogError("a recorded write of \(data.count) bytes is over a DISK_WRITE's \(StreamLimits.maxDiskWriteBytes); record it in pieces")
            }
            // Copied once, from the server's buffer into the journal.
            lock.withLock { journal(DiskEntry(kind: .write, disk: disk, offset: offset, length: UInt64(data.count)), data) }
        case .command(let c):
            try check(c.disk, c.kind == .flush ? 0 : c.offset, c.kind == .flush ? 0 : c.length)
            lock.withLock { journal(DiskEntry(c), nil) }
        }
    }

    /// Makes every completed write of `disk` durable here (fdatasync), then journals the flush.
    /// With `localSync` false the local fdatasync is skipped (only the journal entry is made):
    /// for a caller whose host-side durability does not matter, since failover resumes from the
    /// backup's image, which applies the flush's epoch durably anyway.
    public func flush(disk: UInt32, localSync: Bool = true) throws {
        try check(disk, 0, 0)
        if localSync { try files[Int(disk)].sync() }
        lock.withLock { journal(DiskEntry(kind: .flush, disk: disk, offset: 0, length: 0), nil) }
    }

    /// The range reads as zeros afterwards (remusd's rule for a discard, so a replay is exact).
    public func discard(disk: UInt32, offset: UInt64, length: UInt64) throws {
        try zero(.discard, disk: disk, offset: offset, length: length)
    }

    /// The range reads as zeros.
    public func writeZeroes(disk: UInt32, offset: UInt64, length: UInt64) throws {
        try zero(.writeZeroes, disk: disk, offset: offset, length: length)
    }

    private func zero(_ kind: DiskEntry.Kind, disk: UInt32, offset: UInt64, length: UInt64) throws {
        try check(disk, offset, length)
        try lock.withLock {
            try files[Int(disk)].zero(at: offset, length: length)
            journal(DiskEntry(kind: kind, disk: disk, offset: offset, length: length), nil)
        }
    }

    /// Journals a write in DISK_WRITE-sized entries (lock held).
    private func journalWrite(disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer) {
        var done = 0
        while done < data.count {
            let n = min(data.count - done, StreamLimits.maxDiskWriteBytes)
            journal(DiskEntry(kind: .write, disk: disk, offset: offset + UInt64(done), length: UInt64(n)),
                    UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]))
            done += n
        }
    }

    /// Appends to the journal (lock held); past the bound the journal is dropped and the next seal fails.
    private func journal(_ entry: DiskEntry, _ data: UnsafeRawBufferPointer?) {
        guard recording, !overflowed else { return }
        if journal.bytes.count + DiskEntry.headerBytes + entry.storedDataBytes > journalBound {
            overflowed = true
            journal.removeAll(keepingCapacityUpTo: 0)
            return
        }
        journal.append(entry, data: data ?? UnsafeRawBufferPointer(start: nil, count: 0))
    }

    private func check(_ disk: UInt32, _ offset: UInt64, _ length: UInt64) throws {
        guard Int(disk) < descriptors.count else {
            throw DiskLogError("disk \(disk) does not exist (\(descriptors.count) disks)")
        }
        let d = descriptors[Int(disk)]
        let block = UInt64(d.blockSize)
        guard offset % block == 0, length % block == 0, offset <= d.sizeBytes, length <= d.sizeBytes - offset else {
            throw DiskLogError("disk '\(d.name)': \(length) bytes at \(offset) are not whole \(block)-byte blocks inside its \(d.sizeBytes) bytes")
        }
    }

    // MARK: - GuestDisks

    public func restartJournal() {
        let queued = lock.withLock {
            journal.removeAll()
            overflowed = false
            recording = true
            return localWritesQueued
        }
        // A write journaled before the restart is in no journal now: the full copy that follows
        // must read it from the image.
        localDone.withLock { while localWritesDone < queued { localDone.wait() } }
    }

    public func sealEpoch() throws -> DiskOperations {
        try lock.withLock {
            if overflowed {
                recording = false
                throw DiskLogError("the guest's disk writes of one epoch exceeded the journal's \(journalBound >> 20) MiB; they cannot all be replicated — the backup resynchronises its disks with a full copy")
            }
            let sealed = journal
            journal.removeAll()
            return sealed
        }
    }

    public func read(disk: UInt32, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try check(disk, offset, UInt64(buffer.count))
        waitForLocalWrites()
        try files[Int(disk)].read(into: buffer, at: offset)
    }
}
