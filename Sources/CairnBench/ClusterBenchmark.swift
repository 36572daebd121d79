import Cairn
import CairnChaosKit
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `cairn-bench cluster`: a head (driver, control store, scheduler) and 4 node processes
/// (this binary started again) on loopback. The head's own node offers no CPU, so every task
/// and actor runs in a node process and every result crosses TCP.
struct ClusterBenchmark {
    static func options() -> ClusterOptions {
        var options = ClusterOptions(nodes: [NodeConfiguration(resources: Resources(cpus: 0))] + Array(repeating: NodeConfiguration(resources: Resources(cpus: 1)), count: 4))
        options.processes = true
        options.controlStore = .inMemory
        options.headPort = 0
        return options
    }

    func run(_ report: Report) async throws {
        let storage = try TemporaryDirectory()
        var options = Self.options()
        options.storage = ActorStorageOptions(location: .directory(storage.path))
        let t0 = now()
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        report.add("cluster.process_start_ms", (now() - t0) * 1000, "ms")
        let started = Set(cluster.nodeProcesses.map(\.node))

        // Tasks from the driver, placed by the global scheduler on the node processes.
        _ = try await cluster.get(try (0..<20_000).map { try ClusterWorkload.identity.remote($0) })
        var rates: [Double] = []
        var cpuPerTask: [Double] = []
        for _ in 0..<3 {
            let n = 200_000
            let busy = machineBusyCPUSeconds()
            let t = now()
            let values = try await cluster.get(try (0..<n).map { try ClusterWorkload.identity.remote($0) })
            let elapsed = now() - t
            precondition(values.count == n && values[n - 1] == n - 1, "wrong results")
            rates.append(Double(n) / elapsed)
            if let before = busy, let after = machineBusyCPUSeconds() { cpuPerTask.append((after - before) / Double(n) * 1e6) }
        }
        report.add("cluster.tasks_per_s", median(rates), "tasks/s", goal: ">= 200000 (Ray 2.60 here: 1814)")
        if !cpuPerTask.isEmpty {
            report.add("cluster.cpu_us_per_task", median(cpuPerTask), "us")
        }

        // Tasks submitted inside the cluster: 4 fan-out tasks, each submitting 100,000 on its node.
        var nested: [Double] = []
        for _ in 0..<3 {
            let per = 100_000
            let t = now()
            let sums = try await cluster.get(try (0..<4).map { _ in try ClusterWorkload.fanOut.remote(per) })
            precondition(sums.allSatisfy { $0 == (0..<per).reduce(0, +) }, "wrong sums")
            nested.append(Double(4 * per) / (now() - t))
        }
        report.add("cluster.nested_tasks_per_s", median(nested), "tasks/s")

        try await Self.roundTrips(report, cluster, prefix: "cluster.")

        // An actor in a node process (it needs a CPU, which the head's node lacks).
        let counter = try await cluster.spawn(ClusterWorkload.Counter(), resources: Resources(cpus: 1))
        _ = try await cluster.get(try (0..<20_000).map { _ in try counter.send(1) })
        var calls: [Double] = []
        var expected = 20_000
        for _ in 0..<3 {
            let n = 200_000
            let t = now()
            let values = try await cluster.get(try (0..<n).map { _ in try counter.send(1) })
            expected += n
            precondition(values.last == expected, "actor state wrong")
            calls.append(Double(n) / (now() - t))
        }
        report.add("cluster.actor_calls_per_s", median(calls), "calls/s")
        // Nothing was killed so far: a node process gone now was declared dead while alive
        // (busy, its peers heard nothing from it for the failure timeout) and replaced.
        let lost = started.subtracting(cluster.nodeProcesses.map(\.node)).count
        report.add("cluster.live_nodes_declared_dead", Double(lost), "nodes", goal: "0")
        try await detect(report, cluster)
    }

    /// 3,000 lone tasks one after another (the first 300 not timed): a task's round trip from
    /// the driver, and how many of the timed ones came back by a lane.
    static func roundTrips(_ report: Report, _ cluster: Cluster, prefix: String) async throws {
        var rtts: [Double] = []
        var laneBefore = cluster.laneMessages.received
        for i in 0..<3_000 {
            if i == 300 { laneBefore = cluster.laneMessages.received }
            let t = now()
            let v = try await cluster.get(try ClusterWorkload.identity.remote(i))
            precondition(v == i)
            if i >= 300 { rtts.append((now() - t) * 1e6) }
        }
        report.add(prefix + "task_rtt_by_lane_percent", Double(cluster.laneMessages.received - laneBefore) * 100 / Double(rtts.count), "%")
        report.add(prefix + "task_rtt_p50_us", median(rtts), "us", goal: "<= 60 (a loopback round trip is ~25)")
        report.add(prefix + "task_rtt_p99_us", percentile(rtts, 0.99), "us")
    }

    /// The round trips again on a cluster of its own without lanes (``ClusterOptions/lanes``):
    /// lone tasks and their results through the event loops' connections, for comparison.
    func withoutLanes(_ report: Report) async throws {
        var options = Self.options()
        options.lanes = false
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        _ = try await cluster.get(try (0..<20_000).map { try ClusterWorkload.identity.remote($0) })
        try await Self.roundTrips(report, cluster, prefix: "cluster.no_lanes.")
    }

    /// Waits until a replacement for `node` has joined: 5 live nodes (the head's and 4 processes).
    static func waitForReplacement(of node: NodeID, in cluster: Cluster) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while cluster.aliveNodes.count < 5 || cluster.nodeProcesses.count < 4 {
            guard ContinuousClock.now < deadline else { throw CairnError(.timeout, "no replacement for \(node) within 30 s") }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// The same with a standby scheduler joined from outside (`cairn scheduler`): each round a
    /// new standby joins, the active scheduler is SIGKILLed with 20,000 tasks handed to it, and
    /// the time until every result is in is taken (the standby takes over; nothing starts).
    func standbyScheduler(_ report: Report, _ cluster: Cluster) async throws {
        let files = try TemporaryDirectory()
        guard let token = cluster.token, let head = cluster.headAddress else { throw CairnError(.invalidArgument, "the cluster has no head port") }
        try token.write(to: files.path + "/token")
        func waitFor<T>(_ what: String, _ probe: () -> T?) async throws -> T {
            let deadline = ContinuousClock.now + .seconds(30)
            while ContinuousClock.now < deadline {
                if let value = probe() { return value }
                try await Task.sleep(for: .milliseconds(1))
            }
            throw CairnError(.timeout, "\(what) within 30 s")
        }
        var times: [Double] = []
        var external: (pid: Int32, address: String)?
        for round in 0..<5 {
            let known = Set(cluster.report().schedulers.map(\.address))
            let pid = try await Cluster.startScheduler(joining: head, tokenFile: files.path + "/token", executable: currentExecutablePath(),
                                                       logFile: files.path + "/scheduler.log")
            let address = try await waitFor("the standby did not register") { cluster.report().schedulers.first { !known.contains($0.address) }?.address }
            let active = try await waitFor("no active scheduler") { cluster.report().schedulers.first { $0.active } }
            let victim: Int32
            if let e = external, e.address == active.address { victim = e.pid } else {
                victim = try await waitFor("no scheduler process") { cluster.schedulerProcess }
            }
            let refs = try (0..<20_000).map { try ClusterWorkload.identity.remote(round * 100_000 + 50_000 + $0) }
            let t = now()
            kill(victim, SIGKILL)
            let values = try await cluster.get(refs, timeout: .seconds(120))
            times.append((now() - t) * 1000)
            precondition(values == (0..<20_000).map { round * 100_000 + 50_000 + $0 }, "wrong results after a scheduler kill")
            if victim == external?.pid {
                var status: Int32 = 0
                waitpid(victim, &status, 0)
            }
            // A standby took over (on two loaded cores, a busy scheduler can fall silent past the
            // failure timeout and be declared lost too: then another standby took over).
            _ = try await waitFor("no standby took over") { cluster.report().schedulers.first { $0.active && $0.address != active.address } }
            if cluster.report().schedulers.contains(where: { $0.address == address }) {
                external = (pid, address)
            } else {
                var status: Int32 = 0
                waitpid(pid, &status, 0)
                external = nil
            }
        }
        report.add("recovery.scheduler_kill_with_standby_to_results_ms", median(times), "ms")
    }

    /// SIGKILL a node process, time until the driver's node hears it declared dead (the node
    /// table it subscribes to), and wait for the replacement before the next kill.
    func detect(_ report: Report, _ cluster: Cluster) async throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_BENCH_SEED")
        FileHandle.standardError.write(Data("cluster: kill seed \(seed) (CAIRN_BENCH_SEED replays)\n".utf8))
        var random = SeededGenerator(seed: seed)
        var detects: [Double] = []
        for _ in 0..<10 {
            let victims = cluster.nodeProcesses
            let victim = victims[Int.random(in: 0..<victims.count, using: &random)]
            // Work in flight on every node (about 0.5 s of it), so that the victim dies with tasks to run again.
            let refs = try (0..<700).map { try ClusterWorkload.slowSquare.remote($0) }
            try await Task.sleep(for: .milliseconds(5))
            let t = now()
            kill(victim.pid, SIGKILL)
            while cluster.aliveNodes.contains(victim.node) { usleep(50) }
            detects.append((now() - t) * 1000)
            let values = try await cluster.get(refs, timeout: .seconds(120))
            precondition(values == (0..<700).map { $0 * $0 }, "wrong results after a kill")
            try await Self.waitForReplacement(of: victim.node, in: cluster)
        }
        report.add("recovery.detect_ms", median(detects), "ms", goal: "<= 300 (Ray's default: about 15 s)")
        report.add("recovery.detect_max_ms", detects.max() ?? .nan, "ms")

        // SIGKILL the global scheduler's process with 20,000 tasks handed to it; time until
        // every result is in (the replacement starts, registers, and takes them all).
        var schedulerKills: [Double] = []
        for round in 0..<5 {
            guard let scheduler = cluster.schedulerProcess else { throw CairnError(.timeout, "no scheduler process") }
            let refs = try (0..<20_000).map { try ClusterWorkload.identity.remote(round * 100_000 + $0) }
            let t = now()
            kill(scheduler, SIGKILL)
            let values = try await cluster.get(refs, timeout: .seconds(120))
            schedulerKills.append((now() - t) * 1000)
            precondition(values == (0..<20_000).map { round * 100_000 + $0 }, "wrong results after a scheduler kill")
            while cluster.schedulerProcess == nil || cluster.schedulerProcess == scheduler { try await Task.sleep(for: .milliseconds(1)) }
        }
        report.add("recovery.scheduler_kill_to_results_ms", median(schedulerKills), "ms")
        try await standbyScheduler(report, cluster)

        // A 256 KiB result kept only on the node that computed it; SIGKILL that node, then
        // time until `get` returns the value, rebuilt by running its task again elsewhere.
        var rebuilds: [Double] = []
        for round in 0..<5 {
            let ref = try ClusterWorkload.block.remote(round)
            var location: ObjectLocation?
            let recorded = ContinuousClock.now + .seconds(30)
            while location == nil {
                guard ContinuousClock.now < recorded else { throw CairnError(.timeout, "the object table did not record \(ref) within 30 s") }
                location = await cluster.location(of: ref)
                if location == nil { try await Task.sleep(for: .milliseconds(1)) }
            }
            guard let holder = cluster.nodeProcesses.first(where: { $0.node == location?.node }) else {
                throw CairnError(.invalidArgument, "the result is kept on \(location!.node), not on a node process")
            }
            let t = now()
            kill(holder.pid, SIGKILL)
            let value = try await cluster.get(ref, timeout: .seconds(60))
            rebuilds.append((now() - t) * 1000)
            precondition(value.count == 256 << 10 && value[1] == UInt8(truncatingIfNeeded: 31 + round), "wrong rebuilt value")
            try await Self.waitForReplacement(of: holder.node, in: cluster)
        }
        report.add("recovery.lineage_rebuild_ms", median(rebuilds), "ms", goal: "<= 300 (Ray 2.60 here: 16.1 s, 3.75 s tuned)")
        report.add("recovery.lineage_rebuild_max_ms", rebuilds.max() ?? .nan, "ms")
        try await actorNodeKill(report, cluster, prefix: "recovery.actor_node_kill")
        cluster.shutdown()
        try await replicated(report)
    }

    /// The same durable actor with its storage in the GCS chains (no shared directory): calls
    /// through the control store's relay to three fsync'd replicas, and restore after a node kill.
    func replicated(_ report: Report) async throws {
        var options = Self.options()
        options.controlStore = .chainReplicated(EmbeddedGCS.Options())
        options.storage = ActorStorageOptions(location: .replicated)
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let counter = try await cluster.spawn(ClusterWorkload.Counter(), name: "bench-replicated-counter",
                                              durability: DurabilityOptions(checkpoint: .every(messages: 10_000)), resources: Resources(cpus: 1))
        var sequence: UInt64 = 0
        let caller = CallerID(2)
        var rtts: [Double] = []
        for i in 0..<600 {
            sequence += 1
            let t = now()
            _ = try await cluster.get(try counter.send(1, caller: caller, sequence: sequence), timeout: .seconds(60))
            if i >= 100 { rtts.append((now() - t) * 1e6) }
        }
        report.add("cluster.replicated_durable_rtt_p50_us", median(rtts), "us")
        var rates: [Double] = []
        for _ in 0..<3 {
            let n = 20_000
            let t = now()
            let refs = try (0..<n).map { _ in
                sequence += 1
                return try counter.send(1, caller: caller, sequence: sequence)
            }
            let values = try await cluster.get(refs, timeout: .seconds(120))
            precondition(values.last == Int(sequence), "wrong count: \(values.last ?? -1), expected \(sequence)")
            rates.append(Double(n) / (now() - t))
        }
        report.add("cluster.replicated_durable_calls_per_s", median(rates), "calls/s")
        try await actorNodeKill(report, cluster, prefix: "recovery.replicated_actor_node_kill")
    }

    /// A durable Bank actor in a node process, 1,000 messages in (checkpoints every 200, so a
    /// restore replays up to 199 logged messages); SIGKILL its node, then time until the next
    /// call is answered, with the state the model says (the actor restored on another node).
    func actorNodeKill(_ report: Report, _ cluster: Cluster, prefix: String) async throws {
        let bank = try await cluster.spawn(Bank(), name: "bench-bank", durability: DurabilityOptions(checkpoint: .every(messages: 200)),
                                           resources: Resources(cpus: 1))
        var model = Bank()
        var sequence: UInt64 = 0
        let caller = CallerID(1)
        var times: [Double] = []
        for round in 0..<5 {
            let count = 1_000 + round * 37
            var last: Bank.Reply?
            for i in 0..<count {
                sequence += 1
                let message = Bank.Message.deposit(account: i % Bank.accounts, amount: 1 + i % 7)
                last = try model.receive(message)
                let ref = try bank.send(message, caller: caller, sequence: sequence)
                if i == count - 1 {
                    let got = try await cluster.get(ref, timeout: .seconds(60))
                    precondition(got == last, "the actor's state is wrong before the kill")
                }
            }
            let hostNode = try await cluster.status(of: bank).node
            guard let host = cluster.nodeProcesses.first(where: { $0.node == hostNode }) else {
                throw CairnError(.invalidArgument, "the durable actor is on \(hostNode), not on a node process")
            }
            sequence += 1
            let expected = try model.receive(.audit)
            let t = now()
            kill(host.pid, SIGKILL)
            let reply = try await cluster.get(try bank.send(.audit, caller: caller, sequence: sequence), timeout: .seconds(60))
            times.append((now() - t) * 1000)
            precondition(reply == expected, "the restored actor's state is wrong: \(reply), the model says \(expected)")
            try await Self.waitForReplacement(of: host.node, in: cluster)
        }
        report.add(prefix + "_to_answer_ms", median(times), "ms", goal: "<= 300, with the state intact")
        report.add(prefix + "_to_answer_max_ms", times.max() ?? .nan, "ms")
    }
}
