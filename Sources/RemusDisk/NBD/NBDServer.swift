import CDisk
import Glibc
import RemusCore
import RemusSystem

/// What a protected guest did to one of its disks, as remusd's NBD server completed it: the
/// records of the checkpoint's disk stream, in completion order.
public enum DiskMutation: Equatable, Sendable {
    case write(DiskWrite)
    case command(DiskCommand)
}

/// A mutation as the server reports it: a write's data is a view of the server's own buffer,
/// valid during the report only, so the journal copies it once, straight from there.
public enum CompletedDiskOperation {
    /// `data` is valid only while the report runs.
    case write(disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer)
    case command(DiskCommand)

    /// The operation with its data copied, to keep.
    public var mutation: DiskMutation {
        switch self {
        case .write(let disk, let offset, let data): .write(DiskWrite(disk: disk, offset: offset, data: Array(data)))
        case .command(let command): .command(command)
        }
    }
}

/// Serves one disk image to the local kernel (or any NBD client) over a Unix socket, and reports
/// every write, flush, discard and write-zeroes it completes, in order, before the client learns
/// of the completion (issue #12 item 1).
///
/// That order is what makes I9 hold on the primary's side: a completion the guest can see in
/// checkpoint N's memory was reported before the reply left this server, so it is in an epoch
/// ≤ N whenever the epoch's disk stream is cut after the memory capture and before the guest
/// resumes. A write is applied to the local image first and reported after; a write that fails
/// locally is answered EIO and not reported; a report that fails (`record` throws) is answered
/// EIO too (the guest treats the write as failed; the range's content is unspecified either way).
///
/// The protocol: fixed newstyle handshake with NBD_OPT_GO/INFO (and the old NBD_OPT_EXPORT_NAME),
/// simple replies, one request at a time in arrival order, on one connection at a time (a second
/// client waits in the backlog until the first leaves: two writers must not interleave).
/// Everything a client sends is bounded before it is read: an option's data (8 KiB), a request's
/// payload (`maxPayloadBytes`), the number of options before transmission (32), and time — the
/// handshake and every request's remaining bytes have deadlines; only the wait for the next
/// request has none (an idle disk), and `stop` ends it.
///
/// `@unchecked Sendable`: the listener and image are immutable references; the active connection
/// and the counters are guarded by `monitor`.
public final class NBDServer: @unchecked Sendable {
    /// The disk as the stream describes it (number, block size, size, name = export name).
    public let descriptor: DiskDescriptor
    /// The largest read or write payload accepted (and advertised in NBD_INFO_BLOCK_SIZE). A
    /// write is reported in DISK_WRITE records of at most `StreamLimits.maxDiskWriteBytes`.
    public static let maxPayloadBytes = 32 << 20
    /// Time for the whole handshake, from accept to the start of transmission.
    public let handshakeTimeoutMs: Int
    /// Time for the rest of a request once its first byte arrived (its header and payload).
    public let requestTimeoutMs: Int
    static let maxOptionBytes = 8 << 10
    static let maxOptions = 32

    private let listener: UnixListener?
    private let image: DiskFile
    private let record: @Sendable (CompletedDiskOperation) throws -> Void
    private let log: @Sendable (String) -> Void
    private let monitor = MonitorLock()
    private var active: UnixConnection?
    private var stopped = false
    private var counts = Counts()

    /// What the server completed, for status and tests.
    public struct Counts: Equatable, Sendable {
        public var connections = 0
        public var reads = 0
        public var writes = 0
        public var bytesWritten: UInt64 = 0
        public var flushes = 0
        public var discards = 0
        public var writeZeroes = 0
        /// Requests answered with an error, and connections dropped for a protocol violation.
        public var errors = 0
    }

    /// Serves `image`, which must hold at least `descriptor.sizeBytes` bytes: to clients that
    /// connect at `socketPath` (mode 0600) once started, and/or to the kernel (`attach`).
    /// - Parameters:
    ///   - record: called with each completed mutation, in order, before its reply is sent (a
    ///     write's data is the server's buffer: valid during the call).
    ///   - log: one line per client and per protocol violation.
    public init(socketPath: String?, descriptor: DiskDescriptor, image: DiskFile,
                record: @escaping @Sendable (CompletedDiskOperation) throws -> Void,
                log: @escaping @Sendable (String) -> Void = { _ in },
                handshakeTimeoutMs: Int = 5000, requestTimeoutMs: Int = 5000) throws {
        let size = try image.size()
        guard size >= descriptor.sizeBytes else {
            throw SystemError(call: "serving \(image.path) as disk '\(descriptor.name)'", errno: .invalidArgument,
                              detail: "the image holds \(size) bytes, less than the \(descriptor.sizeBytes) the disk is declared with; nothing was served — grow the image or declare the disk smaller")
        }
        self.descriptor = descriptor
        self.image = image
        self.record = record
        self.log = log
        self.handshakeTimeoutMs = handshakeTimeoutMs
        self.requestTimeoutMs = requestTimeoutMs
        listener = try socketPath.map { path throws(SystemError) in try UnixListener(path: path, mode: 0o600) }
    }

    /// Starts the accept thread (nothing without a socket path).
    public func start() {
        guard let listener else { return }
        startThread(name: "nbd-\(descriptor.name)") { [self] in acceptClients(listener) }
    }

    /// Serves the kernel's NBD client on `connection` (already in transmission: the kernel
    /// skips the handshake) until it disconnects or `stop` is called. Blocks; the calling
    /// thread is marked an I/O flusher, so serving the kernel's writeback never waits for it.
    public func serveKernel(_ connection: UnixConnection) {
        if remus_set_io_flusher() != 0 {
            log("disk '\(descriptor.name)': PR_SET_IO_FLUSHER failed (\(String(cString: strerror(errno)))); under memory pressure the kernel may wait on its own writeback")
        }
        let admitted = monitor.withLock {
            guard !stopped else { return false }
            active = connection
            counts.connections += 1
            return true
        }
        guard admitted else { return }
        defer { monitor.withLock { active = nil } }
        do {
            try transmission(connection)
        } catch {
            monitor.withLock { counts.errors += 1 }
            if !isStopped { log("the kernel's NBD client of disk '\(descriptor.name)' stopped: \(error)") }
        }
    }

    /// Stops accepting and ends the active connection; a request being served finishes first
    /// only if it is already past its reply.
    public func stop() {
        let connection: UnixConnection? = monitor.withLock {
            stopped = true
            return active
        }
        listener?.shutdown()
        connection?.shutdown()
    }

    public var completed: Counts { monitor.withLock { counts } }

    private var isStopped: Bool { monitor.withLock { stopped } }

    private func acceptClients(_ listener: UnixListener) {
        while !isStopped {
            let connection: UnixConnection
            do { connection = try listener.accept() } catch {
                if isStopped { return }
                sleepNanoseconds(100_000_000)
                continue
            }
            let admitted = monitor.withLock {
                guard !stopped else { return false }
                active = connection
                counts.connections += 1
                return true
            }
            guard admitted else { connection.shutdown(); return }
            serve(connection)
            connection.shutdown()
            monitor.withLock { active = nil }
        }
    }

    /// One client, from handshake to disconnect.
    func serve(_ connection: UnixConnection) {
        do {
            guard try handshake(connection) else { return }
            try transmission(connection)
        } catch let violation as NBDViolation {
            monitor.withLock { counts.errors += 1 }
            log("NBD client of disk '\(descriptor.name)' (pid \(connection.peer.pid)) dropped: \(violation.reason)")
        } catch {
            if !isStopped { log("NBD client of disk '\(descriptor.name)' (pid \(connection.peer.pid)) lost: \(error)") }
        }
    }

    // MARK: - Handshake

    private var transmissionFlags: UInt16 { NBD.hasFlags | NBD.sendFlush | NBD.sendFUA | NBD.sendTrim | NBD.sendWriteZeroes }

    /// Returns true when transmission starts, false when the client aborted.
    private func handshake(_ connection: UnixConnection) throws -> Bool {
        let deadline = Deadline.after(milliseconds: handshakeTimeoutMs)
        var greeting = NBDBytes()
        greeting.u64(NBD.serverMagic)
        greeting.u64(NBD.optionMagic)
        greeting.u16(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        try connection.write(greeting.bytes, until: deadline)
        var flagsReader = NBDReader(try readExact(connection, 4, deadline, what: "the client flags"))
        let clientFlags = flagsReader.u32() ?? 0
        guard clientFlags & NBD.clientFlagFixedNewstyle != 0 else {
            throw NBDViolation("the client does not speak fixed newstyle negotiation (flags \(clientFlags)); use a current NBD client")
        }
        let noZeroes = clientFlags & NBD.clientFlagNoZeroes != 0
        for _ in 0..<Self.maxOptions {
            var head = NBDReader(try readExact(connection, 16, deadline, what: "an option header"))
            guard head.u64() == NBD.optionMagic, let option = head.u32(), let length = head.u32() else {
                throw NBDViolation("an option without the IHAVEOPT magic")
            }
            guard length <= UInt32(Self.maxOptionBytes) else {
                throw NBDViolation("option \(option) carries \(length) bytes, more than the \(Self.maxOptionBytes) accepted")
            }
            let data = try readExact(connection, Int(length), deadline, what: "option \(option)'s data")
            switch option {
            case NBD.optExportName:
                // The old way: no error reply is possible, so a wrong name ends the session.
                guard data.isEmpty || data == Array(descriptor.name.utf8) else {
                    throw NBDViolation("the client asked for export '\(String(decoding: data, as: UTF8.self))'; this socket serves '\(descriptor.name)'")
                }
                var reply = NBDBytes()
                reply.u64(descriptor.sizeBytes)
                reply.u16(transmissionFlags)
                if !noZeroes { reply.raw([UInt8](repeating: 0, count: 124)) }
                try connection.write(reply.bytes, until: deadline)
                return true
            case NBD.optGo, NBD.optInfo:
                if try answerInfo(option: option, data: data, connection, deadline), option == NBD.optGo { return true }
            case NBD.optAbort:
                try? connection.write(NBDBytes.optionReply(option: option, type: NBD.repAck), until: deadline)
                return false
            default:
                try connection.write(NBDBytes.optionReply(option: option, type: NBD.repErrUnsupported,
                                                          data: Array("remusd serves NBD_OPT_GO, NBD_OPT_INFO and NBD_OPT_EXPORT_NAME".utf8)), until: deadline)
            }
        }
        throw NBDViolation("more than \(Self.maxOptions) options without choosing the export")
    }

    /// Answers NBD_OPT_GO or NBD_OPT_INFO; true when the export was accepted.
    private func answerInfo(option: UInt32, data: [UInt8], _ connection: UnixConnection, _ deadline: Deadline) throws -> Bool {
        var r = NBDReader(data)
        guard let nameLength = r.u32(), nameLength <= UInt32(r.remaining), let name = r.take(Int(nameLength)),
              let requests = r.u16(), r.remaining == Int(requests) * 2 else {
            try connection.write(NBDBytes.optionReply(option: option, type: NBD.repErrInvalid, data: Array("malformed NBD_OPT_GO/INFO data".utf8)), until: deadline)
            return false
        }
        guard name.isEmpty || Array(name) == Array(descriptor.name.utf8) else {
            try connection.write(NBDBytes.optionReply(option: option, type: NBD.repErrUnknown,
                                                      data: Array("this socket serves disk '\(descriptor.name)' only".utf8)), until: deadline)
            return false
        }
        var export = NBDBytes()
        export.u16(NBD.infoExport)
        export.u64(descriptor.sizeBytes)
        export.u16(transmissionFlags)
        var sizes = NBDBytes()
        sizes.u16(NBD.infoBlockSize)
        sizes.u32(descriptor.blockSize)
        sizes.u32(max(descriptor.blockSize, 4096))
        sizes.u32(UInt32(Self.maxPayloadBytes))
        try connection.write(NBDBytes.optionReply(option: option, type: NBD.repInfo, data: export.bytes)
            + NBDBytes.optionReply(option: option, type: NBD.repInfo, data: sizes.bytes)
            + NBDBytes.optionReply(option: option, type: NBD.repAck), until: deadline)
        return true
    }

    // MARK: - Transmission

    private func transmission(_ connection: UnixConnection) throws {
        let payload = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.maxPayloadBytes, alignment: 4096)
        defer { payload.deallocate() }
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: NBD.requestBytes, alignment: 8)
        defer { header.deallocate() }
        while true {
            // Idle: wait for the next request as long as it takes, waking to notice stop.
            while try !connection.waitReadable(until: .after(milliseconds: 1000)) {
                if isStopped { return }
            }
            let deadline = Deadline.after(milliseconds: requestTimeoutMs)
            guard try connection.readExactly(into: header, until: deadline) else { return }  // the client left
            guard let request = NBDRequest(header: Array(header)) else {
                throw NBDViolation("a request without the NBD request magic (the stream is out of step)")
            }
            let length = Int(request.length)
            let carriesData = request.type == NBD.cmdWrite
            if carriesData || request.type == NBD.cmdRead {
                guard length <= Self.maxPayloadBytes else {
                    // A write's payload cannot be skipped safely without reading it; end the session.
                    throw NBDViolation("a \(carriesData ? "write" : "read") of \(length) bytes, more than the \(Self.maxPayloadBytes) advertised")
                }
            }
            let data = UnsafeMutableRawBufferPointer(rebasing: payload[0..<(carriesData ? length : 0)])
            if carriesData, try !connection.readExactly(into: data, until: deadline) {
                throw NBDViolation("the client left in the middle of a write's data")
            }
            if request.type == NBD.cmdDisconnect { return }
            let (error, readBack) = execute(request, data: UnsafeRawBufferPointer(data), readInto: payload)
            let reply = NBDBytes.simpleReply(handle: request.handle, error: error)
            if error == 0, let readBack {
                // The reply's header and the data in one send, the data from where it was read.
                try reply.withUnsafeBytes { try connection.write([$0, readBack], until: deadline) }
            } else {
                try connection.write(reply, until: deadline)
            }
        }
    }

    /// Performs one request; returns the NBD error (0 for success) and, for a read, the bytes
    /// (a view of `payload`).
    private func execute(_ request: NBDRequest, data: UnsafeRawBufferPointer, readInto payload: UnsafeMutableRawBufferPointer) -> (UInt32, UnsafeRawBufferPointer?) {
        let disk = descriptor.disk
        if let problem = rangeProblem(request) {
            monitor.withLock { counts.errors += 1 }
            return (problem, nil)
        }
        let offset = request.offset, length = UInt64(request.length)
        do {
            switch request.type {
            case NBD.cmdRead:
                let range = UnsafeMutableRawBufferPointer(rebasing: payload[0..<Int(length)])
                try image.read(into: range, at: offset)
                monitor.withLock { counts.reads += 1 }
                return (0, UnsafeRawBufferPointer(range))
            case NBD.cmdWrite:
                try image.write(data, at: offset)
                if request.flags & NBD.cmdFlagFUA != 0 { try image.sync() }
                try reportWrite(data, at: offset)
                monitor.withLock { counts.writes += 1; counts.bytesWritten += length }
            case NBD.cmdFlush:
                try image.sync()
                try record(.command(DiskCommand(disk: disk, kind: .flush, offset: 0, length: 0)))
                monitor.withLock { counts.flushes += 1 }
            case NBD.cmdTrim, NBD.cmdWriteZeroes:
                // Both leave the range reading as zeros (remusd's rule for discard, so the
                // backup's replay is deterministic).
                try image.zero(at: offset, length: length)
                if request.flags & NBD.cmdFlagFUA != 0 { try image.sync() }
                let kind: DiskCommand.Kind = request.type == NBD.cmdTrim ? .discard : .writeZeroes
                try record(.command(DiskCommand(disk: disk, kind: kind, offset: offset, length: length)))
                monitor.withLock { if kind == .discard { counts.discards += 1 } else { counts.writeZeroes += 1 } }
            default:
                monitor.withLock { counts.errors += 1 }
                return (NBD.errInvalid, nil)
            }
            return (0, nil)
        } catch {
            monitor.withLock { counts.errors += 1 }
            log("disk '\(descriptor.name)': request \(request.type) at \(offset) (\(length) bytes) failed: \(error); answered EIO")
            return (NBD.errIO, nil)
        }
    }

    /// A write as DISK_WRITE records of at most the stream's bound each, in order.
    private func reportWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < data.count {
            let n = min(data.count - done, StreamLimits.maxDiskWriteBytes)
            try record(.write(disk: descriptor.disk, offset: offset + UInt64(done), data: UnsafeRawBufferPointer(rebasing: data[done..<done + n])))
            done += n
        }
    }

    /// Why a request's range cannot be served (an NBD error), or nil.
    func rangeProblem(_ request: NBDRequest) -> UInt32? {
        switch request.type {
        case NBD.cmdFlush: return nil
        case NBD.cmdRead, NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes:
            let block = UInt64(descriptor.blockSize)
            let length = UInt64(request.length)
            guard length > 0, request.offset % block == 0, length % block == 0 else { return NBD.errInvalid }
            let (end, overflow) = request.offset.addingReportingOverflow(length)
            guard !overflow, end <= descriptor.sizeBytes else {
                return request.type == NBD.cmdWrite || request.type == NBD.cmdWriteZeroes ? NBD.errNoSpace : NBD.errInvalid
            }
            return nil
        default:
            return NBD.errInvalid
        }
    }

    private func readExact(_ connection: UnixConnection, _ count: Int, _ deadline: Deadline, what: String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        guard count > 0 else { return bytes }
        let complete = try bytes.withUnsafeMutableBytes { try connection.readExactly(into: $0, until: deadline) }
        guard complete else { throw NBDViolation("the client left before \(what)") }
        return bytes
    }
}

/// A client broke the protocol; the session ends with this reason logged.
struct NBDViolation: Error, CustomStringConvertible {
    var reason: String
    init(_ reason: String) { self.reason = reason }
    var description: String { reason }
}
