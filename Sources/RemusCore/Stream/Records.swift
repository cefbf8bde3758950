// The record model of checkpoint stream v1. Byte layouts are specified in Docs/stream-format.md;
// the codec (StreamEncoder, StreamDecoder) turns these values into bytes and back.

/// The stream format's version this build writes.
public enum StreamVersion {
    /// Major version: a reader refuses a stream whose major it does not know.
    public static let major: UInt16 = 1
    /// Minor version: additions an older reader of the same major can skip safely.
    public static let minor: UInt16 = 0
}

/// Hard limits every reader checks before it allocates or loops.
public enum StreamLimits {
    /// Largest record body in bytes (8 MiB). A longer length is rejected before anything is read.
    public static let maxRecordBody: Int = 8 << 20
    /// Most pages one PAGE_BATCH may carry.
    public static let maxPagesPerBatch: Int = 1024
    /// Largest stream header in bytes.
    public static let maxStreamHeader: Int = 4096
    /// Longest name or message string in bytes (UTF-8).
    public static let maxString: Int = 4096
    /// Most ranges one MEMORY_LAYOUT may carry.
    public static let maxLayoutRanges: Int = 65536
    /// Page sizes a v1 stream may declare.
    public static let pageSizes: Set<UInt32> = [4096, 16384, 65536]
    /// Most disks one stream may describe (DISK_DESCRIPTOR records).
    public static let maxDisks: Int = 64
    /// Logical block sizes a disk may declare, bytes: offsets and lengths of its operations are
    /// multiples of it.
    public static let diskBlockSizes: Set<UInt32> = [512, 4096]
    /// Largest disk a stream may describe, bytes (64 PiB).
    public static let maxDiskBytes: UInt64 = 1 << 56
    /// Most data bytes one DISK_WRITE carries (4 MiB); a longer guest write travels as several.
    public static let maxDiskWriteBytes: Int = 4 << 20
    /// Longest disk name in bytes (UTF-8).
    public static let maxDiskName: Int = 255
    /// Default bound on the disk records one checkpoint may carry: the sum of their body lengths,
    /// bytes (1 GiB). A backup may set its own (`CheckpointValidator.maxDiskBytesPerCheckpoint`).
    public static let defaultMaxDiskBytesPerCheckpoint: UInt64 = 1 << 30
}

/// Record type codes (u32 on the wire).
public enum RecordType: UInt32, Sendable, CaseIterable {
    case checkpointBegin = 0x01
    case checkpointEnd = 0x02
    case pageBatch = 0x03
    case vcpuState = 0x04
    case deviceState = 0x05
    case clock = 0x06
    case memoryLayout = 0x07
    case opaquePayload = 0x08
    case domainConfig = 0x09
    case diskDescriptor = 0x0A
    case diskWrite = 0x0B
    case diskCommand = 0x0C
    case ack = 0x10
    case heartbeat = 0x11
    case streamEnd = 0x12
    case error = 0x13
}

/// Which hypervisor produced the stream.
public enum BackendKind: UInt16, Sendable, CaseIterable {
    case simulated = 1
    case xen = 2
}

/// Which end of the connection wrote the stream.
public enum StreamRole: UInt16, Sendable {
    /// Sends checkpoints and heartbeats.
    case primary = 1
    /// Sends acknowledgements and heartbeats.
    case backup = 2
}

/// Optional capabilities; a sender sets only bits the peer's header also set.
public struct StreamFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// PAGE_BATCH entries may use the delta encoding.
    public static let deltaPages = StreamFeatures(rawValue: 1 << 0)
    /// The stream may carry disks: DISK_DESCRIPTOR before the first checkpoint, DISK_WRITE and
    /// DISK_COMMAND inside checkpoints. A backup offers it only when it can replicate disks.
    public static let disks = StreamFeatures(rawValue: 1 << 1)
    /// Everything this build understands.
    public static let supported: StreamFeatures = [.deltaPages, .disks]
}

/// A 128-bit guest identity (a UUID), stored as two big-endian halves.
public struct GuestUUID: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64
    public init(high: UInt64, low: UInt64) { self.high = high; self.low = low }
    public static let zero = GuestUUID(high: 0, low: 0)
    public var description: String {
        let hex = String(high, radix: 16).leftPadded(to: 16) + String(low, radix: 16).leftPadded(to: 16)
        let c = Array(hex)
        return String(c[0..<8]) + "-" + String(c[8..<12]) + "-" + String(c[12..<16]) + "-"
            + String(c[16..<20]) + "-" + String(c[20..<32])
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// The first thing on every connection, in each direction.
public struct StreamHeader: Equatable, Sendable {
    public var major: UInt16
    public var minor: UInt16
    public var features: StreamFeatures
    /// Guest page size in bytes.
    public var pageSize: UInt32
    public var backend: BackendKind
    public var role: StreamRole
    public var guestUUID: GuestUUID
    /// The guest's name (UTF-8, at most 255 bytes).
    public var guestName: String
    /// The sending software's version, e.g. "remusd 0.1.0" (UTF-8, at most 255 bytes).
    public var senderVersion: String

    public init(
        major: UInt16 = StreamVersion.major, minor: UInt16 = StreamVersion.minor,
        features: StreamFeatures, pageSize: UInt32, backend: BackendKind, role: StreamRole,
        guestUUID: GuestUUID, guestName: String, senderVersion: String
    ) {
        self.major = major
        self.minor = minor
        self.features = features
        self.pageSize = pageSize
        self.backend = backend
        self.role = role
        self.guestUUID = guestUUID
        self.guestName = guestName
        self.senderVersion = senderVersion
    }
}

/// A checkpoint's epoch number. Epoch 0 is never a committed checkpoint; pre-copy rounds use it.
public typealias Epoch = UInt64

/// Page frame number: a guest-physical page index.
public typealias PFN = UInt64

/// What a checkpoint is for.
public enum CheckpointKind: UInt16, Sendable {
    /// A live pre-copy round of the initial synchronisation: not consistent, never activated alone.
    case precopy = 1
    /// A consistent checkpoint taken with the guest suspended.
    case checkpoint = 2
    /// The last checkpoint of a planned switchover: the backup activates right after committing it.
    case final = 3
}

/// CHECKPOINT_BEGIN body.
public struct CheckpointBegin: Equatable, Sendable {
    public var epoch: Epoch
    public var kind: CheckpointKind
    public init(epoch: Epoch, kind: CheckpointKind) { self.epoch = epoch; self.kind = kind }
}

/// CHECKPOINT_END body: the reader checks all three against what it received.
public struct CheckpointEnd: Equatable, Sendable {
    public var epoch: Epoch
    /// Records between BEGIN and END, not counting HEARTBEAT records.
    public var recordCount: UInt32
    /// CRC32C over the 16-byte record headers of those records, in order (see CheckpointDigest).
    public var digest: UInt32
    /// Sum of those records' body lengths in bytes.
    public var payloadBytes: UInt64
    public init(epoch: Epoch, recordCount: UInt32, digest: UInt32, payloadBytes: UInt64) {
        self.epoch = epoch
        self.recordCount = recordCount
        self.digest = digest
        self.payloadBytes = payloadBytes
    }
}

/// How one page travels in a PAGE_BATCH.
public enum PageEncoding: UInt8, Sendable, CaseIterable {
    /// The page's bytes, `pageSize` of them.
    case raw = 0
    /// The page is all zero bytes; no data.
    case zero = 1
    /// XOR against the last copy sent, run-length coded (see PageDelta); base is the receiver's latest copy.
    case delta = 2
    /// The page is not populated (ballooned out, never added); the receiver drops its copy.
    case absent = 3
}

/// VCPU_STATE body: one virtual CPU's registers in a backend-specific format.
public struct VCPUState: Equatable, Sendable {
    public var vcpu: UInt32
    /// Backend-specific format code (simulated guest: 1).
    public var format: UInt32
    public var bytes: [UInt8]
    public init(vcpu: UInt32, format: UInt32, bytes: [UInt8]) {
        self.vcpu = vcpu
        self.format = format
        self.bytes = bytes
    }
}

/// DEVICE_STATE body: a named opaque blob (e.g. "nic0", "disk0", "qemu").
public struct DeviceState: Equatable, Sendable {
    public var name: String
    public var bytes: [UInt8]
    public init(name: String, bytes: [UInt8]) { self.name = name; self.bytes = bytes }
}

/// CLOCK body: the guest's clocks and the host's at the moment of capture.
public struct ClockState: Equatable, Sendable {
    /// Guest monotonic clock in nanoseconds.
    public var guestMonotonicNs: UInt64
    /// Guest wall clock in nanoseconds since the Unix epoch.
    public var guestWallNs: Int64
    /// Guest TSC frequency in kHz (0 when the backend has none).
    public var tscKHz: UInt32
    /// Sender host's monotonic clock at capture, nanoseconds.
    public var hostMonotonicNs: UInt64
    /// Sender host's wall clock at capture, nanoseconds since the Unix epoch.
    public var hostWallNs: Int64
    public init(guestMonotonicNs: UInt64, guestWallNs: Int64, tscKHz: UInt32, hostMonotonicNs: UInt64, hostWallNs: Int64) {
        self.guestMonotonicNs = guestMonotonicNs
        self.guestWallNs = guestWallNs
        self.tscKHz = tscKHz
        self.hostMonotonicNs = hostMonotonicNs
        self.hostWallNs = hostWallNs
    }
}

/// A run of populated guest pages.
public struct PFNRange: Equatable, Hashable, Sendable {
    public var start: PFN
    public var count: UInt64
    public init(start: PFN, count: UInt64) { self.start = start; self.count = count }
    public var end: PFN { start + count }
}

/// MEMORY_LAYOUT body: the populated ranges, sorted, non-overlapping, non-adjacent.
public struct MemoryLayout: Equatable, Sendable {
    /// Increases whenever the guest adds or gives back pages.
    public var generation: UInt64
    public var ranges: [PFNRange]
    public init(generation: UInt64, ranges: [PFNRange]) { self.generation = generation; self.ranges = ranges }
    /// Number of populated pages.
    public var pageCount: UInt64 { ranges.reduce(0) { $0 + $1.count } }
}

/// Which foreign stream an OPAQUE_PAYLOAD chunk belongs to.
public enum OpaqueStream: UInt32, Sendable {
    /// libxenguest's migration stream (libxc v3 framing).
    case libxc = 1
    /// libxl's migration stream (libxl v2 framing).
    case libxl = 2
}

/// DOMAIN_CONFIG body: how to build the guest on the backup; sent before the first checkpoint.
public struct DomainConfig: Equatable, Sendable {
    public enum Format: UInt32, Sendable {
        /// libxl's JSON domain configuration.
        case libxlJSON = 1
        /// The simulated guest's parameters.
        case simulated = 2
    }
    public var format: Format
    public var bytes: [UInt8]
    public init(format: Format, bytes: [UInt8]) { self.format = format; self.bytes = bytes }
}

/// ACK body: the backup committed `epoch` (and every epoch before it).
public struct Ack: Equatable, Sendable {
    public var epoch: Epoch
    /// Backup host's monotonic clock when it committed, nanoseconds.
    public var backupMonotonicNs: UInt64
    public init(epoch: Epoch, backupMonotonicNs: UInt64) { self.epoch = epoch; self.backupMonotonicNs = backupMonotonicNs }
}

/// HEARTBEAT body, both directions.
public struct Heartbeat: Equatable, Sendable {
    public var sequence: UInt64
    /// Sender's monotonic clock, nanoseconds.
    public var senderMonotonicNs: UInt64
    public init(sequence: UInt64, senderMonotonicNs: UInt64) { self.sequence = sequence; self.senderMonotonicNs = senderMonotonicNs }
}

/// Why a stream ended on purpose.
public enum StreamEndReason: UInt32, Sendable {
    /// Protection stopped by the operator: the backup discards its image and does not activate.
    case plannedStop = 1
    /// Planned switchover: the backup activates from the final checkpoint.
    case switchover = 2
    /// The sender is shutting down (host maintenance); the backup keeps its image and waits.
    case shutdown = 3
    /// The sender hit an error it reports in the message.
    case error = 4
}

/// STREAM_END body.
public struct StreamEnd: Equatable, Sendable {
    public var reason: StreamEndReason
    /// The last epoch the sender completed (0 if none).
    public var lastEpoch: Epoch
    public var message: String
    public init(reason: StreamEndReason, lastEpoch: Epoch, message: String) {
        self.reason = reason
        self.lastEpoch = lastEpoch
        self.message = message
    }
}

/// ERROR body: the peer tells why it is about to close.
public struct PeerError: Equatable, Sendable {
    public var code: UInt32
    public var message: String
    public init(code: UInt32, message: String) { self.code = code; self.message = message }
}

/// DISK_DESCRIPTOR body: one replicated disk, described once per stream before the first
/// checkpoint. Disks are numbered 0, 1, 2, … in the order of their descriptors.
public struct DiskDescriptor: Equatable, Sendable {
    /// The disk's number in this stream (0-based, dense).
    public var disk: UInt32
    /// Logical block size in bytes (512 or 4096): every operation's offset and length is a multiple.
    public var blockSize: UInt32
    /// The disk's size in bytes, a positive multiple of `blockSize`.
    public var sizeBytes: UInt64
    /// The disk's name on the primary ("xvda", "disk0"): how the backup finds its image (UTF-8, 1…255 bytes).
    public var name: String
    public init(disk: UInt32, blockSize: UInt32, sizeBytes: UInt64, name: String) {
        self.disk = disk
        self.blockSize = blockSize
        self.sizeBytes = sizeBytes
        self.name = name
    }
}

/// DISK_WRITE body: the guest wrote `data` at `offset` of `disk` during the checkpoint's epoch.
public struct DiskWrite: Equatable, Sendable {
    public var disk: UInt32
    /// Byte offset on the disk, a multiple of its block size.
    public var offset: UInt64
    /// The bytes written: a positive multiple of the block size, at most `StreamLimits.maxDiskWriteBytes`.
    public var data: [UInt8]
    public init(disk: UInt32, offset: UInt64, data: [UInt8]) {
        self.disk = disk
        self.offset = offset
        self.data = data
    }
}

/// DISK_COMMAND body: a disk operation without data.
public struct DiskCommand: Equatable, Sendable {
    /// What the guest asked for.
    public enum Kind: UInt16, Sendable, CaseIterable {
        /// Make every earlier write of the disk durable (offset and length 0).
        case flush = 1
        /// The range's content is no longer needed; it reads as zeros afterwards (remusd's rule,
        /// so a replay is deterministic).
        case discard = 2
        /// The range reads as zeros.
        case writeZeroes = 3
    }
    public var disk: UInt32
    public var kind: Kind
    /// Byte offset of the range (0 for a flush), a multiple of the block size.
    public var offset: UInt64
    /// Bytes in the range (0 for a flush; otherwise a positive multiple of the block size).
    public var length: UInt64
    public init(disk: UInt32, kind: Kind, offset: UInt64, length: UInt64) {
        self.disk = disk
        self.kind = kind
        self.offset = offset
        self.length = length
    }
}

extension StreamHeader {
    /// The first 8 bytes of every stream ("\x89REMUS\r\n"): how a TLS listener names a peer that
    /// speaks the stream without TLS.
    public static var magic: [UInt8] { Wire.magic }
}
