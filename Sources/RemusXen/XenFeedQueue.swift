import RemusSystem

/// What a Xen backup has committed (and acknowledged) but not yet written into libxl's restore
/// pipe, in order. Nothing in it may be dropped — each checkpoint was acknowledged — so it is
/// bounded by backpressure: the backup's reader calls `waitForRoom` after each commit and reads
/// the primary's next checkpoint only once the feeder has brought the queue within `boundBytes`.
/// The queue therefore holds at most `boundBytes` plus the checkpoint committed last, plus the one
/// the feeder is writing (each at most the declared guest + 64 MiB).
///
/// `@unchecked Sendable`: all state is guarded by `monitor`.
final class XenFeedQueue: @unchecked Sendable {
    struct Item {
        var bytes: [UInt8]
        /// The item ends a checkpoint (libxenguest may restore up to here).
        var checkpoint: Bool
    }

    /// Bytes the queue may hold before the reader waits (the item being written counts).
    let boundBytes: Int
    private let monitor = MonitorLock()
    private var items: [Item] = []
    private var head = 0
    private var held = 0
    private var stopped: String?

    init(boundBytes: Int) { self.boundBytes = boundBytes }

    /// Bytes queued or being written now.
    var queuedBytes: Int { monitor.withLock { held } }
    /// Whether nothing waits to be taken (an item may still be being written).
    var isEmpty: Bool { monitor.withLock { head == items.count } }

    /// Queues `item`; never blocks and never drops (the bound is kept by `waitForRoom`).
    func append(_ item: Item) {
        monitor.withLock {
            items.append(item)
            held += item.bytes.count
        }
    }

    /// The oldest item, for the feeder to write; it still counts until `written`.
    func takeFirst() -> Item? {
        monitor.withLock {
            guard head < items.count else { return nil }
            let item = items[head]
            items[head].bytes = []
            head += 1
            if head > 64 && head * 2 > items.count {
                items.removeFirst(head)
                head = 0
            }
            return item
        }
    }

    /// The feeder is done with an item of `count` bytes (written, or failed).
    func written(_ count: Int) {
        monitor.withLock {
            held -= count
            monitor.broadcast()
        }
    }

    /// The feed ended (failed, closed at failover, discarded): what is queued goes, and nobody
    /// waits for room any more.
    func stop(_ why: String) {
        monitor.withLock {
            if stopped == nil { stopped = why }
            held -= items[head...].reduce(0) { $0 + $1.bytes.count }
            items.removeAll()
            head = 0
            monitor.broadcast()
        }
    }

    /// Waits until the queue holds at most `boundBytes`, the feed stopped, or `deadlineNs`
    /// (monotonic) passes. Nil when the reader may go on; otherwise what is still queued.
    func waitForRoom(until deadlineNs: UInt64) -> String? {
        monitor.withLock {
            while held > boundBytes && stopped == nil && monotonicNanoseconds() < deadlineNs {
                monitor.wait(untilMonotonic: deadlineNs)
            }
            guard held > boundBytes && stopped == nil else { return nil }
            return "\(held >> 20) MiB of acknowledged checkpoints still wait for libxl's restore (bound \(boundBytes >> 20) MiB)"
        }
    }
}
