import ArgumentParser
import Glibc
import RemusCore
import RemusDisk
import RemusSystem

/// `remusd disk …`: hidden tools for the QEMU testbed (Tests/Testbed), which has the `nbd`
/// module this build machine lacks.
struct Disk: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Disk replication tools for the testbed.", shouldDisplay: false,
        subcommands: [DiskProbeNBD.self])
}

/// Serves an image to the kernel as /dev/nbdN with remusd's NBD server, records every mutation
/// as the disk stream would carry it, and when told to stop replays them through the backup's
/// staging and redo log onto a copy of the original image: the copy must equal the image.
struct DiskProbeNBD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe-nbd",
        abstract: "Serve an image as /dev/nbdN, record its mutations, replay them onto a copy (testbed).")

    @Option(help: ArgumentHelp("The image to serve.", valueName: "path"))
    var image: String

    @Option(help: ArgumentHelp("The NBD device to attach it to.", valueName: "/dev/nbdN"))
    var device: String = "/dev/nbd0"

    @Option(name: .customLong("replay-onto"), help: ArgumentHelp("A copy of the image as it was before: the recorded mutations are replayed onto it.", valueName: "path"))
    var replayOnto: String

    @Option(name: .customLong("stop-file"), help: ArgumentHelp("Detach and replay once this file exists.", valueName: "path"))
    var stopFile: String

    @Option(help: ArgumentHelp("Give up (detach, exit 1) if the stop file has not appeared by then.", valueName: "s"))
    var timeout: Int = 300

    func run() throws {
        let work = replayOnto + ".remusd"
        guard mkdir(work, 0o700) == 0 || errno == EEXIST else {
            throw ValidationError("cannot make \(work): \(String(cString: strerror(errno)))")
        }
        let file = try DiskFile(path: image, create: false)
        let size = try file.size() / 512 * 512
        let descriptor = DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: size, name: "probe")
        let recorder = Recorder(staging: DiskEpochStaging(memoryBound: 64 << 20, spillPath: work + "/spill"))
        try recorder.staging.reset()
        let server = try NBDServer(socketPath: nil, descriptor: descriptor, image: file,
                                   record: { try recorder.record($0) }, log: { say($0) })
        let attached = try NBDKernelDevice(devicePath: device, server: server)
        say("\(image) attached as \(device) (\(size) bytes)")
        let deadline = Deadline.after(seconds: Double(timeout))
        while access(stopFile, F_OK) != 0 && !deadline.hasPassed { sleepNanoseconds(20_000_000) }
        let stoppedInTime = !deadline.hasPassed
        guard attached.detach() else {
            throw ValidationError("\(device) did not detach within its deadline; its requests may still be queued")
        }
        let counts = server.completed
        let log = try DiskRedoLog(path: work + "/redo.log")
        try log.log(recorder.staging, epoch: 1)
        try log.applyLogged(to: DiskImages(descriptors: [descriptor], files: [try DiskFile(path: replayOnto, create: false)]))
        say("\(counts.writes) writes (\(counts.bytesWritten) bytes), \(counts.flushes) flushes, "
            + "\(counts.discards) discards, \(counts.writeZeroes) write-zeroes, \(counts.reads) reads, \(counts.errors) errors; "
            + "\(recorder.staging.entryCount) records replayed onto \(replayOnto)")
        if !stoppedInTime { throw ValidationError("the stop file \(stopFile) did not appear within \(timeout) s") }
    }
}

/// The recorded mutations (the serving thread appends; read after detach).
private final class Recorder: @unchecked Sendable {  // guarded by monitor
    let staging: DiskEpochStaging
    private let monitor = MonitorLock()
    init(staging: DiskEpochStaging) { self.staging = staging }
    func record(_ operation: CompletedDiskOperation) throws {
        let mutation = operation.mutation
        try monitor.withLock { try staging.append(mutation) }
    }
}

/// One line to stdout, unbuffered: the testbed polls our output file.
private func say(_ text: String) {
    let bytes = Array("remusd disk probe-nbd: \(text)\n".utf8)
    _ = bytes.withUnsafeBytes { write(STDOUT_FILENO, $0.baseAddress, $0.count) }
}
