import ArgumentParser
import Logging
import Metrics
import RemusRuntime

/// `--metrics-listen` of `protect` and `receive`, and the process's one metrics registry.
struct MetricsOptions: ParsableArguments {
    @Option(name: .customLong("metrics-listen"), help: ArgumentHelp("Serve the daemon's metrics as Prometheus text at http://<host:port>/metrics (plain HTTP, no authentication: bind it to an address only your monitoring reaches, e.g. 127.0.0.1:9788). Default: not served.", valueName: "host:port"))
    var metricsListen: String?

    var endpoint: Endpoint? { metricsListen.flatMap { Endpoint(parsing: $0, defaultPort: 0) } }

    func validate() throws {
        guard let metricsListen else { return }
        guard let endpoint else { throw ValidationError("--metrics-listen '\(metricsListen)' is not host:port (IPv6 as [addr]:port)") }
        if endpoint.port == 0 { throw ValidationError("--metrics-listen '\(metricsListen)' needs a port, e.g. 127.0.0.1:9788") }
    }

    /// The process's registry: swift-log and swift-metrics are bootstrapped here, in the
    /// executable only (library code passes its registry explicitly), once per process.
    func bootstrap() -> DaemonMetrics {
        LoggingSystem.bootstrap { label in RemusLogHandler(label: label) }
        let metrics = DaemonMetrics()
        MetricsSystem.bootstrap(metrics.factory)
        return metrics
    }
}
