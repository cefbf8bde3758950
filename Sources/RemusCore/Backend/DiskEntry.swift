// One disk operation in the one layout remusd keeps it in: on the primary in the epoch's journal
// (`DiskOperations`), on the backup in the epoch's staging memory, its spill file and the redo log.

/// The 24-byte header of a staged disk operation, followed (for a write) by its data padded to 8.
///
/// | offset | size | field |
/// | ---: | ---: | --- |
/// | 0 | 2 | kind: 0 write, 1 flush, 2 discard, 3 write zeroes (DISK_COMMAND's codes) |
/// | 2 | 2 | reserved, 0 |
/// | 4 | 4 | disk number |
/// | 8 | 8 | byte offset on the disk |
/// | 16 | 8 | length: data bytes of a write, bytes of a discard or write-zeroes range, 0 for a flush |
public struct DiskEntry: Equatable, Sendable {
    /// Bytes of the header.
    public static let headerBytes = 24

    /// What the entry does.
    public enum Kind: UInt16, Sendable {
        case write = 0
        case flush = 1
        case discard = 2
        case writeZeroes = 3
    }

    public var kind: Kind
    public var disk: UInt32
    public var offset: UInt64
    public var length: UInt64

    public init(kind: Kind, disk: UInt32, offset: UInt64, length: UInt64) {
        self.kind = kind
        self.disk = disk
        self.offset = offset
        self.length = length
    }

    /// The entry of a DISK_COMMAND.
    public init(_ command: DiskCommand) {
        let kind: Kind
        switch command.kind {
        case .flush: kind = .flush
        case .discard: kind = .discard
        case .writeZeroes: kind = .writeZeroes
        }
        self.init(kind: kind, disk: command.disk, offset: command.offset, length: command.length)
    }

    /// Bytes of data that follow the header on storage (a write's data padded to 8).
    public var storedDataBytes: Int { kind == .write ? (Int(length) + 7) & ~7 : 0 }

    /// The 24 header bytes.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.headerBytes)
        out.withUnsafeMutableBytes { p in
            p.storeBytes(of: kind.rawValue.littleEndian, toByteOffset: 0, as: UInt16.self)
            p.storeBytes(of: disk.littleEndian, toByteOffset: 4, as: UInt32.self)
            p.storeBytes(of: offset.littleEndian, toByteOffset: 8, as: UInt64.self)
            p.storeBytes(of: length.littleEndian, toByteOffset: 16, as: UInt64.self)
        }
        return out
    }

    /// Parses 24 header bytes; nil when the kind or the reserved field is not what we write.
    public init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= Self.headerBytes,
              let kind = Kind(rawValue: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt16.self))),
              bytes.loadUnaligned(fromByteOffset: 2, as: UInt16.self) == 0 else { return nil }
        self.kind = kind
        disk = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        offset = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        length = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
    }
}
