// pthread primitives for the vCPU threads: a mutex with a condition variable on CLOCK_MONOTONIC,
// and thread start/join. vCPUs are real threads, never tasks of the Swift concurrency pool.

import Glibc

/// A pthread mutex with one condition variable (timed waits on CLOCK_MONOTONIC).
///
/// `@unchecked Sendable`: the pthread objects are the synchronisation; they live at fixed heap
/// addresses for the object's lifetime and are only touched through the pthread calls.
final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        // SAFETY: both pointers are freshly allocated and initialised here exactly once.
        mutex.initialize(to: pthread_mutex_t())
        condition.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        precondition(pthread_mutex_init(mutex, nil) == 0 && pthread_cond_init(condition, &attributes) == 0)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }

    /// Runs `body` with the mutex held.
    @inline(__always)
    func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock()
        defer { unlock() }
        return try body()
    }

    /// Waits for a broadcast; the mutex must be held.
    func wait() { pthread_cond_wait(condition, mutex) }

    /// Waits for a broadcast or until `nanoseconds` of real monotonic time have passed; the mutex
    /// must be held. Returns false on timeout.
    @discardableResult
    func wait(nanoseconds: UInt64) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = UInt64(now.tv_nsec) + nanoseconds % 1_000_000_000
        var deadline = timespec()
        deadline.tv_sec = now.tv_sec + Int(nanoseconds / 1_000_000_000) + Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(condition, mutex, &deadline) != ETIMEDOUT
    }

    /// Wakes every waiter.
    func broadcast() { pthread_cond_broadcast(condition) }
}

/// A started pthread that must be joined.
struct JoinableThread: Sendable {
    // pthread_t is an integer handle on Linux.
    private let handle: pthread_t

    private final class Start {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    /// Starts a thread running `body`. (`name` is for diagnostics; Glibc's module map hides
    /// pthread_setname_np, so it is not applied to the thread yet.)
    init(name: String, _ body: @escaping @Sendable () -> Void) throws(SimError) {
        let start = Unmanaged.passRetained(Start(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { context in
            // SAFETY: `context` is the retained Start passed below; it is consumed exactly once here.
            let start = Unmanaged<Start>.fromOpaque(context!).takeRetainedValue()
            start.body()
            return nil
        }, start)
        guard rc == 0 else {
            Unmanaged<Start>.fromOpaque(start).release()
            throw .system(call: "pthread_create", errno: rc)
        }
        handle = thread
    }

    /// Waits for the thread to finish.
    func join() { pthread_join(handle, nil) }
}
