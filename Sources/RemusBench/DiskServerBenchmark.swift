// `remusd bench --disk-server`: the primary's disk path of a protected Xen guest without the
// kernel's NBD client — remusd's NBD server on one end of a socket pair, a client on the other
// writing and reading in 1 MiB requests, each write applied to a scratch image and journaled
// as a protected guest's is — beside the limits of the same run: the socket pair alone and
// pwrite alone.
import Glibc
import RemusCore
import RemusDisk
import RemusRuntime
import RemusSystem

extension LoopBenchmark {
    /// The request size: what a guest's streaming writes become (blkfront's segments merged).
    static let diskRequestBytes = 1 << 20
    /// Journaled bytes per checkpoint: a guest writing 40 MB/s at 5 checkpoints a second.
    static let diskEpochBytes = 8 << 20

    /// `megabytes` per sample of 1 MiB NBD writes (journaled) and reads through remusd's server,
    /// the socket pair alone, and pwrite alone, into a scratch image in `directory`.
    package static func diskServer(megabytes: Int, repetitions: Int, directory: String) throws -> [Row] {
        let bytes = megabytes << 20
        let imagePath = directory + "/remusd-bench-disk-\(getpid()).img"
        let image = try DiskFile(path: imagePath, create: true)
        defer { unlink(imagePath) }
        try image.truncate(to: UInt64(bytes))
        let descriptor = DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: UInt64(bytes), name: "xvda")
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: diskRequestBytes, alignment: 4096)
        defer { chunk.deallocate() }
        for i in 0..<diskRequestBytes { chunk[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        func writeWholeImage() throws {
            for offset in stride(from: 0, to: bytes, by: diskRequestBytes) { try image.write(UnsafeRawBufferPointer(chunk), at: UInt64(offset)) }
        }
        // Every byte of the image written once first: the samples then overwrite cached pages.
        try writeWholeImage()

        var pair: [Double] = [], pwrites: [Double] = [], writes: [Double] = [], reads: [Double] = [], serverCPU: [Double] = []
        for _ in 0..<repetitions {
            pair.append(try socketPairRate(bytes: bytes, chunk: UnsafeRawBufferPointer(chunk)))
            let t0 = SystemClock().monotonicNs()
            try writeWholeImage()
            pwrites.append(Double(bytes) / Double(SystemClock().monotonicNs() - t0))
            let (w, r, cpuNs) = try nbdRates(image: image, descriptor: descriptor, chunk: UnsafeRawBufferPointer(chunk))
            writes.append(w)
            reads.append(r)
            serverCPU.append(Double(cpuNs) / 1e6 * Double(1 << 30) / Double(2 * bytes))
        }
        var rows: [Row] = []
        rows.append(row("socket pair alone", pair, "GB/s", "\(megabytes) MiB per sample in 1 MiB writes, drained by a thread: the limit for any request's data"))
        rows.append(row("pwrite alone", pwrites, "GB/s", "the same bytes into the scratch image's cached pages: the limit for a write's local apply"))
        rows.append(row("NBD writes, applied and journaled", writes, "GB/s",
                        roundRatio(writes, pair) + " of the socket pair, " + roundRatio(writes, pwrites) + " of pwrite; 1 MiB requests one at a time, each applied to the image and journaled as a protected guest's (the journal sealed every \(diskEpochBytes >> 20) MiB, as a checkpoint seals it)"))
        rows.append(row("NBD reads", reads, "GB/s", roundRatio(reads, pair) + " of the socket pair; 1 MiB requests one at a time from the image's cached pages"))
        rows.append(row("the server thread's CPU per GiB", serverCPU, "ms", "writes and reads together (CLOCK_THREAD_CPUTIME_ID): reading requests, applying, journaling and answering them"))
        return rows
    }

    /// Bytes/ns of `bytes` written through a socket pair in `chunk`-sized writes and drained.
    private static func socketPairRate(bytes: Int, chunk: UnsafeRawBufferPointer) throws -> Double {
        var fds: [Int32] = [-1, -1]
        _ = try syscall("socketpair(AF_UNIX)") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        defer { close(fds[0]); close(fds[1]) }
        fds.forEach(boundIO)
        let reader = fds[1], size = chunk.count
        let done = Gate<Int>()
        startThread(name: "bench-pair-drain") {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
            defer { buffer.deallocate() }
            var total = 0
            while total < bytes {
                let n = read(reader, buffer.baseAddress, buffer.count)
                if n <= 0 { break }
                total += n
            }
            done.open(with: total)
        }
        let t0 = SystemClock().monotonicNs()
        var sent = 0
        while sent < bytes { try writeAll(fds[0], chunk); sent += chunk.count }
        let received = done.wait()
        precondition(received == bytes, "drained \(received) of \(bytes) bytes")
        return Double(bytes) / Double(SystemClock().monotonicNs() - t0)
    }

    /// Bytes/ns of NBD writes, then reads, and the serving thread's CPU nanoseconds for both.
    private static func nbdRates(image: DiskFile, descriptor: DiskDescriptor, chunk: UnsafeRawBufferPointer) throws -> (Double, Double, UInt64) {
        let journal = DiskJournal(descriptors: [descriptor], images: [image])
        journal.restartJournal()
        let server = try NBDServer(socketPath: nil, descriptor: descriptor, image: image, record: { try journal.record($0) })
        let (ours, client) = try UnixConnection.socketPair()
        defer { close(client) }
        boundIO(client)
        let served = Gate<UInt64>()
        startThread(name: "bench-nbd-serve") {
            let cpu0 = threadCPUNanoseconds()
            server.serveKernel(ours)
            let cpu = threadCPUNanoseconds() - cpu0
            ours.shutdown()
            served.open(with: cpu)
        }
        let bytes = Int(descriptor.sizeBytes)
        var reply = [UInt8](repeating: 0, count: 16)
        let readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk.count, alignment: 4096)
        defer { readBuffer.deallocate() }
        func request(_ type: UInt16, _ offset: Int, _ handle: UInt64, length: Int = chunk.count) throws {
            try NBDBytes.request(type: type, handle: handle, offset: UInt64(offset), length: UInt32(length)).withUnsafeBytes { try writeAll(client, $0) }
        }
        func answered(_ handle: UInt64) throws {
            try reply.withUnsafeMutableBytes { try readAll(client, $0) }
            var r = NBDReader(reply)
            guard r.u32() == NBD.simpleReplyMagic, r.u32() == 0, r.u64() == handle else {
                throw SystemError(call: "NBD reply to request \(handle)", errno: .ioError, detail: "not a successful simple reply")
            }
        }
        var handle: UInt64 = 0
        let t0 = SystemClock().monotonicNs()
        for offset in stride(from: 0, to: bytes, by: chunk.count) {
            handle += 1
            try request(NBD.cmdWrite, offset, handle)
            try writeAll(client, chunk)
            try answered(handle)
            if offset % diskEpochBytes == diskEpochBytes - chunk.count { _ = try journal.sealEpoch() }
        }
        let t1 = SystemClock().monotonicNs()
        for offset in stride(from: 0, to: bytes, by: chunk.count) {
            handle += 1
            try request(NBD.cmdRead, offset, handle)
            try answered(handle)
            try readAll(client, readBuffer)
        }
        let t2 = SystemClock().monotonicNs()
        guard memcmp(readBuffer.baseAddress!, chunk.baseAddress!, chunk.count) == 0 else {
            throw SystemError(call: "NBD read back", errno: .ioError, detail: "the last read differs from what was written")
        }
        handle += 1
        try request(NBD.cmdDisconnect, 0, handle, length: 0)
        let cpuNs = served.wait()
        return (Double(bytes) / Double(t1 - t0), Double(bytes) / Double(t2 - t1), cpuNs)
    }

    /// Each blocking read and write on `fd` gives up after 30 s (EAGAIN, an error here), so a
    /// side that stopped ends the benchmark instead of hanging it; the other side's thread then
    /// sees its peer close, and the gate it opens ends the wait for it.
    private static func boundIO(_ fd: Int32) {
        var limit = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(Swift.MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(Swift.MemoryLayout<timeval>.size))
    }

    private static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            done += try syscall("write(bench socket)") { write(fd, bytes.baseAddress! + done, bytes.count - done) }
        }
    }

    private static func readAll(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = try syscall("read(bench socket)") { read(fd, buffer.baseAddress! + done, buffer.count - done) }
            guard n > 0 else { throw SystemError(call: "read(bench socket)", errno: .brokenPipe, detail: "the server closed after \(done) of \(buffer.count) bytes") }
            done += n
        }
    }
}
