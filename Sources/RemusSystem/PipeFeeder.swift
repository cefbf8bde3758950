import CPipe
import Glibc

/// Writes byte arrays into the write end of a pipe without copying them: `vmsplice(2)` hands
/// the pipe references to the arrays' pages, and the reader's `read` copies straight out of them
/// (one copy from here to the reader instead of two). A Xen backup feeds libxl's restore this way.
///
/// The pages must not change until the reader has taken them, so the feeder keeps every array
/// whose bytes may still be in the pipe: a pipe holds at most its size in bytes (one page per
/// slot), so everything but the last `F_GETPIPE_SZ` bytes fed has been read. The arrays it keeps
/// are never written again (an array another owner appends to is copied first, as Swift's arrays
/// are copy-on-write; the kept reference makes sure of it). Kept arrays go when the feeder does:
/// drop it only once the reader is done with the pipe.
///
/// This holds for a reader that `read`s the pipe (libxenguest and libxl do). A reader that
/// `splice`d the pipe's pages elsewhere would carry them past this accounting.
///
/// Where the kernel refuses `vmsplice` on this descriptor (EINVAL, ENOSYS), it writes with
/// `write` instead, from then on.
///
/// Not thread-safe: one feeding thread.
public final class PipeFeeder {
    public let fd: Int32
    /// The pipe's size (F_GETPIPE_SZ): at most this many bytes fed may still be unread.
    public let pipeBytes: Int
    /// Whether it still splices (false after the kernel refused, or when asked not to).
    public private(set) var splicing: Bool
    /// Arrays whose bytes may still be in the pipe, oldest first, with where each ends in the
    /// count of bytes fed.
    private var kept: [(bytes: [UInt8], end: UInt64)] = []
    private var keptHead = 0
    /// Bytes fed so far.
    public private(set) var fedBytes: UInt64 = 0

    /// - Parameters:
    ///   - fd: the pipe's write end (owned by the caller).
    ///   - splice: false to write with `write` (for comparison).
    public init(fd: Int32, splice: Bool = true) {
        self.fd = fd
        let size = fcntl(fd, 1032)  // F_GETPIPE_SZ
        // Not a pipe (or an old kernel): nothing to splice into; assume the largest pipe.
        pipeBytes = size > 0 ? Int(size) : 1 << 20
        splicing = splice && size > 0
    }

    /// Arrays kept for the pipe's reader now, and their bytes.
    public var keptCount: Int { kept.count - keptHead }
    public var keptBytes: Int { kept[keptHead...].reduce(0) { $0 + $1.bytes.count } }

    /// Feeds all of `bytes` (blocking while the pipe is full).
    /// - Throws: the failed call's error (EPIPE once the reader closed its end); the bytes fed
    ///   before it stay fed.
    public func feed(_ bytes: [UInt8]) throws(SystemError) {
        guard !bytes.isEmpty else { return }
        var failure: SystemError?
        var offset = 0
        bytes.withUnsafeBytes { raw in
            while offset < raw.count {
                let n: Int
                if splicing {
                    n = remus_vmsplice(fd, raw.baseAddress! + offset, raw.count - offset)
                    if n < 0 && (errno == EINVAL || errno == ENOSYS) {
                        splicing = false
                        continue
                    }
                } else {
                    n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                }
                if n < 0 {
                    if errno == EINTR { continue }
                    failure = SystemError.last(splicing ? "vmsplice(pipe)" : "write(pipe)")
                    return
                }
                offset += n
                fedBytes += UInt64(n)
            }
        }
        if offset > 0 && splicing { kept.append((bytes, fedBytes)) }
        release()
        if let failure { throw failure }
    }

    /// Lets go of arrays the reader has read whole.
    private func release() {
        let read = fedBytes > UInt64(pipeBytes) ? fedBytes - UInt64(pipeBytes) : 0
        while keptHead < kept.count && kept[keptHead].end <= read {
            kept[keptHead].bytes = []
            keptHead += 1
        }
        if keptHead > 16 && keptHead * 2 > kept.count {
            kept.removeFirst(keptHead)
            keptHead = 0
        }
    }
}
