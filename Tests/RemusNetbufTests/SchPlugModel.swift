import RemusNetbuf

/// A model of the kernel's plug qdisc, written from the behaviour of net/sched/sch_plug.c
/// (Linux 6.1): it counts packets per epoch, remembers exactly one closed epoch, and releases
/// by count from the head of one FIFO. The ledger tests run against it; the testbed checks the
/// same behaviour against the real kernel.
struct SchPlugModel {
    struct Packet: Equatable { var number: Int; var epoch: UInt64 }

    private(set) var queue: [Packet] = []
    private(set) var sent: [Packet] = []
    private var throttled = true
    private var unplugIndefinite = false
    private var currentEpochPackets = 0
    private var lastEpochPackets = 0
    private var toRelease = 0

    mutating func enqueue(_ packet: Packet) {
        if !unplugIndefinite { currentEpochPackets += 1 }
        queue.append(packet)
        dequeueAll()
    }

    mutating func apply(_ command: PlugCommand) {
        switch command {
        case .buffer:
            lastEpochPackets = currentEpochPackets
            currentEpochPackets = 0
            if unplugIndefinite { throttled = true }
            unplugIndefinite = false
        case .releaseOne:
            toRelease += lastEpochPackets
            lastEpochPackets = 0
            throttled = false
        case .releaseIndefinite:
            unplugIndefinite = true
            toRelease = 0
            lastEpochPackets = 0
            currentEpochPackets = 0
            throttled = false
        }
        dequeueAll()
    }

    /// The device pulls packets as long as the qdisc hands them out.
    private mutating func dequeueAll() {
        while !throttled, !queue.isEmpty {
            if !unplugIndefinite {
                if toRelease == 0 { throttled = true; break }
                toRelease -= 1
            }
            sent.append(queue.removeFirst())
        }
    }
}
