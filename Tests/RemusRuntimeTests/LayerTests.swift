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
    static let production = ["RemusCore", "RemusSystem", "RemusSim", "RemusNetbuf", "RemusXen", "RemusRuntime"]
    static let tools: Set<String> = ["RemusDrill", "RemusBench", "RemusNetbufProbe"]

    @Test("No production target imports the drill, the benchmark or the netbuf probes", arguments: production)
    func productionImportsNoTool(target: String) throws {
        let found = try imports(of: target)
        #expect(!found.isEmpty, "no Swift file with imports found under Sources/\(target): is the path right?")
        let offending = found.filter { Self.tools.contains($0.module) }
        #expect(offending.isEmpty, "\(offending.map { "\($0.file) imports \($0.module)" })")
    }
}
