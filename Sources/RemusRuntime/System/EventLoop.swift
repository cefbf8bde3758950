import RemusCore

/// A serial executor for one engine: other threads post events; one thread takes them in order
/// and runs the handler, which calls the engine and carries out its directives. A tick is
/// delivered when the deadline passes; the shell sets the deadline after every event and tick
/// from the engine's `nextDeadline` (and its own), so the loop keeps exactly one value and never
/// drops a deadline someone still needs. Events go before a due tick.
///
/// `@unchecked Sendable`: all mutable state is guarded by `monitor`.
public final class EventLoop<Event: Sendable>: @unchecked Sendable {
    private let monitor = MonitorLock()
    private var queue: [Event] = []
    private var deadline: UInt64?
    private var stopped = false
    private let clock: any HostClock

    public init(clock: any HostClock) { self.clock = clock }

    /// Queues an event from any thread.
    public func post(_ event: Event) {
        monitor.withLock {
            queue.append(event)
            monitor.broadcast()
        }
    }

    /// Sets when the next tick is due (monotonic ns), replacing the previous deadline; nil: no
    /// tick until a new one is set. A deadline already past gives a tick at once (after queued
    /// events); it stays set until replaced, so the shell must set a new one after every tick.
    public func setDeadline(_ newDeadline: UInt64?) {
        monitor.withLock {
            deadline = newDeadline
            monitor.broadcast()
        }
    }

    /// Makes `run` return after the current event.
    public func stop() {
        monitor.withLock {
            stopped = true
            monitor.broadcast()
        }
    }

    /// Runs on the calling thread until `stop()`: `handle(event)` for each event, `tick(now)` at deadlines.
    public func run(handle: (Event) -> Void, tick: (UInt64) -> Void) {
        while true {
            var next: Event?
            var tickNow: UInt64?
            monitor.withLock {
                while !stopped && queue.isEmpty {
                    if let d = deadline, clock.monotonicNs() >= d { break }
                    monitor.wait(untilMonotonic: deadline)
                }
                if stopped { return }
                if !queue.isEmpty {
                    next = queue.removeFirst()
                } else {
                    tickNow = clock.monotonicNs()
                }
            }
            if let next { handle(next) } else if let tickNow { tick(tickNow) } else { return }
        }
    }
}
