import CXen
import Glibc
import RemusCore

/// What the Xen backend could not do, said so that an operator knows what stayed safe and what
/// to do next.
public struct XenBackendError: Error, Sendable, CustomStringConvertible {
    /// One or more sentences.
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A domain as libxenctrl reports it (`xc_domain_getinfolist`; `xc_domain_getinfo` is gone in
/// Xen 4.18).
struct XenDomainInfo {
    var domid: UInt32
    var flags: UInt32
    var maxPages: UInt64
    var handle: [UInt8]

    var isHVM: Bool { flags & UInt32(XEN_DOMINF_hvm_guest) != 0 }
    var isDying: Bool { flags & UInt32(XEN_DOMINF_dying) != 0 }
    var isPaused: Bool { flags & UInt32(XEN_DOMINF_paused) != 0 }
    var isShutDown: Bool { flags & UInt32(XEN_DOMINF_shutdown) != 0 }
    var shutdownReason: UInt32 { (flags >> UInt32(XEN_DOMINF_shutdownshift)) & UInt32(XEN_DOMINF_shutdownmask) }
    /// Shut down for a suspend (the state libxenguest needs before it takes a checkpoint).
    var isSuspended: Bool { isShutDown && shutdownReason == UInt32(SHUTDOWN_suspend) }

    /// The domain's UUID (its 16-byte handle).
    var uuid: GuestUUID {
        var high: UInt64 = 0, low: UInt64 = 0
        for i in 0..<8 { high = high << 8 | UInt64(handle[i]) }
        for i in 8..<16 { low = low << 8 | UInt64(handle[i]) }
        return GuestUUID(high: high, low: low)
    }

    /// The domain `domid`, nil when it does not exist.
    static func read(_ control: XenControl, domid: UInt32) -> XenDomainInfo? {
        var info = xc_domaininfo_t()
        let n = cxen_xc_domain_getinfolist(control.handle, domid, 1, &info)
        guard n == 1, UInt32(info.domain) == domid else { return nil }
        let handle = withUnsafeBytes(of: info.handle) { Array($0) }
        return XenDomainInfo(domid: domid, flags: info.flags, maxPages: UInt64(info.max_pages), handle: handle)
    }
}

/// What the hypervisor says about itself and a domain's HVM parameters.
extension XenControl {
    /// The hypervisor's capabilities (`xc_physinfo`: `XEN_SYSCTL_PHYSCAP_*` bits).
    func physicalCapabilities() throws(XenError) -> UInt32 {
        var info = xc_physinfo_t()
        _ = try log.check("xc_physinfo", { cxen_xc_physinfo(handle, &info) }, failed: { $0 != 0 })
        return info.capabilities
    }

    /// HVM parameter `param` (`HVM_PARAM_*`) of domain `domid`; nil when Xen would not say.
    func hvmParameter(domid: UInt32, _ param: Int32) -> UInt64? {
        var value: UInt64 = 0
        return cxen_xc_hvm_param_get(handle, domid, UInt32(param), &value) == 0 ? value : nil
    }
}

/// Domain-level toolstack operations through libxl.
extension XenLight {
    /// libxl's type of the domain (`c_info.type`) and its device model version
    /// (`b_info.device_model_version`), from the configuration libxl keeps for it.
    func domainType(domid: UInt32) throws(XenError) -> (type: libxl_domain_type, deviceModel: libxl_device_model_version) {
        var config = libxl_domain_config()
        cxen_libxl_domain_config_init(&config)
        defer { cxen_libxl_domain_config_dispose(&config) }
        let before = log.count
        let rc = cxen_libxl_retrieve_domain_configuration(context, domid, &config, nil)
        guard rc == 0 else { throw XenError(call: "libxl_retrieve_domain_configuration(\(domid))", libxl: rc, log: log.lines(since: before).map(\.description)) }
        return (config.c_info.type, config.b_info.device_model_version)
    }

    /// The id of the domain named `name`, nil when there is none.
    public func domid(named name: String) -> UInt32? {
        var id: UInt32 = 0
        return cxen_libxl_name_to_domid(context, name, &id) == 0 ? id : nil
    }

    /// The domain's configuration as libxl keeps it (`libxl_retrieve_domain_configuration`),
    /// in libxl's JSON: what `xl` itself sends ahead of a migration.
    public func configurationJSON(domid: UInt32) throws(XenError) -> String {
        var config = libxl_domain_config()
        cxen_libxl_domain_config_init(&config)
        defer { cxen_libxl_domain_config_dispose(&config) }
        let before = log.count
        let rc = cxen_libxl_retrieve_domain_configuration(context, domid, &config, nil)
        guard rc == 0 else { throw XenError(call: "libxl_retrieve_domain_configuration(\(domid))", libxl: rc, log: log.lines(since: before).map(\.description)) }
        guard let json = cxen_libxl_domain_config_to_json(context, &config) else {
            throw XenError(call: "libxl_domain_config_to_json", libxl: -1, log: log.lines(since: before).map(\.description))
        }
        defer { free(json) }
        return String(cString: json)
    }

    /// Destroys the domain (`libxl_domain_destroy`: devices, xenstore entries, the domain).
    public func destroy(domid: UInt32) throws(XenError) {
        let before = log.count
        let rc = cxen_libxl_domain_destroy(context, domid, nil)
        guard rc == 0 else { throw XenError(call: "libxl_domain_destroy(\(domid))", libxl: rc, log: log.lines(since: before).map(\.description)) }
    }

    /// Caps the domain's CPU time at `percent` of one CPU per vCPU (100: no cap), through the
    /// running scheduler's cap (credit and credit2 both have one).
    public func setCap(domid: UInt32, percent: Int) throws(XenError) {
        var params = libxl_domain_sched_params()
        cxen_libxl_domain_sched_params_init(&params)
        defer { cxen_libxl_domain_sched_params_dispose(&params) }
        let before = log.count
        var rc = cxen_libxl_domain_sched_params_get(context, domid, &params)
        if rc == 0 {
            params.cap = percent >= 100 ? 0 : Int32(max(1, percent))
            rc = cxen_libxl_domain_sched_params_set(context, domid, &params)
        }
        guard rc == 0 else { throw XenError(call: "libxl_domain_sched_params_set(\(domid), cap \(percent))", libxl: rc, log: log.lines(since: before).map(\.description)) }
    }

    /// Lets libxl reap only the children it spawned itself (the restore helper, hotplug
    /// scripts); remusd waits for its own (the fence command) with waitpid.
    public func reapOwnChildrenOnly() {
        var hooks = libxl_childproc_hooks()
        hooks.chldowner = libxl_sigchld_owner_libxl_always_selective_reap
        // SAFETY: libxl copies the pointer and reads the hooks while the context lives; they
        // are leaked deliberately (one small struct per context).
        let kept = UnsafeMutablePointer<libxl_childproc_hooks>.allocate(capacity: 1)
        kept.initialize(to: hooks)
        cxen_libxl_childproc_setmode(context, kept, nil)
    }
}

/// The network interfaces dom0 has for a domain's vifs (`vif<domid>.<n>`), sorted.
public func xenVifInterfaces(domid: UInt32, sysClassNet: String = "/sys/class/net") -> [String] {
    guard let dir = opendir(sysClassNet) else { return [] }
    defer { closedir(dir) }
    var names: [String] = []
    let prefix = "vif\(domid)."
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if name.hasPrefix(prefix), name.dropFirst(prefix.count).allSatisfy(\.isNumber) { names.append(name) }
    }
    return names.sorted()
}
