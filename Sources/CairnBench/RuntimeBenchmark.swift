import Cairn
import Foundation

let emptyTask = RemoteFunction<Int, Int>("bench.empty") { $0 }
let incrementTask = RemoteFunction<Int, Int>("bench.increment") { $0 + 1 }
let sumTask = RemoteFunction2<Int, Int, Int>("bench.sum") { $0 + $1 }

struct BenchCounter: RemoteActor {
    var total = 0
    mutating func receive(_ n: Int) throws -> Int {
        total &+= n
        return total
    }
}

/// Resident set size of this process, in MiB.
func residentMiB() -> Double {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
          let kb = Double(line.split(separator: " ").dropFirst().first ?? "") else { return .nan }
    return kb / 1024
}

/// `cairn-bench tasks` and `cairn-bench actors`, on an embedded cluster of 4 nodes.
struct RuntimeBenchmark {
    let nodes = 4

    func start(_ report: Report) async throws -> Cluster {
        let rssBefore = residentMiB()
        let t0 = now()
        let cluster = try await Cluster.local(nodes: nodes)
        let elapsed = now() - t0
        report.add("cluster.start_ms", elapsed * 1000, "ms", goal: "<= 50")
        report.add("cluster.rss_mib", residentMiB(), "MiB", goal: "<= 30")
        report.add("cluster.rss_added_mib", residentMiB() - rssBefore, "MiB")
        return cluster
    }

    func tasks(_ report: Report, _ cluster: Cluster) async throws {
        // Warm up threads and caches.
        _ = try await cluster.get(try (0..<20_000).map { try emptyTask.remote($0) })

        var rates: [Double] = []
        for _ in 0..<3 {
            let n = 500_000
            let t0 = now()
            let refs = try (0..<n).map { try emptyTask.remote($0) }
            let values = try await cluster.get(refs)
            let elapsed = now() - t0
            precondition(values.count == n && values[n - 1] == n - 1, "wrong results")
            rates.append(Double(n) / elapsed)
        }
        report.add("tasks.empty_per_s", median(rates), "tasks/s", goal: ">= 1000000 (floor 250000)")

        var rtts: [Double] = []
        for i in 0..<5_000 {
            let t0 = now()
            let v = try await cluster.get(try emptyTask.remote(i))
            let t1 = now()
            precondition(v == i)
            if i >= 500 { rtts.append((t1 - t0) * 1e6) }
        }
        report.add("tasks.rtt_p50_us", median(rtts), "us", goal: "<= 5 (ceiling 20)")
        report.add("tasks.rtt_p99_us", percentile(rtts, 0.99), "us")

        var chains: [Double] = []
        for _ in 0..<7 {
            let t0 = now()
            var ref = cluster.put(0)
            for _ in 0..<1000 { ref = try incrementTask.remote(ref) }
            let v = try await cluster.get(ref)
            chains.append((now() - t0) * 1000)
            precondition(v == 1000)
        }
        report.add("tasks.chain1000_ms", median(chains), "ms", goal: "<= 10 (ceiling 50)")

        var fanins: [Double] = []
        for _ in 0..<7 {
            let t0 = now()
            var level = try (0..<1024).map { try emptyTask.remote($0) }
            while level.count > 1 {
                level = try stride(from: 0, to: level.count, by: 2).map { try sumTask.remote(level[$0], level[$0 + 1]) }
            }
            let v = try await cluster.get(level[0])
            fanins.append((now() - t0) * 1000)
            precondition(v == (0..<1024).reduce(0, +))
        }
        report.add("tasks.fanin1024_ms", median(fanins), "ms")
    }

    func actors(_ report: Report, _ cluster: Cluster) async throws {
        let counter = try await cluster.spawn(BenchCounter())
        _ = try await cluster.get(try (0..<20_000).map { _ in try counter.send(1) })
        var rates: [Double] = []
        var expected = 20_000
        for _ in 0..<3 {
            let n = 500_000
            let t0 = now()
            let refs = try (0..<n).map { _ in try counter.send(1) }
            let values = try await cluster.get(refs)
            let elapsed = now() - t0
            expected += n
            precondition(values.last == expected, "actor state wrong")
            rates.append(Double(n) / elapsed)
        }
        report.add("actors.calls_per_s", median(rates), "calls/s", goal: ">= 1000000 (floor 250000)")

        var rtts: [Double] = []
        for i in 0..<5_000 {
            let t0 = now()
            _ = try await cluster.get(try counter.send(1))
            let t1 = now()
            if i >= 500 { rtts.append((t1 - t0) * 1e6) }
        }
        report.add("actors.rtt_p50_us", median(rtts), "us", goal: "<= 5 (ceiling 20)")
        report.add("actors.rtt_p99_us", percentile(rtts, 0.99), "us")
    }
}
