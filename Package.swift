// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Cairn",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Cairn", targets: ["Cairn"]),
        .library(name: "CairnStorage", targets: ["CairnStorage"]),
        .library(name: "CairnCodec", targets: ["CairnCodec"]),
        .library(name: "CairnCore", targets: ["CairnCore"]),
        .library(name: "CairnWire", targets: ["CairnWire"]),
        .executable(name: "cairn", targets: ["CairnCLI"]),
        .executable(name: "cairn-bench", targets: ["CairnBench"]),
        .executable(name: "cairn-chaos", targets: ["CairnChaos"]),
        .executable(name: "cairn-example", targets: ["CairnExample"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    ],
    targets: [
        // C libraries, found through pkg-config (liblmdb-dev, libzstd-dev).
        .systemLibrary(name: "CLMDB", path: "Storage/CLMDB", pkgConfig: "lmdb",
                       providers: [.apt(["liblmdb-dev"])]),
        .systemLibrary(name: "CZstd", path: "Storage/CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),

        // Shared value types: seeded randomness, a lock, CRC-32C.
        .target(name: "CairnCore", dependencies: ["CCairnCRC"], path: "Sources/CairnCore"),

        // CRC-32C with the SSE4.2 instruction where the CPU has it.
        .target(name: "CCairnCRC", path: "Storage/CCairnCRC"),

        // Compact binary Codable format used for checkpoints, logs and the wire.
        // Optimized in debug builds too: every message between processes goes through it.
        .target(name: "CairnCodec", path: "Sources/CairnCodec", swiftSettings: simulationSpeed),

        // Durable keyed records, append-only logs and checkpoints; LMDB and in-memory engines.
        .target(name: "CairnStorage", dependencies: ["CLMDB", "CZstd", "CCairnCRC", "CairnCodec", "CairnCore"],
                path: "Storage/CairnStorage"),

        // The wire protocol between processes: frames, the token handshake (pure, no I/O).
        .target(name: "CairnWire", dependencies: ["CairnCore"], path: "Sources/CairnWire"),

        // The wire protocol over TCP (SwiftNIO): listeners and connections running ConnectionCore.
        .target(name: "CairnNet", dependencies: [
            "CairnWire", "CairnCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ], path: "Sources/CairnNet"),

        // The runtime: tasks, objects, actors, nodes, control store, scheduling, transport.
        .target(name: "Cairn", dependencies: [
            "CairnCodec", "CairnCore", "CairnStorage", "CairnGCS", "CairnWire", "CairnNet",
            .product(name: "DequeModule", package: "swift-collections"),
        ], path: "Sources/Cairn"),

        .executableTarget(name: "CairnBench", dependencies: [
            "Cairn", "CairnStorage", "CairnCodec", "CairnChaosKit", "CairnCore", "CairnNet", "CairnWire",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], path: "Sources/CairnBench"),
        // Process control and workloads shared by the chaos runner and the crash tests.
        // Optimized in debug builds too: `swift test` runs 10,000 seeds of the GCS simulation.
        .target(name: "CairnChaosKit", dependencies: ["Cairn", "CairnCore", "CairnGCS", "CairnWire"], path: "Chaos/CairnChaosKit",
                swiftSettings: simulationSpeed),
        // The Global Control Store's protocol cores: pure values, no I/O.
        .target(name: "CairnGCS", dependencies: [.product(name: "DequeModule", package: "swift-collections")],
                path: "Sources/CairnGCS", swiftSettings: simulationSpeed),
        .executableTarget(name: "CairnChaos", dependencies: [
            "Cairn", "CairnStorage", "CairnCodec", "CairnChaosKit", "CairnCore",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], path: "Chaos/CairnChaos"),
        // The `cairn` command: start, inspect and stop a cluster of processes.
        .executableTarget(name: "CairnCLI", dependencies: [
            "Cairn", "CairnChaosKit", "CairnCore", "CairnNet", "CairnWire",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], path: "Sources/CairnCLI"),
        .executableTarget(name: "CairnExample", dependencies: ["Cairn", "CairnStorage", "CairnCodec"],
                          path: "Sources/CairnExample"),

        .testTarget(name: "CairnTests", dependencies: ["Cairn", "CairnCore", "CairnCodec", "CairnStorage", "CairnChaos", "CairnChaosKit", "CairnGCS", "CairnCLI",
                                                     "CairnNet", "CairnWire"],
                    path: "Tests/CairnTests"),
        .testTarget(name: "CairnNetTests", dependencies: ["CairnNet", "CairnWire", "CairnCore"],
                    path: "Tests/CairnNetTests"),
        .testTarget(name: "CairnWireTests", dependencies: ["CairnWire", "CairnCore"],
                    path: "Tests/CairnWireTests"),
        .testTarget(name: "CairnCodecTests", dependencies: ["CairnCodec", "CairnCore"],
                    path: "Tests/CairnCodecTests"),
        // Depends on the chaos executable so that `swift test` builds the crash child it spawns.
        .testTarget(name: "CairnStorageTests", dependencies: ["Cairn", "CairnStorage", "CairnCodec", "CairnChaos", "CairnChaosKit", "CairnCore"],
                    path: "Tests/CairnStorageTests"),
    ],
    swiftLanguageModes: [.v6]
)

/// The simulation and the cores it drives are compiled with optimization even in debug builds,
/// so the test suite's 10,000 simulated runs take seconds rather than minutes.
var simulationSpeed: [SwiftSetting] { [.unsafeFlags(["-O"], .when(configuration: .debug))] }
