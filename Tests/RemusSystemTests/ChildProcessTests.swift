import Glibc
import RemusSystem
import RemusTestSupport
import Testing

/// Processes of group `pgid` that are alive (not zombies), from /proc.
private func liveMembers(ofGroup pgid: pid_t) -> [String] {
    guard let dir = opendir("/proc") else { return [] }
    defer { closedir(dir) }
    var members: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.baseAddress!.assumingMemoryBound(to: CChar.self)) }
        guard Int32(name) != nil, let stat = readWholeFile("/proc/\(name)/stat"),
              let close = stat.lastIndex(of: ")") else { continue }
        // After "(comm)": state ppid pgrp …
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        if fields.count > 2, fields[0] != "Z", Int32(fields[2]) == pgid { members.append("\(name) \(stat.prefix(60))") }
    }
    return members
}

@Suite("Child processes with deadlines")
struct ChildProcessTests {
    @Test("A fence that sleeps 60 s ends at its timeout, reported as timed out, its whole process group gone")
    func hungChildIsKilledWithItsGroup() throws {
        let start = monotonicNanoseconds()
        // A background sleep too: killing only the shell would leave it behind.
        let child = try ChildProcess(arguments: ["/bin/sh", "-c", "sleep 60 & sleep 60"], captureOutput: true)
        let outcome = child.run(timeout: .after(milliseconds: 300), grace: 200_000_000)
        let elapsedMs = (monotonicNanoseconds() - start) / 1_000_000
        #expect(outcome.timedOutAfterMs == 300)
        #expect(!outcome.succeeded, "a timed-out fence never counts as fenced")
        #expect(outcome.summary.contains("timed out after 300 ms"), "\(outcome.summary)")
        #expect(elapsedMs < 2000, "took \(elapsedMs) ms")
        #expect(eventually(deadline: .after(seconds: 5)) { liveMembers(ofGroup: child.pid).isEmpty },
                "left alive: \(liveMembers(ofGroup: child.pid))")
    }

    @Test("runShell reports a timeout as 'timed out after N ms'")
    func runShellTimesOut() throws {
        let outcome = try runShell("sleep 60", timeoutMs: 200)
        #expect(outcome.summary == "timed out after 200 ms (process group killed)")
    }

    @Test("The child starts in its own process group with an empty mask and SIGPIPE/SIGINT/SIGTERM at default")
    func childHasDefaultSignalState() throws {
        // Make the parent side hostile, as in the daemon: SIGINT/SIGTERM blocked, SIGPIPE ignored.
        var blocked = sigset_t()
        sigemptyset(&blocked)
        sigaddset(&blocked, SIGINT)
        sigaddset(&blocked, SIGTERM)
        var previous = sigset_t()
        pthread_sigmask(SIG_BLOCK, &blocked, &previous)
        let oldPipe = signal(SIGPIPE, SIG_IGN)
        defer {
            pthread_sigmask(SIG_SETMASK, &previous, nil)
            signal(SIGPIPE, oldPipe)
        }
        let parentStatus = readWholeFile("/proc/thread-self/status") ?? ""
        #expect(mask("SigBlk", in: parentStatus) & bit(SIGTERM) != 0, "the test must block SIGTERM in the parent to prove anything")

        let outcome = try runShell("grep -E '^Sig(Blk|Ign)' /proc/self/status; echo pgid $$ $(cut -d' ' -f5 /proc/$$/stat)", timeoutMs: 5000)
        #expect(outcome.succeeded, "\(outcome.summary): \(outcome.text)")
        let text = outcome.text
        #expect(mask("SigBlk", in: text) == 0, "child mask: \(text)")
        let ignored = mask("SigIgn", in: text)
        for sig in [SIGPIPE, SIGINT, SIGTERM] {
            #expect(ignored & bit(sig) == 0, "signal \(sig) ignored in the child: \(text)")
        }
        let pgidLine = text.split(separator: "\n").first { $0.hasPrefix("pgid ") }?.split(separator: " ") ?? []
        #expect(pgidLine.count == 3 && pgidLine[1] == pgidLine[2], "the shell leads its own process group: \(text)")
    }

    @Test("Output over the bound is cut and the rest dropped, not held")
    func outputIsBounded() throws {
        let outcome = try runShell("head -c 1000000 /dev/zero; echo done >&2", timeoutMs: 10_000, outputLimit: 1000)
        #expect(outcome.succeeded, "\(outcome.summary)")
        #expect(outcome.output.count == 1000)
        #expect(outcome.droppedBytes == 1_000_000 + 5 - 1000)
    }

    @Test("Exit codes and signals are reported; only exit 0 in time succeeds")
    func exitStatusesAreReported() throws {
        let failed = try runShell("echo nope; exit 3", timeoutMs: 5000)
        #expect(failed.summary == "exited 3")
        #expect(!failed.succeeded)
        #expect(failed.text == "nope\n")
        let killed = try runShell("kill -9 $$", timeoutMs: 5000)
        #expect(killed.summary == "killed by signal 9")
        #expect(killed.exitCode == 137)
        #expect(try runShell("true", timeoutMs: 5000).succeeded)
    }
}

private func bit(_ signal: Int32) -> UInt64 { 1 << UInt64(signal - 1) }

private func mask(_ field: String, in status: String) -> UInt64 {
    guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }) else { return UInt64.max }
    return UInt64(line.dropFirst(field.count + 1).trimmingPrefix(while: { $0 == " " || $0 == "\t" }), radix: 16) ?? UInt64.max
}
