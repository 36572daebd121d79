import ArgumentParser
import CairnChaosKit
import CairnCore

/// Runs the seeded chain-replication simulation: one seed to replay it, or many.
struct ChainSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chain-sim",
        abstract: "Simulate a chain-replicated shard with lossy networks and replica crashes; check linearizability.")

    @Option(help: "The seed to run (default: random, printed).") var seed: UInt64?
    @Option(help: "How many seeds to run, starting from --seed.") var runs: Int = 1

    func run() throws {
        let first = seed ?? UInt64.random(in: 1...UInt64.max)
        var failures = 0
        for i in 0..<runs {
            let s = first &+ UInt64(i)
            let o = ChainSimulation.run(.init(seed: s))
            if runs == 1 || !o.passed {
                print("seed \(s): \(o.passed ? "PASS" : "FAIL") · \(o.completed) of \(o.history.count) operations completed, \(o.crashes) crashes, \(o.messages) messages, t=\(o.endTime)"
                      + (o.verdict.linearizable ? "" : " · not linearizable on key \(o.verdict.failingKey ?? "?")")
                      + (o.lostWrites.isEmpty ? "" : " · acknowledged writes lost: \(o.lostWrites)"))
            }
            if !o.passed { failures += 1 }
        }
        if runs > 1 { print("\(runs - failures) of \(runs) seeds from \(first) pass") }
        if failures > 0 { throw ExitCode(1) }
    }
}
