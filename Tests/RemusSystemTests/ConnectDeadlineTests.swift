import Glibc
import RemusSystem
import RemusTestSupport
import Testing



@Suite("Outbound connects have a deadline", .serialized)
struct ConnectDeadlineTests {
    @Test("A host that drops SYNs costs the deadline, and the error says 'no answer within N ms'",
          .enabled(if: BlackHoleNamespace.missing == nil, Comment(rawValue: BlackHoleNamespace.missing ?? "")))
    func blackHoledConnectFailsWithinItsDeadline() throws {
        let (namespace, why) = BlackHoleNamespace.make()
        // The prerequisites are there (the trait checked them): a namespace that still cannot be
        // made is a failure, not a skip.
        guard let namespace else {
            Issue.record("could not set up the black-holed namespace: \(why)")
            return
        }
        let result: (error: SystemError?, elapsedMs: UInt64) = try namespace.run {
            let start = monotonicNanoseconds()
            do throws(SystemError) {
                _ = try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: 9), deadline: .after(milliseconds: 300))
                return (nil, (monotonicNanoseconds() - start) / 1_000_000)
            } catch {
                return (error, (monotonicNanoseconds() - start) / 1_000_000)
            }
        }
        let error = try #require(result.error, "a connect to a port whose SYNs are dropped cannot succeed")
        #expect(error.isTimeout, "\(error)")
        #expect(error.description.contains("no answer within 300 ms"), "\(error)")
        #expect(result.elapsedMs >= 290 && result.elapsedMs < 1500, "took \(result.elapsedMs) ms for a 300 ms deadline")
    }

    @Test("A refused port fails at once with ECONNREFUSED, not a timeout")
    func refusedConnectFailsFast() throws {
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let port = listener.port
        listener.shutdown()
        _ = consume listener
        let start = monotonicNanoseconds()
        let error = try #require(throws: SystemError.self) {
            try TCPChannel.connect(to: Endpoint(host: "127.0.0.1", port: port), deadline: .after(milliseconds: 5000))
        }
        #expect(error.errno == .connectionRefused, "\(error)")
        #expect((monotonicNanoseconds() - start) / 1_000_000 < 1000)
    }

    @Test("A connect that is answered hands back a working blocking channel")
    func answeredConnectCarriesBytes() throws {
        let listener = try TCPListener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let client = try TCPChannel.connect(to: listener.endpoint, deadline: .after(milliseconds: 5000))
        let server = try listener.accept()
        try client.write(Array("ping".utf8))
        var buffer = [UInt8](repeating: 0, count: 4)
        var got = 0
        while got < 4 {
            let n = try buffer.withUnsafeMutableBytes { try server.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[got...])) }
            #expect(n > 0)
            if n == 0 { break }
            got += n
        }
        #expect(String(decoding: buffer, as: UTF8.self) == "ping")
    }
}
