import Glibc
@testable import RemusNetbuf
import RemusNetbufProbe
import Testing
import RemusTestSupport

/// The OutputBuffer on a real plug: runs where the kernel has sch_plug (the QEMU testbed runs
/// the same behaviours through `remusd netbuf drive`; see Tests/Testbed).
@Suite("PlugOutputBuffer on a real plug qdisc",
       .enabled(if: Kernel.canBuildNamespaces, Kernel.namespaceSkipMessage),
       .enabled(if: Kernel.hasPlug, Kernel.plugSkipMessage))
struct PlugOutputBufferTests {
    @Test("Output is held until the epoch's ACK, then released in order, on every interface")
    func holdsUntilAcknowledged() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (g1, p1) = try makeVethPair(socket, guest: "vif1", peer: "eth1")
            let (g2, p2) = try makeVethPair(socket, guest: "vif2", peer: "eth2")
            let buffer = try PlugOutputBuffer(interfaces: [g1.name, g2.name], limitBytes: 1_000_000)
            func held() throws -> UInt64 { try buffer.statistics().heldPackets }

            try NetbufProbe.sendFrames(interface: p1.name, ethertype: 0x0806, first: 1, count: 3, size: 60)
            try NetbufProbe.sendFrames(interface: p2.name, ethertype: 0x86DD, first: 1, count: 2, size: 60)
            #expect(try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try held() == 5 })
            try buffer.closeEpoch(1)
            try NetbufProbe.sendFrames(interface: p1.name, ethertype: 0x0800, first: 4, count: 4, size: 60)
            #expect(try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try held() == 9 })
            try buffer.release(through: 1)
            let onlyEpochTwoHeld = try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try held() == 4 }
            #expect(onlyEpochTwoHeld, "epoch 1 left, epoch 2 stays: held \(String(describing: try? held()))")
            try buffer.closeEpoch(2)
            try buffer.release(through: 2)
            #expect(try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) { try held() == 0 })
            try buffer.teardown()
        }
    }

    @Test("Overflowing the byte limit is reported as drops")
    func overflowIsReported() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, peer) = try makeVethPair(socket)
            let buffer = try PlugOutputBuffer(interfaces: [guest.name], limitBytes: 5_000)
            try NetbufProbe.sendFrames(interface: peer.name, ethertype: 0x0800, first: 1, count: 20, size: 1000)
            // newDrops counts since the previous read: the read that first sees drops reports them.
            var first: InterfaceBufferStatistics?
            let overflowed = try eventually(deadline: .after(seconds: 5), pollEveryMs: 1) {
                let stats = try #require(try buffer.interfaceStatistics().first)
                if stats.drops > 0 { first = stats }
                return stats.drops > 0
            }
            #expect(overflowed)
            let stats = try #require(first)
            #expect(stats.heldBytes <= 5_000)
            #expect(stats.newDrops == stats.drops && stats.overflowMessage?.contains("overflowed") == true)
            let next = try #require(try buffer.interfaceStatistics().first)
            #expect(next.drops == stats.drops && next.newDrops == 0 && next.overflowMessage == nil)
            #expect(try buffer.statistics().drops == stats.drops, "the sum over interfaces carries the drops")
            try buffer.teardown()
        }
    }

    @Test("Teardown restores the interfaces, is idempotent, and deinit tears down a forgotten buffer")
    func teardownAndDeinit() throws {
        try inThrowawayNetns {
            let socket = try NetlinkSocket()
            let (guest, _) = try makeVethPair(socket)
            let before = try NetworkSnapshot(socket)
            let buffer = try PlugOutputBuffer(interfaces: [guest.name])
            #expect(try NetworkSnapshot(socket) != before)
            #expect(try buffer.teardown().removed.count == 3)
            #expect(try buffer.teardown().isEmpty)
            #expect(try NetworkSnapshot(socket) == before)
            #expect(throws: NetbufError.self) { try buffer.closeEpoch(1) }

            do { _ = try PlugOutputBuffer(interfaces: [guest.name]) }   // dropped at once
            #expect(try NetworkSnapshot(socket) == before)
        }
    }
}
