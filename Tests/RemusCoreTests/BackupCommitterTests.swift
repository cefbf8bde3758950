import RemusCore
import Testing

private let ms: UInt64 = 1_000_000
private let settings = ProtectionSettings(intervalNs: 100 * ms, heartbeatNs: 50 * ms, timeoutNs: 300 * ms)

private func receiving(_ policy: BackupCommitter.FencePolicy = .fence, committed: Epoch = 0) -> BackupCommitter {
    var c = BackupCommitter(settings: settings, fencePolicy: policy)
    _ = c.onPrimaryConnected(now: 0)
    if committed > 0 {
        for epoch in 1...committed { commit(&c, epoch, now: 0) }
    }
    return c
}

private func commit(_ c: inout BackupCommitter, _ epoch: Epoch, kind: CheckpointKind = .checkpoint, now: UInt64) {
    _ = c.onCheckpointBegan(CheckpointBegin(epoch: epoch, kind: kind), now: now)
    let d = c.onCheckpointComplete(CheckpointEnd(epoch: epoch, recordCount: 0, digest: 0, payloadBytes: 0), now: now)
    #expect(d == [.commit(epoch)])
    _ = c.onCommitted(epoch, now: now)
}

@Suite("Backup committer")
struct BackupCommitterTests {
    @Test func ackComesOnlyAfterTheCommit() {
        var c = receiving()
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 1, kind: .checkpoint), now: 1)
        let complete = c.onCheckpointComplete(CheckpointEnd(epoch: 1, recordCount: 3, digest: 7, payloadBytes: 9), now: 2)
        #expect(complete == [.commit(1)], "no ACK before the replica applied the checkpoint (I1)")
        #expect(c.onCommitted(1, now: 3) == [.sendAck(1)])
        #expect(c.committedEpoch == 1)
    }

    @Test func precopyRoundsAreAppliedButNeverAcknowledged() {
        var c = receiving()
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 0, kind: .precopy), now: 1)
        #expect(c.onCheckpointComplete(CheckpointEnd(epoch: 0, recordCount: 1, digest: 0, payloadBytes: 0), now: 1) == [.commit(0)])
        #expect(c.onCommitted(0, now: 1) == [])
        #expect(c.committedEpoch == 0)
    }

    @Test func endWithoutMatchingBeginDiscardsInsteadOfCommitting() {
        var c = receiving()
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 4, kind: .checkpoint), now: 1)
        #expect(c.onCheckpointComplete(CheckpointEnd(epoch: 5, recordCount: 0, digest: 0, payloadBytes: 0), now: 1) == [.discardStaged])
    }

    @Test func connectionLostMidCheckpointKeepsThePreviousOneAndFences() {
        var c = receiving(committed: 2)
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 3, kind: .checkpoint), now: 10)
        let d = c.onConnectionLost(reason: "EOF", now: 11)
        #expect(d.first == .discardStaged, "the half-received checkpoint 3 is dropped (I2)")
        #expect(d.contains(.fencePrimary))
        #expect(d.contains(.prepareActivation(2)), "the replica is prepared alongside the fence")
        #expect(!d.contains { if case .activate = $0 { true } else { false } }, "no activation before fencing (I7)")
        #expect(c.state == .fencing(committed: 2, attempt: 1, fence: .running(deadline: 11 + settings.fenceTimeoutNs)))
        #expect(c.onPrepared(success: true, detail: "ready", now: 11) == [])
        #expect(c.onFenced(success: true, detail: "primary process gone", now: 12).contains(.activate(2)))
        _ = c.onActivated(now: 13)
        #expect(c.state == .active(from: 2))
    }

    @Test func aPrimaryThatComesBackBeforeItIsFencedIsTakenBack() {
        var c = receiving(committed: 3)
        // Silence: heartbeat ticks go out until the timeout, then fencing starts.
        #expect(runTicks(&c, from: 0, through: 400 * ms).contains(.fencePrimary))
        #expect(!c.acceptsPrimary, "not while the fence is running: it may be switching the primary off")
        _ = c.onFenced(success: false, detail: "primary still up", now: 401 * ms)
        #expect(!c.acceptsPrimary, "not while the replica is being prepared: the new stream would replace it under the preparation")
        _ = c.onPrepared(success: true, detail: "ready", now: 401 * ms)
        #expect(c.acceptsPrimary)
        let d = c.onPrimaryConnected(now: 402 * ms)
        #expect(c.preparation == .none, "the prepared replica is replaced with the new stream's")
        #expect(d.contains { if case .report(let r) = $0 { r.contains("fencing called off") } else { false } })
        #expect(c.state == .receiving(committed: 0, connected: true))
        #expect(c.onFenced(success: true, detail: "late", now: 403 * ms) == [], "a late fence result changes nothing")
    }

    @Test func failedFenceIsRetriedAndNeverActivates() {
        var c = receiving(committed: 1)
        _ = c.onConnectionLost(reason: "EOF", now: 0)
        let d = c.onFenced(success: false, detail: "fence agent exit 1", now: 1)
        #expect(!d.contains { if case .activate = $0 { true } else { false } })
        #expect(c.onTick(now: 1 + 50 * ms) == [.fencePrimary])
        #expect(c.state == .fencing(committed: 1, attempt: 2, fence: .running(deadline: 1 + 50 * ms + settings.fenceTimeoutNs)))
    }

    @Test func silenceIsDetectedByTimeoutWithoutAClosedConnection() {
        var c = receiving(committed: 1)
        _ = runTicks(&c, from: 0, through: 99 * ms)
        _ = c.onPeerActivity(now: 100 * ms)
        #expect(!runTicks(&c, from: 100 * ms, through: 399 * ms).contains(.fencePrimary))
        let d = runTicks(&c, from: 399 * ms, through: 400 * ms)
        #expect(d.contains(.closeConnection))
        #expect(d.contains(.fencePrimary))
        #expect(c.lossDetectedAt == 400 * ms)
    }

    @Test("Silence while this backup commits is not the primary's: the reader waits for the commit, so the timeout counts from its end")
    func silenceDuringACommitDoesNotCount() {
        var c = receiving(committed: 1)
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 2, kind: .checkpoint), now: 10 * ms)
        #expect(c.onCheckpointComplete(CheckpointEnd(epoch: 2, recordCount: 0, digest: 0, payloadBytes: 0), now: 10 * ms) == [.commit(2)])
        #expect(c.committing)
        // A disk commit's fdatasync takes a second on a loaded host: heartbeats go on, no loss.
        let during = runTicks(&c, from: 10 * ms, through: 1_010 * ms)
        #expect(!during.contains(.fencePrimary) && !during.contains(.closeConnection))
        #expect(during.contains { if case .sendHeartbeat = $0 { true } else { false } })
        #expect(c.onCommitted(2, now: 1_010 * ms) == [.sendAck(2)])
        #expect(!c.committing)
        // From the commit's end the primary has the whole timeout again, and no more.
        #expect(!runTicks(&c, from: 1_010 * ms, through: 1_309 * ms).contains(.fencePrimary))
        #expect(runTicks(&c, from: 1_309 * ms, through: 1_310 * ms).contains(.fencePrimary))
    }

    @Test func withoutFenceTheBackupWaitsForTheOperator() {
        var c = receiving(.operatorOnly, committed: 3)
        let d = c.onConnectionLost(reason: "EOF", now: 0)
        #expect(!d.contains { if case .activate = $0 { true } else { false } })
        #expect(c.state == .awaitingOperator(committed: 3))
        #expect(c.onOperatorActivate(now: 1).contains(.activate(3)))
    }

    @Test func unsafeNoFenceActivatesAtOnce() {
        var c = receiving(.unsafeNoFence, committed: 3)
        #expect(c.onConnectionLost(reason: "EOF", now: 0).contains(.activate(3)))
    }

    @Test func primaryLostBeforeAnyCheckpointHasNothingToActivate() {
        var c = receiving()
        let d = c.onConnectionLost(reason: "EOF", now: 0)
        #expect(d.contains(.discardReplica))
        guard case .stopped = c.state else { Issue.record("state \(c.state)"); return }
    }

    @Test func plannedStopDiscardsAndNeverActivates() {
        var c = receiving(committed: 5)
        let d = c.onStreamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 5, message: ""), now: 0)
        #expect(d.contains(.discardReplica))
        #expect(!d.contains { if case .activate = $0 { true } else { false } })
        // Silence afterwards must not wake it up.
        #expect(c.onTick(now: 10_000 * ms) == [])
        #expect(c.onConnectionLost(reason: "EOF", now: 10_000 * ms) == [])
    }

    @Test func switchoverActivatesTheLastCommittedCheckpoint() {
        var c = receiving(committed: 7)
        #expect(c.onStreamEnd(StreamEnd(reason: .switchover, lastEpoch: 7, message: ""), now: 0).contains(.activate(7)))
    }

    @Test func finalCheckpointIsAcknowledgedThenActivated() {
        var c = receiving(committed: 1)
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 2, kind: .final), now: 0)
        _ = c.onCheckpointComplete(CheckpointEnd(epoch: 2, recordCount: 0, digest: 0, payloadBytes: 0), now: 0)
        let d = c.onCommitted(2, now: 0)
        #expect(d.first == .sendAck(2))
        #expect(d.contains(.activate(2)))
    }

    @Test func rejectedStreamKeepsTheImageAndWaitsForAReconnect() {
        var c = receiving(committed: 4)
        let d = c.onStreamRejected("PAGE_BATCH at offset 9000: CRC32C mismatch", now: 10 * ms)
        #expect(d.contains(.closeConnection))
        #expect(!d.contains(.fencePrimary))
        #expect(c.committedEpoch == 4)
        #expect(c.acceptsPrimary)
        // No reconnection within the timeout: the primary counts as lost.
        #expect(c.onTick(now: 310 * ms).contains(.fencePrimary))
    }

    @Test func heartbeatsFlowBackWhileConnected() {
        var c = receiving()
        #expect(c.onTick(now: 50 * ms).contains(.sendHeartbeat(1)))
    }

    @Test func activeBackupRefusesANewPrimary() {
        var c = receiving(.unsafeNoFence, committed: 1)
        _ = c.onConnectionLost(reason: "EOF", now: 0)
        _ = c.onActivated(now: 1)
        #expect(!c.acceptsPrimary)
    }
}

/// A committer serving a stream that replicates disks, with `committed` checkpoints committed and
/// their disk writes applied.
private func receivingDisks(_ policy: BackupCommitter.FencePolicy = .fence, committed: Epoch = 0) -> BackupCommitter {
    var c = BackupCommitter(settings: settings, fencePolicy: policy)
    _ = c.onPrimaryConnected(now: 0, disks: true)
    if committed > 0 {
        for epoch in 1...committed {
            commit(&c, epoch, now: 0)
            _ = c.onDiskApplied(epoch, now: 0)
        }
    }
    return c
}

private func activates(_ d: [BackupCommitter.Directive]) -> Bool {
    d.contains { if case .activate = $0 { true } else { false } }
}

@Suite("Backup committer: disk epoch N with memory N (I9)")
struct BackupCommitterDiskTests {
    @Test func diskWritesReachTheImagesOnlyAfterMemoryIsCommittedAndAfterTheAck() {
        var c = receivingDisks()
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 1, kind: .checkpoint), now: 1)
        // Complete and verified: the shell logs disk 1 durably and applies memory 1; nothing reaches
        // the images yet, and no ACK before both are held.
        #expect(c.onCheckpointComplete(CheckpointEnd(epoch: 1, recordCount: 5, digest: 1, payloadBytes: 9), now: 2) == [.commit(1)])
        #expect(c.onCommitted(1, now: 3) == [.sendAck(1), .applyDisk(1)], "ACK after the log and memory; apply after memory 1 is complete")
        #expect(c.diskApplyPending == 1)
        #expect(c.onDiskApplied(1, now: 4) == [])
        #expect(c.diskApplyPending == nil)
        #expect(c.committedEpoch == 1)
    }

    @Test func aStreamWithoutDisksNeverAppliesDisks() {
        var c = receiving()
        commit(&c, 1, now: 0)
        #expect(c.diskApplyPending == nil)
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 2, kind: .checkpoint), now: 1)
        _ = c.onCheckpointComplete(CheckpointEnd(epoch: 2, recordCount: 0, digest: 0, payloadBytes: 0), now: 1)
        #expect(c.onCommitted(2, now: 1) == [.sendAck(2)])
    }

    @Test func precopyDiskContentsAreAppliedAndNeverAcknowledged() {
        var c = receivingDisks()
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 0, kind: .precopy), now: 1)
        #expect(c.onCheckpointComplete(CheckpointEnd(epoch: 0, recordCount: 2, digest: 0, payloadBytes: 0), now: 1) == [.commit(0)])
        #expect(c.onCommitted(0, now: 2) == [.applyDisk(0)])
        #expect(c.onDiskApplied(0, now: 3) == [])
        #expect(c.committedEpoch == 0)
    }

    @Test func theDisksOfAnUncommittedCheckpointAreDiscardedAtFailover() {
        var c = receivingDisks(committed: 2)
        // Checkpoint 3's disk writes arrive, its memory does not: the primary dies in between.
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 3, kind: .checkpoint), now: 10)
        let lost = c.onConnectionLost(reason: "EOF", now: 11)
        #expect(lost.first == .discardStaged, "disk 3 is dropped with memory 3")
        #expect(!lost.contains(.applyDisk(3)))
        _ = c.onPrepared(success: true, detail: "ready", now: 11)
        let fenced = c.onFenced(success: true, detail: "gone", now: 12)
        #expect(fenced.contains(.activate(2)) && !fenced.contains { if case .applyDisk = $0 { true } else { false } })
    }

    @Test func aTakeoverWaitsUntilTheCommittedEpochsDiskWritesAreApplied() {
        // The primary dies after ACK 3 while disk 3 is still being applied: finish, then resume.
        var c = receivingDisks(committed: 2)
        commit(&c, 3, now: 5)
        #expect(c.diskApplyPending == 3)
        #expect(runTicks(&c, from: 5, through: 400 * ms).contains(.fencePrimary), "silence still counts while applying")
        let fenced = c.onFenced(success: true, detail: "gone", now: 401 * ms)
        #expect(!activates(fenced), "not on disks older than memory 3")
        #expect(c.state == .activating(committed: 3))
        #expect(c.onDiskApplied(2, now: 402 * ms) == [], "an older epoch's report changes nothing")
        #expect(c.onPrepared(success: true, detail: "ready", now: 402 * ms) == [], "prepared, but the disks are not at 3 yet")
        #expect(c.onDiskApplied(3, now: 403 * ms) == [.activate(3)])
        _ = c.onActivated(now: 404 * ms)
        #expect(c.state == .active(from: 3))
    }

    @Test func aFinalCheckpointActivatesOnlyAfterItsDiskWritesAreApplied() {
        var c = receivingDisks(committed: 4)
        _ = c.onCheckpointBegan(CheckpointBegin(epoch: 5, kind: .final), now: 1)
        _ = c.onCheckpointComplete(CheckpointEnd(epoch: 5, recordCount: 3, digest: 0, payloadBytes: 0), now: 1)
        let committed = c.onCommitted(5, now: 2)
        #expect(Array(committed.prefix(2)) == [.sendAck(5), .applyDisk(5)])
        #expect(!activates(committed))
        #expect(c.onDiskApplied(5, now: 3) == [.activate(5)])
    }

    @Test func withoutFencingTheTakeoverStillWaitsForTheDisks() {
        var c = receivingDisks(.unsafeNoFence, committed: 1)
        commit(&c, 2, now: 1)
        #expect(!activates(c.onConnectionLost(reason: "EOF", now: 2)))
        #expect(c.onDiskApplied(2, now: 3) == [.activate(2)])
    }

    @Test func aFailedApplyWhileThePrimaryLivesDropsItsConnectionAndKeepsTheCheckpoint() {
        var c = receivingDisks(committed: 1)
        commit(&c, 2, now: 1)
        let d = c.onDiskApplyFailed(2, reason: "pwrite: No space left on device", now: 2)
        #expect(Array(d.prefix(2)) == [.discardStaged, .closeConnection])
        #expect(d.contains { if case .report(let r) = $0 { r.contains("checkpoint 2") && r.contains("No space left") } else { false } })
        #expect(c.state == .receiving(committed: 2, connected: false))
        #expect(c.diskApplyPending == 2, "the redo log still holds the writes")
    }

    @Test func aFailedApplyAtTakeoverWaitsForTheOperatorWhoseActivateAppliesTheLogAgain() {
        var c = receivingDisks(committed: 1)
        commit(&c, 2, now: 1)
        _ = c.onConnectionLost(reason: "EOF", now: 2)
        _ = c.onPrepared(success: true, detail: "ready", now: 2)
        #expect(!activates(c.onFenced(success: true, detail: "gone", now: 3)))
        let failed = c.onDiskApplyFailed(2, reason: "EIO", now: 4)
        #expect(!activates(failed))
        #expect(c.state == .awaitingOperator(committed: 2))
        #expect(failed.contains { if case .report(let r) = $0 { r.contains("NOT taking over") && r.contains("failover --activate") } else { false } })
        let retried = c.onOperatorActivate(now: 5)
        #expect(retried.contains(.applyDisk(2)) && !activates(retried))
        #expect(c.onDiskApplied(2, now: 6) == [.activate(2)])
    }
}

@Suite("Backup committer: failover prepared in parallel with the fence (I7)")
struct BackupCommitterPreparationTests {
    @Test("The replica is prepared from the moment the loss is detected, in the same step as the fence; the guest runs only after the fence succeeded")
    func preparationStartsWithTheFenceAndActivationWaitsForTheFence() {
        var c = receiving(committed: 4)
        let lost = runTicks(&c, from: 0, through: 300 * ms)
        #expect(lost.contains(.fencePrimary) && lost.contains(.prepareActivation(4)))
        #expect(c.preparation == .running && c.lossDetectedAt == 300 * ms)
        // Ready long before the fence answers: still nothing runs.
        #expect(c.onPrepared(success: true, detail: "ready", now: 310 * ms) == [])
        #expect(c.preparation == .ready(at: 310 * ms))
        #expect(c.state == .fencing(committed: 4, attempt: 1, fence: .running(deadline: 300 * ms + settings.fenceTimeoutNs)))
        let fenced = c.onFenced(success: true, detail: "powered off", now: 2_900 * ms)
        #expect(fenced.filter { if case .activate = $0 { true } else { false } } == [.activate(4)])
        #expect(c.fencedAt == 2_900 * ms)
        _ = c.onActivated(now: 2_901 * ms)
        #expect(c.state == .active(from: 4))
    }

    @Test("A fence that fails, and one that never answers, are retried for as long as it takes; the prepared replica never runs meanwhile")
    func failingAndSlowFencesNeverLetThePreparedGuestRun() {
        var c = receiving(committed: 2)
        var seen = runTicks(&c, from: 0, through: 300 * ms)
        seen += c.onPrepared(success: true, detail: "ready", now: 301 * ms)
        // Ten failed attempts, each retried a heartbeat later.
        var now = 301 * ms
        for _ in 0..<10 {
            seen += c.onFenced(success: false, detail: "fence agent exit 1", now: now)
            seen += runTicks(&c, from: now, through: now + settings.heartbeatNs)
            now += settings.heartbeatNs
        }
        // Then attempts that hang: each is given up at the fence timeout and started again.
        seen += runTicks(&c, from: now, through: now + 5 * settings.fenceTimeoutNs)
        #expect(!activates(seen), "the guest ran before any fence succeeded (I7)")
        #expect(seen.filter { $0 == .fencePrimary }.count >= 15)
        #expect(seen.filter { if case .prepareActivation = $0 { true } else { false } }.count == 1, "prepared once, not per attempt")
        guard case .fencing(_, let attempt, _) = c.state else { Issue.record("state \(c.state)"); return }
        #expect(attempt >= 15)
        #expect(c.onPrepared(success: true, detail: "late duplicate", now: now) == [], "a second report changes nothing")
        let end = now + 5 * settings.fenceTimeoutNs
        #expect(c.onFenced(success: true, detail: "finally", now: end) == [.report("primary fenced (finally); activating checkpoint 2"), .activate(2)])
    }

    @Test("A fence that succeeds before the replica is ready waits for it; then the guest runs")
    func activationWaitsForThePreparation() {
        var c = receiving(committed: 3)
        _ = c.onConnectionLost(reason: "EOF", now: 10)
        #expect(!activates(c.onFenced(success: true, detail: "gone", now: 20)))
        #expect(c.state == .activating(committed: 3))
        #expect(c.onPrepared(success: true, detail: "ready", now: 30) == [.activate(3)])
    }

    @Test("A preparation that failed is reported; the activation builds the replica the ordinary way")
    func failedPreparationFallsBackToAFullActivation() {
        var c = receiving(committed: 3)
        _ = c.onConnectionLost(reason: "EOF", now: 10)
        let failed = c.onPrepared(success: false, detail: "libxl said no", now: 15)
        #expect(failed.contains { if case .report(let r) = $0 { r.contains("libxl said no") } else { false } } && !activates(failed))
        #expect(c.preparation == .failed("libxl said no"))
        #expect(activates(c.onFenced(success: true, detail: "gone", now: 20)))
    }

    @Test("Without a fence to wait for, and for a human, nothing is prepared ahead")
    func otherPoliciesDoNotPrepare() {
        var unsafe = receiving(.unsafeNoFence, committed: 2)
        let d = unsafe.onConnectionLost(reason: "EOF", now: 0)
        #expect(d.contains(.activate(2)) && !d.contains(.prepareActivation(2)))
        var human = receiving(.operatorOnly, committed: 2)
        #expect(!human.onConnectionLost(reason: "EOF", now: 0).contains(.prepareActivation(2)))
        #expect(human.onOperatorActivate(now: 1).contains(.activate(2)))
    }

    @Test("The operator's activation during a preparation waits for it too")
    func operatorActivationWaitsForThePreparation() {
        var c = receiving(committed: 5)
        _ = c.onConnectionLost(reason: "EOF", now: 0)
        #expect(!activates(c.onOperatorActivate(now: 1)))
        #expect(c.onPrepared(success: true, detail: "ready", now: 2) == [.activate(5)])
    }
}
