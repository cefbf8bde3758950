import CTap
import Glibc
import RemusSystem

/// Why a tap device could not be used. Every message says what to do next.
public enum TapError: Error, Equatable, CustomStringConvertible, Sendable {
    /// No interface of that name exists in this network namespace.
    case notFound(String)
    /// The interface exists but is not a tap (a veth, a bridge, a tun in layer-3 mode, …).
    case notATap(String)
    /// Another process is attached to the tap.
    case busy(String)
    /// The tap has no IPv4 address, or one whose next address is outside its subnet.
    case noGuestAddress(String, detail: String)
    /// The tap is administratively down.
    case down(String)
    /// /dev/net/tun is missing (module tun not loaded).
    case noTunDevice(errno: Int32)
    /// Not allowed (needs CAP_NET_ADMIN).
    case permissionDenied(String, errno: Int32)
    /// The interface name is empty or longer than 15 bytes.
    case invalidName(String)
    /// A system call failed.
    case system(SystemError)

    public var description: String {
        switch self {
        case .notFound(let name):
            return "tap '\(name)' does not exist in this network namespace; remusd attaches to a persistent tap and never "
                + "creates one. Create it first: ip tuntap add mode tap \(name) && ip addr add 10.99.0.1/24 dev \(name) "
                + "&& ip link set \(name) up"
        case .notATap(let name):
            return "interface '\(name)' is not a tap device (TUNSETIFF refused it); give a tap created with "
                + "'ip tuntap add mode tap \(name)'"
        case .busy(let name):
            return "tap '\(name)' is already in use by another process (another remusd, a VM); each simulated guest "
                + "needs its own tap"
        case .noGuestAddress(let name, let detail):
            return "tap '\(name)' \(detail); the simulated guest sends from the tap's address + 1 to the tap's address. "
                + "Give it one: ip addr add 10.99.0.1/24 dev \(name)"
        case .down(let name):
            return "tap '\(name)' is down; frames written to it would be dropped. Bring it up: ip link set \(name) up"
        case .noTunDevice(let errno):
            return "cannot open /dev/net/tun (\(String(cString: strerror(errno)))); load the tun module: modprobe tun"
        case .permissionDenied(let name, let errno):
            return "not allowed to attach to tap '\(name)' (\(String(cString: strerror(errno)))); run as root or with CAP_NET_ADMIN"
        case .invalidName(let name):
            return "'\(name)' is not an interface name (1 to \(CTAP_NAME_MAX) bytes)"
        case .system(let error):
            return "\(error)"
        }
    }
}

/// A queue of an existing, persistent tap device: frames written to it enter the host as if a
/// guest had sent them, exactly like a Xen vif's guest traffic — they arrive as *ingress* on the
/// tap, where an output buffer's plug holds them (see `PlugOutputBuffer`).
///
/// Attaching never creates a device: the operator (or a test script) creates the tap with
/// `ip tuntap add mode tap <name>`, gives it an IPv4 address and brings it up. The "guest"
/// behind the tap is the tap's address + 1. Closing (deinit) detaches; the tap stays.
public final class TapDevice: Sendable {
    /// The tap's name.
    public let name: String
    /// The tap's own Ethernet address (the host side): guest frames are sent to it.
    public let hardwareAddress: [UInt8]
    /// The tap's IPv4 address (the host side).
    public let address: IPv4Address
    /// The tap's netmask.
    public let netmask: IPv4Address
    private let fd: Int32

    /// The guest's address behind the tap: the tap's address + 1.
    public var guestAddress: IPv4Address { IPv4Address(address.value &+ 1) }

    /// Attaches to the tap `name`. Checks, in order: the name, that it exists, that it is a
    /// persistent tap nobody else uses, that it has an IPv4 address whose + 1 is a host of the
    /// same subnet, and that it is up.
    public init(attaching name: String) throws(TapError) {
        guard !name.isEmpty, name.utf8.count <= Int(CTAP_NAME_MAX), !name.contains("/") else { throw .invalidName(name) }
        let fd = ctap_attach(name)
        if fd < 0 {
            switch -fd {
            case ENODEV, ENXIO: throw .notFound(name)
            case EINVAL: throw .notATap(name)
            case EBUSY: throw .busy(name)
            case EPERM, EACCES: throw .permissionDenied(name, errno: -fd)
            case ENOENT: throw .noTunDevice(errno: -fd)
            default: throw .system(SystemError(call: "attaching to tap \(name) (TUNSETIFF)", errno: -fd))
            }
        }
        do throws(TapError) {
            var mac = [UInt8](repeating: 0, count: 6)
            let rc = mac.withUnsafeMutableBufferPointer { ctap_hardware_address(name, $0.baseAddress!) }
            if rc < 0 { throw TapError.system(SystemError(call: "SIOCGIFHWADDR(\(name))", errno: -rc)) }
            var address: UInt32 = 0
            var netmask: UInt32 = 0
            let ipRC = ctap_ipv4_address(name, &address, &netmask)
            if ipRC == -EADDRNOTAVAIL { throw TapError.noGuestAddress(name, detail: "has no IPv4 address") }
            if ipRC < 0 { throw TapError.system(SystemError(call: "SIOCGIFADDR(\(name))", errno: -ipRC)) }
            let host = IPv4Address(UInt32(bigEndian: address))
            let mask = IPv4Address(UInt32(bigEndian: netmask))
            let guest = host.value &+ 1
            // The guest must be a host of the tap's subnet: same network, not its broadcast address.
            if guest & mask.value != host.value & mask.value || guest | mask.value == UInt32.max {
                throw TapError.noGuestAddress(name, detail: "has address \(host)/\(mask.value.nonzeroBitCount), whose next address \(IPv4Address(guest)) is not a host of its subnet")
            }
            let up = ctap_is_up(name)
            if up < 0 { throw TapError.system(SystemError(call: "SIOCGIFFLAGS(\(name))", errno: -up)) }
            if up == 0 { throw TapError.down(name) }
            self.hardwareAddress = mac
            self.address = host
            self.netmask = mask
        } catch {
            close(fd)
            throw error
        }
        self.name = name
        self.fd = fd
    }

    deinit { close(fd) }

    /// Writes one complete Ethernet frame into the tap (it arrives as the tap's ingress).
    public func write(frame: UnsafeRawBufferPointer) throws(TapError) {
        while true {
            let n = Glibc.write(fd, frame.baseAddress, frame.count)
            if n == frame.count { return }
            if n >= 0 { throw .system(SystemError(call: "write(\(name)): \(n) of \(frame.count) bytes", errno: EIO)) }
            let code = errno
            if code == EINTR { continue }
            throw .system(SystemError(call: "write(\(name))", errno: code))
        }
    }
}

/// Persistent taps for tests and tools (remusd itself only attaches to existing ones).
public enum TapAdministration {
    /// Creates the persistent tap `name` (as `ip tuntap add mode tap`).
    public static func create(_ name: String) throws(TapError) {
        let rc = ctap_create_persistent(name)
        if rc < 0 { throw .system(SystemError(call: "creating tap \(name)", errno: -rc)) }
    }

    /// Deletes the persistent tap `name` (as `ip tuntap del mode tap`).
    public static func delete(_ name: String) throws(TapError) {
        let rc = ctap_delete_persistent(name)
        if rc < 0 { throw .system(SystemError(call: "deleting tap \(name)", errno: -rc)) }
    }

    /// Sets the IPv4 address and netmask of `name` and brings it up (or down).
    public static func configure(_ name: String, address: IPv4Address, prefixLength: Int, up: Bool = true) throws(TapError) {
        precondition((0...32).contains(prefixLength), "prefix length \(prefixLength) is outside 0…32")
        let mask: UInt32 = prefixLength == 0 ? 0 : UInt32.max << (32 - prefixLength)
        let rc = ctap_configure_ipv4(name, address.value.bigEndian, mask.bigEndian, up ? 1 : 0)
        if rc < 0 { throw .system(SystemError(call: "configuring \(address)/\(prefixLength) on \(name)", errno: -rc)) }
    }
}
