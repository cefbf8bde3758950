import RemusCore

/// A serial executor for one engine: other threads post events; one thread takes them in order
/// and runs the handler, which calls the engine and carries out its directives. Ticks are
/// delivered when the earliest scheduled deadline passes.
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

    /// Asks for a tick no later than `at` (monotonic ns); the earliest request wins.
    public func scheduleTick(at: UInt64) {
        monitor.withLock {
            if deadline == nil || at < deadline! { deadline = at }
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
                    deadline = nil
                    tickNow = clock.monotonicNs()
                }
            }
            if let next { handle(next) } else if let tickNow { tick(tickNow) } else { return }
        }
    }
}
