import Glibc
import RemusCore
import RemusDisk

/// Writes stream records to a channel with the codec; page data goes out by writev straight from
/// the staging arena (no copy). Used by one thread at a time (a connection's writer thread).
package final class RecordWriter {
    private let channel: any ByteChannel
    private var encoder: StreamEncoder
    private var buffer: [UInt8] = []
    /// Reused iovec array: the small-record buffer plus one batch's segments.
    private let iov: UnsafeMutablePointer<iovec>
    private let iovCapacity: Int

    package init(channel: any ByteChannel, pageSize: Int, features: StreamFeatures = []) {
        self.channel = channel
        encoder = StreamEncoder(pageSize: pageSize, features: features)
        buffer.reserveCapacity(64 << 10)
        iovCapacity = 2 + 2 * StreamLimits.maxPagesPerBatch
        iov = .allocate(capacity: iovCapacity)
    }

    deinit { iov.deallocate() }

    static func writeHeader(_ header: StreamHeader, to channel: any ByteChannel) throws {
        var out: [UInt8] = []
        try StreamEncoder.appendHeader(header, into: &out)
        try channel.write(out)
    }

    /// The primary's first bytes: its stream header, DOMAIN_CONFIG and its disks' DISK_DESCRIPTORs.
    static func writePreamble(header: StreamHeader, config: DomainConfig, disks: [DiskDescriptor] = [], to channel: any ByteChannel) throws {
        var out: [UInt8] = []
        try StreamEncoder.appendHeader(header, into: &out)
        var encoder = StreamEncoder(pageSize: Int(header.pageSize), features: header.features)
        try encoder.append(.domainConfig(config), into: &out)
        for disk in disks { try encoder.append(.diskDescriptor(disk), into: &out) }
        try channel.write(out)
    }

    func write(_ heartbeat: Heartbeat) throws { try writeRecord(.heartbeat(heartbeat)) }
    func write(_ ack: Ack) throws { try writeRecord(.ack(ack)) }
    func write(_ end: StreamEnd) throws { try writeRecord(.streamEnd(end)) }
    func write(_ error: PeerError) throws { try writeRecord(.error(error)) }

    private func writeRecord(_ record: StreamRecord) throws {
        buffer.removeAll(keepingCapacity: true)
        try encoder.append(record, into: &buffer)
        try channel.write(buffer)
    }

    /// Writes one checkpoint (or pre-copy round when `state` is nil) from `arena`; returns bytes written.
    @discardableResult
    package func writeCheckpoint(_ arena: StagingArena, state: GuestState?) throws -> Int {
        var total = 0
        buffer.removeAll(keepingCapacity: true)
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: arena.epoch, kind: arena.kind)), into: &buffer)
        var index = 0
        while index < arena.count {
            let end = min(index + encoder.maxPagesPerBatch, arena.count)
            let batch = encoder.encodePageBatch(arena, entries: index..<end)
            total += try writeBufferAnd(batch.segments)
            index = end
        }
        if let state {
            for v in state.vcpus { try encoder.append(.vcpuState(v), into: &buffer) }
            for d in state.devices { try encoder.append(.deviceState(d), into: &buffer) }
            try encoder.append(.clock(state.clock), into: &buffer)
            try encoder.append(.memoryLayout(state.layout), into: &buffer)
            total += try writeStream(state.stream)
            total += try writeDiskOperations(state.disks)
            if InjectedFault.directory != nil, state.disks.count > 0, InjectedFault.armed(.killAfterDiskRecords) {
                // Kill point: disk N left, memory N's CHECKPOINT_END never will.
                total += try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0))
                InjectedFault.fire(.killAfterDiskRecords, epoch: arena.epoch, detail: "disk operations sent: \(state.disks.count)")
                InjectedFault.stopSelf()
            }
        }
        _ = try encoder.endCheckpoint(into: &buffer)
        total += try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0))
        return total
    }

    /// Writes a live-phase share of a hypervisor library's stream as one pre-copy round
    /// (epoch 0) of OPAQUE_PAYLOAD records; returns bytes written.
    @discardableResult
    func writePrecopyStream(_ bytes: [UInt8]) throws -> Int {
        buffer.removeAll(keepingCapacity: true)
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &buffer)
        var total = try writeStream(bytes)
        _ = try encoder.endCheckpoint(into: &buffer)
        total += try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0))
        return total
    }

    /// Writes an epoch's disk operations in their order, each write's data straight from the
    /// journal; returns bytes written.
    private func writeDiskOperations(_ operations: DiskOperations) throws -> Int {
        var total = 0
        try operations.forEach { entry, data in
            switch entry.kind {
            case .write:
                total += try writeDiskWrite(disk: entry.disk, offset: entry.offset, data: data)
            case .flush, .discard, .writeZeroes:
                let kind: DiskCommand.Kind = entry.kind == .flush ? .flush : entry.kind == .discard ? .discard : .writeZeroes
                try encoder.append(.diskCommand(DiskCommand(disk: entry.disk, kind: kind, offset: entry.offset, length: entry.length)), into: &buffer)
            }
        }
        return total
    }

    /// Most bytes of disk records one pre-copy round of the full disk copy carries: half a
    /// backup's default staging memory (32 MiB), so the backup stages a round in memory and writes
    /// it onto its images once (rounds of 256 MiB spilled 7/8 of each round to a file first).
    static let diskCopyRoundBytes: UInt64 = 16 << 20

    /// The full copy of every disk, read from the local images while the guest runs, as pre-copy
    /// rounds (epoch 0) of DISK_WRITE records (all-zero pieces as write-zeroes). Operations the
    /// guest makes meanwhile are in the journal and follow in checkpoint 1, so whatever a read
    /// saw, the backup's images converge. Returns bytes written.
    @discardableResult
    func writeDiskCopy(_ disks: any GuestDisks, progress: (_ copied: UInt64, _ total: UInt64) -> Void) throws -> Int {
        let piece = StreamLimits.maxDiskWriteBytes
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 4096)
        defer { scratch.deallocate() }
        let totalBytes = disks.descriptors.reduce(UInt64(0)) { $0 + $1.sizeBytes }
        var copied: UInt64 = 0
        var total = 0
        var inRound: UInt64 = 0
        buffer.removeAll(keepingCapacity: true)
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &buffer)
        // Out at once: the backup learns that the disk descriptions ended before a piece is read.
        total += try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0))
        for disk in disks.descriptors {
            var offset: UInt64 = 0
            while offset < disk.sizeBytes {
                if inRound >= Self.diskCopyRoundBytes {
                    _ = try encoder.endCheckpoint(into: &buffer)
                    try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &buffer)
                    inRound = 0
                }
                let n = Int(min(UInt64(piece), disk.sizeBytes - offset))
                let view = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])
                try disks.read(disk: disk.disk, at: offset, into: view)
                if isZero(UnsafeRawBufferPointer(view)) {
                    try encoder.append(.diskCommand(DiskCommand(disk: disk.disk, kind: .writeZeroes, offset: offset, length: UInt64(n))), into: &buffer)
                    total += try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0))
                } else {
                    total += try writeDiskWrite(disk: disk.disk, offset: offset, data: UnsafeRawBufferPointer(view))
                }
                offset += UInt64(n)
                copied += UInt64(n)
                inRound += UInt64(n)
                progress(copied, totalBytes)
            }
        }
        _ = try encoder.endCheckpoint(into: &buffer)
        total += try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0))
        return total
    }

    /// Writes the buffer and a DISK_WRITE whose data goes out from where it is (one writev, no
    /// copy into the buffer); returns bytes written.
    private func writeDiskWrite(disk: UInt32, offset: UInt64, data: UnsafeRawBufferPointer) throws -> Int {
        try encoder.appendDiskWriteHeader(disk: disk, offset: offset, data: data, into: &buffer)
        guard let base = data.baseAddress else { return try writeBufferAnd(UnsafeBufferPointer(start: nil, count: 0)) }
        var segment = StreamSegment(base: base, count: data.count)
        return try withUnsafePointer(to: &segment) { try writeBufferAnd(UnsafeBufferPointer(start: $0, count: 1)) }
    }

    /// Largest OPAQUE_PAYLOAD chunk: well inside the codec's record limit, small enough that the
    /// backup's reader reports progress often.
    static let opaqueChunkBytes = 1 << 20
    /// Chunks of the libxl stream written on this connection (their sequence numbers).
    private var opaqueSequence: UInt32 = 0

    /// Appends `bytes` as OPAQUE_PAYLOAD chunks of the libxl stream, each written as the buffer
    /// (its header) and the chunk from where it is (one writev, no copy); returns bytes written.
    private func writeStream(_ bytes: [UInt8]) throws -> Int {
        var total = 0
        var offset = 0
        while offset < bytes.count {
            let end = min(offset + Self.opaqueChunkBytes, bytes.count)
            total += try bytes.withUnsafeBytes { raw in
                let chunk = UnsafeRawBufferPointer(rebasing: raw[offset..<end])
                let padding = try encoder.appendOpaquePayloadHeader(stream: .libxl, sequence: opaqueSequence, bytes: chunk, into: &buffer)
                return try Self.zeroPadding.withUnsafeBytes { zeros in
                    // A chunk is never empty (offset < end), so it has a base address.
                    let segments = [StreamSegment(base: chunk.baseAddress!, count: chunk.count),
                                    StreamSegment(base: zeros.baseAddress!, count: padding)]
                    return try segments.withUnsafeBufferPointer { try writeBufferAnd(UnsafeBufferPointer(rebasing: $0[..<(padding > 0 ? 2 : 1)])) }
                }
            }
            opaqueSequence &+= 1
            offset = end
        }
        return total
    }

    /// The zero bytes that pad an OPAQUE_PAYLOAD written from the caller's bytes to 8.
    private static let zeroPadding = [UInt8](repeating: 0, count: 8)

    /// Writes the small-record buffer followed by `segments` in one writev sequence; empties the buffer.
    private func writeBufferAnd(_ segments: UnsafeBufferPointer<StreamSegment>) throws -> Int {
        var bytes = 0
        try buffer.withUnsafeBytes { raw in
            var n = 0
            if raw.count > 0 {
                iov[n] = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count)
                bytes += raw.count
                n += 1
            }
            precondition(segments.count + n <= iovCapacity, "page batch with \(segments.count) segments")
            for s in segments {
                iov[n] = iovec(iov_base: UnsafeMutableRawPointer(mutating: s.base), iov_len: s.count)
                bytes += s.count
                n += 1
            }
            if n > 0 { try channel.write(segments: UnsafeMutableBufferPointer(start: iov, count: n)) }
        }
        buffer.removeAll(keepingCapacity: true)
        return bytes
    }
}

/// Reads one direction of a stream: decoder plus validator over a channel.
final class StreamReader {
    private let channel: any ByteChannel
    private var decoder = StreamDecoder()
    private var validator: CheckpointValidator
    /// Called after every read that returned bytes (liveness while a long checkpoint arrives).
    var onBytes: (() -> Void)?
    /// The connection's entry in the backup's table: told of every read and every whole item,
    /// so a record that trickles in misses its deadline.
    var ticket: ConnectionTable.Ticket?
    /// Largest record body taken (see `StreamDecoder.recordBodyLimit`).
    var recordBodyLimit: Int {
        get { decoder.recordBodyLimit }
        set { decoder.recordBodyLimit = newValue }
    }

    /// - Parameters:
    ///   - offeredFeatures: the features this end offered in its own header.
    ///   - maxDiskBytesPerCheckpoint: most bytes of disk records one checkpoint may carry.
    init(channel: any ByteChannel, direction: CheckpointValidator.Direction, offeredFeatures: StreamFeatures = [],
         maxDiskBytesPerCheckpoint: UInt64 = StreamLimits.defaultMaxDiskBytesPerCheckpoint) {
        self.channel = channel
        validator = CheckpointValidator(direction: direction, offeredFeatures: offeredFeatures,
                                        maxDiskBytesPerCheckpoint: maxDiskBytesPerCheckpoint)
    }

    /// The next validated event, or nil when the peer closed the connection at a record boundary.
    /// Views inside the event stay valid until the next call.
    func next() throws -> CheckpointEvent? {
        while true {
            if let item = try decoder.next() {
                ticket?.itemComplete()
                return try validator.validate(item)
            }
            let space = decoder.writableSpace()
            let n = try channel.read(into: space)
            if n == 0 {
                try decoder.finish()
                return nil
            }
            decoder.commit(n)
            ticket?.progress(pendingBytes: decoder.pendingItemBytes)
            onBytes?()
        }
    }

    /// Reads up to the peer's stream header.
    func readHeader() throws -> StreamHeader {
        guard let event = try next() else { throw ProtocolError("the peer closed the connection before sending its stream header") }
        guard case .streamOpened(let header) = event else { throw ProtocolError("the peer's stream did not start with a header") }
        return header
    }
}

/// One checkpoint as staged on the backup: pages decoded into arenas (a chain, since the backup
/// cannot know the primary's checkpoint size in advance), plus the state records.
///
/// `@unchecked Sendable`: filled by the reader thread, then handed whole to the loop thread,
/// which commits it while the reader waits.
final class StagedCheckpoint: @unchecked Sendable {
    static let chunkPages = 16384
    let pageSize: Int
    /// Arenas 0…current hold this checkpoint's pages; later ones are kept for reuse.
    private var arenas: [StagingArena]
    private var current = 0
    private(set) var begin = CheckpointBegin(epoch: 0, kind: .precopy)
    var vcpus: [VCPUState] = []
    var devices: [DeviceState] = []
    var clock: ClockState?
    var layout: MemoryLayout?
    /// The hypervisor library's stream bytes of this checkpoint (OPAQUE_PAYLOAD, in order).
    var stream: [UInt8] = []
    /// The guest's pages as its DOMAIN_CONFIG declares them: no page number at or above, and
    /// no more pages than this in one checkpoint.
    let guestPages: UInt64
    /// Most bytes one checkpoint may stage (pages, state and stream bytes together).
    let byteLimit: Int
    /// Bytes staged for this checkpoint so far.
    private(set) var stagedBytes = 0
    /// Pages staged for this checkpoint so far.
    private(set) var stagedPages: UInt64 = 0

    /// Room beyond the guest's memory that one checkpoint's state, device model and the
    /// hypervisor library's framing may take (64 MiB).
    static let stateAllowance = 64 << 20
    /// This checkpoint's disk operations (DISK_WRITE, DISK_COMMAND, in order); nil when the
    /// stream replicates no disks.
    var disks: DiskEpochStaging?

    init(pageSize: Int, guestBytes: UInt64) {
        self.pageSize = pageSize
        guestPages = guestBytes / UInt64(pageSize)
        byteLimit = Int(clamping: guestBytes) &+ Self.stateAllowance
        arenas = [StagingArena(pageSize: pageSize, capacityPages: min(Self.chunkPages, Int(clamping: max(guestPages, 1))))]
    }

    /// Counts `bytes` more against the checkpoint's limit; throws (before they are staged) when
    /// they would pass it. `what` is built only then: this runs once per page.
    func reserve(_ bytes: Int, for what: @autoclosure () -> String) throws {
        guard stagedBytes + bytes <= byteLimit else {
            throw StreamDecodeError(.lengthOverLimit, typeCode: nil, offset: 0,
                "checkpoint \(begin.epoch) would stage more than \(byteLimit >> 20) MiB (\(what())): more than the guest's declared memory plus \(Self.stateAllowance >> 20) MiB; it was dropped before it was staged, the replica keeps its last committed checkpoint")
        }
        stagedBytes += bytes
    }

    /// Checks a page number against the guest's declared size before the page is staged, and
    /// that the checkpoint does not carry more pages than the guest has.
    func checkPage(_ pfn: PFN) throws {
        guard stagedPages < guestPages else {
            throw StreamDecodeError(.lengthOverLimit, typeCode: RecordType.pageBatch.rawValue, offset: 0,
                "checkpoint \(begin.epoch) carries more than the \(guestPages) pages the primary declared for its guest; it was dropped, the replica keeps its last committed checkpoint")
        }
        stagedPages += 1
        guard pfn < guestPages else {
            throw StreamDecodeError(.malformedBody, typeCode: RecordType.pageBatch.rawValue, offset: 0,
                "page \(pfn) lies beyond the \(guestPages) pages the primary declared for its guest; checkpoint \(begin.epoch) was dropped, the replica keeps its last committed checkpoint")
        }
    }

    func reset(_ begin: CheckpointBegin) throws {
        try disks?.reset()
        self.begin = begin
        stagedBytes = 0
        stagedPages = 0
        current = 0
        arenas[0].reset(epoch: begin.epoch, kind: begin.kind)
        vcpus.removeAll(keepingCapacity: true)
        devices.removeAll(keepingCapacity: true)
        clock = nil
        layout = nil
        stream.removeAll(keepingCapacity: true)
    }

    /// The arena the next page goes into.
    func arenaWithRoom() -> StagingArena {
        if !arenas[current].hasRoom(for: 1) {
            current += 1
            if current == arenas.count { arenas.append(StagingArena(pageSize: pageSize, capacityPages: arenas[0].capacityPages)) }
            arenas[current].reset(epoch: begin.epoch, kind: begin.kind)
        }
        return arenas[current]
    }

    /// Pages staged.
    var pageCount: Int { arenas[0...current].reduce(0) { $0 + $1.count } }

    /// The state, for checkpoints (nil for pre-copy rounds).
    var state: GuestState? {
        guard let clock, let layout else { return nil }
        return GuestState(vcpus: vcpus, devices: devices, clock: clock, layout: layout, stream: stream)
    }

    /// Applies the staged checkpoint to the replica as one unit: all its arenas of pages with
    /// the state (I2: a checkpoint larger than one arena is still one checkpoint); a replica built
    /// from a hypervisor library's stream gets that stream's bytes. A checkpoint of the other
    /// shape than the replica takes is refused whole; the replica keeps its last checkpoint.
    func commit(to replica: any ReplicaTarget) throws {
        switch replica.commitMode {
        case .pages(let pageReplica):
            guard stream.isEmpty else {
                throw ProtocolError("checkpoint \(begin.epoch) carries \(stream.count) bytes of a hypervisor library's stream, but this backup's replica takes pages only; it keeps its last committed checkpoint — the primary and the backup must run the same backend")
            }
            try pageReplica.commit(Array(arenas[0...current]), state: state)
        case .stream(let streamingReplica):
            guard pageCount == 0 else {
                throw ProtocolError("checkpoint \(begin.epoch) carries \(pageCount) pages, but this backup's replica is built from the hypervisor library's stream only; it keeps its last committed checkpoint — the primary and the backup must run the same backend")
            }
            if !stream.isEmpty || begin.kind != .precopy {
                try streamingReplica.commitStream(stream, checkpoint: begin.kind != .precopy)
            }
        }
    }
}

/// The backup's reader: handshake, then decode → validate → stage, handing each complete
/// checkpoint to the loop and waiting until it was committed.
final class CheckpointReceiver {
    private let reader: StreamReader
    private var staged: StagedCheckpoint?
    /// The event read after the last DISK_DESCRIPTOR, handled first by `receive`.
    private var lookahead: CheckpointEvent?
    /// The checkpoint begun and not (yet) complete; nil between checkpoints.
    private(set) var openEpoch: Epoch?
    /// Disk operations staged for the last checkpoint begun.
    var stagedDiskOperations: Int { staged?.disks?.entryCount ?? 0 }

    /// Until the hello is accepted no record may be larger than a DOMAIN_CONFIG.
    /// - Parameters:
    ///   - offeredFeatures: the features this backup offered in its header.
    ///   - maxDiskBytesPerCheckpoint: most bytes of disk records one checkpoint may carry, checked
    ///     before each is staged (`--max-disk-checkpoint`).
    init(channel: any ByteChannel, ticket: ConnectionTable.Ticket? = nil, offeredFeatures: StreamFeatures = [],
         maxDiskBytesPerCheckpoint: UInt64 = StreamLimits.defaultMaxDiskBytesPerCheckpoint) {
        reader = StreamReader(channel: channel, direction: .primaryToBackup, offeredFeatures: offeredFeatures,
                              maxDiskBytesPerCheckpoint: maxDiskBytesPerCheckpoint)
        reader.ticket = ticket
        reader.recordBodyLimit = RecordType.domainConfig.maximumBody(pageSize: 4096)
    }

    /// The primary's stream header, DOMAIN_CONFIG and (with DISKS) its disks: the DISK_DESCRIPTORs
    /// that follow DOMAIN_CONFIG, up to the first other record.
    func readHello() throws -> (StreamHeader, DomainConfig, [DiskDescriptor]) {
        let header = try reader.readHeader()
        guard let event = try reader.next() else { throw ProtocolError("the primary closed the connection before sending DOMAIN_CONFIG") }
        guard case .domainConfig(let config) = event else { throw ProtocolError("the primary's stream has no DOMAIN_CONFIG after its header") }
        var disks: [DiskDescriptor] = []
        if header.features.contains(.disks) {
            while let next = try reader.next() {
                guard case .diskDescriptor(let disk) = next else {
                    // Only values come before the first BEGIN (the validator sees to it): safe to keep.
                    lookahead = next
                    break
                }
                disks.append(disk)
            }
        }
        return (header, config, disks)
    }

    /// The hello was accepted for a guest of `guestBytes`: records of any size may follow, and
    /// checkpoints are staged within that guest's bounds.
    func accepted(pageSize: UInt32, guestBytes: UInt64) {
        reader.recordBodyLimit = StreamLimits.maxRecordBody
        staged = StagedCheckpoint(pageSize: Int(pageSize), guestBytes: guestBytes)
    }

    /// Where this connection's disk operations are staged (set after `accepted`, before `receive`,
    /// when the primary's disks were accepted).
    func stageDisks(into staging: DiskEpochStaging) { staged?.disks = staging }

    /// Receives until the stream ends. Throws StreamDecodeError for a rejected stream, and what
    /// `complete` throws.
    /// `deltaBases` is the replica whose committed pages delta-encoded pages are decoded against
    /// (nil when there is none, or the replica takes a hypervisor library's stream).
    func receive(
        deltaBases: () -> (any PageReplica)?,
        began: (CheckpointBegin) -> Void,
        complete: (CheckpointEnd, StagedCheckpoint) throws -> Bool,
        activity: @escaping () -> Void,
        streamEnd: (StreamEnd) -> Void
    ) throws {
        guard let staged else { preconditionFailure("receive before readHello") }
        reader.onBytes = activity
        while let event = try lookahead.take() ?? reader.next() {
            switch event {
            case .checkpointBegan(let begin):
                try staged.reset(begin)
                openEpoch = begin.epoch
                began(begin)
            case .content(let content):
                switch content {
                case .pageBatch(let batch):
                    for entry in batch {
                        try staged.checkPage(entry.pfn)
                        try staged.reserve(staged.pageSize, for: "page \(entry.pfn)")
                        let arena = staged.arenaWithRoom()
                        switch entry.encoding {
                        case .raw:
                            let dst = arena.append(pfn: entry.pfn, encoding: .raw)!
                            // SAFETY: the decoder checked a raw entry holds exactly one page.
                            dst.copyMemory(from: entry.data)
                        case .zero, .absent:
                            arena.append(pfn: entry.pfn, encoding: entry.encoding)
                        case .delta:
                            let dst = arena.append(pfn: entry.pfn, encoding: .raw)!
                            // The base is read while the replica holds off a discard (the loop
                            // thread may throw the replica away meanwhile).
                            let based = deltaBases()?.withCommittedPage(entry.pfn) { base -> Bool in
                                guard let base else { return false }
                                dst.copyMemory(from: base)
                                return true
                            } ?? false
                            guard based else {
                                throw StreamDecodeError(.malformedBody, typeCode: RecordType.pageBatch.rawValue, offset: 0,
                                                        "delta page \(entry.pfn) has no base in the replica")
                            }
                            try PageDelta.apply(entry.data, to: dst)
                        }
                    }
                case .vcpuState(let v):
                    try staged.reserve(v.bytes.count, for: "vCPU state")
                    staged.vcpus.append(v)
                case .deviceState(let d):
                    try staged.reserve(d.bytes.count, for: "device state")
                    staged.devices.append(d)
                case .clock(let c): staged.clock = c
                case .memoryLayout(let l): staged.layout = l
                case .opaquePayload(let chunk):
                    // remusd's Xen primary sends libxl's stream, which wraps libxenguest's.
                    guard chunk.stream == .libxl else {
                        throw ProtocolError("the primary sent an OPAQUE_PAYLOAD of stream \(chunk.stream); a backup takes libxl's stream only; the replica keeps its last committed checkpoint")
                    }
                    try staged.reserve(chunk.bytes.count, for: "the hypervisor library's stream")
                    staged.stream.append(contentsOf: chunk.bytes)
                case .diskWrite(let write):
                    guard let disks = staged.disks else { throw Self.noDisks }
                    try disks.appendWrite(disk: write.disk, offset: write.offset, data: write.data)
                case .diskCommand(let command):
                    guard let disks = staged.disks else { throw Self.noDisks }
                    try disks.append(command)
                default: break
                }
            case .checkpointComplete(let end):
                openEpoch = nil
                _ = try complete(end, staged)
            case .heartbeat:
                activity()
            case .streamEnded(let end):
                streamEnd(end)
                return
            case .peerError(let e):
                throw ProtocolError("the primary reported error \(e.code): \(e.message)")
            case .diskDescriptor(let disk):
                // The validator lets one through only before the first checkpoint, and readHello
                // reads all of those: this one came after other records.
                throw ProtocolError("the primary described disk \"\(disk.name)\" after its stream began; this backup takes a stream's disks only before its first checkpoint; nothing of it was applied")
            case .streamOpened, .domainConfig, .ack, .skipped:
                break
            }
        }
    }

    /// Disk records on a stream whose disks this backup did not accept (the validator lets them
    /// through only with DISKS negotiated, so this is a primary breaking its own header).
    static let noDisks = ProtocolError("the primary sent disk records without describing its disks first; the replica keeps its last committed checkpoint")
}

/// Whether every byte is zero (word by word: this runs over whole disks).
func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
    var at = 0
    while at + 8 <= bytes.count {
        if bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self) != 0 { return false }
        at += 8
    }
    return bytes[at...].allSatisfy { $0 == 0 }
}
