import Glibc
import RemusCore
import RemusRuntime
import RemusSim
import RemusTLS

/// `remusd bench`: the replication loop's speed beside the physical limits measured in the same
/// run. Reports medians and spreads, never a pass/fail.
package enum LoopBenchmark {
    package struct Row: Sendable {
        package var name: String
        package var median: Double
        package var low: Double
        package var high: Double
        package var unit: String
        package var note: String
    }

    /// The most pages the benchmark's 1 GiB guest can dirty between two checkpoints: its working set.
    package static var reachableDirtyPages: Int {
        let config = SimConfig(memoryBytes: 1 << 30, vcpus: 2, seed: 1)
        return Int(Double(config.pageCount) * config.workingSetFraction)
    }

    /// - Parameters:
    ///   - dirtyPages: pages dirtied per checkpoint (the guest is stepped until its dirty set reaches it).
    ///   - repetitions: samples per measurement.
    package static func run(dirtyPages: Int, repetitions: Int) throws -> [Row] {
        let clock = SystemClock()
        var rows: [Row] = []
        let pageSize = 4096

        // Limit 1: memcpy of the same number of pages, gathered from a span of guest-like memory:
        // once past the caches (256 MiB), once from a span the size of the workload's hot set.
        let config0 = SimConfig(memoryBytes: 1 << 30, vcpus: 2, seed: 1)
        let hotSpanPages = max(Int(Double(config0.pageCount) * config0.workingSetFraction * config0.hotSetFraction), dirtyPages)
        let coldRates = memcpyRates(pages: dirtyPages, spanPages: max(dirtyPages * 4, 65536), repetitions: repetitions, clock: clock)
        let hotRates = memcpyRates(pages: dirtyPages, spanPages: hotSpanPages, repetitions: repetitions, clock: clock)
        rows.append(row("memcpy, pages spread over 256 MiB", coldRates, "GB/s", "\(dirtyPages) pages: the cache-cold limit for capture"))
        rows.append(row("memcpy, pages spread over the hot set", hotRates, "GB/s", "\((hotSpanPages * pageSize) >> 20) MiB span, like the workload's dirty pages"))

        // The pause: suspend → harvest → copy into the arena → state → resume, on a running guest.
        var config = SimConfig(memoryBytes: 1 << 30, vcpus: 2, seed: 1)
        config.dirtyRateLimit = 0
        let guest = try SimGuest(config: config, clock: clock, nic: nil, name: "bench", autoRun: false)
        defer { guest.shutdown() }
        try guest.startDirtyLogging()
        var bitmap = DirtyBitmap(pageCount: guest.descriptor.pageCount)
        try guest.harvestDirty(into: &bitmap)  // the initial everything-dirty set
        bitmap.clearAll()
        let arena = StagingArena(pageSize: pageSize, capacityPages: max(dirtyPages * 2, 1024))
        var pauses: [Double] = []
        var splits: [PauseSplit] = []
        var captured: [Int] = []
        for epoch in 1...repetitions {
            var dirty = 0
            // A working set smaller than --dirty-pages never gets there: stepping has a deadline.
            let stepDeadline = clock.monotonicNs() + 10_000_000_000
            while dirty < dirtyPages {
                guard clock.monotonicNs() < stepDeadline else {
                    throw ProtocolError("the simulated guest dirtied only \(dirty) of the \(dirtyPages) pages asked for in 10 s of stepping (its working set is smaller); nothing was measured — lower --dirty-pages")
                }
                guest.stepAll(ops: UInt64(max(dirtyPages / 8, 16)))
                try guest.harvestDirty(into: &bitmap)
                dirty = bitmap.count
            }
            var stopwatch = PauseStopwatch(clock: clock)
            try guest.suspend()
            stopwatch.suspended()
            try guest.harvestDirty(into: &bitmap)
            arena.reset(epoch: Epoch(epoch), kind: .checkpoint)
            try guest.capturePages(bitmap, into: arena)
            _ = try guest.captureState(clock: clock)
            stopwatch.captured()
            try guest.resume()
            let split = stopwatch.resumed()
            splits.append(split)
            pauses.append(Double(split.totalNs))
            captured.append(arena.count)
            bitmap.clearAll()
        }
        let capturedMedian = captured.sorted()[captured.count / 2]
        rows.append(row("pause per checkpoint", pauses.map { $0 / 1000 }, "µs", "\(capturedMedian) pages captured (median); p99 \(fmt(percentile(99, pauses) / 1000)) µs"))
        for (part, ns) in [("suspend", splits.map(\.suspendNs)), ("capture", splits.map(\.captureNs)), ("resume", splits.map(\.resumeNs))] {
            let us = ns.map { Double($0) / 1000 }
            rows.append(row("pause: \(part)", us, "µs", "p99 \(fmt(percentile(99, us))) µs; " + ratio(us, pauses.map { $0 / 1000 }) + " of the pause (medians)"))
        }
        let captureRates = zip(pauses, captured).map { Double($1 * pageSize) / $0 }
        rows.append(row("capture speed", captureRates, "GB/s", ratio(captureRates, hotRates) + " of hot-set memcpy, " + ratio(captureRates, coldRates) + " of cold memcpy"))

        // Limit 2: raw loopback TCP; then checkpoints encoded and written over the same kind of
        // socket. The four are measured in rounds, one sample of each per round, so that a load
        // that comes and goes (other work on the machine) weighs on all of them alike; the ratios
        // are medians of the rounds' ratios.
        let chunk = [UInt8](repeating: 0xa5, count: 1 << 20)
        let rawTotal = 256 << 20
        // A buffer as large as the shipping arena (64 MiB, past the caches): what the kernel's
        // copy costs when the bytes come from memory, as a checkpoint's pages do.
        let span = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 20, alignment: 4096)
        defer { span.deallocate() }
        span.initializeMemory(as: UInt8.self, repeating: 0xa5)
        // Arenas of non-zero pages so the encoder cannot shortcut them: one the writer checksums
        // itself (before), one sealed once as the loop thread does after capture (now).
        let ship = Shipping(state: try guest.captureState(clock: clock), pageSize: pageSize, checkpointsPerSample: 16)
        let plainArena = ship.filledArena(pages: 16384), sealedArena = ship.filledArena(pages: 16384)
        var sealRates: [Double] = []
        for _ in 0..<repetitions {
            let t0 = clock.monotonicNs()
            sealedArena.seal()
            sealRates.append(Double(sealedArena.dataBytes) / Double(clock.monotonicNs() - t0))
        }
        var raw: [Double] = [], rawCold: [Double] = [], unsealed: [Double] = [], shipped: [Double] = []
        for _ in 0..<repetitions {
            raw += try loopbackThroughput(bytes: rawTotal, repetitions: 1) { try writeChunks(chunk, total: rawTotal, to: $0) }
            rawCold += try loopbackThroughput(bytes: rawTotal, repetitions: 1) { channel in
                var sent = 0
                while sent < rawTotal {
                    let at = sent % span.count
                    try channel.write(UnsafeRawBufferPointer(rebasing: span[at..<(at + chunk.count)]))
                    sent += chunk.count
                }
                return sent
            }
            unsealed += try ship.throughput(plainArena, tls: nil, repetitions: 1)
            shipped += try ship.throughput(sealedArena, tls: nil, repetitions: 1)
        }
        rows.append(row("raw loopback TCP", raw, "GB/s", "\(rawTotal >> 20) MiB per sample in 1 MiB writes of one buffer (cache-hot): the limit for shipping"))
        rows.append(row("raw loopback TCP from a 64 MiB buffer", rawCold, "GB/s", roundRatio(rawCold, raw) + " of the cache-hot limit; 1 MiB writes walking a buffer the size of the shipping arena (bytes come from memory)"))
        rows.append(row("seal after capture (CRC32C + zero test, off the pause)", sealRates, "GB/s",
                        ratio(sealRates, hotRates) + " of hot-set memcpy; once per checkpoint on the loop thread, while the writer sends the previous one"))
        rows.append(row("checkpoint shipping", shipped, "GB/s", roundRatio(shipped, raw) + " of raw TCP, " + roundRatio(shipped, rawCold) + " of raw TCP from 64 MiB; 64 MiB checkpoints from a sealed arena: CRC32C combined, pages only sent (writev)"))
        rows.append(row("checkpoint shipping, CRC32C in the writer", unsealed, "GB/s",
                        roundRatio(unsealed, raw) + " of raw TCP, " + roundRatio(unsealed, rawCold) + " of raw TCP from 64 MiB, " + roundRatio(shipped, unsealed) + " sealed/this; the writer reads every page for its checksum before sending it (before the seal)"))

        rows += try tlsRows(ship: ship, arena: sealedArena, raw: raw, shipped: shipped, chunk: chunk, total: rawTotal, repetitions: repetitions)
        return rows
    }

    /// `remusd bench --channels`: only the replication channel — raw loopback TCP, checkpoint
    /// shipping in plaintext and over mutual TLS 1.3 (kTLS where the kernel takes the records) —
    /// with `megabytes` per sample: for slow machines such as the QEMU testbed, where the whole
    /// benchmark would take many minutes.
    package static func channels(megabytes: Int, repetitions: Int) throws -> [Row] {
        let pageSize = 4096
        let state = GuestState(vcpus: [], devices: [], clock: ClockState(guestMonotonicNs: 0, guestWallNs: 0, tscKHz: 0, hostMonotonicNs: 0, hostWallNs: 0),
                               layout: MemoryLayout(generation: 0, ranges: []), stream: [])
        let ship = Shipping(state: state, pageSize: pageSize, checkpointsPerSample: 4)
        let arena = ship.filledArena(pages: max(megabytes << 20 / pageSize / 4, 16))
        arena.seal()
        let chunk = [UInt8](repeating: 0xa5, count: 1 << 20)
        let total = megabytes << 20
        var raw: [Double] = [], shipped: [Double] = []
        for _ in 0..<repetitions {
            raw += try loopbackThroughput(bytes: total, repetitions: 1) { try writeChunks(chunk, total: total, to: $0) }
            shipped += try ship.throughput(arena, tls: nil, repetitions: 1)
        }
        var rows: [Row] = []
        rows.append(row("raw loopback TCP", raw, "GB/s", "\(megabytes) MiB per sample in 1 MiB writes of one buffer: the limit for shipping"))
        rows.append(row("checkpoint shipping", shipped, "GB/s", roundRatio(shipped, raw) + " of raw TCP; 4 checkpoints of \(arena.count) sealed pages per sample (writev)"))
        return rows + (try tlsRows(ship: ship, arena: arena, raw: raw, shipped: shipped, chunk: chunk, total: total, repetitions: repetitions))
    }

    /// A hypervisor library's stream through remusd (a Xen guest's first synchronisation):
    /// `megabytes` of live phase and a 1 MiB first checkpoint per sample, from the primary's
    /// writer to the pipe libxl's restore helper reads on the backup, beside raw loopback TCP.
    package static func libraryStream(megabytes: Int, repetitions: Int) throws -> [Row] {
        let chunk = [UInt8](repeating: 0xa5, count: 1 << 20)
        var raw: [Double] = [], samples: [LibraryStreamBenchmark.Sample] = [], copied: [LibraryStreamBenchmark.Sample] = []
        let loadBefore = loadAverage()
        for _ in 0..<repetitions {
            let total = (megabytes + 1) << 20
            raw += try loopbackThroughput(bytes: total, repetitions: 1) { try writeChunks(chunk, total: total, to: $0) }
            samples += try LibraryStreamBenchmark.run(bytes: megabytes << 20, samples: 1)
            copied += try LibraryStreamBenchmark.run(bytes: megabytes << 20, samples: 1, splice: false)
        }
        let rate = samples.map { Double($0.bytes) / Double($0.wallNs) }
        let copiedRate = copied.map { Double($0.bytes) / Double($0.wallNs) }
        /// CPU ms per GiB of stream of one part, per sample.
        func perGiB(_ ns: (LibraryStreamBenchmark.Sample) -> UInt64) -> [Double] {
            samples.map { Double(ns($0)) / 1e6 * Double(1 << 30) / Double($0.bytes) }
        }
        func median(_ ns: @escaping (LibraryStreamBenchmark.Sample) -> UInt64) -> String { fmt(perGiB(ns).sorted()[samples.count / 2]) }
        var rows: [Row] = []
        rows.append(row("raw loopback TCP", raw, "GB/s", "\(megabytes + 1) MiB per sample in 1 MiB writes of one buffer: the limit"))
        rows.append(row("library stream, primary writer to the backup's restore pipe", rate, "GB/s",
                        roundRatio(rate, raw) + " of raw TCP; \(megabytes) MiB live phase in 4 MiB pre-copy pieces + a 1 MiB checkpoint; load average \(loadBefore) before, \(loadAverage()) after"))
        rows.append(row("remusd CPU per GiB of stream", perGiB(\.remusdNs), "ms",
                        "primary writer \(median(\.writerNs)), backup socket reads \(median(\.readNs)), decode+verify+stage \(median(\.stageNs)), commit+ACK \(median(\.commitNs)), feed into the pipe \(median(\.feedNs)) (medians)"))
        rows.append(row("the same, the feeder copying into the pipe (write)", copiedRate, "GB/s",
                        roundRatio(copiedRate, raw) + " of raw TCP; feed into the pipe \(fmt(copied.map { Double($0.feedNs) / 1e6 * Double(1 << 30) / Double($0.bytes) }.sorted()[copied.count / 2])) ms per GiB (median) instead of vmsplice's"))
        rows.append(row("restore helper's pipe reads per GiB", perGiB(\.drainNs), "ms", "the library's own share on the backup, not remusd's"))
        return rows
    }

    /// Checkpoints of a sealed or unsealed arena written over loopback, in plaintext or over TLS.
    private struct Shipping {
        let state: GuestState
        let pageSize: Int
        let checkpointsPerSample: Int

        /// An arena of `pages` non-zero pages (the encoder cannot shortcut them).
        func filledArena(pages: Int) -> StagingArena {
            let arena = StagingArena(pageSize: pageSize, capacityPages: pages)
            arena.reset(epoch: 1, kind: .checkpoint)
            for pfn in 0..<pages {
                let page = arena.append(pfn: PFN(pfn), encoding: .raw)!
                page.withMemoryRebound(to: UInt64.self) { words in for i in words.indices { words[i] = UInt64(pfn) &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(i) } }
            }
            return arena
        }

        /// GB/s per sample of `checkpointsPerSample` checkpoints of `arena`, over plain TCP or mutual TLS.
        func throughput(_ arena: StagingArena, tls: (TLSContext, TLSContext, Int)?, repetitions: Int) throws -> [Double] {
            try loopbackThroughput(bytes: 0, repetitions: repetitions, tls: tls) { channel in
                let writer = RecordWriter(channel: channel, pageSize: pageSize)
                var sent = 0
                for i in 0..<checkpointsPerSample {
                    arena.epoch = Epoch(i + 1)
                    sent += try writer.writeCheckpoint(arena, state: state)
                }
                return sent
            }
        }
    }

    /// The TLS rows: 1 MiB writes over mutual TLS 1.3 (userspace unless the kernel took the
    /// records), then checkpoints with page segments coalesced into 16 KiB records, and with one
    /// SSL_write per segment (what coalescing saves); ratios against `raw` and `shipped`.
    private static func tlsRows(ship: Shipping, arena: StagingArena, raw: [Double], shipped: [Double],
                                chunk: [UInt8], total: Int, repetitions: Int) throws -> [Row] {
        let certificates = CertificateSet(directory: "/tmp/remusd-bench-tls-\(getpid())")
        try certificates.make([.init(name: "primary"), .init(name: "backup")])
        defer { _ = try? runShell("rm -rf '\(certificates.directory)'", timeoutMs: 10_000) }
        let tls = (server: try TLSContext(.server, files: certificates.files(for: "backup")),
                   client: try TLSContext(.client, files: certificates.files(for: "primary")))
        var kernelTLS = ""
        let tlsRaw = try loopbackThroughput(bytes: total, repetitions: repetitions, tls: (tls.server, tls.client, TLSChannel.recordBytes)) { channel in
            kernelTLS = (channel as? TLSChannel).map { "\($0.kernelTLS)" } ?? ""
            return try writeChunks(chunk, total: total, to: channel)
        }
        var rows: [Row] = []
        rows.append(row("TLS 1.3 loopback, 1 MiB writes", tlsRaw, "GB/s", ratio(tlsRaw, raw) + " of raw TCP; \(kernelTLS)"))
        let coalesced = try ship.throughput(arena, tls: (tls.server, tls.client, TLSChannel.recordBytes), repetitions: repetitions)
        rows.append(row("checkpoint shipping over TLS", coalesced, "GB/s", ratio(coalesced, shipped) + " of plaintext shipping, " + ratio(coalesced, raw) + " of raw TCP; segments coalesced into 16 KiB records"))
        let perSegment = try ship.throughput(arena, tls: (tls.server, tls.client, 0), repetitions: repetitions)
        rows.append(row("checkpoint shipping over TLS, SSL_write per segment", perSegment, "GB/s", ratio(perSegment, coalesced) + " of coalesced: one record and one syscall per page"))
        return rows
    }

    /// `remusd bench --epoch-rate`: the whole pipeline in one process (see `EpochRateBenchmark`),
    /// `rounds` rounds of `checkpoints` checkpoints: the rate on this machine's shared cores, each
    /// side's CPU per checkpoint, and the rate each side could sustain on a core of its own.
    package static func epochRate(dirtyPages: Int, checkpoints: Int, rounds: Int) throws -> [Row] {
        let loadBefore = loadAverage()
        let samples = try EpochRateBenchmark.run(dirtyPages: dirtyPages, checkpoints: checkpoints, rounds: rounds)
        let load = "load average \(loadBefore) before, \(loadAverage()) after"
        /// µs per checkpoint of one part, per round.
        func perCheckpoint(_ ns: (EpochRateBenchmark.Round) -> UInt64) -> [Double] {
            samples.map { Double(ns($0)) / Double($0.checkpoints) / 1000 }
        }
        /// Checkpoints/s a core could sustain doing only `ns`, per round.
        func ceiling(_ ns: (EpochRateBenchmark.Round) -> UInt64) -> [Double] {
            samples.map { Double($0.checkpoints) * 1e9 / Double(max(ns($0), 1)) }
        }
        let rate = samples.map { Double($0.checkpoints) * 1e9 / Double($0.wallNs) }
        let pages = samples.map { Double($0.pages) / Double($0.checkpoints) }
        let wire = samples.map { Double($0.wireBytes) / Double($0.checkpoints) / 1e6 }
        let primary = perCheckpoint(\.primaryNs), backup = perCheckpoint(\.backupNs)
        let primaryCeiling = ceiling(\.primaryNs), backupCeiling = ceiling(\.backupNs)
        // Two cores shared by everything, the guest's stepping included: the CPU a checkpoint
        // costs in all, over two cores.
        let twoCores = samples.map { (r: EpochRateBenchmark.Round) -> Double in
            let cpu: UInt64 = r.primaryNs + r.backupNs + r.stepNs
            return Double(r.checkpoints) * 2e9 / Double(max(cpu, 1))
        }
        func split(_ parts: [(String, (EpochRateBenchmark.Round) -> UInt64)]) -> String {
            parts.map { "\($0.0) \(fmt(perCheckpoint($0.1).sorted()[samples.count / 2])) µs" }.joined(separator: ", ")
        }
        var rows: [Row] = []
        rows.append(row("epoch rate, whole pipeline in one process", rate, "checkpoints/s",
                        "\(samples.count) rounds of \(checkpoints); \(fmt(pages.sorted()[pages.count / 2])) pages and \(fmt(wire.sorted()[wire.count / 2])) MB on the wire per checkpoint; \(roundRatio(rate, twoCores)) of what the CPU it took allows on 2 cores; \(load)"))
        rows.append(row("primary CPU per checkpoint", primary, "µs",
                        split([("pause (suspend, harvest, capture, state, resume)", \.captureNs), ("seal", \.sealNs), ("write", \.writeNs)]) + " (medians)"))
        rows.append(row("backup CPU per checkpoint", backup, "µs",
                        split([("socket reads", \.readNs), ("decode, verify, stage", \.stageNs), ("commit + ACK", \.commitNs)]) + " (medians)"))
        rows.append(row("primary alone on a core", primaryCeiling, "checkpoints/s", "1 s / the primary's CPU per checkpoint: its ceiling on a host (core) of its own"))
        rows.append(row("backup alone on a core", backupCeiling, "checkpoints/s", "1 s / the backup's CPU per checkpoint: its ceiling on a host (core) of its own"))
        // BackupDaemon's reader waits for each commit; were it to stage the next checkpoint
        // meanwhile, a backup with two cores would be bound by the busier of its two threads.
        let overlapped = ceiling { max($0.readNs + $0.stageNs, $0.commitNs) }
        rows.append(row("backup on two cores if the reader did not wait for commits", overlapped, "checkpoints/s",
                        roundRatio(overlapped, backupCeiling) + " of one core: 1 s / the busier of reader and committer (not how remusd runs now: its reader waits for each commit)"))
        rows.append(row("guest stepping per checkpoint (not the pipeline)", perCheckpoint(\.stepNs), "µs", "the loop thread dirtying the guest between checkpoints; a real guest runs on its own vCPUs"))
        rows.append(row("backup reader waiting for commits", perCheckpoint(\.readerWaitNs), "µs", "wall time per checkpoint the reader sat idle while the committer applied the previous one"))
        return rows
    }

    /// The 1-minute load average ("?" when unknown).
    private static func loadAverage() -> String {
        var load = [Double](repeating: 0, count: 3)
        return getloadavg(&load, 3) >= 1 ? fmt(load[0]) : "?"
    }

    /// GB/s of copying `pages` pages gathered from a span of `spanPages` pages.
    private static func memcpyRates(pages: Int, spanPages: Int, repetitions: Int, clock: SystemClock) -> [Double] {
        let pageSize = 4096
        let source = UnsafeMutableRawPointer.allocate(byteCount: spanPages * pageSize, alignment: 4096)
        let destination = UnsafeMutableRawPointer.allocate(byteCount: pages * pageSize, alignment: 4096)
        defer { source.deallocate(); destination.deallocate() }
        memset(source, 0x5a, spanPages * pageSize)
        memset(destination, 0, pages * pageSize)
        var rates: [Double] = []
        for r in 0..<repetitions {
            let t0 = clock.monotonicNs()
            for i in 0..<pages { memcpy(destination + i * pageSize, source + ((i &* 7919 &+ r &* 104_729) % spanPages) * pageSize, pageSize) }
            rates.append(Double(pages * pageSize) / Double(clock.monotonicNs() - t0))
        }
        return rates
    }

    /// Bytes/ns (= GB/s) per sample of `send` writing to a connection whose peer drains it; over
    /// mutual TLS with `tls` (server and client contexts, the writer's coalescing size).
    /// Writes `chunk` again and again until `total` bytes went out; returns the bytes written.
    private static func writeChunks(_ chunk: [UInt8], total: Int, to channel: any ByteChannel) throws -> Int {
        var sent = 0
        while sent < total { try channel.write(chunk); sent += chunk.count }
        return sent
    }

    private static func loopbackThroughput(
        bytes: Int, repetitions: Int, tls: (TLSContext, TLSContext, Int)? = nil, _ send: (any ByteChannel) throws -> Int
    ) throws -> [Double] {
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        var rates: [Double] = []
        for _ in 0..<repetitions {
            let done = Gate<Int>()
            startThread(name: "bench-drain") {
                guard let tcp = try? listener.accept() else { done.open(with: 0); return }
                let ch: any ByteChannel
                if let (server, _, _) = tls {
                    guard let secured = try? TLSChannel.accept(tcp, context: server, allowedPeers: [], plaintextSignature: [],
                                                               deadline: .after(milliseconds: 10_000)) else { done.open(with: 0); return }
                    ch = secured
                } else {
                    ch = tcp
                }
                var buffer = [UInt8](repeating: 0, count: 1 << 20)
                var total = 0
                while let n = try? buffer.withUnsafeMutableBytes({ try ch.read(into: $0) }), n > 0 { total += n }
                done.open(with: total)
            }
            let tcp = try TCPChannel.connect(to: listener.endpoint, deadline: .after(milliseconds: 5000))
            let channel: any ByteChannel
            if let (_, client, coalesce) = tls {
                channel = try TLSChannel.connect(tcp, context: client, expectedName: "backup", deadline: .after(milliseconds: 10_000), coalesceBytes: coalesce)
            } else {
                channel = tcp
            }
            let t0 = SystemClock().monotonicNs()
            let sent = try send(channel)
            channel.shutdownWrite()
            let received = done.wait()
            let elapsed = Double(SystemClock().monotonicNs() - t0)
            precondition(received == sent, "drained \(received) of \(sent) bytes")
            rates.append(Double(sent) / elapsed)
        }
        return rates
    }

    static func row(_ name: String, _ samples: [Double], _ unit: String, _ note: String) -> Row {
        let s = samples.sorted()
        return Row(name: name, median: s[s.count / 2], low: s.first ?? 0, high: s.last ?? 0, unit: unit, note: note)
    }

    /// The p-th percentile (0…100) of `samples`, nearest rank.
    private static func percentile(_ p: Double, _ samples: [Double]) -> Double {
        let s = samples.sorted()
        return s[min(s.count - 1, Int((Double(s.count - 1) * p / 100).rounded()))]
    }

    /// The median over rounds of `a[i] / b[i]` (samples taken side by side), as "N %".
    static func roundRatio(_ a: [Double], _ b: [Double]) -> String {
        let ratios = zip(a, b).map { $0 / $1 }.sorted()
        return "\(Int((ratios[ratios.count / 2] * 100).rounded())) %"
    }

    private static func ratio(_ a: [Double], _ b: [Double]) -> String {
        let ma = a.sorted()[a.count / 2], mb = b.sorted()[b.count / 2]
        return "\(Int((ma / mb * 100).rounded())) %"
    }

    package static func render(_ rows: [Row]) -> String {
        var out = "| measurement | median | min … max | note |\n| --- | --- | --- | --- |\n"
        for r in rows {
            out += "| \(r.name) | \(fmt(r.median)) \(r.unit) | \(fmt(r.low)) … \(fmt(r.high)) | \(r.note) |\n"
        }
        return out
    }

    /// Whole numbers from 100 up, two decimals down to 0.1, and below that two significant
    /// digits (the testbed's emulated CPU moves TLS at a few MB/s: "0.0 GB/s" would say nothing).
    private static func fmt(_ v: Double) -> String {
        if v >= 100 { return String(Int(v.rounded())) }
        var scale = 100.0
        while v > 0, v * scale < 10, scale < 1e9 { scale *= 10 }
        return String((v * scale).rounded() / scale)
    }
}
