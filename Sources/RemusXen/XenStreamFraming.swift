// The two framing levels of Xen's checkpointed migration stream, as far as remusd needs them
// (docs/specs/libxc-migration-stream.pandoc and libxl-migration-stream.pandoc in Xen's tree):
// where each checkpoint of libxenguest's stream ends, and the few libxl records remusd writes
// around it itself. The structs are private to Xen; these are our own definitions.

/// The libxl (v2) records remusd writes: the stream header, the record that hands the stream to
/// libxenguest, and the end of each checkpoint. A PV or PVH guest's checkpoint has no emulator
/// records; an HVM guest's carries its device model's (EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT).
public enum LibxlStream {
    /// libxl's stream header: ident "LibxlFmt", version 2, options 0, all big-endian (16 bytes).
    public static let header: [UInt8] = Array("LibxlFmt".utf8) + [0, 0, 0, 2] + [0, 0, 0, 0]

    /// LIBXC_CONTEXT (type 1, no body): libxenguest's stream follows.
    public static let libxcContext: [UInt8] = record(type: 1)

    /// CHECKPOINT_END (type 4, no body): the libxl records of a checkpoint end here.
    public static let checkpointEnd: [UInt8] = record(type: 4)

    /// Everything remusd writes before libxenguest's first byte.
    public static var preamble: [UInt8] { header + libxcContext }

    /// CHECKPOINT_END.
    static let checkpointEndType: UInt32 = 4

    /// A body-less record: type and length as little-endian u32s.
    static func record(type: UInt32) -> [UInt8] {
        withUnsafeBytes(of: type.littleEndian) { Array($0) } + [0, 0, 0, 0]
    }

    // MARK: HVM: the device model's records

    /// EMULATOR_XENSTORE_DATA: the device model's xenstore keys.
    public static let emulatorXenStoreDataType: UInt32 = 2
    /// EMULATOR_CONTEXT: the device model's saved state, opaque to libxl.
    public static let emulatorContextType: UInt32 = 3
    /// The emulator id of upstream QEMU ("qemu-xen"), the only device model remusd drives.
    public static let emulatorQEMUUpstream: UInt32 = 2

    /// One xenstore key of the device model, relative to
    /// `/local/domain/<dm domid>/device-model/<domid>/`, and its value.
    public struct XenStorePair: Sendable, Equatable {
        public var key: String
        public var value: String
        public init(key: String, value: String) {
            self.key = key
            self.value = value
        }
    }

    /// The device-model keys libxl saves with an HVM guest (libxl__save_emulator_xenstore_data):
    /// for each child of `physmap` (QEMU's record of guest-physical ranges it remapped, e.g.
    /// VRAM), its `start_addr`, `size` and `name`, in the listing's order. `read` reads a key
    /// relative to the device model's directory. No children, no pairs. A child without one of
    /// the three keys fails the save, as it does in libxl: the backup's QEMU would restore a
    /// mapping it cannot place.
    public static func emulatorXenStorePairs(
        physmapEntries: [String], read: (String) -> String?
    ) throws(XenBackendError) -> [XenStorePair] {
        var pairs: [XenStorePair] = []
        for entry in physmapEntries {
            for field in ["start_addr", "size", "name"] {
                let key = "physmap/\(entry)/\(field)"
                guard let value = read(key) else {
                    throw XenBackendError("the device model's xenstore key \(key) disappeared while it was read (physmap entry \(entry) has no \(field))")
                }
                pairs.append(XenStorePair(key: key, value: value))
            }
        }
        return pairs
    }

    /// EMULATOR_XENSTORE_DATA (type 2) for QEMU upstream: the emulator sub-header {id 2,
    /// index 0}, then each key and value NUL-terminated, padded to 8 bytes. Empty (no record at
    /// all, as libxl writes none) when there are no pairs. A value is cut at a NUL, as libxl's
    /// strlen would; keys are built by remusd and never hold one.
    public static func emulatorXenStoreData(_ pairs: [XenStorePair]) -> [UInt8] {
        guard !pairs.isEmpty else { return [] }
        var data: [UInt8] = []
        for pair in pairs {
            data += pair.key.utf8.prefix(while: { $0 != 0 }) + [0]
            data += pair.value.utf8.prefix(while: { $0 != 0 }) + [0]
        }
        return emulatorRecord(type: emulatorXenStoreDataType, data: data[...])
    }

    /// EMULATOR_CONTEXT (type 3) for QEMU upstream: the emulator sub-header {id 2, index 0},
    /// then QEMU's saved device state as it is, padded to 8 bytes.
    public static func emulatorContext(_ state: ArraySlice<UInt8>) -> [UInt8] {
        emulatorRecord(type: emulatorContextType, data: state)
    }

    /// A record with the emulator sub-header: `{u32 type, u32 length}` where length counts the
    /// sub-header and the data (not the padding), `{u32 emulator_id, u32 index}`, the data,
    /// zeros up to a multiple of 8. All little-endian (x86).
    static func emulatorRecord(type: UInt32, data: ArraySlice<UInt8>) -> [UInt8] {
        let length = 8 + data.count
        precondition(length <= Int(UInt32.max), "an emulator record over 4 GiB")
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8 + ((length + 7) & ~7))
        for field in [type, UInt32(length), emulatorQEMUUpstream, 0] {
            withUnsafeBytes(of: field.littleEndian) { bytes += $0 }
        }
        bytes += data
        bytes += repeatElement(0, count: (8 - length % 8) % 8)
        return bytes
    }

    // MARK: the end of a checkpoint

    /// Ends a checkpoint whose libxenguest records (up to and including its CHECKPOINT record)
    /// are in `checkpoint`: the device model's records follow, then CHECKPOINT_END — libxl's
    /// order (libxl_stream_write.c: EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT, CHECKPOINT_END),
    /// so the backup's libxl restore hands QEMU the state of the checkpoint it commits.
    /// `emulatorRecords` is empty for PV and PVH guests.
    static func endCheckpoint(_ checkpoint: inout [UInt8], emulatorRecords: [UInt8]) {
        checkpoint.append(contentsOf: emulatorRecords)
        checkpoint.append(contentsOf: checkpointEnd)
    }

    /// Checks that `bytes` are what a checkpoint of an HVM guest carries from its device model:
    /// at most one EMULATOR_XENSTORE_DATA, then one EMULATOR_CONTEXT, each `{u32 type, u32
    /// length}` (little-endian) with a body of at least emulator_id and index, padded to 8
    /// bytes, and nothing after. Anything else would make the backup's libxl misread the
    /// stream, so it never enters one.
    static func checkEmulatorRecords(_ bytes: [UInt8]) throws(LibxcStreamError) {
        func u32(_ at: Int) -> UInt32 {
            UInt32(bytes[at]) | UInt32(bytes[at + 1]) << 8 | UInt32(bytes[at + 2]) << 16 | UInt32(bytes[at + 3]) << 24
        }
        var at = 0
        var types: [UInt32] = []
        while at < bytes.count {
            guard bytes.count - at >= 8 else {
                throw LibxcStreamError(description: "device model records: \(bytes.count - at) bytes at offset \(at) are too short for a record header")
            }
            let type = u32(at)
            let length = Int(u32(at + 4))
            guard type == emulatorXenStoreDataType || type == emulatorContextType else {
                throw LibxcStreamError(description: "device model records: record type \(type) at offset \(at); only EMULATOR_XENSTORE_DATA (2) and EMULATOR_CONTEXT (3) belong there")
            }
            guard length >= 8 else {
                throw LibxcStreamError(description: "device model records: record type \(type) at offset \(at) has a \(length)-byte body, shorter than its emulator id and index")
            }
            let padded = (length + 7) & ~7
            guard padded <= bytes.count - at - 8 else {
                throw LibxcStreamError(description: "device model records: record type \(type) at offset \(at) claims \(length) bytes, but only \(bytes.count - at - 8) follow")
            }
            types.append(type)
            at += 8 + padded
        }
        guard types == [emulatorContextType] || types == [emulatorXenStoreDataType, emulatorContextType] else {
            throw LibxcStreamError(description: "device model records: types \(types); a checkpoint carries an optional EMULATOR_XENSTORE_DATA (2) then one EMULATOR_CONTEXT (3)")
        }
    }
}

/// libxenguest's stream does not follow its own format (garbage, or a library of another kind).
public struct LibxcStreamError: Error, Equatable, CustomStringConvertible {
    /// What was wrong, with the stream offset.
    public let description: String
}

/// Follows libxenguest's migration stream (libxc v3 framing) byte by byte and says where each
/// CHECKPOINT record ends: the primary cuts its checkpoints there, so that the backup hands
/// libxenguest whole checkpoints only.
///
/// Layout: a 24-byte image header (marker all ones, "XENF", version 3), a 16-byte domain
/// header, then records `{u32 type, u32 length}` (little-endian, as the image header's options
/// say for x86) with a body padded to 8 bytes.
public struct LibxcStreamFramer: Sendable {
    /// CHECKPOINT: the end of one checkpoint's records.
    static let checkpointType: UInt32 = 0x0e
    /// END: the end of the stream.
    static let endType: UInt32 = 0
    /// The specification's bound on a record body.
    static let maxBody = 128 << 20
    static let headersLength = 24 + 16

    /// Bytes followed so far.
    public private(set) var offset = 0
    /// CHECKPOINT records seen so far.
    public private(set) var checkpoints = 0
    /// Whether the END record has been seen.
    public private(set) var ended = false
    /// The start of the image or record header being read.
    private var pending: [UInt8] = []
    /// Body and padding bytes of the current record still to come.
    private var bodyLeft = 0
    /// The type of the record whose body is being skipped.
    private var type: UInt32 = 0

    public init() {}

    /// Follows `bytes`; returns how many it took, stopping just past a CHECKPOINT record (then
    /// `checkpoint` is true and the rest belongs to the next checkpoint) or at the end.
    public mutating func consume(_ bytes: UnsafeRawBufferPointer) throws(LibxcStreamError) -> (taken: Int, checkpoint: Bool) {
        var i = 0
        while i < bytes.count {
            if ended { throw LibxcStreamError(description: "bytes after the END record at stream offset \(offset)") }
            if offset + pending.count < Self.headersLength || (bodyLeft == 0 && offset >= Self.headersLength) {
                // Collecting the image headers (40 bytes) or a record header (8 bytes).
                let want = offset < Self.headersLength ? Self.headersLength - offset : 8
                let take = min(want - pending.count, bytes.count - i)
                pending += bytes[i..<(i + take)]
                i += take
                guard pending.count == want else { continue }
                if offset < Self.headersLength {
                    try checkHeaders(pending)
                } else {
                    let recordType = UInt32(pending[0]) | UInt32(pending[1]) << 8 | UInt32(pending[2]) << 16 | UInt32(pending[3]) << 24
                    let length = Int(UInt32(pending[4]) | UInt32(pending[5]) << 8 | UInt32(pending[6]) << 16 | UInt32(pending[7]) << 24)
                    guard length <= Self.maxBody else {
                        throw LibxcStreamError(description: "record type \(recordType) at stream offset \(offset) claims \(length) bytes, over the format's 128 MiB bound")
                    }
                    type = recordType
                    bodyLeft = (length + 7) & ~7
                }
                offset += want
                pending.removeAll(keepingCapacity: true)
                if offset > Self.headersLength && bodyLeft == 0, let done = recordDone() { return (i, done) }
            } else {
                let take = min(bodyLeft, bytes.count - i)
                bodyLeft -= take
                offset += take
                i += take
                if bodyLeft == 0, let done = recordDone() { return (i, done) }
            }
        }
        return (i, false)
    }

    /// A whole record went by: nil to go on, or whether it was a CHECKPOINT (true) or END.
    private mutating func recordDone() -> Bool? {
        switch type {
        case Self.checkpointType:
            checkpoints += 1
            return true
        case Self.endType:
            ended = true
            return false
        default:
            return nil
        }
    }

    private func checkHeaders(_ h: [UInt8]) throws(LibxcStreamError) {
        guard h[0..<8].allSatisfy({ $0 == 0xff }), Array(h[8..<12]) == Array("XENF".utf8) else {
            throw LibxcStreamError(description: "no libxc image header at the stream's start (want marker ff×8 and \"XENF\")")
        }
        let version = UInt32(h[12]) << 24 | UInt32(h[13]) << 16 | UInt32(h[14]) << 8 | UInt32(h[15])
        guard version == 3 else { throw LibxcStreamError(description: "libxc stream version \(version); remusd follows version 3 (Xen 4.17)") }
        // Options bit 0: the records are big-endian. x86 streams are little-endian.
        guard h[17] & 1 == 0 else { throw LibxcStreamError(description: "big-endian libxc stream; remusd follows little-endian (x86) streams only") }
    }
}
