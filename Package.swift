// swift-tools-version:6.1
import PackageDescription

// Layers (see Docs/architecture.md): RemusCore is pure, deterministic Swift (plus one pure C compute
// kernel for CRC32C); backends and outputs import Core; the runtime wires them to threads and sockets;
// the remusd executable only parses the command line.
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
    ],
    targets: [
        // CRC32C with the SSE4.2 instruction where the CPU has it; a table fallback elsewhere.
        .target(name: "CCRC32C", cSettings: [.unsafeFlags(["-O3"])]),
        .target(name: "RemusCore", dependencies: ["CCRC32C"]),
        .target(name: "RemusSim", dependencies: ["RemusCore"]),
        // Our own threads and the monitor lock (pthreads, CLOCK_MONOTONIC deadlines), for the
        // runtime and the backends that block in C libraries.
        .target(name: "RemusThreads"),
        .systemLibrary(
            name: "CNetlink",
            pkgConfig: "libnl-route-3.0",
            providers: [.apt(["libnl-3-dev", "libnl-route-3-dev"])]
        ),
        // tun/tap ioctls (TUNSETIFF and friends are macros, ioctl is variadic): the simulated
        // guest's NIC over a real tap, so the plug qdisc path runs end to end.
        .target(name: "CTap"),
        .target(name: "RemusNetbuf", dependencies: ["RemusCore", "RemusThreads", "CNetlink", "CTap"]),
        // The Xen toolstack's headers (libxen-dev) and the few C shims Swift cannot import. The
        // libraries are not linked: CXen opens them with dlopen when the Xen backend is first used,
        // so the same binary runs the simulated guest on a host without Xen. RemusXen owns their
        // handles and is the Xen backend (libxenguest primary, libxl replica).
        .target(name: "CXen", linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "RemusXen", dependencies: ["CXen", "RemusCore", "RemusThreads"]),
        .target(name: "RemusRuntime", dependencies: ["RemusCore", "RemusSim", "RemusNetbuf", "RemusThreads", "RemusXen"]),
        .executableTarget(
            name: "remusd",
            dependencies: [
                "RemusRuntime",
                "RemusNetbuf",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "RemusCoreTests", dependencies: ["RemusCore"], resources: [.copy("Golden")]),
        .testTarget(name: "RemusSimTests", dependencies: ["RemusSim", "RemusCore"]),
        .testTarget(name: "RemusNetbufTests", dependencies: ["RemusNetbuf", "RemusCore"]),
        .testTarget(name: "RemusXenTests", dependencies: ["RemusXen", "CXen", "RemusCore"]),
        .testTarget(name: "RemusRuntimeTests", dependencies: ["RemusRuntime", "RemusSim", "RemusCore", "RemusNetbuf"]),
    ],
    swiftLanguageModes: [.v6]
)
