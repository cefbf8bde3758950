import Glibc
import RemusCore
@testable import RemusXen
import RemusSystem
import Testing

// The Xen backup's feed into libxl's restore holds checkpoints it already acknowledged: it may
// drop none of them, so its bound is backpressure — the reader waits for room before it reads
// the next checkpoint. Tested on the queue itself, without Xen.

private func item(_ tag: UInt8, _ count: Int) -> XenFeedQueue.Item {
    XenFeedQueue.Item(bytes: [UInt8](repeating: tag, count: count), checkpoint: true)
}

@Test func aStalledFeedKeepsTheReaderWaitingAndSaysHowMuchIsQueued() throws {
    let queue = XenFeedQueue(boundBytes: 2 << 20)
    for tag in 0..<3 { queue.append(item(UInt8(tag), 1 << 20)) }
    let why = try #require(queue.waitForRoom(until: monotonicNanoseconds() + 20_000_000))
    #expect(why.contains("3 MiB") && why.contains("bound 2 MiB"), "\(why)")
    // The feeder takes one: it still counts until written, then the reader may go on.
    let first = try #require(queue.takeFirst())
    #expect(first.bytes.first == 0)
    #expect(queue.waitForRoom(until: monotonicNanoseconds()) != nil)
    queue.written(first.bytes.count)
    #expect(queue.waitForRoom(until: monotonicNanoseconds()) == nil)
    #expect(queue.queuedBytes == 2 << 20)
}

@Test func stoppingTheFeedReleasesAWaitingReaderAndEmptiesTheQueue() {
    let queue = XenFeedQueue(boundBytes: 0)
    queue.append(item(1, 4096))
    let answer = Box()
    startThread(name: "feed-waiter") { answer.set(queue.waitForRoom(until: monotonicNanoseconds() + 30_000_000_000)) }
    queue.stop("the replica was discarded")
    #expect(answer.wait(seconds: 10) == .some(nil), "the waiting reader was not released by stop")
    #expect(queue.queuedBytes == 0 && queue.isEmpty && queue.takeFirst() == nil)
}

@Test func againstASlowFeederTheQueueStaysWithinItsBoundAndLosesNothing() throws {
    // A producer (the reader: commit, then wait for room) against a feeder thread that takes and
    // "writes" items as it gets to them. Item sizes are seeded; every item must arrive, in order.
    let bound = 64 << 10
    let queue = XenFeedQueue(boundBytes: bound)
    let received = Received()
    let count = 2000
    startThread(name: "feeder") {
        var got = 0
        while got < count {
            guard let next = queue.takeFirst() else { sched_yield(); continue }
            received.add(next.bytes)
            queue.written(next.bytes.count)
            got += 1
        }
    }
    var rng = SplitMix64(seed: 13)
    var sizes: [Int] = []
    var peak = 0
    for i in 0..<count {
        let size = Int.random(in: 1...(16 << 10), using: &rng)
        sizes.append(size)
        queue.append(item(UInt8(truncatingIfNeeded: i), size))
        peak = max(peak, queue.queuedBytes)
        #expect(queue.queuedBytes <= bound + size, "over the bound by more than the item just committed")
        try #require(queue.waitForRoom(until: monotonicNanoseconds() + 10_000_000_000) == nil, "the feeder made no room within 10 s")
    }
    #expect(received.wait(count: count, seconds: 30))
    let got = received.all
    #expect(got.count == count)
    for (i, bytes) in got.enumerated() {
        guard bytes.count == sizes[i] && bytes.allSatisfy({ $0 == UInt8(truncatingIfNeeded: i) }) else {
            Issue.record("item \(i) arrived as \(bytes.count) bytes of \(bytes.first ?? 0), sent \(sizes[i]) of \(UInt8(truncatingIfNeeded: i))")
            return
        }
    }
    #expect(peak <= bound + (16 << 10))
}

/// A value another thread sets once, awaited with a deadline.
private final class Box: @unchecked Sendable {  // guarded by `lock`
    private let lock = MonitorLock()
    private var value: String??
    func set(_ v: String?) { lock.withLock { value = .some(v); lock.broadcast() } }
    func wait(seconds: UInt64) -> String?? {
        let deadline = monotonicNanoseconds() + seconds * 1_000_000_000
        return lock.withLock {
            while value == nil && monotonicNanoseconds() < deadline { lock.wait(untilMonotonic: deadline) }
            return value
        }
    }
}

/// What the feeder wrote, in order.
private final class Received: @unchecked Sendable {  // guarded by `lock`
    private let lock = MonitorLock()
    private var items: [[UInt8]] = []
    func add(_ bytes: [UInt8]) { lock.withLock { items.append(bytes); lock.broadcast() } }
    var all: [[UInt8]] { lock.withLock { items } }
    func wait(count: Int, seconds: UInt64) -> Bool {
        let deadline = monotonicNanoseconds() + seconds * 1_000_000_000
        return lock.withLock {
            while items.count < count && monotonicNanoseconds() < deadline { lock.wait(untilMonotonic: deadline) }
            return items.count >= count
        }
    }
}
