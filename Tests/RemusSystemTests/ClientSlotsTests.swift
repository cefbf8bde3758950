import Glibc
import Synchronization
import RemusSystem
import Testing

/// The bounded pool of client threads behind the status socket and the metrics endpoint.
@Suite struct ClientSlotsTests {
    /// A gate a client body waits on, so a test decides when a slot frees.
    final class Gate: @unchecked Sendable {  // guarded by monitor
        private let monitor = MonitorLock()
        private var open = false
        func release() { monitor.withLock { open = true; monitor.broadcast() } }
        /// Waits until released, at most 30 s; whether it was released.
        @discardableResult func wait() -> Bool {
            let deadline = monotonicNanoseconds() + 30_000_000_000
            return monitor.withLock {
                while !open && monotonicNanoseconds() < deadline { _ = monitor.wait(untilMonotonic: deadline) }
                return open
            }
        }
    }

    @Test func aFullPoolRefusesAtOnceWithoutAWait() {
        let slots = ClientSlots(capacity: 1)
        let gate = Gate()
        #expect(slots.serve(threadName: "held") { _ in gate.wait() })
        #expect(!slots.serve(threadName: "refused") { _ in })
        gate.release()
        slots.waitUntilIdle(untilMonotonic: monotonicNanoseconds() + 30_000_000_000)
    }

    /// A client that has its whole reply finds its slot free, even while the thread that served
    /// it still closes; the closing threads are bounded too.
    @Test func aRepliedClientsSlotIsFreeWhileItsThreadLingers() {
        let slots = ClientSlots(capacity: 1, lingerCapacity: 1)
        let gate = Gate()
        let firstReplied = Gate(), secondReplied = Gate()
        let lingered = Mutex<[Bool]>([])
        #expect(slots.serve(threadName: "first") { replied in
            let mayLinger = replied()
            lingered.withLock { $0.append(mayLinger) }
            firstReplied.release()
            if mayLinger { gate.wait() }
        })
        #expect(firstReplied.wait())
        // The first thread still runs (it lingers until the gate opens), yet its slot is free.
        #expect(slots.serve(threadName: "second") { replied in
            let mayLinger = replied()
            lingered.withLock { $0.append(mayLinger) }
            secondReplied.release()
        })
        #expect(secondReplied.wait())
        #expect(lingered.withLock { $0 } == [true, false], "the one linger slot went to the first thread; the second closes at once")
        gate.release()
        slots.waitUntilIdle(untilMonotonic: monotonicNanoseconds() + 30_000_000_000)
    }
}
