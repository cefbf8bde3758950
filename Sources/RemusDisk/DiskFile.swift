// Positioned I/O on one file: a disk image, the redo log, a spill file. Every call goes through
// RemusSystem's syscall choke point (EINTR retried there) and loops until the whole range is done;
// errors name the call and the file.
import CDisk
import Glibc
import RemusSystem

/// A file opened read-write for positioned reads and writes, owned by this value (closed when it
/// goes away).
///
/// `@unchecked Sendable`: the descriptor is immutable and pread/pwrite/fdatasync are thread-safe;
/// callers keep one writer per range, as the redo log and the images do (one loop thread).
public final class DiskFile: @unchecked Sendable {
    /// Where the file lives (for messages).
    public let path: String
    private let descriptor: OwnedDescriptor

    /// Opens `path` read-write; with `create`, creates it (0600) when missing.
    public init(path: String, create: Bool) throws(SystemError) {
        self.path = path
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        descriptor = OwnedDescriptor(adopting: try syscall("open(\(path))") { open(path, flags, 0o600) })
    }

    /// The file's size in bytes.
    public func size() throws(SystemError) -> UInt64 {
        var st = stat()
        _ = try syscall("fstat(\(path))") { fstat(descriptor.raw, &st) }
        return UInt64(st.st_size)
    }

    /// Sets the file's size (growing adds zeros without allocating them).
    public func truncate(to size: UInt64) throws(SystemError) {
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

    /// Makes `length` bytes at `offset` read as zeros: a hole punched where the file system can
    /// (nothing is written), zeros written where it cannot.
    public func zero(at offset: UInt64, length: UInt64) throws(SystemError) {
        guard length > 0 else { return }
        let punched = remus_punch_hole(descriptor.raw, off_t(offset), off_t(length))
        if punched == 0 { return }
        let code = errno
        guard code == EOPNOTSUPP || code == ENOSYS || code == EINVAL else {
            throw SystemError(call: "fallocate(\(path), punch \(length) bytes at \(offset))", errno: code)
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
