import Glibc
import RemusCore
import RemusSystem
import RemusTestSupport
import Testing
@testable import RemusDisk

/// The mutations a server reported, in order.
final class MutationLog: @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var entries: [DiskMutation] = []
    var failNext = false
    func record(_ operation: CompletedDiskOperation) throws {
        let m = operation.mutation
        try monitor.withLock {
            if failNext { failNext = false; throw SystemError(call: "recording", errno: .noSpace) }
            entries.append(m)
        }
    }
    var all: [DiskMutation] { monitor.withLock { entries } }
}

/// A served image in a scratch directory, with the log of what its server reported.
final class ServedDisk {
    let directory: String
    let imagePath: String
    let socketPath: String
    let descriptor: DiskDescriptor
    let server: NBDServer
    let mutations = MutationLog()
    let logLines = MutationLines()

    init(sizeBytes: UInt64 = 1 << 20, blockSize: UInt32 = 512, seedByte: UInt8 = 0x11, handshakeTimeoutMs: Int = 5000) throws {
        directory = try makeTemporaryDirectory("remusd-nbd")
        imagePath = directory + "/disk0.img"
        socketPath = directory + "/disk0.sock"
        descriptor = DiskDescriptor(disk: 0, blockSize: blockSize, sizeBytes: sizeBytes, name: "disk0")
        let image = try DiskFile(path: imagePath, create: true)
        let fill = [UInt8](repeating: seedByte, count: Int(sizeBytes))
        try fill.withUnsafeBytes { try image.write($0, at: 0) }
        let (mutations, lines) = (mutations, logLines)
        server = try NBDServer(socketPath: socketPath, descriptor: descriptor, image: image,
                               record: { try mutations.record($0) }, log: { lines.append($0) },
                               handshakeTimeoutMs: handshakeTimeoutMs)
        server.start()
    }

    deinit {
        server.stop()
        removeTemporaryDirectory(directory)
    }

    func imageBytes() throws -> [UInt8] {
        let file = try DiskFile(path: imagePath, create: false)
        var bytes = [UInt8](repeating: 0, count: Int(descriptor.sizeBytes))
        try bytes.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        return bytes
    }

    /// `qemu-io` against this socket: QEMU's own NBD client, an implementation independent of ours.
    func qemuIO(_ commands: [String]) throws -> (Int32, String) {
        let args = commands.map { "-c '\($0)'" }.joined(separator: " ")
        return try runTestShell("qemu-io -f raw \(args) 'nbd+unix:///disk0?socket=\(socketPath)' 2>&1", timeoutMs: 60_000)
    }
}

final class MutationLines: @unchecked Sendable {  // guarded by monitor
    private let monitor = MonitorLock()
    private var lines: [String] = []
    func append(_ line: String) { monitor.withLock { lines.append(line) } }
    var text: String { monitor.withLock { lines.joined(separator: "\n") } }
}

private let qemuIOMissing = "qemu-io not found: apt-get install qemu-utils (scripts/setup.sh does for the tests)"
private let qemuIOPresent = access("/usr/bin/qemu-io", X_OK) == 0

@Suite("The NBD server behind a protected disk")
struct NBDServerTests {
    @Test(.enabled(if: qemuIOPresent, Comment(rawValue: qemuIOMissing)))
    func qemusClientWritesFlushesDiscardsAndZeroesAndEachIsReportedInOrder() throws {
        let disk = try ServedDisk()
        let (status, output) = try disk.qemuIO([
            "write -P 0x5a 4096 65536", "flush", "discard 131072 65536", "write -z 262144 8192", "read -P 0x5a 4096 65536",
            "read -P 0 131072 65536", "read -P 0x11 0 4096",
        ])
        #expect(status == 0, "\(output)\n\(disk.logLines.text)")
        #expect(!output.contains("Pattern verification failed"), "\(output)")

        // Exactly these mutations, in this order (reads are not reported).
        let reported = disk.mutations.all
        let expected: [DiskMutation] = [
            .write(DiskWrite(disk: 0, offset: 4096, data: [UInt8](repeating: 0x5a, count: 65536))),
            .command(DiskCommand(disk: 0, kind: .flush, offset: 0, length: 0)),
            .command(DiskCommand(disk: 0, kind: .discard, offset: 131072, length: 65536)),
            .command(DiskCommand(disk: 0, kind: .writeZeroes, offset: 262144, length: 8192)),
        ]
        // qemu-io may flush once more when it closes the image: allow trailing flushes only.
        #expect(Array(reported.prefix(expected.count)) == expected, "\(reported.map(Self.describe))")
        #expect(reported.dropFirst(expected.count).allSatisfy { if case .command(let c) = $0 { c.kind == .flush } else { false } },
                "\(reported.map(Self.describe))")

        // The image holds what the client wrote.
        var oracle = [UInt8](repeating: 0x11, count: Int(disk.descriptor.sizeBytes))
        oracle.replaceSubrange(4096..<(4096 + 65536), with: repeatElement(0x5a, count: 65536))
        oracle.replaceSubrange(131072..<(131072 + 65536), with: repeatElement(0, count: 65536))
        oracle.replaceSubrange(262144..<(262144 + 8192), with: repeatElement(0, count: 8192))
        #expect(try disk.imageBytes() == oracle)
    }

    @Test(.enabled(if: qemuIOPresent, Comment(rawValue: qemuIOMissing)))
    func replayingTheReportedMutationsOnACopyThroughTheRedoLogGivesTheSameImage() throws {
        let disk = try ServedDisk(sizeBytes: 4 << 20)
        let original = try disk.imageBytes()
        // Overlapping writes, a large write split into stream-sized records, discards over writes.
        let (status, output) = try disk.qemuIO([
            "write -P 0x01 0 1048576", "write -P 0x02 512 4096", "discard 65536 131072", "write -P 0x03 61440 8192",
            "write -z 1048576 512", "write -P 0x04 2097152 2097152", "flush",
        ])
        #expect(status == 0, "\(output)\n\(disk.logLines.text)")

        // The backup's path: stage the epoch, log it, apply it to a copy of the original image.
        let backupPath = disk.directory + "/backup.img"
        let backup = try DiskFile(path: backupPath, create: true)
        try original.withUnsafeBytes { try backup.write($0, at: 0) }
        let staging = DiskEpochStaging(memoryBound: 1 << 20, spillPath: disk.directory + "/spill")
        try staging.reset()
        for mutation in disk.mutations.all {
            if case .write(let w) = mutation { #expect(w.data.count <= StreamLimits.maxDiskWriteBytes) }
            try staging.append(mutation)
        }
        let log = try DiskRedoLog(path: disk.directory + "/redo.log")
        try log.log(staging, epoch: 1)
        try log.applyLogged(to: DiskImages(descriptors: [disk.descriptor], files: [backup]))
        var replayed = [UInt8](repeating: 0, count: original.count)
        try replayed.withUnsafeMutableBytes { try backup.read(into: $0, at: 0) }
        let primary = try disk.imageBytes()
        #expect(primary != original)
        #expect(replayed == primary, "first difference at byte \(zip(replayed, primary).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1)")
    }

    @Test func anImageSmallerThanTheDeclaredDiskIsRefusedNamingBoth() throws {
        let directory = try makeTemporaryDirectory("remusd-nbd-small")
        defer { removeTemporaryDirectory(directory) }
        let image = try DiskFile(path: directory + "/small.img", create: true)
        try image.truncate(to: 4096)
        #expect {
            _ = try NBDServer(socketPath: directory + "/s.sock", descriptor: DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 8192, name: "xvda"),
                              image: image, record: { _ in })
        } throws: { error in
            let text = "\(error)"
            return text.contains("4096 bytes") && text.contains("8192") && text.contains("nothing was served")
        }
    }

    // MARK: - A client of our own, for what no well-behaved client sends

    /// Performs the fixed-newstyle handshake with NBD_OPT_GO; returns the connection in transmission.
    private func handshake(_ disk: ServedDisk) throws -> UnixConnection {
        let c = try UnixConnection.connect(path: disk.socketPath, deadline: .after(milliseconds: 5000))
        let greeting = try readExactly(c, 18)
        #expect(Array(greeting.prefix(8)) == Array("NBDMAGIC".utf8))
        try c.write([0, 0, 0, 3], until: .after(milliseconds: 5000))  // fixed newstyle, no zeroes
        var go = NBDBytes()
        go.u64(NBD.optionMagic); go.u32(NBD.optGo); go.u32(4 + 5 + 2)
        go.u32(5); go.raw(Array("disk0".utf8)); go.u16(0)
        try c.write(go.bytes, until: .after(milliseconds: 5000))
        // Replies until the ACK: 20-byte header plus its data.
        while true {
            var head = NBDReader(try readExactly(c, 20))
            _ = head.u64(); _ = head.u32()
            let type = head.u32(), length = head.u32()
            guard let type, let length else { throw SystemError(call: "option reply", errno: .ioError) }
            _ = try readExactly(c, Int(length))
            if type == NBD.repAck { return c }
            try #require(type == NBD.repInfo, "reply type \(type)")
        }
    }

    private func readExactly(_ c: UnixConnection, _ n: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: n)
        if n > 0 { try #require(try bytes.withUnsafeMutableBytes { try c.readExactly(into: $0, until: .after(milliseconds: 10_000)) }) }
        return bytes
    }

    private func request(_ type: UInt16, offset: UInt64, length: UInt32, handle: UInt64 = 7, flags: UInt16 = 0) -> [UInt8] {
        NBDBytes.request(type: type, handle: handle, offset: offset, length: length, flags: flags)
    }

    /// The error of the simple reply to `handle`.
    private func replyError(_ c: UnixConnection, handle: UInt64 = 7) throws -> UInt32 {
        var r = NBDReader(try readExactly(c, 16))
        #expect(r.u32() == NBD.simpleReplyMagic)
        let error = r.u32()
        #expect(r.u64() == handle)
        return error ?? UInt32.max
    }

    @Test func badRangesAreAnsweredWithTheirErrorsAndNothingIsReported() throws {
        let disk = try ServedDisk(sizeBytes: 64 << 10)
        let c = try handshake(disk)
        defer { c.shutdown() }
        // Unaligned write (its data is still read, so the stream stays in step).
        try c.write(request(NBD.cmdWrite, offset: 100, length: 512) + [UInt8](repeating: 1, count: 512), until: .after(milliseconds: 5000))
        #expect(try replyError(c) == NBD.errInvalid)
        // Past the end.
        try c.write(request(NBD.cmdWrite, offset: 64 << 10, length: 512) + [UInt8](repeating: 1, count: 512), until: .after(milliseconds: 5000))
        #expect(try replyError(c) == NBD.errNoSpace)
        // Offset + length overflowing 64 bits.
        try c.write(request(NBD.cmdTrim, offset: UInt64.max - 511, length: 1024), until: .after(milliseconds: 5000))
        #expect(try replyError(c) == NBD.errInvalid)
        // An unknown command.
        try c.write(request(99, offset: 0, length: 0), until: .after(milliseconds: 5000))
        #expect(try replyError(c) == NBD.errInvalid)
        // And a good write still works afterwards.
        try c.write(request(NBD.cmdWrite, offset: 512, length: 512) + [UInt8](repeating: 9, count: 512), until: .after(milliseconds: 5000))
        #expect(try replyError(c) == 0)
        #expect(disk.mutations.all == [.write(DiskWrite(disk: 0, offset: 512, data: [UInt8](repeating: 9, count: 512)))])
        #expect(try disk.imageBytes()[100..<612].filter { $0 == 1 }.isEmpty, "a refused write changed the image")
    }

    @Test func aWriteThatCannotBeReportedIsAnsweredEIO() throws {
        let disk = try ServedDisk(sizeBytes: 64 << 10)
        let c = try handshake(disk)
        defer { c.shutdown() }
        disk.mutations.failNext = true
        try c.write(request(NBD.cmdWrite, offset: 0, length: 512) + [UInt8](repeating: 3, count: 512), until: .after(milliseconds: 5000))
        #expect(try replyError(c) == NBD.errIO)
        #expect(disk.mutations.all.isEmpty)
        #expect(disk.logLines.text.contains("answered EIO"))
    }

    @Test func anOversizedOptionOrWriteEndsTheSessionAndTheNextClientIsServed() throws {
        let disk = try ServedDisk(sizeBytes: 64 << 10)
        // An option claiming 1 GiB of data: dropped before anything is read.
        let c1 = try UnixConnection.connect(path: disk.socketPath, deadline: .after(milliseconds: 5000))
        _ = try readExactly(c1, 18)
        var huge = NBDBytes()
        huge.u32(3); huge.u64(NBD.optionMagic); huge.u32(NBD.optGo); huge.u32(1 << 30)
        try c1.write(huge.bytes, until: .after(milliseconds: 5000))
        #expect(try c1.readAll(limit: 64, until: .after(milliseconds: 10_000)).isEmpty, "the server should close")
        #expect(eventually(deadline: .after(seconds: 10)) { disk.logLines.text.contains("more than the 8192 accepted") }, "\(disk.logLines.text)")

        // A write larger than advertised: dropped without reading its payload.
        let c2 = try handshake(disk)
        try c2.write(request(NBD.cmdWrite, offset: 0, length: UInt32(NBDServer.maxPayloadBytes + 512)), until: .after(milliseconds: 5000))
        #expect(try c2.readAll(limit: 64, until: .after(milliseconds: 10_000)).isEmpty, "the server should close")

        // The server goes on serving.
        let c3 = try handshake(disk)
        defer { c3.shutdown() }
        try c3.write(request(NBD.cmdFlush, offset: 0, length: 0), until: .after(milliseconds: 5000))
        #expect(try replyError(c3) == 0)
        #expect(disk.server.completed.errors == 2)
    }

    @Test func aClientThatStallsInTheHandshakeIsDroppedAtItsDeadline() throws {
        let disk = try ServedDisk(sizeBytes: 64 << 10, handshakeTimeoutMs: 200)
        let c = try UnixConnection.connect(path: disk.socketPath, deadline: .after(milliseconds: 5000))
        _ = try readExactly(c, 18)
        try c.write([0, 0], until: .after(milliseconds: 5000))  // half of the client flags, then nothing
        // The server ends the session by itself: we read its end of input, not our own timeout.
        #expect(try c.readAll(limit: 64, until: .after(milliseconds: 30_000)).isEmpty)
        #expect(eventually(deadline: .after(seconds: 10)) { disk.logLines.text.contains("lost") || disk.logLines.text.contains("dropped") },
                "\(disk.logLines.text)")
    }

    @Test func aLargeWriteIsReportedInStreamSizedRecordsInOrder() throws {
        let disk = try ServedDisk(sizeBytes: 16 << 20)
        let c = try handshake(disk)
        defer { c.shutdown() }
        let length = 9 << 20
        let data = (0..<length).map { UInt8(truncatingIfNeeded: $0 / 4096) }
        try c.write(request(NBD.cmdWrite, offset: 1 << 20, length: UInt32(length)) + data, until: .after(milliseconds: 30_000))
        #expect(try replyError(c) == 0)
        let records = disk.mutations.all.compactMap { m -> DiskWrite? in if case .write(let w) = m { w } else { nil } }
        #expect(records.map(\.data.count) == [4 << 20, 4 << 20, 1 << 20])
        #expect(records.map(\.offset) == [1 << 20, 5 << 20, 9 << 20])
        #expect(records.flatMap(\.data) == data)
    }

    // A read far larger than the socket's buffer: its reply header and data leave in one
    // sendmsg from the server's buffer, resumed as the client takes them.
    @Test func aLargeReadIsAnsweredWholeFromTheImage() throws {
        let disk = try ServedDisk(sizeBytes: 16 << 20)
        let length = 9 << 20
        let pattern = (0..<length).map { UInt8(truncatingIfNeeded: $0 / 4096 &+ $0) }
        try pattern.withUnsafeBytes { try DiskFile(path: disk.imagePath, create: false).write($0, at: 3 << 20) }
        let c = try handshake(disk)
        defer { c.shutdown() }
        try c.write(request(NBD.cmdRead, offset: 3 << 20, length: UInt32(length), handle: 42), until: .after(milliseconds: 5000))
        #expect(try replyError(c, handle: 42) == 0)
        let data = try readExactly(c, length)
        let whole = data == pattern  // (not the arrays in a failure: 9 MiB each)
        #expect(whole, "the read's data differs from the image")
        // The session goes on: the next request is answered in step.
        try c.write(request(NBD.cmdFlush, offset: 0, length: 0, handle: 43), until: .after(milliseconds: 5000))
        #expect(try replyError(c, handle: 43) == 0)
    }

    @Test func theKernelsSideSpeaksTransmissionAtOnceOnASocketPair() throws {
        // As the kernel's NBD client does after NBD_SET_SOCK: no handshake, requests straight away.
        let directory = try makeTemporaryDirectory("remusd-nbd-kernel")
        defer { removeTemporaryDirectory(directory) }
        let image = try DiskFile(path: directory + "/k.img", create: true)
        try image.truncate(to: 64 << 10)
        let mutations = MutationLog()
        let server = try NBDServer(socketPath: nil, descriptor: DiskDescriptor(disk: 3, blockSize: 4096, sizeBytes: 64 << 10, name: "xvdb"),
                                   image: image, record: { try mutations.record($0) })
        let (ours, theirs) = try UnixConnection.socketPair()
        defer { close(theirs) }
        let done = MutationLines()
        startThread(name: "serve-kernel") {
            server.serveKernel(ours)
            done.append("ended")
        }
        func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { write(theirs, $0.baseAddress, $0.count) } }
        func reply() -> [UInt8] {
            var got: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 16)
            while got.count < 16 {
                let n = chunk.withUnsafeMutableBytes { read(theirs, $0.baseAddress, 16 - got.count) }
                if n <= 0 { break }
                got += chunk[0..<n]
            }
            return got
        }
        send(request(NBD.cmdWrite, offset: 8192, length: 4096, handle: 1, flags: NBD.cmdFlagFUA) + [UInt8](repeating: 0xEE, count: 4096))
        var r = NBDReader(reply())
        #expect(r.u32() == NBD.simpleReplyMagic && r.u32() == 0 && r.u64() == 1)
        send(request(NBD.cmdDisconnect, offset: 0, length: 0, handle: 2))
        #expect(eventually(deadline: .after(seconds: 10)) { done.text == "ended" }, "the server did not end on NBD_CMD_DISC")
        #expect(mutations.all == [.write(DiskWrite(disk: 3, offset: 8192, data: [UInt8](repeating: 0xEE, count: 4096)))])
    }

    @Test func aMissingNBDDeviceSaysToLoadTheModuleAndAttachesNothing() throws {
        let directory = try makeTemporaryDirectory("remusd-nbd-missing")
        defer { removeTemporaryDirectory(directory) }
        let image = try DiskFile(path: directory + "/m.img", create: true)
        try image.truncate(to: 4096)
        let server = try NBDServer(socketPath: nil, descriptor: DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 4096, name: "m"),
                                   image: image, record: { _ in })
        #expect {
            _ = try NBDKernelDevice(devicePath: directory + "/nbd-none", server: server)
        } throws: { "\($0)".contains("modprobe nbd") }
    }

    static func describe(_ m: DiskMutation) -> String {
        switch m {
        case .write(let w): "write(\(w.offset), \(w.data.count))"
        case .command(let c): "\(c.kind)(\(c.offset), \(c.length))"
        }
    }
}
