import CXen
import Glibc

// One owned class per library handle: the handle is opened in init (or init throws and nothing
// is held), closed in deinit, and each keeps the XenLog its library logs through alive.

/// An open libxenctrl interface (`xc_interface *`): hypercalls to the hypervisor through
/// /dev/xen/privcmd. Needs root in dom0.
public final class XenControl {
    /// The raw `xc_interface *` for the C calls; valid while this object lives.
    public let handle: OpaquePointer
    /// The logger libxenctrl logs through; kept alive as long as the handle.
    public let log: XenLog

    /// Opens the interface; throws `XenError(call: "xc_interface_open", …)` when it cannot.
    public init(log: XenLog) throws(XenError) {
        try XenLibraries.load()
        let handle = try log.check("xc_interface_open", { cxen_xc_interface_open(log.pointer, log.pointer, 0) }, failed: { $0 == nil })
        self.handle = handle!
        self.log = log
        XenHandleCensus.opened()
    }

    deinit {
        cxen_xc_interface_close(handle)
        XenHandleCensus.closed()
    }

    /// The running hypervisor's version, e.g. 4.17 with extra version ".5".
    public func version() throws(XenError) -> XenVersion {
        let packed = try log.check("xc_version(XENVER_version)", { cxen_xc_version(handle, XENVER_version, nil) }, failed: { $0 < 0 })
        var extra = xen_extraversion_t(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        // SAFETY: XENVER_extraversion writes at most XEN_EXTRAVERSION_LEN (16) bytes into `extra`,
        // which is exactly that large; the last byte is forced to NUL before reading.
        let extraText = try withUnsafeMutableBytes(of: &extra) { bytes throws(XenError) -> String in
            _ = try log.check("xc_version(XENVER_extraversion)", { cxen_xc_version(handle, XENVER_extraversion, bytes.baseAddress) }, failed: { $0 < 0 })
            bytes[bytes.count - 1] = 0
            return String(cString: bytes.baseAddress!.assumingMemoryBound(to: CChar.self))
        }
        return XenVersion(major: Int(packed >> 16), minor: Int(packed & 0xffff), extra: extraText)
    }
}

/// A hypervisor version as `xc_version` reports it.
public struct XenVersion: Equatable, Sendable, CustomStringConvertible {
    /// E.g. 4.
    public var major: Int
    /// E.g. 17.
    public var minor: Int
    /// The extra version, e.g. `".7"` or `"-rc"`.
    public var extra: String

    /// A version from its parts.
    public init(major: Int, minor: Int, extra: String = "") {
        self.major = major
        self.minor = minor
        self.extra = extra
    }

    /// E.g. `"4.17.7"`.
    public var description: String { "\(major).\(minor)\(extra)" }
}

/// An open connection to xenstored (`struct xs_handle *`): the unix socket
/// /run/xenstored/socket, or /dev/xen/xenbus.
public final class XenStoreConnection {
    /// The raw `struct xs_handle *`; valid while this object lives.
    public let handle: OpaquePointer
    /// Where this connection's failures are recorded (libxenstore itself logs nothing).
    public let log: XenLog

    /// Connects; throws `XenError(call: "xs_open", …)` when xenstored is not reachable.
    public init(log: XenLog) throws(XenError) {
        try XenLibraries.load()
        // libxenstore does not take a logger: its failure is the errno alone.
        let handle = try log.check("xs_open", { cxen_xs_open(0) }, failed: { $0 == nil })
        self.handle = handle!
        self.log = log
        XenHandleCensus.opened()
    }

    deinit {
        cxen_xs_close(handle)
        XenHandleCensus.closed()
    }

    /// Reads one key outside a transaction; nil when it does not exist.
    public func read(_ path: String) -> String? {
        var length: UInt32 = 0
        guard let value = cxen_xs_read(handle, xs_transaction_t(XBT_NULL), path, &length) else { return nil }
        defer { free(value) }
        // SAFETY: xs_read returns `length` bytes (plus a NUL) allocated with malloc.
        let bytes = UnsafeRawBufferPointer(start: value, count: Int(length))
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The names of a key's children outside a transaction; nil when the key does not exist.
    public func directory(_ path: String) -> [String]? {
        var count: UInt32 = 0
        guard let names = cxen_xs_directory(handle, xs_transaction_t(XBT_NULL), path, &count) else { return nil }
        // SAFETY: xs_directory returns one malloc'd block: `count` pointers to NUL-terminated
        // strings stored in the same block, freed together by one free.
        defer { free(names) }
        return (0..<Int(count)).compactMap { names[$0].map { String(cString: $0) } }
    }
}

/// An open event channel interface (`xenevtchn_handle *`, /dev/xen/evtchn).
public final class XenEventChannels {
    /// The raw `xenevtchn_handle *`; valid while this object lives.
    public let handle: OpaquePointer
    /// The logger libxenevtchn logs through; kept alive as long as the handle.
    public let log: XenLog

    /// Opens the interface; throws `XenError(call: "xenevtchn_open", …)`.
    public init(log: XenLog) throws(XenError) {
        try XenLibraries.load()
        let handle = try log.check("xenevtchn_open", { cxen_xenevtchn_open(log.pointer, 0) }, failed: { $0 == nil })
        self.handle = handle!
        self.log = log
        XenHandleCensus.opened()
    }

    deinit {
        cxen_xenevtchn_close(handle)
        XenHandleCensus.closed()
    }
}

/// An open foreign memory interface (`xenforeignmemory_handle *`, /dev/xen/privcmd): maps other
/// domains' pages into this process.
public final class XenForeignMemory {
    /// The raw `xenforeignmemory_handle *`; valid while this object lives.
    public let handle: OpaquePointer
    /// The logger libxenforeignmemory logs through; kept alive as long as the handle.
    public let log: XenLog

    /// Opens the interface; throws `XenError(call: "xenforeignmemory_open", …)`.
    public init(log: XenLog) throws(XenError) {
        try XenLibraries.load()
        let handle = try log.check("xenforeignmemory_open", { cxen_xenforeignmemory_open(log.pointer, 0) }, failed: { $0 == nil })
        self.handle = handle!
        self.log = log
        XenHandleCensus.opened()
    }

    deinit {
        cxen_xenforeignmemory_close(handle)
        XenHandleCensus.closed()
    }
}

/// A libxl context (`libxl_ctx *`): the toolstack library xl itself uses; builds, saves and
/// restores domains. Opens its own libxenctrl and xenstore connections.
public final class XenLight {
    /// The raw `libxl_ctx *`; valid while this object lives.
    public let context: OpaquePointer
    /// The logger libxl logs through; kept alive as long as the context.
    public let log: XenLog

    /// Allocates the context; throws `XenError(call: "libxl_ctx_alloc", libxl: …)`.
    public init(log: XenLog) throws(XenError) {
        try XenLibraries.load()
        let before = log.count
        var context: OpaquePointer?
        let rc = cxen_libxl_ctx_alloc(&context, LIBXL_VERSION, 0, log.pointer)
        guard rc == 0, let context else {
            throw XenError(call: "libxl_ctx_alloc", libxl: rc, log: log.lines(since: before).map(\.description))
        }
        self.context = context
        self.log = log
        XenHandleCensus.opened()
    }

    deinit {
        cxen_libxl_ctx_free(context)
        XenHandleCensus.closed()
    }
}

/// Hypercall-safe memory (locked, page aligned) from libxenctrl, e.g. for a log-dirty bitmap.
/// The shadow struct libxenctrl tracks it by lives at one heap address until deinit frees both.
public final class XenHypercallPages {
    /// The interface the memory was allocated from; kept open until the memory is freed.
    public let control: XenControl
    /// Size in 4 KiB pages.
    public let pages: Int
    /// The memory, `pages * 4096` bytes, valid while this object lives.
    public let bytes: UnsafeMutableRawBufferPointer
    private let shadow: UnsafeMutablePointer<xc_hypercall_buffer_t>

    /// Allocates `pages` pages; throws `XenError(call: "xc_hypercall_buffer_alloc_pages", …)`.
    public init(control: XenControl, pages: Int) throws(XenError) {
        precondition(pages > 0 && pages <= Int(Int32.max), "hypercall buffer of \(pages) pages")
        // SAFETY: the shadow is heap memory owned by this object, initialised here and freed
        // only after libxenctrl freed the pages it describes (deinit).
        let shadow = UnsafeMutablePointer<xc_hypercall_buffer_t>.allocate(capacity: 1)
        cxen_hypercall_buffer_init(shadow)
        let memory: UnsafeMutableRawPointer?
        do {
            memory = try control.log.check("xc_hypercall_buffer_alloc_pages(\(pages))",
                                           { cxen_xc__hypercall_buffer_alloc_pages(control.handle, shadow, Int32(pages)) },
                                           failed: { $0 == nil })
        } catch {
            shadow.deallocate()
            throw error
        }
        self.control = control
        self.pages = pages
        self.shadow = shadow
        // SAFETY: libxenctrl returned `pages` whole pages at `memory`, valid until freed in deinit.
        self.bytes = UnsafeMutableRawBufferPointer(start: memory, count: pages * 4096)
        XenHandleCensus.opened()
    }

    /// The shadow to pass where libxenctrl wants `xc_hypercall_buffer_t *`
    /// (e.g. `xc_logdirty_control`).
    public var buffer: UnsafeMutablePointer<xc_hypercall_buffer_t> { shadow }

    deinit {
        cxen_xc__hypercall_buffer_free_pages(control.handle, shadow, Int32(pages))
        shadow.deallocate()
        XenHandleCensus.closed()
    }
}
