// libFuzzer harness for the stream codec: arbitrary bytes into StreamDecoder and CheckpointValidator,
// read as either direction, with CRCs enforced and (to reach the body parsers and the validator)
// ignored; plus the same bytes as a page delta. Built by Fuzz/run.sh together with the RemusCore
// stream sources into one module (so it sees internals) with -D REMUS_FUZZING.
//
// A finding is a crash: a trap in the codec, an out-of-bounds access (AddressSanitizer), a
// broken invariant checked below, a hang (libFuzzer -timeout) or an allocation beyond the limit
// (-malloc_limit_mb). Rejecting the input with a StreamDecodeError is the expected outcome.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzStreamInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    // Vary how the bytes arrive with the input itself, deterministically; tiny pieces only for
    // small inputs, where they cost little.
    let last = size > 0 ? Int(data[size - 1]) : 0
    let chunk = size <= 1024 ? 1 + last % 16 : 64 + last * 37 % 4099
    for direction in [CheckpointValidator.Direction.primaryToBackup, .backupToPrimary] {
        decode(input, direction: direction, verifyChecksums: true, chunk: chunk)
        decode(input, direction: direction, verifyChecksums: false, chunk: chunk)
    }
    applyAsDelta(input)
    return 0
}

private func check(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError("fuzz invariant broken: \(message())") }
}

private func decode(_ input: UnsafeRawBufferPointer, direction: CheckpointValidator.Direction, verifyChecksums: Bool, chunk: Int) {
    var decoder = StreamDecoder(initialCapacity: 0)
    decoder.verifiesChecksums = verifyChecksums
    var validator = CheckpointValidator(direction: direction)
    var position = 0
    var failed = false
    do throws(StreamDecodeError) {
        while position < input.count {
            let end = min(input.count, position + chunk)
            if position % 2 == 0 {
                position += decoder.append(UnsafeRawBufferPointer(rebasing: input[position..<end]))
            } else {
                let space = decoder.writableSpace()
                check(space.count > 0, "no writable space")
                let n = min(space.count, end - position)
                space.baseAddress?.copyMemory(from: input.baseAddress! + position, byteCount: n)
                decoder.commit(n)
                position += n
            }
            while let item = try decoder.next() {
                inspect(item, decoder: decoder)
                let event = try validator.validate(item)
                if case .checkpointComplete(let end) = event {
                    check(validator.openCheckpoint == nil, "checkpoint \(end.epoch) complete but still open")
                }
            }
            check(decoder.capacity <= StreamDecoder.maximumBufferBytes, "buffer grew to \(decoder.capacity)")
        }
        try decoder.finish()
    } catch {
        failed = true
        check(!error.description.isEmpty, "empty error description")
        check(error.offset <= UInt64(input.count), "error offset \(error.offset) beyond the input")
    }
    if failed && decoder.failure != nil {
        // Decoder errors are sticky (validator errors leave the decoder as it was).
        do throws(StreamDecodeError) {
            _ = try decoder.next()
            check(false, "decoder continued after an error")
        } catch {}
    }
}

/// Checks what the decoder promises about an item, and that small records survive a re-encode.
private func inspect(_ item: StreamItem, decoder: borrowing StreamDecoder) {
    guard case .record(let record) = item, let header = decoder.header else { return }
    switch record.content {
    case .pageBatch(let batch):
        check(batch.count >= 1 && batch.count <= StreamLimits.maxPagesPerBatch, "batch of \(batch.count)")
        var previous: PFN?
        for page in batch {
            check(page.pfn < 1 << 52, "PFN \(page.pfn)")
            if let previous { check(page.pfn > previous, "PFN order") }
            previous = page.pfn
            switch page.encoding {
            case .raw: check(page.data.count == Int(header.pageSize), "raw length")
            case .zero, .absent: check(page.data.isEmpty, "empty page with data")
            case .delta:
                check(page.data.count > 0 && page.data.count < Int(header.pageSize), "delta length")
                let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(header.pageSize), alignment: 8)
                defer { scratch.deallocate() }
                scratch.initializeMemory(as: UInt8.self, repeating: 0)
                do throws(PageDeltaError) { try PageDelta.apply(page.data, to: scratch) } catch {
                    check(false, "decoder accepted a delta that does not apply: \(error)")
                }
            }
        }
    case .skippedOptional, .opaquePayload:
        break
    case .diskWrite(let write):
        check(!write.data.isEmpty && write.data.count <= StreamLimits.maxDiskWriteBytes, "disk write of \(write.data.count) bytes")
        check(Int(record.header.bodyLength) >= 16 + write.data.count, "disk write data beyond its body")
        reencode(.diskWrite(write.copy()), header: header)
    default:
        guard let value = record.content.ownedRecord else { return }
        reencode(value, header: header)
    }
}

/// A decoded small record encodes again and decodes to the same value.
private func reencode(_ value: StreamRecord, header: StreamHeader) {
    var encoder = StreamEncoder(pageSize: Int(header.pageSize), features: header.features)
    var bytes: [UInt8] = []
    try! StreamEncoder.appendHeader(StreamHeader(features: header.features, pageSize: header.pageSize, backend: header.backend, role: header.role, guestUUID: header.guestUUID, guestName: header.guestName, senderVersion: header.senderVersion), into: &bytes)
    do throws(StreamEncodeError) { try encoder.append(value, into: &bytes) } catch {
        check(false, "a decoded \(value.type.wireName) cannot be encoded again: \(error)")
    }
    var again = StreamDecoder(initialCapacity: 0)
    _ = bytes.withUnsafeBytes { again.append($0) }
    do throws(StreamDecodeError) {
        _ = try again.next()
        guard case .record(let r)? = try again.next() else { return check(false, "re-encoded record missing") }
        check(r.content.ownedRecord == value, "re-encoded \(value.type.wireName) decodes differently")
    } catch {
        check(false, "re-encoded \(value.type.wireName) rejected: \(error)")
    }
}

/// The input as a delta for a 4 KiB page: applying either fails cleanly or matches a plain loop.
private func applyAsDelta(_ input: UnsafeRawBufferPointer) {
    let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
    defer { page.deallocate() }
    page.initializeMemory(as: UInt8.self, repeating: 0x33)
    var valid = true
    do throws(PageDeltaError) { try PageDelta.validate(input, pageSize: 4096) } catch { valid = false }
    do throws(PageDeltaError) {
        try PageDelta.apply(input, to: page)
        check(valid, "apply accepted what validate rejected")
    } catch {
        check(!valid, "apply rejected what validate accepted")
        check(page.allSatisfy { $0 == 0x33 }, "a rejected delta modified the page")
    }
}
