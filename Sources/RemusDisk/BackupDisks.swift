// The backup's replicated disks: the disk directory (`remusd receive --disk-dir`), the images in
// it, the epoch staging's spill files and the redo log that makes each committed epoch durable
// before its ACK and brings the images to it after (I9).
import Glibc
import RemusCore
import RemusSystem

/// The disk directory of a backup and what it holds:
/// - one image per disk, named as the primary names the disk (`xvda`), made by the operator with
///   at least the disk's size;
/// - `.remusd-redo.log`: the redo log (`DiskRedoLog`);
/// - `.remusd-disks`: which image each disk number of the current stream is (so a restarted
///   backup can finish applying a logged epoch);
/// - `.remusd-spill-N`: the spill file of connection N's staging, removed when it ends;
/// - `.remusd-lock`: held (flock) while a backup uses the directory.
///
/// `@unchecked Sendable`: every method after `init` holds `lock` (the daemon's loop thread opens
/// and hands over images, its disk worker logs and applies).
public final class BackupDisks: @unchecked Sendable {
    private let lock = MonitorLock()
    /// The directory.
    public let directory: String
    private let directoryLock: DiskFile
    private let log: DiskRedoLog
    private var openImages: DiskImages?
    /// Whether a pre-copy round (`copy`) reached the images since they were last synced.
    private var copyUnsynced = false
    /// Where `copy` reads spilled entries (one DISK_WRITE's data); allocated on first use.
    private var copyScratch: UnsafeMutableRawBufferPointer?
    /// The images of the current stream, once `open` accepted its disks.
    public var images: DiskImages? { lock.withLock { openImages } }
    /// The epoch a record found in the redo log at start was applied for (nil: none was pending).
    public let recoveredEpoch: Epoch?
    /// Why a record found in the redo log at start could not be applied (nil: none, or applied).
    public let recoveryProblem: String?

    static let manifestName = ".remusd-disks"

    deinit { copyScratch?.deallocate() }

    /// Opens the directory: takes its lock, opens the redo log, and finishes applying a record
    /// that a previous process logged but did not apply (`recoveredEpoch`).
    public init(directory: String) throws {
        self.directory = directory
        var st = stat()
        guard stat(directory, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw DiskLogError("the disk directory \(directory) does not exist or is not a directory; nothing was started — create it and put each disk's image in it")
        }
        directoryLock = try DiskFile(path: directory + "/.remusd-lock", create: true)
        if directoryLock.lockExclusive() != nil {
            throw DiskLogError("the disk directory \(directory) is in use by another 'remusd receive'; nothing was started — give each backup a directory of its own")
        }
        log = try DiskRedoLog(path: directory + "/.remusd-redo.log")
        guard let pending = log.pending else {
            (recoveredEpoch, recoveryProblem) = (nil, nil)
            return
        }
        // A crash between logging epoch N and applying it: the images may hold part of N. Apply
        // the whole record again (each entry sets its range to fixed content).
        do {
            let manifest = try Self.readManifest(directory + "/" + Self.manifestName)
            let images = try Self.openImages(manifest, in: directory)
            try log.applyLogged(to: images)
            try log.syncHeader()
            (recoveredEpoch, recoveryProblem) = (pending.epoch, nil)
        } catch {
            // Kept pending (never half-trusted); the next primary's stream voids it and copies the images whole.
            (recoveredEpoch, recoveryProblem) = (nil, "the redo log holds the disk writes of checkpoint \(pending.epoch), which could not be applied: \(error)")
        }
    }

    // MARK: - A stream's disks

    /// Checks and opens the images of a stream's disks, before anything changes: each name must
    /// be a plain file name in the directory, its image must exist, hold at least the disk's size
    /// and not be in use. Returns why not (naming the disk and what to do), or nil when accepted:
    /// then the images are this stream's. Writes nothing (no fdatasync on the caller's thread):
    /// `prepareStream` must run before the stream's first `log`.
    public func open(_ descriptors: [DiskDescriptor]) -> String? {
        lock.withLock { openLocked(descriptors) }
    }

    private func openLocked(_ descriptors: [DiskDescriptor]) -> String? {
        let images: DiskImages
        do {
            images = try Self.openImages(descriptors, in: directory, reusing: openImages)
        } catch {
            return "\(error)"
        }
        openImages = images
        return nil
    }

    /// Before the stream's first `log`: voids an unapplied record of an earlier stream (the new
    /// one starts with a full copy) and makes the manifest name this stream's disks, durably.
    public func prepareStream() throws {
        try lock.withLock {
            guard let images = openImages else { return }
            try log.void()
            let path = directory + "/" + Self.manifestName
            if (try? Self.readManifest(path)) != images.descriptors {
                try Self.writeManifest(images.descriptors, to: path)
            }
        }
    }

    /// The images are handed to the guest taken over here: they are closed (and unlocked) so it
    /// can open them. Returns each disk with its image's path.
    public func handOver() -> [(DiskDescriptor, String)] {
        lock.withLock {
            guard let images = openImages else { return [] }
            openImages = nil
            return images.descriptors.map { ($0, directory + "/" + $0.name) }
        }
    }

    /// A staging buffer for one connection's checkpoints (`tag` names its spill file).
    public func makeStaging(tag: Int, memoryBound: Int = 32 << 20) -> DiskEpochStaging {
        DiskEpochStaging(memoryBound: memoryBound, spillPath: directory + "/.remusd-spill-\(tag)")
    }

    // MARK: - Per committed epoch (see DiskRedoLog)

    /// Makes `staging`'s operations durable as `epoch`'s record, before memory is applied and ACKed.
    /// The first record after a copy syncs every image first, so the ACK that follows covers the
    /// copy under it too.
    public func log(_ staging: DiskEpochStaging, epoch: Epoch) throws {
        try lock.withLock {
            if copyUnsynced, let images = openImages {
                for file in images.files { try file.sync() }
                copyUnsynced = false
            }
            try log.log(staging, epoch: epoch)
        }
    }

    /// Writes a pre-copy round's staged operations (the full copy that starts every stream)
    /// straight onto the images: no redo log record and no sync. Until its first checkpoint a
    /// stream's images hold no committed epoch (the replica was configured anew for it), so a
    /// crash part-way loses nothing the next stream does not copy whole again; the first
    /// checkpoint's `log` syncs every image before its record, so before its ACK. Going through
    /// the redo log instead wrote and synced each byte of the copy twice more.
    public func copy(_ staging: DiskEpochStaging) throws {
        try lock.withLock {
            guard let images = openImages else { throw DiskLogError("no disk images are open; the primary described no disks") }
            let scratch = copyScratch ?? .allocate(byteCount: StreamLimits.maxDiskWriteBytes, alignment: 4096)
            copyScratch = scratch
            copyUnsynced = true
            try staging.forEachEntry(scratch: scratch) { entry, data in
                try images.image(for: entry, from: "the disk copy").apply(entry, data: data)
            }
        }
    }

    /// Memory `epoch` could not be applied: its logged record is never applied.
    public func void() throws { try lock.withLock { try log.void() } }

    /// Applies the logged record to the images, durably; the epoch it brought them to.
    public func apply() throws {
        try lock.withLock {
            guard let images = openImages else { throw DiskLogError("no disk images are open; the primary described no disks") }
            try log.applyLogged(to: images)
        }
    }

    /// Entries of the logged record not yet applied (0: none pending).
    package var pendingEntries: Int { lock.withLock { log.pending.map { Int($0.entryCount) } ?? 0 } }

    /// The injected faults (`InjectedFault`): applies only the first `entries` of the logged
    /// record, nothing synced and "applied" unchanged — what a crash part-way through the apply
    /// leaves; `apply` later applies the whole record again.
    package func applyPart(entries: Int) throws {
        try lock.withLock {
            guard let images = openImages else { throw DiskLogError("no disk images are open; the primary described no disks") }
            try log.applyLogged(to: images, stoppingAfter: entries)
        }
    }

    /// Makes "applied" durable (before the images are handed to a guest).
    public func syncHeader() throws { try lock.withLock { try log.syncHeader() } }

    /// The epoch the images hold (the last record applied).
    public var appliedEpoch: Epoch { lock.withLock { log.appliedEpoch } }

    /// Tests: the redo log and the open images, under the lock (to stop an apply part-way).
    func withLoggedRecord(_ body: (DiskRedoLog, DiskImages) throws -> Void) throws {
        try lock.withLock {
            guard let images = openImages else { throw DiskLogError("no images open") }
            try body(log, images)
        }
    }

    // MARK: - Images and manifest

    /// Where the image of disk `d` lives in `directory`: the file named as the primary names the
    /// disk. The name comes from the network: one that is not a plain file name (a '/', a
    /// leading '.', a NUL) is refused, so no other file of this host is ever taken for an image.
    public static func imagePath(of d: DiskDescriptor, in directory: String) throws -> String {
        let name = d.name
        guard !name.isEmpty, !name.contains("/"), !name.hasPrefix("."), !name.contains("\0") else {
            throw DiskLogError("disk \(d.disk) is named '\(name)', which is not a plain file name; this backup finds an image by the disk's name in \(directory) — nothing was changed; name the disk on the primary without '/' or a leading '.'")
        }
        return directory + "/" + name
    }

    /// Opens each disk's image, reusing one already open under the same name.
    static func openImages(_ descriptors: [DiskDescriptor], in directory: String, reusing open: DiskImages? = nil) throws -> DiskImages {
        var files: [DiskFile] = []
        for d in descriptors {
            let name = d.name
            let path = try imagePath(of: d, in: directory)
            let file: DiskFile
            if let index = open?.descriptors.firstIndex(where: { $0.name == name }), let reused = open?.files[index] {
                file = reused
            } else {
                guard access(path, F_OK) == 0 else {
                    throw DiskLogError("disk '\(name)': its image \(path) is missing; nothing was changed — create it on this backup with at least \(d.sizeBytes) bytes (e.g. truncate -s \(d.sizeBytes) \(path)); the primary's content is copied into it when protection starts")
                }
                file = try DiskFile(path: path, create: false)
                if let busy = file.lockExclusive() {
                    throw DiskLogError("disk '\(name)': its image \(path) is in use: \(busy); nothing was changed — stop the other user of the image first")
                }
            }
            let size = try file.size()
            guard size >= d.sizeBytes else {
                let grow = file.isBlockDevice ? "grow the device to at least \(d.sizeBytes) bytes (lvextend)" : "grow it (truncate -s \(d.sizeBytes) \(path))"
                throw DiskLogError("disk '\(name)': its image \(path) holds \(size) bytes, smaller than the primary's \(d.sizeBytes); nothing was changed — \(grow) and let the primary reconnect")
            }
            files.append(file)
        }
        return DiskImages(descriptors: descriptors, files: files)
    }

    /// `number block-size size name` per line, written to a temporary file, synced and renamed.
    static func writeManifest(_ descriptors: [DiskDescriptor], to path: String) throws {
        let text = descriptors.map { "\($0.disk) \($0.blockSize) \($0.sizeBytes) \($0.name)\n" }.joined()
        let temporary = path + ".new"
        let file = try DiskFile(path: temporary, create: true)
        try file.truncate(to: 0)
        try Array(text.utf8).withUnsafeBytes { try file.write($0, at: 0) }
        try file.sync()
        guard rename(temporary, path) == 0 else { throw SystemError(call: "rename(\(temporary), \(path))", errno: errno) }
    }

    static func readManifest(_ path: String) throws -> [DiskDescriptor] {
        let fail = DiskLogError("the redo log holds a committed epoch not yet applied, but \(path) is missing or damaged; the images' state is unknown — the primary's next connection copies them whole")
        guard let file = try? DiskFile(path: path, create: false), let size = try? file.size(), size <= 64 << 10 else { throw fail }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        try bytes.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        guard let text = String(validating: bytes, as: UTF8.self) else { throw fail }
        return try text.split(separator: "\n").enumerated().map { index, line in
            let fields = line.split(separator: " ", maxSplits: 3)
            guard fields.count == 4, let number = UInt32(fields[0]), number == UInt32(index),
                  let block = UInt32(fields[1]), let size = UInt64(fields[2]) else { throw fail }
            return DiskDescriptor(disk: number, blockSize: block, sizeBytes: size, name: String(fields[3]))
        }
    }
}
