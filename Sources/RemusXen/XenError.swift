import CXen
import Glibc
import RemusSystem

/// A Xen toolstack call that failed, translated once at the library boundary.
///
/// libxenctrl, libxenstore, libxenevtchn and libxenforeignmemory report errors through `errno`;
/// libxl returns its own negative `ERROR_*` codes. Both libraries also log the reason through
/// the logger they were given, which often says more than the code (which device node could not
/// be opened, which hypercall was refused): those lines travel in `log`.
public struct XenError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What the failed call returned.
    public enum Code: Equatable, Sendable {
        /// An `errno` value (libxenctrl and the small libraries).
        case errno(Errno)
        /// A libxl error, negative (`ERROR_FAIL` is -3), see `libxl_error` in `_libxl_types.h`.
        case libxl(Int32)
        /// The Xen libraries could not be opened (dlopen's or dlsym's words).
        case libraryMissing(String)
    }

    /// The library function that failed, e.g. `"xc_interface_open"`.
    public let call: String
    /// The code the call left.
    public let code: Code
    /// Warning-or-worse lines the libraries logged during the call, oldest first.
    public let log: [String]

    /// Wraps an `errno`-style failure.
    public init(call: String, errno: Int32, log: [String] = []) {
        self.call = call
        self.code = .errno(Errno(rawValue: errno))
        self.log = log
    }

    /// Wraps a libxl return value (`ERROR_*`, negative; a positive value is normalised).
    public init(call: String, libxl: Int32, log: [String] = []) {
        self.call = call
        self.code = .libxl(libxl > 0 ? -libxl : libxl)
        self.log = log
    }

    /// The Xen libraries are not there: `why` is dlopen's message, e.g. "libxenlight.so.4.17:
    /// cannot open shared object file: No such file or directory".
    public init(call: String, libraryMissing why: String) {
        self.call = call
        self.code = .libraryMissing(why)
        self.log = []
    }

    /// The `errno` value, nil for a libxl error.
    public var errno: Int32? {
        if case .errno(let value) = code { return value.rawValue }
        return nil
    }

    /// The failure as the system layer's error, nil for a libxl error.
    public var systemError: SystemError? {
        if case .errno(let value) = code { return SystemError(call: call, errno: value) }
        return nil
    }

    /// What the code means, e.g. `"No such file or directory (ENOENT)"` or `"FAIL (libxl error -3)"`.
    public var meaning: String {
        switch code {
        case .errno(let value):
            return "\(value) (\(value.symbol))"
        case .libxl(let value):
            // SAFETY: libxl_error_to_string returns a pointer into a static table, or NULL for an
            // unknown value.
            let name = (try? XenLibraries.load()) != nil ? cxen_libxl_error_to_string(libxl_error(value)).map { String(cString: $0) } : nil
            return "\(name ?? "unknown error") (libxl error \(value))"
        case .libraryMissing(let why):
            return "the Xen \(XenLibraries.release) libraries are not installed or incomplete (\(why)); Debian: apt-get install libxenmisc\(XenLibraries.release) (or xen-utils-\(XenLibraries.release), which brings it)"
        }
    }

    /// E.g. `xc_interface_open failed: No such file or directory (ENOENT); the library said: …`.
    public var description: String {
        var text = "\(call) failed: \(meaning)"
        if !log.isEmpty { text += "; the library said: " + log.joined(separator: " / ") }
        return text
    }

    /// The caller lacks the privilege (`EPERM`, `EACCES`): the toolstack needs root in dom0.
    public var isPermissionDenied: Bool { code == .errno(.notPermitted) || code == .errno(.permissionDenied) }
    /// A device node or socket does not exist (`ENOENT`, `ENODEV`, `ENXIO`).
    public var isMissingDevice: Bool {
        code == .errno(.noSuchFileOrDirectory) || code == .errno(.noSuchAddressOrDevice) || code == .errno(Errno(rawValue: ENODEV))
    }
}
