import Cairn
import Foundation

// `cairn-example`: the reinforcement-learning job from the lecture, on an embedded cluster.
// `cairn-example ledger [directory]`: durable storage on its own (log, checkpoints, recovery).
// `cairn-example processes`: a cluster of processes, one node killed while tasks run.

// First thing: in a node process started by `processes`, run the node (this never returns).
Cluster.runNodeIfLaunched(prepare: ProcessDemo.register)

let arguments = Array(CommandLine.arguments.dropFirst())
do {
    switch arguments.first {
    case "ledger":
        try runLedger(directory: arguments.dropFirst().first ?? "cairn-data")
    case "processes":
        try await ProcessDemo.run()
    case nil, "rl":
        try await runReinforcementLearning(seed: arguments.dropFirst().first.flatMap(UInt64.init) ?? 42)
    default:
        FileHandle.standardError.write(Data("usage: cairn-example [rl [seed] | ledger [directory] | processes]\n".utf8))
        exit(2)
    }
} catch {
    FileHandle.standardError.write(Data("cairn-example: \(error)\n".utf8))
    exit(1)
}
