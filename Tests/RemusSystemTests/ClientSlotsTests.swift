import Glibc
import RemusSystem
import Testing

/// The bounded pool of client threads behind the status socket and the metrics endpoint.
@Suite struct ClientSlotsTests {
    /// A gate a client body waits on, so a test decides when a slot frees.
    final class Gate: @unchecked Sendable {  // guarded by monitor
        private let monitor = MonitorLock()
        private var open = false
        func release() { monitor.withLock { open = true; monitor.broadcast() } }
        func wait() { monitor.withLock { while !open { monitor.wait() } } }
    }

    @Test func aFullPoolRefusesAtOnceWithoutAWait() {
        let slots = ClientSlots(capacity: 1)
        let gate = Gate()
        #expect(slots.serve(threadName: "held") { gate.wait() })
        #expect(!slots.serve(threadName: "refused") {})
        gate.release()
        slots.waitUntilIdle(untilMonotonic: monotonicNanoseconds() + 30_000_000_000)
    }
}
