// Positioned I/O on one file: a disk image, the redo log, a spill file. Every call goes through
// RemusSystem's syscall choke point (EINTR retried there) and loops until the whole range is done;
// errors name the call and the file.
import CDisk
import Glibc
import RemusSystem

/// A file opened read-write for positioned reads and writes, owned by this value (closed when it
/// goes away). A disk image may also be a block device (an LVM logical volume, a partition): it
/// is then opened exclusively (`O_EXCL`: refused while it is mounted or another program holds it
/// so, as LVM and the kernel do), its size is the device's, and it cannot be resized.
///
/// `@unchecked Sendable`: the descriptor is immutable and pread/pwrite/fdatasync are thread-safe;
/// callers keep one writer per range, as the redo log and the images do (one loop thread).
public final class DiskFile: @unchecked Sendable {
    /// Where the file lives (for messages).
    public let path: String
    /// Whether `path` is a block device rather than a regular file.
    public let isBlockDevice: Bool
    private let descriptor: OwnedDescriptor

    /// Opens `path` read-write; with `create`, creates it (0600) when missing. A block device is
    /// opened exclusively and its page cache dropped, so what was written to it around the
    /// cache (by blkback, for a guest that ran on it) is what reads see.
    public init(path: String, create: Bool) throws(SystemError) {
        self.path = path
        var st = stat()
        let device = stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
        let flags = O_RDWR | O_CLOEXEC | (device ? O_EXCL : create ? O_CREAT : 0)
        let opened: Int32
        do {
            opened = try syscall("open(\(path))") { open(path, flags, 0o600) }
        } catch where device && error.errno == .resourceBusy {
            throw SystemError(call: "open(\(path), O_EXCL)", errno: EBUSY,
                              detail: "the block device is in use: mounted, or held by another program (a running VM, LVM, another remusd)")
        }
        let owned = OwnedDescriptor(adopting: opened)
        // The path may have changed between the stat and the open: trust only the open file.
        var openedStat = stat()
        _ = try syscall("fstat(\(path))") { fstat(owned.raw, &openedStat) }
        guard ((openedStat.st_mode & S_IFMT) == S_IFBLK) == device else {
            throw SystemError(call: "open(\(path))", errno: EAGAIN, detail: "the path changed from or to a block device while it was opened")
        }
        if device {
            _ = try syscall("ioctl(\(path), BLKFLSBUF)") { remus_block_device_drop_cache(owned.raw) }
        }
        descriptor = owned
        isBlockDevice = device
    }

    /// The size in bytes of the image at `path` (a regular file or a block device), or nil when
    /// it is neither (missing, a directory, …). Opens a block device read-only, not exclusively.
    public static func imageSize(atPath path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return UInt64(st.st_size)
        case S_IFBLK:
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            defer { close(fd) }
            var size: UInt64 = 0
            return remus_block_device_size(fd, &size) == 0 ? size : nil
        default: return nil
        }
    }

    /// The logical sector size of the block device at `path` (BLKSSZGET), or nil when it is not
    /// a block device or cannot be asked. Opens it read-only, not exclusively.
    public static func logicalSectorSize(atPath path: String) -> UInt32? {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: UInt32 = 0
        return remus_block_device_sector_size(fd, &bytes) == 0 ? bytes : nil
    }

    /// The file's size in bytes (a block device's: BLKGETSIZE64).
    public func size() throws(SystemError) -> UInt64 {
        if isBlockDevice {
            var bytes: UInt64 = 0
            _ = try syscall("ioctl(\(path), BLKGETSIZE64)") { remus_block_device_size(descriptor.raw, &bytes) }
            return bytes
        }
        var st = stat()
        _ = try syscall("fstat(\(path))") { fstat(descriptor.raw, &st) }
        return UInt64(st.st_size)
    }

    /// Sets the file's size (growing adds zeros without allocating them). A block device's size
    /// is fixed: an error.
    public func truncate(to size: UInt64) throws(SystemError) {
        guard !isBlockDevice else {
            throw SystemError(call: "ftruncate(\(path), \(size))", errno: EINVAL, detail: "a block device's size is fixed (grow a logical volume with lvextend)")
        }
        _ = try syscall("ftruncate(\(path), \(size))") { ftruncate(descriptor.raw, off_t(size)) }
    }

    /// Reads exactly `buffer.count` bytes at `offset`; bytes past the end of the file are an error.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = try syscall("pread(\(path), \(buffer.count - done) bytes at \(offset + UInt64(done)))") {
                pread(descriptor.raw, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            guard n > 0 else {
                throw SystemError(call: "pread(\(path), \(buffer.count) bytes at \(offset))", errno: .ioError,
                                  detail: "the file ends \(done) bytes into the range")
            }
            done += n
        }
    }

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < bytes.count {
            done += try syscall("pwrite(\(path), \(bytes.count - done) bytes at \(offset + UInt64(done)))") {
                pwrite(descriptor.raw, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            }
        }
    }

    /// Makes `length` bytes at `offset` read as zeros: a hole punched where the file system or
    /// device can (nothing is written), else the range zeroed by the storage (a block device's
    /// WRITE_ZEROES), else zeros written.
    public func zero(at offset: UInt64, length: UInt64) throws(SystemError) {
        guard length > 0 else { return }
        for (name, attempt) in [("punch", remus_punch_hole), ("zero range", remus_zero_range)] {
            if attempt(descriptor.raw, off_t(offset), off_t(length)) == 0 { return }
            let code = errno
            // Not offered here (or not for this alignment): the next way.
            guard code == EOPNOTSUPP || code == ENOSYS || code == EINVAL else {
                throw SystemError(call: "fallocate(\(path), \(name) \(length) bytes at \(offset))", errno: code)
            }
        }
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, 1 << 20)), alignment: 4096)
        defer { chunk.deallocate() }
        chunk.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk.count), length - done))
            try write(UnsafeRawBufferPointer(rebasing: chunk[0..<n]), at: offset + done)
            done += UInt64(n)
        }
    }

    /// Takes an exclusive advisory lock on the file (flock), or says who holds it: nil when
    /// taken, else why not. Held until the file is closed: no two remusd processes — a primary
    /// and a backup on one host, two backups — write one image.
    public func lockExclusive() -> String? {
        let result = flock(descriptor.raw, LOCK_EX | LOCK_NB)
        guard result != 0 else { return nil }
        let code = errno
        return code == EWOULDBLOCK ? "another process has it open for writing (a running remusd or a VM)" : "flock failed: \(SystemError(call: "flock(\(path))", errno: code))"
    }

    /// Makes what was written durable (fdatasync).
    public func sync() throws(SystemError) {
        _ = try syscall("fdatasync(\(path))") { fdatasync(descriptor.raw) }
    }
}
