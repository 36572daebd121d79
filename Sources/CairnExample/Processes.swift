import Cairn
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// `cairn-example processes`: a cluster whose nodes and global scheduler are processes (this
// program started again). Tasks fan out over them; one node process is SIGKILLed while they
// run; every result still comes back right, and a replacement node joins.

enum ProcessDemo {
    static let slowSquare = RemoteFunction<Int, Int>("demo.slowSquare") { x in
        usleep(2_000)
        return x * x
    }

    /// Sum of squares of 0..<n, as nested tasks on whatever node runs this one.
    static let sumOfSquares = RemoteFunction<Int, Int>("demo.sumOfSquares") { n in
        try (0..<n).map { try slowSquare.remote($0) }.reduce(0) { $0 + (try $1.get()) }
    }

    static func register() {
        _ = (slowSquare, sumOfSquares)
    }

    static func run() async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        options.processes = true
        options.controlStore = .inMemory
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let nodes = cluster.nodeProcesses
        print("head pid \(getpid()); node processes: \(nodes.map { "\($0.node) (pid \($0.pid))" }.joined(separator: ", ")); scheduler pid \(cluster.schedulerProcess.map(String.init) ?? "?")")

        let refs = try (0..<2_000).map { try slowSquare.remote($0) }
        let sums = try (1...8).map { try sumOfSquares.remote($0 * 50) }
        try await Task.sleep(for: .milliseconds(100))
        let victim = nodes[1]
        print("SIGKILL \(victim.node) (pid \(victim.pid)) with tasks running")
        kill(victim.pid, SIGKILL)
        let t0 = ContinuousClock.now
        while cluster.aliveNodes.contains(victim.node) { try await Task.sleep(for: .milliseconds(1)) }
        print("\(victim.node) declared dead after \(ContinuousClock.now - t0)")

        let values = try await cluster.get(refs)
        let totals = try await cluster.get(sums)
        let right = values == (0..<2_000).map { $0 * $0 } && totals == (1...8).map { n in (0..<(n * 50)).reduce(0) { $0 + $1 * $1 } }
        print("2,000 tasks and 8 nested sums: \(right ? "every result right" : "WRONG RESULTS")")
        while cluster.aliveNodes.count < 4 { try await Task.sleep(for: .milliseconds(5)) }
        print("back to 4 live nodes: \(cluster.aliveNodes.map(\.description).joined(separator: ", "))")
        if !right { exit(1) }
    }
}
