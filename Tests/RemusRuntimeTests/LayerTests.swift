import Foundation
import Testing

/// The repository's Sources/, found from this file's path (Tests/RemusRuntimeTests/…).
private let sourcesDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Sources")

/// `import X` lines (any attribute or access level before `import`) of every Swift file under `target`.
private func imports(of target: String) throws -> [(file: String, module: String)] {
    let root = sourcesDirectory.appendingPathComponent(target)
    guard let files = FileManager.default.enumerator(atPath: root.path) else { return [] }
    var found: [(String, String)] = []
    for case let file as String in files where file.hasSuffix(".swift") {
        let text = try String(contentsOf: root.appendingPathComponent(file), encoding: .utf8)
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ")
            guard let i = words.firstIndex(of: "import"), i + 1 < words.count,
                  words[..<i].allSatisfy({ $0.hasPrefix("@") || ["public", "package", "internal"].contains($0) }) else { continue }
            found.append(("\(target)/\(file)", String(words[i + 1])))
        }
    }
    return found
}

@Suite("Layers: tools stay out of the production targets")
struct LayerTests {
    static let production = ["RemusCore", "RemusSystem", "RemusSim", "RemusNetbuf", "RemusDisk", "RemusTLS", "RemusXen", "RemusRuntime"]
    static let tools: Set<String> = ["RemusDrill", "RemusBench", "RemusNetbufProbe"]

    @Test("No production target imports the drill, the benchmark or the netbuf probes", arguments: production)
    func productionImportsNoTool(target: String) throws {
        let found = try imports(of: target)
        #expect(!found.isEmpty, "no Swift file with imports found under Sources/\(target): is the path right?")
        let offending = found.filter { Self.tools.contains($0.module) }
        #expect(offending.isEmpty, "\(offending.map { "\($0.file) imports \($0.module)" })")
    }
}

/// Backend types and protocols a runtime cast could ask about (today's names and the ones they replaced).
private let backendTypeNames = [
    "SimGuest", "SimReplica", "XenPrimaryGuest", "XenReplica",
    "PrimaryGuest", "PageCapturingGuest", "StreamingGuest", "ReplicaTarget", "PageReplica", "StreamingReplica",
    "StreamingPrimaryGuest", "StreamingReplicaTarget",
]

/// `as?`, `as!` or `is` followed by a backend type (`any` allowed between), anywhere in a line.
private var backendCast: NSRegularExpression {
    try! NSRegularExpression(pattern: #"(\bas[?!]|\bis)\s+\(?\s*(any\s+|some\s+)?(\#(backendTypeNames.joined(separator: "|")))\b"#)
}

/// The casts on backend types in `text`, as "line: text".
private func backendCasts(in text: String) -> [String] {
    let pattern = backendCast
    return text.split(separator: "\n", omittingEmptySubsequences: false).enumerated().compactMap { number, line in
        let code = line.components(separatedBy: "//")[0]
        let range = NSRange(code.startIndex..., in: code)
        return pattern.firstMatch(in: code, range: range) == nil ? nil : "\(number + 1): \(line.trimmingCharacters(in: .whitespaces))"
    }
}

@Suite("Layers: the runtime reaches backends through the factory and their modes, never by casting")
struct BackendCastTests {
    @Test("The cast detector finds the casts the runtime used to make, and passes a switch over a mode")
    func detectorFindsCasts() {
        #expect(backendCasts(in: "guard let sim = replica as? SimReplica, let g = sim.activatedGuest else {").count == 1)
        #expect(backendCasts(in: "if let streaming = guest as? any StreamingPrimaryGuest {").count == 1)
        #expect(backendCasts(in: "let capacity = guest is any StreamingGuest ? 1 : n").count == 1)
        #expect(backendCasts(in: "let x = replica as! (any PageReplica)").count == 1)
        #expect(backendCasts(in: "switch guest.captureMode {\ncase .pages(let g): break\ncase .stream(let g): break\n}").isEmpty)
        #expect(backendCasts(in: "// a comment about `replica as? SimReplica` is not code").isEmpty)
        #expect(backendCasts(in: "if let e = error as? WitnessError { }").isEmpty)
    }

    @Test("No source file of RemusRuntime casts a guest or a replica to a backend type")
    func runtimeHasNoBackendCasts() throws {
        let root = sourcesDirectory.appendingPathComponent("RemusRuntime")
        let files = (FileManager.default.enumerator(atPath: root.path)?.compactMap { $0 as? String } ?? []).filter { $0.hasSuffix(".swift") }
        #expect(files.count > 5, "too few Swift files under \(root.path): is the path right?")
        var found: [String] = []
        for file in files {
            let text = try String(contentsOf: root.appendingPathComponent(file), encoding: .utf8)
            found += backendCasts(in: text).map { "RemusRuntime/\(file):\($0)" }
        }
        #expect(found.isEmpty, "switch over captureMode, commitMode or ActivatedGuest instead: \(found)")
    }
}
