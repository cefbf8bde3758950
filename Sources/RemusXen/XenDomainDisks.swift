import RemusCore

/// A disk of a Xen domain as its libxl JSON configuration (`disks[]`) declares it.
public struct XenDomainDisk: Equatable, Sendable {
    /// The guest's name for it (`xvda`): the name remusd replicates it under.
    public var vdev: String
    /// What dom0 serves it from (`/dev/nbd0`, an image, an LV).
    public var pdevPath: String
    /// Writable by the guest (`readwrite: 1`); a read-only disk never changes.
    public var writable: Bool
    /// A CD-ROM drive (never written).
    public var isCdrom: Bool

    public init(vdev: String, pdevPath: String, writable: Bool, isCdrom: Bool = false) {
        self.vdev = vdev
        self.pdevPath = pdevPath
        self.writable = writable
        self.isCdrom = isCdrom
    }

    /// Whether the guest can change it: a writable disk that is not a CD-ROM.
    public var changes: Bool { writable && !isCdrom }
}

/// The disks of a Xen domain's configuration, and the two things remusd does with them: the
/// primary checks that every disk the guest can write is one it serves (a write that bypassed
/// remusd would be missing on the backup after a failover: I9), and the backup points each
/// replicated disk at its own copy before it builds the domain. Pure, on bytes (the backup's
/// come from the network).
public enum XenDomainDisks {
    /// The disks `json` declares (none when it has no `disks`).
    public static func list(_ json: [UInt8]) throws -> [XenDomainDisk] {
        guard let document = QMPValue.parse(json), case .object(let top) = document else {
            throw XenBackendError("the domain configuration is not a libxl JSON object")
        }
        guard let disks = top["disks"] else { return [] }
        guard case .array(let items) = disks else { throw XenBackendError("the domain configuration's 'disks' is not a list") }
        return try items.enumerated().map { i, item in
            guard case .object(let d) = item, let vdev = d["vdev"]?.stringValue, !vdev.isEmpty else {
                throw XenBackendError("disk \(i) of the domain configuration has no vdev")
            }
            return XenDomainDisk(vdev: vdev, pdevPath: d["pdev_path"]?.stringValue ?? "",
                                 writable: Self.flag(d["readwrite"]), isCdrom: Self.flag(d["is_cdrom"]))
        }
    }

    /// libxl writes its integer flags as numbers (and leaves out a flag at its default, 0).
    private static func flag(_ value: QMPValue?) -> Bool {
        switch value {
        case .integer(let n): return n != 0
        case .bool(let b): return b
        default: return false
        }
    }

    /// On the primary: every disk the domain can write must be served by remusd (`served`:
    /// vdev → the device remusd serves it on, `/dev/nbdN`), and every served disk must be one
    /// the domain uses from that device. Throws naming the first disk that breaks this.
    public static func checkServed(_ disks: [XenDomainDisk], served: [String: String], domain: String) throws {
        for (vdev, device) in served.sorted(by: { $0.key < $1.key }) {
            guard let disk = disks.first(where: { $0.vdev == vdev }) else {
                throw XenBackendError("domain '\(domain)' has no disk '\(vdev)' (it has \(disks.isEmpty ? "none" : disks.map { "'\($0.vdev)'" }.joined(separator: ", "))); --xen-disk names the guest's own disk name (vdev) and the device it uses")
            }
            guard disk.pdevPath == device else {
                throw XenBackendError("domain '\(domain)' uses '\(disk.pdevPath)' for its disk '\(vdev)', not \(device) which remusd serves: its writes would bypass remusd and be missing on the backup after a failover. Create the domain with disk = ['phy:\(device),\(vdev),w'] while remusd serves the image")
            }
            guard disk.changes else {
                throw XenBackendError("domain '\(domain)' uses \(device) as a read-only disk or CD-ROM '\(vdev)': there is nothing to replicate; leave it out of --xen-disk")
            }
        }
        if let unserved = disks.first(where: { $0.changes && served[$0.vdev] == nil }) {
            throw XenBackendError("domain '\(domain)' writes to its disk '\(unserved.vdev)' (\(unserved.pdevPath)), which remusd does not serve: after a failover the backup would run the guest on a disk that lacks its last writes (file-system corruption). Serve it with --xen-disk \(unserved.vdev)=IMAGE,/dev/nbdN and create the domain on that device (Docs/disks.md), or make the disk read-only")
        }
    }

    /// On the backup: `json` with each disk whose vdev is in `devices` served from that block
    /// device (`backend: phy`, `format: raw`, no script), so the domain built from the stream
    /// runs on the backup's copy. Every disk the guest can write must be among them: a disk the
    /// primary does not replicate has no copy here. Throws before anything is built.
    public static func placing(_ json: [UInt8], devices: [String: String]) throws -> [UInt8] {
        guard let document = QMPValue.parse(json), case .object(var top) = document else {
            throw XenBackendError("the primary's domain configuration is not a libxl JSON object; nothing was built")
        }
        var placed = Set<String>()
        if let disks = top["disks"] {
            guard case .array(var items) = disks else { throw XenBackendError("the primary's domain configuration's 'disks' is not a list; nothing was built") }
            for i in items.indices {
                guard case .object(var d) = items[i], let vdev = d["vdev"]?.stringValue else {
                    throw XenBackendError("disk \(i) of the primary's domain configuration has no vdev; nothing was built")
                }
                guard let device = devices[vdev] else {
                    if flag(d["readwrite"]) && !flag(d["is_cdrom"]) {
                        throw XenBackendError("the primary's guest writes to its disk '\(vdev)', which it does not replicate to this backup: a guest taking over here would lack its writes; nothing was built")
                    }
                    continue
                }
                d["pdev_path"] = .string(device)
                d["backend"] = .string("phy")
                d["format"] = .string("raw")
                d["script"] = nil
                items[i] = .object(d)
                placed.insert(vdev)
            }
            top["disks"] = .array(items)
        }
        if let missing = devices.keys.sorted().first(where: { !placed.contains($0) }) {
            throw XenBackendError("the primary replicates a disk '\(missing)' that its domain configuration does not have; nothing was built")
        }
        return Array(QMPValue.object(top).json.utf8)
    }

    /// The places (`disks[i].pdev_path`, `disks[i].script`) a backup replaces with its own
    /// (`placing`): the host-path policy does not apply to what the primary named there.
    public static func replacedPaths(_ json: [UInt8], vdevs: Set<String>) -> Set<String> {
        guard let disks = try? list(json) else { return [] }
        let indices = disks.enumerated().filter { vdevs.contains($0.element.vdev) }.map(\.offset)
        return Set(indices.flatMap { ["disks[\($0)].pdev_path", "disks[\($0)].script"] })
    }
}
