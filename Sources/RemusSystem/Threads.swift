import CMalloc
import Glibc

/// A mutex and condition variable pair whose timed waits use CLOCK_MONOTONIC, so deadlines
/// come from the same clock the engines are fed.
///
/// `@unchecked Sendable`: the pthread objects are designed for sharing between threads; they live
/// at fixed heap addresses for the object's lifetime, and every access to the state they guard
/// happens with the mutex held.
public final class MonitorLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        // SAFETY: both pointers are freshly allocated and initialised here exactly once.
        mutex.initialize(to: pthread_mutex_t())
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        precondition(pthread_mutex_init(mutex, nil) == 0 && pthread_cond_init(cond, &attr) == 0)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Runs `body` with the mutex held.
    @discardableResult @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock()
        defer { unlock() }
        return try body()
    }

    /// Wakes every waiter. Call with the lock held.
    public func broadcast() { pthread_cond_broadcast(cond) }

    /// Waits (lock held) until signalled.
    public func wait() { pthread_cond_wait(cond, mutex) }

    /// Waits (lock held) until signalled or until the monotonic deadline (ns) passes; nil waits
    /// without a deadline. Returns false on timeout.
    @discardableResult
    public func wait(untilMonotonic deadline: UInt64?) -> Bool {
        guard let deadline else {
            pthread_cond_wait(cond, mutex)
            return true
        }
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(cond, mutex, &ts) != ETIMEDOUT
    }

    /// Waits (lock held) until signalled or `nanoseconds` of monotonic time passed. Returns false
    /// on timeout.
    @discardableResult
    public func wait(nanoseconds: UInt64) -> Bool {
        wait(untilMonotonic: monotonicNanoseconds() &+ nanoseconds)
    }
}

/// A thread of our own for blocking work (hypercalls, socket reads, capture), never the Swift
/// concurrency pool. Detached: nobody joins it.
public func startThread(name: String, _ body: @escaping @Sendable () -> Void) {
    do {
        let thread = try JoinableThread(name: name, body)
        pthread_detach(thread.handle)
    } catch {
        preconditionFailure("\(error)")
    }
}

/// A started pthread that must be joined (vCPU threads, emitters in tests).
public struct JoinableThread: Sendable {
    // pthread_t is an integer handle on Linux.
    fileprivate let handle: pthread_t

    private final class Start {
        let name: String
        let body: @Sendable () -> Void
        init(_ name: String, _ body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Starts a thread running `body`, named `name` for `top -H`, `ps -L` and /proc (the kernel
    /// keeps 15 bytes of it).
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        let start = Unmanaged.passRetained(Start(name, body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { context in
            // SAFETY: `context` is the retained Start passed below; it is consumed exactly once here.
            let start = Unmanaged<Start>.fromOpaque(context!).takeRetainedValue()
            nameThisThread(start.name)
            start.body()
            return nil
        }, start)
        guard rc == 0 else {
            Unmanaged<Start>.fromOpaque(start).release()
            throw SystemError(call: "pthread_create(\(name))", errno: rc)
        }
        handle = thread
    }

    /// Waits for the thread to finish.
    public func join() { pthread_join(handle, nil) }
}

/// Names the calling thread (Glibc's module map hides pthread_setname_np, and prctl is variadic:
/// the kernel's own file for it serves). A failure leaves the process's name, nothing else.
func nameThisThread(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
}

/// Keeps memory the process frees for its next allocations instead of giving it back to the
/// kernel. The stream path allocates and frees megabyte buffers all the time (a library's stream
/// in 1 MiB pieces, staged checkpoints, the feed queue); with glibc's defaults those above its
/// moving mmap threshold are mapped and unmapped each time, and the top of the heap is trimmed,
/// so their pages fault in again on every use. A page fault is cheap on bare metal, but in a
/// Xen PV dom0 it is a trap into the hypervisor and a page-table hypercall. What is kept is
/// bounded by what the process held at once (its peak), which its bounds already limit.
/// Returns whether glibc took it.
@discardableResult
public func keepFreedMemoryForReuse() -> Bool {
    // 32 MiB is glibc's largest mmap threshold (the staging arenas stay mmap'd, allocated once).
    remus_malloc_keep_freed(32 << 20, 512 << 20) == 1
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `MonitorLock`'s deadlines.
public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// A cap on the clients a server answers at once, each on a thread of its own: one slow client
/// never blocks the others, and a flood never makes the server hold more than `capacity` threads
/// serving plus `lingerCapacity` closing.
///
/// `@unchecked Sendable`: `busy` and `lingering` are guarded by `monitor`.
public final class ClientSlots: @unchecked Sendable {
    /// Most clients served at once.
    public let capacity: Int
    /// Most threads closing gently at once after their client's reply went out (see `serve`).
    public let lingerCapacity: Int
    private let monitor = MonitorLock()
    private var busy = 0
    private var lingering = 0

    public init(capacity: Int, lingerCapacity: Int = 0) {
        self.capacity = capacity
        self.lingerCapacity = lingerCapacity
    }

    /// Runs `body` on a thread named `threadName` when a slot is free, and frees the slot when
    /// `body` returns. Returns false, running nothing, when all `capacity` slots are taken.
    ///
    /// `body` gets `replied`: called right before the step that lets the client see the end of
    /// its reply (a shutdown for writing), it frees the slot then, so that a client that read its
    /// whole reply and comes straight back never finds its own slot still taken. It returns
    /// whether the thread may linger to close gently (one of `lingerCapacity`, held until `body`
    /// returns); when it returns false, `body` must return at once. Call it at most once.
    public func serve(threadName: String, _ body: @escaping @Sendable (_ replied: () -> Bool) -> Void) -> Bool {
        let admitted = monitor.withLock {
            guard busy < capacity else { return false }
            busy += 1
            return true
        }
        guard admitted else { return false }
        startThread(name: threadName) { [self] in
            var serving = true, lingers = false
            defer {
                monitor.withLock {
                    if serving { busy -= 1 }
                    if lingers { lingering -= 1 }
                    monitor.broadcast()
                }
            }
            body {
                precondition(serving, "ClientSlots: replied() called twice")
                return monitor.withLock {
                    serving = false
                    busy -= 1
                    lingers = lingering < lingerCapacity
                    if lingers { lingering += 1 }
                    monitor.broadcast()
                    return lingers
                }
            }
        }
        return true
    }

    /// Waits until no client is being served or lingering, or until `deadline` (monotonic ns) passes.
    public func waitUntilIdle(untilMonotonic deadline: UInt64) {
        monitor.withLock {
            while busy + lingering > 0 && monotonicNanoseconds() < deadline { _ = monitor.wait(untilMonotonic: deadline) }
        }
    }
}

/// One thread that runs jobs in the order they were given: blocking work (fdatasync of a disk
/// image, a redo log) off a loop thread that must keep answering, without reordering it.
///
/// `@unchecked Sendable`: `jobs` is guarded by `monitor`.
public final class SerialWorker: @unchecked Sendable {
    private let monitor = MonitorLock()
    private var jobs: [@Sendable () -> Void] = []

    /// Starts the thread, named `name`; it lives as long as the process.
    public init(name: String) {
        startThread(name: name) { [self] in
            while true {
                let job = monitor.withLock {
                    while jobs.isEmpty { monitor.wait() }
                    return jobs.removeFirst()
                }
                job()
            }
        }
    }

    /// Runs `job` after every job given before it.
    public func run(_ job: @escaping @Sendable () -> Void) {
        monitor.withLock {
            jobs.append(job)
            monitor.broadcast()
        }
    }
}
