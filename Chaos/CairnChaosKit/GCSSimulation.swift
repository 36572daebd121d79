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
/// - along each chain, the tail's log is a prefix of every other member's (compared whole: the
///   simulation keeps, beside each replica's persisted state, the full log that state stands
///   for, and checks that the replica's compacted base and store are that log folded);
/// - each subscriber received exactly the committed changes of its prefix, in order, once,
///   or, where it started before what the tail still held, a snapshot equal to those changes
///   folded;
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
        /// Drawn from the seed when nil (0–10): how long a shortened chain waits for a learner
        /// (``Coordinator/Options/learnerDelay``).
        public var learnerDelay: UInt64?
        /// Time between a replica's reports (``ChainReplica/Options/reportInterval``); drawn
        /// from the seed when nil (0, every tick, up to half the failure timeout and the lease).
        /// The retransmit interval is drawn too (0–8).
        public var reportInterval: UInt64?
        public var resendInterval: UInt64 = 14
        /// Compaction (``ChainReplica/Options/compactEvery``); drawn from the seed when nil
        /// (never, or every 1 to 8 updates), with `retain` 0–3 and snapshot parts of 1–40 bytes.
        public var compactEvery: UInt64?
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
        /// Compactions persisted, snapshots installed by learners, and snapshots subscribers took.
        public var compactions: Int
        public var snapshotInstalls: Int
        public var subscriberSnapshots: Int
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
        /// The updates after the snapshot's base.
        var log: [ChainUpdate] = []
        var config: ChainConfig?
        var snapshot: ChainSnapshot?
        /// Not persisted: every update the persisted state stands for, from the first, for the checks.
        var full: [ChainUpdate] = []
        var baseSequence: UInt64 { snapshot?.base.sequence ?? 0 }
    }

    /// The store after `updates`, keys with `prefix` only.
    static func fold(_ updates: some Sequence<ChainUpdate>, prefix: String = "") -> [String: [UInt8]] {
        var store: [String: [UInt8]] = [:]
        for u in updates where u.key.hasPrefix(prefix) { store[u.key] = u.value }
        return store
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
        let compactEvery = o.compactEvery ?? [0, 1, 2, 4, 8][Int.random(in: 0..<5, using: &rng)]
        var replicaOptions = ChainReplica.Options(leaseDuration: leaseDuration, compactEvery: compactEvery,
                                                  retain: UInt64.random(in: 0...3, using: &rng),
                                                  snapshotChunkBytes: Int.random(in: 1...40, using: &rng),
                                                  window: [1, 2, 3, 64][Int.random(in: 0..<4, using: &rng)])
        let learnerDelay = o.learnerDelay ?? UInt64.random(in: 0...10, using: &rng)
        replicaOptions.reportInterval = o.reportInterval ?? UInt64.random(in: 0...min(12, failureTimeout / 2, leaseDuration / 2), using: &rng)
        replicaOptions.retransmitInterval = UInt64.random(in: 0...8, using: &rng)
        let coordinatorOptions = Coordinator.Options(replicationFactor: o.replicationFactor, failureTimeout: failureTimeout, leaseDuration: leaseDuration,
                                                     learnerDelay: learnerDelay)
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
            persisted[r] = Persisted(config: config)
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
        var compactions = 0
        var snapshotInstalls = 0
        var messages = 0
        var faults = true
        var failures: [String] = []
        /// The replica whose message is being handled (the tail sending a snapshot to a learner).
        var sender: Endpoint?

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
                    precondition(u.sequence == persisted[r]!.baseSequence + UInt64(persisted[r]!.log.count + 1), "replica \(r) persisted \(u.sequence) out of order")
                    persisted[r]!.log.append(u)
                    persisted[r]!.full.append(u)
                case .persistTruncation(let keep):
                    guard case .replica(let r) = from else { preconditionFailure("only replicas truncate") }
                    log("replica \(r) truncates its log to \(keep)")
                    precondition(keep >= persisted[r]!.baseSequence, "replica \(r) truncates below its compacted base")
                    persisted[r]!.log.removeLast(max(0, persisted[r]!.log.count - Int(keep - persisted[r]!.baseSequence)))
                    persisted[r]!.full.removeLast(max(0, persisted[r]!.full.count - Int(keep)))
                case .persistCompaction(let c):
                    guard case .replica(let r) = from else { preconditionFailure("only replicas compact") }
                    var p = persisted[r]!
                    compactions += 1
                    precondition(c.previous == p.baseSequence && c.base.sequence <= p.baseSequence + UInt64(p.log.count),
                                 "replica \(r) compacts \(c.previous)...\(c.base.sequence) with base \(p.baseSequence) and \(p.log.count) updates after it")
                    var store = p.snapshot?.store ?? [:]
                    for (key, value) in c.changes { store[key] = value }
                    p.log.removeFirst(Int(c.base.sequence - c.previous))
                    p.snapshot = ChainSnapshot(base: c.base, store: store)
                    if store != fold(p.full.prefix(Int(c.base.sequence))) { failures.append("replica \(r)'s compaction to \(c.base.sequence) is not its log folded") }
                    persisted[r] = p
                case .persistSnapshot(let snapshot):
                    guard case .replica(let r) = from, case .replica(let tail)? = sender else { preconditionFailure("a learner installs what a tail sent") }
                    snapshotInstalls += 1
                    log("replica \(r) installs a snapshot at \(snapshot.base.sequence) from \(tail)")
                    let full = Array(persisted[tail]!.full.prefix(Int(snapshot.base.sequence)))
                    if full.count != Int(snapshot.base.sequence) || fold(full) != snapshot.store {
                        failures.append("replica \(r) installed a snapshot at \(snapshot.base.sequence) that is not replica \(tail)'s log folded")
                    }
                    persisted[r]!.log = []
                    persisted[r]!.snapshot = snapshot
                    persisted[r]!.full = full
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
                    guard replicas[tail] != nil else { return false }
                    let last = persisted[tail]!.full.last(where: { $0.key.hasPrefix(sub.prefix) })?.sequence ?? 0
                    if subscribers[i].lastSeen[s] < last { return false }
                }
            }
            return true
        }

        /// Every shard's tail has taken its configuration and serves: one still owed its handoff
        /// may lack updates its predecessor holds (and will send it), so the checks would read
        /// a log that is about to grow.
        func tailsServe() -> Bool {
            coordinatorConfigs.allSatisfy { c in
                replicas[c.tail].map { $0.config?.epoch == c.epoch && $0.serving } == true
            }
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
                    sender = m.from
                    perform(replicas[r]!.handle(m.message, from: m.from, now: now), from: m.to)
                    sender = nil
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
            // (Dictionaries in key order: a seed runs the same in every process.)
            for (r, until) in downUntil.sorted(by: { $0.key < $1.key }) where until <= now {
                log("replica \(r) restarts with \(persisted[r]!.log.count) updates after a base of \(persisted[r]!.baseSequence)")
                replicas[r] = ChainReplica(id: r, shard: shardOf[r]!, options: replicaOptions, recovering: persisted[r]!.log,
                                           config: persisted[r]!.config, snapshot: persisted[r]!.snapshot)
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
                for (r, cut) in cutUntil.sorted(by: { $0.key < $1.key }) where cut.until <= now {
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
            if !faults && plan.allSatisfy(\.isEmpty) && open.allSatisfy({ $0 == nil }) && caughtUp() && tailsServe() { break }
        }

        // The checks.
        let verdict = Linearizability.check(history)
        if !verdict.linearizable { failures.append("not linearizable on key \(verdict.failingKey ?? "?")") }
        if now >= o.timeLimit {
            let stuck = history.filter { $0.returned == nil }.count
            failures.append("stuck: \(stuck) operations unanswered, subscribers \(caughtUp() ? "caught up" : "behind") at t=\(now) (configs: \(coordinatorConfigs.map(\.description).joined(separator: "; ")))")
        }
        // Each live replica's memory is what it persisted, and its store is its whole log folded.
        for (r, replica) in replicas.sorted(by: { $0.key < $1.key }) {
            let p = persisted[r]!
            if replica.base.sequence != p.baseSequence || replica.log != p.log || replica.store != fold(p.full) {
                failures.append("replica \(r): its base, log or store differs from its persisted state (base \(replica.base.sequence) vs \(p.baseSequence))")
            }
        }
        for s in 0..<o.shards {
            let config = coordinatorConfigs[s]
            guard replicas[config.tail] != nil else { failures.append("shard \(s): tail \(config.tail) is down at the end"); continue }
            let tailLog = persisted[config.tail]!.full
            let tailRequests = Set(tailLog.map(\.request))
            let lost = acknowledged.filter { shard(of: $0.1, shards: o.shards) == s && !tailRequests.contains($0.0) }.map(\.0)
            if !lost.isEmpty { failures.append("shard \(s): acknowledged writes missing from the tail's log: \(lost)") }
            for r in config.chain where replicas[r] != nil {
                let full = persisted[r]!.full
                if !full.starts(with: tailLog) && !tailLog.starts(with: full) {
                    failures.append("shard \(s): replica \(r)'s log and the tail's diverge")
                }
            }
            for (i, sub) in subscribers.enumerated() {
                if let problem = checkSubscription(received[i][s], committed: tailLog.filter { $0.key.hasPrefix(sub.prefix) }) {
                    failures.append("shard \(s): subscriber '\(sub.prefix)' \(problem)")
                }
            }
        }
        if o.trace, let key = verdict.failingKey {
            print("history of \(key), by call time:")
            for e in history where e.key == key {
                print("  c\(e.client) \(e.operation) called t=\(e.call) returned \(e.returned.map { "t=\($0)" } ?? "never")")
            }
        }
        if o.trace {
            print("compaction every \(compactEvery) (retain \(replicaOptions.retain), snapshot parts of \(replicaOptions.snapshotChunkBytes) bytes), window \(replicaOptions.window), reports every \(replicaOptions.reportInterval), resends every \(replicaOptions.retransmitInterval)")
        }
        return Outcome(seed: o.seed, history: history, verdict: verdict, failures: failures,
                       completed: history.filter { $0.returned != nil }.count, crashes: crashes,
                       coordinatorCrashes: coordinatorCrashes, partitions: partitions, reconfigurations: reconfigurations,
                       compactions: compactions, snapshotInstalls: snapshotInstalls,
                       subscriberSnapshots: received.joined().joined().filter { $0.request.client < 0 }.count,
                       messages: messages, endTime: now)
    }

    /// Whether a subscriber's changes are the committed ones (of its prefix, in order): each
    /// change the next committed one, or a snapshot (changes from no client, all numbered
    /// alike) equal to the committed changes up to its number folded. Returns what is wrong.
    static func checkSubscription(_ received: [ChainUpdate], committed: [ChainUpdate]) -> String? {
        var next = 0
        var i = 0
        while i < received.count {
            let u = received[i]
            if u.request.client >= 0 {
                guard next < committed.count, committed[next] == u else { return "received \(u.key)@\(u.sequence) out of order, twice, or never committed" }
                next += 1
                i += 1
                continue
            }
            var j = i
            while j < received.count && received[j].request.client < 0 && received[j].sequence == u.sequence { j += 1 }
            let upTo = committed.firstIndex { $0.sequence > u.sequence } ?? committed.count
            guard upTo >= next else { return "received a snapshot at \(u.sequence) older than changes it had" }
            if fold(received[i..<j]) != fold(committed[..<upTo]) { return "received a snapshot at \(u.sequence) that is not the committed changes folded" }
            next = upTo
            i = j
        }
        return nil
    }
}
