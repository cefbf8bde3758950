import FoundationEssentials

// QMP speaks JSON, one message per line. Replies are parsed by FoundationEssentials' JSON
// decoder (nested objects, escapes, numbers) into `QMPValue`; requests are a handful of small
// shapes, written by `QMPValue.json` so the bytes on the wire are ours and predictable.

/// A JSON value as QMP carries it: a command's arguments, a reply's `return`, an event.
public enum QMPValue: Sendable, Equatable, CustomStringConvertible {
    case null
    case bool(Bool)
    /// Integers up to 64 bits (QEMU's counters, sizes, fdset ids).
    case integer(Int64)
    /// Numbers with a fraction or out of Int64's range.
    case double(Double)
    case string(String)
    case array([QMPValue])
    case object([String: QMPValue])

    /// The member `key` of an object; nil for a missing member or a value that is not an object.
    public subscript(key: String) -> QMPValue? {
        if case .object(let members) = self { return members[key] } else { return nil }
    }

    /// The text of a string value.
    public var stringValue: String? {
        if case .string(let text) = self { return text } else { return nil }
    }

    /// The members of an object value.
    public var objectValue: [String: QMPValue]? {
        if case .object(let members) = self { return members } else { return nil }
    }

    /// The value as compact JSON text; object members sorted by key, so equal values read the same.
    public var json: String {
        var out = ""
        write(to: &out)
        return out
    }

    public var description: String { json }

    private func write(to out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let value): out += value ? "true" : "false"
        case .integer(let value): out += String(value)
        case .double(let value): out += value.isFinite ? "\(value)" : "null"
        case .string(let text): Self.writeString(text, to: &out)
        case .array(let items):
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += "," }
                item.write(to: &out)
            }
            out += "]"
        case .object(let members):
            out += "{"
            for (i, key) in members.keys.sorted().enumerated() {
                if i > 0 { out += "," }
                Self.writeString(key, to: &out)
                out += ":"
                members[key]!.write(to: &out)
            }
            out += "}"
        }
    }

    /// A JSON string: quotes, backslashes and control characters escaped (RFC 8259 §7), so no
    /// argument can end the request line early or smuggle a second command.
    private static func writeString(_ text: String, to out: inout String) {
        out += "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }

    /// Parses one JSON text (one QMP message); nil when it is not valid JSON.
    public static func parse(_ bytes: [UInt8]) -> QMPValue? {
        try? JSONDecoder().decode(QMPValue.self, from: Data(bytes))
    }
}

extension QMPValue: Decodable {
    public init(from decoder: any Decoder) throws {
        if var items = try? decoder.unkeyedContainer() {
            var values: [QMPValue] = []
            while !items.isAtEnd { values.append(try items.decode(QMPValue.self)) }
            self = .array(values)
            return
        }
        if let members = try? decoder.container(keyedBy: AnyKey.self) {
            var values: [String: QMPValue] = [:]
            for key in members.allKeys { values[key.stringValue] = try members.decode(QMPValue.self, forKey: key) }
            self = .object(values)
            return
        }
        let single = try decoder.singleValueContainer()
        if single.decodeNil() {
            self = .null
        } else if let value = try? single.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? single.decode(Int64.self) {
            self = .integer(value)
        } else if let value = try? single.decode(Double.self) {
            self = .double(value)
        } else {
            self = .string(try single.decode(String.self))
        }
    }

    /// Any member name of a JSON object.
    private struct AnyKey: CodingKey {
        let stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
