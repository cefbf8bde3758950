import RemusXen
import Testing

// The DOMAIN_CONFIG a Xen backup builds from comes from the network: every file, script and
// bridge it names on the backup host must lie inside what the operator allowed (issue #13).
// Pure Swift, no Xen needed.

private func config(kernel: String = "/var/lib/xen/images/vmlinuz", disk: String = "/var/lib/xen/images/g1.img",
                    bridge: String = "xenbr0", script: String = "vif-bridge", pci: String = "") -> [UInt8] {
    Array("""
    {"c_info": {"name": "g1", "type": "pvh"},
     "b_info": {"max_memkb": 131072, "kernel": "\(kernel)", "ramdisk": null, "device_model": null},
     "disks": [{"pdev_path": "\(disk)", "vdev": "xvda", "format": "raw"}],
     "nics": [{"mac": "00:16:3e:5e:00:02", "bridge": "\(bridge)", "script": "\(script)"}],
     "pcidevs": [\(pci)]}
    """.utf8)
}

private func refusal(_ json: [UInt8], policy: XenPathPolicy = XenPathPolicy()) -> String? {
    do { try policy.check(json); return nil } catch { return "\(error)" }
}

@Test func aConfigurationInsideXensDirectoriesIsAccepted() {
    #expect(refusal(config()) == nil)
    // A script named without a directory is libxl's, under /etc/xen/scripts.
    #expect(refusal(config(script: "/etc/xen/scripts/vif-bridge")) == nil)
}

@Test func aKernelOutsideTheAllowedDirectoriesIsRefusedNamingThePathAndTheFlag() throws {
    let why = try #require(refusal(config(kernel: "/home/attacker/evil-kernel")))
    #expect(why.contains("'/home/attacker/evil-kernel'"))
    #expect(why.contains("b_info.kernel"))
    #expect(why.contains("--xen-allow-path /home/attacker"))
    #expect(why.contains("nothing was built"))
}

@Test func anAllowedDirectoryAdmitsItsFilesButNotItsNeighbours() {
    let policy = XenPathPolicy(allowedDirectories: XenPathPolicy.defaultDirectories + ["/guest/"])
    #expect(refusal(config(kernel: "/guest/vmlinuz"), policy: policy) == nil)
    #expect(refusal(config(kernel: "/guestbook/vmlinuz"), policy: policy) != nil)
}

@Test func dotDotAndRelativePathsCannotEscapeAnAllowedDirectory() {
    #expect(refusal(config(disk: "/var/lib/xen/../../../etc/shadow"))?.contains("without '..'") == true)
    #expect(refusal(config(disk: "images/g1.img")) != nil)
    #expect(refusal(config(script: "../../bin/sh")) != nil)
    #expect(refusal(config(script: "/tmp/hook.sh"))?.contains("nics[0].script") == true)
    #expect(refusal(config(disk: "/var/lib/xen/./images//g1.img")) == nil)
}

@Test func aBridgeNotListedIsRefusedNamingTheFlag() throws {
    let why = try #require(refusal(config(bridge: "mgmt0")))
    #expect(why.contains("'mgmt0'") && why.contains("--xen-allow-bridge mgmt0"))
    #expect(refusal(config(bridge: "mgmt0"), policy: XenPathPolicy(allowedBridges: ["xenbr0", "mgmt0"])) == nil)
}

@Test func passthroughAndDeviceModelArgumentsAreRefused() {
    #expect(refusal(config(pci: "{\"domain\": 0, \"bus\": 3, \"dev\": 0, \"func\": 0}"))?.contains("pcidevs") == true)
    let withIRQ = Array(#"{"b_info": {"max_memkb": 1024, "irqs": [7]}}"#.utf8)
    #expect(refusal(withIRQ)?.contains("b_info.irqs") == true)
    let withQEMUArguments = Array(#"{"b_info": {"max_memkb": 1024, "extra": ["-drive", "file=/etc/shadow"]}}"#.utf8)
    #expect(refusal(withQEMUArguments)?.contains("device model's command line") == true)
    // Empty lists and nulls are what a plain guest's configuration carries.
    #expect(refusal(Array(#"{"b_info": {"max_memkb": 1024, "irqs": [], "extra": null}, "pcidevs": []}"#.utf8)) == nil)
}

@Test func notJSONIsRefused() {
    #expect(refusal(Array("not json".utf8))?.contains("not valid JSON") == true)
}

@Test func aDeeplyNestedDocumentIsRefusedNotACrash() {
    // 1 MiB of '[': what a DOMAIN_CONFIG record may hold; the parser's depth limit refuses it.
    let bomb = [UInt8](repeating: UInt8(ascii: "["), count: 1 << 20)
    #expect(refusal(bomb)?.contains("not valid JSON") == true)
    let deepButValid = Array(("{\"b_info\": {\"max_memkb\": 1024}, \"x\": " + String(repeating: "[", count: 400) + String(repeating: "]", count: 400) + "}").utf8)
    #expect(refusal(deepButValid) == nil)
}
