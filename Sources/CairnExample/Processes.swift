import Cairn
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// `cairn-example processes`: a cluster whose nodes and global scheduler are processes (this
// program started again). Tasks fan out over them and a durable actor lives in one; that node
// process is SIGKILLed while they run; every result still comes back right, the actor answers
// from another node with its state, and a replacement node joins.

enum ProcessDemo {
    static let slowSquare = RemoteFunction<Int, Int>("demo.slowSquare") { x in
        usleep(2_000)
        return x * x
    }

    /// Sum of squares of 0..<n, as nested tasks on whatever node runs this one.
    static let sumOfSquares = RemoteFunction<Int, Int>("demo.sumOfSquares") { n in
        try (0..<n).map { try slowSquare.remote($0) }.reduce(0) { $0 + (try $1.get()) }
    }

    /// A durable running total.
    struct Tally: RemoteActor {
        var total = 0
        mutating func receive(_ n: Int) throws -> Int {
            total += n
            return total
        }
    }

    static func register() {
        _ = (slowSquare, sumOfSquares)
        FunctionRegistry.process.register(Tally.self)
    }

    static func run() async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        options.processes = true
        options.controlStore = .inMemory
        // Durable actors' directories, where any node process can restore them.
        let storage = NSTemporaryDirectory() + "cairn-example-processes-\(getpid())"
        options.storage = ActorStorageOptions(location: .directory(storage))
        defer { try? FileManager.default.removeItem(atPath: storage) }
        // Only the node processes offer "worker", so the actor lives in one of them.
        for i in 1..<options.nodes.count { options.nodes[i].resources = Resources(cpus: 1, custom: ["worker": 1]) }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let nodes = cluster.nodeProcesses
        print("head pid \(getpid()); node processes: \(nodes.map { "\($0.node) (pid \($0.pid))" }.joined(separator: ", ")); scheduler pid \(cluster.schedulerProcess.map(String.init) ?? "?")")

        let tally = try await cluster.spawn(Tally(), name: "tally", resources: Resources(cpus: 0, custom: ["worker": 1]))
        let me = CallerID(1)
        var last = 0
        for n in 1...100 { last = try await cluster.get(try tally.send(n, caller: me, sequence: UInt64(n))) }
        let home = try await cluster.status(of: tally).node
        print("durable actor \"tally\" on \(home): 1 + 2 + … + 100 = \(last)")

        let refs = try (0..<2_000).map { try slowSquare.remote($0) }
        let sums = try (1...8).map { try sumOfSquares.remote($0 * 50) }
        try await Task.sleep(for: .milliseconds(100))
        guard let victim = nodes.first(where: { $0.node == home }) else { throw CairnError(.invalidArgument, "the actor is not in a node process") }
        print("SIGKILL \(victim.node) (pid \(victim.pid)) with tasks running and the actor in it")
        kill(victim.pid, SIGKILL)
        let t0 = ContinuousClock.now
        while cluster.aliveNodes.contains(victim.node) { try await Task.sleep(for: .milliseconds(1)) }
        print("\(victim.node) declared dead after \(ContinuousClock.now - t0)")

        let values = try await cluster.get(refs)
        let totals = try await cluster.get(sums)
        let right = values == (0..<2_000).map { $0 * $0 } && totals == (1...8).map { n in (0..<(n * 50)).reduce(0) { $0 + $1 * $1 } }
        print("2,000 tasks and 8 nested sums: \(right ? "every result right" : "WRONG RESULTS")")
        let t1 = ContinuousClock.now
        let next = try await cluster.get(try tally.send(101, caller: me, sequence: 101))
        let status = try await cluster.status(of: tally)
        print("\"tally\" restored on \(status.node) (restart \(status.restarts)); + 101 = \(next) \(next == 5_151 ? "(right)" : "(WRONG)") \(ContinuousClock.now - t1) after the results")
        while cluster.aliveNodes.count < 4 { try await Task.sleep(for: .milliseconds(5)) }
        print("back to 4 live nodes: \(cluster.aliveNodes.map(\.description).joined(separator: ", "))")
        if !right || next != 5_151 { exit(1) }
    }
}
