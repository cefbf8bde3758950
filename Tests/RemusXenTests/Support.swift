import Glibc
@testable import RemusXen

/// What this test process runs on: Xen's dom0 (the testbed) or anything else (build machines).
enum ThisHost {
    /// True in a Xen dom0 with xenfs mounted: the toolstack interfaces should open here.
    static let isXenDom0: Bool = {
        guard readSmallTextFile("/sys/hypervisor/type") == "xen" else { return false }
        return readSmallTextFile("/proc/xen/capabilities")?.contains("control_d") ?? false
    }()
}

/// The descriptors this process holds on Xen's device nodes (/dev/xen/*, /proc/xen/*), as
/// "fd -> target": what a leaked library handle leaves behind.
func xenDeviceDescriptors() -> [String] {
    guard let dir = opendir("/proc/self/fd") else { return [] }
    defer { closedir(dir) }
    var found: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        guard name.first?.isNumber == true else { continue }
        var target = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/fd/\(name)", &target, target.count - 1)
        guard n > 0 else { continue }
        let path = String(decoding: target[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if path.hasPrefix("/dev/xen") || path.hasPrefix("/proc/xen") { found.append("\(name) -> \(path)") }
    }
    return found.sorted()
}

/// A throwaway directory tree standing in for / in detection tests; removed by `remove()`.
struct FakeRoot {
    let path: String

    init() {
        var template = Array("/tmp/remusxen-root-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in mkdtemp(buffer.baseAddress!).map { String(cString: $0) } }
        guard let made else { preconditionFailure("mkdtemp failed: errno \(errno)") }
        path = made
    }

    /// Writes `content` to `relative` (e.g. "/sys/hypervisor/type"), creating directories.
    func write(_ relative: String, _ content: String) {
        makeDirectory(String(relative[..<(relative.lastIndex(of: "/") ?? relative.startIndex)]))
        let fd = open(path + relative, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        precondition(fd >= 0, "open \(path + relative): errno \(errno)")
        _ = content.withCString { Glibc.write(fd, $0, strlen($0)) }
        close(fd)
    }

    func makeDirectory(_ relative: String) {
        var built = path
        for part in relative.split(separator: "/") {
            built += "/" + part
            mkdir(built, 0o755)
        }
    }

    var paths: XenHostPaths { XenHostPaths(root: path) }

    func remove() {
        _ = system("rm -rf '\(path)'")
    }
}
