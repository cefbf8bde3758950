/// One HTTP/1.1 response, as much as the witness reads of it.
struct HTTPResponse: Equatable, Sendable {
    /// The status code, e.g. 200.
    var status: Int
    var reason: String
    /// Header fields in arrival order, names lowercased.
    var headers: [(name: String, value: String)]
    var body: [UInt8]

    /// The first field named `name` (case-insensitive).
    func header(_ name: String) -> String? {
        let lowered = name.lowercased()
        return headers.first { $0.name == lowered }?.value
    }

    static func == (a: HTTPResponse, b: HTTPResponse) -> Bool {
        a.status == b.status && a.reason == b.reason && a.body == b.body
            && a.headers.map(\.name) == b.headers.map(\.name) && a.headers.map(\.value) == b.headers.map(\.value)
    }
}

/// Why a response was rejected.
struct HTTPParseError: Error, Equatable, CustomStringConvertible {
    var reason: String
    var description: String { reason }
}

/// An incremental HTTP/1.1 response reader: feed it bytes as they arrive, in any split, and it
/// yields the response once the body is complete (by Content-Length, by the chunked encoding's
/// last chunk and trailers, or, with neither, at end of input). Sizes are bounded so a confused or
/// hostile peer cannot make it allocate without limit.
struct HTTPResponseParser {
    static let maxLineBytes = 8 << 10
    static let maxHeaderFields = 100
    static let maxBodyBytes = 1 << 20

    private enum State {
        case statusLine
        case headers
        case body(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd
        case trailers
        case untilEnd
        case done
    }

    private var state = State.statusLine
    private var line: [UInt8] = []
    private var response = HTTPResponse(status: 0, reason: "", headers: [], body: [])

    init() {}

    /// True once a whole response has been read.
    var isComplete: Bool {
        if case .done = state { return true }
        return false
    }

    /// Takes the next bytes; returns the response once it is complete. Bytes after a complete
    /// response are an error (the witness sends one request per connection).
    mutating func feed(_ bytes: UnsafeRawBufferPointer) throws(HTTPParseError) -> HTTPResponse? {
        for byte in bytes { try step(byte) }
        return isComplete ? response : nil
    }

    /// Convenience for tests and arrays.
    mutating func feed(_ bytes: [UInt8]) throws(HTTPParseError) -> HTTPResponse? {
        for byte in bytes { try step(byte) }
        return isComplete ? response : nil
    }

    /// The peer closed the connection: completes a body delimited by the end of input, and is an
    /// error anywhere else short of a complete response.
    mutating func finish() throws(HTTPParseError) -> HTTPResponse {
        switch state {
        case .done: return response
        case .untilEnd:
            state = .done
            return response
        case .statusLine where line.isEmpty:
            throw HTTPParseError(reason: "the connection closed before any response arrived")
        default:
            throw HTTPParseError(reason: "the connection closed in the middle of the response")
        }
    }

    private mutating func step(_ byte: UInt8) throws(HTTPParseError) {
        switch state {
        case .statusLine, .headers, .chunkSize, .chunkDataEnd, .trailers:
            guard let text = try appendToLine(byte) else { return }
            try endOfLine(text)
        case .body(let remaining):
            try appendBody(byte)
            state = remaining == 1 ? .done : .body(remaining: remaining - 1)
        case .chunkData(let remaining):
            try appendBody(byte)
            state = remaining == 1 ? .chunkDataEnd : .chunkData(remaining: remaining - 1)
        case .untilEnd:
            try appendBody(byte)
        case .done:
            throw HTTPParseError(reason: "unexpected bytes after the end of the response")
        }
    }

    private mutating func appendBody(_ byte: UInt8) throws(HTTPParseError) {
        guard response.body.count < HTTPResponseParser.maxBodyBytes else {
            throw HTTPParseError(reason: "response body longer than \(HTTPResponseParser.maxBodyBytes) bytes")
        }
        response.body.append(byte)
    }

    /// Collects a CRLF-terminated line; returns it (without CRLF) when complete.
    private mutating func appendToLine(_ byte: UInt8) throws(HTTPParseError) -> String? {
        if byte == UInt8(ascii: "\n") {
            guard line.last == UInt8(ascii: "\r") else { throw HTTPParseError(reason: "line ended by LF without CR") }
            line.removeLast()
            guard let text = String(validating: line, as: UTF8.self) else {
                throw HTTPParseError(reason: "header line is not valid UTF-8")
            }
            line.removeAll(keepingCapacity: true)
            return text
        }
        guard line.count < HTTPResponseParser.maxLineBytes else {
            throw HTTPParseError(reason: "header line longer than \(HTTPResponseParser.maxLineBytes) bytes")
        }
        line.append(byte)
        return nil
    }

    private mutating func endOfLine(_ text: String) throws(HTTPParseError) {
        switch state {
        case .statusLine:
            try parseStatusLine(text)
            state = .headers
        case .headers:
            if text.isEmpty { try startBody() } else { try parseHeaderField(text) }
        case .chunkSize:
            let sizeText = text.split(separator: ";", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let trimmed = sizeText.trimmingSpaces
            guard !trimmed.isEmpty, trimmed.count <= 8, trimmed.allSatisfy(\.isHexDigit), let size = Int(trimmed, radix: 16) else {
                throw HTTPParseError(reason: "invalid chunk size line \"\(text.prefix(40))\"")
            }
            guard response.body.count + size <= HTTPResponseParser.maxBodyBytes else {
                throw HTTPParseError(reason: "response body longer than \(HTTPResponseParser.maxBodyBytes) bytes")
            }
            state = size == 0 ? .trailers : .chunkData(remaining: size)
        case .chunkDataEnd:
            guard text.isEmpty else { throw HTTPParseError(reason: "chunk data not followed by CRLF") }
            state = .chunkSize
        case .trailers:
            if text.isEmpty { state = .done } else { try parseHeaderField(text) }
        case .body, .chunkData, .untilEnd, .done:
            preconditionFailure("HTTPResponseParser: line in state \(state)")
        }
    }

    private mutating func parseStatusLine(_ text: String) throws(HTTPParseError) {
        // "HTTP/1.1 200 OK"; the reason phrase may be empty or contain spaces.
        let parts = text.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count >= 2, parts[0] == "HTTP/1.1" || parts[0] == "HTTP/1.0",
              parts[1].count == 3, let status = Int(parts[1]), (100...599).contains(status)
        else {
            throw HTTPParseError(reason: "not an HTTP/1.x status line: \"\(text.prefix(60))\"")
        }
        response.status = status
        response.reason = parts.count == 3 ? String(parts[2]) : ""
    }

    private mutating func parseHeaderField(_ text: String) throws(HTTPParseError) {
        guard let colon = text.firstIndex(of: ":"), colon != text.startIndex else {
            throw HTTPParseError(reason: "malformed header field \"\(text.prefix(60))\"")
        }
        let name = text[..<colon]
        guard !name.contains(" "), !name.contains("\t") else {
            throw HTTPParseError(reason: "malformed header field name \"\(name.prefix(60))\"")
        }
        guard response.headers.count < HTTPResponseParser.maxHeaderFields else {
            throw HTTPParseError(reason: "more than \(HTTPResponseParser.maxHeaderFields) header fields")
        }
        let value = text[text.index(after: colon)...].trimmingSpaces
        // Trailers are kept with the headers; none of them may change the framing.
        response.headers.append((name: name.lowercased(), value: String(value)))
    }

    private mutating func startBody() throws(HTTPParseError) {
        if (100..<200).contains(response.status) {
            // An interim response (e.g. 100 Continue): the real one follows.
            response = HTTPResponse(status: 0, reason: "", headers: [], body: [])
            state = .statusLine
            return
        }
        if let encoding = response.header("transfer-encoding") {
            guard encoding.lowercased() == "chunked" else {
                throw HTTPParseError(reason: "unsupported Transfer-Encoding \"\(encoding.prefix(40))\"")
            }
            state = .chunkSize
            return
        }
        if let lengthText = response.header("content-length") {
            guard !lengthText.isEmpty, lengthText.count <= 10, lengthText.allSatisfy({ $0 >= "0" && $0 <= "9" }), let length = Int(lengthText), length >= 0 else {
                throw HTTPParseError(reason: "invalid Content-Length \"\(lengthText.prefix(40))\"")
            }
            guard length <= HTTPResponseParser.maxBodyBytes else {
                throw HTTPParseError(reason: "Content-Length \(length) exceeds \(HTTPResponseParser.maxBodyBytes) bytes")
            }
            state = length == 0 ? .done : .body(remaining: length)
            return
        }
        // 204 and 304 have no body; anything else without framing runs to the end of input.
        state = response.status == 204 || response.status == 304 ? .done : .untilEnd
    }
}

extension StringProtocol {
    fileprivate var trimmingSpaces: Substring {
        let s = Substring(self)
        let start = s.firstIndex { $0 != " " && $0 != "\t" } ?? s.endIndex
        let end = s.lastIndex { $0 != " " && $0 != "\t" }.map { s.index(after: $0) } ?? start
        return s[start..<Swift.max(start, end)]
    }
}
