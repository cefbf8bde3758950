import Foundation
import Glibc
@testable import RemusRuntime
import RemusTestSupport
import Testing

/// A primary whose simulated guest has a 4 MiB disk 'xvda' (image in the pair's directory).
private func diskPrimaryArguments(_ pair: DaemonPair) -> [String] {
    ["--sim-memory", "32", "--heartbeat", "50", "--timeout", "400", "--interval", "50",
     "--sim-disk", pair.directory + "/primary-xvda.img", "--sim-disk-size", "4"]
}

/// Makes `directory` with an image `xvda` of `bytes` bytes (sparse).
private func diskDirectory(_ directory: String, imageBytes bytes: UInt64?) throws {
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    guard let bytes else { return }
    let fd = open(directory + "/xvda", O_CREAT | O_WRONLY, 0o600)
    #expect(fd >= 0 && ftruncate(fd, off_t(bytes)) == 0)
    close(fd)
}

/// The pair's `committed:` status line as a number (0: none).
private func committed(_ pair: DaemonPair) -> Int {
    pair.backupStatus.split(separator: "\n").first { $0.hasPrefix("committed: ") }.flatMap { Int($0.dropFirst("committed: ".count)) } ?? 0
}

@Suite("Replicated disks between two processes", .serialized)
struct DiskProcessTests {
    @Test("A guest with a disk is never streamed to a backup without a disk directory: the primary names the disk and the flag")
    func aBackupWithoutDisksIsRefusedByThePrimary() throws {
        let pair = try DaemonPair(backupArguments: ["--heartbeat", "50", "--timeout", "400"], tag: "nodisks")
        defer { pair.stop() }
        try pair.startPrimary(diskPrimaryArguments(pair))
        #expect(eventually(deadline: .after(seconds: 20)) { pair.primaryLog.contains("does not replicate disks") },
                "\(pair.primaryLog.suffix(2000))")
        let log = pair.primaryLog
        #expect(log.contains("'xvda'") && log.contains("--disk-dir") && log.contains("nothing was sent"), "\(log.suffix(2000))")
        // Nothing changed on the backup: it never heard of this guest.
        #expect(pair.backupStatus.contains("state: LISTENING"), "\(pair.backupStatus)")
        #expect(!pair.backupLog.contains("connected over"), "\(pair.backupLog.suffix(2000))")
    }

    @Test("A backup refuses a disk whose image is missing, smaller than the disk, or in use, naming it and what to do; nothing changes")
    func aDiskTheBackupCannotServeIsRefused() throws {
        let cases: [(String, UInt64?, Bool, String)] = [
            ("missing", nil, false, "is missing"),
            ("smaller", 1 << 20, false, "smaller than the primary's"),
            ("in use", 4 << 20, true, "is in use"),
        ]
        for (name, size, hold, expected) in cases {
            let disks = NSTemporaryDirectory() + "remusd-diskdir-\(UUID().uuidString.prefix(8))"
            try diskDirectory(disks, imageBytes: size)
            defer { try? FileManager.default.removeItem(atPath: disks) }
            // Another process (this test) holds the image the way a running VM or remusd does.
            var holder: Int32 = -1
            if hold {
                holder = open(disks + "/xvda", O_RDWR)
                #expect(holder >= 0 && flock(holder, LOCK_EX | LOCK_NB) == 0)
            }
            defer { if holder >= 0 { close(holder) } }
            let pair = try DaemonPair(backupArguments: ["--heartbeat", "50", "--timeout", "400", "--disk-dir", disks], tag: "diskrefuse")
            defer { pair.stop() }
            try pair.startPrimary(diskPrimaryArguments(pair))
            #expect(eventually(deadline: .after(seconds: 20)) { pair.backupLog.contains("refused a primary") },
                    "\(name): \(pair.backupLog.suffix(2000))")
            let log = pair.backupLog
            #expect(log.contains("disk 'xvda'") && log.contains(expected) && log.contains("nothing was changed"), "\(name): \(log.suffix(2000))")
            // The primary hears why, and keeps its guest running.
            #expect(eventually(deadline: .after(seconds: 10)) { pair.primaryLog.contains(expected) }, "\(name): \(pair.primaryLog.suffix(2000))")
            #expect(pair.backupStatus.contains("state: LISTENING"), "\(name): \(pair.backupStatus)")
            #expect(access(disks + "/.remusd-disks", F_OK) != 0, "\(name): a refused stream wrote no manifest")
        }
    }

    @Test("With a disk directory the backup commits checkpoints carrying the guest's disk writes, and says so in its status")
    func checkpointsWithDisksCommit() throws {
        let disks = NSTemporaryDirectory() + "remusd-diskdir-\(UUID().uuidString.prefix(8))"
        try diskDirectory(disks, imageBytes: 4 << 20)
        defer { try? FileManager.default.removeItem(atPath: disks) }
        let pair = try DaemonPair(backupArguments: ["--heartbeat", "50", "--timeout", "400", "--disk-dir", disks], tag: "disks")
        defer { pair.stop() }
        try pair.startPrimary(diskPrimaryArguments(pair))
        #expect(eventually(deadline: .after(seconds: 60)) { committed(pair) >= 5 }, "\(pair.backupStatus)\n\(pair.backupLog.suffix(2000))")
        #expect(pair.backupStatus.contains("disks: xvda (4 MiB) in \(disks)"), "\(pair.backupStatus)")
        #expect(pair.primaryStatus.contains("state: PROTECTED"), "\(pair.primaryStatus)")
        #expect(pair.primaryLog.contains("copying the guest's disks to the backup: xvda (4 MiB)"), "\(pair.primaryLog.suffix(2000))")
        #expect(!pair.backupLog.contains("failed"), "\(pair.backupLog.suffix(2000))")
    }
}
