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

/// What a Xen backup lets a primary's DOMAIN_CONFIG name on this host (`remusd receive
/// --xen-allow-path`, `--xen-allow-bridge`): libxl opens, executes or attaches every file,
/// script and bridge the configuration names when the backup builds the domain, and the
/// configuration comes from the network. A path is allowed when, made absolute without `.`/`..`
/// tricks, it lies under one of the allowed directories; a bridge when its name is listed.
/// Passthrough of host hardware (PCI, USB, device-tree devices, I/O memory, ports, IRQs) and
/// extra device-model arguments are refused outright: a primary does not hand the backup's
/// devices to a guest, nor add to the command line of the QEMU the backup runs.
public struct XenPathPolicy: Equatable, Sendable {
    /// Directories whose files a configuration may name (kernels, ramdisks, firmware, disk
    /// images, device models, hotplug scripts); absolute.
    public var allowedDirectories: [String]
    /// Bridges a configuration's NICs may attach to.
    public var allowedBridges: [String]

    /// Xen's own directories (`xl` keeps guest configurations, images and scripts there) and
    /// its default bridge.
    public static let defaultDirectories = ["/etc/xen", "/var/lib/xen"]
    public static let defaultBridges = ["xenbr0"]

    public init(allowedDirectories: [String] = XenPathPolicy.defaultDirectories, allowedBridges: [String] = XenPathPolicy.defaultBridges) {
        self.allowedDirectories = allowedDirectories
        self.allowedBridges = allowedBridges
    }

    /// libxl JSON members that name a file on the backup host (anywhere in the document).
    static let pathKeys: Set<String> = [
        "kernel", "ramdisk", "bootloader", "device_model", "firmware", "acpi_firmware",
        "system_firmware", "device_tree", "pdev_path", "script", "path", "smbios_firmware",
        "stubdomain_kernel", "stubdomain_ramdisk",
    ]
    /// libxl JSON members that give a guest host hardware, refused whenever non-empty.
    static let passthroughKeys: Set<String> = ["pcidevs", "usbdevs", "dtdevs", "iomem", "ioports", "irqs", "rdms"]
    /// Extra arguments for the device model (xl's `device_model_args*`), refused whenever non-empty.
    static let deviceModelArgumentKeys: Set<String> = ["extra", "extra_pv", "extra_hvm"]
    /// Where libxl looks for a hotplug script given by name only.
    static let scriptDirectory = "/etc/xen/scripts"

    /// Checks a primary's libxl JSON; throws naming the first member not allowed, the value and
    /// the flag that would allow it. Nothing is built from a configuration that fails.
    /// `replaced`: places (`disks[0].pdev_path`) the backup fills in itself (its copies of the
    /// replicated disks, `XenDomainDisks.placing`), so what the primary named there is not opened.
    public func check(_ json: [UInt8], replaced: Set<String> = []) throws {
        guard let document = QMPValue.parse(json) else {
            throw XenBackendError("the primary's domain configuration is not valid JSON; nothing was built")
        }
        try check(document, at: "", replaced: replaced)
    }

    private func check(_ value: QMPValue, at where_: String, replaced: Set<String>) throws {
        switch value {
        case .object(let members):
            for (key, member) in members.sorted(by: { $0.key < $1.key }) {
                let place = where_.isEmpty ? key : where_ + "." + key
                if case .array(let items) = member, !items.isEmpty {
                    if Self.passthroughKeys.contains(key) {
                        throw XenBackendError("the primary's domain configuration passes \(items.count) host device(s) or resource(s) through (\(place)); a backup does not give its host's hardware to a streamed guest; refused, nothing was built — protect guests without passthrough")
                    }
                    if Self.deviceModelArgumentKeys.contains(key) {
                        throw XenBackendError("the primary's domain configuration adds \(items.count) argument(s) to the device model's command line (\(place)); a backup does not run QEMU with arguments from the network; refused, nothing was built — protect guests without device_model_args")
                    }
                }
                if let text = member.stringValue, !text.isEmpty {
                    if key == "bridge" {
                        try checkBridge(text, at: place)
                        continue
                    }
                    if Self.pathKeys.contains(key) {
                        if !replaced.contains(place) { try checkPath(text, key: key, at: place) }
                        continue
                    }
                }
                try check(member, at: place, replaced: replaced)
            }
        case .array(let items):
            for (i, item) in items.enumerated() { try check(item, at: "\(where_)[\(i)]", replaced: replaced) }
        case .null, .bool, .integer, .double, .string:
            return
        }
    }

    private func checkBridge(_ name: String, at place: String) throws {
        guard allowedBridges.contains(name) else {
            throw XenBackendError("the primary's domain configuration attaches a NIC to bridge '\(name)' (\(place)), which this backup does not allow (allowed: \(allowedBridges.joined(separator: ", "))); refused, nothing was built — add it with 'remusd receive --xen-allow-bridge \(name)' if the guest belongs there")
        }
    }

    private func checkPath(_ path: String, key: String, at place: String) throws {
        // A script given by name only is looked up in Xen's script directory.
        let absolute = key == "script" && !path.contains("/") ? Self.scriptDirectory + "/" + path : path
        guard let clean = Self.normalized(absolute) else {
            throw XenBackendError("the primary's domain configuration names '\(path)' (\(place)), which is not an absolute path without '..' on this host; refused, nothing was built")
        }
        let directories = allowedDirectories.compactMap(Self.normalized)
        guard directories.contains(where: { clean == $0 || clean.hasPrefix($0 == "/" ? "/" : $0 + "/") }) else {
            let directory = clean.split(separator: "/").dropLast().joined(separator: "/")
            throw XenBackendError("the primary's domain configuration names '\(path)' (\(place)), outside the directories this backup allows (\(allowedDirectories.joined(separator: ", "))); refused, nothing was built — allow it with 'remusd receive --xen-allow-path /\(directory)' if this host keeps the guest's files there")
        }
    }

    /// `path` absolute, with `.` and empty components dropped; nil when relative or when a
    /// `..` component appears (an allowed directory must not be escaped by spelling).
    static func normalized(_ path: String) -> String? {
        guard path.hasPrefix("/") else { return nil }
        var parts: [Substring] = []
        for part in path.split(separator: "/", omittingEmptySubsequences: true) {
            if part == "." { continue }
            if part == ".." { return nil }
            parts.append(part)
        }
        return "/" + parts.joined(separator: "/")
    }
}
