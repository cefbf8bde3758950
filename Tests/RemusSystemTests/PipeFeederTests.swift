import Glibc
import RemusSystem
import Testing

/// A pipe of `bytes` (F_SETPIPE_SZ; root may go past pipe-max-size), both ends close-on-exec.
private func makePipe(bytes: Int32) throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { throw SystemError.last("pipe") }
    _ = fcntl(fds[1], 1031, bytes)  // F_SETPIPE_SZ
    return (fds[0], fds[1])
}

/// `count` bytes that name their array (`tag`) and their place in it.
private func tagged(_ tag: UInt8, count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(tag) &* 101) ^ tag }
}

/// Nil when equal; otherwise where they first differ (not the arrays: they are large).
private func difference(_ got: [UInt8], _ want: [UInt8]) -> String? {
    if got == want { return nil }
    guard got.count == want.count else { return "\(got.count) bytes, want \(want.count)" }
    let at = got.indices.first { got[$0] != want[$0] }!
    return "first difference at byte \(at): got 0x\(String(got[at], radix: 16)), want 0x\(String(want[at], radix: 16))"
}

/// Reads exactly `count` bytes (each read bounded by a poll deadline of 10 s).
private func readExactly(_ fd: Int32, _ count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var got = 0
    while got < count {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 10_000) == 1 else { throw SystemError(call: "poll(pipe)", errno: ETIMEDOUT, detail: "no bytes within 10 s") }
        let n = out.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, count - got) }
        guard n > 0 else { throw SystemError.last("read(pipe)") }
        got += n
    }
    return out
}

@Suite("Feeding a pipe without copying (vmsplice)")
struct PipeFeederTests {
    @Test("Arrays the caller let go of and whose memory was handed out again still reach the reader unchanged")
    func keptUntilRead() throws {
        let fds = try makePipe(bytes: 1 << 20)
        defer { close(fds.read); close(fds.write) }
        let feeder = PipeFeeder(fd: fds.write)
        #expect(feeder.splicing, "this kernel refused vmsplice on a pipe")
        #expect(feeder.pipeBytes == 1 << 20)
        // 64 KiB arrays come from malloc's heap (below its mmap threshold): once freed, their
        // memory is what the next arrays of that size get. Were the pipe's pages not kept, the
        // scribbling below would overwrite what the reader is about to read.
        let size = 64 << 10
        var expected: [UInt8] = []
        for tag in UInt8(1)...8 {
            let bytes = tagged(tag, count: size)
            expected += bytes
            try feeder.feed(bytes)
        }
        var scribbles: [[UInt8]] = []
        for _ in 0..<32 { scribbles.append([UInt8](repeating: 0xEE, count: size)) }
        #expect(feeder.keptCount == 8, "every array may still be in the pipe: all of them must be kept")
        let got = try readExactly(fds.read, expected.count)
        let wrong = difference(got, expected)
        #expect(wrong == nil, "the reader got other bytes than were fed: \(wrong ?? "")")
        #expect(scribbles.count == 32)
    }

    @Test("Past the pipe's size the feeder lets go of what the reader must have taken, and keeps the rest")
    func keepsOnlyWhatMayBeUnread() throws {
        let fds = try makePipe(bytes: 256 << 10)
        defer { close(fds.read); close(fds.write) }
        let feeder = PipeFeeder(fd: fds.write)
        let pipeBytes = feeder.pipeBytes
        let size = 100 << 10
        let count = 40
        let expected = (0..<count).flatMap { tagged(UInt8($0), count: size) }
        // A reader on its own thread, so the feeder blocks on a full pipe and goes on as it drains.
        let reader = ResultBox()
        let thread = try JoinableThread(name: "test-pipe-reader") { reader.set(Result { try readExactly(fds.read, expected.count) }) }
        var mostKept = 0
        for tag in 0..<count {
            try feeder.feed(tagged(UInt8(tag), count: size))
            // What may be unread is at most the pipe's size: the arrays covering it, plus one
            // that straddles its start.
            #expect(feeder.keptBytes <= pipeBytes + 2 * size, "kept \(feeder.keptBytes) bytes after array \(tag)")
            mostKept = max(mostKept, feeder.keptCount)
        }
        thread.join()
        let wrong = difference(try reader.get(), expected)
        #expect(wrong == nil, "the reader got other bytes than were fed: \(wrong ?? "")")
        #expect(feeder.fedBytes == UInt64(expected.count))
        #expect(mostKept >= 2 && mostKept < count, "kept at most \(mostKept) arrays of \(count)")
    }

    @Test("A pipe whose reader closed its end fails the feed with EPIPE, naming vmsplice")
    func readerGone() throws {
        let fds = try makePipe(bytes: 64 << 10)
        defer { close(fds.write) }
        close(fds.read)
        signal(SIGPIPE, SIG_IGN)
        let feeder = PipeFeeder(fd: fds.write)
        let error = #expect(throws: SystemError.self) { try feeder.feed([1, 2, 3]) }
        #expect(error?.errno == .brokenPipe)
        #expect(error?.call == "vmsplice(pipe)")
    }

    @Test("A descriptor that is no pipe is written, not spliced, and gets every byte")
    func notAPipe() throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[0]); close(pair[1]) }
        let feeder = PipeFeeder(fd: pair[1])
        #expect(!feeder.splicing)
        let bytes = tagged(9, count: 1000)
        try feeder.feed(bytes)
        #expect(feeder.keptCount == 0, "written bytes need not be kept")
        #expect(difference(try readExactly(pair[0], bytes.count), bytes) == nil)
    }
}

/// A result handed from one thread to another.
private final class ResultBox: @unchecked Sendable {  // value guarded by lock
    private let lock = MonitorLock()
    private var value: Result<[UInt8], any Error>?
    func set(_ v: Result<[UInt8], any Error>) { lock.withLock { value = v } }
    func get() throws -> [UInt8] { try lock.withLock { value }!.get() }
}
