import RemusXen
import Testing

// A Xen guest's disks (issue #12): the primary protects a domain only when every disk it can
// write is one remusd serves, and the backup builds the domain on its own copies of them.
// Pure Swift on libxl JSON, no Xen needed.

/// A libxl JSON configuration with these disks: (vdev, pdev_path, readwrite, is_cdrom).
private func config(_ disks: [(String, String, Int, Int)]) -> [UInt8] {
    let items = disks.map { vdev, path, rw, cdrom in
        "{\"backend_domid\": 0, \"pdev_path\": \"\(path)\", \"vdev\": \"\(vdev)\", \"backend\": \"qdisk\", \"format\": \"qcow2\", \"script\": \"block-custom\", \"readwrite\": \(rw), \"is_cdrom\": \(cdrom)}"
    }
    return Array("""
    {"c_info": {"name": "g1", "type": "pv"}, "b_info": {"max_memkb": 131072},
     "disks": [\(items.joined(separator: ", "))],
     "nics": [{"mac": "00:16:3e:5e:00:02", "bridge": "xenbr0"}]}
    """.utf8)
}

private func refusal(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch { return "\(error)" }
}

@Test func theDisksOfAConfigurationAreRead() throws {
    let disks = try XenDomainDisks.list(config([("xvda", "/dev/nbd0", 1, 0), ("xvdb", "/srv/iso", 0, 1)]))
    #expect(disks == [XenDomainDisk(vdev: "xvda", pdevPath: "/dev/nbd0", writable: true),
                      XenDomainDisk(vdev: "xvdb", pdevPath: "/srv/iso", writable: false, isCdrom: true)])
    // libxl leaves out a flag at its default (0): a disk without readwrite is read-only.
    let bare = try XenDomainDisks.list(Array(#"{"disks": [{"vdev": "xvdc", "pdev_path": "/x"}]}"#.utf8))
    #expect(bare == [XenDomainDisk(vdev: "xvdc", pdevPath: "/x", writable: false)])
    #expect(try XenDomainDisks.list(Array(#"{"c_info": {}}"#.utf8)).isEmpty)
    #expect(refusal { _ = try XenDomainDisks.list(Array(#"{"disks": [{"pdev_path": "/x"}]}"#.utf8)) } != nil)
    #expect(refusal { _ = try XenDomainDisks.list(Array("not json".utf8)) } != nil)
}

@Test func thePrimaryProtectsADomainOnlyWhenEveryWritableDiskIsServedByRemusd() throws {
    let disks = try XenDomainDisks.list(config([("xvda", "/dev/nbd0", 1, 0), ("xvdb", "/srv/ro.img", 0, 0), ("hdc", "/srv/cd.iso", 1, 1)]))
    // Served from the device it uses; a read-only disk and a CD-ROM need no replication.
    #expect(refusal { try XenDomainDisks.checkServed(disks, served: ["xvda": "/dev/nbd0"], domain: "g1") } == nil)

    // A writable disk remusd does not serve would lose its last writes at a failover.
    let unserved = try #require(refusal { try XenDomainDisks.checkServed(disks, served: [:], domain: "g1") })
    #expect(unserved.contains("'xvda'") && unserved.contains("--xen-disk xvda=IMAGE,/dev/nbdN"))

    // Served, but the domain uses another device for it: its writes bypass remusd.
    let elsewhere = try #require(refusal { try XenDomainDisks.checkServed(disks, served: ["xvda": "/dev/nbd1"], domain: "g1") })
    #expect(elsewhere.contains("/dev/nbd0") && elsewhere.contains("phy:/dev/nbd1,xvda,w"))

    // A disk the domain does not have.
    let missing = try #require(refusal { try XenDomainDisks.checkServed(disks, served: ["xvda": "/dev/nbd0", "xvdz": "/dev/nbd3"], domain: "g1") })
    #expect(missing.contains("no disk 'xvdz'"))

    // Serving a read-only disk is a mistake worth naming, not a silent no-op.
    let readOnly = try #require(refusal { try XenDomainDisks.checkServed(disks, served: ["xvda": "/dev/nbd0", "xvdb": "/srv/ro.img"], domain: "g1") })
    #expect(readOnly.contains("read-only"))

    // A domain without disks needs nothing served.
    #expect(refusal { try XenDomainDisks.checkServed([], served: [:], domain: "g1") } == nil)
}

@Test func theBackupBuildsTheDomainOnItsOwnCopiesOfTheReplicatedDisks() throws {
    let original = config([("xvda", "/dev/nbd0", 1, 0), ("xvdb", "/etc/xen/ro.img", 0, 0)])
    let placed = try XenDomainDisks.placing(original, devices: ["xvda": "/dev/loop7"])
    let disks = try XenDomainDisks.list(placed)
    #expect(disks == [XenDomainDisk(vdev: "xvda", pdevPath: "/dev/loop7", writable: true),
                      XenDomainDisk(vdev: "xvdb", pdevPath: "/etc/xen/ro.img", writable: false)])
    let text = String(decoding: placed, as: UTF8.self)
    // The replicated disk is a raw block device with libxl's own script; the rest is kept.
    #expect(text.contains(#""backend":"phy""#) && text.contains(#""format":"raw""#))
    #expect(text.components(separatedBy: "block-custom").count == 2)  // only xvdb keeps its script
    #expect(text.contains(#""bridge":"xenbr0""#) && text.contains(#""max_memkb":131072"#))

    // A writable disk the primary does not replicate has no copy here.
    let unreplicated = try #require(refusal { _ = try XenDomainDisks.placing(original, devices: [:]) })
    #expect(unreplicated.contains("'xvda'"))
    // A replicated disk the configuration lacks.
    let stray = try #require(refusal { _ = try XenDomainDisks.placing(original, devices: ["xvda": "/dev/loop7", "xvdq": "/dev/loop8"]) })
    #expect(stray.contains("'xvdq'"))
}

@Test func theHostPathPolicyDoesNotApplyToDisksTheBackupServesFromItsOwnCopies() throws {
    let json = config([("xvda", "/dev/nbd0", 1, 0), ("xvdb", "/srv/other.img", 0, 0)])
    let policy = XenPathPolicy()
    // Unexempted, /dev/nbd0 is outside the allowed directories.
    #expect(refusal { try policy.check(json) }?.contains("/dev/nbd0") == true)
    let replaced = XenDomainDisks.replacedPaths(json, vdevs: ["xvda"])
    #expect(replaced == ["disks[0].pdev_path", "disks[0].script"])
    // Exempt for the replicated disk; the other disk's path is still checked.
    let why = try #require(refusal { try policy.check(json, replaced: replaced) })
    #expect(why.contains("/srv/other.img") && !why.contains("/dev/nbd0"))
    // xvdb's own script (block-custom, under /etc/xen/scripts) is still checked too.
    let srvOnly = XenPathPolicy(allowedDirectories: ["/srv"])
    #expect(refusal { try srvOnly.check(json, replaced: replaced) }?.contains("disks[1].script") == true)
    let allowed = XenPathPolicy(allowedDirectories: ["/srv", "/etc/xen"])
    #expect(refusal { try allowed.check(json, replaced: replaced) } == nil)
}
