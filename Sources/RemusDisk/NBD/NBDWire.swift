// The NBD protocol's numbers and byte layouts (NetworkBlockDevice/nbd doc/proto.md): the fixed
// newstyle handshake, option haggling with NBD_OPT_GO, and simple replies in transmission.
// Everything is big-endian on the wire.

/// Constants of the NBD protocol that remusd's server speaks.
/// `package` (and the members a client needs): remusd's disk-server benchmark speaks the client's side.
package enum NBD {
    /// "NBDMAGIC", the server's first 8 bytes.
    static let serverMagic: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": the newstyle magic, and the start of every option the client sends.
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    /// The start of every option reply.
    static let optionReplyMagic: UInt64 = 0x0003_E889_0455_65A9
    static let requestMagic: UInt32 = 0x2560_9513
    package static let simpleReplyMagic: UInt32 = 0x6744_6698

    /// Handshake flags (server) and client flags.
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    static let clientFlagNoZeroes: UInt32 = 1 << 1

    /// Transmission flags.
    static let hasFlags: UInt16 = 1 << 0
    static let sendFlush: UInt16 = 1 << 2
    static let sendFUA: UInt16 = 1 << 3
    static let sendTrim: UInt16 = 1 << 5
    static let sendWriteZeroes: UInt16 = 1 << 6

    /// Options.
    static let optExportName: UInt32 = 1
    static let optAbort: UInt32 = 2
    static let optInfo: UInt32 = 6
    static let optGo: UInt32 = 7

    /// Option reply types.
    static let repAck: UInt32 = 1
    static let repInfo: UInt32 = 3
    static let repErrUnsupported: UInt32 = 0x8000_0001
    static let repErrInvalid: UInt32 = 0x8000_0003
    static let repErrUnknown: UInt32 = 0x8000_0006

    /// Information types.
    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    /// Commands and their flags.
    package static let cmdRead: UInt16 = 0
    package static let cmdWrite: UInt16 = 1
    package static let cmdDisconnect: UInt16 = 2
    static let cmdFlush: UInt16 = 3
    static let cmdTrim: UInt16 = 4
    static let cmdWriteZeroes: UInt16 = 6
    static let cmdFlagFUA: UInt16 = 1 << 0

    /// Error values of replies.
    static let errPermission: UInt32 = 1
    static let errIO: UInt32 = 5
    static let errInvalid: UInt32 = 22
    static let errNoSpace: UInt32 = 28
    static let errNotSupported: UInt32 = 95

    /// A request header: magic, flags, type, handle, offset, length.
    static let requestBytes = 28
}

/// Big-endian building of handshake and reply messages.
package struct NBDBytes {
    private(set) var bytes: [UInt8] = []

    mutating func u16(_ v: UInt16) { bytes += [UInt8(v >> 8), UInt8(v & 0xFF)] }
    mutating func u32(_ v: UInt32) { for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(shift)) & 0xFF)) } }
    mutating func u64(_ v: UInt64) { for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(shift)) & 0xFF)) } }
    mutating func raw(_ b: [UInt8]) { bytes += b }

    /// An option reply: magic, the option answered, reply type, length, data.
    static func optionReply(option: UInt32, type: UInt32, data: [UInt8] = []) -> [UInt8] {
        var m = NBDBytes()
        m.u64(NBD.optionReplyMagic)
        m.u32(option)
        m.u32(type)
        m.u32(UInt32(data.count))
        m.raw(data)
        return m.bytes
    }

    /// A transmission-phase request header, as a client sends it (a write's data follows it).
    package static func request(type: UInt16, handle: UInt64, offset: UInt64, length: UInt32, flags: UInt16 = 0) -> [UInt8] {
        var m = NBDBytes()
        m.u32(NBD.requestMagic)
        m.u16(flags)
        m.u16(type)
        m.u64(handle)
        m.u64(offset)
        m.u32(length)
        return m.bytes
    }

    /// A simple reply's header: magic, error, handle (read data follows it on success).
    static func simpleReply(handle: UInt64, error: UInt32) -> [UInt8] {
        var m = NBDBytes()
        m.u32(NBD.simpleReplyMagic)
        m.u32(error)
        m.u64(handle)
        return m.bytes
    }
}

/// Big-endian reading of what the client sent, never past its end.
package struct NBDReader {
    let bytes: [UInt8]
    private(set) var position = 0
    package init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - position }

    mutating func u16() -> UInt16? { take(2).map { $0.reduce(0) { $0 << 8 | UInt16($1) } } }
    package mutating func u32() -> UInt32? { take(4).map { $0.reduce(0) { $0 << 8 | UInt32($1) } } }
    package mutating func u64() -> UInt64? { take(8).map { $0.reduce(0) { $0 << 8 | UInt64($1) } } }
    mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard n >= 0, remaining >= n else { return nil }
        defer { position += n }
        return bytes[position..<position + n]
    }
}

/// One transmission-phase request header.
struct NBDRequest: Equatable {
    var flags: UInt16
    var type: UInt16
    var handle: UInt64
    var offset: UInt64
    var length: UInt32

    /// Parses the 28-byte header; nil when the magic is wrong (the stream is not NBD or lost sync).
    init?(header: [UInt8]) {
        var r = NBDReader(header)
        guard header.count == NBD.requestBytes, r.u32() == NBD.requestMagic,
              let flags = r.u16(), let type = r.u16(), let handle = r.u64(), let offset = r.u64(), let length = r.u32() else { return nil }
        self.flags = flags
        self.type = type
        self.handle = handle
        self.offset = offset
        self.length = length
    }
}
