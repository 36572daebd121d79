import Cairn
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The cluster chaos campaign: a 4-node cluster of processes (the node processes, the global
/// scheduler and the GCS replicas each in a process of its own) runs tasks and a durable
/// `Bank` actor while a seeded schedule SIGKILLs one process at a time: a node, the
/// scheduler, or a GCS replica. After each kill every task result and every reply of the
/// actor is checked against the model, and the cluster must come back to full strength
/// (four live nodes, a scheduler, every chain whole) before the next kill. With
/// ``Configuration/cutsPerRound``, the connections between node processes are also destroyed
/// (`ss -K`) a few times a round while nested tasks send messages across them: a cut is not
/// a death, and nothing may be lost to it.
public enum ClusterCampaign {
    public struct Configuration: Sendable {
        /// The program the cluster's processes run: it calls `Cluster.runNodeIfLaunched` with
        /// ``ClusterWorkload/register()`` first thing in `main`.
        public var executable: String
        public var seed: UInt64
        public var kills: Int
        /// The actor's storage: in the GCS (no shared directory), or in this directory.
        public var storageDirectory: String?
        /// Tasks and actor calls in flight at each kill.
        public var tasksPerRound: Int
        public var callsPerRound: Int
        /// How long to wait for the cluster to come back to full strength.
        public var recoveryTimeout: Duration
        /// The GCS replicas compact every this many updates (keeping the newest quarter), far
        /// more often than by default, so that kills land on compactions and standbys join
        /// from snapshots; 0: never.
        public var gcsCompactEvery: UInt64 = 8
        /// Times per round every connection from one node process to another is destroyed
        /// (`ss -K`), a few milliseconds apart, before the kill; 0: none. Needs `ss` and a
        /// kernel that can destroy sockets (``ConnectionCutter/unavailable()``).
        public var cutsPerRound = 0
        /// Nested tasks per round: each submits 200 small tasks from its node, whose results
        /// come back across the node processes' connections.
        public var fanOutsPerRound = 4

        public init(executable: String, seed: UInt64, kills: Int, storageDirectory: String? = nil, tasksPerRound: Int = 300,
                    callsPerRound: Int = 40, recoveryTimeout: Duration = .seconds(60)) {
            self.executable = executable
            self.seed = seed
            self.kills = kills
            self.storageDirectory = storageDirectory
            self.tasksPerRound = tasksPerRound
            self.callsPerRound = callsPerRound
            self.recoveryTimeout = recoveryTimeout
        }
    }

    public struct Report: Sendable {
        public var timeline: [String] = []
        public var failures: [String] = []
        /// Kills by what was killed: `node`, `scheduler`, `gcs head`, `gcs middle`, `gcs tail`, `gcs standby`.
        public var kills: [String: Int] = [:]
        public var tasksChecked = 0
        /// Connections between node processes destroyed, over the whole campaign.
        public var connectionsCut = 0
        public var callsChecked = 0
        /// Milliseconds from each kill until the cluster was at full strength again.
        public var recoveries: [Double] = []
        /// The GCS replicas at the end, as they last reported: updates applied, and how many of
        /// them compaction folded into their bases.
        public var gcsReplicas: [EmbeddedGCS.ReplicaStatus] = []
    }

    /// Runs the campaign. Never throws: what goes wrong is in ``Report/failures``.
    public static func run(_ c: Configuration) async -> Report {
        var report = Report()
        do {
            try await campaign(c, &report)
        } catch {
            report.failures.append("the campaign stopped: \(error)")
        }
        return report
    }

    private static func campaign(_ c: Configuration, _ report: inout Report) async throws {
        var random = SeededGenerator(seed: c.seed)
        var gcsOptions = EmbeddedGCS.Options()
        // Patient, as a loaded machine needs: a killed process's connections close at once anyway.
        gcsOptions.failureTimeoutMicroseconds = 10_000_000
        gcsOptions.leaseMicroseconds = 2_000_000
        gcsOptions.requestTimeoutMicroseconds = 60_000_000
        gcsOptions.compactEvery = c.gcsCompactEvery
        gcsOptions.compactionRetain = c.gcsCompactEvery / 4
        var options = ClusterOptions.uniform(nodes: 4)
        options.processes = true
        options.nodeExecutable = c.executable
        options.failureTimeoutMs = 5_000
        options.controlStore = .chainReplicated(gcsOptions)
        options.gcsReplicaProcesses = true
        options.storage = ActorStorageOptions(location: c.storageDirectory.map { .directory($0) } ?? .replicated, logSegmentBytes: 1 << 20)
        options.log = { _ in }
        // The driver's node runs nothing, and cannot host the actor: all of it is in the processes.
        options.nodes[0].resources = Resources(cpus: 0)
        for i in 1..<options.nodes.count {
            options.nodes[i].resources = Resources(cpus: 1, custom: ["far": 1])
            // Nested tasks spill to the other node processes early: messages cross their connections.
            options.nodes[i].spillThreshold = 4
        }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        guard let gcs = cluster.gcs else { throw CairnError(.invalidArgument, "the cluster has no GCS") }
        // Every kill may land on the actor's node: it must be allowed a restore for each.
        let bank = try await cluster.spawn(Bank(), name: "chaos-bank", durability: DurabilityOptions(checkpoint: .every(messages: 50), maxRestarts: c.kills),
                                           resources: Resources(cpus: 0, custom: ["far": 1]))
        var model = Bank()
        var sequence: UInt64 = 0
        let caller = CallerID(11)
        let start = ContinuousClock.now
        func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }
        func elapsed() -> String { String(format: "%8.3f s", seconds(ContinuousClock.now - start)) }

        for round in 1...c.kills {
            // Work in flight: tasks spread over the nodes, and calls to the actor.
            let base = round * 100_000
            let tasks = try (0..<c.tasksPerRound).map { try ClusterWorkload.slowSquare.remote(base + $0) }
            var calls: [(ObjectRef<Bank.Reply>, Result<Bank.Reply, Bank.InsufficientFunds>)] = []
            for _ in 0..<c.callsPerRound {
                let message = Bank.randomMessage(using: &random)
                sequence += 1
                let expected = Result { try model.receive(message) }.mapError { $0 as! Bank.InsufficientFunds }
                calls.append((try bank.send(message, caller: caller, sequence: sequence), expected))
            }
            let fans = try (0..<c.fanOutsPerRound).map { try ClusterWorkload.fanOut.remote(200 + $0) }
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...20, using: &random)))
            let nodePids = Set(cluster.nodeProcesses.map { Int($0.pid) })
            for _ in 0..<c.cutsPerRound {
                report.connectionsCut += ConnectionCutter.cutConnections(among: nodePids)
                try await Task.sleep(for: .milliseconds(Int.random(in: 1...5, using: &random)))
            }

            // The victim: a node process, the scheduler's process, or a GCS replica's.
            let config = gcs.configurations()[0]
            var victims: [(kind: String, what: String, pid: Int32)] = cluster.nodeProcesses.map { ("node", "node (\($0.node))", $0.pid) }
            if let scheduler = cluster.schedulerProcess { victims.append(("scheduler", "scheduler", scheduler)) }
            for (replica, pid) in gcs.replicaProcesses {
                let role = replica == config.head ? "head" : replica == config.tail ? "tail" : config.chain.contains(replica) ? "middle" : "standby"
                victims.append(("gcs \(role)", "gcs \(role) (replica \(replica))", pid))
            }
            let victim = victims[Int.random(in: 0..<victims.count, using: &random)]
            report.kills[victim.kind, default: 0] += 1
            let killedAt = ContinuousClock.now
            kill(victim.pid, SIGKILL)

            // Every result and reply right.
            let results = try await cluster.get(tasks, timeout: .seconds(120))
            let wrongTasks = zip(0..., results).filter { $0.1 != (base + $0.0) * (base + $0.0) }.count
            if wrongTasks > 0 { report.failures.append("round \(round): \(wrongTasks) task results wrong after killing the \(victim.what)") }
            report.tasksChecked += results.count
            let fanned = try await cluster.get(fans, timeout: .seconds(120))
            let wrongFans = zip(0..., fanned).filter { $0.1 != (0..<(200 + $0.0)).reduce(0, +) }.count
            if wrongFans > 0 { report.failures.append("round \(round): \(wrongFans) nested task results wrong") }
            report.tasksChecked += fanned.count
            for (i, (ref, expected)) in calls.enumerated() {
                do {
                    let reply = try await cluster.get(ref, timeout: .seconds(120))
                    if (try? expected.get()) != reply {
                        report.failures.append("round \(round), call \(i): the actor replied \(reply), the model says \(expected)")
                    }
                } catch let error as RemoteError {
                    guard case .failure(let refused) = expected, error.kind == .threw, error.message.contains(refused.description) else {
                        report.failures.append("round \(round), call \(i): \(error), the model says \(expected)")
                        continue
                    }
                }
                report.callsChecked += 1
            }

            // Back to full strength before the next kill.
            try await waitForFullStrength(cluster, gcs, timeout: c.recoveryTimeout)
            let ms = seconds(ContinuousClock.now - killedAt) * 1e3
            report.recoveries.append(ms)
            let status = try await cluster.status(of: bank)
            report.timeline.append("\(elapsed())  kill \(round)/\(c.kills): \(victim.what) (pid \(victim.pid)); \(results.count + fanned.count) tasks and \(calls.count) calls right; full strength after \(Int(ms)) ms; the actor on \(status.node), restored \(status.restarts) times")
            if !report.failures.isEmpty { return }
        }
        let audit = try await cluster.get(try bank.send(.audit, caller: caller, sequence: sequence + 1), timeout: .seconds(120))
        if audit != (try model.receive(.audit)) { report.failures.append("the final audit \(audit) differs from the model's") }
        report.gcsReplicas = cluster.gcs?.replicaStatuses() ?? []
        report.callsChecked += 1
    }

    /// Four live nodes and four node processes, a scheduler process, and every chain of three
    /// with no learner, each replica's process running.
    static func waitForFullStrength(_ cluster: Cluster, _ gcs: EmbeddedGCS, timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let chains = gcs.configurations()
            if cluster.aliveNodes.count == 4 && cluster.nodeProcesses.count == 3 && cluster.schedulerProcess != nil
                && chains.allSatisfy({ $0.chain.count == 3 && $0.learner == nil })
                && gcs.replicaProcesses.count == gcs.replicaIDs.count && gcs.replicaProcesses.allSatisfy({ !processHasExited($0.pid) }) {
                return
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        throw CairnError(.timeout, "the cluster did not come back to full strength within \(timeout): nodes \(cluster.aliveNodes), chains \(gcs.configurations())")
    }
}
