import CXen

/// The Xen toolstack libraries, opened with dlopen the first time the Xen backend is used.
///
/// remusd does not link them, so a host without Xen (no libxen installed) runs the simulated
/// guest with the same binary. Every handle's initialiser calls `load()` first; the first
/// outcome is kept for the life of the process.
public enum XenLibraries {
    /// The Xen release whose libraries this build opens, e.g. "4.17" (from the headers it was
    /// built against: libxenctrl, libxenguest and libxenlight carry it in their sonames).
    public static var release: String { String(cString: cxen_xen_release()) }

    private static let outcome: String? = {
        var failure: UnsafePointer<CChar>?
        guard cxen_load(&failure) != 0 else { return nil }
        return failure.map { String(cString: $0) } ?? "unknown reason"
    }()

    /// Opens every library and finds every function remusd calls, once; throws
    /// `XenError(call: "dlopen", …)` naming what is missing.
    public static func load() throws(XenError) {
        if let why = outcome { throw XenError(call: "dlopen", libraryMissing: why) }
    }

    /// Whether the libraries are open (`load()` succeeded).
    public static var isLoaded: Bool { outcome == nil }
}
