// swift-tools-version:6.1
import PackageDescription

// Layers (see Docs/architecture.md): RemusCore is pure, deterministic Swift (plus one pure C compute
// kernel for CRC32C); backends and outputs import Core; the runtime wires them to threads and sockets;
// the drill, the benchmark and the netbuf probes are tools beside the runtime, never inside it; the
// remusd executable only parses the command line.
let package = Package(
    name: "remusd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "remusd", targets: ["remusd"]),
        .library(name: "RemusCore", targets: ["RemusCore"]),
        .library(name: "RemusSim", targets: ["RemusSim"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // CRC32C with the SSE4.2 instruction where the CPU has it; a table fallback elsewhere.
        .target(name: "CCRC32C", cSettings: [.unsafeFlags(["-O3"])]),
        .target(name: "RemusCore", dependencies: ["CCRC32C"]),
        // The one system layer: the errno error type, the syscall choke point, owned descriptors,
        // sockets and child processes with deadlines, our threads and the monitor lock.
        .target(name: "CMalloc"),
        .target(name: "CPipe"),
        .target(name: "RemusSystem", dependencies: ["CMalloc", "CPipe", .product(name: "SystemPackage", package: "swift-system")]),
        .target(name: "RemusSim", dependencies: ["RemusCore", "RemusSystem", "RemusDisk"]),
        .systemLibrary(
            name: "CNetlink",
            pkgConfig: "libnl-route-3.0",
            providers: [.apt(["libnl-3-dev", "libnl-route-3-dev"])]
        ),
        // OpenSSL from Debian's libssl-dev, and the few macros and variadic calls Swift cannot
        // import (static inline wrappers in its shim.h).
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        // Mutual TLS 1.3 as a ByteChannel (the replication channel) and the throwaway CA of
        // `remusd certs`.
        .target(name: "RemusTLS", dependencies: ["COpenSSL", "RemusSystem"]),
        // tun/tap ioctls (TUNSETIFF and friends are macros, ioctl is variadic): the simulated
        // guest's NIC over a real tap, so the plug qdisc path runs end to end.
        .target(name: "CTap"),
        .target(name: "RemusNetbuf", dependencies: ["RemusCore", "RemusSystem", "CNetlink", "CTap"]),
        // Replicated disks: the backup's epoch staging (memory, then a spill file), its redo log
        // and the disk images it applies to.
        .target(name: "CDisk"),
        .target(name: "RemusDisk", dependencies: ["RemusCore", "RemusSystem", "CDisk"]),
        // The Xen toolstack's headers (libxen-dev) and the few C shims Swift cannot import. The
        // libraries are not linked: CXen opens them with dlopen when the Xen backend is first used,
        // so the same binary runs the simulated guest on a host without Xen. RemusXen owns their
        // handles and is the Xen backend (libxenguest primary, libxl replica).
        .target(name: "CXen", linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "RemusXen", dependencies: ["CXen", "RemusCore", "RemusSystem"]),
        // Logging through swift-log (our own line format), metrics through swift-metrics with an
        // explicit factory per daemon, served as Prometheus text.
        .target(name: "RemusRuntime", dependencies: [
            "RemusCore", "RemusSim", "RemusDisk", "RemusNetbuf", "RemusSystem", "RemusTLS", "RemusXen",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // Tools, not production code: the daemons (RemusRuntime) import none of them.
        // `remusd drill`: the failover drill, its packet observer, partition proxies, a local etcd
        // and the verifier of each failover.
        .target(name: "RemusDrill", dependencies: ["RemusRuntime", "RemusCore", "RemusSim", "RemusNetbuf", "RemusSystem", "RemusTLS"]),
        // `remusd bench`: the replication loop beside memcpy and raw loopback TCP.
        .target(name: "RemusBench", dependencies: ["RemusRuntime", "RemusCore", "RemusSim", "RemusTLS", "RemusDisk"]),
        // `remusd netbuf probe-…`: raw frames and TCP round trips for the testbed.
        .target(name: "RemusNetbufProbe", dependencies: ["RemusSystem", "CNetlink"]),
        .executableTarget(
            name: "remusd",
            dependencies: [
                "RemusRuntime",
                "RemusNetbuf",
                "RemusTLS",
                "RemusDrill",
                "RemusBench",
                "RemusNetbufProbe",
                "RemusDisk",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // Helpers every test target shares (`eventually(deadline:)`).
        .target(name: "RemusTestSupport", dependencies: ["RemusSystem"], path: "Tests/RemusTestSupport"),
        .testTarget(name: "RemusSystemTests", dependencies: ["RemusSystem", "RemusTestSupport"]),
        .testTarget(name: "RemusTLSTests", dependencies: ["RemusTLS", "COpenSSL", "RemusSystem", "RemusTestSupport"]),
        .testTarget(name: "RemusCoreTests", dependencies: ["RemusCore"], resources: [.copy("Golden")]),
        .testTarget(name: "RemusSimTests", dependencies: ["RemusSim", "RemusCore", "RemusSystem", "RemusDisk"]),
        .testTarget(name: "RemusDiskTests", dependencies: ["RemusDisk", "RemusCore", "RemusSystem", "RemusTestSupport"]),
        .testTarget(name: "RemusNetbufTests", dependencies: ["RemusNetbuf", "RemusNetbufProbe", "RemusCore", "RemusSystem", "RemusTestSupport"]),
        .testTarget(name: "RemusXenTests", dependencies: ["RemusXen", "CXen", "RemusCore", "RemusSystem"]),
        .testTarget(name: "RemusRuntimeTests", dependencies: ["RemusRuntime", "RemusDrill", "RemusSim", "RemusCore", "RemusNetbuf", "RemusTLS", "RemusTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
