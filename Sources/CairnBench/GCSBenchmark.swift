import Cairn
import CairnCore
import CairnGCS
import CairnWire
import Foundation

/// `cairn-bench gcs`: the embedded GCS (chains of 3, each replica in its own LMDB, fsync'd)
/// with one shard and with four: pipelined writes and reads, one-at-a-time write latency, and
/// the longest request latency while a head, a middle and a tail are killed and replaced.
struct GCSBenchmark {
    let directory: String

    func run(_ report: Report) throws {
        for shards in [1, 4] {
            var options = EmbeddedGCS.Options(shards: shards)
            options.directory = directory + "/shards-\(shards)"
            let gcs = try EmbeddedGCS.start(options)
            defer { gcs.shutdown() }
            try gcs.put("warm-up", [1])
            let label = shards == 1 ? "gcs.1shard" : "gcs.4shards"
            report.add("\(label).write_per_s", try pipelined(gcs, count: 20_000, write: true), "writes/s")
            report.add("\(label).read_per_s", try pipelined(gcs, count: 100_000, write: false), "reads/s")
            var latencies: [Double] = []
            for i in 0..<1_000 {
                let t0 = now()
                try gcs.put(GCSTable.keyValue.key("rtt-\(i % 64)"), [UInt8(truncatingIfNeeded: i)])
                latencies.append((now() - t0) * 1e6)
            }
            report.add("\(label).write_p50_us", median(latencies), "us")
            report.add("\(label).write_p99_us", percentile(latencies, 0.99), "us")
            if shards == 1 {
                // Compaction: what the replicas still hold one by one after 21,000 writes, once
                // the last acknowledgements and reports have gone round (reports are a tick old).
                usleep(100_000)
                let statuses = gcs.replicaStatuses()
                report.add("\(label).updates_applied", Double(statuses.map(\.lastSequence).max() ?? 0), "updates")
                report.add("\(label).updates_held_max", Double(statuses.map(\.heldUpdates).max() ?? 0), "updates",
                           goal: "<= \(options.compactEvery + options.compactionRetain)")
            }
            if shards == 1 {
                // What an idle GCS costs, with one subscriber as a cluster's control store has:
                // its threads wake for reports, renewals and resubscriptions only.
                gcs.subscribe(prefix: "idle/") { _ in }
                usleep(200_000)
                report.add("gcs.idle_cpu_percent", Self.cpuPercent(over: 3), "% of a core")
            }
        }
        try failover(report)
        // The same with each replica in a process of its own (this binary started again),
        // SIGKILLed for real and started again from its LMDB by the head.
        try failover(report, processes: ReplicaProcesses(executable: currentExecutablePath(), token: .generate()))
        try overload(report)
    }

    /// This process's CPU time over `seconds` of wall time, in percent of one core.
    static func cpuPercent(over seconds: Double) -> Double {
        func cpu() -> Double {
            var u = rusage()
            getrusage(Int32(RUSAGE_SELF.rawValue), &u)
            return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
        }
        let (c0, t0) = (cpu(), now())
        usleep(UInt32(seconds * 1e6))
        return (cpu() - c0) / (now() - t0) * 100
    }

    /// 20,000 writes with 256 in flight against replicas in processes: the load that could
    /// stall every write for good (see the README). A stall shows as requests that time out,
    /// which stops the benchmark.
    func overload(_ report: Report) throws {
        var options = EmbeddedGCS.Options(shards: 1)
        options.directory = directory + "/overload-processes"
        options.replicaProcesses = ReplicaProcesses(executable: currentExecutablePath(), token: .generate())
        let gcs = try EmbeddedGCS.start(options)
        defer { gcs.shutdown() }
        try gcs.put("warm-up", [1])
        report.add("gcs.processes.write_per_s", try pipelined(gcs, count: 20_000, write: true, inFlight: 256), "writes/s")
    }

    /// Requests with up to `inFlight` in flight; returns requests per second.
    func pipelined(_ gcs: EmbeddedGCS, count: Int, write: Bool, inFlight: Int = 256) throws -> Double {
        let window = DispatchSemaphore(value: inFlight)
        let done = DispatchGroup()
        let failures = Locked(0)
        let value = [UInt8](repeating: 7, count: 64)
        let t0 = now()
        for i in 0..<count {
            window.wait()
            done.enter()
            let key = GCSTable.objects.key("o\(i % 4_096)")
            if write {
                gcs.write(key, value) { r in
                    if case .failure = r { failures.update { $0 += 1 } }
                    window.signal()
                    done.leave()
                }
            } else {
                gcs.read(key) { r in
                    if case .failure = r { failures.update { $0 += 1 } }
                    window.signal()
                    done.leave()
                }
            }
        }
        done.wait()
        let elapsed = now() - t0
        precondition(failures.value == 0, "\(failures.value) GCS requests failed")
        return Double(count) / elapsed
    }

    /// One request in flight at a time, alternating writes and reads of one key; kills the head,
    /// then the middle, then the tail, each time waiting until a standby has taken its place.
    func failover(_ report: Report, processes: ReplicaProcesses? = nil) throws {
        var options = EmbeddedGCS.Options(shards: 1)
        options.directory = directory + (processes == nil ? "/failover" : "/failover-processes")
        options.replicaProcesses = processes
        let prefix = processes == nil ? "gcs" : "gcs.processes"
        let gcs = try EmbeddedGCS.start(options)
        defer { gcs.shutdown() }
        try gcs.put("warm-up", [1])
        // A history as long as a replica holds at most (the newest `compactionRetain` plus up
        // to `compactEvery` more): what a standby that joins has to catch up on.
        // (16 in flight, as the failover figures have always been measured; 256 are measured below.)
        _ = try pipelined(gcs, count: Int(options.compactEvery + options.compactionRetain), write: true, inFlight: 16)
        let stop = Locked(0)
        let worst = Locked<Double>(0)
        let wrong = Locked(0)
        let writes = Locked<[Double]>([])
        let driver = Thread {
            var i: UInt64 = 0
            while stop.value == 0 {
                i += 1
                let v = withUnsafeBytes(of: i) { Array($0) }
                var t0 = now()
                do { try gcs.put("failover", v) } catch { wrong.update { $0 += 1 } }
                let took = now() - t0
                worst.update { $0 = max($0, took) }
                writes.update { $0.append(took * 1e6) }
                t0 = now()
                if (try? gcs.get("failover")) != v { wrong.update { $0 += 1 } }
                worst.update { $0 = max($0, now() - t0) }
            }
            stop.update { $0 += 1 }
        }
        driver.start()
        usleep(200_000)
        // The same requests with nothing killed, over windows as long as the failovers' below:
        // what the machine alone makes the slowest request take.
        var windows: [Double] = []
        var steady = 0.0
        for _ in 0..<3 {
            worst.update { $0 = 0 }
            usleep(300_000)
            steady = max(steady, worst.value * 1e3)
        }
        var overall = 0.0
        for role in ["head", "middle", "tail"] {
            worst.update { $0 = 0 }
            let windowStart = now()
            let config = gcs.configurations()[0]
            let victim = role == "head" ? config.head : role == "tail" ? config.tail : config.chain[1]
            let pid = gcs.replicaProcesses.first { $0.replica == victim }?.pid
            try gcs.kill(replica: victim)
            // Replaced: three replicas again, the standby caught up and serving (and a killed
            // replica process started again).
            let deadline = now() + 10
            while now() < deadline {
                let c = gcs.configurations()[0]
                let restarted = pid == nil || gcs.replicaProcesses.first { $0.replica == victim }?.pid != pid
                if c.chain.count == 3 && c.learner == nil && (processes != nil || !c.chain.contains(victim)) && restarted { break }
                usleep(1_000)
            }
            usleep(100_000)
            let w = worst.value * 1e3
            windows.append((now() - windowStart) * 1e3)
            report.add("\(prefix).failover_\(role)_max_ms", w, "ms")
            overall = max(overall, w)
            try gcs.restart(replica: victim)  // back as the standby
            usleep(100_000)
        }
        stop.update { $0 += 1 }
        while stop.value < 2 { usleep(1_000) }
        precondition(wrong.value == 0, "\(wrong.value) requests failed or read a wrong value during failover")
        report.add("\(prefix).failover_max_ms", overall, "ms", goal: "<= 10")
        report.add("\(prefix).failover_window_ms", windows.max()!, "ms")
        report.add("\(prefix).no_failover_max_ms", steady, "ms")
        report.add("\(prefix).failover_run_write_p50_us", median(writes.value), "us")
    }
}
