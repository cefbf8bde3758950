import CNetlink

/// A libnl call that failed, translated once at the boundary.
///
/// `code` is libnl's positive error number (`NLE_*`, see `<netlink/errno.h>`); libnl maps the
/// kernel's errno onto these (`ENOENT` → `NLE_OBJ_NOTFOUND`, `EEXIST` → `NLE_EXIST`, …).
public struct NetlinkError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The libnl function that failed, e.g. `"rtnl_qdisc_add(plug)"`.
    public let call: String
    /// libnl's error number, positive (`NLE_EXIST` is 6).
    public let code: Int32
    /// libnl's own text for `code` (`nl_geterror`).
    public let message: String

    /// Wraps a libnl return value; libnl returns negative `NLE_*` numbers, some calls positive ones.
    public init(call: String, code: Int32) {
        self.call = call
        self.code = code < 0 ? -code : code
        // SAFETY: nl_geterror returns a pointer into a static table of C strings.
        self.message = String(cString: nl_geterror(self.code))
    }

    public var description: String { "\(call) failed: \(message) (libnl error \(code))" }

    /// The object (link, qdisc, filter) does not exist, or the kernel does not know the kind asked
    /// for (`ENOENT`, e.g. `plug` when sch_plug is not built).
    public var isNotFound: Bool { code == NLE_OBJ_NOTFOUND || code == NLE_NODEV }
    /// The object exists already (`EEXIST`).
    public var isAlreadyExisting: Bool { code == NLE_EXIST }
    /// The kernel does not support the operation (`EOPNOTSUPP`).
    public var isNotSupported: Bool { code == NLE_OPNOTSUPP || code == NLE_MSGTYPE_NOSUPPORT }
    /// The caller lacks CAP_NET_ADMIN (`EPERM`/`EACCES`).
    public var isPermissionDenied: Bool { code == NLE_PERM || code == NLE_NOACCESS }
}

/// Runs one libnl call and turns a negative return into a `NetlinkError`; the only place where
/// RemusNetbuf reads libnl's error numbers.
@discardableResult
@inline(__always)
func nlCheck(_ call: @autoclosure () -> String, _ result: Int32) throws(NetlinkError) -> Int32 {
    if result < 0 { throw NetlinkError(call: call(), code: result) }
    return result
}
