import Foundation
import Logging
import RemusCore
import RemusDrill  // MetricsScrape, PrometheusText, freePorts
@testable import RemusRuntime
import RemusTestSupport
import Testing

private func temporaryDirectory() throws -> String {
    let path = NSTemporaryDirectory() + "remusd-metrics-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

@Suite("Metrics over HTTP, from real daemons", .serialized)
struct MetricsProcessTests {
    /// A backup and a primary on loopback, both serving metrics; stopped and removed at the end.
    final class Pair {
        let directory: String
        let backup: ChildProcess
        let primary: ChildProcess
        let primaryMetrics: Endpoint
        let backupMetrics: Endpoint

        init() throws {
            directory = try temporaryDirectory()
            let ports = try freePorts(3)
            primaryMetrics = Endpoint(host: "127.0.0.1", port: ports[1])
            backupMetrics = Endpoint(host: "127.0.0.1", port: ports[2])
            let env = ["REMUSD_RUN_DIR": directory]
            backup = try ChildProcess(
                arguments: [remusdBinary, "receive", "--listen", "127.0.0.1:\(ports[0])", "--unsafe-no-fence",
                            "--metrics-listen", "\(backupMetrics)", "--status-socket", directory + "/backup.sock"] + tlsArguments("backup"),
                outputFile: directory + "/backup.log", environment: env)
            try waitForFile(directory + "/backup.sock", what: "the backup to listen", deadlineMs: 30_000)
            primary = try ChildProcess(
                arguments: [remusdBinary, "protect", "metrics-guest", "127.0.0.1:\(ports[0])", "--backend", "sim",
                            "--sim-memory", "32", "--interval", "20", "--metrics-listen", "\(primaryMetrics)",
                            "--status-socket", directory + "/primary.sock"] + tlsArguments("primary"),
                outputFile: directory + "/primary.log", environment: env)
        }

        func log(_ name: String) -> String { (try? String(contentsOfFile: "\(directory)/\(name).log", encoding: .utf8)) ?? "" }

        /// Waits until the primary's metrics say it protects the guest.
        func awaitProtected() -> Bool {
            eventually(deadline: .after(milliseconds: 20_000), pollEveryMs: 20) {
                (try? MetricsScrape.fetch(primaryMetrics))?.state("remusd_primary_state") == "protected"
            }
        }

        deinit {
            for p in [primary, backup] { p.signal(SIGKILL); p.wait() }
            try? FileManager.default.removeItem(atPath: directory)
        }
    }

    @Test func aProtectingPrimaryAndItsBackupServeTheirNumbers() throws {
        let pair = try Pair()
        #expect(pair.awaitProtected(), "never protected; primary log:\n\(pair.log("primary"))\nbackup log:\n\(pair.log("backup"))")

        let first = try MetricsScrape.fetch(pair.primaryMetrics)
        #expect(first.skippedLines == 0)
        let checkpointsBefore = try #require(first.integer("remusd_primary_checkpoints_total"))
        // The counter moves on: a second fetch, a few checkpoints later, sees more.
        var second = first
        #expect(eventually(deadline: .after(milliseconds: 10_000), pollEveryMs: 20) {
            second = (try? MetricsScrape.fetch(pair.primaryMetrics)) ?? second
            // Captures run up to 8 ahead of the ACKs: wait for the first ACK too, not only for captures.
            return (second.integer("remusd_primary_checkpoints_total") ?? 0) >= checkpointsBefore + 3
                && (second.integer("remusd_primary_epoch_acknowledged") ?? 0) > 0
        })
        #expect(second.state("remusd_primary_state") == "protected")
        #expect(second.value("remusd_primary_state", ["state": "degraded"]) == 0)
        let captured = try #require(second.integer("remusd_primary_epoch_captured"))
        let acknowledged = try #require(second.integer("remusd_primary_epoch_acknowledged"))
        #expect(acknowledged > 0 && acknowledged <= captured)
        // Pause: a histogram with one sample per checkpoint, and the recent percentiles, all under a second.
        let pauses = try #require(second.integer("remusd_primary_pause_seconds_count"))
        #expect(pauses >= checkpointsBefore + 3)
        #expect(second.value("remusd_primary_pause_seconds_bucket", ["le": "+Inf"]) == Double(pauses))
        let p99 = try #require(second.value("remusd_primary_pause_recent_seconds", ["quantile": "0.99"]))
        #expect(p99 > 0 && p99 < 1)
        // Every 20 ms: the rate is tens per second (loose bounds: the machine may be busy).
        let rate = try #require(second.value("remusd_primary_checkpoint_rate_per_second"))
        #expect(rate > 2 && rate < 200, "rate \(rate)")
        #expect((second.integer("remusd_primary_shipped_bytes_total") ?? 0) > 0)
        #expect((second.integer("remusd_primary_checkpoint_pages_count") ?? 0) > 0)
        #expect((second.integer("remusd_primary_checkpoint_bytes_count") ?? 0) > 0)
        #expect(second.value("remusd_primary_bytes_in_flight") != nil)
        #expect(second.value("remusd_primary_output_held_packets") != nil)
        #expect(second.value("remusd_primary_output_held_bytes") != nil)
        let ackAge = try #require(second.value("remusd_primary_last_ack_age_seconds"))
        #expect(ackAge >= 0 && ackAge < 5)

        let backup = try MetricsScrape.fetch(pair.backupMetrics)
        #expect(backup.state("remusd_backup_state") == "receiving")
        #expect((backup.integer("remusd_backup_epoch_committed") ?? 0) > 0)
        #expect((backup.integer("remusd_backup_checkpoints_committed_total") ?? 0) > 0)
        #expect(backup.value("remusd_backup_primary_connected") == 1)
    }

    @Test func theEndpointSpeaksHTTPAndKeepsItsBounds() throws {
        let pair = try Pair()
        #expect(pair.awaitProtected(), "never protected; primary log:\n\(pair.log("primary"))")
        let endpoint = pair.primaryMetrics

        let ok = try MetricsScrape.get(endpoint, request: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(ok.status == 200)
        #expect(ok.headers.lowercased().contains("content-type: text/plain; version=0.0.4"))
        #expect(try MetricsScrape.get(endpoint, request: "GET / HTTP/1.1\r\n\r\n").status == 404)
        #expect(try MetricsScrape.get(endpoint, request: "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").status == 404)
        #expect(try MetricsScrape.get(endpoint, request: "hello\r\n\r\n").status == 400)

        // A client that connects and sends nothing holds one slot, not the server: the next
        // request is answered while the silent one is still waiting for its 408 (a server that
        // served one client at a time would answer it only after the silent one timed out).
        let silent = try TCPChannel.connect(to: endpoint, deadline: .after(milliseconds: 2000))
        defer { silent.shutdown() }
        #expect(try MetricsScrape.get(endpoint, request: "GET /metrics HTTP/1.0\r\n\r\n", timeoutMs: 10_000).status == 200)
        #expect(try !silent.waitReadable(until: .after(milliseconds: 0)), "the silent client was answered before the next one")

        // A 1 MiB request is refused (431) once the server has read its bound, never buffered whole.
        let huge = "GET /metrics HTTP/1.1\r\nX-Padding: " + String(repeating: "a", count: 1 << 20) + "\r\n\r\n"
        let refused = try MetricsScrape.get(endpoint, request: huge, timeoutMs: 5000)
        #expect(refused.status == 431)
        // And the server still serves.
        #expect(try MetricsScrape.fetch(endpoint).state("remusd_primary_state") == "protected")
    }

    @Test func curlReadsTheMetrics() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/curl") else {
            print("skipped: /usr/bin/curl is not installed (apt-get install curl)")
            return
        }
        let pair = try Pair()
        #expect(pair.awaitProtected(), "never protected; primary log:\n\(pair.log("primary"))")
        let (status, output) = try runTestShell("/usr/bin/curl -sS --max-time 5 -i http://\(pair.primaryMetrics)/metrics", timeoutMs: 10_000)
        #expect(status == 0, "\(output)")
        #expect(output.hasPrefix("HTTP/1.1 200 OK"))
        let body = output.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
        let snapshot = PrometheusText.parse(body)
        #expect(snapshot.skippedLines == 0)
        #expect(snapshot.state("remusd_primary_state") == "protected")
        #expect((snapshot.integer("remusd_primary_checkpoints_total") ?? 0) > 0)
        let (missing, notFound) = try runTestShell("/usr/bin/curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://\(pair.primaryMetrics)/other", timeoutMs: 10_000)
        #expect(missing == 0 && notFound == "404")
    }
}

@Suite struct MetricsUnitTests {
    @Test func theStatisticsBecomeMetricsInTheDaemonsOwnRegistry() {
        let ours = DaemonMetrics(), theirs = DaemonMetrics()
        var metrics = PrimaryMetrics(factory: ours.factory)
        var stats = PrimaryStatistics()
        stats.state = .protecting(switchoverPending: false, outputHeldSince: nil)
        for (i, pause) in [400_000, 900_000, 1_500_000].enumerated() {
            stats.pauses.add(UInt64(pause))
            stats.pauseSplit.add(PauseSplit(suspendNs: 20_000, captureNs: UInt64(pause) - 50_000, resumeNs: 30_000))
            stats.dirtyPages.add(UInt64(100 * (i + 1)))
            stats.checkpointTimes.add(UInt64(i) * 100_000_000)
            stats.captured = Epoch(i + 1)
            metrics.publish(stats)
        }
        stats.shippedBytes = 5000
        metrics.publish(stats)
        stats.shippedBytes = 7000
        stats.lastAckAt = 1_000_000_000
        metrics.refresh(stats, now: 1_500_000_000)

        let snapshot = PrometheusText.parse(String(decoding: ours.exposition(), as: UTF8.self))
        #expect(snapshot.skippedLines == 0)
        #expect(snapshot.state("remusd_primary_state") == "protected")
        #expect(snapshot.integer("remusd_primary_checkpoints_total") == 3)
        #expect(snapshot.integer("remusd_primary_pause_seconds_count") == 3)  // one sample per checkpoint, not per publish
        #expect(snapshot.value("remusd_primary_pause_seconds_bucket", ["le": "0.001"]) == 2)
        #expect(snapshot.integer("remusd_primary_shipped_bytes_total") == 7000)
        #expect(snapshot.integer("remusd_primary_epoch_captured") == 3)
        #expect(snapshot.value("remusd_primary_pause_recent_seconds", ["quantile": "0.5"]) == 0.0009)
        // The pause's parts: a histogram each (one sample per checkpoint) and the recent p50 / p99.
        #expect(snapshot.value("remusd_primary_pause_part_seconds_count", ["part": "capture"]) == 3)
        #expect(snapshot.value("remusd_primary_pause_part_seconds_bucket", ["part": "capture", "le": "0.001"]) == 2)
        #expect(snapshot.value("remusd_primary_pause_part_recent_seconds", ["part": "capture", "quantile": "0.5"]) == 0.00085)
        #expect(snapshot.value("remusd_primary_pause_part_recent_seconds", ["part": "resume", "quantile": "0.99"]) == 0.00003)
        #expect(stats.render().contains("pause split: suspend p50 20 / p99 20 µs, capture p50 850 / p99 1450 µs, resume p50 30 / p99 30 µs"), "\(stats.render())")
        #expect(snapshot.value("remusd_primary_checkpoint_rate_per_second") == 10)
        #expect(snapshot.value("remusd_primary_last_ack_age_seconds") == 0.5)
        // Another daemon's registry saw none of it: no global bootstrap in library code.
        #expect(theirs.exposition().isEmpty)
    }

    @Test func theBackupStateIsAnEnumGauge() {
        let registry = DaemonMetrics()
        var metrics = BackupMetrics(factory: registry.factory)
        metrics.publish(.receiving(committed: 0, connected: true), committed: 0)
        var snapshot = PrometheusText.parse(String(decoding: registry.exposition(), as: UTF8.self))
        #expect(snapshot.state("remusd_backup_state") == "synchronizing")
        metrics.publish(.receiving(committed: 7, connected: false), committed: 7)
        metrics.checkpointCommitted()
        snapshot = PrometheusText.parse(String(decoding: registry.exposition(), as: UTF8.self))
        #expect(snapshot.state("remusd_backup_state") == "receiving")
        #expect(snapshot.samples.filter { $0.name == "remusd_backup_state" && $0.value == 1 }.count == 1)
        #expect(snapshot.value("remusd_backup_state", ["state": "synchronizing"]) == 0)
        #expect(snapshot.integer("remusd_backup_epoch_committed") == 7)
        #expect(snapshot.value("remusd_backup_primary_connected") == 0)
        #expect(snapshot.integer("remusd_backup_checkpoints_committed_total") == 1)
    }

    @Test func thePrometheusReaderTakesWhatItCanAndSkipsTheRest() {
        let text = """
            # HELP remusd_x a help line
            # TYPE remusd_x gauge
            remusd_x 1.5
            remusd_state{state="protected"} 1
            remusd_state{state="degraded",other="a \\"quoted\\" \\\\ value"} 0
            remusd_hist_bucket{le="+Inf"} 3 1700000000000
            remusd_inf +Inf
            remusd_nan NaN
              remusd_indented 2\r
            not a sample line
            remusd_broken{state="x" 1
            remusd_noval
            remusd_letters abc
            9starts_with_digit 1

            """
        let snapshot = PrometheusText.parse(text)
        #expect(snapshot.value("remusd_x") == 1.5)
        #expect(snapshot.state("remusd_state") == "protected")
        #expect(snapshot.value("remusd_state", ["other": "a \"quoted\" \\ value"]) == 0)
        #expect(snapshot.value("remusd_hist_bucket", ["le": "+Inf"]) == 3)  // a timestamp is allowed
        #expect(snapshot.value("remusd_inf") == .infinity)
        #expect(snapshot.value("remusd_nan")?.isNaN == true)
        #expect(snapshot.value("remusd_indented") == 2)
        #expect(snapshot.skippedLines == 5)
        #expect(snapshot.integer("remusd_x") == 1)
        #expect(snapshot.integer("remusd_inf") == nil)
        #expect(snapshot.value("remusd_missing") == nil)
    }

    @Test func thePrometheusReaderIsBounded() {
        let line = "remusd_many{i=\"x\"} 1\n"
        let many = PrometheusText.parse(String(repeating: line, count: PrometheusText.maxSamples + 10))
        #expect(many.samples.count == PrometheusText.maxSamples)
        let long = PrometheusText.parse("remusd_long{v=\"" + String(repeating: "a", count: PrometheusText.maxLineBytes) + "\"} 1\nremusd_short 2\n")
        #expect(long.samples.map(\.name) == ["remusd_short"])
        #expect(long.skippedLines == 1)
    }

    @Test func requestsAreReadUpToTheirBlankLine() {
        #expect(MetricsServer.headerEnd(Array("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".utf8)) != nil)
        #expect(MetricsServer.headerEnd(Array("GET /metrics HTTP/1.1\n\n".utf8)) != nil)
        #expect(MetricsServer.headerEnd(Array("GET /metrics HTTP/1.1\r\nHost: a\r\n".utf8)) == nil)
        #expect(MetricsServer.parseRequestLine(Array("GET /metrics?x=1 HTTP/1.1\r\n".utf8)[...]) == .request(method: "GET", target: "/metrics?x=1"))
        #expect(MetricsServer.parseRequestLine(Array("GET /metrics\r\n".utf8)[...]) == .malformed)
        #expect(MetricsServer.parseRequestLine(Array("GET metrics HTTP/1.1\r\n".utf8)[...]) == .malformed)
        #expect(MetricsServer.parseRequestLine(Array("GET /metrics SPDY/3\r\n".utf8)[...]) == .malformed)
    }
}

@Suite struct LogLineTests {
    private let stamp = LogLine.Timestamp(seconds: 1_795_303_800, milliseconds: 123)  // 2026-11-21T23:30:00.123Z

    @Test func aPlainLineHasTimeRoleLevelMessageAndSortedMetadata() {
        let line = LogLine.format(level: .warning, message: "backup lost", metadata: ["peer": "10.0.0.2:7788", "epoch": "412"],
                                  role: "remusd[primary]", timestamp: stamp, journald: false)
        #expect(line == "2026-11-21T23:30:00.123Z remusd[primary] WARNING backup lost epoch=412 peer=10.0.0.2:7788")
        let info = LogLine.format(level: .info, message: "protecting", metadata: [:], role: "remusd[backup]", timestamp: stamp, journald: false)
        #expect(info == "2026-11-21T23:30:00.123Z remusd[backup] protecting")
        let padded = LogLine.format(level: .error, message: "m", metadata: [:], role: "remusd", timestamp: LogLine.Timestamp(seconds: 0, milliseconds: 7), journald: false)
        #expect(padded == "1970-01-01T00:00:00.007Z remusd ERROR m")
    }

    @Test func journaldLinesCarryTheSyslogPriorityAndNoTime() {
        let cases: [(Logger.Level, String)] = [
            (.debug, "<7>remusd[primary] DEBUG m"), (.info, "<6>remusd[primary] m"), (.notice, "<5>remusd[primary] NOTICE m"),
            (.warning, "<4>remusd[primary] WARNING m"), (.error, "<3>remusd[primary] ERROR m"), (.critical, "<2>remusd[primary] CRITICAL m"),
        ]
        for (level, expected) in cases {
            #expect(LogLine.format(level: level, message: "m", metadata: [:], role: "remusd[primary]", timestamp: nil, journald: true) == expected)
        }
        let withMetadata = LogLine.format(level: .warning, message: "DEGRADED", metadata: ["epoch": "9"], role: "remusd[primary]", timestamp: nil, journald: true)
        #expect(withMetadata == "<4>remusd[primary] WARNING DEGRADED epoch=9")
    }

    @Test func metadataValuesThatWouldSplitAreQuoted() {
        let line = LogLine.format(level: .info, message: "m", metadata: ["guest": "my guest", "empty": "", "q": "a\"b", "list": .array(["1", "2"])],
                                  role: "r", timestamp: nil, journald: false)
        #expect(line == #"r m empty="" guest="my guest" list=[1,2] q="a\"b""#)
    }

    @Test func journaldIsDetectedOnlyWhenStderrIsTheJournalsStream() {
        #expect(RemusLogHandler.isJournal(stream: nil) == false)
        #expect(RemusLogHandler.isJournal(stream: "") == false)
        #expect(RemusLogHandler.isJournal(stream: "1:1") == false)  // another stream: stderr was redirected
        var info = stat()
        #expect(fstat(2, &info) == 0)
        #expect(RemusLogHandler.isJournal(stream: "\(info.st_dev):\(info.st_ino)") == true)
    }
}
