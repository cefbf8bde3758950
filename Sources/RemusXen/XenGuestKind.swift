import CXen

/// What kind of Xen guest a domain is: it decides how the domain is suspended, whether a device
/// model's state travels with each checkpoint, and which paging mode its log-dirty needs.
public enum XenGuestKind: String, Sendable, Equatable, CustomStringConvertible {
    /// Paravirtualised: no HVM container; log-dirty needs the hypervisor's shadow paging.
    case pv = "PV"
    /// An HVM container without a device model (libxl `type = "pvh"`): log-dirty through HAP;
    /// libxenguest writes all of its state itself.
    case pvh = "PVH"
    /// Fully virtualised with a QEMU device model (libxl `type = "hvm"`): log-dirty through HAP,
    /// plus QEMU's device state in every checkpoint.
    case hvm = "HVM"

    /// E.g. `"PVH"`.
    public var description: String { rawValue }

    /// The kind from what Xen and libxl say about the domain: the hypervisor's HVM flag
    /// (`XEN_DOMINF_hvm_guest`), libxl's `c_info.type` and, for HVM, `b_info.device_model_version`
    /// (libxl's stored configuration has its defaults filled in).
    ///
    /// The hypervisor's flag decides PV against an HVM container; libxl's type tells PVH from HVM
    /// (Xen itself does not know whether a device model serves the domain). Throws when the two
    /// disagree or the device model is one remusd cannot drive.
    static func classify(domain: String, hvmContainer: Bool, configType: libxl_domain_type,
                         deviceModel: libxl_device_model_version) throws(XenBackendError) -> XenGuestKind {
        guard hvmContainer else { return .pv }
        switch configType {
        case LIBXL_DOMAIN_TYPE_PVH:
            return .pvh
        case LIBXL_DOMAIN_TYPE_HVM:
            guard deviceModel != LIBXL_DEVICE_MODEL_VERSION_QEMU_XEN_TRADITIONAL else {
                throw XenBackendError("domain '\(domain)' is an HVM guest served by the old 'qemu-xen-traditional' device model, which has no QMP to save its state per checkpoint; remusd drives upstream QEMU only (device_model_version = \"qemu-xen\", Debian's qemu-system-xen). Nothing was changed; the guest runs on unprotected")
            }
            return .hvm
        default:
            throw XenBackendError("domain '\(domain)' runs in an HVM container, but libxl's configuration of it says type '\(Self.libxlTypeName(configType))'; remusd protects domains that xl/libxl created, as PV, PVH or HVM. Nothing was changed; the guest runs on unprotected")
        }
    }

    private static func libxlTypeName(_ type: libxl_domain_type) -> String {
        switch type {
        case LIBXL_DOMAIN_TYPE_PV: "pv"
        case LIBXL_DOMAIN_TYPE_PVH: "pvh"
        case LIBXL_DOMAIN_TYPE_HVM: "hvm"
        default: "invalid (\(type.rawValue))"
        }
    }
}

/// What the hypervisor can do for log-dirty, from `xc_physinfo`'s capabilities: PV guests need
/// shadow paging, PVH and HVM guests hardware-assisted paging (HAP: Intel EPT, AMD NPT).
struct XenPagingSupport: Sendable, Equatable {
    /// `XEN_SYSCTL_PHYSCAP_shadow`: the hypervisor is built with shadow paging.
    var shadow: Bool
    /// `XEN_SYSCTL_PHYSCAP_hap`: the CPU has HAP and Xen uses it.
    var hap: Bool

    init(shadow: Bool, hap: Bool) {
        self.shadow = shadow
        self.hap = hap
    }

    /// From `xen_sysctl_physinfo.capabilities`.
    init(capabilities: UInt32) {
        shadow = capabilities & UInt32(XEN_SYSCTL_PHYSCAP_shadow) != 0
        hap = capabilities & UInt32(XEN_SYSCTL_PHYSCAP_hap) != 0
    }

    /// Why `kind` cannot be checkpointed on this hypervisor, nil when it can. Asked before
    /// anything changes on the domain.
    ///
    /// PV log-dirty runs on shadow paging; Debian's current hypervisors (4.17.7 and 4.20) are
    /// built without it since XSA-495 deprecated shadow paging, and there libxenguest fails to
    /// enable log-dirty with EOPNOTSUPP (95) — after `xl remus` has already started its stream.
    /// PVH and HVM log-dirty runs on HAP, or on shadow paging where there is no HAP.
    func refusal(kind: XenGuestKind, domain: String, version: XenVersion) -> XenBackendError? {
        switch kind {
        case .pv:
            guard !shadow else { return nil }
            let alternative = hap
                ? "Convert the guest to PVH (type = \"pvh\" in its xl configuration, with the same kernel) or to HVM: both are checkpointed through hardware-assisted paging (HAP), which this host has."
                : "PVH and HVM guests would need hardware-assisted paging (HAP: Intel EPT or AMD NPT), which this host does not offer either: run the guest on a host with HAP (and convert it to PVH or HVM) or on a hypervisor built with shadow paging."
            return XenBackendError("domain '\(domain)' is a PV guest, and PV guests need shadow paging for log-dirty (the dirty-page tracking every checkpoint depends on); this hypervisor (Xen \(version)) is built without shadow paging — Debian's 4.17.7 and 4.20 are, since XSA-495. Xen's own 'xl remus' stops on it with \"Failed to enable logdirty: 95\". Nothing was changed: the guest runs on unprotected. \(alternative)")
        case .pvh, .hvm:
            guard !hap && !shadow else { return nil }
            return XenBackendError("domain '\(domain)' is a \(kind) guest, and \(kind) log-dirty needs hardware-assisted paging (HAP: Intel EPT or AMD NPT) or shadow paging; this host (Xen \(version)) offers neither. Nothing was changed: the guest runs on unprotected. Run it on a host whose CPU has HAP ('xl info' lists \"hap\" in virt_caps; under QEMU's TCG, -cpu qemu64,+svm,+npt).")
        }
    }
}
