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
