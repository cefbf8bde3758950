import Testing
@testable import RemusCore

/// Records of one checkpoint written by hand (not through endCheckpoint), so tests can forge END.
private func checkpoint(_ e: inout StreamEncoder, _ out: inout [UInt8], epoch: Epoch, kind: CheckpointKind = .checkpoint, pages: [PFN] = [1, 2]) throws {
    try e.append(.checkpointBegin(CheckpointBegin(epoch: epoch, kind: kind)), into: &out)
    if kind != .precopy {
        try e.append(.clock(sampleClock), into: &out)
        try e.append(.memoryLayout(sampleLayout), into: &out)
        try e.append(.vcpuState(VCPUState(vcpu: 0, format: 1, bytes: [1, 2])), into: &out)
    }
    if !pages.isEmpty {
        e.appendPageBatch(makeArena(pages.map { ($0, .raw, patternPage(UInt8($0))) }), entries: 0..<pages.count, into: &out)
    }
    try e.endCheckpoint(into: &out)
}

@Suite("Checkpoint validator")
struct CheckpointValidatorTests {
    @Test func sampleStreamValidatesWithEveryEventInOrder() {
        let result = validate(sampleStream())
        #expect(result.error == nil, "\(String(describing: result.error))")
        #expect(result.events == [
            "open", "config", "begin(0)", "pages(2)", "complete(0)", "heartbeat",
            "begin(1)", "clock", "layout", "vcpu(0)", "vcpu(1)", "device(nic0)", "heartbeat", "pages(3)", "pages(2)", "opaque(0)", "complete(1)",
            "begin(2)", "clock", "layout", "complete(2)", "end",
        ])
    }

    @Test func contentOutsideACheckpointIsOutOfOrder() throws {
        let bytes = try buildStream { e, out in try e.append(.clock(sampleClock), into: &out) }
        let result = validate(bytes)
        #expect(result.error?.kind == .outOfOrder)
        #expect(result.error?.recordType == .clock)
        #expect(result.error?.description.contains("CLOCK outside a checkpoint") == true)
    }

    @Test func endWithoutBeginAndBeginInsideACheckpointAreOutOfOrder() throws {
        let end = try buildStream { e, out in try e.append(.checkpointEnd(CheckpointEnd(epoch: 1, recordCount: 0, digest: 0, payloadBytes: 0)), into: &out) }
        #expect(validate(end).error?.kind == .outOfOrder)
        let nested = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 2, kind: .checkpoint)), into: &out)
        }
        #expect(validate(nested).error?.kind == .outOfOrder)
    }

    @Test func domainConfigOnlyOnceBeforeTheFirstCheckpoint() throws {
        let config = DomainConfig(format: .simulated, bytes: [1])
        let late = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 1)
            try e.append(.domainConfig(config), into: &out)
        }
        #expect(validate(late).error?.kind == .outOfOrder)
        let twice = try buildStream { e, out in
            try e.append(.domainConfig(config), into: &out)
            try e.append(.domainConfig(config), into: &out)
        }
        #expect(validate(twice).error?.kind == .duplicateRecord)
    }

    @Test func checkpointEpochsAreAboveZeroAndIncreaseByOne() throws {
        let skipped = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 1)
            try checkpoint(&e, &out, epoch: 3)
        }
        let error = validate(skipped).error
        #expect(error?.kind == .epochMismatch)
        #expect(error?.description.contains("expected epoch 2") == true)
        let zero = try buildStream { e, out in try checkpoint(&e, &out, epoch: 0) }
        #expect(validate(zero).error?.kind == .epochMismatch)
        // A primary that reconnects continues its epochs: the first checkpoint may be above 1.
        let resumed = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 0, kind: .precopy)
            try checkpoint(&e, &out, epoch: 4117)
            try checkpoint(&e, &out, epoch: 4118)
        }
        #expect(validate(resumed).error == nil)
        let resumedGap = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 4117)
            try checkpoint(&e, &out, epoch: 4117)
        }
        #expect(validate(resumedGap).error?.kind == .epochMismatch)
        let precopyEpoch = try buildStream { e, out in try checkpoint(&e, &out, epoch: 4, kind: .precopy) }
        #expect(validate(precopyEpoch).error?.kind == .epochMismatch)
        let precopyLate = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 1)
            try checkpoint(&e, &out, epoch: 0, kind: .precopy)
        }
        #expect(validate(precopyLate).error?.kind == .outOfOrder)
    }

    @Test func endOfAnotherEpochIsAnEpochMismatch() throws {
        let bytes = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
            try e.append(.memoryLayout(sampleLayout), into: &out)
            try e.append(.checkpointEnd(CheckpointEnd(epoch: 2, recordCount: 2, digest: e.digest.value, payloadBytes: e.digest.payloadBytes)), into: &out)
        }
        #expect(validate(bytes).error?.kind == .epochMismatch)
    }

    @Test func missingRecordIsACountMismatch() throws {
        let bytes = try buildStream { e, out in try checkpoint(&e, &out, epoch: 1, pages: [1, 2]) }
        let (header, records) = splitRecords(bytes)
        // BEGIN, CLOCK, LAYOUT, VCPU, PAGE_BATCH, END: drop the page batch.
        #expect(records.count == 6)
        let dropped = header + records[0..<4].joined() + records[5]
        let error = validate(dropped).error
        #expect(error?.kind == .countMismatch)
        #expect(error?.recordType == .checkpointEnd)
        #expect(error?.description.contains("END counts 4 records, 3 were received") == true, "\(String(describing: error))")
        #expect(error?.description.hasSuffix("checkpoint discarded, last committed checkpoint kept") == true)
    }

    @Test func reorderedRecordsWithTheSameCountAreADigestMismatch() throws {
        let bytes = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
            try e.append(.memoryLayout(sampleLayout), into: &out)
            try e.append(.deviceState(DeviceState(name: "a", bytes: [1])), into: &out)
            try e.append(.deviceState(DeviceState(name: "b", bytes: [2])), into: &out)
            try e.endCheckpoint(into: &out)
        }
        let (header, r) = splitRecords(bytes)
        let swapped = header + r[0] + r[1] + r[2] + r[4] + r[3] + r[5]
        #expect(validate(bytes).error == nil)
        #expect(validate(swapped).error?.kind == .digestMismatch)
        // A changed device blob of the same size, re-checksummed: only the digest can tell.
        let forged = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
            try e.append(.memoryLayout(sampleLayout), into: &out)
            try e.append(.deviceState(DeviceState(name: "a", bytes: [9])), into: &out)
            try e.append(.deviceState(DeviceState(name: "b", bytes: [2])), into: &out)
        }
        #expect(validate(forged + r[5]).error?.kind == .digestMismatch)
    }

    @Test func duplicatedRecordsAreRejected() throws {
        let bytes = try buildStream { e, out in try checkpoint(&e, &out, epoch: 1, pages: [1, 2]) }
        let (header, r) = splitRecords(bytes)
        // A repeated page batch would carry the same pages twice (I3).
        let batchTwice = header + r[0..<5].joined() + r[4] + r[5]
        let batchError = validate(batchTwice).error
        #expect(batchError?.kind == .outOfOrder)
        #expect(batchError?.description.contains("PFNs strictly increase across a checkpoint") == true)
        #expect(validate(header + r[0...1].joined() + r[1] + r[2...].joined()).error?.kind == .duplicateRecord, "CLOCK twice")
        #expect(validate(header + r[0...2].joined() + r[2] + r[3...].joined()).error?.kind == .duplicateRecord, "MEMORY_LAYOUT twice")
        #expect(validate(header + r[0...3].joined() + r[3] + r[4...].joined()).error?.kind == .duplicateRecord, "VCPU_STATE twice")
        #expect(validate(header + r.joined() + r[5]).error?.kind == .outOfOrder, "END twice")
        let device = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.deviceState(DeviceState(name: "nic0", bytes: [1])), into: &out)
            try e.append(.deviceState(DeviceState(name: "nic0", bytes: [2])), into: &out)
        }
        #expect(validate(device).error?.kind == .duplicateRecord)
    }

    @Test func checkpointWithoutClockOrLayoutIsIncomplete() throws {
        let bytes = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
            try e.endCheckpoint(into: &out)
        }
        let error = validate(bytes).error
        #expect(error?.kind == .missingRecord)
        #expect(error?.description.contains("no MEMORY_LAYOUT") == true)
    }

    @Test func precopyRoundsCarryPagesOnly() throws {
        let bytes = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
        }
        #expect(validate(bytes).error?.kind == .outOfOrder)
        let ok = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 0, kind: .precopy)
            try checkpoint(&e, &out, epoch: 0, kind: .precopy, pages: [5])
            try checkpoint(&e, &out, epoch: 1)
        }
        #expect(validate(ok).error == nil)
    }

    @Test func heartbeatsAnywhereAreNotCounted() throws {
        let bytes = try buildStream { e, out in
            try e.append(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 1)), into: &out)
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.heartbeat(Heartbeat(sequence: 2, senderMonotonicNs: 2)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
            try e.append(.heartbeat(Heartbeat(sequence: 3, senderMonotonicNs: 3)), into: &out)
            try e.append(.memoryLayout(sampleLayout), into: &out)
            let end = try e.endCheckpoint(into: &out)
            #expect(end.recordCount == 2)
        }
        #expect(validate(bytes).error == nil)
    }

    @Test func unknownOptionalRecordsInsideACheckpointAreSkippedButCounted() throws {
        let bytes = try buildStream { e, out in
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 1, kind: .checkpoint)), into: &out)
            try e.append(.clock(sampleClock), into: &out)
            try [UInt8](repeating: 3, count: 5).withUnsafeBytes { try e.appendRecord(typeCode: 0x4000, flags: 0, body: $0, into: &out) }
            try e.append(.memoryLayout(sampleLayout), into: &out)
            let end = try e.endCheckpoint(into: &out)
            #expect(end.recordCount == 3, "the writer counts what it wrote")
        }
        let result = validate(bytes)
        #expect(result.error == nil)
        #expect(result.events == ["open", "begin(1)", "clock", "skipped", "layout", "complete(1)"])
        // Dropping the unknown record in transit is caught like any other loss.
        let (header, r) = splitRecords(bytes)
        #expect(validate(header + r[0...1].joined() + r[3...].joined()).error?.kind == .countMismatch)
        // The same record marked mandatory is refused outright.
        let mandatory = try buildStream { e, out in
            try [UInt8](repeating: 3, count: 5).withUnsafeBytes { try e.appendRecord(typeCode: 0x4000, flags: 1, body: $0, into: &out) }
        }
        #expect(validate(mandatory).error?.kind == .unknownMandatoryRecord)
    }

    @Test func nothingFollowsStreamEndOrTheFinalCheckpoint() throws {
        let afterEnd = try buildStream { e, out in
            try e.append(.streamEnd(StreamEnd(reason: .plannedStop, lastEpoch: 0, message: "")), into: &out)
            try e.append(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 1)), into: &out)
        }
        #expect(validate(afterEnd).error?.kind == .outOfOrder)
        let afterFinal = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 1, kind: .final)
            try checkpoint(&e, &out, epoch: 2)
        }
        #expect(validate(afterFinal).error?.kind == .outOfOrder)
    }

    @Test func streamEndInsideACheckpointAbandonsIt() throws {
        var validator = CheckpointValidator(direction: .primaryToBackup)
        var decoder = StreamDecoder()
        let bytes = try buildStream { e, out in
            try checkpoint(&e, &out, epoch: 1)
            try e.append(.checkpointBegin(CheckpointBegin(epoch: 2, kind: .checkpoint)), into: &out)
            try e.append(.streamEnd(StreamEnd(reason: .error, lastEpoch: 1, message: "capture failed")), into: &out)
        }
        var last: String?
        try bytes.withUnsafeBytes { raw in
            try decoder.feed(raw) { item in last = eventName(try validator.validate(item)) }
        }
        #expect(last == "end")
        #expect(validator.openCheckpoint == nil && validator.lastCompletedEpoch == 1 && validator.hasEnded)
    }

    @Test func backupDirectionAcceptsAcksThatNeverDecrease() throws {
        let good = try buildStream(streamHeader(role: .backup)) { e, out in
            try e.append(.ack(Ack(epoch: 1, backupMonotonicNs: 5)), into: &out)
            try e.append(.heartbeat(Heartbeat(sequence: 1, senderMonotonicNs: 6)), into: &out)
            try e.append(.ack(Ack(epoch: 1, backupMonotonicNs: 7)), into: &out)
            try e.append(.ack(Ack(epoch: 2, backupMonotonicNs: 8)), into: &out)
            try e.append(.error(PeerError(code: 3, message: "disk full")), into: &out)
        }
        let result = validate(good, direction: .backupToPrimary)
        #expect(result.error == nil)
        #expect(result.events == ["open", "ack(1)", "heartbeat", "ack(1)", "ack(2)", "error"])
        let decreasing = try buildStream(streamHeader(role: .backup)) { e, out in
            try e.append(.ack(Ack(epoch: 2, backupMonotonicNs: 5)), into: &out)
            try e.append(.ack(Ack(epoch: 1, backupMonotonicNs: 6)), into: &out)
        }
        #expect(validate(decreasing, direction: .backupToPrimary).error?.kind == .outOfOrder)
        let checkpointFromBackup = try buildStream(streamHeader(role: .backup)) { e, out in try checkpoint(&e, &out, epoch: 1) }
        #expect(validate(checkpointFromBackup, direction: .backupToPrimary).error?.kind == .outOfOrder)
        let ackFromPrimary = try buildStream { e, out in try e.append(.ack(Ack(epoch: 1, backupMonotonicNs: 1)), into: &out) }
        #expect(validate(ackFromPrimary).error?.kind == .outOfOrder)
    }

    @Test func headerRoleAndFeaturesAreChecked() {
        let fromBackup = buildStream(streamHeader(role: .backup)) { _, _ in }
        #expect(validate(fromBackup).error?.kind == .badHeader)
        let unoffered = buildStream(streamHeader(features: StreamFeatures(rawValue: 1 << 9))) { _, _ in }
        let error = validate(unoffered).error
        #expect(error?.kind == .badHeader)
        #expect(error?.description.hasPrefix("stream header at stream offset 0: the primary enabled features") == true)
        // The backup's own offer may contain bits the primary does not know.
        let backupOffer = buildStream(streamHeader(role: .backup, features: StreamFeatures(rawValue: 0xFF))) { _, _ in }
        #expect(validate(backupOffer, direction: .backupToPrimary).error == nil)
    }

    @Test func opaqueChunksAreNumberedWithoutGapsAcrossCheckpoints() throws {
        func stream(_ sequences: [UInt32]) throws -> [UInt8] {
            try buildStream { e, out in
                for (i, s) in sequences.enumerated() {
                    try e.append(.checkpointBegin(CheckpointBegin(epoch: 0, kind: .precopy)), into: &out)
                    try e.append(.opaquePayload(OpaquePayload(stream: .libxc, sequence: s, bytes: [UInt8(i)])), into: &out)
                    try e.endCheckpoint(into: &out)
                }
            }
        }
        let good = try stream([0, 1, 2])
        let gap = try stream([0, 2])
        let late = try stream([1])
        #expect(validate(good).error == nil)
        #expect(validate(gap).error?.kind == .outOfOrder)
        #expect(validate(late).error?.kind == .outOfOrder)
    }
}
