import Glibc
import RemusSystem

/// A new empty directory under /tmp named after `prefix` (mkdtemp); the test removes it.
public func makeTemporaryDirectory(_ prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
        throw SystemError.last("mkdtemp(/tmp/\(prefix)-XXXXXX)")
    }
    return String(cString: made)
}

/// Removes `path` and everything under it (best effort: a test's scratch directory).
public func removeTemporaryDirectory(_ path: String) {
    _ = try? runTestShell("rm -rf '\(path)'", timeoutMs: 30_000)
}
