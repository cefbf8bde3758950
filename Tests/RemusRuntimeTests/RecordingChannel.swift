import Glibc
@testable import RemusRuntime

/// A byte channel that keeps what is written (to cut or corrupt a stream before sending it).
/// `@unchecked Sendable`: used by one thread at a time.
final class RecordingChannel: ByteChannel, @unchecked Sendable {
    var bytes: [UInt8] = []
    let peer = "memory"
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int { 0 }
    func write(segments: UnsafeMutableBufferPointer<iovec>) throws {
        for s in segments where s.iov_len > 0 {
            bytes += UnsafeRawBufferPointer(start: s.iov_base, count: s.iov_len)
        }
    }
    func shutdown() {}
    func shutdownWrite() {}
}
