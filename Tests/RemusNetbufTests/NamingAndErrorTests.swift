import CNetlink
@testable import RemusNetbuf
import Testing

@Suite("Naming and errors")
struct NamingAndErrorTests {
    @Test("ifb names are deterministic, at most 15 bytes, unique per interface, and parse back")
    func ifbNamesFitAndRoundTrip() {
        let indices: [Int32] = [1, 2, 9, 10, 99, 12345, 1_000_000, Int32.max - 1, Int32.max]
        var names = Set<String>()
        for index in indices {
            let name = NetbufNaming.ifbName(forGuestIfindex: index)
            #expect(name == NetbufNaming.ifbName(forGuestIfindex: index))
            #expect(name.utf8.count <= 15, "\(name) is too long for IFNAMSIZ")
            #expect(NetbufNaming.guestIfindex(fromIFBName: name) == index)
            names.insert(name)
        }
        #expect(names.count == indices.count)
    }

    @Test("Names that are not ours do not parse", arguments: ["rb-", "rb-0", "rb-012", "rb-x1", "rb-1a", "eth0", "ifb0", "rb-99999999999", "rb--1", "xrb-1"])
    func foreignNamesAreRejected(_ name: String) {
        #expect(NetbufNaming.guestIfindex(fromIFBName: name) == nil)
    }

    @Test("The ifb alias records the guest and ingress ownership, and foreign aliases are ignored")
    func aliasRoundTrip() {
        for owns in [true, false] {
            let record = NetbufNaming.AliasRecord(guestName: "vif3.0", ownsIngressQdisc: owns)
            #expect(NetbufNaming.AliasRecord(parsing: record.text) == record)
        }
        #expect(NetbufNaming.AliasRecord(parsing: nil) == nil)
        #expect(NetbufNaming.AliasRecord(parsing: "uplink to the core switch") == nil)
        #expect(NetbufNaming.AliasRecord(parsing: "remusd-netbuf guest=vif1.0") == nil, "incomplete record")
    }

    @Test("NetlinkError carries libnl's nl_geterror text and classifies the codes we act on")
    func netlinkErrorTranslation() {
        let notFound = NetlinkError(call: "rtnl_qdisc_add(plug)", code: -NLE_OBJ_NOTFOUND)
        #expect(notFound.code == NLE_OBJ_NOTFOUND, "negative libnl returns are normalised")
        #expect(notFound.message == String(cString: nl_geterror(NLE_OBJ_NOTFOUND)))
        #expect(notFound.message == "Object not found")
        #expect(notFound.isNotFound && !notFound.isAlreadyExisting && !notFound.isPermissionDenied)
        #expect(notFound.description.contains("rtnl_qdisc_add(plug)") && notFound.description.contains("Object not found"))

        #expect(NetlinkError(call: "x", code: NLE_EXIST).isAlreadyExisting)
        #expect(NetlinkError(call: "x", code: NLE_OPNOTSUPP).isNotSupported)
        #expect(NetlinkError(call: "x", code: NLE_PERM).isPermissionDenied)
        #expect(NetlinkError(call: "x", code: NLE_NOACCESS).isPermissionDenied)
        #expect(NetlinkError(call: "x", code: NLE_NODEV).isNotFound)
        #expect(!NetlinkError(call: "x", code: NLE_INVAL).isNotFound)
    }

    @Test("User-facing errors say what happened, what stayed safe and what to do")
    func errorMessagesAreActionable() {
        let plug = NetbufError.plugUnavailable(interface: "vif3.0", NetlinkError(call: "rtnl_qdisc_add(plug)", code: NLE_OBJ_NOTFOUND))
        #expect(plug.description.contains("vif3.0") && plug.description.contains("modprobe sch_plug")
            && plug.description.contains("removed"))
        let epoch = NetbufError.epochCommandFailed(interface: "vif3.0", ifb: "rb-12", command: "buffer", epoch: 17,
                                                   NetlinkError(call: "rtnl_qdisc_add", code: NLE_NODEV))
        #expect(epoch.description.contains("epoch 17") && epoch.description.contains("never early")
            && epoch.description.contains("remusd netbuf cleanup vif3.0"))
        let foreign = NetbufError.foreignIngressFilters(interface: "tap0", count: 2)
        #expect(foreign.description.contains("nothing was changed") && foreign.description.contains("tc filter show dev tap0 ingress"))
        #expect(throws: NetbufError.self) { try NetbufPlumbing.validatedLimit(0) }
        #expect(throws: NetbufError.self) { try NetbufPlumbing.validatedLimit(Int(Int32.max) + 1) }
        #expect((try? NetbufPlumbing.validatedLimit(10_000)) == 10_000)
    }
}
