import FoundationEssentials

// The few messages of etcd's v3 JSON gateway the witness exchanges, as Codable values. Keys and
// values travel base64-encoded; 64-bit integers travel as strings (protobuf's JSON mapping), and
// every zero value is omitted from replies. What a reply may make us hold is bounded before any
// of this runs: `HTTPResponseParser` refuses bodies over `maxBodyBytes`.

/// A 64-bit integer that etcd writes as a string ("7") or, from older gateways, a number (7).
struct EtcdInteger: Codable, Equatable, Sendable {
    var value: Int64
    init(_ value: Int64) { self.value = value }

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let text = try? container.decode(String.self) {
            guard let value = Int64(text) else {
                throw DecodingError.dataCorruptedError(in: container, debugDescription: "'\(text.prefix(40))' is not an integer")
            }
            self.value = value
        } else if let value = try? container.decode(Int64.self) {
            self.value = value
        } else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "not an integer")
        }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(String(value))
    }
}

// MARK: - Requests

struct EtcdLeaseGrantRequest: Encodable {
    var TTL: EtcdInteger
}

struct EtcdLeaseRequest: Encodable {
    var ID: EtcdInteger
}

struct EtcdKeyRequest: Encodable {
    /// base64
    var key: String
}

struct EtcdTxnRequest: Encodable {
    struct Compare: Encodable {
        var target: String
        var result = "EQUAL"
        var key: String
        var create_revision: EtcdInteger?
        var value: String?
        var lease: EtcdInteger?
    }
    struct Put: Encodable {
        var key: String
        var value: String
        var lease: EtcdInteger
    }
    struct Operation: Encodable {
        var request_put: Put
    }
    var compare: [Compare]
    var success: [Operation]?
}

// MARK: - Replies

/// Every reply the witness reads, with only the fields it looks at (all optional: etcd omits
/// zero values, and one shape serves range, txn, lease and error replies).
struct EtcdReply: Decodable, Sendable {
    struct Header: Decodable, Sendable {
        var revision: EtcdInteger?
    }
    struct KeyValue: Decodable, Sendable {
        var key: String?
        /// base64; omitted when empty.
        var value: String?
        /// Omitted when 0 (no lease).
        var lease: EtcdInteger?
    }
    /// A keepalive's streamed message: `{"result":{"header":…,"ID":…,"TTL":…}}`.
    struct KeepAlive: Decodable, Sendable {
        var header: Header?
        var ID: EtcdInteger?
        var TTL: EtcdInteger?
    }
    /// A unary call's error is text beside `code` and `message`; a streamed call's is an object.
    enum ErrorField: Decodable, Sendable {
        case text(String)
        case detail(httpCode: Int64?, message: String?)

        private enum Keys: String, CodingKey { case http_code, message }

        init(from decoder: any Decoder) throws {
            if let text = try? decoder.singleValueContainer().decode(String.self) {
                self = .text(text)
                return
            }
            let object = try decoder.container(keyedBy: Keys.self)
            self = .detail(httpCode: try object.decodeIfPresent(EtcdInteger.self, forKey: .http_code)?.value,
                           message: try object.decodeIfPresent(String.self, forKey: .message))
        }

        var message: String? {
            switch self {
            case .text(let text): text
            case .detail(_, let message): message
            }
        }
    }

    var header: Header?
    var ID: EtcdInteger?
    var TTL: EtcdInteger?
    var succeeded: Bool?
    var kvs: [KeyValue]?
    var result: KeepAlive?
    var error: ErrorField?
    var message: String?
    var code: EtcdInteger?
}

/// JSON in and out of the gateway, and the base64 of keys and values.
enum EtcdCodec {
    /// Request bodies, members in key order so a request's bytes are reproducible.
    static func encode(_ request: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Our request types hold strings and integers only: encoding them cannot fail.
        guard let data = try? encoder.encode(request) else { preconditionFailure("an etcd request did not encode") }
        return [UInt8](data)
    }

    /// The reply in `body`; for a streamed call (`firstMessageOnly`) the first newline-delimited
    /// message. Throws a reason that names what was wrong: invalid JSON, not an object, a field
    /// of the wrong type.
    static func decodeReply(_ body: [UInt8], firstMessageOnly: Bool) throws(EtcdReplyError) -> EtcdReply {
        var bytes = body[...]
        if firstMessageOnly {
            while let first = bytes.first, first == 0x20 || first == 0x0A || first == 0x0D || first == 0x09 { bytes = bytes.dropFirst() }
            if let newline = bytes.firstIndex(of: 0x0A) { bytes = bytes[..<newline] }
        }
        do {
            return try JSONDecoder().decode(EtcdReply.self, from: Data(bytes))
        } catch let error as DecodingError {
            throw EtcdReplyError(error)
        } catch {
            throw EtcdReplyError(reason: "invalid JSON (\(error))")
        }
    }

    static func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

    /// The UTF-8 text a base64 value holds, nil when it is not base64 or not UTF-8.
    static func text(fromBase64 value: String) -> String? {
        guard let data = Data(base64Encoded: value) else { return nil }
        return String(validating: [UInt8](data), as: UTF8.self)
    }
}

/// Why a gateway reply could not be read, in words for `WitnessError.malformedResponse`.
struct EtcdReplyError: Error, Equatable, CustomStringConvertible {
    var reason: String
    var description: String { reason }

    init(reason: String) { self.reason = reason }

    init(_ error: DecodingError) {
        switch error {
        case .typeMismatch(let type, let context):
            let path = context.codingPath.map(\.stringValue).filter { !$0.isEmpty }
            if path.isEmpty {
                reason = "the reply is not a JSON object"
            } else {
                reason = "'\(path.joined(separator: "."))' is not \(Self.article(type))"
            }
        case .dataCorrupted(let context):
            let path = context.codingPath.map(\.stringValue).filter { !$0.isEmpty }
            reason = path.isEmpty ? "invalid JSON" : "'\(path.joined(separator: "."))': \(context.debugDescription)"
        case .keyNotFound(let key, _):
            reason = "no '\(key.stringValue)' in the reply"
        case .valueNotFound(_, let context):
            reason = "'\(context.codingPath.map(\.stringValue).joined(separator: "."))' is null"
        @unknown default:
            reason = "invalid JSON"
        }
    }

    private static func article(_ type: Any.Type) -> String {
        let name = "\(type)"
        if name.hasPrefix("Array") { return "an array" }
        if name.hasPrefix("Dictionary") { return "an object" }
        if name == "Bool" { return "a boolean" }
        if name == "String" { return "a string" }
        return "a \(name)"
    }
}
