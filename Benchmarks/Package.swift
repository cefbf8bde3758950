// swift-tools-version:6.1
import PackageDescription

// Benchmarks of the stream codec, kept out of the main package so `swift test` never builds them.
// Run with ./run.sh (release build). Results are ratios against memcpy measured in the same run.
let package = Package(
    name: "remusd-benchmarks",
    dependencies: [
        .package(name: "remusd", path: ".."),
    ],
    targets: [
        // Counts every malloc-family call of the process (interposes glibc's allocator).
        .target(name: "CMallocCounter"),
        .executableTarget(
            name: "StreamCodecBenchmark",
            dependencies: [
                "CMallocCounter",
                .product(name: "RemusCore", package: "remusd"),
            ],
            // Export the interposed allocator so shared libraries (libswiftCore, libc) call it.
            linkerSettings: [.unsafeFlags(["-Xlinker", "--export-dynamic"])]
        ),
        // Allocations on the pause path (suspend → harvest → capture → state → resume).
        .executableTarget(
            name: "CapturePathBenchmark",
            dependencies: [
                "CMallocCounter",
                .product(name: "RemusCore", package: "remusd"),
                .product(name: "RemusSim", package: "remusd"),
            ],
            linkerSettings: [.unsafeFlags(["-Xlinker", "--export-dynamic"])]
        ),
    ],
    swiftLanguageModes: [.v6]
)
