import RemusCore
@testable import RemusRuntime
import RemusTestSupport
import Testing

// A Xen primary's DOMAIN_CONFIG names files and bridges on the backup host; a hello naming any
// outside the operator's policy is refused before the backup builds or changes anything, and the
// primary is told which path and which flag (Docs/security.md).

/// Sends a Xen hello whose libxl JSON names `kernel`; returns the backup's answer.
private func helloNamingKernel(_ kernel: String, to backup: FuzzedBackup) throws -> String {
    let tcp = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: backup.port), deadline: .after(milliseconds: 5000))
    let peer = try HandWrittenPeer(channel: tcp, deadline: .after(seconds: 10))
    defer { peer.close() }
    let header = StreamHeader(features: [], pageSize: 4096, backend: .xen, role: .primary,
                              guestUUID: RecordedGuestStream.uuid, guestName: RecordedGuestStream.name, senderVersion: "test")
    let json = #"{"c_info": {"name": "fuzzed"}, "b_info": {"max_memkb": 4096, "kernel": "\#(kernel)"}, "nics": [{"bridge": "xenbr0"}]}"#
    try RecordWriter.writePreamble(header: header, config: DomainConfig(format: .libxlJSON, bytes: Array(json.utf8)), to: tcp)
    return peer.answer()
}

@Test func aXenHelloNamingAKernelOutsideTheAllowedDirectoriesIsRefusedAndChangesNothing() throws {
    let backup = try FuzzedBackup(expected: [:])
    defer { backup.stop() }
    let answer = try helloNamingKernel("/home/attacker/vmlinuz", to: backup)
    #expect(answer.hasPrefix("refused:") && answer.contains("'/home/attacker/vmlinuz'") && answer.contains("--xen-allow-path /home/attacker"), "\(answer)")
    #expect(backup.status()?.contains("state: LISTENING") == true, "\(backup.status() ?? "no status")")
    #expect(backup.status()?.contains("serving:") == false)

    // The same hello naming a kernel under /etc/xen passes the policy and goes on to the replica
    // (which this test backup cannot build for Xen: that refusal names no path).
    let allowed = try helloNamingKernel("/etc/xen/kernels/vmlinuz", to: backup)
    #expect(allowed.contains("cannot build the replica") && !allowed.contains("--xen-allow-path"), "\(allowed)")
}
