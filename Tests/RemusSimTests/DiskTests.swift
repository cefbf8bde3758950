import Glibc
import RemusCore
import RemusDisk
@testable import RemusSim
import Testing

@Suite("The simulated guest's disk")
struct SimDiskTests {
    /// A small guest with a small disk and frequent disk operations, stepped by hand.
    func diskConfig() -> SimConfig {
        var c = smallConfig()
        c.diskBytes = 256 << 10
        c.diskPeriod = 7
        return c
    }

    func scratchDirectory() throws -> String {
        var template = Array("/tmp/remusd-simdisk-XXXXXX".utf8CString)
        let made = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) })
        return String(cString: made)
    }

    func read(_ path: String) throws -> [UInt8] {
        let file = try DiskFile(path: path, create: false)
        var out = [UInt8](repeating: 0, count: Int(try file.size()))
        try out.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        return out
    }

    @Test("The image at a checkpoint equals a replay to its op counts, every completion is journaled and counted in memory, and the verifier catches a write too many or too few (I9)")
    func replayedDiskMatchesAndViolationsAreCaught() throws {
        let config = diskConfig()
        let directory = try scratchDirectory()
        defer { _ = unlink(directory + "/xvda.img"); _ = rmdir(directory) }
        let clock = ManualClock()
        let journal = try SimGuest.openDisk(config, path: directory + "/xvda.img", create: true)
        let guest = try SimGuest(config: config, clock: clock, nic: nil, disk: journal, autoRun: false)
        #expect(guest.disks?.descriptors.map(\.name) == [SimGuest.diskName])
        journal.restartJournal()
        guest.stepAll(ops: 3000)
        try guest.suspend()
        let committed = try guest.captureState(clock: clock)
        let sealed = try journal.sealEpoch()
        journal.waitForLocalWrites()
        let image = try read(directory + "/xvda.img")
        let verifier = SimVerifier(config: config)
        let report = image.withUnsafeBytes { verifier.verifyDisk(image: $0, committed: committed) }
        #expect(report.passed, "\(report)")
        let completed = try #require(report.counter("diskOpsCompleted"))
        // 3000 ops per vCPU, one disk operation every 7th: each completion journaled once, in memory once.
        #expect(completed == 2 * (3000 / 7))
        #expect(UInt64(sealed.count) == completed)
        var flushes: UInt64 = 0
        sealed.forEach { entry, _ in if entry.kind == .flush { flushes += 1 } }
        #expect(flushes == 2 * ((3000 / 7) / SimConfig.flushEveryDiskOps))
        #expect(guest.diskFailures == 0)

        // A write issued after the checkpoint reached the disk: caught.
        try guest.resume()
        guest.stepAll(ops: 70)
        journal.waitForLocalWrites()
        let later = try read(directory + "/xvda.img")
        let extra = later.withUnsafeBytes { verifier.verifyDisk(image: $0, committed: committed) }
        #expect(!extra.passed && (extra.counter("differingBlocks") ?? 0) > 0, "\(extra)")

        // A write completed by the checkpoint is missing: caught.
        var missing = image
        let written = try #require(stride(from: 0, to: missing.count, by: SimConfig.diskBlockBytes).first { at in
            missing[at..<(at + SimConfig.diskBlockBytes)].contains { $0 != 0 }
        })
        missing.replaceSubrange(written..<(written + SimConfig.diskBlockBytes), with: repeatElement(0, count: SimConfig.diskBlockBytes))
        let lost = missing.withUnsafeBytes { verifier.verifyDisk(image: $0, committed: committed) }
        #expect(!lost.passed && lost.counter("differingBlocks") == 1, "\(lost)")
    }

    @Test("A config with a disk round-trips through DOMAIN_CONFIG; one without writes no disk keys (older streams still decode)")
    func diskConfigRoundTrips() throws {
        let config = diskConfig()
        #expect(try SimConfig(config.encode()) == config)
        let plain = smallConfig()
        let text = String(decoding: plain.encode().bytes, as: UTF8.self)
        #expect(!text.contains("disk"))
        #expect(try SimConfig(plain.encode()) == plain)
    }

    @Test("A replica prepared during the fence gets the backup's image only at activation, before its first op, and writes to it from the checkpoint on (I7 + I9)")
    func aPreparedReplicaGetsItsDiskAtActivation() throws {
        let config = diskConfig()
        let directory = try scratchDirectory()
        defer { _ = unlink(directory + "/primary.img"); _ = unlink(directory + "/backup.img"); _ = unlink(directory + "/other.img"); _ = rmdir(directory) }
        let clock = ManualClock()
        let journal = try SimGuest.openDisk(config, path: directory + "/primary.img", create: true)
        let primary = try SimGuest(config: config, clock: clock, nic: nil, disk: journal, autoRun: false)
        let replica = SimReplica(clock: clock, autoRunOnActivation: false)
        let loop = try CheckpointLoop(primary: primary, replica: replica, clock: clock)
        primary.stepAll(ops: 3000)
        try loop.checkpoint()
        let committed = try #require(loop.lastState)

        try replica.prepareActivation(clock: clock)
        let prepared = try #require(replica.preparedGuest)
        #expect(prepared.disks == nil, "a replica prepared while the disk apply may still run must not hold the images yet")
        // The backup's image at the committed checkpoint: what the apply of N leaves.
        journal.waitForLocalWrites()
        let image = try read(directory + "/primary.img")
        let backup = try DiskFile(path: directory + "/backup.img", create: true)
        try image.withUnsafeBytes { try backup.write($0, at: 0) }
        let backupDisk = try SimGuest.openDisk(config, path: directory + "/backup.img", create: false)
        replica.attachDisk(backupDisk)

        guard case .inProcess(let activated, _) = try replica.activate(clock: clock) else {
            Issue.record("a simulated replica's activation did not hand back the guest running here")
            return
        }
        let running = try #require(activated as? SimGuest)
        #expect(running === prepared && running.disks != nil)
        let verifier = SimVerifier(config: config)
        let atActivation = try read(directory + "/backup.img")
        #expect(atActivation.withUnsafeBytes { verifier.verifyDisk(image: $0, committed: committed) }.passed)
        #expect(throws: SimError.self, "a disk is attached only before the guest first runs") {
            try running.attachDisk(try SimGuest.openDisk(config, path: directory + "/other.img", create: true))
        }

        // It runs on from the checkpoint: its writes land in the backup's image, as a replay says.
        running.stepAll(ops: 700)
        try running.suspend()
        let later = try running.captureState(clock: clock)
        backupDisk.waitForLocalWrites()
        let written = try read(directory + "/backup.img")
        #expect(written != atActivation, "the activated guest wrote nothing to its disk")
        let report = written.withUnsafeBytes { verifier.verifyDisk(image: $0, committed: later) }
        #expect(report.passed, "\(report)")
        #expect(running.diskFailures == 0)
    }
}
