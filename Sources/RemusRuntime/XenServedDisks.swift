import Glibc
import RemusCore
import RemusDisk
import RemusSystem
import RemusXen

/// A Xen guest's disks as the primary serves them (`--xen-disk`): each image served to dom0's
/// kernel as `/dev/nbdN` by an `NBDServer`, whose every write, flush, discard and write-zeroes is
/// applied to the image, then journaled (`DiskJournal`), then answered — so a completion the
/// guest can see in checkpoint N's memory is in checkpoint N or earlier (I9). blkback serves the
/// device to the domain (`phy:/dev/nbdN`).
///
/// The guest's disk lives in this process: while the domain runs, the devices are served, after
/// protection has ended too (`serveUntilGone`).
final class XenServedDisks: @unchecked Sendable {  // immutable after init
    let disks: [XenServedDisk]
    let journal: DiskJournal
    private let servers: [NBDServer]
    private var devices: [NBDKernelDevice] = []

    /// Opens and locks each image and attaches it to its NBD device. Throws, with nothing left
    /// attached, naming the disk and what to do.
    init(_ disks: [XenServedDisk]) throws {
        self.disks = disks
        // DiskJournal opens, checks and locks each image.
        let journal = try DiskJournal(disks.map(Self.journalDisk), create: false)
        self.journal = journal
        servers = try zip(journal.descriptors, journal.images).map { descriptor, file in
            try NBDServer(socketPath: nil, descriptor: descriptor, image: file,
                          record: { try journal.record($0) }, log: { Log.warning($0) })
        }
        do {
            for (disk, server) in zip(disks, servers) {
                devices.append(try NBDKernelDevice(devicePath: disk.device, server: server))
                Log.info("serving disk '\(disk.vdev)' (\(disk.image), \(server.descriptor.sizeBytes >> 20) MiB) as \(disk.device); every write is replicated with the checkpoints")
            }
        } catch {
            let failed = disks[devices.count]
            detach()
            throw ProtocolError("disk '\(failed.vdev)': cannot serve it as \(failed.device): \(error); nothing is served")
        }
    }

    /// The disk `served` is: its image's whole 512-byte sectors, served with 512-byte sectors.
    /// 512, not 4096: a guest's partition table counts in the sectors its image was made with,
    /// almost always 512 bytes, and the backup's loop device has 512-byte sectors too. Served
    /// with 4 KiB sectors, an MBR or GPT image has its partitions misplaced. The image is a file
    /// or a block device (an LVM logical volume, a partition).
    static func journalDisk(_ served: XenServedDisk) throws -> DiskJournal.Disk {
        guard let size = DiskFile.imageSize(atPath: served.image) else {
            throw ProtocolError("disk '\(served.vdev)': its image \(served.image) is missing, unreadable, or neither a regular file nor a block device; nothing was served — give an existing image file or logical volume")
        }
        return DiskJournal.Disk(name: served.vdev, path: served.image, sizeBytes: size / 512 * 512, blockSize: 512)
    }

    /// vdev → the device it is served on.
    var served: [String: String] { Dictionary(uniqueKeysWithValues: disks.map { ($0.vdev, $0.device) }) }

    /// Detaches every device (the kernel flushes what it queued first; each bounded).
    func detach() {
        for (disk, device) in zip(disks, devices) where !device.detach() {
            Log.error("\(disk.device) did not detach within its deadline; 'nbd-client -d \(disk.device)' frees it")
        }
        devices = []
    }

    /// After protection ended: the domain still runs on these devices, so they are served
    /// until it is gone (`isGone`, polled every 200 ms; a domain shut down, destroyed or
    /// migrated away), then detached. This wait ends with the domain, which is the operator's.
    func serveUntilGone(domain: String, isGone: () -> Bool) {
        if !isGone() {
            Log.info("protection has ended; domain '\(domain)' still runs on \(disks.map(\.device).joined(separator: ", ")), which stay served until it is shut down")
            while !isGone() { sleepNanoseconds(200_000_000) }
        }
        detach()
        Log.info("domain '\(domain)' is gone: \(disks.map(\.device).joined(separator: ", ")) detached")
    }
}
