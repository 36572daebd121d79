import ArgumentParser
import Cairn
import CairnChaosKit
import CairnCore
import Foundation

/// Runs the cluster chaos campaign and prints its timeline and verdict.
struct ClusterChaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "SIGKILL nodes, the global scheduler and GCS replicas of a 4-node cluster of processes at seeded moments while tasks and a durable actor run; check every result and reply, and that the cluster returns to full strength after each kill.")

    @Option(help: "SIGKILLs to deliver, one at a time.") var kills: Int = 12
    @Option(help: "Seed of the kill schedule and the actor's messages (default: random, printed).") var seed: UInt64?
    @Option(help: "Keep the durable actor in this directory, shared by the node processes (default: in the GCS chains).") var directory: String?
    @Option(help: "The GCS replicas compact every this many updates, keeping the newest quarter (0: never).") var gcsCompactEvery: UInt64 = 8
    @Option(help: "Times per round every connection between two node processes is destroyed (ss -K) while nested tasks cross them; 0: none.") var cuts: Int = 3

    func validate() throws {
        guard kills >= 1 && kills <= 10_000 else { throw ValidationError("--kills must be 1 to 10,000") }
        guard cuts >= 0 && cuts <= 1_000 else { throw ValidationError("--cuts must be 0 to 1,000") }
        if cuts > 0, let reason = ConnectionCutter.unavailable() {
            throw ValidationError("--cuts needs connections to be destroyed with ss -K, which cannot be done here: \(reason); run with --cuts 0")
        }
    }

    func run() async throws {
        let seed = seed ?? UInt64.random(in: 1...UInt64.max)
        print("cluster chaos seed: \(seed) (replay with --seed \(seed)); the actor's storage: \(directory ?? "the GCS chains")")
        var configuration = ClusterCampaign.Configuration(executable: currentExecutablePath(), seed: seed, kills: kills, storageDirectory: directory)
        configuration.gcsCompactEvery = gcsCompactEvery
        configuration.cutsPerRound = cuts
        let report = await ClusterCampaign.run(configuration)
        report.timeline.forEach { print($0) }
        print("kills: " + report.kills.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        let sorted = report.recoveries.sorted()
        if !sorted.isEmpty {
            print("back to full strength: median \(Int(sorted[sorted.count / 2])) ms, longest \(Int(sorted.last!)) ms")
        }
        print("checked: \(report.tasksChecked) task results, \(report.callsChecked) actor replies; \(report.connectionsCut) connections between node processes cut")
        print("GCS replicas: " + report.gcsReplicas.map { "\($0.replica) applied \($0.lastSequence) (\($0.base) compacted)" }.joined(separator: ", "))
        if report.failures.isEmpty {
            print("PASS: every result and reply right; nothing acknowledged was lost or applied twice")
        } else {
            report.failures.forEach { print("FAIL: \($0)") }
            throw ExitCode(1)
        }
    }
}
