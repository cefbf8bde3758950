// The primary's side of replicated disks: the one narrow interface through which a guest's disk
// operations reach the checkpoints (I9). The simulated guest feeds it from its workload; an NBD or
// ublk server in front of a Xen guest's disk will feed it the same way.

/// One epoch's disk operations, in the order the primary performed them, as `DiskEntry` records
/// (header, then a write's data padded to 8) in one growing buffer: appending allocates only when
/// the buffer grows, never per operation.
public struct DiskOperations: Sendable, Equatable {
    /// The entries, back to back.
    public private(set) var bytes: [UInt8] = []
    /// Operations held.
    public private(set) var count = 0

    public init() {}

    /// Appends `entry` with its data (a write's bytes; empty for the other kinds).
    public mutating func append(_ entry: DiskEntry, data: UnsafeRawBufferPointer) {
        let padding = entry.storedDataBytes - data.count
        precondition(padding >= 0 && padding < 8, "\(entry.kind) entry of \(entry.length) bytes with \(data.count) bytes of data")
        bytes.append(contentsOf: entry.bytes)
        bytes.append(contentsOf: data)
        bytes.append(contentsOf: repeatElement(0, count: padding))
        count += 1
    }

    /// Forgets every operation (keeps the buffer's capacity up to `keepingCapacityUpTo` bytes).
    public mutating func removeAll(keepingCapacityUpTo limit: Int = 1 << 24) {
        bytes.removeAll(keepingCapacity: bytes.capacity <= limit)
        count = 0
    }

    /// Calls `body` with each operation in order: its header and (for a write) its data, a view
    /// valid during the call.
    public func forEach(_ body: (DiskEntry, UnsafeRawBufferPointer) throws -> Void) rethrows {
        try bytes.withUnsafeBytes { raw in
            var at = 0
            while at < raw.count {
                // SAFETY: only `append` writes `bytes`, a whole entry at a time.
                let entry = DiskEntry(UnsafeRawBufferPointer(rebasing: raw[at..<(at + DiskEntry.headerBytes)]))!
                at += DiskEntry.headerBytes
                let data = entry.kind == .write ? UnsafeRawBufferPointer(rebasing: raw[at..<(at + Int(entry.length))]) : UnsafeRawBufferPointer(start: nil, count: 0)
                try body(entry, data)
                at += entry.storedDataBytes
            }
        }
    }
}

/// A protected guest's disks as the primary's shell sees them.
///
/// Every write, flush, discard and write-zeroes the guest makes is applied to the local image and
/// appended, in order, to the journal of the epoch that runs; a write completes for the guest
/// only once it is in the journal, so any completion the guest can see in memory N is in
/// checkpoint N or earlier (I9). The shell:
/// - `restartJournal()` when a connection starts (before its first pre-copy round): the backup's
///   images are then brought up to date by a full copy (`read`) in that round, and by each
///   checkpoint's operations after it. Operations made during the copy are in the journal too, so
///   they reach the backup again after the copy: whatever the copy read, the image converges.
/// - `sealEpoch()` while the guest is suspended for checkpoint N: N's operations, the journal empty.
///
/// Implementations take the journal's lock themselves: the guest's I/O threads append while the
/// shell's loop thread seals.
public protocol GuestDisks: AnyObject, Sendable {
    /// The disks, numbered 0, 1, 2, … (DISK_DESCRIPTOR).
    var descriptors: [DiskDescriptor] { get }
    /// Forgets the journal and records from now on (a connection starts with a full copy).
    func restartJournal()
    /// The operations since the last seal (or restart), in order; the journal starts empty.
    /// Throws when they could not all be kept (the journal's bound): the shell then resynchronises.
    func sealEpoch() throws -> DiskOperations
    /// Reads `buffer.count` bytes of disk `disk` at `offset` from the local image (the full copy).
    func read(disk: UInt32, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
}
