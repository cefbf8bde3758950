import Foundation
import RemusCore
import RemusDrill  // freePorts, waitForFile
@testable import RemusRuntime
import RemusSim
import RemusTestSupport
import Testing

private func temporaryDirectory() throws -> String {
    let path = NSTemporaryDirectory() + "remusd-test-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// Runs remusd to completion; returns exit code and combined output.
private func runRemusd(_ arguments: [String]) throws -> (Int32, String) {
    let quoted = ([remusdBinary] + arguments).map { "'\($0)'" }.joined(separator: " ")
    return try runTestShell(quoted + " 2>&1")
}


/// A primary written by hand: a stepped simulated guest whose checkpoints the test encodes and
/// sends itself, so it can cut or corrupt one on purpose.
private final class HandDrivenPrimary {
    let guest: SimGuest
    let channel: any ByteChannel
    let reader: StreamReader
    let header: StreamHeader
    var dirty: DirtyBitmap
    let arena: StagingArena

    init(backup port: UInt16) throws {
        var config = SimConfig(memoryBytes: 16 << 20, vcpus: 1, seed: 99)
        config.workingSetFraction = 0.5
        guest = try SimGuest(config: config, clock: SystemClock(), nic: nil, name: "hand", autoRun: false)
        channel = try connectAsPrimary(port: port)
        reader = StreamReader(channel: channel, direction: .backupToPrimary)
        _ = try reader.readHeader()
        let d = guest.descriptor
        header = StreamHeader(features: [], pageSize: UInt32(d.pageSize), backend: .simulated, role: .primary,
                              guestUUID: d.uuid, guestName: d.name, senderVersion: "test")
        try RecordWriter.writePreamble(header: header, config: try guest.domainConfig(), to: channel)
        dirty = DirtyBitmap(pageCount: d.pageCount)
        arena = StagingArena(pageSize: d.pageSize, capacityPages: Int(d.pageCount))
        try guest.startDirtyLogging()
    }

    /// Runs the workload, then captures checkpoint `epoch` and returns its encoded bytes.
    func checkpoint(_ epoch: Epoch, ops: UInt64) throws -> [UInt8] {
        guest.stepAll(ops: ops)
        try guest.harvestDirty(into: &dirty)
        arena.reset(epoch: epoch, kind: .checkpoint)
        try guest.capturePages(dirty, into: arena)
        let state = try guest.captureState(clock: SystemClock())
        dirty.clearAll()
        let recording = RecordingChannel()
        try RecordWriter(channel: recording, pageSize: Int(header.pageSize)).writeCheckpoint(arena, state: state)
        return recording.bytes
    }

    /// Waits for the ACK of `epoch` (the backup's answer on the same connection).
    func awaitAck(_ epoch: Epoch) throws -> Bool {
        while let event = try reader.next() {
            if case .ack(let ack) = event, ack.epoch >= epoch { return true }
        }
        return false
    }
}

private struct Backup {
    let process: ChildProcess
    let port: UInt16
    let directory: String
    var log: String { (try? String(contentsOfFile: directory + "/backup.log", encoding: .utf8)) ?? "" }
    var reportPath: String { directory + "/activation" }

    static func start(timeoutMs: Int = 300) throws -> Backup {
        let dir = try temporaryDirectory()
        let port = try freePorts(1)[0]
        let process = try ChildProcess(
            arguments: [remusdBinary, "receive", "--listen", "127.0.0.1:\(port)", "--unsafe-no-fence",
                        "--heartbeat", "50", "--timeout", "\(timeoutMs)", "--activation-report", dir + "/activation",
                        "--status-socket", dir + "/backup.sock"] + tlsArguments("backup"),
            outputFile: dir + "/backup.log", environment: ["REMUSD_RUN_DIR": dir])
        try waitForFile(dir + "/backup.sock", what: "the backup to listen", deadlineMs: 30_000)
        return Backup(process: process, port: port, directory: dir)
    }

    func stop() {
        process.signal(SIGKILL)
        process.wait()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

@Suite("Processes on loopback", .serialized)
struct ProcessTests {
    @Test func drillVerifiesEveryFailover() throws {
        let (status, output) = try runRemusd(["drill", "--failovers", "4", "--seed", "11", "--quiet", "--sim-memory", "128"])
        #expect(status == 0, "drill output:\n\(output)")
        #expect(output.contains("drill: 4 passed, 0 failed"))
        #expect(output.contains("(I1 violations): 0"))
    }

    @Test func drillCatchesOutputReleasedBeforeItsCheckpointWasCommitted() throws {
        // The first primary runs with output buffering switched off: the verifier must notice.
        let (status, output) = try runRemusd(["drill", "--failovers", "3", "--seed", "5", "--quiet", "--sim-memory", "128", "--inject", "early-release"])
        #expect(status == 1)
        #expect(output.contains("DRILL FAILED"))
        #expect(output.contains("output left before its epoch was committed"), "\(output)")
    }

    @Test func drillStoppedBySIGTERMTakesItsDaemonsWithIt() throws {
        // The daemons run in process groups of their own (out of reach of a terminal's Ctrl-C):
        // a drill stopped by a signal must kill them itself, or they protect on, orphaned.
        let dir = try temporaryDirectory() + "/drill"
        let drill = try ChildProcess(arguments: [remusdBinary, "drill", "--failovers", "100", "--quiet", "--directory", dir],
                                     outputFile: dir + ".log")
        defer { drill.signalGroup(SIGKILL); drill.wait() }
        try waitForFile(dir + "/primary-0.sock", what: "the drill's first primary", deadlineMs: 60_000, madeBy: drill)
        #expect(!Self.processes(naming: dir).isEmpty, "the drill's daemons name its directory in their arguments")
        drill.signal(SIGTERM)
        let status = drill.wait(until: Deadline(afterNanoseconds: 10_000_000_000))
        #expect(status.flatMap(ChildProcess.exitCode) == 128 + SIGTERM, "drill status \(String(describing: status))")
        // Killed, the daemons are gone once reaped by init: wait for that, with a deadline.
        let deadline = Deadline(afterNanoseconds: 10_000_000_000)
        while !Self.processes(naming: dir).isEmpty && !deadline.hasPassed { sleepNanoseconds(10_000_000) }
        #expect(Self.processes(naming: dir).isEmpty, "left running: \(Self.processes(naming: dir))")
        let log = (try? String(contentsOfFile: dir + ".log", encoding: .utf8)) ?? ""
        #expect(log.contains("drill stopped by signal 15"), "\(log)")
    }

    /// Process ids (not this one) whose command line contains `text`.
    static func processes(naming text: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int32.init).filter { pid in
            guard pid != getpid(), let bytes = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return String(decoding: bytes.map { $0 == 0 ? 32 : $0 }, as: UTF8.self).contains(text)
        }
    }

    // The disk path's kill points (InjectedFault, Docs/disks.md): each is reached on purpose in
    // every round and checked by I9 at the takeover; the drill fails a round whose point was not
    // reached (30 s) or whose takeover is not the one the point demands.

    @Test func primaryDyingBetweenDiskAndEndOfCheckpointLeavesThePreviousOne() throws {
        let (status, output) = try runRemusd(["drill", "--failovers", "2", "--seed", "21", "--quiet", "--sim-memory", "128", "--inject", "kill-after-disk-records"])
        #expect(status == 0, "drill output:\n\(output)")
        #expect(output.contains("drill: 2 passed, 0 failed"))
        // Both rounds died at the point, and the takeovers were checked at N − 1 with its disk.
        #expect(output.components(separatedBy: "the primary died after the disk records of checkpoint").count == 3, "\(output)")
    }

    @Test func primaryDyingWhileTheBackupAppliesDiskNLeavesN() throws {
        let (status, output) = try runRemusd(["drill", "--failovers", "2", "--seed", "22", "--quiet", "--sim-memory", "128", "--inject", "kill-during-disk-apply"])
        #expect(status == 0, "drill output:\n\(output)")
        #expect(output.contains("drill: 2 passed, 0 failed"))
        #expect(output.components(separatedBy: "the primary was killed while the backup applied disk").count == 3, "\(output)")
    }

    @Test func backupKilledMidApplyFinishesTheLoggedEpochWhenRestarted() throws {
        let (status, output) = try runRemusd(["drill", "--failovers", "2", "--seed", "23", "--quiet", "--sim-memory", "128",
                                              "--fault", "backup-kill", "--inject", "backup-kill-during-disk-apply"])
        #expect(status == 0, "drill output:\n\(output)")
        #expect(output.contains("drill: 2 passed, 0 failed"))
        #expect(output.components(separatedBy: "at its start, its image verified against checkpoint").count == 3, "\(output)")
    }

    @Test func killPointsAreRefusedWhereTheyCannotAct() throws {
        let (status, output) = try runRemusd(["drill", "--failovers", "1", "--inject", "backup-kill-during-disk-apply"])
        #expect(status != 0)
        #expect(output.contains("add --fault backup-kill"), "\(output)")
        let (noDisk, noDiskOutput) = try runRemusd(["drill", "--failovers", "1", "--sim-disk-size", "0", "--inject", "kill-after-disk-records"])
        #expect(noDisk != 0)
        #expect(noDiskOutput.contains("needs a guest with a disk"), "\(noDiskOutput)")
    }

    @Test func checkpointCutOffMidFlightLeavesThePreviousOneToActivate() throws {
        let backup = try Backup.start()
        defer { backup.stop() }
        let primary = try HandDrivenPrimary(backup: backup.port)
        try primary.channel.write(try primary.checkpoint(1, ops: 5_000))
        #expect(try primary.awaitAck(1))
        let second = try primary.checkpoint(2, ops: 5_000)
        // Half of checkpoint 2 reaches the backup, then the primary vanishes.
        try primary.channel.write(Array(second.prefix(second.count / 2)))
        primary.channel.shutdown()
        try waitForFile(backup.reportPath, what: "the backup to take over", deadlineMs: 10_000)
        let report = try ActivationReport.read(from: backup.reportPath)
        #expect(report.fields["epoch"] == "1", "the partial checkpoint 2 must never be applied (I2)")
        #expect(report.fields["lost_while_staging"] == "1")
        #expect(report.fields["memory_verified"] == "yes", "\(report.fields["memory_report"] ?? "")")
    }

    @Test func corruptedBytesAreRejectedAndTheCommittedImageIsKept() throws {
        let backup = try Backup.start()
        defer { backup.stop() }
        let primary = try HandDrivenPrimary(backup: backup.port)
        try primary.channel.write(try primary.checkpoint(1, ops: 5_000))
        #expect(try primary.awaitAck(1))
        var second = try primary.checkpoint(2, ops: 5_000)
        second[second.count / 2] ^= 0x40  // one bit inside checkpoint 2's page data
        try primary.channel.write(second)
        // The backup rejects the stream and drops the connection; no ACK for epoch 2 arrives.
        #expect(try primary.awaitAck(2) == false)
        try waitForFile(backup.reportPath, what: "the backup to take over after the timeout", deadlineMs: 10_000)
        let report = try ActivationReport.read(from: backup.reportPath)
        #expect(report.fields["epoch"] == "1")
        #expect(report.fields["memory_verified"] == "yes", "\(report.fields["memory_report"] ?? "")")
        let log = backup.log
        #expect(log.contains("rejected the primary's stream"), "\(log)")
        #expect(log.contains("CRC32C"), "the error names what was wrong: \(log)")
        #expect(log.contains("keeps checkpoint 1"))
    }

    @Test func aXenStreamOffXenIsRefusedAndTheBackupKeepsListening() throws {
        guard !xenHypervisorPresent() else { return }  // in a dom0 the backup would build the domain
        let backup = try Backup.start()
        defer { backup.stop() }
        let channel = try connectAsPrimary(port: backup.port)
        let reader = StreamReader(channel: channel, direction: .backupToPrimary)
        _ = try reader.readHeader()
        let header = StreamHeader(features: [], pageSize: 4096, backend: .xen, role: .primary,
                                  guestUUID: GuestUUID(high: 1, low: 2), guestName: "guest", senderVersion: remusdVersion)
        try RecordWriter.writePreamble(header: header, config: DomainConfig(format: .libxlJSON, bytes: Array(#"{"b_info":{"max_memkb":65536}}"#.utf8)), to: channel)
        // The primary is told why, in an ERROR record, before the backup closes the connection.
        var refusal: PeerError?
        while let event = try reader.next() {
            if case .peerError(let e) = event { refusal = e; break }
        }
        let message = refusal?.message ?? ""
        #expect(message.contains("cannot receive a Xen guest"), "\(message)")
        #expect(message.contains("dom0 of Xen 4.17"), "the refusal says what the backup needs: \(message)")
        let status = try StatusSocket.query(backup.directory + "/backup.sock")
        #expect(status.contains("LISTENING"), "a refused primary must not change the backup's state: \(status)")
    }

    @Test func garbageInsteadOfAStreamIsRefusedWithAClearError() throws {
        let backup = try Backup.start()
        defer { backup.stop() }
        let channel = try connectAsPrimary(port: backup.port)
        try channel.write(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8) + [UInt8](repeating: 0, count: 64))
        var buffer = [UInt8](repeating: 0, count: 4096)
        // The backup answers with its header, then closes on us.
        while try buffer.withUnsafeMutableBytes({ try channel.read(into: $0) }) > 0 {}
        let deadline = SystemClock().monotonicNs() + 5_000_000_000
        while !backup.log.contains("handshake") && SystemClock().monotonicNs() < deadline { pauseBriefly(ms: 10) }
        #expect(backup.log.contains("not a remusd stream") || backup.log.contains("magic"), "\(backup.log)")
        #expect(backup.log.contains("nothing changed here"))
        let status = try StatusSocket.query(backup.directory + "/backup.sock")
        #expect(status.contains("LISTENING"), "a bad client must not change the backup's state: \(status)")
    }

    @Test func wrongFlagsGetAClearError() throws {
        let (status, output) = try runRemusd(["protect", "vm1", "backup", "--no-netbuf"])
        #expect(status != 0)
        #expect(output.contains("need --unsafe"))
        // Off Xen (build machines): the Xen backend says what it looked for and that nothing changed.
        if !xenHypervisorPresent() {
            let (status2, output2) = try runRemusd(["protect", "vm1", "backup", "--backend", "xen"] + tlsArguments("primary"))
            #expect(status2 != 0)
            #expect(output2.contains("no usable Xen on this host"), "\(output2)")
            #expect(output2.contains("/sys/hypervisor/type"), "\(output2)")
            #expect(output2.contains("Nothing was changed on domain 'vm1'"), "\(output2)")
        }
        // More dirty pages than the benchmark's guest can dirty: refused at once, not stepped forever.
        let (status3, output3) = try runRemusd(["bench", "--dirty-pages", "20000"])
        #expect(status3 != 0)
        #expect(output3.contains("--dirty-pages must be between 1 and 13107"), "\(output3)")
    }

    // The disk-server benchmark runs its three paths, reads back what it wrote (it fails
    // otherwise), reports each with a rate, and leaves no scratch image behind.
    @Test func theDiskServerBenchmarkReportsEveryPathAndCleansUp() throws {
        let scratch = try makeTemporaryDirectory("remusd-bench-disk")
        defer { removeTemporaryDirectory(scratch) }
        let (status, output) = try runRemusd(["bench", "--disk-server", "--megabytes", "8", "--repetitions", "3", "--scratch-dir", scratch])
        #expect(status == 0, "\(output)")
        for name in ["socket pair alone", "pwrite alone", "NBD writes, applied and journaled", "NBD reads", "the server thread's CPU per GiB"] {
            let line = output.split(separator: "\n").first { $0.hasPrefix("| \(name) |") }
            let median = line.flatMap { Double($0.split(separator: "|")[1].split(separator: " ")[0]) }
            #expect((median ?? 0) > 0, "no positive median for '\(name)' in: \(output)")
        }
        #expect((try? FileManager.default.contentsOfDirectory(atPath: scratch))?.isEmpty == true, "the scratch image was left behind")
        let (refused, why) = try runRemusd(["bench", "--disk-server", "--channels"])
        #expect(refused != 0)
        #expect(why.contains("different benchmarks: pick one"), "\(why)")
    }
}
