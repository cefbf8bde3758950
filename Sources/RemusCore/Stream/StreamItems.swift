// What the codec writes and what it hands back: owned record values for the encoder, and decoded
// items (small records as values, page batches and opaque payloads as views into the decoder's
// buffer) for the reader.

/// OPAQUE_PAYLOAD body: one chunk of a foreign stream (libxc, libxl) carried verbatim.
public struct OpaquePayload: Equatable, Sendable {
    /// Which foreign stream the chunk belongs to.
    public var stream: OpaqueStream
    /// Chunk number within that stream on this connection: 0, 1, 2, … without gaps.
    public var sequence: UInt32
    /// The chunk's bytes.
    public var bytes: [UInt8]
    /// A chunk of `stream` numbered `sequence`.
    public init(stream: OpaqueStream, sequence: UInt32, bytes: [UInt8]) {
        self.stream = stream
        self.sequence = sequence
        self.bytes = bytes
    }
}

/// Every record except PAGE_BATCH, as an owned value the encoder can write. Each case carries the
/// body of the record type of the same name (Records.swift, Docs/stream-format.md section 6).
public enum StreamRecord: Equatable, Sendable {
    case checkpointBegin(CheckpointBegin)
    case checkpointEnd(CheckpointEnd)
    case vcpuState(VCPUState)
    case deviceState(DeviceState)
    case clock(ClockState)
    case memoryLayout(MemoryLayout)
    case opaquePayload(OpaquePayload)
    case domainConfig(DomainConfig)
    case diskDescriptor(DiskDescriptor)
    case diskWrite(DiskWrite)
    case diskCommand(DiskCommand)
    case ack(Ack)
    case heartbeat(Heartbeat)
    case streamEnd(StreamEnd)
    case error(PeerError)

    /// The record's type.
    public var type: RecordType {
        switch self {
        case .checkpointBegin: return .checkpointBegin
        case .checkpointEnd: return .checkpointEnd
        case .vcpuState: return .vcpuState
        case .deviceState: return .deviceState
        case .clock: return .clock
        case .memoryLayout: return .memoryLayout
        case .opaquePayload: return .opaquePayload
        case .domainConfig: return .domainConfig
        case .diskDescriptor: return .diskDescriptor
        case .diskWrite: return .diskWrite
        case .diskCommand: return .diskCommand
        case .ack: return .ack
        case .heartbeat: return .heartbeat
        case .streamEnd: return .streamEnd
        case .error: return .error
        }
    }
}

/// One page of a decoded PAGE_BATCH.
public struct PageBatchEntry {
    /// The page's frame number.
    public var pfn: PFN
    /// How the page travels.
    public var encoding: PageEncoding
    /// `.raw`: the page's bytes (page size); `.delta`: the delta (see `PageDelta`), already checked
    /// for structure; `.zero`, `.absent`: empty. Valid until the decoder's next call.
    public var data: UnsafeRawBufferPointer
}

/// A decoded PAGE_BATCH, pointing into the decoder's buffer: valid until the decoder's next call.
///
/// The decoder has checked everything the wire allows it to: count 1…1024, PFNs < 2^52 and strictly
/// increasing, each length right for its encoding, padding zero, deltas well-formed and allowed
/// by the negotiated features.
public struct PageBatchView: RandomAccessCollection {
    /// Page size of the stream in bytes.
    public let pageSize: Int
    /// Number of pages in the batch.
    public let count: Int
    let body: UnsafeRawPointer
    /// Offset of each entry's data from the start of the body (owned by the decoder).
    let dataOffsets: UnsafePointer<UInt32>

    /// 0.
    public var startIndex: Int { 0 }
    /// `count`.
    public var endIndex: Int { count }

    /// The entry at `index` (0 ..< count).
    public subscript(index: Int) -> PageBatchEntry {
        precondition(index >= 0 && index < count, "page batch index \(index) outside 0..<\(count)")
        // SAFETY: the decoder checked that `count` index entries and every entry's data (offset
        // and length) lie inside the body, which stays in its buffer until its next call.
        let word = body.le(Wire.batchPrefixBytes + Wire.batchEntryBytes * index, as: UInt64.self)
        let length = Int(body.le(Wire.batchPrefixBytes + Wire.batchEntryBytes * index + 8, as: UInt32.self))
        let encoding = PageEncoding(rawValue: UInt8(truncatingIfNeeded: word >> 60)) ?? .absent
        let data = UnsafeRawBufferPointer(start: body + Int(dataOffsets[index]), count: length)
        return PageBatchEntry(pfn: word & (Wire.pfnLimit - 1), encoding: encoding, data: data)
    }

    /// The first page's frame number.
    public var firstPFN: PFN { self[0].pfn }
    /// The last page's frame number.
    public var lastPFN: PFN { self[count - 1].pfn }
}

/// A decoded OPAQUE_PAYLOAD, pointing into the decoder's buffer: valid until the decoder's next call.
public struct OpaquePayloadView {
    /// Which foreign stream the chunk belongs to.
    public var stream: OpaqueStream
    /// Chunk number within that stream.
    public var sequence: UInt32
    /// The chunk's bytes.
    public var bytes: UnsafeRawBufferPointer

    /// An owned copy.
    public func copy() -> OpaquePayload {
        OpaquePayload(stream: stream, sequence: sequence, bytes: Array(bytes))
    }
}

/// A decoded DISK_WRITE, pointing into the decoder's buffer: valid until the decoder's next call.
public struct DiskWriteView {
    /// The disk's number (its DISK_DESCRIPTOR).
    public var disk: UInt32
    /// Byte offset on the disk.
    public var offset: UInt64
    /// The bytes written.
    public var data: UnsafeRawBufferPointer

    /// An owned copy.
    public func copy() -> DiskWrite { DiskWrite(disk: disk, offset: offset, data: Array(data)) }
}

/// The content of one decoded record; each case is the record type of the same name.
public enum RecordContent {
    case checkpointBegin(CheckpointBegin)
    case checkpointEnd(CheckpointEnd)
    /// Valid until the decoder's next call.
    case pageBatch(PageBatchView)
    case vcpuState(VCPUState)
    case deviceState(DeviceState)
    case clock(ClockState)
    case memoryLayout(MemoryLayout)
    /// Valid until the decoder's next call.
    case opaquePayload(OpaquePayloadView)
    case domainConfig(DomainConfig)
    case diskDescriptor(DiskDescriptor)
    /// Valid until the decoder's next call.
    case diskWrite(DiskWriteView)
    case diskCommand(DiskCommand)
    case ack(Ack)
    case heartbeat(Heartbeat)
    case streamEnd(StreamEnd)
    case error(PeerError)
    /// A record of a type this build does not know, without the MANDATORY flag: its CRC was
    /// checked and its body skipped. It still counts towards a checkpoint's digest.
    case skippedOptional
}

extension RecordContent {
    /// The content as an owned value (an opaque payload or disk write is copied); nil for PAGE_BATCH and skipped
    /// records.
    public var ownedRecord: StreamRecord? {
        switch self {
        case .checkpointBegin(let v): return .checkpointBegin(v)
        case .checkpointEnd(let v): return .checkpointEnd(v)
        case .vcpuState(let v): return .vcpuState(v)
        case .deviceState(let v): return .deviceState(v)
        case .clock(let v): return .clock(v)
        case .memoryLayout(let v): return .memoryLayout(v)
        case .opaquePayload(let v): return .opaquePayload(v.copy())
        case .domainConfig(let v): return .domainConfig(v)
        case .diskDescriptor(let v): return .diskDescriptor(v)
        case .diskWrite(let v): return .diskWrite(v.copy())
        case .diskCommand(let v): return .diskCommand(v)
        case .ack(let v): return .ack(v)
        case .heartbeat(let v): return .heartbeat(v)
        case .streamEnd(let v): return .streamEnd(v)
        case .error(let v): return .error(v)
        case .pageBatch, .skippedOptional: return nil
        }
    }
}

/// One record as decoded, with where it was in the stream.
public struct DecodedRecord {
    /// Stream offset of the record's header in bytes (the stream header starts at 0).
    public var offset: UInt64
    /// The header as it was on the wire (feeds the checkpoint digest).
    public var header: RecordHeader
    /// The decoded body.
    public var content: RecordContent
}

/// What `StreamDecoder.next()` returns: the stream header first, then records.
public enum StreamItem {
    case header(StreamHeader)
    case record(DecodedRecord)
}

/// The running count, payload size and CRC32C of a checkpoint's records, as CHECKPOINT_END
/// carries them. Both ends keep one: the encoder to write END, the validator to check it.
///
/// It covers every record between BEGIN and END (exclusive) except HEARTBEAT, in order: the CRC32C
/// runs over their 16-byte headers as written (including each header's own CRC field, which covers
/// the body), so the digest commits to every byte of the checkpoint at 16 bytes of work per record.
public struct CheckpointDigest: Equatable, Sendable {
    /// Records counted so far.
    public private(set) var recordCount: UInt64 = 0
    /// Sum of their body lengths, bytes.
    public private(set) var payloadBytes: UInt64 = 0
    /// CRC32C over their headers so far (0 for none).
    public private(set) var value: UInt32 = 0

    /// An empty digest (no records).
    public init() {}

    /// Counts one record (HEARTBEAT records are ignored by definition).
    public mutating func add(_ header: RecordHeader) {
        guard header.typeCode != RecordType.heartbeat.rawValue else { return }
        recordCount += 1
        payloadBytes += UInt64(header.bodyLength)
        value = header.withWireBytes { CRC32C.extend(value, $0) }
    }
}
