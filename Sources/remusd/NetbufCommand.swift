import ArgumentParser
import Glibc
import RemusCore
import RemusNetbuf
import RemusNetbufProbe

/// `remusd netbuf …`: network output buffering maintenance (owned by the netbuf work).
///
/// `cleanup` is for operators. The hidden subcommands drive a plug one netlink operation at a
/// time (the plug's state lives in the kernel) and generate traffic; the QEMU testbed
/// (Tests/Testbed) uses them.
struct Netbuf: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect and clean up network output buffers (plug qdiscs on ifb devices).",
        discussion: """
            While a guest is protected, everything it sends is redirected from its interface \
            (vifD.N, tap, veth) into a plug qdisc on an ifb device named rb-<ifindex>, and released \
            only when the backup acknowledges the epoch that sent it. After a crash of remusd these \
            devices stay behind and hold the guest's traffic: 'remusd netbuf cleanup' removes them.
            """,
        subcommands: [
            NetbufCleanup.self, NetbufStats.self,
            NetbufSetup.self, NetbufPlugCommand.Barrier.self, NetbufPlugCommand.Release.self,
            NetbufPlugCommand.ReleaseAll.self, NetbufDrive.self, NetbufEpochs.self,
            NetbufProbeSend.self, NetbufProbeListen.self, NetbufTCPEcho.self, NetbufTCPPing.self,
        ]
    )
}

/// Prints an error's sentence to stderr and returns exit status 1 to throw.
private func fail(_ error: any Error) -> ExitCode {
    writeLine("remusd: \(error)", to: STDERR_FILENO)
    return ExitCode.failure
}

/// Writes one line straight to a file descriptor, unbuffered: scripts poll our output files.
private func writeLine(_ line: String, to fd: Int32) {
    var bytes = Array((line + "\n").utf8)
    var offset = 0
    while offset < bytes.count {
        // SAFETY: write reads the bytes after `offset`, within the array, while the closure holds it.
        let written = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if written < 0 && errno == EINTR { continue }
        if written <= 0 { return }
        offset += written
    }
}

private func emit(_ line: String) { writeLine(line, to: STDOUT_FILENO) }

// MARK: Operator commands

struct NetbufCleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cleanup",
        abstract: "Remove remusd's output buffers left behind (all of them, or one interface's).",
        discussion: """
            Removes the redirect filter (pref \(NetbufNaming.filterPriority)) and, if remusd created \
            it, the ingress qdisc from the guest interface, and deletes the rb-<ifindex> ifb device \
            with its plug. Packets still held are discarded, not released: they may belong to epochs \
            the backup never acknowledged. Safe to run more than once. Do not run it for a guest that \
            a running remusd is protecting.
            """)

    @Argument(help: ArgumentHelp("Guest interface (vif3.0, tap0) or ifb device (rb-12); all when omitted.", valueName: "interface"))
    var interface: String?

    func run() throws {
        do {
            let socket = try NetlinkSocket()
            let report = try interface.map { try NetbufPlumbing.cleanup(interface: $0, socket: socket) }
                ?? NetbufPlumbing.cleanupAll(socket: socket)
            emit(report.description)
        } catch { throw fail(error) }
    }
}

struct NetbufStats: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Show the plug counters of interfaces with an output buffer.")

    @Argument(help: ArgumentHelp("Guest interfaces.", valueName: "interface"))
    var interfaces: [String]

    func run() throws {
        do {
            let socket = try NetlinkSocket()
            let qdiscs = try socket.qdiscs()
            for name in interfaces {
                let attachment = try NetbufPlumbing.find(interface: name, socket: socket)
                guard let plug = qdiscs.first(where: { $0.ifindex == attachment.ifbIndex && $0.kind == "plug" }) else {
                    throw NetbufError.notSetUp(name)
                }
                emit("\(name) \(attachment.ifbName) held_packets=\(plug.queueLength) held_bytes=\(plug.backlogBytes) "
                    + "sent_packets=\(plug.sentPackets) drops=\(plug.drops) overlimits=\(plug.overlimits)")
            }
        } catch { throw fail(error) }
    }
}

// MARK: One-shot plug operations (testbed)

struct NetbufSetup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "setup", abstract: "Set up an output buffer and leave it in the kernel (testbed).",
        shouldDisplay: false)

    @Argument(help: ArgumentHelp("Guest interfaces.", valueName: "interface"))
    var interfaces: [String]

    @Option(help: ArgumentHelp("Bytes each plug may hold before it drops (default: 10485760).", valueName: "bytes"))
    var limit: Int = NetbufPlumbing.defaultLimitBytes

    func run() throws {
        do {
            let socket = try NetlinkSocket()
            for name in interfaces {
                let (attachment, leftovers) = try NetbufPlumbing.attach(interface: name, limitBytes: limit, socket: socket)
                if !leftovers.isEmpty { emit("removed leftovers first:\n\(leftovers)") }
                emit("\(attachment.interface) → \(attachment.ifbName) (ifindex \(attachment.ifbIndex)), plug limit \(limit) bytes, "
                    + "ingress qdisc \(attachment.ownsIngressQdisc ? "created" : "shared")")
            }
        } catch { throw fail(error) }
    }
}

/// `barrier`, `release`, `release-all`: one raw plug command to each interface's plug.
enum NetbufPlugCommand {
    static func send(_ command: PlugCommand, to interfaces: [String]) throws {
        do {
            let socket = try NetlinkSocket()
            for name in interfaces {
                let attachment = try NetbufPlumbing.find(interface: name, socket: socket)
                try NetbufPlumbing.send(command, to: attachment, socket: socket)
            }
        } catch { throw fail(error) }
    }

    struct Barrier: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "barrier", abstract: "Insert a barrier (TCQ_PLUG_BUFFER) in each plug (testbed).", shouldDisplay: false)
        @Argument(help: ArgumentHelp("Guest interfaces.", valueName: "interface")) var interfaces: [String]
        func run() throws { try send(.buffer, to: interfaces) }
    }

    struct Release: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "release", abstract: "Release the oldest closed epoch (TCQ_PLUG_RELEASE_ONE) (testbed).", shouldDisplay: false)
        @Argument(help: ArgumentHelp("Guest interfaces.", valueName: "interface")) var interfaces: [String]
        func run() throws { try send(.releaseOne, to: interfaces) }
    }

    struct ReleaseAll: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "release-all", abstract: "Release everything and stop holding (TCQ_PLUG_RELEASE_INDEFINITE) (testbed).",
            shouldDisplay: false)
        @Argument(help: ArgumentHelp("Guest interfaces.", valueName: "interface")) var interfaces: [String]
        func run() throws { try send(.releaseIndefinite, to: interfaces) }
    }
}

// MARK: The OutputBuffer in a long-running process (testbed)

struct NetbufDrive: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drive",
        abstract: "Own a PlugOutputBuffer and apply commands read from stdin (testbed).",
        discussion: """
            Commands, one per line: 'close <epoch>', 'ack <epoch>', 'release-all', 'hold', 'stats', \
            'ledger', 'teardown', 'exit'. Each answers one line starting with 'ok <command>' or \
            'error <command>: <message>'. End of input tears the buffer down.
            """,
        shouldDisplay: false)

    @Argument(help: ArgumentHelp("Guest interfaces (one buffer fanning out to all).", valueName: "interface"))
    var interfaces: [String]

    @Option(help: ArgumentHelp("Bytes each plug may hold before it drops (default: 10485760).", valueName: "bytes"))
    var limit: Int = NetbufPlumbing.defaultLimitBytes

    func run() throws {
        let buffer: PlugOutputBuffer
        do { buffer = try PlugOutputBuffer(interfaces: interfaces, limitBytes: limit) } catch { throw fail(error) }
        if !buffer.leftoversRemoved.isEmpty { emit("removed leftovers first: \(buffer.leftoversRemoved.removed.joined(separator: "; "))") }
        emit("ready " + buffer.attachments.map { "\($0.interface)→\($0.ifbName)" }.joined(separator: " "))
        while let line = readLine() {
            let words = line.split(separator: " ").map(String.init)
            guard let verb = words.first else { continue }
            let epoch = words.count > 1 ? Epoch(words[1]) : nil
            do {
                switch verb {
                case "close":
                    guard let epoch else { emit("error \(line): needs an epoch number"); continue }
                    try buffer.closeEpoch(epoch)
                    emit("ok \(line)")
                case "ack":
                    guard let epoch else { emit("error \(line): needs an epoch number"); continue }
                    try buffer.release(through: epoch)
                    emit("ok \(line)")
                case "release-all":
                    try buffer.releaseAll()
                    emit("ok \(line)")
                case "hold":
                    try buffer.hold()
                    emit("ok \(line)")
                case "stats":
                    let perInterface = try buffer.interfaceStatistics()
                    for entry in perInterface { if let message = entry.overflowMessage { emit("overflow: \(message)") } }
                    let sum = { (field: (InterfaceBufferStatistics) -> UInt64) in perInterface.reduce(0) { $0 + field($1) } }
                    emit("ok stats held_packets=\(sum(\.heldPackets)) held_bytes=\(sum(\.heldBytes)) drops=\(sum(\.drops)) "
                        + "overlimits=\(sum(\.overlimits)) new_drops=\(sum(\.newDrops))")
                case "ledger":
                    let text = buffer.ledgers().enumerated().map { index, ledger in
                        "\(buffer.attachments[index].interface):holding=\(ledger.holding),barrier=\(ledger.pendingBarrier.map(String.init) ?? "-"),"
                            + "closed=\(ledger.closedThrough),acked=\(ledger.acknowledgedThrough),released=\(ledger.releasedThrough)"
                    }
                    emit("ok ledger " + text.joined(separator: " "))
                case "teardown":
                    let report = try buffer.teardown()
                    emit("ok teardown " + report.removed.joined(separator: "; "))
                case "exit":
                    emit("ok exit")
                    return
                default:
                    emit("error \(line): unknown command")
                }
            } catch {
                emit("error \(line): \(error)")
            }
        }
        _ = try? buffer.teardown()
    }
}

struct NetbufEpochs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "epochs",
        abstract: "Run periodic epochs on a PlugOutputBuffer and report the netlink cost per epoch (testbed).",
        discussion: """
            Every --interval: closeEpoch(n), then release(through: n - ack-lag), then statistics(), \
            timing each with CLOCK_MONOTONIC. Releases everything and tears down at the end.
            """,
        shouldDisplay: false)

    @Argument(help: ArgumentHelp("Guest interfaces.", valueName: "interface"))
    var interfaces: [String]

    @Option(help: ArgumentHelp("Epoch length (default: 50).", valueName: "ms"))
    var interval: UInt32 = 50

    @Option(help: ArgumentHelp("Number of epochs (default: 200).", valueName: "n"))
    var count: UInt64 = 200

    @Option(name: .customLong("ack-lag"), help: ArgumentHelp("Acknowledge epoch n - lag after closing epoch n (default: 0).", valueName: "epochs"))
    var ackLag: UInt64 = 0

    @Option(help: ArgumentHelp("Bytes each plug may hold before it drops (default: 10485760).", valueName: "bytes"))
    var limit: Int = NetbufPlumbing.defaultLimitBytes

    func validate() throws {
        if interval == 0 { throw ValidationError("--interval must be at least 1 ms") }
        if count == 0 { throw ValidationError("--count must be at least 1") }
    }

    func run() throws {
        do {
            let buffer = try PlugOutputBuffer(interfaces: interfaces, limitBytes: limit)
            emit("ready " + buffer.attachments.map { "\($0.interface)→\($0.ifbName)" }.joined(separator: " "))
            var epochCost: [UInt64] = []
            var statsCost: [UInt64] = []
            var drops: UInt64 = 0
            var next = monotonicNow() + UInt64(interval) * 1_000_000
            for epoch in 1...count {
                sleepUntil(next)
                next += UInt64(interval) * 1_000_000
                let start = monotonicNow()
                try buffer.closeEpoch(epoch)
                if epoch > ackLag { try buffer.release(through: epoch - ackLag) }
                let afterEpoch = monotonicNow()
                let stats = try buffer.interfaceStatistics()
                statsCost.append((monotonicNow() - afterEpoch) / 1_000)
                epochCost.append((afterEpoch - start) / 1_000)
                for entry in stats { if let message = entry.overflowMessage { emit("overflow: \(message)") }; drops = max(drops, entry.drops) }
            }
            try buffer.releaseAll()
            try buffer.teardown()
            let n = buffer.attachments.count
            emit("epochs=\(count) interval_ms=\(interval) interfaces=\(n) ack_lag=\(ackLag) drops=\(drops)")
            if let summary = SampleSummary(epochCost) { emit("netlink_epoch_us (close+release, \(n) plug(s)) \(summary)") }
            if let summary = SampleSummary(statsCost) { emit("netlink_stats_us (one qdisc dump) \(summary)") }
        } catch { throw fail(error) }
    }

    private func monotonicNow() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }

    private func sleepUntil(_ deadline: UInt64) {
        var target = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &target, nil) == EINTR {}
    }
}

// MARK: Traffic probes (testbed)

struct NetbufProbeSend: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe-send", abstract: "Send numbered broadcast frames of any ethertype (testbed).", shouldDisplay: false)

    @Option(help: ArgumentHelp("Interface to send on.", valueName: "name")) var interface: String
    @Option(help: ArgumentHelp("Ethertype, e.g. 0x0800, 0x0806 (ARP), 0x86dd (IPv6) (default: 0x0800).", valueName: "hex"))
    var ethertype: String = "0x0800"
    @Option(help: ArgumentHelp("First frame number (default: 1).", valueName: "n")) var first: UInt64 = 1
    @Option(help: ArgumentHelp("Number of frames (default: 1).", valueName: "n")) var count: UInt64 = 1
    @Option(help: ArgumentHelp("Frame length (default: 60).", valueName: "bytes")) var size: Int = 60

    func validate() throws {
        if parsedEthertype == nil { throw ValidationError("--ethertype: '\(ethertype)' is not a 16-bit hex number") }
        if size > 1514 { throw ValidationError("--size must be at most 1514 bytes") }
    }

    var parsedEthertype: UInt16? {
        UInt16(ethertype.hasPrefix("0x") ? String(ethertype.dropFirst(2)) : ethertype, radix: 16)
    }

    func run() throws {
        do {
            try NetbufProbe.sendFrames(interface: interface, ethertype: parsedEthertype!, first: first, count: count, size: size)
        } catch { throw fail(error) }
    }
}

struct NetbufProbeListen: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe-listen",
        abstract: "Print '0x<ethertype> <number|->' for every frame received on an interface (testbed).",
        shouldDisplay: false)

    @Option(help: ArgumentHelp("Interface to listen on.", valueName: "name")) var interface: String
    @Option(help: ArgumentHelp("Stop after this many frames (default: never).", valueName: "n")) var limit: UInt64?

    func run() throws {
        do {
            try NetbufProbe.listen(interface: interface, limit: limit, ready: { emit("# listening on \(interface)") }) { emit($0) }
        } catch { throw fail(error) }
    }
}

struct NetbufTCPEcho: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe-tcp-echo", abstract: "Echo TCP connections on a port (testbed).", shouldDisplay: false)

    @Option(help: ArgumentHelp("TCP port (default: 7000).", valueName: "port")) var port: UInt16 = 7000

    func run() throws {
        do { try NetbufProbe.tcpEcho(port: port) } catch { throw fail(error) }
    }
}

struct NetbufTCPPing: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe-tcp-ping", abstract: "Measure TCP round trips to an echo server (testbed).", shouldDisplay: false)

    @Option(help: ArgumentHelp("Echo server address (IPv4).", valueName: "address")) var host: String
    @Option(help: ArgumentHelp("TCP port (default: 7000).", valueName: "port")) var port: UInt16 = 7000
    @Option(help: ArgumentHelp("Round trips (default: 100).", valueName: "n")) var count: Int = 100
    @Option(help: ArgumentHelp("Pause between round trips (default: 5).", valueName: "ms")) var pause: UInt32 = 5
    @Flag(name: .customLong("random-pause"), help: "Pause a uniformly random time between 0 and --pause instead.")
    var randomPause = false
    @Option(help: ArgumentHelp("Label printed with the result.", valueName: "text")) var label: String = "tcp"

    func run() throws {
        do {
            let samples = try NetbufProbe.tcpRoundTrips(
                host: host, port: port, count: count, intervalMicroseconds: pause * 1_000, randomPause: randomPause)
            emit("\(label)_rtt_us \(SampleSummary(samples)!)")
        } catch { throw fail(error) }
    }
}
