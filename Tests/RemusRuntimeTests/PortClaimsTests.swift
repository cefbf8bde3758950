import Glibc
@testable import RemusDrill
import RemusSystem
import Testing

@Suite("Ports picked for the drill's daemons")
struct PortClaimsTests {
    @Test("A port handed out is claimed for the life of the process: not again here, not by another process",
          .enabled(if: access("/usr/bin/flock", X_OK) == 0, "needs flock (util-linux)"))
    func claimedPortsAreNotHandedOutTwice() throws {
        let ports = try freePorts(3)
        #expect(Set(ports).count == 3)
        for port in ports {
            #expect(!PortClaims.claim(Int(port)), "port \(port) handed out again in the same process")
            // Another process finds the claim held (flock -n fails with 1 while we hold it).
            let status = try runShell("flock -n \(PortClaims.directory)/\(port) true", timeoutMs: 10_000).status
            #expect(status != 0, "another process could take port \(port)'s claim")
        }
        // A port nobody claimed is free to another process.
        let other = try runShell("flock -n \(PortClaims.directory)/9 true", timeoutMs: 10_000).status
        #expect(other == 0)
    }
}
