import CXen
import Glibc
@testable import RemusXen
import Testing

extension RemusXenTests {
@Suite("Xen errors and the library log")
struct XenErrorTests {
    @Test("XenError names the call and says what errno means, by name")
    func errnoErrorsAreReadable() {
        let error = XenError(call: "xc_interface_open", errno: ENOENT)
        #expect(error.errno == ENOENT)
        #expect(error.description == "xc_interface_open failed: No such file or directory (ENOENT)")
        #expect(XenError(call: "xs_open", errno: EACCES).isPermissionDenied)
        #expect(XenError(call: "xenevtchn_open", errno: ENODEV).isMissingDevice)
        #expect(XenError(call: "x", errno: 4095).description.hasSuffix("(errno 4095)"), "unnamed values show the number")
    }

    @Test("libxl codes are shown with libxl's own name and normalised to negative")
    func libxlErrorsAreReadable() {
        let error = XenError(call: "libxl_ctx_alloc", libxl: ERROR_FAIL.rawValue)
        #expect(error.code == .libxl(-3))
        #expect(error.errno == nil)
        #expect(error.description == "libxl_ctx_alloc failed: fail (libxl error -3)")
        #expect(XenError(call: "libxl_ctx_alloc", libxl: 3) == error, "a positive code means the same error")
        #expect(XenError(call: "x", libxl: -999).meaning == "unknown error (libxl error -999)")
    }

    @Test("Missing Xen libraries are named with the package that brings them")
    func missingLibrariesAreNamed() {
        let error = XenError(call: "dlopen", libraryMissing: "libxenlight.so.4.17: cannot open shared object file")
        #expect(error.errno == nil)
        #expect(error.description.contains("libxenlight.so.4.17: cannot open shared object file"))
        #expect(error.description.contains("apt-get install libxenmisc\(XenLibraries.release)"))
    }

    @Test("What the library logged travels with the error")
    func libraryLinesAreAttached() {
        let error = XenError(call: "xc_interface_open", errno: ENOENT, log: ["xencall: error: Could not obtain handle"])
        #expect(error.description.hasSuffix("; the library said: xencall: error: Could not obtain handle"))
    }

    @Test("The C logger hands Swift formatted lines with level, errno and context")
    func loggerFormatsInC() throws {
        try XenLibraries.load()  // xtl_logv lives in libxentoollog, opened on first use
        let log = XenLog(capacity: 4)
        withVaList([Int32(42), Int32(7)]) { cxen_xtl_logv(log.pointer, XTL_ERROR, ENOENT, "test", "value %d of %d", $0) }
        withVaList([]) { cxen_xtl_logv(log.pointer, XTL_DEBUG, -1, nil, "no context", $0) }
        cxen_xtl_progress(log.pointer, "xc", "Frames", 50, 200)
        #expect(log.lines == [
            XenLog.Line(level: .error, errno: ENOENT, context: "test", message: "value 42 of 7"),
            XenLog.Line(level: .debug, errno: nil, context: "", message: "no context"),
            XenLog.Line(level: .progress, errno: nil, context: "xc", message: "Frames: 50/200 (25%)"),
        ])
        #expect(log.lines[0].description == "test: error: value 42 of 7: No such file or directory")
        #expect(log.lines[1].description == "debug: no context")
    }

    @Test("The log keeps the newest lines and reports only a call's own warnings")
    func logIsBoundedAndSliced() throws {
        try XenLibraries.load()  // xtl_logv lives in libxentoollog, opened on first use
        let log = XenLog(capacity: 3)
        for i in 0..<5 { withVaList([Int32(i)]) { cxen_xtl_logv(log.pointer, XTL_INFO, -1, "t", "line %d", $0) } }
        #expect(log.count == 5)
        #expect(log.lines.map(\.message) == ["line 2", "line 3", "line 4"])
        let before = log.count
        withVaList([]) { cxen_xtl_logv(log.pointer, XTL_DEBUG, -1, "t", "chatter", $0) }
        withVaList([]) { cxen_xtl_logv(log.pointer, XTL_WARN, -1, "t", "careful", $0) }
        #expect(log.lines(since: before).map(\.message) == ["careful"])
        #expect(log.lines(since: before, atLeast: .debug).map(\.message) == ["chatter", "careful"])
        #expect(log.lines(since: log.count).isEmpty)
    }

    @Test("remusd's own notes below the shown level are neither built nor kept")
    func quietNotesCostNothing() {
        let log = XenLog(capacity: 2, noteEchoLevel: .info)
        let quiet = XenLog(capacity: 2)  // nothing shown at all
        var built = 0
        func message(_ text: String) -> String { built += 1; return text }
        log.note(message("suspending"), domid: 7)
        quiet.note(message("suspending"), domid: 7, level: .info)
        #expect(built == 0)
        #expect(log.count == 0 && quiet.count == 0)
        log.note(message("suspend: xenstore"), domid: 7, level: .info)
        #expect(built == 1)
        #expect(log.lines == [XenLog.Line(level: .info, errno: nil, context: "domain 7", message: "suspend: xenstore")])
    }

    @Test("Messages longer than the C buffer are cut, not overrun")
    func longMessagesAreCut() throws {
        try XenLibraries.load()  // xtl_logv lives in libxentoollog, opened on first use
        let log = XenLog()
        let long = String(repeating: "x", count: 5000)
        long.withCString { text in
            withVaList([text]) { cxen_xtl_logv(log.pointer, XTL_ERROR, -1, "t", "%s", $0) }
        }
        #expect(log.lines.last?.message.utf8.count == Int(CXEN_LOG_MESSAGE_MAX) - 1)
    }
}
}
