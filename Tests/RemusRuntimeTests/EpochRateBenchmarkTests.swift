import RemusCore
@testable import RemusRuntime
import Testing

@Suite("The epoch-rate benchmark's pipeline")
struct EpochRateBenchmarkTests {
    @Test("Every checkpoint of every round is shipped, committed on the backup and acknowledged, and each side's CPU is counted")
    func roundsCoverThePipeline() throws {
        let rounds = try EpochRateBenchmark.run(dirtyPages: 300, checkpoints: 10, rounds: 2, memoryBytes: 64 << 20)
        #expect(rounds.count == 2)
        for round in rounds {
            #expect(round.checkpoints == 10)
            // The guest is stepped until at least 300 pages are dirty before each checkpoint.
            #expect(round.pages >= 10 * 300)
            // Pages went over the wire: at least the raw ones' bytes.
            #expect(round.wireBytes > 10 * 300 * 1024)
            #expect(round.wallNs > 0)
            for (part, ns) in [("capture", round.captureNs), ("seal", round.sealNs), ("write", round.writeNs),
                               ("decode, verify, stage", round.stageNs), ("commit", round.commitNs), ("step", round.stepNs)] {
                #expect(ns > 0, "\(part) took no CPU")
            }
        }
    }

    @Test("More dirty pages than the guest's working set holds: a clear error after the stepping limit, not a hang")
    func unreachableDirtyCountFails() throws {
        // A 64 MiB guest's working set is 5 % of its 16 384 pages.
        let error = #expect(throws: ProtocolError.self) {
            try EpochRateBenchmark.run(dirtyPages: 5000, checkpoints: 10, rounds: 1, memoryBytes: 64 << 20, stepLimitNs: 200_000_000)
        }
        #expect(error?.description.contains("lower --dirty-pages") == true, "\(String(describing: error))")
    }
}

@Suite("The library-stream benchmark's pipeline")
struct LibraryStreamBenchmarkTests {
    @Test("Every byte the primary ships comes out of the backup's restore pipe, in order, and each thread's CPU is counted")
    func bytesArriveWhole() throws {
        // 9 MiB + 3 bytes: two whole 4 MiB pieces and a short one, then the 1 MiB checkpoint.
        let samples = try LibraryStreamBenchmark.run(bytes: (9 << 20) + 3, samples: 2, verify: true)
        #expect(samples.count == 2)
        for sample in samples {
            #expect(sample.bytes == (10 << 20) + 3)
            #expect(sample.wallNs > 0)
            for (part, ns) in [("writer", sample.writerNs), ("socket reads", sample.readNs), ("stage", sample.stageNs),
                               ("commit", sample.commitNs), ("feed", sample.feedNs), ("drain", sample.drainNs)] {
                #expect(ns > 0, "\(part) took no CPU")
            }
        }
    }
}
