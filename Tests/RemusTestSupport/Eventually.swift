import RemusSystem

/// Polls `condition` until it holds or `deadline` passes; returns whether it held. Tests wait for
/// a state (a packet delivered, a daemon listening), never for a fixed time, and every wait has
/// this deadline. The condition is checked once more at the deadline.
public func eventually(
    deadline: Deadline, pollEveryMs: Int = 10, _ condition: () throws -> Bool
) rethrows -> Bool {
    while true {
        if try condition() { return true }
        let left = deadline.remainingNs
        if left == 0 { return try condition() }
        sleepNanoseconds(min(UInt64(pollEveryMs) * 1_000_000, left))
    }
}

/// Runs `/bin/sh -c command` (output captured, 1 MiB at most) for a test, with a generous
/// deadline (`timeoutMs`, default 5 minutes) so a hung child fails the test instead of the run.
/// Returns the exit code (128 + signal if a signal ended it) and the output.
public func runTestShell(_ command: String, timeoutMs: Int = 300_000) throws -> (status: Int32, output: String) {
    let outcome = try RemusSystem.runShell(command, timeoutMs: timeoutMs, outputLimit: 1 << 20)
    if let ms = outcome.timedOutAfterMs { return (124, outcome.text + "\n[timed out after \(ms) ms]") }
    return (outcome.exitCode, outcome.text)
}
