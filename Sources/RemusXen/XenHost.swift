import CXen
import Glibc

/// Where `XenHost.detect` looks for Xen. Tests point it at a fake tree; the library handles
/// themselves always open the real device nodes and sockets.
public struct XenHostPaths: Sendable, Equatable {
    /// sysfs's hypervisor type, `"xen"` under Xen.
    public var hypervisorType: String
    /// The mount point the xenfs module creates.
    public var procXen: String
    /// Present once xenfs is mounted; contains `control_d` in dom0.
    public var capabilities: String
    /// The privileged command device, any one of these (libxencall tries them in this order).
    public var privcmd: [String]

    /// The paths of a Linux dom0 below `root` (`""` is the real system).
    public init(root: String = "") {
        hypervisorType = root + "/sys/hypervisor/type"
        procXen = root + "/proc/xen"
        capabilities = root + "/proc/xen/capabilities"
        privcmd = [root + "/dev/xen/privcmd", root + "/proc/xen/privcmd"]
    }

    /// This machine's own paths.
    public static let system = XenHostPaths()
}

/// Why there is no usable Xen here, and what detection looked at on the way.
public struct XenUnavailable: Error, Sendable, Equatable, CustomStringConvertible {
    /// The first check that failed.
    public enum Reason: Sendable, Equatable {
        /// `/sys/hypervisor/type` does not exist: no hypervisor, or one Linux does not report.
        case noHypervisor
        /// A hypervisor other than Xen (the type file's content).
        case otherHypervisor(String)
        /// `/proc/xen` does not exist: the xenfs module is not loaded.
        case xenfsNotLoaded
        /// `/proc/xen/capabilities` does not exist: xenfs is not mounted.
        case xenfsNotMounted
        /// Capabilities without `control_d`: this is a guest (domU), not dom0 (the file's content).
        case notControlDomain(String)
        /// No privcmd device: the xen-privcmd module is not loaded.
        case noPrivcmd
        /// The Xen toolstack libraries of the release remusd was built for could not be opened
        /// (dlopen's words).
        case librariesMissing(String)
        /// A toolstack interface did not open.
        case interfaceFailed(XenError)
        /// The hypervisor is not the version these libraries speak.
        case unsupportedVersion(XenVersion)
    }

    /// One thing detection looked at and what it found.
    public struct Observation: Sendable, Equatable, CustomStringConvertible {
        /// A path or an interface, e.g. `"/sys/hypervisor/type"` or `"libxenctrl (xc_interface_open)"`.
        public let subject: String
        /// What a usable Xen dom0 shows there, e.g. `"\"xen\""`.
        public let wanted: String
        /// What this host showed, e.g. `"no such file"`.
        public let found: String

        /// E.g. `/sys/hypervisor/type (want "xen"): no such file`.
        public var description: String { "\(subject) (want \(wanted)): \(found)" }
    }

    /// The first check that failed.
    public let reason: Reason
    /// Every check made, in order; the last one is the one that failed.
    public let observations: [Observation]

    /// One sentence for the failed check.
    public var summary: String {
        switch reason {
        case .noHypervisor:
            "not running under a hypervisor (\(observations.last?.subject ?? "/sys/hypervisor/type") does not exist)"
        case .otherHypervisor(let type):
            "running under \"\(type)\", not Xen"
        case .xenfsNotLoaded:
            "Xen is running but the xenfs module is not loaded (modprobe xenfs)"
        case .xenfsNotMounted:
            "Xen is running but xenfs is not mounted (mount -t xenfs xenfs /proc/xen)"
        case .notControlDomain:
            "this is a Xen guest (domU), not the control domain (dom0)"
        case .noPrivcmd:
            "no privcmd device: the xen-privcmd module is not loaded (modprobe xen-privcmd)"
        case .librariesMissing(let why):
            "the Xen \(XenLibraries.release) toolstack libraries are missing (\(why)); Debian: apt-get install libxenmisc\(XenLibraries.release)"
        case .interfaceFailed(let error):
            "a toolstack interface did not open: \(error)" + Self.hint(for: error)
        case .unsupportedVersion(let version):
            Self.versionMismatch(found: version, builtFor: XenHost.supportedVersion)
        }
    }

    /// The Xen releases remusd supports, each with the Debian release that ships it: one build
    /// per release (the toolstack libraries' hypercall interface is tied to it).
    public static let supportedReleases: [(major: Int, minor: Int, debian: String)] = [
        (4, 17, "Debian 12 (bookworm)"),
        (4, 20, "Debian 13 (trixie)"),
    ]

    /// Why a build for Xen `builtFor` cannot drive hypervisor `found`, and which build can.
    static func versionMismatch(found: XenVersion, builtFor: (major: Int, minor: Int)) -> String {
        let supported = supportedReleases.map { "Xen \($0.major).\($0.minor) on \($0.debian)" }.joined(separator: " and ")
        let next: String
        if let match = supportedReleases.first(where: { $0.major == found.major && $0.minor == found.minor }) {
            next = "use remusd built against Xen \(match.major).\(match.minor)'s libxen-dev (as on \(match.debian)) on this host"
        } else {
            next = "Xen \(found.major).\(found.minor) is not supported: run a supported release"
        }
        return "the hypervisor is Xen \(found), but this remusd is built for Xen \(builtFor.major).\(builtFor.minor) (its toolstack libraries' hypercall interface is tied to that release); remusd supports \(supported), one build each: \(next)"
    }

    /// The summary, every observation, and what the backend needs: the text a user sees.
    public var description: String {
        "no usable Xen on this host: \(summary). Looked at: "
            + observations.map(\.description).joined(separator: "; ")
            + ". The Xen backend runs as root in dom0 of Xen \(XenLibraries.release) with xenstored running."
    }

    private static func hint(for error: XenError) -> String {
        if error.isPermissionDenied { return " (run as root)" }
        if error.call == "xs_open" { return " (is xenstored running? Debian: /etc/init.d/xen start)" }
        if error.isMissingDevice { return " (are the xen-privcmd, xen-evtchn and xen-gntdev modules loaded?)" }
        return ""
    }
}

/// A usable Xen dom0: every toolstack interface the backend needs, open, plus what the
/// hypervisor said about itself. Dropping the host closes them all.
public final class XenHost {
    /// The Xen release whose libraries (libxen-dev) this package is built against.
    public static let supportedVersion = (major: 4, minor: Int(CXEN_XEN_MINOR))

    /// The logger every handle below logs through.
    public let log: XenLog
    /// libxenctrl: hypercalls (domain control, log-dirty, versions).
    public let control: XenControl
    /// xenstored: the domains' configuration and control keys.
    public let store: XenStoreConnection
    /// Event channels (suspend notifications).
    public let eventChannels: XenEventChannels
    /// Foreign memory: mapping guest pages into this process.
    public let foreignMemory: XenForeignMemory
    /// libxl: building and restoring domains.
    public let light: XenLight
    /// The running hypervisor's version.
    public let version: XenVersion
    /// Every check detection made, in order.
    public let observations: [XenUnavailable.Observation]

    private init(log: XenLog, control: XenControl, store: XenStoreConnection, eventChannels: XenEventChannels,
                 foreignMemory: XenForeignMemory, light: XenLight, version: XenVersion,
                 observations: [XenUnavailable.Observation]) {
        self.log = log
        self.control = control
        self.store = store
        self.eventChannels = eventChannels
        self.foreignMemory = foreignMemory
        self.light = light
        self.version = version
        self.observations = observations
    }

    /// Looks for a usable Xen dom0 and opens its toolstack interfaces, or says why there is none.
    ///
    /// Checks, in order, stopping at the first that fails: `/sys/hypervisor/type` is `xen`;
    /// `/proc/xen` exists (xenfs loaded) and `/proc/xen/capabilities` contains `control_d`
    /// (mounted, and this is dom0); a privcmd device exists; libxenctrl opens and the
    /// hypervisor is the release this build is for (`supportedVersion`); xenstored answers; event channels, foreign memory and a libxl
    /// context open. Whatever opened before a failure is closed again before this returns.
    ///
    /// - Parameters:
    ///   - paths: where to look (default: this system).
    ///   - log: the logger the libraries log through (default: a fresh one that keeps 256 lines).
    public static func detect(paths: XenHostPaths = .system, log: XenLog = XenLog()) throws(XenUnavailable) -> XenHost {
        var seen: [XenUnavailable.Observation] = []
        func fail(_ reason: XenUnavailable.Reason) -> XenUnavailable {
            XenUnavailable(reason: reason, observations: seen)
        }
        func note(_ subject: String, _ wanted: String, _ found: String) {
            seen.append(.init(subject: subject, wanted: wanted, found: found))
        }

        // 1. The hypervisor, as the kernel reports it.
        guard let type = readSmallTextFile(paths.hypervisorType) else {
            note(paths.hypervisorType, "\"xen\"", "no such file")
            throw fail(.noHypervisor)
        }
        note(paths.hypervisorType, "\"xen\"", "\"\(type)\"")
        guard type == "xen" else { throw fail(.otherHypervisor(type)) }

        // 2. xenfs: loaded, mounted, and this domain is the control domain.
        guard fileExists(paths.procXen) else {
            note(paths.procXen, "a directory (xenfs loaded)", "no such directory")
            throw fail(.xenfsNotLoaded)
        }
        guard let capabilities = readSmallTextFile(paths.capabilities) else {
            note(paths.capabilities, "\"control_d\" (xenfs mounted)", "no such file")
            throw fail(.xenfsNotMounted)
        }
        note(paths.capabilities, "\"control_d\"", capabilities.isEmpty ? "empty" : "\"\(capabilities)\"")
        guard capabilities.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "," }).contains("control_d") else {
            throw fail(.notControlDomain(capabilities))
        }

        // 3. The privileged command device every hypercall goes through.
        guard let privcmd = paths.privcmd.first(where: fileExists) else {
            note(paths.privcmd.joined(separator: " or "), "a device node", "none exists")
            throw fail(.noPrivcmd)
        }
        note(privcmd, "a device node", "present")

        // 4. The toolstack libraries this build speaks (opened now, not linked).
        let libraries = "Xen \(XenLibraries.release) libraries (dlopen)"
        do {
            try XenLibraries.load()
            note(libraries, "loaded", "loaded")
        } catch {
            guard case .libraryMissing(let why) = error.code else { throw fail(.interfaceFailed(error)) }
            note(libraries, "loaded", why)
            throw fail(.librariesMissing(why))
        }

        // 5. The interfaces. Each handle closes itself when this scope unwinds on a failure.
        func openInterface<H>(_ subject: String, _ body: () throws(XenError) -> H) throws(XenUnavailable) -> H {
            do {
                let handle = try body()
                note(subject, "opens", "open")
                return handle
            } catch {
                note(subject, "opens", error.meaning)
                throw fail(.interfaceFailed(error))
            }
        }
        let control = try openInterface("libxenctrl (xc_interface_open)") { () throws(XenError) in try XenControl(log: log) }
        let version: XenVersion
        do {
            version = try control.version()
        } catch {
            note("hypervisor version (xc_version)", "\(supportedVersion.major).\(supportedVersion.minor)", error.meaning)
            throw fail(.interfaceFailed(error))
        }
        note("hypervisor version (xc_version)", "\(supportedVersion.major).\(supportedVersion.minor)", "\(version)")
        guard version.major == supportedVersion.major && version.minor == supportedVersion.minor else {
            throw fail(.unsupportedVersion(version))
        }
        let store = try openInterface("xenstored (xs_open)") { () throws(XenError) in try XenStoreConnection(log: log) }
        let eventChannels = try openInterface("event channels (xenevtchn_open)") { () throws(XenError) in try XenEventChannels(log: log) }
        let foreignMemory = try openInterface("foreign memory (xenforeignmemory_open)") { () throws(XenError) in try XenForeignMemory(log: log) }
        let light = try openInterface("libxl (libxl_ctx_alloc)") { () throws(XenError) in try XenLight(log: log) }
        return XenHost(log: log, control: control, store: store, eventChannels: eventChannels,
                       foreignMemory: foreignMemory, light: light, version: version, observations: seen)
    }
}

/// A small text file's content without surrounding whitespace, nil if it cannot be read.
func readSmallTextFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 4096)
    var used = 0
    while used < buffer.count {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + used, $0.count - used) }
        if n > 0 { used += n } else if n == 0 { break } else if errno != EINTR { return nil }
    }
    let text = String(decoding: buffer[..<used], as: UTF8.self)
    return String(text.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
}

func fileExists(_ path: String) -> Bool { access(path, F_OK) == 0 }
