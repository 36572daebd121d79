import ArgumentParser
import CairnChaosKit

/// The child of the durable-actor crash test (see ``ActorHostProcess`` for its line protocol).
struct ActorHost: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "actor-host",
        abstract: "Host the durable Bank actor and apply messages read from stdin, acknowledging each reply on stdout.")

    @Option(help: "Storage directory (LMDB).") var directory: String
    @Option(help: "Checkpoint every N messages; 0 means never.") var checkpointEvery: Int = 100
    @Option(help: "The actor's maxRestarts.") var maxRestarts: Int = 1000
    @Option(help: "Nodes of the embedded cluster.") var nodes: Int = 2

    func validate() throws {
        guard checkpointEvery >= 0 else { throw ValidationError("--checkpoint-every must be 0 (never) or more") }
        guard nodes >= 1 && nodes <= 16 else { throw ValidationError("--nodes must be 1 to 16") }
    }

    func run() async throws {
        try await ActorHostProcess.run(directory: directory, checkpointEvery: checkpointEvery, maxRestarts: maxRestarts, nodes: nodes)
    }
}
