import Glibc
import RemusCore
import RemusSystem
import RemusTestSupport
import Testing
@testable import RemusDisk

/// One disk operation of a test epoch, applied both to the real images and to the oracle.
enum Operation {
    case write(disk: UInt32, offset: UInt64, data: [UInt8])
    case command(DiskCommand)
}

/// The naive oracle: each disk a byte array, each operation applied in order.
struct OracleDisks {
    var bytes: [[UInt8]]
    init(_ descriptors: [DiskDescriptor]) { bytes = descriptors.map { [UInt8](repeating: 0, count: Int($0.sizeBytes)) } }
    mutating func apply(_ op: Operation) {
        switch op {
        case .write(let disk, let offset, let data):
            bytes[Int(disk)].replaceSubrange(Int(offset)..<(Int(offset) + data.count), with: data)
        case .command(let c) where c.kind != .flush:
            bytes[Int(c.disk)].replaceSubrange(Int(c.offset)..<Int(c.offset + c.length), with: repeatElement(0, count: Int(c.length)))
        case .command:
            break
        }
    }
}

/// A scratch directory with disk images, a redo log and a staging area.
final class Bench {
    let directory: String
    let descriptors = [
        DiskDescriptor(disk: 0, blockSize: 512, sizeBytes: 256 << 10, name: "xvda"),
        DiskDescriptor(disk: 1, blockSize: 4096, sizeBytes: 128 << 10, name: "xvdb"),
    ]
    let images: DiskImages
    let staging: DiskEpochStaging
    var logPath: String { "\(directory)/redo.log" }

    init(memoryBound: Int = 1 << 20) throws {
        directory = try makeTemporaryDirectory("remusd-disk")
        var files: [DiskFile] = []
        for d in descriptors {
            let file = try DiskFile(path: "\(directory)/\(d.name).img", create: true)
            try file.truncate(to: d.sizeBytes)
            files.append(file)
        }
        images = DiskImages(descriptors: descriptors, files: files)
        staging = DiskEpochStaging(memoryBound: memoryBound, spillPath: "\(directory)/spill")
    }

    deinit { removeTemporaryDirectory(directory) }

    func stage(_ ops: [Operation]) throws {
        for op in ops {
            switch op {
            case .write(let disk, let offset, let data):
                try data.withUnsafeBytes { try staging.appendWrite(disk: disk, offset: offset, data: $0) }
            case .command(let c):
                try staging.append(c)
            }
        }
    }

    func contents(_ disk: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(descriptors[disk].sizeBytes))
        try out.withUnsafeMutableBytes { try images.files[disk].read(into: $0, at: 0) }
        return out
    }

    func matches(_ oracle: OracleDisks) throws -> Bool {
        try (0..<descriptors.count).allSatisfy { try contents($0) == oracle.bytes[$0] }
    }
}

/// Random operations that overlap a lot (a small hot area), so order and replay matter.
func randomEpoch(_ g: inout SplitMix64, count: Int) -> [Operation] {
    (0..<count).map { _ in
        let disk = UInt32(g.next() % 2)
        let block: UInt64 = disk == 0 ? 512 : 4096
        let blocks: UInt64 = disk == 0 ? 512 : 32
        let start = g.next() % 16 % blocks
        let length = min(1 + g.next() % 8, blocks - start)
        switch g.next() % 6 {
        case 0: return .command(DiskCommand(disk: disk, kind: .discard, offset: start * block, length: length * block))
        case 1: return .command(DiskCommand(disk: disk, kind: .writeZeroes, offset: start * block, length: length * block))
        case 2: return .command(DiskCommand(disk: disk, kind: .flush, offset: 0, length: 0))
        default:
            let fill = UInt8(truncatingIfNeeded: g.next() | 1)
            return .write(disk: disk, offset: start * block, data: (0..<Int(length * block)).map { UInt8(truncatingIfNeeded: $0) &+ fill })
        }
    }
}

@Suite("Disk redo log and epoch staging")
struct DiskRedoLogTests {
    @Test func loggedThenAppliedEpochsGiveTheOraclesImages() throws {
        let bench = try Bench()
        let log = try DiskRedoLog(path: bench.logPath)
        var oracle = OracleDisks(bench.descriptors)
        var g = SplitMix64(seed: 9)
        for epoch in 1...20 as ClosedRange<Epoch> {
            let ops = randomEpoch(&g, count: 1 + Int(g.next() % 12))
            try bench.stage(ops)
            try log.log(bench.staging, epoch: epoch)
            try bench.staging.reset()
            #expect(log.pending?.epoch == epoch)
            // Logged, not applied: the images still hold the previous epoch.
            #expect(try bench.matches(oracle))
            try log.applyLogged(to: bench.images)
            ops.forEach { oracle.apply($0) }
            #expect(try bench.matches(oracle), "after epoch \(epoch)")
            #expect(log.appliedEpoch == epoch && log.pending == nil)
        }
    }

    @Test func aCrashAnywhereDuringTheApplyIsRepairedByApplyingTheRecordAgain() throws {
        var g = SplitMix64(seed: 0xC4A5)
        for round in 0..<30 {
            let bench = try Bench()
            var oracle = OracleDisks(bench.descriptors)
            let log = try DiskRedoLog(path: bench.logPath)
            let first = randomEpoch(&g, count: 6)
            try bench.stage(first)
            try log.log(bench.staging, epoch: 1)
            try bench.staging.reset()
            try log.applyLogged(to: bench.images)
            first.forEach { oracle.apply($0) }
            let second = randomEpoch(&g, count: 4 + Int(g.next() % 10))
            try bench.stage(second)
            try log.log(bench.staging, epoch: 2)
            // The process dies after `crashAt` entries reached the images.
            let crashAt = Int(g.next() % UInt64(second.count + 1))
            try log.applyLogged(to: bench.images, stoppingAfter: crashAt)
            let reopened = try DiskRedoLog(path: bench.logPath)
            #expect(reopened.pending?.epoch == 2, "round \(round): the logged epoch is found again")
            try reopened.applyLogged(to: bench.images)
            second.forEach { oracle.apply($0) }
            #expect(try bench.matches(oracle), "round \(round): crash after \(crashAt) of \(second.count) entries, then replay")
            #expect(reopened.appliedEpoch == 2)
        }
    }

    @Test func aCrashBeforeTheApplyFindsTheWholeEpochAndAnAppliedOneIsNotAppliedTwice() throws {
        let bench = try Bench()
        var oracle = OracleDisks(bench.descriptors)
        let ops: [Operation] = [.write(disk: 0, offset: 0, data: [UInt8](repeating: 7, count: 1024)),
                                .command(DiskCommand(disk: 0, kind: .writeZeroes, offset: 512, length: 512))]
        do {
            let log = try DiskRedoLog(path: bench.logPath)
            try bench.stage(ops)
            try log.log(bench.staging, epoch: 5)
        }
        let recovered = try DiskRedoLog(path: bench.logPath)
        #expect(recovered.pending?.epoch == 5 && recovered.pending?.entryCount == 2)
        try recovered.applyLogged(to: bench.images)
        try recovered.syncHeader()
        ops.forEach { oracle.apply($0) }
        #expect(try bench.matches(oracle))
        // Applied and persisted: a later start finds nothing to do, even after the image changed.
        try [UInt8](repeating: 9, count: 512).withUnsafeBytes { try bench.images.files[0].write($0, at: 0) }
        let again = try DiskRedoLog(path: bench.logPath)
        #expect(again.pending == nil)
        #expect(again.appliedEpoch == 5 && again.appliedSequence == 1)
    }

    @Test func aTornRecordIsNeverApplied() throws {
        let bench = try Bench()
        let log = try DiskRedoLog(path: bench.logPath)
        try bench.stage([.write(disk: 1, offset: 4096, data: [UInt8](repeating: 3, count: 4096))])
        try log.log(bench.staging, epoch: 1)
        // Half of the entries' bytes never reached the log: one byte differs from what its CRC covers.
        try [UInt8]([0xEE]).withUnsafeBytes { try log.file.write($0, at: DiskRedoLog.entriesOffset + 100) }
        let reopened = try DiskRedoLog(path: bench.logPath)
        #expect(reopened.pending == nil)
        #expect(try bench.contents(1).allSatisfy { $0 == 0 })
    }

    @Test func aVoidedEpochIsNeverApplied() throws {
        let bench = try Bench()
        let log = try DiskRedoLog(path: bench.logPath)
        try bench.stage([.write(disk: 0, offset: 0, data: [UInt8](repeating: 1, count: 512))])
        try log.log(bench.staging, epoch: 3)
        try log.void()  // its memory could not be committed
        #expect(log.pending == nil)
        #expect(try DiskRedoLog(path: bench.logPath).pending == nil)
        #expect(try bench.contents(0).allSatisfy { $0 == 0 })
    }

    @Test func stagingPastTheMemoryBoundSpillsToAFileAndKeepsTheOrder() throws {
        let bench = try Bench(memoryBound: 8 << 10)
        let log = try DiskRedoLog(path: bench.logPath)
        var oracle = OracleDisks(bench.descriptors)
        var g = SplitMix64(seed: 44)
        let ops = randomEpoch(&g, count: 60)
        try bench.stage(ops)
        #expect(bench.staging.spilledBytes > 0, "60 operations do not fit 8 KiB")
        #expect(bench.staging.stagedBytes > 8 << 10)
        #expect(bench.staging.entryCount == 60)
        try log.log(bench.staging, epoch: 1)
        try log.applyLogged(to: bench.images)
        ops.forEach { oracle.apply($0) }
        #expect(try bench.matches(oracle), "memory part first, then the spill file, in arrival order")
        try bench.staging.reset()
        #expect(bench.staging.stagedBytes == 0 && bench.staging.entryCount == 0)
        #expect(try DiskFile(path: bench.staging.spillPath, create: false).size() == 0, "reset empties the spill file")
    }

    @Test func discardAndWriteZeroesReadAsZeros() throws {
        let bench = try Bench()
        let file = bench.images.files[0]
        try [UInt8](repeating: 0xFF, count: 64 << 10).withUnsafeBytes { try file.write($0, at: 0) }
        try file.zero(at: 4096, length: 8192)
        let bytes = try bench.contents(0)
        #expect(bytes[0..<4096].allSatisfy { $0 == 0xFF })
        #expect(bytes[4096..<12288].allSatisfy { $0 == 0 })
        #expect(bytes[12288..<(64 << 10)].allSatisfy { $0 == 0xFF })
        #expect(try file.size() == 256 << 10, "the image keeps its size")
    }

    @Test func aFileThatIsNotARedoLogIsRefusedNamingIt() throws {
        let bench = try Bench()
        let file = try DiskFile(path: bench.logPath, create: true)
        try [UInt8](repeating: 0x41, count: 8192).withUnsafeBytes { try file.write($0, at: 0) }
        #expect {
            _ = try DiskRedoLog(path: bench.logPath)
        } throws: { error in
            "\(error)".contains("is not a remusd disk redo log")
        }
    }

    @Test func anEntryOutsideItsDiskIsRefusedBeforeAnyByteOfItIsWritten() throws {
        let bench = try Bench()
        let log = try DiskRedoLog(path: bench.logPath)
        try bench.stage([.write(disk: 1, offset: 128 << 10, data: [UInt8](repeating: 1, count: 4096))])
        try log.log(bench.staging, epoch: 1)
        #expect(throws: DiskLogError.self) { try log.applyLogged(to: bench.images) }
        #expect(log.pending?.epoch == 1, "the record stays pending")
    }
}
