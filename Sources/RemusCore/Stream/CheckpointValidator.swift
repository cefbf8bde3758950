// The ordering rules of stream format v1 as a pure state machine over decoded items. The decoder
// checks each record on its own; the validator checks the sequence: what may come when, epochs,
// and each checkpoint's count, payload size and digest against its CHECKPOINT_END (I2, I3, I8).

/// What a validated item means for the reader.
public enum CheckpointEvent {
    /// The peer's stream header (role and features checked).
    case streamOpened(StreamHeader)
    /// DOMAIN_CONFIG, before the first checkpoint.
    case domainConfig(DomainConfig)
    /// A disk the stream replicates (DISK_DESCRIPTOR), before the first checkpoint.
    case diskDescriptor(DiskDescriptor)
    /// A checkpoint (or pre-copy round) began: stage what follows, apply nothing yet.
    case checkpointBegan(CheckpointBegin)
    /// Content of the open checkpoint (PAGE_BATCH, VCPU_STATE, DEVICE_STATE, CLOCK, MEMORY_LAYOUT,
    /// OPAQUE_PAYLOAD, DISK_WRITE, DISK_COMMAND). Views in it are valid until the decoder's next call.
    case content(RecordContent)
    /// The open checkpoint is complete and verified (epoch, record count, payload bytes, digest,
    /// required records): it may be committed now, and only now.
    case checkpointComplete(CheckpointEnd)
    /// A heartbeat (either direction).
    case heartbeat(Heartbeat)
    /// The backup committed `epoch` (backup → primary).
    case ack(Ack)
    /// The peer ended the stream on purpose. A checkpoint still open is abandoned: never apply it.
    case streamEnded(StreamEnd)
    /// The peer reported an error and will close; a checkpoint still open is abandoned.
    case peerError(PeerError)
    /// An unknown optional record was skipped (counted in the open checkpoint's digest).
    case skipped
}

/// Enforces the record order of one direction of a v1 stream, and verifies every checkpoint
/// against its CHECKPOINT_END before reporting it complete.
///
/// Feed it every item `StreamDecoder.next()` returns, in order. It throws a `StreamDecodeError`
/// (`outOfOrder`, `epochMismatch`, `countMismatch`, `digestMismatch`, `missingRecord`,
/// `duplicateRecord`, `badHeader`) at the first violation; the stream is then unusable, the open
/// checkpoint must be discarded and the last committed one stays.
///
/// Primary → backup: header; DOMAIN_CONFIG at most once before the first BEGIN; pre-copy rounds
/// (epoch 0, kind `.precopy`, only PAGE_BATCH and OPAQUE_PAYLOAD inside) until the first checkpoint;
/// checkpoints with consecutive epochs (the first ≥ 1, normally 1: a primary that reconnects
/// continues its count), each holding exactly one CLOCK and one MEMORY_LAYOUT, VCPU_STATE in
/// strictly increasing vCPU order, DEVICE_STATE names distinct, PAGE_BATCH PFNs strictly
/// increasing across the whole checkpoint (so a page appears at most once: I3), and OPAQUE_PAYLOAD
/// chunks numbered 0, 1, 2, … per foreign stream over the connection; with the DISKS feature,
/// DISK_DESCRIPTOR records numbered 0, 1, 2, … before the first BEGIN and DISK_WRITE / DISK_COMMAND
/// inside checkpoints and pre-copy rounds, each within its disk's size and aligned to its block
/// size, at most `maxDiskBytesPerCheckpoint` bytes of them per checkpoint; nothing but STREAM_END (or
/// ERROR) after a `.final` checkpoint; nothing at all after STREAM_END or ERROR. HEARTBEAT may come
/// anywhere after the header. Backup → primary: header, then ACK (epochs never decrease),
/// HEARTBEAT, ERROR, STREAM_END. STREAM_END's `lastEpoch` is informational and not checked.
public struct CheckpointValidator: Sendable {
    /// Which direction of the connection the validator reads.
    public enum Direction: Sendable {
        /// Checkpoints, read by the backup.
        case primaryToBackup
        /// Acknowledgements, read by the primary.
        case backupToPrimary
    }

    /// The direction being read.
    public let direction: Direction
    /// Features the reader offered in its own header (primary → backup: the primary may use only these).
    public let offeredFeatures: StreamFeatures
    /// The checkpoint begun and not yet complete, if any.
    public var openCheckpoint: CheckpointBegin? { open?.begin }
    /// Epoch of the last complete checkpoint of kind `.checkpoint` or `.final` (0: none yet).
    public private(set) var lastCompletedEpoch: Epoch = 0
    /// Highest epoch acknowledged so far (backup → primary).
    public private(set) var lastAckedEpoch: Epoch = 0
    /// Whether STREAM_END or ERROR was received (nothing may follow).
    public private(set) var hasEnded = false
    /// Most bytes of disk records (the sum of DISK_WRITE and DISK_COMMAND body lengths) one
    /// checkpoint may carry: what the primary can make the backup hold for one epoch.
    public let maxDiskBytesPerCheckpoint: UInt64
    /// The disks the stream described (DISK_DESCRIPTOR), in disk-number order.
    public private(set) var disks: [DiskDescriptor] = []
    /// Features the peer's header enabled.
    private var negotiated: StreamFeatures = []

    private struct Open: Sendable {
        var begin: CheckpointBegin
        var digest = CheckpointDigest()
        var clocks = 0
        var layouts = 0
        var lastVCPU: UInt32?
        var devices: Set<String> = []
        var lastPFN: PFN?
        /// Bytes of disk records so far (body lengths).
        var diskBytes: UInt64 = 0
    }

    private var headerSeen = false
    private var configSeen = false
    private var anyCheckpointBegun = false
    private var checkpointSeen = false
    private var finalSeen = false
    private var open: Open?
    /// Next expected chunk sequence per foreign stream (indexed by OpaqueStream raw value).
    private var nextOpaqueSequence: [UInt32: UInt32] = [:]

    /// - Parameters:
    ///   - direction: which direction this validator reads.
    ///   - offeredFeatures: the features this end offered in its own header.
    ///   - maxDiskBytesPerCheckpoint: most bytes of disk records one checkpoint may carry (default 1 GiB).
    public init(
        direction: Direction, offeredFeatures: StreamFeatures = .supported,
        maxDiskBytesPerCheckpoint: UInt64 = StreamLimits.defaultMaxDiskBytesPerCheckpoint
    ) {
        self.direction = direction
        self.offeredFeatures = offeredFeatures
        self.maxDiskBytesPerCheckpoint = maxDiskBytesPerCheckpoint
    }

    /// Validates the next item of the stream and says what it means.
    public mutating func validate(_ item: StreamItem) throws(StreamDecodeError) -> CheckpointEvent {
        switch item {
        case .header(let header):
            return try acceptHeader(header)
        case .record(let record):
            func fail(_ kind: StreamDecodeError.Kind, _ detail: String) -> StreamDecodeError {
                StreamDecodeError(kind, typeCode: record.header.typeCode, offset: record.offset, detail)
            }
            guard headerSeen else { throw fail(.outOfOrder, "record before the stream header") }
            guard !hasEnded else { throw fail(.outOfOrder, "record after the end of the stream") }
            switch direction {
            case .primaryToBackup: return try acceptFromPrimary(record, fail)
            case .backupToPrimary: return try acceptFromBackup(record, fail)
            }
        }
    }

    private mutating func acceptHeader(_ header: StreamHeader) throws(StreamDecodeError) -> CheckpointEvent {
        func bad(_ kind: StreamDecodeError.Kind, _ detail: String) -> StreamDecodeError {
            StreamDecodeError(kind, typeCode: nil, offset: 0, detail)
        }
        guard !headerSeen else { throw bad(.outOfOrder, "a second stream header") }
        let expected: StreamRole = direction == .primaryToBackup ? .primary : .backup
        guard header.role == expected else {
            throw bad(.badHeader, "the peer is a \(header.role) where a \(expected) was expected")
        }
        if direction == .primaryToBackup {
            let extra = header.features.subtracting(offeredFeatures)
            guard extra.isEmpty else {
                throw bad(.badHeader, "the primary enabled features \(hex(extra.rawValue)) this backup did not offer (\(hex(offeredFeatures.rawValue)))")
            }
        }
        headerSeen = true
        negotiated = header.features
        return .streamOpened(header)
    }

    private mutating func acceptFromBackup(
        _ record: DecodedRecord, _ fail: (StreamDecodeError.Kind, String) -> StreamDecodeError
    ) throws(StreamDecodeError) -> CheckpointEvent {
        switch record.content {
        case .ack(let ack):
            guard ack.epoch >= lastAckedEpoch else {
                throw fail(.outOfOrder, "ACK for epoch \(ack.epoch) after ACK for epoch \(lastAckedEpoch) (ACK epochs never decrease)")
            }
            lastAckedEpoch = ack.epoch
            return .ack(ack)
        case .heartbeat(let beat): return .heartbeat(beat)
        case .streamEnd(let end):
            hasEnded = true
            return .streamEnded(end)
        case .error(let error):
            hasEnded = true
            return .peerError(error)
        case .skippedOptional: return .skipped
        default:
            throw fail(.outOfOrder, "\(record.header.type?.wireName ?? "record") is not sent by a backup")
        }
    }

    private mutating func acceptFromPrimary(
        _ record: DecodedRecord, _ fail: (StreamDecodeError.Kind, String) -> StreamDecodeError
    ) throws(StreamDecodeError) -> CheckpointEvent {
        let name = record.header.type?.wireName ?? "record"
        switch record.content {
        case .heartbeat(let beat):
            return .heartbeat(beat)

        case .skippedOptional:
            open?.digest.add(record.header)
            return .skipped

        case .domainConfig(let config):
            guard !configSeen else { throw fail(.duplicateRecord, "a second DOMAIN_CONFIG") }
            guard !anyCheckpointBegun else { throw fail(.outOfOrder, "DOMAIN_CONFIG after the first CHECKPOINT_BEGIN") }
            configSeen = true
            return .domainConfig(config)

        case .checkpointBegin(let begin):
            if let open { throw fail(.outOfOrder, "CHECKPOINT_BEGIN(\(begin.epoch)) inside checkpoint \(open.begin.epoch), which has not ended") }
            guard !finalSeen else { throw fail(.outOfOrder, "CHECKPOINT_BEGIN(\(begin.epoch)) after the final checkpoint \(lastCompletedEpoch)") }
            switch begin.kind {
            case .precopy:
                guard !checkpointSeen else { throw fail(.outOfOrder, "pre-copy round after checkpoint \(lastCompletedEpoch)") }
                guard begin.epoch == 0 else { throw fail(.epochMismatch, "pre-copy round with epoch \(begin.epoch); pre-copy rounds use epoch 0") }
            case .checkpoint, .final:
                // The first checkpoint of a connection may have any epoch ≥ 1: a primary that
                // reconnects after losing its backup keeps counting (its output epochs go on).
                if !checkpointSeen {
                    guard begin.epoch >= 1 else { throw fail(.epochMismatch, "checkpoint with epoch 0; epoch 0 is for pre-copy rounds") }
                } else if begin.epoch != lastCompletedEpoch &+ 1 {
                    throw fail(.epochMismatch, "CHECKPOINT_BEGIN(\(begin.epoch)) after checkpoint \(lastCompletedEpoch); expected epoch \(lastCompletedEpoch &+ 1)")
                }
            }
            anyCheckpointBegun = true
            open = Open(begin: begin)
            return .checkpointBegan(begin)

        case .checkpointEnd(let end):
            guard let current = open else { throw fail(.outOfOrder, "CHECKPOINT_END(\(end.epoch)) outside a checkpoint") }
            let epoch = current.begin.epoch
            guard end.epoch == epoch else {
                throw fail(.epochMismatch, "CHECKPOINT_END(\(end.epoch)) closes checkpoint \(epoch)")
            }
            if current.begin.kind != .precopy {
                guard current.clocks == 1 else { throw fail(.missingRecord, "checkpoint \(epoch) has no CLOCK") }
                guard current.layouts == 1 else { throw fail(.missingRecord, "checkpoint \(epoch) has no MEMORY_LAYOUT") }
            }
            let digest = current.digest
            guard UInt64(end.recordCount) == digest.recordCount else {
                throw fail(.countMismatch, "checkpoint \(epoch): END counts \(end.recordCount) records, \(digest.recordCount) were received")
            }
            guard end.payloadBytes == digest.payloadBytes else {
                throw fail(.countMismatch, "checkpoint \(epoch): END counts \(end.payloadBytes) payload bytes, \(digest.payloadBytes) were received")
            }
            guard end.digest == digest.value else {
                throw fail(.digestMismatch, "checkpoint \(epoch): END digest \(hex(end.digest)), received records give \(hex(digest.value))")
            }
            open = nil
            if current.begin.kind != .precopy {
                lastCompletedEpoch = epoch
                checkpointSeen = true
                finalSeen = current.begin.kind == .final
            }
            return .checkpointComplete(end)

        case .streamEnd(let end):
            hasEnded = true
            open = nil
            return .streamEnded(end)

        case .error(let error):
            hasEnded = true
            open = nil
            return .peerError(error)

        case .ack:
            throw fail(.outOfOrder, "ACK is not sent by a primary")

        case .diskDescriptor(let descriptor):
            try requireDisks(name, fail)
            guard !anyCheckpointBegun else { throw fail(.outOfOrder, "DISK_DESCRIPTOR after the first CHECKPOINT_BEGIN") }
            guard disks.count < StreamLimits.maxDisks else {
                throw fail(.lengthOverLimit, "a disk beyond the limit of \(StreamLimits.maxDisks) disks per stream")
            }
            guard descriptor.disk == UInt32(disks.count) else {
                throw fail(.outOfOrder, "DISK_DESCRIPTOR for disk \(descriptor.disk), expected disk \(disks.count) (disks are numbered in order from 0)")
            }
            guard !disks.contains(where: { $0.name == descriptor.name }) else {
                throw fail(.duplicateRecord, "a second disk named \"\(descriptor.name)\"")
            }
            disks.append(descriptor)
            return .diskDescriptor(descriptor)

        case .pageBatch, .vcpuState, .deviceState, .clock, .memoryLayout, .opaquePayload, .diskWrite, .diskCommand:
            if case .diskWrite = record.content { try requireDisks(name, fail) }
            if case .diskCommand = record.content { try requireDisks(name, fail) }
            guard var current = open else { throw fail(.outOfOrder, "\(name) outside a checkpoint") }
            let epoch = current.begin.epoch
            switch record.content {
            case .diskWrite(let write):
                try checkDiskRange(write.disk, offset: write.offset, length: UInt64(write.data.count), epoch: epoch, fail)
                try countDiskBytes(record.header, in: &current, fail)
            case .diskCommand(let command):
                if command.kind == .flush {
                    guard command.offset == 0, command.length == 0 else {
                        throw fail(.malformedBody, "flush of disk \(command.disk) with offset \(command.offset) and length \(command.length); a flush has neither")
                    }
                    try checkDiskRange(command.disk, offset: 0, length: nil, epoch: epoch, fail)
                } else {
                    try checkDiskRange(command.disk, offset: command.offset, length: command.length, epoch: epoch, fail)
                }
                try countDiskBytes(record.header, in: &current, fail)
            case .pageBatch(let batch):
                if let last = current.lastPFN, batch.firstPFN <= last {
                    throw fail(.outOfOrder, "PAGE_BATCH starting at PFN \(batch.firstPFN) after PFN \(last) in checkpoint \(epoch) (PFNs strictly increase across a checkpoint; a page appears once)")
                }
                current.lastPFN = batch.lastPFN
            case .opaquePayload(let payload):
                let expected = nextOpaqueSequence[payload.stream.rawValue, default: 0]
                guard payload.sequence == expected else {
                    throw fail(.outOfOrder, "OPAQUE_PAYLOAD chunk \(payload.sequence) of stream \(payload.stream), expected chunk \(expected)")
                }
                nextOpaqueSequence[payload.stream.rawValue] = expected &+ 1
            default:
                guard current.begin.kind != .precopy else {
                    throw fail(.outOfOrder, "\(name) in a pre-copy round (pre-copy rounds carry pages only)")
                }
                switch record.content {
                case .clock:
                    guard current.clocks == 0 else { throw fail(.duplicateRecord, "a second CLOCK in checkpoint \(epoch)") }
                    current.clocks += 1
                case .memoryLayout:
                    guard current.layouts == 0 else { throw fail(.duplicateRecord, "a second MEMORY_LAYOUT in checkpoint \(epoch)") }
                    current.layouts += 1
                case .vcpuState(let state):
                    if let last = current.lastVCPU, state.vcpu <= last {
                        throw fail(.duplicateRecord, "VCPU_STATE for vCPU \(state.vcpu) after vCPU \(last) in checkpoint \(epoch) (vCPUs in strictly increasing order)")
                    }
                    current.lastVCPU = state.vcpu
                case .deviceState(let device):
                    guard current.devices.insert(device.name).inserted else {
                        throw fail(.duplicateRecord, "a second DEVICE_STATE \"\(device.name)\" in checkpoint \(epoch)")
                    }
                default: break
                }
            }
            current.digest.add(record.header)
            open = current
            return .content(record.content)
        }
    }

    /// Disk records need the DISKS feature: a peer that did not negotiate it must not send them.
    private func requireDisks(
        _ name: String, _ fail: (StreamDecodeError.Kind, String) -> StreamDecodeError
    ) throws(StreamDecodeError) {
        guard negotiated.contains(.disks) else {
            throw fail(.outOfOrder, "\(name), but the stream header did not enable disk records (feature DISKS, bit 1)")
        }
    }

    /// Checks that `length` bytes (nil: a flush, no range) at `offset` lie on a described disk,
    /// aligned to its block size.
    private func checkDiskRange(
        _ disk: UInt32, offset: UInt64, length: UInt64?, epoch: Epoch,
        _ fail: (StreamDecodeError.Kind, String) -> StreamDecodeError
    ) throws(StreamDecodeError) {
        guard Int(disk) < disks.count else {
            throw fail(.outOfOrder, "disk \(disk) in checkpoint \(epoch), but the stream described \(disks.count) disk(s)")
        }
        guard let length else { return }
        let d = disks[Int(disk)]
        let block = UInt64(d.blockSize)
        guard length > 0, offset % block == 0, length % block == 0 else {
            throw fail(.malformedBody, "disk \(disk) (\"\(d.name)\"): range of \(length) bytes at offset \(offset) is empty or not aligned to the block size \(block)")
        }
        guard offset <= d.sizeBytes, length <= d.sizeBytes - offset else {
            throw fail(.malformedBody, "disk \(disk) (\"\(d.name)\"): range of \(length) bytes at offset \(offset) ends beyond the disk's \(d.sizeBytes) bytes")
        }
    }

    /// Counts a disk record against the checkpoint's bound before the reader stages it.
    private func countDiskBytes(
        _ header: RecordHeader, in current: inout Open, _ fail: (StreamDecodeError.Kind, String) -> StreamDecodeError
    ) throws(StreamDecodeError) {
        current.diskBytes += UInt64(header.bodyLength)
        guard current.diskBytes <= maxDiskBytesPerCheckpoint else {
            throw fail(.lengthOverLimit, "checkpoint \(current.begin.epoch) carries more than \(maxDiskBytesPerCheckpoint) bytes of disk records, this backup's bound per checkpoint")
        }
    }
}
