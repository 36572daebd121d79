import Cairn
import CairnChaosKit
import CairnCore
import Foundation
import Synchronization

/// When the actor finished each message, recorded inside its handler while a measurement runs:
/// the gaps between message completions as the actor sees them, apart from the driver's own delays.
final class CompletionClock: Sendable {
    static let shared = CompletionClock()
    private let times = Mutex<[Double]>([])
    private let recording = Atomic<Bool>(false)

    func start() {
        times.withLock { $0.removeAll(keepingCapacity: true) }
        recording.store(true, ordering: .releasing)
    }

    func record() {
        guard recording.load(ordering: .acquiring) else { return }
        let t = now()
        times.withLock { $0.append(t) }
    }

    /// Stops recording; the longest gap between two recorded completions, in microseconds.
    func stop() -> Double {
        recording.store(false, ordering: .releasing)
        let all = times.withLock { $0 }
        return zip(all, all.dropFirst()).map { ($1 - $0) * 1e6 }.max() ?? 0
    }
}

/// A state of `mebibytes` MiB of seeded pseudo-random bytes (so zstd has real work), kept in
/// 64 KiB chunks: a checkpoint's copy is copy-on-write, so the first write to a chunk after
/// it duplicates that chunk (about 10 us), never the whole state.
struct BenchState: RemoteActor {
    static let chunkSize = 64 << 10
    var chunks: [[UInt8]]
    var writes = 0

    init(mebibytes: Int, seed: UInt64 = 1) {
        var rng = SeededGenerator(seed: seed)
        chunks = (0..<(mebibytes << 20) / Self.chunkSize).map { _ in
            var chunk = [UInt8](repeating: 0, count: Self.chunkSize)
            chunk.withUnsafeMutableBytes { p in
                let words = p.bindMemory(to: UInt64.self)
                for i in words.indices { words[i] = rng.next() & 0x0F0F_0F0F_0F0F_0F0F }
            }
            return chunk
        }
    }

    mutating func receive(_ i: Int) throws -> Int {
        if !chunks.isEmpty { chunks[i % chunks.count][(i &* 4099) % Self.chunkSize] &+= 1 }
        writes += 1
        CompletionClock.shared.record()
        return writes
    }
}

/// `cairn-bench durable` and `cairn-bench recovery`: durable actors on an embedded cluster,
/// with LMDB under `directory`.
struct DurableBenchmark {
    let directory: String

    func cluster(_ sub: String, nodes: Int = 2) async throws -> Cluster {
        try await Cluster.local(ClusterOptions(nodes: Array(repeating: NodeConfiguration(resources: Resources(cpus: 1)), count: nodes),
                                               storage: ActorStorageOptions(location: .directory(directory + "/" + sub))))
    }

    /// Calls per second with `n` calls outstanding at once, median of 3.
    func throughput(_ cluster: Cluster, _ actor: ActorHandle<BenchCounter>, n: Int) async throws -> Double {
        var expected = try await cluster.get(actor.send(0))
        var rates: [Double] = []
        for _ in 0..<3 {
            let t0 = now()
            let refs = try (0..<n).map { _ in try actor.send(1) }
            let values = try await cluster.get(refs)
            rates.append(Double(n) / (now() - t0))
            expected += n
            precondition(values.last == expected, "actor state wrong")
        }
        return median(rates)
    }

    func durable(_ report: Report) async throws {
        let cluster = try await cluster("durable")
        defer { cluster.shutdown() }
        let policy = CheckpointPolicy.every(messages: 100_000, orMilliseconds: 5_000)
        let logged = try await cluster.spawn(BenchCounter(), name: "bench-durable", durability: DurabilityOptions(logging: .durable, checkpoint: policy))
        let memory = try await cluster.spawn(BenchCounter(), name: "bench-memory", durability: DurabilityOptions(logging: .memoryOnly, checkpoint: policy))
        // Warm up both.
        _ = try await cluster.get(try (0..<20_000).map { _ in try logged.send(1) })
        _ = try await cluster.get(try (0..<20_000).map { _ in try memory.send(1) })

        let durableRate = try await throughput(cluster, logged, n: 300_000)
        report.add("durable.calls_per_s", durableRate, "calls/s", goal: ">= 200000")
        let memoryRate = try await throughput(cluster, memory, n: 300_000)
        report.add("durable.memory_only_calls_per_s", memoryRate, "calls/s")
        report.add("durable.cost_ratio", memoryRate / durableRate, "x", goal: "<= 2")

        var rtts: [Double] = []
        for i in 0..<2_000 {
            let t0 = now()
            _ = try await cluster.get(logged.send(1))
            if i >= 200 { rtts.append((now() - t0) * 1e6) }
        }
        report.add("durable.rtt_p50_us", median(rtts), "us", goal: "<= 250")
        report.add("durable.rtt_p99_us", percentile(rtts, 0.99), "us")

        // The longest gap between two message completions while a 64 MiB state is checkpointed,
        // with 16 calls outstanding; and the same without a checkpoint, for comparison.
        for logging in [MessageLogging.durable, .memoryOnly] {
            let name = logging == .durable ? "" : "_memory_only"
            let big = try await cluster.spawn(BenchState(mebibytes: 64), name: "bench-big\(name)",
                                              durability: DurabilityOptions(logging: logging, checkpoint: .never))
            _ = try await cluster.get(cluster.checkpoint(big))
            let baseline = try await maxGap(cluster, big, while: nil)
            var pauses: [(driver: Double, actor: Double)] = []
            for _ in 0..<3 { pauses.append(try await maxGap(cluster, big, while: try cluster.checkpoint(big))) }
            report.add("checkpoint.pause_max_us\(name)", pauses.map(\.driver).max()!, "us", goal: logging == .durable ? "<= 1000" : "")
            report.add("checkpoint.actor_pause_max_us\(name)", pauses.map(\.actor).max()!, "us")
            report.add("checkpoint.no_checkpoint_gap_max_us\(name)", baseline.driver, "us")
            report.add("checkpoint.no_checkpoint_actor_gap_max_us\(name)", baseline.actor, "us")
        }
    }

    /// Keeps 16 calls outstanding until `checkpoint` resolves (or for 20,000 calls) and returns the
    /// longest gap between two completions, in microseconds: as the driver sees replies arrive,
    /// and as the actor finishes messages.
    func maxGap(_ cluster: Cluster, _ actor: ActorHandle<BenchState>, while checkpoint: ObjectRef<UInt64>?) async throws -> (driver: Double, actor: Double) {
        CompletionClock.shared.start()
        var outstanding = try (0..<16).map { try actor.send($0) }
        var last = now()
        var worst = 0.0
        var done = 0
        while true {
            _ = try await cluster.get(outstanding.removeFirst())
            let t = now()
            worst = max(worst, t - last)
            last = t
            done += 1
            if let checkpoint {
                if try await !cluster.wait([checkpoint], timeout: .zero).ready.isEmpty { break }
            } else if done >= 20_000 {
                break
            }
            outstanding.append(try actor.send(done))
        }
        let actorWorst = CompletionClock.shared.stop()
        for ref in outstanding { _ = try await cluster.get(ref) }
        return (worst * 1e6, actorWorst)
    }

    func recovery(_ report: Report) async throws {
        // 64 MiB checkpointed, then 100,000 logged messages after it.
        do {
            let cluster = try await cluster("restore")
            let big = try await cluster.spawn(BenchState(mebibytes: 64), name: "restore-big", durability: DurabilityOptions(checkpoint: .never))
            _ = try await cluster.get(cluster.checkpoint(big))
            for _ in 0..<10 { _ = try await cluster.get(try (0..<10_000).map { try big.send($0) }) }
            cluster.shutdown()
        }
        let placeholder = BenchState(mebibytes: 0)
        do {
            let cluster = try await cluster("restore")
            let t0 = now()
            let big = try await cluster.spawn(placeholder, name: "restore-big", durability: DurabilityOptions(checkpoint: .never))
            let elapsed = now() - t0
            let writes = try await cluster.get(big.send(0))
            precondition(writes == 100_001, "restored state wrong: \(writes)")
            precondition(cluster.metrics.messagesReplayed == 100_000, "replayed \(cluster.metrics.messagesReplayed)")
            report.add("recovery.actor_restore_ms", elapsed * 1000, "ms")
            cluster.shutdown()
        }
        // Replay alone: a small state and 300,000 logged messages.
        do {
            let cluster = try await cluster("replay")
            let counter = try await cluster.spawn(BenchCounter(), name: "replay", durability: DurabilityOptions(checkpoint: .never))
            for _ in 0..<30 { _ = try await cluster.get(try (0..<10_000).map { _ in try counter.send(1) }) }
            cluster.shutdown()
        }
        var replay: [Double] = []
        for _ in 0..<3 {
            let cluster = try await cluster("replay")
            let t0 = now()
            let counter = try await cluster.spawn(BenchCounter(), name: "replay", durability: DurabilityOptions(checkpoint: .never))
            let elapsed = now() - t0
            let total = try await cluster.get(counter.send(0))
            precondition(total == 300_000, "replayed state wrong: \(total)")
            replay.append(Double(cluster.metrics.messagesReplayed) / elapsed)
            cluster.shutdown()
        }
        report.add("recovery.replay_per_s", median(replay), "messages/s", goal: ">= 1000000")

        try killToAnswer(report)
        try await headKillToAnswer(report)
    }

    /// SIGKILL the head of a cluster of processes (`cairn start --head --replicated-storage`,
    /// 2 nodes) while a driver in this process uses a durable Bank actor at 100 messages; the
    /// head's supervisor starts it again on the same port, and the driver connects again as
    /// soon as it can. Times from the kill until the actor, spawned again by name, answers the
    /// next message with every earlier one applied once. Skipped (with the reason) when the
    /// `cairn` binary is not beside this one.
    func headKillToAnswer(_ report: Report) async throws {
        let cairn = executableDirectory() + "/cairn"
        guard access(cairn, X_OK) == 0 else {
            FileHandle.standardError.write(Data("recovery.head_kill_to_answer_ms skipped: no cairn binary at \(cairn) (swift build -c release builds it)\n".utf8))
            return
        }
        let session = HeadSession(cairn: cairn, directory: directory + "/head")
        try session.run(["start", "--head", "--port", "0", "--nodes", "2", "--replicated-storage"])
        defer { try? session.run(["stop"]) }
        var model = Bank()
        var sequence: UInt64 = 0
        func call(_ cluster: Cluster, _ bank: ActorHandle<Bank>, _ message: Bank.Message) async throws {
            sequence += 1
            let reply = try await cluster.get(try bank.send(message, caller: CallerID(77), sequence: sequence), timeout: .seconds(60))
            guard reply == (try model.receive(message)) else { throw BenchError("wrong reply to message \(sequence) after the head's restart: \(reply)") }
        }
        var cluster = try await session.connect()
        var bank = try await cluster.spawn(Bank(), name: "bench-head-bank", resources: Resources(cpus: 1))
        for _ in 0..<100 { try await call(cluster, bank, .deposit(account: 0, amount: 1)) }
        var samples: [Double] = []
        for _ in 0..<3 {
            let t0 = now()
            guard let killed = session.headPID() else { throw BenchError("no head runs in \(session.directory)") }
            kill(killed, SIGKILL)
            cluster.shutdown()
            cluster = try await session.reconnect(replacing: killed)
            bank = try await cluster.spawn(Bank(), name: "bench-head-bank", resources: Resources(cpus: 1))
            try await call(cluster, bank, .audit)
            samples.append((now() - t0) * 1000)
        }
        cluster.shutdown()
        report.add("recovery.head_kill_to_answer_ms", median(samples), "ms")
        report.add("recovery.head_kill_to_answer_max_ms", samples.max()!, "ms")
    }

    /// SIGKILL the process hosting a durable Bank actor whose counter is at 100, restart it on
    /// the same directory, and time until the next call is answered with the right state.
    func killToAnswer(_ report: Report) throws {
        let dir = directory + "/kill"
        let exe = executableDirectory() + "/cairn-bench"
        var samples: [Double] = []
        var seq: UInt64 = 0
        var child = try ChildProcess(executable: exe, arguments: ["--actor-host", dir], input: true)
        guard child.readLine(timeoutMilliseconds: 60_000)?.hasPrefix("R ") == true else { throw BenchError("the actor host did not start") }
        for _ in 0..<100 {
            seq += 1
            child.writeLine("S \(seq) d 0 1 0")
        }
        for _ in 0..<100 { _ = child.readLine(timeoutMilliseconds: 60_000) }
        for round in 0..<7 {
            let t0 = now()
            child.kill()
            child.wait()
            child = try ChildProcess(executable: exe, arguments: ["--actor-host", dir], input: true)
            guard child.readLine(timeoutMilliseconds: 60_000)?.hasPrefix("R ") == true else { throw BenchError("the actor host did not restart") }
            seq += 1
            child.writeLine("S \(seq) a 0 0 0")
            guard let reply = child.readLine(timeoutMilliseconds: 60_000) else { throw BenchError("no reply after restart") }
            let elapsed = now() - t0
            // 100 deposits of 1, then one audit per round: the counter must be exactly there.
            let fields = reply.split(separator: " ")
            guard fields.count == 5, fields[0] == "A", Int(fields[2]) == 101 + round, Int(fields[4]) == 100 else {
                throw BenchError("wrong state after restart \(round): \(reply)")
            }
            samples.append(elapsed * 1000)
        }
        child.kill()
        child.wait()
        report.add("recovery.actor_kill_to_answer_ms", median(samples), "ms", goal: "<= 150")
        report.add("recovery.actor_kill_to_answer_max_ms", samples.max()!, "ms")
    }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
