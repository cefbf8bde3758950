import Glibc
import Logging
import RemusCore

/// The primary's shell: runs a `PrimaryEngine` on its own thread and carries out its directives
/// against a guest, an output buffer and a connection to the backup.
///
/// Threads: the loop thread (engine, capture: suspend → harvest → copy → resume), the writer
/// thread (encodes and writes checkpoints from staging arenas while the guest runs), a reader
/// thread per connection (ACKs and heartbeats), a connect thread while connecting.
///
/// `@unchecked Sendable`: everything mutable is touched only on the loop thread, except what the
/// writer and reader queues guard with their own locks.
public final class PrimaryProtection: @unchecked Sendable {
    enum Event: Sendable {
        case connected(generation: Int, channel: any ByteChannel, reader: StreamReaderBox)
        case connectFailed(generation: Int, reason: String)
        case precopyShipped(generation: Int, round: Int, remainingDirty: Int, pages: Int)
        case shipped(generation: Int, epoch: Epoch, bytes: Int)
        case ack(generation: Int, Ack)
        case activity(generation: Int)
        case connectionLost(generation: Int, reason: String)
        case stop(StreamEndReason)
        case switchover
        case witnessLost(String)
        /// The witness thread renewed the lease: its deadline moved.
        case leaseRenewed
    }

    public let guest: any PrimaryGuest
    public let output: any OutputBuffer
    let backup: Endpoint
    /// How the connection to the backup is made and protected.
    let transport: ReplicationTransport
    let clock: any HostClock
    let loop: EventLoop<Event>
    private var engine: PrimaryEngine
    /// How the guest is captured, decided once from its capture mode.
    private let capture: Capture
    /// The staging arenas: taken for a capture or a pre-copy round, given back by the writer.
    let arenas: ArenaPool
    /// Checkpoints captured and not yet handed to the writer (which then owns their arenas).
    private var capturedArenas: [Epoch: (StagingArena, GuestState)] = [:]
    private var generation = 0
    private var channel: (any ByteChannel)?
    private var writer: CheckpointShipper?
    /// The writer of the last closed connection, until it has stopped.
    private var retiredWriter: CheckpointShipper?
    /// A stream's first checkpoint and when it was taken, until the backup acknowledges it.
    private var firstCheckpoint: (epoch: Epoch, takenAt: UInt64)?
    private let header: StreamHeader
    private let domainConfig: DomainConfig
    private let blackhole: Bool
    /// Statistics for `remusd status`, guarded by `statsLock`.
    private let statsLock = MonitorLock()
    private var stats = PrimaryStatistics()
    /// The same numbers as metrics, updated with `stats` under `statsLock`; nil: none kept.
    private var metrics: PrimaryMetrics?
    /// Called once when protection has ended (stopped), on the loop thread.
    private let onFinished: @Sendable (PrimaryEngine.State) -> Void
    /// The witness this primary holds (already acquired), and its configuration.
    private let witness: (EtcdWitness, WitnessConfiguration)?

    public init(
        guest: any PrimaryGuest, output: any OutputBuffer, backup: Endpoint, transport: ReplicationTransport,
        settings: ProtectionSettings, maxCheckpointPages: Int, blackhole: Bool = false, clock: any HostClock,
        witness: (EtcdWitness, WitnessConfiguration)? = nil, metrics: DaemonMetrics? = nil,
        onFinished: @escaping @Sendable (PrimaryEngine.State) -> Void = { _ in }
    ) throws {
        self.witness = witness
        self.metrics = metrics.map { PrimaryMetrics(factory: $0.factory) }
        self.guest = guest
        self.output = output
        self.backup = backup
        self.transport = transport
        self.clock = clock
        self.blackhole = blackhole
        self.onFinished = onFinished
        loop = EventLoop(clock: clock)
        engine = PrimaryEngine(settings: settings)
        let d = guest.descriptor
        let capacity: Int
        switch guest.captureMode {
        case .pages(let pageGuest):
            capture = .pages(pageGuest, DirtyLog(pageCount: d.pageCount))
            capacity = max(1, min(maxCheckpointPages, Int(d.pageCount)))
        case .stream(let streamingGuest):
            // The library's stream carries the pages: a checkpoint's arena holds only its epoch
            // and kind, and counts it among the checkpoints in flight.
            capture = .stream(streamingGuest)
            capacity = 1
        }
        arenas = ArenaPool((0..<settings.maxShipping).map { _ in StagingArena(pageSize: d.pageSize, capacityPages: capacity) })
        // DISKS only for a guest with disks: a backup without a disk directory can serve the rest.
        header = StreamHeader(
            features: guest.disks == nil ? [] : [.disks], pageSize: UInt32(d.pageSize), backend: d.backend, role: .primary,
            guestUUID: d.uuid, guestName: d.name, senderVersion: remusdVersion)
        domainConfig = try guest.domainConfig()
    }

    /// Starts protecting on a new thread; returns at once.
    public func start() {
        startThread(name: "primary-loop") { [self] in
            // Until the first checkpoint nothing protects the output: let it flow.
            do { try output.releaseAll() } catch { Log.error("could not open the output buffer: \(error)") }
            execute(engine.start(now: clock.monotonicNs()))
            startWitnessRenewal()
            armDeadline()
            loop.run(
                handle: { [self] event in
                    handle(event)
                    finishIfStopped()
                    armDeadline()
                },
                tick: { [self] now in
                    checkWitnessDeadline()
                    execute(engine.onTick(now: now))
                    finishIfStopped()
                    armDeadline()
                })
        }
    }

    /// Asks for a planned end of protection.
    public func stop(_ reason: StreamEndReason = .plannedStop) { loop.post(.stop(reason)) }

    /// Asks for a planned switchover: the backup takes the guest over, nothing is lost or doubled.
    public func switchover() { loop.post(.switchover) }

    /// Whether protection has ended (engine stopped).
    public var isStopped: Bool { statsLock.withLock { if case .stopped = stats.state { return true } else { return false } } }

    /// A snapshot for `remusd status`.
    public func statusText() -> String {
        statsLock.withLock { stats.render() }
    }

    /// Brings the metrics up to date before they are served (the last ACK's age moves with time).
    public func refreshMetrics() {
        let now = clock.monotonicNs()
        statsLock.withLock { metrics?.refresh(stats, now: now) }
    }

    // MARK: - Events

    private func handle(_ event: Event) {
        let now = clock.monotonicNs()
        switch event {
        case .connected(let gen, let ch, let reader):
            guard gen == generation else { ch.shutdown(); return }
            channel = ch
            writer = CheckpointShipper(channel: ch, generation: gen, header: header, blackhole: blackhole,
                                       giveBack: { [arenas] in arenas.give($0) }, post: { [loop] in loop.post($0) })
            startReader(reader.reader, generation: gen)
            let protection = ReplicationTransport.describe(ch)
            updateStats { $0.channel = protection }
            Log.info("connected to the backup \(backup) over \(protection); initial synchronisation", logContext)
            execute(engine.onConnected(now: now))
        case .connectFailed(let gen, let reason):
            guard gen == generation else { return }
            execute(engine.onConnectionLost(reason: reason, now: now))
        case .precopyShipped(let gen, let round, let remaining, let pages):
            guard gen == generation else { return }
            updateStats { $0.precopyPages += UInt64(pages) }
            execute(engine.onPrecopyRoundShipped(round: round, remainingDirty: remaining, now: now))
        case .shipped(let gen, let epoch, let bytes):
            guard gen == generation else { return }
            updateStats {
                $0.shippedBytes += UInt64(bytes)
                $0.lastCheckpointBytes = UInt64(bytes)
                $0.shippedCheckpoints += 1
                $0.unacknowledgedBytes[epoch] = UInt64(bytes)
            }
            execute(engine.onCheckpointShipped(epoch, now: now))
        case .ack(let gen, let ack):
            guard gen == generation else { return }
            if let first = firstCheckpoint, ack.epoch >= first.epoch {
                firstCheckpoint = nil
                Log.info("first checkpoint \(first.epoch) acknowledged by the backup \((now - min(first.takenAt, now)) / 1_000_000) ms after it was taken", logContext)
            }
            execute(engine.onAck(ack.epoch, now: now))
            let acked = engine.acknowledgedEpoch
            updateStats {
                $0.acknowledged = acked
                $0.lastAckAt = now
                $0.unacknowledgedBytes = $0.unacknowledgedBytes.filter { $0.key > acked }
            }
        case .activity(let gen):
            guard gen == generation else { return }
            execute(engine.onPeerActivity(now: now))
        case .connectionLost(let gen, let reason):
            guard gen == generation else { return }
            // A streaming guest's save fails when its domain vanished (destroyed, crashed), and in
            // its live phase that reaches us as a lost connection. Reconnecting would only start
            // saves of a domain that is gone, forever: the guest is what was lost.
            if engine.state != .stopped, guest.hasVanished {
                execute(engine.onGuestLost(reason: "the guest vanished from this host (\(reason)); a backup holding a committed checkpoint takes over from it; output held here is never released", now: now))
                return
            }
            execute(engine.onConnectionLost(reason: reason, now: now))
        case .stop(let reason):
            execute(engine.stop(reason: reason, now: now))
        case .switchover:
            execute(engine.switchover(now: now))
        case .witnessLost(let reason):
            execute(engine.onWitnessLost(reason: reason, now: now))
        case .leaseRenewed:
            armWitnessDeadline()
        }
    }

    /// Sets the loop's one deadline after every event and tick: the earliest of the engine's own
    /// (derived from its state) and the witness lease's. Neither is ever dropped: both are
    /// recomputed here each time from what they depend on.
    private func armDeadline() {
        loop.setDeadline([engine.nextDeadline, witnessDeadline].compactMap { $0 }.min())
    }

    private var finished = false

    /// Ends the loop once the engine stopped (after an event or a tick).
    private func finishIfStopped() {
        guard !finished, case .stopped = engine.state else { return }
        finished = true
        loop.stop()
        onFinished(engine.state)
    }

    // MARK: - Directives

    private func execute(_ directives: [PrimaryEngine.Directive]) {
        for directive in directives { execute(directive) }
        let state = engine.state
        updateStats { $0.state = state; $0.captured = self.engine.capturedEpoch; $0.unacknowledged = self.engine.unacknowledged }
    }

    private func execute(_ directive: PrimaryEngine.Directive) {
        let now = clock.monotonicNs()
        switch directive {
        case .connect:
            generation += 1
            let gen = generation
            let endpoint = backup
            let loop = self.loop
            let header = self.header
            let config = domainConfig
            let transport = self.transport
            let disks = guest.disks?.descriptors ?? []
            // A backup that drops SYNs, or stalls in the TLS handshake, costs the peer timeout (at
            // least 1 s), not the kernel's minutes.
            let connectBudgetNs = max(engine.settings.timeoutNs, 1_000_000_000)
            startThread(name: "connect") {
                do {
                    let ch = try transport.connect(to: endpoint, deadline: Deadline(afterNanoseconds: connectBudgetNs))
                    let reader = StreamReader(channel: ch, direction: .backupToPrimary)
                    let peerHeader = try reader.readHeader()
                    do { try Self.check(peerHeader: peerHeader, against: header, disks: disks) } catch {
                        ch.shutdown()
                        throw error
                    }
                    try RecordWriter.writePreamble(header: header, config: config, disks: disks, to: ch)
                    loop.post(.connected(generation: gen, channel: ch, reader: StreamReaderBox(reader)))
                } catch {
                    loop.post(.connectFailed(generation: gen, reason: "\(error)"))
                }
            }
        case .startDirtyLogging:
            // A writer of an earlier connection may still be in a pre-copy round using the dirty
            // log: let it finish before the log is reset for this connection.
            retiredWriter?.waitUntilStopped()
            retiredWriter = nil
            do {
                // A new connection's disk journal starts now: the full copy of round 1 follows.
                guest.disks?.restartJournal()
                switch capture {
                case .pages(let pageGuest, let dirty):
                    try pageGuest.startDirtyLogging()
                    dirty.clear()
                case .stream(let streamingGuest):
                    try streamingGuest.startStream()
                }
            } catch {
                execute(engine.onCaptureFailed(engine.capturedEpoch, reason: "\(error)", now: now))
            }
        case .precopyRound(let round):
            // A round is asked for only on a live connection, after the last round gave its arena
            // back; should either be missing, end this connection rather than the process.
            func cannotStart(_ missing: String) {
                Log.error("pre-copy round \(round) cannot start: \(missing); this is a bug in remusd; reconnecting")
                execute(engine.onConnectionLost(reason: "pre-copy round \(round) found \(missing)", now: now))
            }
            guard let writer else { return cannotStart("no connection") }
            // Progress on the status line, and in the log at every quarter of the first round.
            let progress: @Sendable (Int, Int) -> Void = { [self] sent, total in
                var logIt = false
                var remaining: UInt64?
                let at = clock.monotonicNs()
                updateStats {
                    let before = $0.syncProgress.total > 0 ? $0.syncProgress.sent * 4 / $0.syncProgress.total : -1
                    $0.syncProgress = (sent, total)
                    $0.syncETA.record(sent: sent, total: total, at: at)
                    remaining = $0.syncETA.remainingNs(now: at)
                    logIt = round == 1 && total > 0 && sent * 4 / total != before
                }
                if logIt { Log.info("synchronising: \(progressBar(sent, total, remainingNs: remaining))") }
            }
            if round == 1, let disks = guest.disks {
                writer.enqueue(.diskCopy(disks))
            }
            switch capture {
            case .pages(let pageGuest, let dirty):
                guard let arena = arenas.take() else { return cannotStart("no free staging arena (\(arenas.total) in use)") }
                writer.enqueue(.precopyPages(round: round, guest: pageGuest, dirty: dirty, arena: arena, progress: progress))
            case .stream(let streamingGuest):
                writer.enqueue(.precopyStream(round: round, guest: streamingGuest, progress: progress))
            }
        case .checkpoint(let epoch, let kind):
            capture(epoch: epoch, kind: kind)
        case .ship(let epoch):
            // From here the writer owns the arena and gives it back once written or dropped.
            guard let writer, let (arena, state) = capturedArenas.removeValue(forKey: epoch) else { return }
            writer.enqueue(.checkpoint(arena: arena, state: state))
        case .releaseOutput(let epoch):
            guard witnessAllowsRelease() else { return }
            do { try output.release(through: epoch) } catch { Log.error("releasing output of epoch \(epoch) failed: \(error)") }
            checkOutputBuffer(now: now)
        case .releaseAllOutput:
            guard witnessAllowsRelease() else { return }
            do { try output.releaseAll() } catch { Log.error("releasing all output failed: \(error)") }
        case .holdOutput:
            do { try output.hold() } catch { Log.error("holding output failed: \(error)") }
        case .sendHeartbeat(let sequence):
            writer?.enqueue(.heartbeat(Heartbeat(sequence: sequence, senderMonotonicNs: now)))
        case .sendStreamEnd(let reason, let lastEpoch):
            let message = reason == .error ? "the primary lost its guest" : "protection ended by the operator"
            writer?.enqueue(.streamEnd(StreamEnd(reason: reason, lastEpoch: lastEpoch, message: message)))
            writer?.enqueue(.close)
        case .closeConnection:
            writer?.abandon()
            if let writer { retiredWriter = writer }
            channel?.shutdown()
            channel = nil
            writer = nil
            generation += 1  // events of the old connection are ignored from now on
            // Arenas the old writer holds come back from it; those it never got come back here.
            for (_, (arena, _)) in capturedArenas { arenas.give(arena) }
            capturedArenas.removeAll()
            updateStats { $0.unacknowledgedBytes.removeAll() }
        case .throttleGuest(let percent):
            do { try guest.setSpeed(percent: percent) } catch { Log.error("throttling the guest to \(percent) % failed: \(error)") }
            updateStats {
                if percent < $0.speedPercent { $0.throttleEvents += 1 }
                $0.speedPercent = percent
            }
        case .pauseGuest:
            do { try guest.suspend() } catch { Log.error("pausing the guest failed: \(error); it may still run — stop it by hand") }
        case .stopGuest:
            do { try guest.stop() } catch { Log.error("stopping the handed-over guest failed: \(error); it is still suspended — make sure it does not run here") }
            // The final checkpoint is acknowledged and the guest has not run since it: all its
            // output is committed. A plug may still hold the final epoch's (closed before the
            // previous ACK, it got no barrier of its own and no later ACK will come): let it out.
            if witnessAllowsRelease() {
                do { try output.releaseAll() } catch { Log.error("releasing the final epoch's output failed: \(error); it stays held") }
            }
            if let (w, _) = witness {
                _ = witnessHandedOver.set()
                do { try w.release() } catch { Log.warning("releasing the witness after the switchover failed: \(error); the backup gets it when the lease runs out") }
            }
        case .report(let report):
            let text: String
            let context = logContext
            switch report {
            case .protecting(let first):
                text = "protecting: first checkpoint \(first) taken"
                Log.info(text, context)
                firstCheckpoint = (first, clock.monotonicNs())
            case .degraded(let t): text = t; Log.warning(t, context)
            case .overload(let t): text = t; Log.warning(t, context)
            case .switchedOver(let final): text = "switchover complete: the backup runs the guest from checkpoint \(final); it is stopped here"; Log.info(text, context)
            case .handOffUnknown(let t): text = t; Log.error(t, context)
            case .selfFenced(let t): text = t; Log.error(t, context)
            case .stopped(let reason): text = "protection stopped (\(reason))"; Log.info(text, context)
            case .guestLost(let t): text = "GUEST LOST: " + t; Log.error(text, context)
            case .earlierOutputReleased(let t): text = t; Log.warning(t, context)
            }
            updateStats { $0.lastReport = text }
        }
    }

    /// What every state-change line carries: the epochs, the backup, the guest.
    private var logContext: Logger.Metadata {
        ["epoch": "\(engine.capturedEpoch)", "acknowledged": "\(engine.acknowledgedEpoch)",
         "peer": "\(backup)", "guest": "\(guest.descriptor.name)"]
    }

    // MARK: - Output buffer statistics

    private var lastOutputCheckAt: UInt64 = 0
    private var lastDrops: UInt64 = 0

    /// Reads the output buffer's counters (at most once per interval: a netlink dump for a plug),
    /// shows them in `status`, and reacts to drops: a full buffer asks for early checkpoints.
    private func checkOutputBuffer(now: UInt64) {
        guard now >= lastOutputCheckAt + engine.settings.intervalNs else { return }
        lastOutputCheckAt = now
        guard let s = try? output.statistics() else { return }
        updateStats { $0.output = s }
        if s.drops > lastDrops {
            let dropped = s.drops - lastDrops
            lastDrops = s.drops
            execute(engine.onOutputPressure(dropped: dropped, now: now))
        }
    }

    // MARK: - Witness

    /// The guest was switched over: the witness key goes to the backup.
    private let witnessHandedOver = OneShotFlag()

    /// Output may leave only while the witness lease has more than the margin left (with no
    /// witness, always). Checked by the thread that releases, right before it does.
    private func witnessAllowsRelease() -> Bool {
        guard let (w, config) = witness else { return true }
        guard let lease = w.lease, lease.remainingNs(marginNs: config.marginNs) > 0 else {
            loop.post(.witnessLost("the lease is past its deadline"))
            return false
        }
        return true
    }

    /// When the witness lease's usable time runs out (the loop's clock, ns) while this primary
    /// relies on it; nil without a witness, once handed over, or once self-fenced. Loop thread only.
    private var witnessDeadline: UInt64?

    /// Recomputes `witnessDeadline` from the lease as last renewed.
    private func armWitnessDeadline() {
        guard let (w, config) = witness, !witnessHandedOver.isSet, let lease = w.lease else {
            witnessDeadline = nil
            return
        }
        witnessDeadline = clock.monotonicNs() + lease.remainingNs(marginNs: config.marginNs)
    }

    /// Self-fences the moment the lease deadline passes (the loop wakes at `witnessDeadline`),
    /// without waiting for a renewal stuck in its request timeout.
    private func checkWitnessDeadline() {
        guard let (w, config) = witness, !witnessHandedOver.isSet else {
            witnessDeadline = nil
            return
        }
        if let lease = w.lease, lease.remainingNs(marginNs: config.marginNs) == 0 {
            witnessDeadline = nil
            execute(engine.onWitnessLost(reason: "no renewal confirmed within \(config.ttlSeconds) s minus the margin", now: clock.monotonicNs()))
        } else {
            armWitnessDeadline()
        }
    }

    /// Renews the witness lease every heartbeat on a thread of its own; reports a lost lease.
    private func startWitnessRenewal() {
        guard let (w, config) = witness else { return }
        let loop = self.loop
        let heartbeat = engine.settings.heartbeatNs
        armWitnessDeadline()
        startThread(name: "witness") { [weak self] in
            var lastError = ""
            while true {
                guard let self, !self.isStopped else { return }
                if self.witnessHandedOver.isSet {
                    // Switched over: the backup runs the guest now and needs the key.
                    try? w.release()
                    return
                }
                do {
                    _ = try w.renew()
                    lastError = ""
                    // The loop moves its wake-up to the deadline this renewal gives, in case the next ones fail.
                    loop.post(.leaseRenewed)
                } catch {
                    if let e = error as? WitnessError, case .lost = e {
                        loop.post(.witnessLost("\(error)"))
                        return
                    }
                    if "\(error)" != lastError { Log.warning("renewing the witness lease failed: \(error)") }
                    lastError = "\(error)"
                }
                if let lease = w.lease, lease.remainingNs(marginNs: config.marginNs) == 0 {
                    loop.post(.witnessLost(lastError.isEmpty ? "the lease ran out" : lastError))
                    return
                }
                pauseBriefly(us: heartbeat / 1000)
            }
        }
    }

    /// The pause: suspend, harvest, copy, state, close the output epoch, resume (a final
    /// checkpoint leaves the guest suspended for the hand-over).
    private func capture(epoch: Epoch, kind: CheckpointKind) {
        // The engine keeps at most as many checkpoints in flight as there are arenas; a missing
        // one is a bug of ours: give protection up for this checkpoint rather than crash.
        guard let arena = arenas.take() else {
            Log.error("checkpoint \(epoch) found no free staging arena (\(arenas.total) in use); this is a bug in remusd")
            execute(engine.onCaptureFailed(epoch, reason: "no free staging arena (all \(arenas.total) in use)", now: clock.monotonicNs()))
            return
        }
        var stopwatch = PauseStopwatch(clock: clock)
        let start = stopwatch.startNs
        let limit = kind == .final ? arena.capacityPages : min(arena.capacityPages, engine.capturePageLimit)
        var failure: String?
        var deferred: Int?
        var state: GuestState?
        do {
            try guest.suspend()
            stopwatch.suspended()
            defer {
                stopwatch.captured()
                if kind != .final || failure != nil || deferred != nil {
                    do { try guest.resume() } catch { failure = failure ?? "resume failed: \(error)" }
                }
            }
            switch capture {
            case .pages(let pageGuest, let dirty):
                try dirty.harvest(from: pageGuest)
                let pages = dirty.count
                if pages > limit {
                    // Over the pause bound or the staging area: resume at once; the pages stay dirty.
                    deferred = pages
                } else {
                    arena.reset(epoch: epoch, kind: kind)
                    try dirty.capture(from: pageGuest, into: arena)
                    state = try pageGuest.captureState(clock: clock)
                    try output.closeEpoch(epoch)
                    dirty.clear()
                }
            case .stream(let streamingGuest):
                // The library decides what the checkpoint holds (it writes it while the guest is
                // suspended): there is no dirty count to hold against the bound before.
                arena.reset(epoch: epoch, kind: kind)
                state = try streamingGuest.captureCheckpoint(clock: clock)
                try output.closeEpoch(epoch)
            }
            // Still suspended: every disk operation whose completion memory `epoch` can show is
            // in the journal, and none of epoch + 1 is (I9).
            if let disks = guest.disks, state != nil { state?.disks = try disks.sealEpoch() }
        } catch {
            failure = "\(error)"
        }
        let split = stopwatch.resumed()
        let pause = split.totalNs
        if let pages = deferred {
            arenas.give(arena)
            updateStats { $0.deferred += 1 }
            execute(engine.onCaptureDeferred(epoch, pages: pages, limit: limit, now: clock.monotonicNs()))
            return
        }
        guard failure == nil, let state else {
            arenas.give(arena)
            if guest.hasVanished {
                execute(engine.onGuestLost(reason: "the guest vanished from this host while checkpoint \(epoch) was taken (\(failure ?? "no state")); the backup takes over from its last committed checkpoint; output held here is never released", now: clock.monotonicNs()))
                return
            }
            execute(engine.onCaptureFailed(epoch, reason: failure ?? "no state", now: clock.monotonicNs()))
            return
        }
        // The guest runs again: checksum and zero-test the pages now, while they are still in
        // the cache and off both the pause and the writer's path (it then only sends them).
        arena.seal()
        capturedArenas[epoch] = (arena, state)
        updateStats {
            $0.pauses.add(pause)
            $0.pauseSplit.add(split)
            $0.dirtyPages.add(UInt64(arena.count))
            $0.checkpointTimes.add(start)
        }
        execute(engine.onCheckpointCaptured(epoch, pauseNs: pause, pages: arena.count, now: clock.monotonicNs()))
    }

    private func startReader(_ reader: StreamReader, generation gen: Int) {
        let loop = self.loop
        let box = StreamReaderBox(reader)
        startThread(name: "primary-reader") {
            let reader = box.reader
            do {
                while let event = try reader.next() {
                    switch event {
                    case .ack(let ack): loop.post(.ack(generation: gen, ack))
                    case .heartbeat: loop.post(.activity(generation: gen))
                    case .streamEnded(let end):
                        loop.post(.connectionLost(generation: gen, reason: "the backup ended the stream (\(end.reason)): \(end.message)"))
                        return
                    case .peerError(let e):
                        loop.post(.connectionLost(generation: gen, reason: "the backup refused or failed (error \(e.code)): \(e.message)"))
                        return
                    case .skipped, .streamOpened:
                        continue
                    default:
                        loop.post(.connectionLost(generation: gen, reason: "the backup sent a record it must not send: \(event)"))
                        return
                    }
                }
                loop.post(.connectionLost(generation: gen, reason: "the backup closed the connection"))
            } catch {
                loop.post(.connectionLost(generation: gen, reason: "\(error)"))
            }
        }
    }

    /// Changes the statistics and, with them, the metrics (per event or checkpoint, never per page).
    private func updateStats(_ body: (inout PrimaryStatistics) -> Void) {
        statsLock.withLock {
            body(&stats)
            metrics?.publish(stats)
        }
    }

    static func check(peerHeader: StreamHeader, against ours: StreamHeader, disks: [DiskDescriptor] = []) throws {
        guard peerHeader.role == .backup else {
            throw ProtocolError("the peer at the backup address is not a remusd backup (it announced role \(peerHeader.role))")
        }
        guard disks.isEmpty || peerHeader.features.contains(.disks) else {
            let names = disks.map { "'\($0.name)'" }.joined(separator: ", ")
            throw ProtocolError("the backup does not replicate disks (it runs without --disk-dir), and this guest's disk \(names) must be replicated with its memory; nothing was sent to it — restart the backup with 'remusd receive --disk-dir DIR', DIR holding an image of each disk")
        }
    }
}

/// How a `PrimaryProtection` captures its guest: a page-capturing guest with the dirty log its
/// harvests fill, or a guest whose hypervisor library writes its own stream.
private enum Capture {
    case pages(any PageCapturingGuest, DirtyLog)
    case stream(any StreamingGuest)
}

/// The dirty set between harvests, shared by the writer thread (pre-copy) and the loop thread
/// (checkpoints), never at the same time: the engine takes the first checkpoint only after the
/// last pre-copy round reported back.
final class DirtyLog: @unchecked Sendable {
    private var bitmap: DirtyBitmap
    init(pageCount: UInt64) { bitmap = DirtyBitmap(pageCount: pageCount) }
    func harvest(from guest: any PageCapturingGuest) throws { try guest.harvestDirty(into: &bitmap) }
    func capture(from guest: any PageCapturingGuest, into arena: StagingArena) throws { try guest.capturePages(bitmap, into: arena) }
    var count: Int { bitmap.count }
    func clear() { bitmap.clearAll() }

    /// Moves up to `limit` set pages (lowest first) into `chunk`, clearing them here.
    func take(upTo limit: Int, into chunk: inout DirtyBitmap) -> Int { bitmap.move(upTo: limit, into: &chunk) }
}

/// Hands a reader to another thread (it is used by one thread at a time).
final class StreamReaderBox: @unchecked Sendable {
    let reader: StreamReader
    init(_ reader: StreamReader) { self.reader = reader }
}

/// A peer that does not follow the protocol.
public struct ProtocolError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The software version in stream headers and `--version`.
public let remusdVersion = "remusd 0.1.0"
