import Glibc
import RemusCore
import RemusSystem
import RemusTestSupport
import Testing
@testable import RemusDisk

/// A scratch directory removed when the test is done.
final class Scratch {
    let path: String
    init(_ tag: String) throws { path = try makeTemporaryDirectory("remusd-\(tag)") }
    deinit { removeTemporaryDirectory(path) }

    /// Creates `name` (sparse) with `size` bytes.
    func image(_ name: String, size: UInt64) throws {
        let file = try DiskFile(path: "\(path)/\(name)", create: true)
        try file.truncate(to: size)
    }

    func read(_ name: String) throws -> [UInt8] {
        let file = try DiskFile(path: "\(path)/\(name)", create: false)
        var out = [UInt8](repeating: 0, count: Int(try file.size()))
        try out.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        return out
    }
}

/// The operations a journal holds, as the test's `Operation`s (writes copied).
func operations(_ journal: DiskOperations) -> [Operation] {
    var out: [Operation] = []
    journal.forEach { entry, data in
        switch entry.kind {
        case .write: out.append(.write(disk: entry.disk, offset: entry.offset, data: Array(data)))
        case .flush: out.append(.command(DiskCommand(disk: entry.disk, kind: .flush, offset: 0, length: 0)))
        case .discard: out.append(.command(DiskCommand(disk: entry.disk, kind: .discard, offset: entry.offset, length: entry.length)))
        case .writeZeroes: out.append(.command(DiskCommand(disk: entry.disk, kind: .writeZeroes, offset: entry.offset, length: entry.length)))
        }
    }
    return out
}

extension Operation: Equatable {
    static func == (a: Operation, b: Operation) -> Bool {
        switch (a, b) {
        case (.write(let d1, let o1, let x1), .write(let d2, let o2, let x2)): return d1 == d2 && o1 == o2 && x1 == x2
        case (.command(let c1), .command(let c2)): return c1 == c2
        default: return false
        }
    }
}

@Suite("The primary's disk journal")
struct DiskJournalTests {
    /// The disks `randomEpoch` writes: 256 KiB of 512-byte blocks, 128 KiB of 4 KiB blocks.
    static let size: UInt64 = 128 << 10

    func journal(_ scratch: Scratch, bound: Int = 1 << 20) throws -> DiskJournal {
        try DiskJournal([.init(name: "xvda", path: "\(scratch.path)/a.img", sizeBytes: 2 * Self.size, blockSize: 512),
                         .init(name: "xvdb", path: "\(scratch.path)/b.img", sizeBytes: Self.size, blockSize: 4096)],
                        create: true, journalBound: bound)
    }

    func perform(_ op: Operation, on journal: DiskJournal) throws {
        switch op {
        case .write(let disk, let offset, let data): try data.withUnsafeBytes { try journal.write(disk: disk, offset: offset, data: $0) }
        case .command(let c):
            switch c.kind {
            case .flush: try journal.flush(disk: c.disk)
            case .discard: try journal.discard(disk: c.disk, offset: c.offset, length: c.length)
            case .writeZeroes: try journal.writeZeroes(disk: c.disk, offset: c.offset, length: c.length)
            }
        }
    }

    @Test("Each epoch's journal holds its operations in order, and the local images equal the oracle's")
    func journalAndImagesFollowTheOperations() throws {
        let scratch = try Scratch("journal")
        let disks = try journal(scratch)
        let descriptors = disks.descriptors
        #expect(descriptors.map(\.name) == ["xvda", "xvdb"] && descriptors.map(\.disk) == [0, 1])
        var oracle = OracleDisks(descriptors.map { DiskDescriptor(disk: $0.disk, blockSize: $0.blockSize, sizeBytes: $0.sizeBytes, name: $0.name) })
        var g = SplitMix64(seed: 31)
        // Before a connection nothing is journaled (the full copy covers it), but the image changes.
        let early = randomEpoch(&g, count: 5)
        for op in early { try perform(op, on: disks); oracle.apply(op) }
        #expect(try disks.sealEpoch().count == 0)
        disks.restartJournal()
        for epoch in 1...10 {
            let ops = randomEpoch(&g, count: 1 + Int(g.next() % 10))
            for op in ops { try perform(op, on: disks); oracle.apply(op) }
            let sealed = try disks.sealEpoch()
            #expect(operations(sealed) == ops, "epoch \(epoch)")
            #expect(try disks.sealEpoch().count == 0, "a seal empties the journal")
        }
        #expect(try scratch.read("a.img") == oracle.bytes[0])
        #expect(try scratch.read("b.img") == oracle.bytes[1])
    }

    @Test("A write longer than a DISK_WRITE is journaled as several, in order")
    func longWritesAreSplit() throws {
        let scratch = try Scratch("journal-long")
        let size = UInt64(StreamLimits.maxDiskWriteBytes) * 2 + 8192
        let disks = try DiskJournal([.init(name: "xvda", path: "\(scratch.path)/a.img", sizeBytes: size)], create: true)
        disks.restartJournal()
        let data = (0..<Int(size)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try data.withUnsafeBytes { try disks.write(disk: 0, offset: 0, data: $0) }
        var pieces: [(UInt64, Int)] = []
        try disks.sealEpoch().forEach { entry, bytes in pieces.append((entry.offset, bytes.count)) }
        let max = StreamLimits.maxDiskWriteBytes
        #expect(pieces.map(\.0) == [0, UInt64(max), UInt64(2 * max)] && pieces.map(\.1) == [max, max, 8192])
    }

    @Test("Past its bound the journal is dropped and the seal fails, asking for a resynchronisation; a restart records again")
    func anOverflowingJournalFailsTheSeal() throws {
        let scratch = try Scratch("journal-bound")
        let disks = try journal(scratch, bound: 64 << 10)
        disks.restartJournal()
        let block = [UInt8](repeating: 1, count: 4096)
        for i in 0..<20 { try block.withUnsafeBytes { try disks.write(disk: 1, offset: UInt64(i % 16) * 4096, data: $0) } }
        #expect(throws: DiskLogError.self) { try disks.sealEpoch() }
        disks.restartJournal()
        try block.withUnsafeBytes { try disks.write(disk: 1, offset: 0, data: $0) }
        #expect(try disks.sealEpoch().count == 1)
    }

    @Test("Over images an NBD server owns, the journal records what the server applied, in its order, and never writes itself")
    func recordedMutationsAreJournaledInOrder() throws {
        let scratch = try Scratch("journal-record")
        try scratch.image("a.img", size: Self.size)
        let image = try DiskFile(path: "\(scratch.path)/a.img", create: false)
        let disks = DiskJournal(descriptors: [DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: Self.size, name: "xvda")], images: [image])
        disks.restartJournal()
        let ops: [Operation] = [
            .write(disk: 0, offset: 4096, data: [UInt8](repeating: 5, count: 8192)),
            .command(DiskCommand(disk: 0, kind: .flush, offset: 0, length: 0)),
            .command(DiskCommand(disk: 0, kind: .discard, offset: 4096, length: 4096)),
        ]
        for op in ops {
            switch op {
            case .write(let d, let o, let data): try data.withUnsafeBytes { try disks.record(.write(disk: d, offset: o, data: $0)) }
            case .command(let c): try disks.record(CompletedDiskOperation.command(c))
            }
        }
        #expect(throws: DiskLogError.self) { try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try disks.record(.write(disk: 0, offset: Self.size, data: $0)) } }
        #expect(operations(try disks.sealEpoch()) == ops)
        #expect(try scratch.read("a.img").allSatisfy { $0 == 0 }, "recording applies nothing: the server did")
    }

    @Test("Misaligned, out-of-range and unknown-disk operations are refused and change nothing")
    func badOperationsAreRefused() throws {
        let scratch = try Scratch("journal-bad")
        let disks = try journal(scratch)
        disks.restartJournal()
        let block = [UInt8](repeating: 9, count: 4096)
        try block.withUnsafeBytes { b in
            #expect(throws: DiskLogError.self) { try disks.write(disk: 1, offset: 512, data: b) }
            #expect(throws: DiskLogError.self) { try disks.write(disk: 1, offset: Self.size, data: b) }
            #expect(throws: DiskLogError.self) { try disks.write(disk: 2, offset: 0, data: b) }
        }
        #expect(throws: DiskLogError.self) { try disks.discard(disk: 0, offset: 0, length: 2 * Self.size + 512) }
        #expect(try disks.sealEpoch().count == 0)
        #expect(try scratch.read("b.img").allSatisfy { $0 == 0 })
    }

    @Test("An image that is missing, smaller than the disk, or in use is refused, naming the disk")
    func unusableImagesAreRefused() throws {
        let scratch = try Scratch("journal-refuse")
        func refusal(_ body: () throws -> Void) -> String {
            do { try body() } catch { return "\(error)" }
            return "accepted"
        }
        let missing = refusal { _ = try DiskJournal([.init(name: "xvda", path: "\(scratch.path)/none.img", sizeBytes: 4096)], create: false) }
        #expect(missing.contains("disk 'xvda'") && missing.contains("none.img"), "\(missing)")
        try scratch.image("small.img", size: 4096)
        let small = refusal { _ = try DiskJournal([.init(name: "xvda", path: "\(scratch.path)/small.img", sizeBytes: 8192)], create: false) }
        #expect(small.contains("smaller") && small.contains("4096") && small.contains("8192"), "\(small)")
        let held = try DiskJournal([.init(name: "xvda", path: "\(scratch.path)/small.img", sizeBytes: 4096)], create: false)
        let busy = refusal { _ = try DiskJournal([.init(name: "xvdb", path: "\(scratch.path)/small.img", sizeBytes: 4096)], create: false) }
        #expect(busy.contains("disk 'xvdb'") && busy.contains("in use"), "\(busy)")
        _ = held
    }
}

@Suite("The backup's disk directory")
struct BackupDisksTests {
    static let disk = DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: 64 << 10, name: "xvda")

    @Test("A disk the backup cannot serve is refused before anything changes, naming the disk and what to do")
    func unservableDisksAreRefused() throws {
        let scratch = try Scratch("backup-refuse")
        let disks = try BackupDisks(directory: scratch.path)
        let missing = disks.open([Self.disk]) ?? "accepted"
        #expect(missing.contains("'xvda'") && missing.contains("missing") && missing.contains("truncate -s 65536"), "\(missing)")
        try scratch.image("xvda", size: 4096)
        let small = disks.open([Self.disk]) ?? "accepted"
        #expect(small.contains("'xvda'") && small.contains("smaller") && small.contains("grow"), "\(small)")
        let named = disks.open([DiskDescriptor(disk: 0, blockSize: 4096, sizeBytes: 4096, name: "../etc")]) ?? "accepted"
        #expect(named.contains("not a plain file name"), "\(named)")
        try scratch.image("xvda", size: 64 << 10)
        let other = try DiskFile(path: "\(scratch.path)/xvda", create: false)
        #expect(other.lockExclusive() == nil)
        let busy = disks.open([Self.disk]) ?? "accepted"
        #expect(busy.contains("'xvda'") && busy.contains("in use"), "\(busy)")
        #expect(disks.images == nil, "a refusal keeps no image")
        #expect(access("\(scratch.path)/.remusd-disks", F_OK) != 0, "a refusal writes nothing")
    }

    @Test("Two backups cannot share a disk directory")
    func aDirectoryServesOneBackup() throws {
        let scratch = try Scratch("backup-twice")
        let first = try BackupDisks(directory: scratch.path)
        #expect(throws: DiskLogError.self) { _ = try BackupDisks(directory: scratch.path) }
        _ = first
    }

    @Test("Staged operations come back in order with their data, from memory and then from the spill file")
    func stagingGivesBackEveryEntryInOrder() throws {
        let scratch = try Scratch("staging-entries")
        let staging = DiskEpochStaging(memoryBound: 10_000, spillPath: "\(scratch.path)/spill")
        var g = SplitMix64(seed: 5)
        var staged: [Operation] = []
        for n in 0..<12 {
            let offset = (g.next() % 16) * 512
            let op: Operation = n % 3 == 2
                ? .command(DiskCommand(disk: 1, kind: n % 2 == 0 ? .writeZeroes : .flush, offset: n % 2 == 0 ? offset : 0, length: n % 2 == 0 ? 1024 : 0))
                : .write(disk: 0, offset: offset, data: (0..<(512 * (1 + n % 4))).map { _ in UInt8(truncatingIfNeeded: g.next()) })
            switch op {
            case .write(let d, let o, let data): try data.withUnsafeBytes { try staging.appendWrite(disk: d, offset: o, data: $0) }
            case .command(let c): try staging.append(c)
            }
            staged.append(op)
        }
        #expect(staging.spilledBytes > 0, "the bound makes the later entries spill")
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: StreamLimits.maxDiskWriteBytes, alignment: 4096)
        defer { buffer.deallocate() }
        var back = DiskOperations()
        try staging.forEachEntry(scratch: buffer) { entry, data in back.append(entry, data: data) }
        #expect(operations(back) == staged)
    }

    @Test("A pre-copy round goes onto the images without a redo log record, and the next checkpoint applies over it")
    func aCopyRoundBypassesTheRedoLog() throws {
        let scratch = try Scratch("backup-copy")
        try scratch.image("xvda", size: Self.disk.sizeBytes)
        let disks = try BackupDisks(directory: scratch.path)
        #expect(disks.open([Self.disk]) == nil)
        try disks.prepareStream()
        // 8 KiB in memory: most of the 64 KiB copy spills.
        let staging = disks.makeStaging(tag: 1, memoryBound: 8 << 10)
        var oracle = OracleDisks([Self.disk])
        func stage(_ ops: [Operation]) throws {
            try staging.reset()
            for op in ops {
                switch op {
                case .write(let d, let o, let data): try data.withUnsafeBytes { try staging.appendWrite(disk: d, offset: o, data: $0) }
                case .command(let c): try staging.append(c)
                }
                oracle.apply(op)
            }
        }
        // The full copy as a primary sends it: 4 KiB pieces, an all-zero piece as write-zeroes.
        try stage((0..<16).map { piece in
            piece == 5 ? .command(DiskCommand(disk: 0, kind: .writeZeroes, offset: 5 * 4096, length: 4096))
                       : .write(disk: 0, offset: UInt64(piece) * 4096, data: [UInt8](repeating: UInt8(piece + 1), count: 4096))
        })
        #expect(staging.spilledBytes > 0)
        try disks.copy(staging)
        #expect(try scratch.read("xvda") == oracle.bytes[0], "the copy is on the image")
        #expect(disks.pendingEntries == 0 && disks.appliedEpoch == 0, "no redo log record was made for it")
        try disks.apply()  // the shell's apply after a pre-copy round: nothing is pending
        #expect(disks.appliedEpoch == 0)
        try stage([.write(disk: 0, offset: 4096, data: [UInt8](repeating: 0xEE, count: 4096)),
                   .command(DiskCommand(disk: 0, kind: .discard, offset: 0, length: 4096))])
        try disks.log(staging, epoch: 1)
        try disks.apply()
        #expect(disks.appliedEpoch == 1)
        #expect(try scratch.read("xvda") == oracle.bytes[0], "checkpoint 1 applied over the copy")
    }

    @Test("A backup that dies in the middle of an apply restarts, and its redo log brings the image to the committed epoch")
    func aRestartFinishesTheApply() throws {
        let scratch = try Scratch("backup-restart")
        try scratch.image("xvda", size: Self.disk.sizeBytes)
        var oracle = OracleDisks([Self.disk])
        var g = SplitMix64(seed: 77)
        func epoch(_ count: Int) -> [Operation] {
            (0..<count).map { _ in
                let offset = (g.next() % 16) * 4096
                if g.next() % 4 == 0 { return .command(DiskCommand(disk: 0, kind: .writeZeroes, offset: offset, length: 4096)) }
                return .write(disk: 0, offset: offset, data: [UInt8](repeating: UInt8(truncatingIfNeeded: g.next() | 1), count: 4096))
            }
        }
        func stage(_ ops: [Operation], into staging: DiskEpochStaging) throws {
            try staging.reset()
            for op in ops {
                switch op {
                case .write(let d, let o, let data): try data.withUnsafeBytes { try staging.appendWrite(disk: d, offset: o, data: $0) }
                case .command(let c): try staging.append(c)
                }
            }
        }
        do {
            let disks = try BackupDisks(directory: scratch.path)
            #expect(disks.open([Self.disk]) == nil)
            try disks.prepareStream()
            let staging = disks.makeStaging(tag: 1)
            for n in 1...3 as ClosedRange<Epoch> {
                let ops = epoch(8)
                try stage(ops, into: staging)
                try disks.log(staging, epoch: n)
                try disks.apply()
                ops.forEach { oracle.apply($0) }
            }
            // Epoch 4: logged (so acknowledged), then the process dies after 3 of its 8 entries.
            let ops = epoch(8)
            try stage(ops, into: staging)
            try disks.log(staging, epoch: 4)
            try disks.withLoggedRecord { log, images in try log.applyLogged(to: images, stoppingAfter: 3) }
            #expect(try scratch.read("xvda") != oracle.bytes[0], "the crash left part of epoch 4")
            ops.forEach { oracle.apply($0) }
        }
        let restarted = try BackupDisks(directory: scratch.path)
        #expect(restarted.recoveredEpoch == 4 && restarted.recoveryProblem == nil)
        #expect(restarted.appliedEpoch == 4)
        #expect(try scratch.read("xvda") == oracle.bytes[0], "the image holds epoch 4 whole")
    }
}
