import ArgumentParser
import CairnChaosKit
import CairnCore

/// Runs the seeded GCS simulation: one seed to replay it, or many.
struct GCSSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gcs-sim",
        abstract: "Simulate the GCS (sharded chains, coordinator, clients, subscribers) with lossy networks and crashes; check linearizability, durability and subscriptions.")

    @Option(help: "The seed to run (default: random, printed).") var seed: UInt64?
    @Option(help: "How many seeds to run, starting from --seed.") var runs: Int = 1
    @Flag(help: "Print every message and event of the run (with one seed).") var trace = false

    func run() throws {
        let first = seed ?? UInt64.random(in: 1...UInt64.max)
        var failures = 0
        for i in 0..<runs {
            let s = first &+ UInt64(i)
            var options = GCSSimulation.Options(seed: s)
            options.trace = trace && runs == 1
            let o = GCSSimulation.run(options)
            if runs == 1 || !o.passed {
                print("seed \(s): \(o.passed ? "PASS" : "FAIL") · \(o.completed) of \(o.history.count) operations completed, \(o.crashes) replica crashes, \(o.coordinatorCrashes) coordinator crashes, \(o.partitions) partitions, \(o.reconfigurations) reconfigurations, \(o.compactions) compactions, \(o.snapshotInstalls) snapshots installed, \(o.subscriberSnapshots) keys from snapshots to subscribers, \(o.messages) messages, t=\(o.endTime)")
                for f in o.failures { print("  \(f)") }
                if !o.passed { print("  replay: \(o.replay)") }
            }
            if !o.passed { failures += 1 }
        }
        if runs > 1 { print("\(runs - failures) of \(runs) seeds from \(first) pass") }
        if failures > 0 { throw ExitCode(1) }
    }
}
