import ArgumentParser
import CairnChaosKit
import Foundation

/// Runs the head chaos campaign and prints its timeline and verdict.
struct HeadChaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "head",
        abstract: "SIGKILL the head of a cluster started with the cairn binary (2 nodes, one node joined from outside, durable actor in the GCS) at seeded moments while a driver sends messages to the actor; check every reply, that the supervisor starts the head again, and that the cluster returns to full strength after each kill.")

    @Option(help: "SIGKILLs to deliver, one at a time.") var kills: Int = 5
    @Option(help: "Seed of the kill moments and the actor's messages (default: random, printed).") var seed: UInt64?
    @Option(help: "The cairn binary (default: the one beside this program).") var cairn: String?

    func validate() throws {
        guard kills >= 1 && kills <= 1_000 else { throw ValidationError("--kills must be 1 to 1,000") }
        let path = cairn ?? executableDirectory() + "/cairn"
        guard access(path, X_OK) == 0 else { throw ValidationError("no cairn binary at \(path); build it (swift build -c release) or pass --cairn") }
    }

    func run() async throws {
        let seed = seed ?? UInt64.random(in: 1...UInt64.max)
        print("head chaos seed: \(seed) (replay with --seed \(seed))")
        let report = await HeadCampaign.run(.init(cairn: cairn ?? executableDirectory() + "/cairn", seed: seed, kills: kills))
        report.timeline.forEach { print($0) }
        for (name, samples) in [("answer after a kill", report.killToAnswerMs), ("back to full strength", report.fullStrengthMs)] where !samples.isEmpty {
            let sorted = samples.sorted()
            print("\(name): median \(Int(sorted[sorted.count / 2])) ms, longest \(Int(sorted.last!)) ms")
        }
        print("checked: \(report.callsChecked) actor replies over \(report.killToAnswerMs.count) head kills")
        if report.failures.isEmpty {
            print("PASS: every reply right; nothing acknowledged was lost or applied twice")
        } else {
            report.failures.forEach { print("FAIL: \($0)") }
            throw ExitCode(1)
        }
    }
}
