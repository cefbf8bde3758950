import Foundation
import Glibc
import RemusCore
@testable import RemusRuntime
import RemusSim
import RemusTestSupport
import Testing

// Disk records from the network are hostile input too (issue #13's list, for #12's disks): a peer
// holding a valid certificate must not write outside a disk, make the backup hold an epoch's disk
// data in memory past `--disk-staging-memory`, or grow its spill file past `--max-disk-checkpoint`.
// Each attack runs against a real `remusd receive --disk-dir`; nothing of it may reach the image.

/// The disk the attacker declares: `xvda`, 16 MiB.
private let attackedDisk = DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: 16 << 20, name: "xvda")

/// A disk directory holding a sparse (all-zero) 16 MiB image `xvda`.
private func zeroDiskDirectory() throws -> String {
    let directory = NSTemporaryDirectory() + "remusd-hostile-disk-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let fd = open(directory + "/xvda", O_CREAT | O_WRONLY, 0o600)
    #expect(fd >= 0 && ftruncate(fd, off_t(attackedDisk.sizeBytes)) == 0)
    close(fd)
    return directory
}

/// Whether every byte of the image is still zero (nothing of the attack reached it).
private func imageIsUntouched(_ directory: String) -> Bool {
    guard let data = FileManager.default.contents(atPath: directory + "/xvda") else { return false }
    return data.count == Int(attackedDisk.sizeBytes) && data.allSatisfy { $0 == 0 }
}

/// The spill files of the backup's connections in `directory`, and their sizes.
private func spillFiles(_ directory: String) -> [String: UInt64] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
    var out: [String: UInt64] = [:]
    for name in names where name.hasPrefix(".remusd-spill-") {
        var st = stat()
        if stat(directory + "/" + name, &st) == 0 { out[name] = UInt64(st.st_size) }
    }
    return out
}

extension HandWrittenPeer {
    /// The stream header with DISKS, a 16 MiB simulated guest's DOMAIN_CONFIG and `xvda`'s descriptor.
    func helloWithDisk(uuid: GuestUUID) throws {
        let header = StreamHeader(features: [.disks], pageSize: 4096, backend: .simulated, role: .primary,
                                  guestUUID: uuid, guestName: "disky", senderVersion: "attacker")
        try RecordWriter.writePreamble(header: header, config: SimConfig(memoryBytes: 16 << 20, vcpus: 1, seed: 5).encode(),
                                       disks: [attackedDisk], to: channel)
    }
}

@Suite("Hostile disk records against a live backup (issues #12, #13)", .serialized)
struct DiskHostileInputTests {
    init() { signal(SIGPIPE, SIG_IGN) }

    @Test("A DISK_WRITE reaching past the declared disk drops the connection before it is staged; the image keeps its content")
    func aWritePastTheDiskIsRefused() throws {
        let directory = try zeroDiskDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence", "--disk-dir", directory], tag: "disk-past-end")
        defer { pair.stop() }
        let peer = try HandWrittenPeer(port: pair.port)
        try peer.helloWithDisk(uuid: GuestUUID(high: 0xD15C, low: 1))
        var encoder = StreamEncoder(pageSize: 4096, features: [.disks])
        var out: [UInt8] = []
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
        let block = [UInt8](repeating: 0xA5, count: 8192)
        // A write inside the disk, then one whose last block lies past its 16 MiB, then the END.
        try block.withUnsafeBytes { try encoder.appendDiskWrite(disk: 0, offset: 0, data: $0, into: &out) }
        try block.withUnsafeBytes { try encoder.appendDiskWrite(disk: 0, offset: attackedDisk.sizeBytes - 4096, data: $0, into: &out) }
        _ = try encoder.endCheckpoint(into: &out)
        try? peer.channel.write(out)
        let answer = peer.answer()
        #expect(answer == "closed", "\(answer)")
        #expect(eventually(deadline: .after(seconds: 10)) { pair.backupLog.contains("ends beyond the disk's 16777216 bytes") }, "\(pair.backupLog.suffix(2000))")
        #expect(eventually(deadline: .after(seconds: 10)) { spillFiles(directory).isEmpty }, "the connection's spill file stayed: \(spillFiles(directory))")
        #expect(imageIsUntouched(directory), "a write of a checkpoint that was never complete reached the image")
        #expect(!pair.backupStatus.contains("committed:") || pair.backupStatus.contains("committed: 0"), "\(pair.backupStatus)")
    }

    @Test("A pre-copy round of 320 MiB of disk writes is dropped at --max-disk-checkpoint: memory held within --disk-staging-memory, the spill file within the bound, the image untouched")
    func anOversizeDiskEpochIsBounded() throws {
        let directory = try zeroDiskDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let bound: UInt64 = minDiskBytesPerCheckpoint
        let pair = try DaemonPair(backupArguments: ["--unsafe-no-fence", "--timeout", "5000", "--disk-dir", directory,
                                                    "--max-disk-checkpoint", "\(bound >> 20)", "--disk-staging-memory", "4"],
                                  tag: "disk-oversize")
        defer { pair.stop() }
        let before = residentMemory(pair.backup.pid)
        let peer = try HandWrittenPeer(port: pair.port, deadline: .after(seconds: 120))
        try peer.helloWithDisk(uuid: GuestUUID(high: 0xD15C, low: 2))
        var encoder = StreamEncoder(pageSize: 4096, features: [.disks])
        var out: [UInt8] = []
        try encoder.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
        try? peer.channel.write(out)
        let piece = [UInt8](repeating: 0x5A, count: StreamLimits.maxDiskWriteBytes)
        var sentMiB = 0
        var largestSpill: UInt64 = 0
        // 80 writes of 4 MiB, each inside the disk (offsets 0 … 12 MiB over and over).
        for i in 0..<80 {
            out.removeAll(keepingCapacity: true)
            let offset = UInt64(i % 4) * UInt64(piece.count)
            try piece.withUnsafeBytes { try encoder.appendDiskWrite(disk: 0, offset: offset, data: $0, into: &out) }
            guard (try? peer.channel.write(out)) != nil else { break }
            sentMiB += 4
            largestSpill = max(largestSpill, spillFiles(directory).values.max() ?? 0)
        }
        let answer = peer.answer()
        let after = residentMemory(pair.backup.pid)
        let grownMiB = (after.peak - min(before.peak, after.peak)) >> 20
        print("320 MiB disk round against a \(bound >> 20) MiB bound: \(sentMiB) MiB written before the backup closed; largest spill file seen \(largestSpill >> 20) MiB; peak RSS +\(grownMiB) MiB")
        #expect(answer == "closed", "\(answer)")
        #expect(eventually(deadline: .after(seconds: 10)) { pair.backupLog.contains("carries more than \(bound) bytes of disk records") }, "\(pair.backupLog.suffix(2000))")
        // Each staged record costs its body plus a 32-byte entry header at most.
        #expect(largestSpill <= bound + 4096, "the spill file grew to \(largestSpill) bytes, past the \(bound)-byte bound")
        #expect(grownMiB < 64, "an oversize disk epoch grew the backup by \(grownMiB) MiB")
        #expect(eventually(deadline: .after(seconds: 10)) { spillFiles(directory).isEmpty }, "the connection's spill file stayed: \(spillFiles(directory))")
        #expect(imageIsUntouched(directory), "a write of a dropped checkpoint reached the image")
        #expect(!pair.backupStatus.contains("committed:") || pair.backupStatus.contains("committed: 0"), "\(pair.backupStatus)")
    }
}
