import RemusCore

/// What a Xen backup reads from a primary's DOMAIN_CONFIG (libxl JSON) before anything is built
/// from it: checks only, pure, on bytes from the network.
public enum XenDomainConfigPolicy {
    /// The guest memory the configuration declares (`b_info.max_memkb`), bytes. A configuration
    /// without it, or with a value that is not a plain positive integer, is refused: a backup
    /// must know the size of what it is asked to hold before it builds anything.
    public static func declaredMemoryBytes(_ json: [UInt8]) throws -> UInt64 {
        let key = Array("\"max_memkb\"".utf8)
        guard let at = json.firstRange(of: key) else {
            throw XenBackendError("the primary's domain configuration declares no max_memkb; a backup needs the guest's memory size before it builds anything; nothing was built")
        }
        var i = at.upperBound
        func skipSpace() { while i < json.count, json[i] == UInt8(ascii: " ") || json[i] == UInt8(ascii: "\n") || json[i] == UInt8(ascii: "\t") || json[i] == UInt8(ascii: "\r") { i += 1 } }
        skipSpace()
        guard i < json.count, json[i] == UInt8(ascii: ":") else {
            throw XenBackendError("the primary's domain configuration has a malformed max_memkb; nothing was built")
        }
        i += 1
        skipSpace()
        var kib: UInt64 = 0
        var digits = 0
        while i < json.count, json[i] >= UInt8(ascii: "0"), json[i] <= UInt8(ascii: "9"), digits < 19 {
            kib = kib * 10 + UInt64(json[i] - UInt8(ascii: "0"))
            digits += 1
            i += 1
        }
        guard digits > 0, kib > 0, kib <= 1 << 44 else {
            throw XenBackendError("the primary's domain configuration declares max_memkb that is not a positive number of KiB (at most 16 PiB); nothing was built")
        }
        let (bytes, overflow) = kib.multipliedReportingOverflow(by: 1024)
        return overflow ? .max : bytes
    }
}
