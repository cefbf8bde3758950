import RemusCore
@testable import RemusSim
import Testing

@Suite("SimConfig and register encodings")
struct ConfigTests {
    @Test func defaultsAreTheDocumentedOnes() throws {
        let c = SimConfig()
        #expect(c.memoryBytes == 1 << 30)
        #expect(c.pageSize == 4096)
        #expect(c.vcpus == 2)
        #expect(c.workingSetFraction == 0.05)
        #expect(c.storeRatio == 0.75)
        #expect(c.dirtyRateLimit == 0)
        #expect(c.opRateLimit == 1_000_000)
        try c.validate()
    }

    @Test func domainConfigRoundTripsExactly() throws {
        var c = smallConfig(seed: 0xDEAD_BEEF_CAFE_F00D, vcpus: 3)
        c.workingSetFraction = 0.1 + 0.2  // not exactly representable: must survive the text form
        c.hotProbability = 1.0 / 3.0
        c.storeRatio = 0.6
        c.dirtyRateLimit = 12345
        c.opRateLimit = 777
        c.balloonPeriod = 0
        let encoded = c.encode()
        #expect(encoded.format == .simulated)
        #expect(try SimConfig(encoded) == c)
    }

    @Test(arguments: [
        ("wrong first line", "remus-sim-config 2\nvcpus=2\n"),
        ("empty", ""),
        ("no equals sign", "remus-sim-config 1\nvcpus 2\n"),
        ("unknown key", "remus-sim-config 1\ncolour=blue\n"),
        ("missing keys", "remus-sim-config 1\nvcpus=2\n"),
    ])
    func garbageIsRejected(_ why: String, _ text: String) {
        let config = DomainConfig(format: .simulated, bytes: Array(text.utf8))
        #expect(throws: SimError.self, "\(why)") { try SimConfig(config) }
    }

    @Test func badValuesAreRejectedWithTheKeyNamed() throws {
        let good = String(decoding: smallConfig().encode().bytes, as: UTF8.self)
        let cases: [(String, String)] = [
            ("page-size=4096", "page-size=1000"),
            ("vcpus=2", "vcpus=0"),
            ("vcpus=2", "vcpus=two"),
            ("store-ratio=0.75", "store-ratio=1.5"),
            ("working-set-fraction=0.25", "working-set-fraction=nan"),
            ("memory-bytes=16777216", "memory-bytes=16777217"),
            ("seed=7", "seed=7\nseed=8"),
        ]
        for (from, to) in cases {
            #expect(good.contains(from))
            let text = good.replacingFirst(from, with: to)
            let config = DomainConfig(format: .simulated, bytes: Array(text.utf8))
            #expect(throws: SimError.self, "\(to)") { try SimConfig(config) }
        }
        #expect(throws: SimError.self) { try SimConfig(DomainConfig(format: .libxlJSON, bytes: Array(good.utf8))) }
        #expect(throws: SimError.self) { try SimConfig(DomainConfig(format: .simulated, bytes: [0xFF, 0xFE, 0x00])) }
    }

    @Test func aRegionTooSmallIsRejected() {
        var c = SimConfig(memoryBytes: 64 << 10, vcpus: 8)
        c.workingSetFraction = 0.05
        #expect(throws: SimError.self) { try c.validate() }
    }

    @Test func registersRoundTripThroughVCPUState() throws {
        var r = SimRegisters(seed: 99, vcpu: 1)
        r.opCount = 123_456_789
        r.accumulator = 0xFEDC_BA98_7654_3210
        r.storeCount = 77
        r.nicSeq = 4
        r.balloonPFN = 0x1234
        r.balloonTransitions = 9
        let state = r.encode(vcpu: 1)
        #expect(state.format == 1)
        #expect(state.bytes.count == 56)
        #expect(state.bytes[0..<8].elementsEqual([0x15, 0xCD, 0x5B, 0x07, 0, 0, 0, 0]))  // little-endian op count
        #expect(try SimRegisters(state) == r)
        #expect(throws: SimError.self) { try SimRegisters(VCPUState(vcpu: 1, format: 2, bytes: state.bytes)) }
        #expect(throws: SimError.self) { try SimRegisters(VCPUState(vcpu: 1, format: 1, bytes: Array(state.bytes.dropLast()))) }
    }
}

extension String {
    func replacingFirst(_ target: String, with replacement: String) -> String {
        guard let range = firstRange(of: target) else { return self }
        return String(self[..<range.lowerBound]) + replacement + String(self[range.upperBound...])
    }
}
