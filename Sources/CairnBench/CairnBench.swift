import ArgumentParser
import Cairn
import CairnChaosKit
import Foundation

@main
enum Main {
    static func main() async {
        // The cluster suite's node processes are this binary, started again.
        Cluster.runNodeIfLaunched(prepare: ClusterWorkload.register)
        await CairnBench.main()
    }
}

struct CairnBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn-bench",
        abstract: "Cairn's benchmarks. Each prints JSON lines {\"metric\":…,\"value\":…,\"unit\":…}, then a table.",
        discussion: "Build with -c release: swift run -c release cairn-bench storage codec",
        subcommands: [])

    @Argument(help: "Suites to run: tasks, actors, durable, recovery, storage, codec, gcs, wire, tcp, cluster, machine (default: all).")
    var suites: [String] = []

    @Option(help: "Directory for on-disk benchmarks (default: a new directory under the system temporary directory, removed afterwards).")
    var directory: String?

    @Flag(help: "Skip the JSON comparison in the codec suite (for profiling).")
    var noJSON = false

    /// Set when the recovery suite re-launches this binary to host the durable actor it kills.
    @Option(help: .hidden) var actorHost: String?

    /// Set when the wire suite re-launches this binary as the peer it kills.
    @Option(help: .hidden) var wirePeer: Int?

    static let known = ["tasks", "actors", "durable", "recovery", "storage", "codec", "gcs", "wire", "tcp", "cluster", "machine"]

    func validate() throws {
        for s in suites where !Self.known.contains(s) {
            throw ValidationError("unknown suite \"\(s)\"; known suites: \(Self.known.joined(separator: ", "))")
        }
    }

    func run() async throws {
        if let wirePeer {
            try await WireBenchmark.peer(port: wirePeer)
            return
        }
        if let actorHost {
            try await ActorHostProcess.run(directory: actorHost, checkpointEvery: 100, maxRestarts: .max, nodes: 2)
            return
        }
        let report = Report()
        let chosen = suites.isEmpty ? Self.known : suites
        if chosen.contains("tasks") || chosen.contains("actors") {
            let runtime = RuntimeBenchmark()
            let cluster = try await runtime.start(report)
            if chosen.contains("tasks") { try await runtime.tasks(report, cluster) }
            if chosen.contains("actors") { try await runtime.actors(report, cluster) }
            cluster.shutdown()
        }
        #if DEBUG
        FileHandle.standardError.write(Data("warning: this is a debug build; figures are meaningful only with -c release\n".utf8))
        #endif
        for suite in chosen {
            switch suite {
            case "storage":
                try withScratch { try StorageBenchmark(directory: $0).run(report) }
            case "machine":
                try withScratch { try MachineBenchmark(directory: $0).run(report) }
            case "codec":
                try CodecBenchmark(compareJSON: !noJSON).run(report)
            case "wire":
                try await WireBenchmark().run(report)
            case "tcp":
                try await TCPBenchmark().run(report)
            case "cluster":
                try await ClusterBenchmark().run(report)
                try await ClusterBenchmark().withoutLanes(report)
            case "gcs":
                try withScratch { try GCSBenchmark(directory: $0 + "/gcs").run(report) }
            case "durable", "recovery":
                let dir = scratchDirectory()
                defer { removeScratch(dir) }
                let bench = DurableBenchmark(directory: dir + "/" + suite)
                if suite == "durable" { try await bench.durable(report) } else { try await bench.recovery(report) }
            default:
                break  // tasks and actors ran above, on one cluster
            }
        }
        report.printTable()
    }

    /// `--directory`, or a new directory under the system temporary directory.
    func scratchDirectory() -> String { directory ?? (NSTemporaryDirectory() + "cairn-bench-" + UUID().uuidString) }

    /// Removes `dir` unless the user chose it with `--directory`.
    func removeScratch(_ dir: String) { if directory == nil { try? FileManager.default.removeItem(atPath: dir) } }

    func withScratch(_ body: (String) throws -> Void) throws {
        let dir = scratchDirectory()
        defer { removeScratch(dir) }
        try body(dir)
    }
}
