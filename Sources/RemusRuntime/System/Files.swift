import Glibc

/// Reads a whole file (reports, configs, /proc and /sys entries), nil if it cannot be read.
func readWholeFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n > 0 { out += buffer[0..<n] } else if n == 0 { break } else if errno != EINTR { return nil }
    }
    return String(decoding: out, as: UTF8.self)
}

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw SystemError(call: "open(\(path))", errno: errno) }
    defer { close(fd) }
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if n < 0 {
            if errno == EINTR { continue }
            throw SystemError(call: "write(\(path))", errno: errno)
        }
        offset += n
    }
}

func renameFile(_ from: String, _ to: String) throws {
    if rename(from, to) != 0 { throw SystemError(call: "rename(\(from), \(to))", errno: errno) }
}

/// Whether Linux runs under Xen (`/sys/hypervisor/type` is "xen"): `protect`'s default backend.
/// Whether this is a usable dom0 is `XenHost.detect`'s question, asked when the backend opens.
public func xenHypervisorPresent() -> Bool {
    readWholeFile("/sys/hypervisor/type")?.trimmingWhitespace() == "xen"
}
