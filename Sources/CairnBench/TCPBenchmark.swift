import Cairn
import Foundation

let onRemoteNode = RemoteFunction<Int, Int>("bench.onRemoteNode", resources: Resources(cpus: 1, custom: ["remote": 1])) { $0 }

/// `cairn-bench tcp`: the embedded 4-node cluster with its components talking over TCP on
/// loopback (`ClusterOptions.transport = .tcp`), all in this process: the wire's cost under the
/// runtime without the cost of separate processes (`cairn-bench cluster` measures those).
struct TCPBenchmark {
    func run(_ report: Report) async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        options.transport = .tcp(host: "127.0.0.1")
        // Only node 1 can run `onRemoteNode`: each such task crosses the wire three times
        // (node 0 to the scheduler, to node 1, the result back to node 0).
        options.nodes[1].resources = Resources(cpus: 1, custom: ["remote": 1])
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }

        _ = try await cluster.get(try (0..<20_000).map { try emptyTask.remote($0) })
        var rates: [Double] = []
        for _ in 0..<3 {
            let n = 300_000
            let t0 = now()
            let values = try await cluster.get(try (0..<n).map { try emptyTask.remote($0) })
            precondition(values.count == n && values[n - 1] == n - 1, "wrong results")
            rates.append(Double(n) / (now() - t0))
        }
        report.add("tcp.tasks_per_s", median(rates), "tasks/s")

        var rtts: [Double] = []
        for i in 0..<3_000 {
            let t0 = now()
            let v = try await cluster.get(try onRemoteNode.remote(i))
            precondition(v == i)
            if i >= 300 { rtts.append((now() - t0) * 1e6) }
        }
        report.add("tcp.remote_task_rtt_p50_us", median(rtts), "us", goal: "<= 60 (cluster.task_rtt_p50_us, across processes)")
        report.add("tcp.remote_task_rtt_p99_us", percentile(rtts, 0.99), "us")

        let t0 = now()
        let remote = try await cluster.get(try (0..<50_000).map { try onRemoteNode.remote($0) })
        precondition(remote.count == 50_000)
        report.add("tcp.remote_tasks_per_s", 50_000 / (now() - t0), "tasks/s")
    }
}
