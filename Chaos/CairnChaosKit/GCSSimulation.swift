import CairnCore
import CairnGCS

/// A seeded, deterministic simulation of the GCS in virtual time: sharded chains, their
/// coordinator, client sessions and subscribers, over a network that drops, duplicates,
/// delays and so reorders messages. Replicas and the coordinator crash (memory lost, what they
/// persisted kept) and restart; the coordinator removes failed replicas and adds standbys back.
///
/// A run has two phases. Under faults, clients write and read shared keys. Then the faults
/// stop, partitions heal, everything down restarts, and every client reads every key once more; the run ends
/// when those reads are answered and every subscriber has caught up. The checks:
/// - the history of client operations is linearizable per key (``Linearizability``);
/// - every acknowledged write is in its shard's tail log;
/// - along each chain, the tail's log is a prefix of every other member's;
/// - each subscriber received exactly the committed changes of its prefix, in order, once;
/// - the run finished (no operation or subscription stuck once the faults stopped).
/// Everything random comes from the seed, so a failing seed replays exactly.
public struct GCSSimulation {
    public struct Options: Sendable {
        public var seed: UInt64
        public var shards = 2
        /// Replicas per shard: `replicationFactor` in the chain, the rest standing by.
        public var replicasPerShard = 4
        public var replicationFactor = 3
        public var clients = 4
        public var operationsPerClient = 16
        /// Keys the clients share: fewer keys, more contention.
        public var keys = 3
        /// Probability that a message is lost, or delivered twice, while faults run.
        public var dropRate = 0.08
        public var duplicateRate = 0.04
        /// Most time units a message takes (at least 1).
        public var maxDelay: UInt64 = 6
        /// Probability per time unit that a replica crashes (while fewer than `maxDown` are down).
        public var crashRate = 0.012
        public var maxDown = 2
        /// Probability per time unit that the coordinator crashes.
        public var coordinatorCrashRate = 0.002
        /// Probability per time unit that a live replica is cut off from the coordinator (and,
        /// half the time, from the other replicas too) while clients still reach it: the
        /// coordinator then suspects a replica that is alive and still believes its role.
        public var partitionRate = 0.004
        public var tickInterval: UInt64 = 4
        /// Drawn from the seed when nil (12–40): sometimes shorter than the lease, so the
        /// coordinator must wait out a suspected tail's lease before it replaces it.
        public var failureTimeout: UInt64?
        /// Drawn from the seed when nil (20–48); it must outlast a report's round trip.
        public var leaseDuration: UInt64?
        public var resendInterval: UInt64 = 14
        /// Faults stop at this time even if clients are not done.
        public var faultsUntil: UInt64 = 3_000
        /// The run is declared stuck after this time.
        public var timeLimit: UInt64 = 20_000
        /// Print every event except reports and their replies (for replaying a failing seed).
        public var trace = false

        public init(seed: UInt64) { self.seed = seed }
    }

    public struct Outcome: Sendable {
        public var seed: UInt64
        public var history: [Linearizability.Entry]
        public var verdict: Linearizability.Verdict
        /// What failed, one line each; empty when the run passed.
        public var failures: [String]
        public var completed: Int
        public var crashes: Int
        public var coordinatorCrashes: Int
        public var partitions: Int
        public var reconfigurations: Int
        public var messages: Int
        public var endTime: UInt64

        public var passed: Bool { failures.isEmpty }
        public var replay: String { "swift run cairn-chaos gcs-sim --seed \(seed)" }
    }

    struct InFlight {
        var time: UInt64
        var order: Int
        var message: GCSMessage
        var from: Endpoint
        var to: Endpoint
    }

    struct Persisted {
        var log: [ChainUpdate] = []
        var config: ChainConfig?
    }

    static func encode(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func decode(_ b: [UInt8]?) -> UInt64? {
        guard let b, b.count == 8 else { return nil }
        return b.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
    }

    public static func run(_ o: Options) -> Outcome {
        var rng = SeededGenerator(seed: o.seed)
        let failureTimeout = o.failureTimeout ?? UInt64.random(in: 12...40, using: &rng)
        let leaseDuration = o.leaseDuration ?? UInt64.random(in: 20...48, using: &rng)
        let replicaOptions = ChainReplica.Options(leaseDuration: leaseDuration)
        let coordinatorOptions = Coordinator.Options(replicationFactor: o.replicationFactor, failureTimeout: failureTimeout, leaseDuration: leaseDuration)
        var shardOf: [ReplicaID: Int] = [:]
        var initial: [ChainConfig] = []
        for s in 0..<o.shards {
            let ids = (0..<o.replicasPerShard).map { s * o.replicasPerShard + $0 }
            for r in ids { shardOf[r] = s }
            initial.append(ChainConfig(shard: s, epoch: 1, chain: Array(ids.prefix(o.replicationFactor))))
        }
        let replicaIDs = shardOf.keys.sorted()
        var persisted: [ReplicaID: Persisted] = [:]
        var replicas: [ReplicaID: ChainReplica] = [:]
        for r in replicaIDs {
            let config = initial[shardOf[r]!].chain.contains(r) ? initial[shardOf[r]!] : nil
            persisted[r] = Persisted(log: [], config: config)
            replicas[r] = ChainReplica(id: r, shard: shardOf[r]!, options: replicaOptions, recovering: [], config: config)
        }
        var downUntil: [ReplicaID: UInt64] = [:]
        /// Cut-off replicas: until when, and whether from the other replicas as well.
        var cutUntil: [ReplicaID: (until: UInt64, fromReplicas: Bool)] = [:]
        var coordinatorConfigs = initial
        var coordinator: Coordinator? = Coordinator(configs: initial, replicas: shardOf, options: coordinatorOptions, now: 0)
        var coordinatorDownUntil: UInt64?

        var clients = (0..<o.clients).map { GCSClient(id: $0, shardCount: o.shards, resendInterval: o.resendInterval) }
        // One subscriber to everything, one to a single key's prefix.
        let subscriberBase = 1_000
        var subscribers = [GCSSubscriber(id: subscriberBase, prefix: "", shardCount: o.shards, resubscribeInterval: 3 * o.resendInterval),
                           GCSSubscriber(id: subscriberBase + 1, prefix: "k1", shardCount: o.shards, resubscribeInterval: 3 * o.resendInterval)]
        var received: [[[ChainUpdate]]] = subscribers.map { _ in Array(repeating: [], count: o.shards) }

        let keys = (0..<o.keys).map { "k\($0)" }
        var plan: [[GCSClient.Operation]] = clients.indices.map { c in
            (0..<o.operationsPerClient).map { i in
                let key = keys[Int.random(in: 0..<o.keys, using: &rng)]
                return Bool.random(using: &rng) ? .write(key: key, value: encode(UInt64(c) * 1_000_000 + UInt64(i + 1))) : .read(key: key)
            }
        }
        var history: [Linearizability.Entry] = []
        var open: [Int?] = Array(repeating: nil, count: o.clients)
        var acknowledged: [(RequestID, String)] = []
        var network: [InFlight] = []
        var order = 0
        var now: UInt64 = 0
        var crashes = 0
        var coordinatorCrashes = 0
        var partitions = 0
        var reconfigurations = 0
        var messages = 0
        var faults = true
        var failures: [String] = []

        func log(_ line: @autoclosure () -> String) {
            if o.trace { print("t=\(now) \(line())") }
        }

        func severed(_ a: Endpoint, _ b: Endpoint) -> Bool {
            for (x, y) in [(a, b), (b, a)] {
                guard case .replica(let r) = x, let cut = cutUntil[r] else { continue }
                if y == .coordinator { return true }
                if cut.fromReplicas, case .replica = y { return true }
            }
            return false
        }

        func post(_ m: GCSMessage, from: Endpoint, to: Endpoint) {
            messages += 1
            if severed(from, to) { return }
            if faults && Double.random(in: 0..<1, using: &rng) < o.dropRate { return }
            let copies = faults && Double.random(in: 0..<1, using: &rng) < o.duplicateRate ? 2 : 1
            for _ in 0..<copies {
                order += 1
                network.append(InFlight(time: now + UInt64.random(in: 1...o.maxDelay, using: &rng), order: order, message: m, from: from, to: to))
            }
        }

        func perform(_ actions: [GCSAction], from: Endpoint) {
            for a in actions {
                switch a {
                case .persist(let u):
                    guard case .replica(let r) = from else { preconditionFailure("only replicas persist updates") }
                    precondition(u.sequence == UInt64(persisted[r]!.log.count + 1), "replica \(r) persisted \(u.sequence) out of order")
                    persisted[r]!.log.append(u)
                case .persistTruncation(let keep):
                    guard case .replica(let r) = from else { preconditionFailure("only replicas truncate") }
                    log("replica \(r) truncates its log to \(keep)")
                    persisted[r]!.log.removeLast(max(0, persisted[r]!.log.count - Int(keep)))
                case .persistConfig(let c):
                    switch from {
                    case .replica(let r): persisted[r]!.config = c
                    case .coordinator:
                        log("coordinator: \(c)")
                        coordinatorConfigs[c.shard] = c
                        reconfigurations += 1
                    case .client: preconditionFailure("clients persist nothing")
                    }
                case .send(let m, let to):
                    post(m, from: from, to: to)
                }
            }
        }

        func startNext(_ c: Int) {
            guard clients[c].outstanding == nil, !plan[c].isEmpty else { return }
            let operation = plan[c].removeFirst()
            let recorded: Linearizability.Operation
            switch operation {
            case .write(_, let value): recorded = .write(decode(value)!)
            case .read: recorded = .read(nil)  // filled in when answered
            }
            open[c] = history.count
            history.append(Linearizability.Entry(client: c, key: operation.key, operation: recorded, call: now, returned: nil))
            perform(clients[c].start(operation, now: now), from: .client(c))
        }

        func caughtUp() -> Bool {
            for (i, sub) in subscribers.enumerated() {
                for s in 0..<o.shards {
                    let tail = coordinatorConfigs[s].tail
                    guard let r = replicas[tail] else { return false }
                    if received[i][s].count != r.log.filter({ $0.key.hasPrefix(sub.prefix) }).count { return false }
                }
            }
            return true
        }

        for c in clients.indices { startNext(c) }

        while now < o.timeLimit {
            now += 1
            if faults && (now >= o.faultsUntil || plan.allSatisfy(\.isEmpty) && open.allSatisfy({ $0 == nil })) {
                // The faults stop: everything restarts, and every client reads every key once more.
                faults = false
                cutUntil = [:]
                for r in Array(downUntil.keys) { downUntil[r] = now }
                if coordinatorDownUntil != nil { coordinatorDownUntil = now }
                for c in plan.indices {
                    plan[c] += keys.map { .read(key: $0) }
                    startNext(c)
                }
            }
            network.sort { ($0.time, $0.order) < ($1.time, $1.order) }
            var due = 0
            while due < network.count && network[due].time <= now { due += 1 }
            let delivering = network[..<due]
            network.removeFirst(due)
            for m in delivering {
                if o.trace {
                    switch m.message {
                    case .report, .configure: break
                    default: log("\(m.from) -> \(m.to): \(m.message)")
                    }
                }
                switch m.to {
                case .replica(let r):
                    guard replicas[r] != nil else { continue }  // down: lost
                    perform(replicas[r]!.handle(m.message, from: m.from, now: now), from: m.to)
                case .coordinator:
                    guard coordinator != nil else { continue }
                    perform(coordinator!.handle(m.message, from: m.from, now: now), from: .coordinator)
                case .client(let id) where id >= subscriberBase:
                    let i = id - subscriberBase
                    let (changes, actions) = subscribers[i].handle(m.message, from: m.from, now: now)
                    for u in changes { received[i][shard(of: u.key, shards: o.shards)].append(u) }
                    perform(actions, from: m.to)
                case .client(let c):
                    let (outcome, actions) = clients[c].handle(m.message, now: now)
                    perform(actions, from: m.to)
                    guard let outcome, let i = open[c] else { continue }
                    history[i].returned = now
                    switch outcome {
                    case .written:
                        if case .written(let request) = m.message { acknowledged.append((request, history[i].key)) }
                    case .read(let value):
                        history[i].operation = .read(decode(value))
                    }
                    open[c] = nil
                    startNext(c)
                }
            }
            // Crashes and restarts.
            for (r, until) in downUntil where until <= now {
                log("replica \(r) restarts with \(persisted[r]!.log.count) updates")
                replicas[r] = ChainReplica(id: r, shard: shardOf[r]!, options: replicaOptions, recovering: persisted[r]!.log, config: persisted[r]!.config)
                downUntil[r] = nil
            }
            if let until = coordinatorDownUntil, until <= now {
                coordinator = Coordinator(configs: coordinatorConfigs, replicas: shardOf, options: coordinatorOptions, now: now)
                coordinatorDownUntil = nil
            }
            if faults {
                if downUntil.count < o.maxDown, Double.random(in: 0..<1, using: &rng) < o.crashRate {
                    let r = replicaIDs[Int.random(in: 0..<replicaIDs.count, using: &rng)]
                    if replicas[r] != nil {
                        log("replica \(r) crashes")
                        replicas[r] = nil
                        if coordinator != nil && Bool.random(using: &rng) {
                            // Half the time a supervisor sees the exit and tells the coordinator at once.
                            perform(coordinator!.replicaExited(r, now: now), from: .coordinator)
                        }
                        downUntil[r] = now + UInt64.random(in: 5...80, using: &rng)
                        crashes += 1
                    }
                }
                for (r, cut) in cutUntil where cut.until <= now {
                    log("replica \(r) reconnects")
                    cutUntil[r] = nil
                }
                if cutUntil.isEmpty, Double.random(in: 0..<1, using: &rng) < o.partitionRate {
                    let r = replicaIDs[Int.random(in: 0..<replicaIDs.count, using: &rng)]
                    let fromReplicas = Bool.random(using: &rng)
                    cutUntil[r] = (now + UInt64.random(in: 20...120, using: &rng), fromReplicas)
                    partitions += 1
                    log("replica \(r) is cut off from the coordinator\(fromReplicas ? " and the other replicas" : "")")
                }
                if coordinator != nil, Double.random(in: 0..<1, using: &rng) < o.coordinatorCrashRate {
                    log("coordinator crashes")
                    coordinator = nil
                    coordinatorDownUntil = now + UInt64.random(in: 5...40, using: &rng)
                    coordinatorCrashes += 1
                }
            }
            // Timers.
            if now % o.tickInterval == 0 {
                for r in replicaIDs where replicas[r] != nil { perform(replicas[r]!.tick(now: now), from: .replica(r)) }
                if coordinator != nil { perform(coordinator!.tick(now: now), from: .coordinator) }
            }
            for c in clients.indices { perform(clients[c].tick(now: now), from: .client(c)) }
            for i in subscribers.indices { perform(subscribers[i].tick(now: now), from: .client(subscriberBase + i)) }
            if !faults && plan.allSatisfy(\.isEmpty) && open.allSatisfy({ $0 == nil }) && caughtUp() { break }
        }

        // The checks.
        let verdict = Linearizability.check(history)
        if !verdict.linearizable { failures.append("not linearizable on key \(verdict.failingKey ?? "?")") }
        if now >= o.timeLimit {
            let stuck = history.filter { $0.returned == nil }.count
            failures.append("stuck: \(stuck) operations unanswered, subscribers \(caughtUp() ? "caught up" : "behind") at t=\(now) (configs: \(coordinatorConfigs.map(\.description).joined(separator: "; ")))")
        }
        for s in 0..<o.shards {
            let config = coordinatorConfigs[s]
            guard let tail = replicas[config.tail] else { failures.append("shard \(s): tail \(config.tail) is down at the end"); continue }
            let tailLog = Set(tail.log.map(\.request))
            let lost = acknowledged.filter { shard(of: $0.1, shards: o.shards) == s && !tailLog.contains($0.0) }.map(\.0)
            if !lost.isEmpty { failures.append("shard \(s): acknowledged writes missing from the tail's log: \(lost)") }
            for r in config.chain {
                guard let replica = replicas[r] else { continue }
                if !replica.log.starts(with: tail.log) && !tail.log.starts(with: replica.log) {
                    failures.append("shard \(s): replica \(r)'s log and the tail's diverge")
                }
            }
            for (i, sub) in subscribers.enumerated() {
                let committed = tail.log.filter { $0.key.hasPrefix(sub.prefix) }
                if !committed.starts(with: received[i][s]) {
                    failures.append("shard \(s): subscriber '\(sub.prefix)' received changes out of order, twice, or never committed")
                }
            }
        }
        return Outcome(seed: o.seed, history: history, verdict: verdict, failures: failures,
                       completed: history.filter { $0.returned != nil }.count, crashes: crashes,
                       coordinatorCrashes: coordinatorCrashes, partitions: partitions, reconfigurations: reconfigurations,
                       messages: messages, endTime: now)
    }
}
