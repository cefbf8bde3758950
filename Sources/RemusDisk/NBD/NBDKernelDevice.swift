import CDisk
import Glibc
import RemusSystem

/// A disk served to this host's kernel as `/dev/nbdN` by an `NBDServer`: the kernel's NBD client
/// gets one end of a socket pair by ioctl (no handshake, no nbd-client), and the server answers
/// on the other end. blkback can then serve the device to a Xen guest (`phy:/dev/nbdN`).
///
/// Two threads while attached: one inside NBD_DO_IT (the kernel's session), one serving.
/// `detach` ends both, each wait bounded.
///
/// `@unchecked Sendable`: immutable after init except `finished`, guarded by `monitor`.
public final class NBDKernelDevice: @unchecked Sendable {
    public let devicePath: String
    private let server: NBDServer
    private let device: Int32
    private let kernelEnd: Int32
    private let monitor = MonitorLock()
    private var sessionEnded = false
    private var serverEnded = false

    /// The device's request timeout: a request the server has not answered by then fails in
    /// the kernel (the guest sees an I/O error) instead of hanging.
    public static let requestTimeoutSeconds: UInt = 30

    /// Attaches `server`'s disk to `devicePath` (which must be free) and starts serving it.
    /// Throws, with nothing attached, when the device cannot be opened or configured (no `nbd`
    /// module, device in use).
    public init(devicePath: String, server: NBDServer) throws {
        self.devicePath = devicePath
        self.server = server
        let fd = open(devicePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            throw SystemError(call: "open(\(devicePath))", errno: code,
                              detail: code == ENOENT ? "no such device; load the nbd module (modprobe nbd)" : nil)
        }
        device = fd
        let (ours, theirs): (UnixConnection, Int32)
        do { (ours, theirs) = try UnixConnection.socketPair() } catch {
            close(fd)
            throw error
        }
        kernelEnd = theirs
        let d = server.descriptor
        let flags = UInt(NBD.hasFlags | NBD.sendFlush | NBD.sendFUA | NBD.sendTrim | NBD.sendWriteZeroes)
        guard remus_nbd_configure(fd, theirs, UInt(d.blockSize), d.sizeBytes, flags, Self.requestTimeoutSeconds) == 0 else {
            let code = errno
            _ = remus_nbd_clear(fd)
            close(theirs)
            close(fd)
            throw SystemError(call: "ioctl(\(devicePath), NBD_SET_*)", errno: code,
                              detail: code == EBUSY ? "the device is in use; choose a free /dev/nbdN" : nil)
        }
        startThread(name: "nbd-kernel") { [self] in
            _ = remus_nbd_do_it(device)  // returns when the session ends, whatever its status
            monitor.withLock { sessionEnded = true; monitor.broadcast() }
        }
        startThread(name: "nbd-serve") { [self] in
            server.serveKernel(ours)
            ours.shutdown()
            monitor.withLock { serverEnded = true; monitor.broadcast() }
        }
    }

    /// Ends the kernel's session (NBD_DISCONNECT, after it flushed what it queued), stops the
    /// server and waits for both threads, at most `timeoutMs`; returns whether both ended.
    @discardableResult
    public func detach(timeoutMs: Int = 10_000) -> Bool {
        _ = remus_nbd_disconnect(device)
        var ended = waitForBothThreads(untilMonotonic: monotonicNanoseconds() + UInt64(timeoutMs) * 1_000_000)
        if !ended {
            // The kernel did not let go in time: cut the socket under it.
            server.stop()
            ended = waitForBothThreads(untilMonotonic: monotonicNanoseconds() + 2_000_000_000)
        }
        _ = remus_nbd_clear(device)
        if ended {
            close(kernelEnd)
            close(device)
        }
        return ended
    }

    /// Waits until the kernel's session and the serving thread have both ended, or the deadline.
    private func waitForBothThreads(untilMonotonic deadline: UInt64) -> Bool {
        monitor.withLock {
            while !(sessionEnded && serverEnded) && monotonicNanoseconds() < deadline { _ = monitor.wait(untilMonotonic: deadline) }
            return sessionEnded && serverEnded
        }
    }
}
