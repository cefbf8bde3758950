import Glibc
import RemusSystem
import Testing

@Suite("The one errno error and the syscall choke point")
struct SystemErrorTests {
    @Test("SystemError names the call, says what errno means and gives its C name")
    func descriptionNamesCallAndErrno() {
        #expect(SystemError(call: "open(/x)", errno: ENOENT).description == "open(/x): No such file or directory (ENOENT)")
        #expect(SystemError(call: "x", errno: 4095).description.hasSuffix("(errno 4095)"))
        let timeout = SystemError(call: "connect(10.0.0.2:7788)", errno: .timedOut, detail: "no answer within 500 ms")
        #expect(timeout.description == "connect(10.0.0.2:7788): no answer within 500 ms (ETIMEDOUT)")
        #expect(timeout.isTimeout)
    }

    @Test("syscall throws the errno of a failed call; would-block is a value")
    func chokePoint() throws {
        let error = try #require(throws: SystemError.self) { try syscall("close(-1)") { close(-1) } }
        #expect(error.errno == .badFileDescriptor)
        var fds: [Int32] = [0, 0]
        try syscall("pipe") { pipe(&fds) }
        defer { close(fds[0]); close(fds[1]) }
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        var byte: UInt8 = 0
        let result = try syscallOrWouldBlock("read(empty pipe)") { read(fds[0], &byte, 1) }
        guard case .wouldBlock = result else {
            Issue.record("an empty non-blocking pipe must read as wouldBlock, got \(result)")
            return
        }
    }

    @Test("A Unix socket path too long for sun_path is refused, naming the limit")
    func longUnixPathIsRefused() {
        let error = #expect(throws: SystemError.self) {
            try withUnixAddress(String(repeating: "a", count: 200)) { _, _ in 0 }
        }
        #expect(error?.errno == .fileNameTooLong)
        #expect(error?.description.contains("1 to 107 bytes") == true, "\(String(describing: error))")
    }
}
