import CNetlink
import Glibc
@testable import RemusNetbuf
import RemusNetbufProbe
import Testing
import RemusTestSupport

/// Setup, redirect and teardown on veth pairs in throwaway network namespaces: everything but the
/// plug itself, which the build machine's kernel may lack (see PlugOutputBufferTests).
@Suite("Plumbing: ifb, ingress qdisc and redirect filter", .enabled(if: Kernel.canBuildNamespaces, Kernel.namespaceSkipMessage))
struct PlumbingTests {
    @Test("Setup creates rb-<ifindex> (ifb, up, labelled), the ingress qdisc and one all-protocol mirred filter")
    func setupCreatesTheRedirect() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let (attachment, leftovers) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect(leftovers.isEmpty)
            #expect(attachment.ifbName == "rb-\(guest.index)")
            #expect(attachment.ownsIngressQdisc)

            let ifb = try #require(try socket.link(named: attachment.ifbName))
            #expect(ifb.kind == "ifb" && ifb.isUp && ifb.index == attachment.ifbIndex)
            #expect(NetbufNaming.AliasRecord(parsing: ifb.alias) == .init(guestName: guest.name, ownsIngressQdisc: true))

            let ingress = try socket.qdiscs(ifindex: guest.index).filter { $0.parent == TC_H_INGRESS }
            #expect(ingress.map(\.kind) == ["ingress"])
            #expect(ingress.first?.handle == TCHandle.ingress)

            let filters = try socket.filters(ifindex: guest.index, parent: TCHandle.ingress)
            let node = try #require(filters.first { $0.mirredTarget != nil }, "no filter with a mirred action in \(filters)")
            #expect(node.kind == "u32" && node.priority == NetbufNaming.filterPriority)
            #expect(node.ethProtocol == UInt16(ETH_P_ALL))
            #expect(node.mirredTarget == attachment.ifbIndex && node.mirredAction == TCA_EGRESS_REDIR)
            #expect(filters.allSatisfy { $0.priority == NetbufNaming.filterPriority }, "only our filter: \(filters)")
        }
    }

    @Test("The ifb takes the guest interface's MTU (jumbo frames fit)")
    func ifbMatchesGuestMTU() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, peer) = try makeVethPair(socket)
            try socket.setMTU(index: peer.index, 9000)
            try socket.setMTU(index: guest.index, 9000)
            let (attachment, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect(try socket.link(index: attachment.ifbIndex)?.mtu == 9000)
        }
    }

    @Test("A foreign device that happens to be called rb-<n> is never deleted")
    func foreignDeviceWithOurNameIsLeftAlone() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let name = NetbufNaming.ifbName(forGuestIfindex: guest.index)
            try socket.addLink(name: name, kind: "ifb")
            let foreign = try #require(try socket.link(named: name))
            try socket.setAlias(index: foreign.index, "mirror port of the lab switch")
            let before = try NetworkSnapshot(socket)
            #expect(try NetbufPlumbing.cleanupAll(socket: socket).isEmpty)
            #expect(try NetbufPlumbing.cleanup(interface: guest.name, socket: socket).isEmpty)
            #expect { _ = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket) } throws: { error in
                guard case NetbufError.setupFailed(_, let step, let cause) = error else { return false }
                return step.contains(name) && cause.isAlreadyExisting
            }
            #expect(try NetworkSnapshot(socket) == before)
        }
    }

    @Test("Frames of every protocol (IPv4, ARP, IPv6, others) go through the ifb")
    func everyProtocolIsRedirected() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, peer) = try makeVethPair(socket)
            let (attachment, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            func ifbTransmitted() throws -> UInt64 { try #require(try socket.link(index: attachment.ifbIndex)).txPackets }
            let before = try ifbTransmitted()
            // Sent by the "guest" end, so they arrive on the host end's ingress.
            for (offset, ethertype) in [UInt16(0x0800), 0x0806, 0x86DD, 0x88B5].enumerated() {
                try NetbufProbe.sendFrames(interface: peer.name, ethertype: ethertype, first: UInt64(offset * 10), count: 3, size: 60)
            }
            let redirected = try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try ifbTransmitted() - before >= 12 }
            #expect(redirected, "ifb saw \(String(describing: try? ifbTransmitted() - before)) of 12 frames")
            // Without the redirect the ifb sees nothing.
            try NetbufPlumbing.cleanup(interface: guest.name, socket: socket)
            #expect(try socket.link(named: attachment.ifbName) == nil)
        }
    }

    @Test("Teardown restores links, qdiscs and filters exactly")
    func teardownRestoresTheInterface() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let before = try NetworkSnapshot(socket)
            _ = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect(try NetworkSnapshot(socket) != before)
            let report = try NetbufPlumbing.cleanup(interface: guest.name, socket: socket)
            #expect(report.removed.count == 3, "filter, ingress qdisc, ifb: \(report.removed)")
            let after = try NetworkSnapshot(socket)
            #expect(after == before, "before:\n\(before)\nafter:\n\(after)")
        }
    }

    @Test("A pre-existing, empty ingress qdisc is shared and survives teardown")
    func sharedIngressQdiscSurvives() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            try socket.addIngressQdisc(ifindex: guest.index)
            let before = try NetworkSnapshot(socket)
            let (attachment, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect(!attachment.ownsIngressQdisc)
            // Also after a crash: the ifb's alias carries the fact.
            try NetbufPlumbing.cleanupAll(socket: socket)
            #expect(try NetworkSnapshot(socket) == before)
            #expect(try socket.qdiscs(ifindex: guest.index).contains { $0.kind == "ingress" })
        }
    }

    @Test("Foreign ingress filters make setup refuse and change nothing")
    func foreignFiltersAreRefused() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, peer) = try makeVethPair(socket)
            try socket.addIngressQdisc(ifindex: guest.index)
            try socket.addRedirectAllFilter(ifindex: guest.index, target: peer.index, priority: 7)
            let before = try NetworkSnapshot(socket)
            #expect {
                _ = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            } throws: { error in
                guard case NetbufError.foreignIngressFilters(let name, let count) = error else { return false }
                return name == guest.name && count == 1
            }
            #expect(try NetworkSnapshot(socket) == before)
            // Cleanup leaves foreign filters alone too.
            try NetbufPlumbing.cleanupAll(socket: socket)
            #expect(try NetworkSnapshot(socket) == before)
        }
    }

    @Test("Unsuitable interfaces are refused with the reason")
    func unsuitableInterfaces() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            #expect { _ = try NetbufPlumbing.attach(interface: "nosuch0", queue: .passThrough, socket: socket) } throws: {
                if case NetbufError.interfaceNotFound("nosuch0") = $0 { return true } else { return false }
            }
            #expect { _ = try NetbufPlumbing.attach(interface: "lo", queue: .passThrough, socket: socket) } throws: {
                if case NetbufError.unsuitableInterface("lo", _) = $0 { return true } else { return false }
            }
            let (attachment, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect { _ = try NetbufPlumbing.attach(interface: attachment.ifbName, queue: .passThrough, socket: socket) } throws: {
                if case NetbufError.unsuitableInterface(_, let reason) = $0 { return reason.contains("own ifb") } else { return false }
            }
            #expect(throws: NetbufError.self) { try PlugOutputBuffer(interfaces: [guest.name, guest.name]) }
        }
    }

    @Test("Cleanup is idempotent and finds leftovers by name, by filter, and by alias after the guest is gone")
    func cleanupFindsEveryKindOfLeftover() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let (second, _) = try makeVethPair(socket, guest: "vif2", peer: "eth2")
            let (third, _) = try makeVethPair(socket, guest: "vif3", peer: "eth3")
            let pristine = try NetworkSnapshot(socket)

            // "Crashed" runs: set up and never torn down.
            let (a1, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            let (a2, _) = try NetbufPlumbing.attach(interface: second.name, queue: .passThrough, socket: socket)
            let (a3, _) = try NetbufPlumbing.attach(interface: third.name, queue: .passThrough, socket: socket)
            #expect(Set([a1.ifbName, a2.ifbName, a3.ifbName]).count == 3, "several interfaces never clash")

            // Someone deleted one ifb by hand: our filter still sits on the guest interface.
            try socket.deleteLink(index: a2.ifbIndex)
            let all = try NetbufPlumbing.cleanupAll(socket: socket)
            #expect(all.removed.count == 3 + 2 + 3, "\(all.removed)")
            #expect(try NetworkSnapshot(socket) == pristine)
            #expect(try NetbufPlumbing.cleanupAll(socket: socket).isEmpty, "second cleanup finds nothing")
            #expect(try NetbufPlumbing.cleanup(interface: guest.name, socket: socket).isEmpty)

            // The guest interface disappeared (a destroyed domain): found through the ifb alias.
            let (a4, _) = try NetbufPlumbing.attach(interface: third.name, queue: .passThrough, socket: socket)
            try socket.deleteLink(index: third.index)
            let byAlias = try NetbufPlumbing.cleanup(interface: third.name, socket: socket)
            #expect(byAlias.removed == ["deleted ifb device \(a4.ifbName) (with its plug qdisc)"])
            #expect(try socket.link(named: a4.ifbName) == nil)

            // Cleanup by ifb name.
            let (a5, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect(try NetbufPlumbing.cleanup(interface: a5.ifbName, socket: socket).removed.count == 3)
        }
    }

    @Test("Setup removes leftovers of a crashed run first")
    func setupRemovesLeftovers() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let (first, _) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            let (second, leftovers) = try NetbufPlumbing.attach(interface: guest.name, queue: .passThrough, socket: socket)
            #expect(leftovers.removed.count == 3, "\(leftovers.removed)")
            #expect(second.ifbName == first.ifbName)
            #expect(try socket.links().filter { $0.kind == "ifb" }.map(\.name) == [second.ifbName])
            #expect(try socket.filters(ifindex: guest.index, parent: TCHandle.ingress).filter { $0.mirredTarget != nil }.count == 1)
        }
    }

    @Test("Without sch_plug, setup fails naming the module and leaves nothing behind",
          .enabled(if: !Kernel.hasPlug, "this kernel has sch_plug; the failure path is not reachable here"))
    func missingPlugFailsCleanly() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let before = try NetworkSnapshot(socket)
            #expect { try PlugOutputBuffer(interfaces: [guest.name], limitBytes: 100_000) } throws: { error in
                guard case NetbufError.plugUnavailable(let name, let cause) = error else { return false }
                return name == guest.name && cause.isNotFound && "\(error)".contains("modprobe sch_plug")
            }
            #expect(try NetworkSnapshot(socket) == before)
        }
    }
}
