import Synchronization

/// Counts the Xen library objects this process holds open (handles, loggers, hypercall
/// buffers), so tests can prove that a failed detection or a dropped host leaks none.
enum XenHandleCensus {
    private static let live = Atomic<Int>(0)

    /// Objects currently open.
    static var count: Int { live.load(ordering: .acquiring) }
    static func opened() { live.add(1, ordering: .relaxed) }
    static func closed() { live.subtract(1, ordering: .releasing) }
}
