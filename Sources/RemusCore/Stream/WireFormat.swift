// Byte-level facts of stream format v1 shared by the encoder, the decoder and the validator:
// constants, little-endian loads and stores, the CRC32C entry point, the 16-byte record header and
// the per-type length rules. Docs/stream-format.md is the specification; this file mirrors it.
import CCRC32C

enum Wire {
    /// "\x89REMUS\r\n": the high byte catches 7-bit channels, CR LF catches newline translation.
    static let magic: [UInt8] = [0x89, 0x52, 0x45, 0x4D, 0x55, 0x53, 0x0D, 0x0A]
    /// Bytes of the stream header before the two strings.
    static let headerFixedBytes = 52
    /// Smallest valid stream header: fixed fields, empty strings, CRC, rounded to 8.
    static let headerMinimumBytes = 56
    /// Bytes of a PAGE_BATCH body before its index (count, reserved).
    static let batchPrefixBytes = 8
    /// Bytes of one PAGE_BATCH index entry.
    static let batchEntryBytes = 16
    /// PFNs occupy bits 0–51 of an index entry's first word; bits 52–59 are zero.
    static let pfnLimit: UInt64 = 1 << 52
    /// Longest guest name or sender version in the stream header, bytes.
    static let maxHeaderString = 255
    /// Extra bytes a fixed-size record body may carry for trailing fields of later minors.
    static let trailingAllowance = 4096
    /// Largest VCPU_STATE and DOMAIN_CONFIG payload, bytes.
    static let maxSmallBlob = 1 << 20
}

/// Rounds `n` up to a multiple of 8.
@inline(__always)
func align8(_ n: Int) -> Int { (n + 7) & ~7 }

extension UnsafeRawPointer {
    /// The little-endian integer at `offset`, any alignment.
    @inline(__always)
    func le<T: FixedWidthInteger>(_ offset: Int, as type: T.Type = T.self) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension UnsafeMutableRawPointer {
    /// Stores `value` little-endian at `offset`, any alignment.
    @inline(__always)
    func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }
}

extension Array where Element == UInt8 {
    /// Appends `value` little-endian.
    @inline(__always)
    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    /// Appends zero bytes up to the next multiple of 8 of `count`.
    @inline(__always)
    mutating func padTo8() {
        let pad = align8(count) - count
        if pad > 0 { append(contentsOf: repeatElement(0, count: pad)) }
    }
}

/// CRC32C (Castagnoli), the checksum of every record and of the checkpoint digest (and of the
/// backup's disk redo log).
public enum CRC32C {
    /// Extends `crc` (0 to start) over `count` bytes at `start`.
    @inline(__always)
    static func extend(_ crc: UInt32, _ start: UnsafeRawPointer, _ count: Int) -> UInt32 {
        count == 0 ? crc : remus_crc32c_extend(crc, start, count)
    }

    /// Extends `crc` (0 to start) over `bytes`.
    @inline(__always)
    public static func extend(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return remus_crc32c_extend(crc, base, bytes.count)
    }

    /// The register (no inversion) that `bytes` leave when it starts at 0: what a page's data
    /// adds to any CRC that extends over it, computed once (see `extend(_:register:shift:)`).
    public static func register(of bytes: UnsafeRawBufferPointer) -> UInt32 {
        ~extend(0xFFFF_FFFF, bytes)
    }

    /// Extends `crc` over bytes whose `register(of:)` is `register`, without reading them:
    /// CRC32C is linear, so the register after them is `shift` (the bytes' length) applied to
    /// the register before, XOR what the bytes alone leave.
    @inline(__always)
    public static func extend(_ crc: UInt32, register: UInt32, shift: Shift) -> UInt32 {
        ~(shift.apply(~crc) ^ register)
    }

    /// The linear map "run the register over `length` zero bytes", as four byte tables
    /// (applied with four lookups instead of `length` bytes of work).
    public struct Shift: Sendable {
        /// Bytes the map runs the register over.
        public let length: Int
        private let tables: [UInt32]

        public init(length: Int) {
            self.length = length
            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: max(length, 1), alignment: 64)
            defer { zeros.deallocate() }
            zeros.initializeMemory(as: UInt8.self, repeating: 0)
            let span = UnsafeRawBufferPointer(rebasing: zeros[0..<length])
            // The image of each register bit; a register's image is the XOR of its bits' images.
            let basis = (0..<32).map { bit in ~extend(~(UInt32(1) << bit), span) }
            var tables = [UInt32](repeating: 0, count: 4 * 256)
            for k in 0..<4 {
                for b in 0..<256 {
                    var v: UInt32 = 0
                    for j in 0..<8 where b & (1 << j) != 0 { v ^= basis[8 * k + j] }
                    tables[k * 256 + b] = v
                }
            }
            self.tables = tables
        }

        /// The register after `length` zero bytes, starting from `register`.
        @inline(__always)
        public func apply(_ register: UInt32) -> UInt32 {
            tables[Int(register & 0xFF)] ^ tables[256 + Int((register >> 8) & 0xFF)]
                ^ tables[512 + Int((register >> 16) & 0xFF)] ^ tables[768 + Int(register >> 24)]
        }
    }

    /// Whether the crc32 instruction computes CRCs in this process (false: no SSE4.2, or it ran
    /// over 2x slower than the table when timed at the first use, as under an emulator).
    public static var usesInstruction: Bool { remus_crc32c_hardware() != 0 }

    /// The rule of that timing: the table is taken when it ran over 2x faster than the instruction.
    static func prefersTable(instructionNs: UInt64, tableNs: UInt64) -> Bool {
        remus_crc32c_prefers_table(instructionNs, tableNs) != 0
    }

    /// The same CRC from the table path whatever the CPU (the tests' oracle for the fast path).
    static func extendPortable(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return remus_crc32c_extend_portable(crc, base, bytes.count)
    }
}

/// A record's 16-byte header as it travels: type u32, flags u16, reserved u16 (always 0),
/// body length u32, CRC32C u32 over header bytes 0..<12 followed by the body.
public struct RecordHeader: Equatable, Hashable, Sendable {
    /// Size of a record header in bytes.
    public static let size = 16
    /// Flag bit 0: a reader that does not know the record's type must reject the stream.
    public static let mandatoryFlag: UInt16 = 1

    /// The type code on the wire (may name a type this build does not know).
    public var typeCode: UInt32
    /// Flag bits; v1 defines only `mandatoryFlag`.
    public var flags: UInt16
    /// Body length in bytes, without the padding to 8.
    public var bodyLength: UInt32
    /// CRC32C over header bytes 0..<12 and the body.
    public var crc: UInt32

    /// A header with the given fields (the reserved field is always 0).
    public init(typeCode: UInt32, flags: UInt16, bodyLength: UInt32, crc: UInt32) {
        self.typeCode = typeCode
        self.flags = flags
        self.bodyLength = bodyLength
        self.crc = crc
    }

    /// The record type, nil when this build does not know the code.
    public var type: RecordType? { RecordType(rawValue: typeCode) }
    /// Whether the MANDATORY flag is set.
    public var isMandatory: Bool { flags & Self.mandatoryFlag != 0 }
    /// Bytes the record occupies on the wire: header, body and padding.
    public var wireBytes: Int { Self.size + align8(Int(bodyLength)) }

    /// Calls `body` with the 16 header bytes exactly as written.
    @inline(__always)
    func withWireBytes<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        // Two little-endian words laid out in memory are the header's bytes in order.
        let words = (
            (UInt64(typeCode) | UInt64(flags) << 32).littleEndian,
            (UInt64(bodyLength) | UInt64(crc) << 32).littleEndian
        )
        return Swift.withUnsafeBytes(of: words, body)
    }

    /// Writes the 16 header bytes at `p`.
    @inline(__always)
    func write(to p: UnsafeMutableRawPointer) {
        p.storeLE(typeCode, at: 0)
        p.storeLE(flags, at: 4)
        p.storeLE(UInt16(0), at: 6)
        p.storeLE(bodyLength, at: 8)
        p.storeLE(crc, at: 12)
    }

    /// The CRC of header bytes 0..<12 (the start of every record CRC).
    @inline(__always)
    static func crcOfFields(typeCode: UInt32, flags: UInt16, bodyLength: UInt32) -> UInt32 {
        let words = (
            (UInt64(typeCode) | UInt64(flags) << 32).littleEndian,
            UInt64(bodyLength).littleEndian
        )
        return Swift.withUnsafeBytes(of: words) { CRC32C.extend(0, UnsafeRawBufferPointer(rebasing: $0[0..<12])) }
    }
}

extension RecordType {
    /// The record's name in the specification, used in error messages ("PAGE_BATCH").
    public var wireName: String {
        switch self {
        case .checkpointBegin: return "CHECKPOINT_BEGIN"
        case .checkpointEnd: return "CHECKPOINT_END"
        case .pageBatch: return "PAGE_BATCH"
        case .vcpuState: return "VCPU_STATE"
        case .deviceState: return "DEVICE_STATE"
        case .clock: return "CLOCK"
        case .memoryLayout: return "MEMORY_LAYOUT"
        case .opaquePayload: return "OPAQUE_PAYLOAD"
        case .domainConfig: return "DOMAIN_CONFIG"
        case .diskDescriptor: return "DISK_DESCRIPTOR"
        case .diskWrite: return "DISK_WRITE"
        case .diskCommand: return "DISK_COMMAND"
        case .ack: return "ACK"
        case .heartbeat: return "HEARTBEAT"
        case .streamEnd: return "STREAM_END"
        case .error: return "ERROR"
        }
    }

    /// Bytes of the fields v1 defines at the start of the body; a shorter body is malformed.
    public var minimumBody: Int {
        switch self {
        case .checkpointBegin: return 16
        case .checkpointEnd: return 24
        case .pageBatch: return Wire.batchPrefixBytes + Wire.batchEntryBytes
        case .vcpuState, .deviceState, .opaquePayload, .domainConfig, .error: return 8
        case .clock: return 40
        case .memoryLayout: return 16
        case .ack, .heartbeat: return 16
        case .streamEnd: return 24
        case .diskDescriptor: return 24
        case .diskWrite: return 16
        case .diskCommand: return 24
        }
    }

    /// Largest body a reader accepts for this type, in bytes (never above
    /// `StreamLimits.maxRecordBody`); checked before anything is allocated or read.
    /// - Parameter pageSize: the stream's page size in bytes (sizes PAGE_BATCH).
    public func maximumBody(pageSize: Int) -> Int {
        let limit: Int
        switch self {
        case .checkpointBegin, .checkpointEnd, .clock, .ack, .heartbeat, .diskCommand:
            limit = minimumBody + Wire.trailingAllowance
        case .diskDescriptor:
            limit = minimumBody + StreamLimits.maxDiskName + Wire.trailingAllowance
        case .diskWrite:
            limit = minimumBody + StreamLimits.maxDiskWriteBytes + Wire.trailingAllowance
        case .pageBatch:
            limit = Wire.batchPrefixBytes + StreamLimits.maxPagesPerBatch * (Wire.batchEntryBytes + pageSize)
                + Wire.trailingAllowance
        case .vcpuState, .domainConfig:
            limit = 8 + Wire.maxSmallBlob
        case .deviceState, .opaquePayload:
            limit = StreamLimits.maxRecordBody
        case .memoryLayout:
            limit = 16 + 16 * StreamLimits.maxLayoutRanges + Wire.trailingAllowance
        case .streamEnd:
            limit = 24 + StreamLimits.maxString + Wire.trailingAllowance
        case .error:
            limit = 8 + StreamLimits.maxString + Wire.trailingAllowance
        }
        return min(limit, StreamLimits.maxRecordBody)
    }
}
