import Glibc

/// Reads a whole file (reports, configs, /proc and /sys entries), nil if it cannot be read.
public func readWholeFile(_ path: String) -> String? {
    guard let fd = try? syscall("open(\(path))", { open(path, O_RDONLY | O_CLOEXEC) }) else { return nil }
    let owned = OwnedDescriptor(adopting: fd)
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        guard let n = try? syscall("read(\(path))", { buffer.withUnsafeMutableBytes { read(owned.raw, $0.baseAddress, $0.count) } }) else { return nil }
        if n == 0 { break }
        out += buffer[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

/// Writes `bytes` to `path` (created 0644, truncated).
public func writeFile(_ path: String, _ bytes: [UInt8]) throws(SystemError) {
    let owned = OwnedDescriptor(adopting: try syscall("open(\(path))") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) })
    var offset = 0
    while offset < bytes.count {
        offset += try syscall("write(\(path))") { bytes.withUnsafeBytes { write(owned.raw, $0.baseAddress! + offset, $0.count - offset) } }
    }
}

/// Renames `from` to `to` (atomically replacing `to`).
public func renameFile(_ from: String, _ to: String) throws(SystemError) {
    try syscall("rename(\(from), \(to))") { rename(from, to) }
}
