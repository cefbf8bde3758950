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

    @Test func aClientWaitingForASlotIsAdmittedWhenThePreviousOneReturns() {
        let slots = ClientSlots(capacity: 1)
        let gate = Gate()
        #expect(slots.serve(threadName: "held") { gate.wait() })
        // The slot frees while the next client waits for it; the wait's deadline is far away,
        // so admission depends on the release, not on timing.
        startThread(name: "releaser") { gate.release() }
        let ran = Gate()
        #expect(slots.serve(threadName: "next", waitingUntil: monotonicNanoseconds() + 30_000_000_000) { ran.release() })
        ran.wait()
        slots.waitUntilIdle(untilMonotonic: monotonicNanoseconds() + 30_000_000_000)
    }

    @Test func aWaitForASlotEndsAtItsDeadline() {
        let slots = ClientSlots(capacity: 1)
        let gate = Gate()
        #expect(slots.serve(threadName: "held") { gate.wait() })
        let deadline = monotonicNanoseconds() + 50_000_000
        #expect(!slots.serve(threadName: "refused", waitingUntil: deadline) {})
        #expect(monotonicNanoseconds() >= deadline)
        gate.release()
        slots.waitUntilIdle(untilMonotonic: monotonicNanoseconds() + 30_000_000_000)
    }
}
