import Glibc

/// Why this machine cannot attach loop devices (the tests that need one are skipped saying so),
/// nil when it can: root and the loop driver.
public let loopDeviceUnavailable: String? = {
    if getuid() != 0 { return "not root: attaching a loop device needs CAP_SYS_ADMIN" }
    if access("/dev/loop-control", F_OK) != 0 { return "this kernel has no /dev/loop-control (modprobe loop)" }
    return nil
}()
