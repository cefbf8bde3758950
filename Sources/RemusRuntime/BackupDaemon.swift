import Glibc
import Logging
import RemusCore
import RemusDisk
import RemusNetbuf
import RemusSim
import RemusTLS

/// `remusd receive`: the backup's shell around a `BackupCommitter`.
///
/// Threads: the loop thread (committer, commit, activation), the listener thread, one reader
/// thread per connection (decode, validate, stage into arenas; waits for each commit), the writer
/// thread of the connection (ACKs, heartbeats), a fence thread while fencing, a prepare thread
/// that builds the replica up to the point of running it while the fence runs.
///
/// `@unchecked Sendable`: mutable state is touched on the loop thread only; cross-thread hand-offs
/// go through the event loop or a `Gate`.
public final class BackupDaemon: @unchecked Sendable {
    enum Event: Sendable {
        case hello(generation: Int, channel: any ByteChannel, sender: StreamSender, guestBytes: UInt64, header: StreamHeader, config: DomainConfig, disks: [DiskDescriptor], answer: Gate<String?>)
        case began(generation: Int, CheckpointBegin)
        case complete(generation: Int, CheckpointEnd, StagedCheckpoint, done: Gate<Bool>)
        case streamEnd(generation: Int, StreamEnd)
        case rejected(generation: Int, String)
        case lost(generation: Int, String)
        case activity(generation: Int)
        /// Fence run number `run` finished; a run the committer already gave up on is ignored.
        case fenced(run: Int, Bool, String)
        /// The replica's preparation for the takeover finished (`.prepareActivation`).
        case prepared(Bool, String)
        /// The disk worker logged `epoch`'s disk operations durably (error: why not).
        case diskLogged(Epoch, error: String?)
        /// The disk worker applied the logged epoch to the images (error: why not).
        case diskApplied(Epoch, error: String?, tookNs: UInt64)
        case operatorActivate
        case operatorDiscard
        case terminate
        case protectionFinished
    }

    let config: ReceiveConfiguration
    let clock: any HostClock = SystemClock()
    let loop: EventLoop<Event>
    private var committer: BackupCommitter
    private var replica: BackupReplica?
    /// What serves the replica's disks from this backup's images (Xen: loop devices), held as
    /// long as the replica.
    private var diskDevices: [AnyObject] = []
    private var replicaHeader: StreamHeader?
    /// Whose replica this backup holds: the primary identity and the guest it was admitted for
    /// (I10: only the same sender may stream here again without the operator).
    private var replicaSender: StreamSender?
    /// The address that sender connected from (guarded by `statsLock`): the connection cap
    /// makes room for it.
    private var replicaHost: String?
    /// Open connections, the cap on pending ones, and their deadlines.
    let connections: ConnectionTable
    private var generation = 0
    private var channel: (any ByteChannel)?
    private var writer: CheckpointShipper?
    private var pendingCommit: (StagedCheckpoint, Gate<Bool>)?
    private var exitCode: Int32 = 0
    private var protection: PrimaryProtection?
    private var activationTiming: (lostAt: UInt64, activatedAt: UInt64)?
    /// The preparation running now, if any: opened when it has finished (loop thread).
    private var preparing: Gate<Bool>?
    /// The last successful disk apply: its epoch, how long it took, when it finished (loop thread;
    /// the activation report carries it for the committed epoch).
    private var lastDiskApply: (epoch: Epoch, tookNs: UInt64, at: UInt64)?
    /// Where the last failover's time went (guarded by `statsLock`, shown by `status`).
    private var failoverPhases: FailoverPhases?
    /// The number of the last fence run started (loop thread).
    private var fenceRun = 0
    private let statsLock = MonitorLock()
    private var statusLines: [String: String] = [:]
    /// Connections refused in the TLS handshake (guarded by `statsLock`).
    private var refusedConnections = 0
    /// This daemon's metrics, and the backup's own among them (guarded by `statsLock`).
    let metrics: DaemonMetrics
    private var backupMetrics: BackupMetrics
    /// The fence attempt running now (guarded by `statsLock`): `status` says how long it has run.
    private var fenceAttempt: (number: Int, holding: Epoch, startedAt: UInt64)?
    /// The NIC of a taken-over guest over a tap (`--sim-nic-tap`), and the plug that holds its
    /// output; set up at start so a missing tap or plug qdisc is reported before any takeover.
    private var tapSink: (any PacketSink)?
    private var plug: PlugOutputBuffer?
    /// Where replicas come from (tests inject a fake Xen replica: off Xen there is no libxl).
    let backends: BackendFactory
    /// The disk directory (`--disk-dir`): its images, redo log and staging; nil without one
    /// (this backup then does not offer DISKS). Loop thread, but for `makeStaging`.
    private var disks: BackupDisks?
    /// Runs the disk directory's blocking work (redo log, image writes, fdatasync) in order, off
    /// the loop thread, which keeps sending heartbeats meanwhile.
    private let diskWorker = SerialWorker(name: "backup-disks")
    /// The checkpoint whose disk operations the worker is logging: its memory is applied and the
    /// reader let go when that is done (`.diskLogged`).
    private var loggingCommit: (epoch: Epoch, staged: StagedCheckpoint, done: Gate<Bool>)?

    /// - Parameter metrics: the process's registry (the executable bootstraps swift-metrics with
    ///   it); by default one of the daemon's own.
    public convenience init(_ config: ReceiveConfiguration, metrics: DaemonMetrics = DaemonMetrics()) {
        self.init(config, backends: .standard, metrics: metrics)
    }

    init(_ config: ReceiveConfiguration, backends: BackendFactory, metrics: DaemonMetrics = DaemonMetrics()) {
        self.config = config
        self.backends = backends
        self.metrics = metrics
        backupMetrics = BackupMetrics(factory: metrics.factory)
        loop = EventLoop(clock: clock)
        var helloBudgetMs = config.helloTimeoutMs
        if case .mutualTLS(let tls) = config.security { helloBudgetMs += tls.handshakeTimeoutMs }
        connections = ConnectionTable(pendingLimit: config.maxPendingConnections,
                                      helloBudgetNs: UInt64(helloBudgetMs) * 1_000_000, silenceNs: config.settings.timeoutNs)
        let policy: BackupCommitter.FencePolicy
        switch config.fence {
        case .command, .witness: policy = .fence
        case .operatorOnly: policy = .operatorOnly
        case .unsafeNoFence: policy = .unsafeNoFence
        }
        // The engine's fence deadline backs up the child's own (--fence-timeout, then SIGTERM and
        // SIGKILL of its process group within half a second): it only fires if that kill itself hangs.
        var settings = config.settings
        if case .command = config.fence { settings.fenceTimeoutNs = UInt64(config.fenceTimeoutMs + 2_000) * 1_000_000 }
        committer = BackupCommitter(settings: settings, fencePolicy: policy)
    }

    /// Runs until the daemon is told to terminate (or, with `exitAfterProtection`, until the guest
    /// it took over stops). Returns the process exit code.
    public func run() throws -> Int32 {
        SignalWatcher.blockTerminationSignals()
        Log.setRole("backup")
        if let tap = config.simNICTap {
            tapSink = try SimulatedBackend.makeSink(nicSink: config.nicSink, tap: tap)
            plug = try SimulatedBackend.plugBuffer(tap)
            let held = plug.map { p in p.attachments.map { "\($0.interface) (\($0.ifbName))" }.joined(separator: ", ") }
            Log.info("a taken-over guest's NIC writes into tap \(tap.tap)" + (held.map { "; its output is held by plug qdiscs on \($0)" } ?? ""))
        }
        if let directory = config.diskDirectory {
            let opened = try BackupDisks(directory: directory)
            disks = opened
            if let epoch = opened.recoveredEpoch {
                Log.info("disk directory \(directory): finished applying the disk writes of checkpoint \(epoch) that a previous run had logged (its images now hold checkpoint \(epoch) whole)")
                InjectedFault.afterRecovery(directory: directory)  // inert without REMUSD_INJECT_DIR
            }
            if let problem = opened.recoveryProblem {
                Log.warning("disk directory \(directory): \(problem); the images will be copied whole when a primary connects")
            }
            Log.info("replicating disks into \(directory)")
            setStatus("disks", "directory \(directory), no stream yet")
        }
        SignalWatcher.start { [loop] in loop.post(.terminate) }
        // Certificates are loaded before the port opens: a bad file is reported, nothing listens.
        let transport = try ReplicationTransport(config.security, side: .server)
        if case .insecurePlaintext = config.security {
            Log.warning("the replication port \(config.listen) is \(transport.summary): anyone who reaches it can send a stream this backup would run; use --tls-cert, --tls-key and --tls-ca outside a lab")
        } else {
            Log.info("replication channel: \(transport.summary)")
        }
        setStatus("channel", transport.summary)
        let listener: TCPListener
        do {
            listener = try TCPListener(endpoint: config.listen)
        } catch {
            throw ProtocolError("cannot listen on \(config.listen): \(error); nothing was started — is another 'remusd receive' using this port?")
        }
        // Before the status socket appears: a query the moment it does sees where and how this
        // backup listens.
        setStatus("listen", "\(listener.endpoint)")
        setStatus("state", describe(committer.state))
        let status = try StatusSocket(
            path: config.statusSocket,
            snapshot: { [self] in statsLock.withLock { renderStatus() } },
            command: { [self] line in
                switch line {
                case "activate":
                    loop.post(.operatorActivate)
                    return "activation requested\n"
                case "discard":
                    loop.post(.operatorDiscard)
                    return "discard requested: this backup drops its connection and image (see its log)\n"
                case "switchover", "stop":
                    // After a takeover this daemon protects the guest onwards: it is the primary now.
                    guard let protection = statsLock.withLock({ self.protection }) else {
                        return "'\(line)' needs a guest running here; this backup has not taken over\n"
                    }
                    if line == "stop" { protection.stop(.plannedStop) } else { protection.switchover() }
                    return "\(line) requested for the guest this daemon took over\n"
                default:
                    return "unknown command '\(line)' (a backup knows 'activate' and 'discard'; after a takeover also 'stop' and 'switchover')\n"
                }
            })
        let metricsServer = try config.metricsListen.map { listen in
            try MetricsServer(listen: listen) { [self, metrics] in
                refreshMetrics()
                return metrics.exposition()
            }
        }
        if let metricsServer { Log.info("serving metrics at http://\(metricsServer.endpoint)/metrics") }
        Log.info("listening on \(listener.endpoint) (fence: \(describe(config.fence)))")
        startThread(name: "listener") { [self] in accept(listener, transport: transport) }
        // After every event and tick the loop's one deadline is the committer's, from its state.
        loop.run(
            handle: { [self] event in
                handle(event)
                loop.setDeadline(committer.nextDeadline)
            },
            tick: { [self] now in
                execute(committer.onTick(now: now))
                loop.setDeadline(committer.nextDeadline)
            })
        listener.shutdown()
        metricsServer?.stop()
        status.remove()
        return exitCode
    }

    // MARK: - Connections

    /// Accepts primaries until the listener is shut down. A failure that passes (out of
    /// descriptors, buffers, a connection reset before we took it) is logged once per burst,
    /// shown in the status, and retried after a short pause: the listener never dies quietly.
    private func accept(_ listener: TCPListener, transport: ReplicationTransport) {
        var gen = 0
        var failing = false
        while true {
            let ch: TCPChannel
            do { ch = try listener.accept() } catch {
                guard TCPListener.isTransient(error) else {
                    if error.errno != .invalidArgument {  // EINVAL: shut down at exit
                        Log.error("stopped accepting primaries on \(listener.endpoint): \(error); the daemon keeps its state but takes no new connection — restart 'remusd receive'")
                        setStatus("accept", "STOPPED: \(error)")
                    }
                    return
                }
                if !failing {
                    Log.warning("accepting a primary on \(listener.endpoint) failed: \(error); still listening and retrying every 100 ms — if it persists, raise the open-file limit (ulimit -n)")
                    setStatus("accept", "FAILING: \(error), retrying every 100 ms")
                    failing = true
                }
                sleepNanoseconds(100_000_000)
                continue
            }
            if failing {
                Log.info("accepting primaries on \(listener.endpoint) again")
                setStatus("accept", "ok (recovered from a failure burst)")
                failing = false
            }
            guard let ticket = connections.register(ch, preferredHost: statsLock.withLock({ replicaHost })) else {
                // Refused before a byte is read: the cap bounds threads and buffers, not the log.
                let counts = connections.counts
                Log.warning("refused a connection from \(ch.peer): \(counts.pending) connections already wait for their handshake (--max-pending-connections \(connections.pendingLimit)); nothing changed here")
                setStatus("last refused", "\(ch.peer) (over the cap): \(counts.pending) connections pending")
                statsLock.withLock { refusedConnections += 1 }
                ch.shutdown()
                continue
            }
            gen += 1
            let thisGeneration = gen
            startThread(name: "backup-reader") { [self] in
                defer { ticket.closed() }
                // The handshake runs here, not on the listener: a peer that stalls in it holds
                // only its own thread, until the handshake deadline drops it.
                let secured: any ByteChannel
                do throws(TLSError) { secured = try transport.secure(accepted: ch) } catch {
                    refused(ch.peer, error)
                    return
                }
                serve(secured, ticket: ticket, generation: thisGeneration)
            }
        }
    }

    /// A connection that failed the TLS handshake: closed (by `secure`), logged and shown in the
    /// status, and nothing else — the committer never hears of it.
    private func refused(_ peer: String, _ error: TLSError) {
        Log.warning("refused a connection from \(peer) (\(error.kind.rawValue)): \(error.detail); nothing changed here")
        setStatus("last refused", "\(peer) (\(error.kind.rawValue)): \(error.detail)")
        statsLock.withLock { refusedConnections += 1 }
    }

    /// Handshake, then decode → validate → stage until the stream ends.
    private func serve(_ ch: any ByteChannel, ticket: ConnectionTable.Ticket, generation gen: Int) {
        // DISKS is offered only with a disk directory: a primary with disks then refuses this backup.
        let offered: StreamFeatures = config.diskDirectory == nil ? [] : [.disks]
        let ourHeader = StreamHeader(
            features: offered, pageSize: 4096, backend: .simulated, role: .backup,
            guestUUID: .zero, guestName: "", senderVersion: remusdVersion)
        let receiver: CheckpointReceiver
        var staging: DiskEpochStaging?
        defer { if let staging { unlink(staging.spillPath) } }
        do {
            try RecordWriter.writeHeader(ourHeader, to: ch)
            receiver = CheckpointReceiver(channel: ch, ticket: ticket, offeredFeatures: offered,
                                          maxDiskBytesPerCheckpoint: config.maxDiskBytesPerCheckpoint)
            let (header, config, described) = try receiver.readHello()
            let sender = StreamSender(identity: Self.identity(of: ch), guestUUID: header.guestUUID, guestName: header.guestName)
            let guestBytes: UInt64
            do { guestBytes = try BackendFactory.declaredGuestBytes(header, config) } catch {
                throw ProtocolError("\(sender.guestDescription): \(error)")
            }
            // What the configuration names on this host (Xen: files, scripts, bridges) is checked
            // before the loop hears of the hello: a refused one changes nothing here.
            var refusal: String?
            do {
                let replicated = self.config.diskDirectory == nil ? [] : Set(described.map(\.name))
                try BackendFactory.checkHostResources(config, policy: self.config.xenPaths, replicated: replicated)
            } catch {
                refusal = "\(sender.guestDescription): \(error)"
            }
            if refusal == nil {
                let answer = Gate<String?>()
                loop.post(.hello(generation: gen, channel: ch, sender: sender, guestBytes: guestBytes, header: header, config: config, disks: described, answer: answer))
                refusal = answer.wait()
            }
            if let refusal {
                Log.warning("refused a primary from \(ch.peer) ('\(sender.identity)'): \(refusal)")
                try? RecordWriter(channel: ch, pageSize: 4096).write(PeerError(code: 1, message: refusal))
                ch.shutdown()
                return
            }
            ticket.admitted()
            receiver.accepted(pageSize: header.pageSize, guestBytes: guestBytes)
            // `disks` was set before the listener started and never changes.
            if !described.isEmpty, let s = disks?.makeStaging(tag: gen, memoryBound: self.config.diskStagingMemoryBytes) {
                receiver.stageDisks(into: s)
                staging = s
            }
        } catch {
            Log.warning("handshake with \(ch.peer) failed: \(error); nothing changed here")
            ch.shutdown()
            return
        }
        do {
            defer {
                if let epoch = receiver.openEpoch, receiver.stagedDiskOperations > 0 {
                    Log.info("the connection ended inside checkpoint \(epoch): its \(receiver.stagedDiskOperations) disk operations staged so far were dropped with it; none reached an image (I9)")
                }
            }
            // Liveness needs one note per few percent of the timeout, not one per read: each
            // note wakes the loop, which cost a Xen backup a third of its CPU in a live phase.
            let pacer = ActivityPacer(everyNs: min(50_000_000, config.settings.timeoutNs / 20))
            try receiver.receive(
                deltaBases: { [self] in replicaForReader() },
                began: { [loop] begin in loop.post(.began(generation: gen, begin)) },
                complete: { [self, loop] end, staged in
                    let done = Gate<Bool>()
                    loop.post(.complete(generation: gen, end, staged, done: done))
                    guard done.wait() else { return false }
                    try waitForFeedRoom()
                    return true
                },
                activity: { [loop] in if pacer.due(at: monotonicNanoseconds()) { loop.post(.activity(generation: gen)) } },
                streamEnd: { [loop] end in loop.post(.streamEnd(generation: gen, end)) })
            loop.post(.lost(generation: gen, "the primary closed the connection"))
        } catch let error as StreamDecodeError where error.kind == .truncated {
            // Cut off mid-record: a lost connection (the partial checkpoint is dropped), not garbage.
            loop.post(.lost(generation: gen, error.description))
        } catch let error as StreamDecodeError {
            loop.post(.rejected(generation: gen, error.description))
        } catch let error as FeedFellBehind {
            // The primary is alive; this backup cannot keep up: like a rejected stream, it keeps
            // what it committed and gives the primary the timeout to reconnect.
            loop.post(.rejected(generation: gen, error.description))
        } catch {
            loop.post(.lost(generation: gen, "\(error)"))
        }
    }

    /// The authenticated identity of a connection: its certificate's name, or "plaintext:ADDRESS".
    static func identity(of channel: any ByteChannel) -> String {
        if let tls = channel as? TLSChannel { return tls.peerIdentity }
        return "plaintext:" + (Endpoint(parsing: channel.peer, defaultPort: 0)?.host ?? channel.peer)
    }

    private let replicaLock = MonitorLock()
    private var replicaForReaders: (any PageReplica)?
    /// The replica's feed queue, when it applies checkpoints behind one (Xen).
    private var feedForReaders: (any FeedBoundedReplica)?

    /// The reader, after each commit: reads on only once the replica's feed queue is within its
    /// bound (backpressure on the connection; nothing acknowledged is dropped). A feed still over
    /// it after half the silence timeout ends the connection before the committer would take a
    /// live primary for a lost one.
    private func waitForFeedRoom() throws {
        guard let feed = replicaLock.withLock({ feedForReaders }) else { return }
        let waitNs = config.settings.timeoutNs / 2
        if let behind = feed.waitForFeedRoom(until: monotonicNanoseconds() + waitNs) {
            throw FeedFellBehind(description: "libxl's restore fell behind: \(behind) after \(waitNs / 1_000_000) ms; dropping the connection so the primary resynchronises")
        }
    }

    private struct FeedFellBehind: Error, CustomStringConvertible {
        let description: String
    }

    /// The replica the reader decodes deltas against (set on the loop thread before the reader
    /// starts staging); nil when there is none or it takes a hypervisor library's stream.
    private func replicaForReader() -> (any PageReplica)? { replicaLock.withLock { replicaForReaders } }

    // MARK: - Events

    private func handle(_ event: Event) {
        let now = clock.monotonicNs()
        switch event {
        case .hello(let gen, let ch, let sender, let guestBytes, let header, let domainConfig, let described, let answer):
            let decision = config.admission.decide(sender, declaredGuestBytes: guestBytes, holder: replicaSender,
                                                   state: committer.state, fenceInFlight: committer.fenceInFlight)
            switch decision {
            case .refuse(let why):
                answer.open(with: why)
                return
            case .admit(let replacing):
                if replacing { execute(committer.onConnectionReplaced(now: now)) }
            }
            guard committer.acceptsPrimary else {
                answer.open(with: "this backup is \(describe(committer.state)); it accepts no primary now")
                return
            }
            do {
                let built = try backends.makeReplica(for: header, guestNIC: tapSink ?? SimulatedBackend.sink(config.nicSink), clock: clock)
                // The replicated disks are built from this backup's images, not the primary's paths.
                var placedConfig = domainConfig
                var placedDevices: [AnyObject] = []
                if !described.isEmpty, let disks {
                    (placedConfig, placedDevices) = try BackendFactory.placeDisks(domainConfig, described: described, directory: disks.directory)
                }
                try built.target.configure(header: header, config: placedConfig)
                // The disks last: accepting them voids an unapplied redo record of the old stream.
                if !described.isEmpty {
                    guard let disks else {
                        answer.open(with: "this backup has no disk directory (--disk-dir) for the guest's disks \(described.map { "'\($0.name)'" }.joined(separator: ", ")); nothing was changed")
                        return
                    }
                    if let refusal = disks.open(described) {
                        answer.open(with: refusal)
                        return
                    }
                    // Before any checkpoint of this stream is logged (the worker keeps order).
                    diskWorker.run {
                        do { try disks.prepareStream() } catch {
                            Log.error("the disk directory \(disks.directory) cannot be written: \(error); this stream's checkpoints fail to commit until it can")
                        }
                    }
                    setStatus("disks", described.map { "\($0.name) (\($0.sizeBytes >> 20) MiB)" }.joined(separator: ", ") + " in \(disks.directory)")
                }
                replica?.target.discard()
                replica = built
                diskDevices = placedDevices
                replicaHeader = header
                let deltaBases: (any PageReplica)?
                switch built.target.commitMode {
                case .pages(let pageReplica): deltaBases = pageReplica
                case .stream: deltaBases = nil
                }
                let feed = built.target as? any FeedBoundedReplica
                replicaLock.withLock { replicaForReaders = deltaBases; feedForReaders = feed }
            } catch {
                answer.open(with: "cannot build the replica: \(error)")
                return
            }
            generation = gen
            channel = ch
            replicaSender = sender
            statsLock.withLock { replicaHost = Endpoint(parsing: ch.peer, defaultPort: 0)?.host }
            writer = CheckpointShipper(channel: ch, generation: gen, header: header, blackhole: false) { _ in }
            setStatus("primary", "\(ch.peer) guest '\(header.guestName)' over \(ReplicationTransport.describe(ch))")
            setStatus("serving", "\(sender.guestDescription) of \(guestBytes >> 20) MiB from primary '\(sender.identity)'")
            Log.info("primary \(ch.peer) connected over \(ReplicationTransport.describe(ch)): guest '\(header.guestName)' \(header.guestUUID), \(header.backend), \(header.senderVersion)", logContext)
            answer.open(with: nil)
            execute(committer.onPrimaryConnected(now: now, disks: !described.isEmpty))
        case .began(let gen, let begin):
            guard gen == generation else { return }
            execute(committer.onCheckpointBegan(begin, now: now))
        case .complete(let gen, let end, let staged, let done):
            guard gen == generation else { done.open(with: false); return }
            pendingCommit = (staged, done)
            execute(committer.onCheckpointComplete(end, now: now))
            if let (_, gate) = pendingCommit {
                pendingCommit = nil
                gate.open(with: false)
            }
        case .streamEnd(let gen, let end):
            guard gen == generation else { return }
            execute(committer.onStreamEnd(end, now: now))
        case .rejected(let gen, let description):
            guard gen == generation else { return }
            execute(committer.onStreamRejected(description, now: now))
        case .lost(let gen, let reason):
            guard gen == generation else { return }
            execute(committer.onConnectionLost(reason: reason, now: now))
        case .activity(let gen):
            guard gen == generation else { return }
            execute(committer.onPeerActivity(now: now))
        case .fenced(let run, let ok, let detail):
            guard run == fenceRun else { return }
            statsLock.withLock { fenceAttempt = nil }
            execute(committer.onFenced(success: ok, detail: detail, now: now))
        case .prepared(let ok, let detail):
            preparing = nil
            if ok {
                let lostAt = committer.lossDetectedAt ?? now
                Log.info("replica ready to run: prepared in \((now - min(lostAt, now)) / 1_000_000) ms after the loss was detected", logContext)
            }
            execute(committer.onPrepared(success: ok, detail: detail, now: now))
        case .diskLogged(let epoch, let error):
            guard let commit = loggingCommit, commit.epoch == epoch else {
                // Its checkpoint was given up meanwhile: the logged record must never be applied.
                if error == nil { voidLoggedDisk() }
                return
            }
            loggingCommit = nil
            if let error {
                commit.done.open(with: false)
                return execute(committer.onCommitFailed(epoch, reason: "logging its disk writes failed: \(error)", now: now))
            }
            commitMemory(epoch, commit.staged, commit.done, voidingDiskOnFailure: true)
        case .diskApplied(let epoch, let error, let tookNs):
            if let error {
                Log.error("applying the disk writes of checkpoint \(epoch) failed: \(error)", logContext)
                execute(committer.onDiskApplyFailed(epoch, reason: error, now: now))
            } else {
                lastDiskApply = (epoch, tookNs, now)
                execute(committer.onDiskApplied(epoch, now: now))
            }
        case .operatorActivate:
            execute(committer.onOperatorActivate(now: now))
        case .operatorDiscard:
            execute(committer.onOperatorDiscard(now: now))
        case .terminate:
            Log.info("terminating on signal")
            protection?.stop(.shutdown)
            loop.stop()
        case .protectionFinished:
            if config.exitAfterProtection { loop.stop() }
        }
    }

    private func execute(_ directives: [BackupCommitter.Directive]) {
        for d in directives { execute(d) }
        setStatus("state", describe(committer.state))
        setStatus("committed", "\(committer.committedEpoch)")
        let (state, committed) = (committer.state, committer.committedEpoch)
        statsLock.withLock { backupMetrics.publish(state, committed: committed) }
    }

    private func execute(_ directive: BackupCommitter.Directive) {
        let now = clock.monotonicNs()
        switch directive {
        case .discardStaged:
            if let (_, gate) = pendingCommit {
                pendingCommit = nil
                gate.open(with: false)
            }
            if let commit = loggingCommit {
                loggingCommit = nil
                commit.done.open(with: false)  // its record is voided once logged (`.diskLogged`)
            }
        case .commit(let epoch):
            guard let (staged, gate) = pendingCommit, replica != nil else { return }
            pendingCommit = nil
            guard committer.replicatesDisks else { return commitMemory(epoch, staged, gate) }
            // I9: the epoch's disk operations are durable in the redo log before memory is
            // applied and acknowledged (`.diskLogged`); the reader waits until then.
            guard let disks, let staging = staged.disks else {
                gate.open(with: false)
                return execute(committer.onCommitFailed(epoch, reason: "checkpoint \(epoch) of a stream with disks has no disk staging; this is a bug in remusd", now: now))
            }
            loggingCommit = (epoch, staged, gate)
            let loop = self.loop
            let isCopy = staged.begin.kind == .precopy
            diskWorker.run {
                do {
                    // A pre-copy round carries the full copy, which no takeover can need: onto
                    // the images without the redo log (`BackupDisks.copy`).
                    if isCopy { try disks.copy(staging) } else { try disks.log(staging, epoch: epoch) }
                    loop.post(.diskLogged(epoch, error: nil))
                } catch {
                    loop.post(.diskLogged(epoch, error: "\(error)"))
                }
            }
        case .applyDisk(let epoch):
            guard let disks else { return execute(committer.onDiskApplyFailed(epoch, reason: "no disk directory", now: now)) }
            let (loop, clock, committed) = (self.loop, self.clock, replica?.committedFields)
            diskWorker.run {
                let started = clock.monotonicNs()
                InjectedFault.atDiskApply(disks, epoch: epoch, committed: committed)  // inert without REMUSD_INJECT_DIR
                do {
                    try disks.apply()
                    loop.post(.diskApplied(epoch, error: nil, tookNs: clock.monotonicNs() - started))
                } catch {
                    loop.post(.diskApplied(epoch, error: "\(error)", tookNs: clock.monotonicNs() - started))
                }
            }
        case .sendAck(let epoch):
            writer?.enqueue(.ack(Ack(epoch: epoch, backupMonotonicNs: now)))
        case .sendHeartbeat(let sequence):
            writer?.enqueue(.heartbeat(Heartbeat(sequence: sequence, senderMonotonicNs: now)))
        case .closeConnection:
            writer?.abandon()
            channel?.shutdown()
            channel = nil
            writer = nil
            generation += 1_000_000  // ignore the old reader's events
        case .fencePrimary:
            // Each run is numbered: once the committer gave up on a run (fence timeout) and
            // started the next, the old one's late report is not taken for the new one's.
            fenceRun += 1
            let run = fenceRun
            if case .fencing(let holding, let attempt, _) = committer.state {
                statsLock.withLock { fenceAttempt = (attempt, holding, now) }
            }
            statsLock.withLock { backupMetrics.fenceStarted() }
            if case .witness(let w) = config.fence {
                acquireWitness(w, run: run)
                return
            }
            guard case .command(let command) = config.fence else {
                loop.post(.fenced(run: run, true, "no fence needed"))
                return
            }
            let loop = self.loop
            let timeoutMs = config.fenceTimeoutMs
            startThread(name: "fence") {
                do {
                    // Its own process group, killed whole at the deadline: a hung fence is not a fence.
                    let outcome = try runShell(command, timeoutMs: timeoutMs)
                    let text = outcome.text.trimmingWhitespace()
                    if !text.isEmpty { Log.info("fence output: \(text)") }
                    loop.post(.fenced(run: run, outcome.succeeded, "'\(command)' \(outcome.summary)"))
                } catch {
                    loop.post(.fenced(run: run, false, "'\(command)' could not run: \(error)"))
                }
            }
        case .prepareActivation(let epoch):
            guard let target = replica?.target else { preconditionFailure("preparation without a replica") }
            // The replica is this thread's until it posts `.prepared`: the committer neither
            // commits to it nor lets a primary connect (which would replace it) meanwhile.
            let done = Gate<Bool>()
            preparing = done
            let (loop, clock, handOff) = (self.loop, self.clock, ReplicaHandOff(target))
            startThread(name: "prepare") {
                do {
                    try handOff.target.prepareActivation(clock: clock)
                    loop.post(.prepared(true, "checkpoint \(epoch) ready to run"))
                } catch {
                    loop.post(.prepared(false, "\(error)"))
                }
                done.open(with: true)
            }
            // Alongside the fence too: after the apply of the committed epoch (the worker keeps
            // order), make "applied" durable now, so the activation's own sync finds nothing to
            // write and the unpause does not wait for an fdatasync.
            if let disks, committer.replicatesDisks {
                diskWorker.run {
                    do { try disks.syncHeader() } catch {
                        Log.warning("syncing the redo log in \(disks.directory) ahead of the takeover failed: \(error); the activation syncs it again before the guest runs")
                    }
                }
            }
        case .activate(let epoch):
            activate(epoch: epoch, now: now)
        case .discardReplica:
            _ = preparing?.wait()  // a preparation in progress uses the replica: let it finish
            replica?.target.discard()
            replica = nil
            replicaSender = nil
            statsLock.withLock { replicaHost = nil }
            setStatus("serving", "nothing (no image held)")
            replicaLock.withLock { replicaForReaders = nil; feedForReaders = nil }
        case .report(let text):
            Log.info(text, logContext)
            setStatus("last event", text)
        }
    }

    /// Applies a verified checkpoint's memory to the replica and lets the reader go on; with
    /// `voidingDiskOnFailure`, a failure voids the disk record logged for it.
    private func commitMemory(_ epoch: Epoch, _ staged: StagedCheckpoint, _ gate: Gate<Bool>, voidingDiskOnFailure: Bool = false) {
        guard let replica else {
            gate.open(with: false)
            if voidingDiskOnFailure { voidLoggedDisk() }
            return
        }
        do {
            try staged.commit(to: replica.target)
        } catch {
            if voidingDiskOnFailure { voidLoggedDisk() }
            gate.open(with: false)
            return execute(committer.onCommitFailed(epoch, reason: "\(error)", now: clock.monotonicNs()))
        }
        gate.open(with: true)
        statsLock.withLock { backupMetrics.checkpointCommitted() }
        execute(committer.onCommitted(epoch, now: clock.monotonicNs()))
    }

    /// The redo log's last record belongs to a checkpoint that was not committed: void it (in
    /// order after whatever the worker does now) so that it is never applied.
    private func voidLoggedDisk() {
        guard let disks else { return }
        diskWorker.run {
            do { try disks.void() } catch {
                Log.error("voiding an uncommitted disk record in \(disks.directory) failed: \(error); nothing of it was applied — restart 'remusd receive': the next stream voids it and copies the images whole")
            }
        }
    }

    private func activate(epoch: Epoch, now: UInt64) {
        guard let replica, let replicaHeader else { preconditionFailure("activation without a replica") }
        let lostAt = committer.lossDetectedAt ?? now
        var preparedAt: UInt64?
        if case .ready(let at) = committer.preparation { preparedAt = at }
        do {
            let report = ActivationReport.before(
                epoch: epoch, lastHeardAt: committer.lastHeardAt, lossDetectedAt: lostAt,
                lostWhileStaging: committer.lostWhileStaging, fencedAt: committer.fencedAt ?? now,
                preparedAt: preparedAt, unpauseStartedAt: now,
                diskApply: lastDiskApply.flatMap { $0.epoch == epoch ? (tookNs: $0.tookNs, at: $0.at) : nil })
            // The images hold `epoch` (the committer activates only after its apply, and after the
            // fence): make "applied" durable before the guest writes to them, then hand them to
            // the replica — a guest prepared during the fence gets them before its first op.
            if let disks {
                if disks.images != nil {
                    try disks.syncHeader()
                    guard let attach = replica.attachDisks else {
                        throw ProtocolError("the \(replicaHeader.backend) backend cannot take over replicated disks yet; the images in \(disks.directory) hold checkpoint \(epoch)")
                    }
                    try attach(disks.handOver(), config.activationReport != nil)
                }
            }
            let activated = try replica.target.activate(clock: clock)
            let activatedAt = clock.monotonicNs()
            activationTiming = (lostAt, activatedAt)
            let phases = FailoverPhases(
                lastHeardAt: committer.lastHeardAt, lossDetectedAt: lostAt, fencedAt: committer.fencedAt,
                preparedAt: preparedAt, unpauseStartedAt: now, runningAt: activatedAt)
            statsLock.withLock { failoverPhases = phases }
            Log.info("failover: \(phases.render())", logContext)
            execute(committer.onActivated(now: activatedAt))
            statsLock.withLock { backupMetrics.activated(afterNs: activatedAt - min(lostAt, activatedAt)) }
            Log.info("ACTIVATED checkpoint \(epoch): detection-to-running \((activatedAt - lostAt) / 1_000_000) ms", logContext)
            if let path = config.activationReport {
                let verification = try replica.verifyActivation?(clock)
                try report.completed(activatedAt: activatedAt, verification: verification).write(to: path)
            }
            try continueAsPrimary(activated, header: replicaHeader)
        } catch {
            Log.error("activation of checkpoint \(epoch) failed: \(error); the replica is kept; fix the cause and run 'remusd failover --activate'")
            exitCode = 4
        }
    }

    /// After taking over: the guest runs here; protect it towards the next backup if asked.
    private func continueAsPrimary(_ activated: ActivatedGuest, header: StreamHeader) throws {
        let guest: any PrimaryGuest
        let nicOutput: (any OutputBuffer)?
        switch activated {
        case .inProcess(let runningGuest, let output):
            (guest, nicOutput) = (runningGuest, output)
        case .underHypervisor:
            if let next = config.reprotectTo {
                Log.warning("--reprotect-to is not available for \(header.backend) guests yet: the guest runs here unprotected; protect it with 'remusd protect \(header.guestName) \(next)'")
            }
            return
        }
        guard let output = plug ?? nicOutput else {
            if let next = config.reprotectTo {
                Log.warning("--reprotect-to is not available for a guest without a NIC: there is no output buffer to hold; the guest runs here unprotected; protect it with 'remusd protect \(header.guestName) \(next)'")
            }
            return
        }
        guard let next = config.reprotectTo else {
            // Nothing will acknowledge its output: let it out.
            if let plug { try plug.releaseAll() }
            Log.info("the guest runs here unprotected (no --reprotect-to)")
            return
        }
        let loop = self.loop
        var held: (EtcdWitness, WitnessConfiguration)?
        if case .witness(let wc) = config.fence {
            // Taken over by fencing: the key is ours, under a lease taken at the fence, which may
            // be near its end by now (activation and the next backup's start can take seconds on
            // a loaded host): acquire renews it, so protection starts with a whole lease. After a
            // switchover the old primary hands the key over; until it does (or its lease runs
            // out) keep asking.
            let w = try witnessClient(wc)
            let deadline = clock.monotonicNs() + UInt64(wc.ttlSeconds + 2) * 1_000_000_000
            var ours = false
            while !ours && clock.monotonicNs() < deadline {
                ours = (try? w.acquire(owner: EtcdWitness.ownerName(role: "backup"), ttlSeconds: wc.ttlSeconds)) ?? false
                if !ours { pauseBriefly(ms: 100) }
            }
            guard ours else { throw ProtocolError("the witness key \(wc.url) stays held by another host; not protecting onwards") }
            held = (w, wc)
        }
        let p = try PrimaryProtection(
            guest: guest, output: output, backup: next, transport: try ReplicationTransport(config.security, side: .client),
            settings: config.settings,
            maxCheckpointPages: 65536, clock: clock, witness: held, metrics: metrics,
            onFinished: { _ in loop.post(.protectionFinished) })
        statsLock.withLock { protection = p }
        Log.setRole("backup→primary")
        Log.info("protecting the guest towards \(next)")
        p.start()
    }

    // MARK: - Status

    /// What every state-change line carries: the committed epoch, the primary, the guest.
    private var logContext: Logger.Metadata {
        var context: Logger.Metadata = ["epoch": "\(committer.committedEpoch)"]
        if let peer = channel?.peer { context["peer"] = "\(peer)" }
        if let name = replicaHeader?.guestName { context["guest"] = "\(name)" }
        return context
    }

    private func setStatus(_ key: String, _ value: String) {
        statsLock.withLock {
            statusLines[key] = value
            if key == "accept" { backupMetrics.accepting(failing: !value.hasPrefix("ok")) }
        }
    }

    /// Brings the time-dependent metrics up to date before they are served.
    private func refreshMetrics() {
        let now = clock.monotonicNs()
        let protection = statsLock.withLock {
            backupMetrics.fence(runningForNs: fenceAttempt.map { now - min($0.startedAt, now) } ?? 0)
            return self.protection
        }
        protection?.refreshMetrics()
    }

    private func renderStatus() -> String {
        var lines = ["role: backup"]
        for key in ["listen", "channel", "accept", "state", "committed", "failover", "primary", "serving", "disks", "last event", "last refused"] {
            if key == "state", let f = fenceAttempt, statusLines[key]?.hasPrefix("FENCING") == true {
                // A fence command may hang: say how long this attempt has been running.
                let tenths = (clock.monotonicNs() - min(f.startedAt, clock.monotonicNs())) / 100_000_000
                lines.append("state: FENCING the primary (attempt \(f.number), running for \(tenths / 10).\(tenths % 10) s), holding checkpoint \(f.holding)")
                continue
            }
            if key == "failover", let phases = failoverPhases { lines.append("failover: \(phases.render())") }
            if let v = statusLines[key] { lines.append("\(key): \(v)") }
            if key == "last refused" && refusedConnections > 0 { lines.append("refused connections: \(refusedConnections)") }
        }
        if let protection {
            lines.append("--- taken-over guest, protected onwards ---")
            lines.append(protection.statusText())
        }
        return lines.joined(separator: "\n") + "\n"
    }

    private func describe(_ state: BackupCommitter.State) -> String {
        switch state {
        case .listening: return "LISTENING"
        case .receiving(let c, _): return c == 0 ? "SYNCHRONIZING" : "RECEIVING (committed \(c))"
        case .fencing(let c, let attempt, _): return "FENCING the primary (attempt \(attempt)), holding checkpoint \(c)"
        case .awaitingOperator(let c): return "PRIMARY LOST, waiting for 'remusd failover --activate' (holding checkpoint \(c))"
        case .activating(let c): return "ACTIVATING checkpoint \(c)"
        case .active(let c): return "ACTIVE (guest resumed from checkpoint \(c))"
        case .stopped(let why): return "STOPPED: \(why)"
        }
    }

    /// The witness as a fence: holding the key means the primary's lease ran out, so it stopped
    /// releasing output and paused its guest.
    private func acquireWitness(_ config: WitnessConfiguration, run: Int) {
        let loop = self.loop
        startThread(name: "witness-acquire") { [self] in
            do {
                let w = try witnessClient(config)
                if try w.acquire(owner: EtcdWitness.ownerName(role: "backup"), ttlSeconds: config.ttlSeconds) {
                    loop.post(.fenced(run: run, true, "this backup holds the witness key \(config.url)"))
                } else {
                    let holder = (try? w.holder()).flatMap { $0 } ?? "someone"
                    loop.post(.fenced(run: run, false, "the witness key is still held by \(holder): the primary may be alive and releasing output"))
                }
            } catch {
                loop.post(.fenced(run: run, false, "\(error)"))
            }
        }
    }

    private let witnessLock = MonitorLock()
    private var witness: EtcdWitness?

    private func witnessClient(_ config: WitnessConfiguration) throws -> EtcdWitness {
        try witnessLock.withLock {
            if let witness { return witness }
            let w = try config.makeWitness()
            witness = w
            return w
        }
    }

    private func describe(_ fence: FenceConfiguration) -> String {
        switch fence {
        case .command(let c): return "command '\(c)'"
        case .witness(let w): return "witness \(w.url)"
        case .operatorOnly: return "none; waits for the operator"
        case .unsafeNoFence: return "NONE (--unsafe-no-fence)"
        }
    }
}

/// A one-shot hand-over of a value between threads.
/// Lets through at most one liveness note per `everyNs`: the first at once, then the first after
/// each interval. One thread's (a connection's reader).
final class ActivityPacer {
    let everyNs: UInt64
    private var last: UInt64?

    init(everyNs: UInt64) { self.everyNs = everyNs }

    func due(at now: UInt64) -> Bool {
        if let last, now >= last, now - last < everyNs { return false }
        last = now
        return true
    }
}

package final class Gate<Value: Sendable>: @unchecked Sendable {  // value guarded by monitor
    private let monitor = MonitorLock()
    private var value: Value?
    package init() {}
    package func open(with v: Value) { monitor.withLock { value = v; monitor.broadcast() } }
    package func wait() -> Value {
        monitor.withLock {
            while value == nil { monitor.wait(untilMonotonic: nil) }
            return value!
        }
    }
}

/// Turns SIGINT and SIGTERM into a callback on a thread of its own.
package enum SignalWatcher {
    private static var terminationSignals: sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        return set
    }

    /// Blocks SIGINT and SIGTERM in the calling thread; call before any other thread starts, so
    /// they all inherit the mask and only the watcher's sigwait sees the signals.
    package static func blockTerminationSignals() {
        var set = terminationSignals
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGPIPE, SIG_IGN)
    }

    package static func start(_ body: @escaping @Sendable () -> Void) {
        start { (_: Int32) in body() }
    }

    /// As `start`, the callback told which signal came.
    package static func start(_ body: @escaping @Sendable (Int32) -> Void) {
        blockTerminationSignals()
        let captured = terminationSignals
        startThread(name: "signals") {
            var s = captured
            var sig: Int32 = 0
            while sigwait(&s, &sig) == 0 {
                body(sig)
            }
        }
    }
}

/// Where a failover's time went, from the backup's clock (monotonic ns): detection (last heard →
/// loss detected), the fence and the preparation (both from the loss, in parallel), and the
/// unpause (the guest let run).
struct FailoverPhases: Equatable, Sendable {
    var lastHeardAt: UInt64
    var lossDetectedAt: UInt64
    /// Nil when no fence ran (--unsafe-no-fence, or the operator confirmed).
    var fencedAt: UInt64?
    /// Nil when the replica was not prepared ahead (built at activation).
    var preparedAt: UInt64?
    var unpauseStartedAt: UInt64
    var runningAt: UInt64

    /// "detect 612 ms, fence 2900 ms, prepare 4400 ms (alongside the fence), unpause 3 ms; loss to running 4403 ms"
    func render() -> String {
        func ms(_ from: UInt64, _ to: UInt64) -> String { "\((to - min(from, to)) / 1_000_000) ms" }
        var parts = ["detect \(ms(lastHeardAt, lossDetectedAt))"]
        parts.append("fence " + (fencedAt.map { ms(lossDetectedAt, $0) } ?? "none"))
        parts.append("prepare " + (preparedAt.map { ms(lossDetectedAt, $0) + " (alongside the fence)" } ?? "none ahead (built at activation)"))
        parts.append("unpause \(ms(unpauseStartedAt, runningAt))")
        return parts.joined(separator: ", ") + "; loss to running \(ms(lossDetectedAt, runningAt))"
    }
}

/// Hands the replica to the prepare thread. `@unchecked Sendable`: that thread alone uses it
/// until it posts `.prepared`; the loop thread neither commits to it, replaces it nor discards
/// it meanwhile (the committer refuses a primary while preparing; a discard waits for it).
private final class ReplicaHandOff: @unchecked Sendable {
    let target: any ReplicaTarget
    init(_ target: any ReplicaTarget) { self.target = target }
}
