import Glibc
import RemusRuntime

/// One sample of Prometheus text: `name{label="value",…} value`.
package struct MetricSample: Equatable, Sendable {
    package var name: String
    package var labels: [String: String]
    package var value: Double
    package init(name: String, labels: [String: String] = [:], value: Double) {
        self.name = name
        self.labels = labels
        self.value = value
    }
}

/// What one fetch of /metrics said.
package struct MetricsSnapshot: Sendable {
    package var samples: [MetricSample]
    /// Lines that were not samples of the text format (skipped, counted).
    package var skippedLines = 0

    /// The first sample named `name` whose labels include `labels`.
    package func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        samples.first { sample in sample.name == name && labels.allSatisfy { sample.labels[$0.key] == $0.value } }?.value
    }

    /// The `state` label of the series of an enum gauge that is 1 (`remusd_primary_state`).
    package func state(_ name: String) -> String? {
        samples.first { $0.name == name && $0.value == 1 }?.labels["state"]
    }

    /// An epoch or counter as an integer (a gauge holds it as a double: exact up to 2^53).
    package func integer(_ name: String, _ labels: [String: String] = [:]) -> UInt64? {
        guard let v = value(name, labels), v >= 0, v < 9.007_199_254_740_992e15 else { return nil }
        return UInt64(v)
    }
}

/// A small reader of Prometheus' text format (0.0.4): tolerant (a line it cannot read is skipped
/// and counted, never fatal) and bounded (text, line and sample count are capped).
package enum PrometheusText {
    package static let maxBytes = 4 << 20
    package static let maxLineBytes = 16 << 10
    package static let maxSamples = 50_000

    package static func parse(_ text: String) -> MetricsSnapshot {
        var snapshot = MetricsSnapshot(samples: [])
        var utf8 = text.utf8[...]
        if utf8.count > maxBytes { utf8 = utf8.prefix(maxBytes) }
        for line in utf8.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true) {
            guard snapshot.samples.count < maxSamples else { snapshot.skippedLines += 1; continue }
            var bytes = Array(line)
            if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
            let first = bytes.firstIndex { $0 != 0x20 && $0 != 0x09 }
            guard let first else { continue }
            if bytes[first] == UInt8(ascii: "#") { continue }  // HELP, TYPE, comments
            guard bytes.count <= maxLineBytes, let sample = sample(bytes[first...]) else {
                snapshot.skippedLines += 1
                continue
            }
            snapshot.samples.append(sample)
        }
        return snapshot
    }

    /// `name[{labels}] value [timestamp]`, nil when the line is not that.
    static func sample(_ line: ArraySlice<UInt8>) -> MetricSample? {
        var i = line.startIndex
        func isNameByte(_ b: UInt8, first: Bool) -> Bool {
            (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || b == 0x5F || b == 0x3A || (!first && b >= 0x30 && b <= 0x39)
        }
        while i < line.endIndex, isNameByte(line[i], first: i == line.startIndex) { i += 1 }
        guard i > line.startIndex, let name = String(validating: line[line.startIndex..<i], as: UTF8.self) else { return nil }
        var labels: [String: String] = [:]
        if i < line.endIndex, line[i] == UInt8(ascii: "{") {
            i += 1
            while true {
                while i < line.endIndex, line[i] == 0x20 || line[i] == UInt8(ascii: ",") { i += 1 }
                guard i < line.endIndex else { return nil }
                if line[i] == UInt8(ascii: "}") { i += 1; break }
                let keyStart = i
                while i < line.endIndex, isNameByte(line[i], first: i == keyStart) { i += 1 }
                guard i > keyStart, i + 1 < line.endIndex, line[i] == UInt8(ascii: "="), line[i + 1] == UInt8(ascii: "\"") else { return nil }
                let key = String(decoding: line[keyStart..<i], as: UTF8.self)
                i += 2
                var value: [UInt8] = []
                while i < line.endIndex, line[i] != UInt8(ascii: "\"") {
                    if line[i] == UInt8(ascii: "\\"), i + 1 < line.endIndex {
                        i += 1
                        value.append(line[i] == UInt8(ascii: "n") ? 0x0A : line[i])
                    } else {
                        value.append(line[i])
                    }
                    i += 1
                }
                guard i < line.endIndex, let text = String(validating: value, as: UTF8.self) else { return nil }
                i += 1  // the closing quote
                labels[key] = text
            }
        }
        let rest = line[i...].split(whereSeparator: { $0 == 0x20 || $0 == 0x09 })
        guard rest.count == 1 || rest.count == 2, let value = number(rest[0]) else { return nil }
        return MetricSample(name: name, labels: labels, value: value)
    }

    private static func number(_ bytes: ArraySlice<UInt8>) -> Double? {
        switch String(decoding: bytes, as: UTF8.self) {
        case "+Inf", "Inf": return .infinity
        case "-Inf": return -.infinity
        case "NaN": return .nan
        case let text:
            guard text.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2E || $0 == 0x2D || $0 == 0x2B || $0 == 0x65 || $0 == 0x45 }) else { return nil }
            return Double(text)
        }
    }
}

/// A daemon's /metrics over plain HTTP/1.1, one connection per request, bounded in time and size.
package enum MetricsScrape {
    /// An HTTP reply: the status code, the header block and the body.
    package struct Reply: Sendable {
        package var status: Int
        package var headers: String
        package var body: [UInt8]
    }

    /// Fetches and parses `http://<endpoint>/metrics`; throws when the daemon does not answer 200.
    package static func fetch(_ endpoint: Endpoint, timeoutMs: Int = 2000) throws -> MetricsSnapshot {
        let reply = try get(endpoint, request: "GET /metrics HTTP/1.1\r\nHost: \(endpoint)\r\nConnection: close\r\n\r\n", timeoutMs: timeoutMs)
        guard reply.status == 200 else {
            throw ProtocolError("the metrics endpoint http://\(endpoint)/metrics answered \(reply.status), not 200")
        }
        return PrometheusText.parse(String(decoding: reply.body, as: UTF8.self))
    }

    /// Sends `request` as it is and reads the whole reply (the server closes), at most
    /// `PrometheusText.maxBytes` plus 64 KiB of headers, within `timeoutMs`.
    package static func get(_ endpoint: Endpoint, request: String, timeoutMs: Int = 2000) throws -> Reply {
        let deadline = Deadline.after(milliseconds: timeoutMs)
        let channel = try TCPChannel.connect(to: endpoint, deadline: deadline)
        defer { channel.shutdown() }
        channel.setSendTimeout(nanoseconds: deadline.remainingNs)
        try channel.write(Array(request.utf8))
        let limit = PrometheusText.maxBytes + (64 << 10)
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            guard try channel.waitReadable(until: deadline) else {
                throw ProtocolError("http://\(endpoint) did not finish its reply within \(timeoutMs) ms")
            }
            let n = try chunk.withUnsafeMutableBytes { try channel.read(into: $0) }
            if n == 0 { break }
            received += chunk[..<n]
            guard received.count <= limit else { throw ProtocolError("http://\(endpoint) sent more than \(limit) bytes") }
        }
        let separator: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A]
        guard let split = (0..<max(0, received.count - 3)).first(where: { Array(received[$0..<$0 + 4]) == separator }) else {
            throw ProtocolError("http://\(endpoint) sent no complete HTTP reply (\(received.count) bytes)")
        }
        let headers = String(decoding: received[..<split], as: UTF8.self)
        let statusWords = headers.prefix { $0 != "\r" }.split(separator: " ")
        guard statusWords.count >= 2, statusWords[0].hasPrefix("HTTP/1."), let status = Int(statusWords[1]) else {
            throw ProtocolError("http://\(endpoint) did not answer with an HTTP/1.x status line")
        }
        return Reply(status: status, headers: headers, body: Array(received[(split + 4)...]))
    }
}
