import Glibc
import Synchronization
import Testing

@testable import RemusSystem

/// Threads carry their names into /proc, so `top -H` and the Xen testbed's CPU-by-thread lines
/// can tell the shipper from the save thread.
@Suite struct ThreadNameTests {
    private static func ownName() -> String {
        let fd = open("/proc/thread-self/comm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        return String(decoding: buffer.prefix(max(0, n)), as: UTF8.self).trimmingCharacters(in: "\n")
    }

    @Test func aThreadIsNamedAndALongNameIsCutToTheKernels15Bytes() throws {
        let seen = Mutex<[String]>([])
        for name in ["shipper", "a-name-longer-than-fifteen-bytes"] {
            let thread = try JoinableThread(name: name) { seen.withLock { $0.append(Self.ownName()) } }
            thread.join()
        }
        #expect(seen.withLock { $0 } == ["shipper", "a-name-longer-t"])
        #expect(Self.ownName() != "shipper", "the name is the thread's own")
    }
}

private extension String {
    func trimmingCharacters(in set: Character) -> String {
        var s = self
        while s.last == set { s.removeLast() }
        return s
    }
}

/// glibc refuses an mmap threshold above its maximum (32 MiB on 64-bit): the values remusd asks
/// for must be ones it takes, or the tuning would silently not happen.
@Suite struct MallocTuningTests {
    @Test func glibcTakesTheThresholds() {
        #expect(keepFreedMemoryForReuse())
    }
}
