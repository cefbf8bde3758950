// A disk image as a block device on the backup: a Xen guest's disk is served by blkback from a
// block device (`phy:`), and the backup's copy of it is a file in --disk-dir.
import CDisk
import Glibc
import RemusSystem

/// An image file attached to a free `/dev/loopN`, detached by the kernel once its last user has
/// closed it (LO_FLAGS_AUTOCLEAR): while this value lives it is such a user; blkback, once it
/// serves the device to a guest, is another, so a guest that took over keeps its disk after
/// remusd let go, and a device nobody took is gone when this value is.
///
/// Reads through the device see the file's page cache, so writes made to the image with
/// `DiskFile` (the backup's apply) are what the guest reads.
public final class LoopDevice: @unchecked Sendable {  // immutable
    /// `/dev/loopN`.
    public let path: String
    /// The image behind it.
    public let imagePath: String
    private let descriptor: OwnedDescriptor

    /// Attaches `imagePath` (opened read-write) to a free loop device. Throws, with nothing
    /// attached, when the image cannot be opened or the host has no free loop device.
    public init(imagePath: String) throws(SystemError) {
        self.imagePath = imagePath
        let image = OwnedDescriptor(adopting: try syscall("open(\(imagePath))") { open(imagePath, O_RDWR | O_CLOEXEC) })
        var number: Int32 = -1
        let fd = remus_loop_attach(image.raw, 0, &number)
        guard fd >= 0 else {
            let code = errno
            throw SystemError(call: "attach \(imagePath) to a loop device", errno: code,
                              detail: code == ENOENT ? "this host has no /dev/loop-control: load the loop module (modprobe loop)" : nil)
        }
        descriptor = OwnedDescriptor(adopting: fd)
        path = "/dev/loop\(number)"
        // The loop device holds its own reference to the file; `image` closes here.
    }

    /// The image the kernel says backs this device (`/sys/block/loopN/loop/backing_file`), for checks.
    public var backingFile: String? {
        let name = path.split(separator: "/").last.map(String.init) ?? ""
        guard let text = readWholeFile("/sys/block/\(name)/loop/backing_file") else { return nil }
        return String(text.split(separator: "\n").first ?? "")
    }
}
