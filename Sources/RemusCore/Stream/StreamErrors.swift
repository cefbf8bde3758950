// Typed errors of the stream codec. A decode error names the record and the stream offset, says
// what was wrong with numbers, and what was kept safe (I8): nothing of a rejected record is used.

/// Why a stream (or one record of it) was rejected by `StreamDecoder` or `CheckpointValidator`.
///
/// Once a decoder throws, the stream is unusable from that point: the connection must be closed;
/// checkpoints committed before it stay committed, the open one is discarded.
public struct StreamDecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of defect was found.
    public enum Kind: String, Sendable, CaseIterable {
        /// The first bytes are not "\x89REMUS\r\n": not a remusd stream at all.
        case badMagic
        /// A major version this build does not read.
        case unsupportedMajor
        /// The stream header is malformed (length, CRC, page size, role, strings, features).
        case badHeader
        /// A record header has unknown flag bits, a non-zero reserved field, or a known type
        /// without the MANDATORY flag.
        case badRecordHeader
        /// A record type this build does not know, marked mandatory.
        case unknownMandatoryRecord
        /// A body length above `StreamLimits.maxRecordBody` or the type's own limit.
        case lengthOverLimit
        /// The record's CRC32C does not match its header and body.
        case crcMismatch
        /// The input ended in the middle of the stream header or of a record.
        case truncated
        /// The body does not have the layout of its type (short, bad counts, bad order inside,
        /// unknown enumeration values, invalid UTF-8, malformed delta).
        case malformedBody
        /// Padding after a body or inside it is not zero.
        case nonZeroPadding
        /// A record that is not allowed at this point of the stream.
        case outOfOrder
        /// An epoch that does not follow the rules (BEGIN not last + 1, END not BEGIN's).
        case epochMismatch
        /// CHECKPOINT_END's digest differs from the records received.
        case digestMismatch
        /// CHECKPOINT_END's record count or payload bytes differ from the records received.
        case countMismatch
        /// A checkpoint ended without a record it must contain (CLOCK, MEMORY_LAYOUT).
        case missingRecord
        /// A record that may appear once per checkpoint appeared again.
        case duplicateRecord
    }

    /// What kind of defect was found.
    public var kind: Kind
    /// The type code of the record concerned (nil for the stream header or a partial header).
    public var typeCode: UInt32?
    /// Stream offset in bytes of the record (or stream header) concerned.
    public var offset: UInt64
    /// What was wrong, with the numbers seen.
    public var detail: String

    /// An error of `kind` about the record with `typeCode` (nil: stream header or partial record
    /// header) at stream `offset` bytes.
    public init(_ kind: Kind, typeCode: UInt32?, offset: UInt64, _ detail: String) {
        self.kind = kind
        self.typeCode = typeCode
        self.offset = offset
        self.detail = detail
    }

    /// The record type concerned, when known to this build.
    public var recordType: RecordType? { typeCode.flatMap(RecordType.init(rawValue:)) }

    /// What the error is about, as it reads at the start of the description.
    public var subject: String {
        switch kind {
        case .badMagic, .unsupportedMajor, .badHeader: return "stream header"
        default:
            // Records start after the stream header, so offset 0 without a type is the header.
            guard let typeCode else { return offset == 0 ? "stream header" : "record header" }
            return RecordType(rawValue: typeCode)?.wireName ?? "record type \(hex(typeCode))"
        }
    }

    /// E.g. "PAGE_BATCH at stream offset 81920: CRC32C mismatch (expected 0x…, computed 0x…);
    /// record rejected".
    public var description: String {
        let consequence: String
        switch kind {
        case .badMagic, .unsupportedMajor, .badHeader: consequence = "stream rejected"
        case .digestMismatch, .countMismatch, .missingRecord:
            consequence = "checkpoint discarded, last committed checkpoint kept"
        case .truncated: consequence = "incomplete record discarded"
        default: consequence = "record rejected"
        }
        return "\(subject) at stream offset \(offset): \(detail); \(consequence)"
    }
}

/// Why the encoder refused to write a record: a value the format cannot carry.
public struct StreamEncodeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The record that could not be written.
    public var recordType: RecordType?
    /// What was wrong, with the numbers.
    public var detail: String

    /// An error about `recordType` (nil: the stream header).
    public init(_ recordType: RecordType?, _ detail: String) {
        self.recordType = recordType
        self.detail = detail
    }

    /// "cannot encode PAGE_BATCH: …".
    public var description: String {
        "cannot encode \(recordType?.wireName ?? "stream header"): \(detail)"
    }
}

/// "0x" followed by `value` in hexadecimal, zero-padded to its width.
func hex<T: FixedWidthInteger>(_ value: T) -> String {
    let digits = String(value, radix: 16)
    let width = T.bitWidth / 4
    return "0x" + String(repeating: "0", count: max(0, width - digits.count)) + digits
}
