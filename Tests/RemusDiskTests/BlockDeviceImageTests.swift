import Glibc
import RemusCore
import RemusSystem
import RemusTestSupport
import Testing
@testable import RemusDisk

// A disk image may be a block device (an LVM logical volume, a partition), on the primary and in
// a backup's disk directory. A loop device over a scratch file stands in for the volume. Needs
// root and the loop driver.

/// A loop device over a scratch file of `size` bytes, and the file: the test's "logical volume".
private func scratchVolume(_ scratch: Scratch, size: UInt64) throws -> (LoopDevice, file: String) {
    try scratch.image("backing", size: size)
    return (try LoopDevice(imagePath: scratch.path + "/backing"), scratch.path + "/backing")
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aBlockDeviceImageHasTheDevicesSizeAndCannotBeResized() throws {
    let scratch = try Scratch("blockdev")
    let (volume, _) = try scratchVolume(scratch, size: 3 << 20)
    let image = try DiskFile(path: volume.path, create: false)
    #expect(image.isBlockDevice)
    #expect(try image.size() == 3 << 20)  // a block device's st_size is 0: this is BLKGETSIZE64
    #expect(DiskFile.imageSize(atPath: volume.path) == 3 << 20)
    do {
        try image.truncate(to: 4 << 20)
        Issue.record("a block device was resized")
    } catch {
        #expect("\(error)".contains("fixed"), "\(error)")
    }
    #expect(DiskFile.imageSize(atPath: scratch.path) == nil, "a directory is no image")
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aBlockDeviceImageIsOpenedExclusively() throws {
    let scratch = try Scratch("blockdev-excl")
    let (volume, _) = try scratchVolume(scratch, size: 1 << 20)
    let first = try DiskFile(path: volume.path, create: false)
    // A second opener (another remusd, a mount) is refused while the first holds it, saying why.
    do {
        _ = try DiskFile(path: volume.path, create: false)
        Issue.record("a block device image was opened twice")
    } catch {
        #expect("\(error)".contains("in use"), "\(error)")
    }
    _ = first
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aBlockDeviceImageReadsWhatWasWrittenAroundItsPageCache() throws {
    let scratch = try Scratch("blockdev-cache")
    let (volume, backing) = try scratchVolume(scratch, size: 1 << 20)
    let old = [UInt8](repeating: 0x11, count: 4096), new = [UInt8](repeating: 0x22, count: 4096)
    var read = [UInt8](repeating: 0, count: 4096)
    do {
        // Read once through the device, so its page cache holds the block; the loop device keeps
        // the device open, so closing this image does not drop that cache.
        let image = try DiskFile(path: volume.path, create: false)
        try old.withUnsafeBytes { try image.write($0, at: 8192) }
        try image.sync()
        try read.withUnsafeMutableBytes { try image.read(into: $0, at: 8192) }
        let written = read == old
        #expect(written)
    }
    // Written around the device's page cache, as blkback writes for a guest that ran on it.
    let file = try DiskFile(path: backing, create: false)
    try new.withUnsafeBytes { try file.write($0, at: 8192) }
    try file.sync()
    let reopened = try DiskFile(path: volume.path, create: false)
    try read.withUnsafeMutableBytes { try reopened.read(into: $0, at: 8192) }
    let fresh = read == new  // (not the arrays in the message: 4 KiB each)
    #expect(fresh, "a stale cached block was read: \(read.first.map { String($0, radix: 16) } ?? "")…")
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aJournalOverABlockDeviceZeroesAndWritesIt() throws {
    let scratch = try Scratch("blockdev-journal")
    let (volume, backing) = try scratchVolume(scratch, size: 1 << 20)
    let journal = try DiskJournal([DiskJournal.Disk(name: "xvda", path: volume.path, sizeBytes: 1 << 20, blockSize: 512)], create: false)
    journal.restartJournal()
    let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
    try data.withUnsafeBytes { try journal.write(disk: 0, offset: 4096, data: $0) }
    try journal.discard(disk: 0, offset: 4096 + 1024, length: 2048)
    try journal.writeZeroes(disk: 0, offset: 4096 + 6144, length: 512)
    try journal.flush(disk: 0)
    #expect(try journal.sealEpoch().count == 4)
    var expected = data
    expected.replaceSubrange(1024..<3072, with: repeatElement(0, count: 2048))
    expected.replaceSubrange(6144..<6656, with: repeatElement(0, count: 512))
    // Read back through the device and, after the flush, in the file behind it.
    var read = [UInt8](repeating: 0xFF, count: 8192)
    try read.withUnsafeMutableBytes { try journal.read(disk: 0, at: 4096, into: $0) }
    let throughDevice = read == expected
    #expect(throughDevice)
    var behind = [UInt8](repeating: 0xFF, count: 8192)
    try behind.withUnsafeMutableBytes { try DiskFile(path: backing, create: false).read(into: $0, at: 4096) }
    let inTheFile = behind == expected
    #expect(inTheFile)
}

@Test(.disabled(if: loopDeviceUnavailable != nil, Comment(rawValue: loopDeviceUnavailable ?? "")))
func aBackupsDiskDirectoryMayLinkToABlockDevice() throws {
    let scratch = try Scratch("blockdev-backup")
    let (volume, _) = try scratchVolume(scratch, size: 1 << 20)
    let directory = scratch.path + "/disks"
    #expect(mkdir(directory, 0o700) == 0)
    #expect(symlink(volume.path, directory + "/xvda") == 0)
    // Larger than the volume: refused, saying how a volume grows.
    do {
        _ = try BackupDisks.openImages([DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 2 << 20, name: "xvda")], in: directory)
        Issue.record("a volume smaller than the disk was accepted")
    } catch {
        #expect("\(error)".contains("lvextend"), "\(error)")
    }
    let images = try BackupDisks.openImages([DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 1 << 20, name: "xvda")], in: directory)
    #expect(images.files.first?.isBlockDevice == true)
}
