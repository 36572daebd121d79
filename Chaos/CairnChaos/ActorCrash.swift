import ArgumentParser
import CairnChaosKit
import CairnCore
import Foundation

/// Runs the durable-actor crash campaign and prints its timeline and verdict.
struct ActorCrash: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "actor-crash",
        abstract: "SIGKILL the process hosting a durable actor repeatedly; check that its state equals the model of every acknowledged message, applied once.")

    @Option(help: "SIGKILLs to deliver.") var kills: Int = 20
    @Option(help: "Seed of the kill schedule and the messages (default: random, printed).") var seed: UInt64?
    @Option(help: "Storage directory (default: a fresh temporary directory).") var directory: String?

    func run() throws {
        let seed = seed ?? UInt64.random(in: 1...UInt64.max)
        print("actor-crash seed: \(seed) (replay with --seed \(seed))")
        let dir = directory ?? NSTemporaryDirectory() + "cairn-actor-crash-\(seed)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let exe = executableDirectory() + "/cairn-chaos"
        let report = ActorCrashCampaign.run(.init(executable: exe, directory: dir, seed: seed, kills: kills))
        report.timeline.forEach { print($0) }
        print("kills \(report.kills), messages \(report.messages), resent after a kill \(report.retried), replayed \(report.replayed)")
        if report.failures.isEmpty {
            print("PASS: the actor's state equals the model; no acknowledged message lost or applied twice")
            if directory == nil { try? FileManager.default.removeItem(atPath: dir) }
        } else {
            report.failures.forEach { print("FAIL: \($0)") }
            throw ExitCode(1)
        }
    }
}
