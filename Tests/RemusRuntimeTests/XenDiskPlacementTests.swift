import Glibc
import RemusCore
import RemusDisk
@testable import RemusRuntime
import RemusSystem
import RemusTestSupport
import RemusXen
import Testing

// A Xen guest's replicated disks (issue #12): the primary's `--xen-disk` values, and the backup
// building the domain on its own images in --disk-dir, each served through a loop device.

@Test func xenDiskValuesAreParsedOrRefusedWithTheReason() throws {
    let disk = try XenServedDisk.parse("xvda=/srv/vm1,disk.img,/dev/nbd0").get()
    // The image may contain commas: the device is after the last one.
    #expect(disk == XenServedDisk(vdev: "xvda", image: "/srv/vm1,disk.img", device: "/dev/nbd0"))
    for (bad, reason) in [("xvda=/srv/a.img", "vdev=image"), ("=/srv/a.img,/dev/nbd0", "disk name"),
                          ("a/b=/srv/a.img,/dev/nbd0", "disk name"), ("xvda=srv/a.img,/dev/nbd0", "absolute"),
                          ("xvda=/srv/a.img,/dev/sda", "NBD device"), ("xvda=/srv/a.img,/dev/nbdx", "NBD device")] {
        guard case .failure(let why) = XenServedDisk.parse(bad) else {
            Issue.record("'\(bad)' was accepted")
            continue
        }
        #expect("\(why)".contains(reason), "'\(bad)': \(why)")
    }
}

// A guest's partition table counts in 512-byte sectors: the disk is served with them, and its
// size is the image's whole sectors (an image of 1.5 KiB is a disk of three, not none).
@Test func aServedXenDiskHas512ByteSectors() throws {
    let directory = try makeTemporaryDirectory("remusd-served")
    defer { removeTemporaryDirectory(directory) }
    let image = directory + "/xvda.img"
    let fd = open(image, O_CREAT | O_WRONLY, 0o600)
    #expect(fd >= 0)
    #expect(ftruncate(fd, 1536 + 100) == 0)
    close(fd)
    let disk = try XenServedDisks.journalDisk(XenServedDisk(vdev: "xvda", image: image, device: "/dev/nbd0"))
    #expect(disk.blockSize == 512)
    #expect(disk.sizeBytes == 1536)
    #expect(throws: (any Error).self) { try XenServedDisks.journalDisk(XenServedDisk(vdev: "xvdb", image: directory, device: "/dev/nbd1")) }
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aXenBackupBuildsTheDomainOnLoopDevicesOverItsOwnImages() throws {
    let directory = try makeTemporaryDirectory("remusd-placement")
    defer { removeTemporaryDirectory(directory) }
    let json = #"{"c_info": {"name": "g1"}, "b_info": {"max_memkb": 4096}, "disks": [{"pdev_path": "/dev/nbd0", "vdev": "xvda", "backend": "phy", "format": "raw", "readwrite": 1}]}"#
    let config = DomainConfig(format: .libxlJSON, bytes: Array(json.utf8))
    let described = [DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: 1 << 20, name: "xvda")]

    // No image yet: refused naming the command that makes one, nothing attached.
    do {
        _ = try BackendFactory.placeDisks(config, described: described, directory: directory)
        Issue.record("a disk without an image was placed")
    } catch {
        #expect("\(error)".contains("truncate -s 1048576 \(directory)/xvda"), "\(error)")
    }

    // A disk name from the network that is not a plain file name never reaches a loop device:
    // even an existing file outside the directory (here /etc/hostname through '..') is refused.
    for hostile in ["../../../../etc/hostname", ".remusd-redo.log", "a/b"] {
        let named = [DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: 4096, name: hostile)]
        do {
            _ = try BackendFactory.placeDisks(config, described: named, directory: directory)
            Issue.record("disk name '\(hostile)' was placed")
        } catch {
            #expect("\(error)".contains("not a plain file name"), "\(hostile): \(error)")
        }
    }

    let image = try DiskFile(path: directory + "/xvda", create: true)
    try image.truncate(to: 1 << 20)
    let (placed, held) = try BackendFactory.placeDisks(config, described: described, directory: directory)
    let loop = try #require(held.first as? LoopDevice)
    #expect(held.count == 1)
    #expect(loop.backingFile == directory + "/xvda")
    #expect(try XenDomainDisks.list(placed.bytes) == [XenDomainDisk(vdev: "xvda", pdevPath: loop.path, writable: true)])
}

// An image that is a block device (a logical volume; a loop device stands in for it) is served
// as it is: on the primary its size is the device's, and a backup whose disk directory links to
// one builds the domain on that device, with no loop device in between.
@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aXenDiskMayBeALogicalVolumeOnEitherSide() throws {
    let directory = try makeTemporaryDirectory("remusd-volume")
    defer { removeTemporaryDirectory(directory) }
    let backing = try DiskFile(path: directory + "/backing", create: true)
    try backing.truncate(to: (2 << 20) + 512)
    let volume = try LoopDevice(imagePath: directory + "/backing")

    let disk = try XenServedDisks.journalDisk(XenServedDisk(vdev: "xvda", image: volume.path, device: "/dev/nbd0"))
    #expect(disk.sizeBytes == (2 << 20) + 512)
    #expect(disk.blockSize == 512)

    let disks = directory + "/disks"
    #expect(mkdir(disks, 0o700) == 0)
    #expect(symlink(volume.path, disks + "/xvda") == 0)
    let json = #"{"c_info": {"name": "g1"}, "b_info": {"max_memkb": 4096}, "disks": [{"pdev_path": "/dev/nbd0", "vdev": "xvda", "backend": "phy", "format": "raw", "readwrite": 1}]}"#
    let config = DomainConfig(format: .libxlJSON, bytes: Array(json.utf8))
    let described = [DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 2 << 20, name: "xvda")]
    let (placed, held) = try BackendFactory.placeDisks(config, described: described, directory: disks)
    #expect(held.isEmpty, "a loop device was attached over a block device")
    #expect(try XenDomainDisks.list(placed.bytes) == [XenDomainDisk(vdev: "xvda", pdevPath: volume.path, writable: true)])

    // A volume with 4 KiB logical sectors (a 4Kn disk's) for a disk served with 512-byte ones:
    // refused, as the guest would see other sectors after a failover.
    let (status, output) = try runTestShell("losetup -b 4096 -f --show \(directory)/backing", timeoutMs: 30_000)
    try #require(status == 0, "losetup -b 4096: \(output)")
    let large = String(output.split(separator: "\n").first ?? "")
    defer { _ = try? runTestShell("losetup -d \(large)", timeoutMs: 30_000) }
    #expect(unlink(disks + "/xvda") == 0 && symlink(large, disks + "/xvda") == 0)
    do {
        _ = try BackendFactory.placeDisks(config, described: described, directory: disks)
        Issue.record("a volume with 4096-byte sectors was placed for a disk of 512-byte ones")
    } catch {
        #expect("\(error)".contains("4096-byte logical sectors"), "\(error)")
    }
}
