import Glibc
import RemusSystem
import RemusTestSupport
import Testing
@testable import RemusDisk

// A Xen backup serves its copy of a replicated disk to the guest through a loop device
// (blkback serves block devices): what the backup's apply writes to the image is what the
// device reads, and a device nobody uses any more is gone. Needs root and the loop driver.

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aLoopDeviceReadsWhatIsWrittenToItsImageAndGoesAwayWhenReleased() throws {
    let scratch = try Scratch("loop")
    try scratch.image("xvda", size: 1 << 20)
    let imagePath = scratch.path + "/xvda"
    var loop: LoopDevice? = try LoopDevice(imagePath: imagePath)
    let path = try #require(loop?.path)
    #expect(path.hasPrefix("/dev/loop"))
    #expect(loop?.backingFile == imagePath)

    // Written to the image as the backup's apply writes it, after the device was attached.
    let image = try DiskFile(path: imagePath, create: false)
    let block = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
    try block.withUnsafeBytes { try image.write($0, at: 8192) }
    let device = open(path, O_RDONLY | O_CLOEXEC)
    #expect(device >= 0)
    var read = [UInt8](repeating: 0, count: 4096)
    let n = read.withUnsafeMutableBytes { pread(device, $0.baseAddress, 4096, 8192) }
    close(device)
    #expect(n == 4096)
    #expect(read.elementsEqual(block))

    // Released: the kernel detaches it (LO_FLAGS_AUTOCLEAR), asynchronously; wait for that with a deadline.
    loop = nil
    let name = String(path.dropFirst("/dev/".count))
    let deadline = Deadline.after(seconds: 10)
    while readWholeFile("/sys/block/\(name)/loop/backing_file") != nil && !deadline.hasPassed { pauseBriefly(ms: 20) }
    #expect(readWholeFile("/sys/block/\(name)/loop/backing_file") == nil, "\(path) still attached 10 s after its last user closed it")
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aMissingImageAttachesNothingAndSaysWhich() {
    do {
        _ = try LoopDevice(imagePath: "/nonexistent/remusd-test/xvda")
        Issue.record("a missing image was attached")
    } catch {
        #expect("\(error)".contains("/nonexistent/remusd-test/xvda"))
    }
}
