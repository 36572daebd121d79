import CairnCore
import CairnGCS

/// A seeded, deterministic simulation of one chain-replicated shard in virtual time.
///
/// The network drops, duplicates, delays and so reorders messages; replicas crash (losing
/// their memory; what they persisted is kept) and restart from their persisted log. Clients
/// write and read shared keys, one request at a time, resending until answered. The history of
/// client operations is then checked for linearizability, and every acknowledged write must
/// be in the tail's persisted log. Everything random comes from the seed, so a failing seed
/// replays exactly.
public struct ChainSimulation {
    public struct Options: Sendable {
        public var seed: UInt64
        public var replicas = 3
        public var clients = 4
        public var operationsPerClient = 20
        /// Keys the clients share: fewer keys, more contention.
        public var keys = 1
        /// Time units a client waits for a reply before resending.
        public var resendInterval: UInt64 = 12
        /// Probability that a message is lost, or delivered twice.
        public var dropRate = 0.1
        public var duplicateRate = 0.05
        /// Most time units a message takes (at least 1).
        public var maxDelay: UInt64 = 8
        /// Probability per time unit that a replica crashes (if none is down).
        public var crashRate = 0.01
        /// Give up after this many time units; unanswered operations stay pending in the history.
        public var timeLimit: UInt64 = 50_000

        public init(seed: UInt64) { self.seed = seed }
    }

    public struct Outcome: Sendable {
        public var history: [Linearizability.Entry]
        public var verdict: Linearizability.Verdict
        /// Acknowledged writes missing from the tail's persisted log.
        public var lostWrites: [RequestID]
        public var completed: Int
        public var crashes: Int
        public var messages: Int
        public var endTime: UInt64

        public var passed: Bool { verdict.linearizable && lostWrites.isEmpty }
    }

    struct InFlight {
        var time: UInt64
        var order: Int
        var message: ChainMessage
        var from: ChainEndpoint
        var to: ChainEndpoint
    }

    public static func run(_ o: Options) -> Outcome {
        var rng = SeededGenerator(seed: o.seed)
        let chain = Array(0..<o.replicas)
        var replicas: [ChainReplica?] = chain.map { ChainReplica(id: $0, chain: chain) }
        var persisted: [[ChainUpdate]] = chain.map { _ in [] }
        var downUntil: [UInt64?] = chain.map { _ in nil }
        var clients = (0..<o.clients).map { ChainClient(id: $0, chain: chain) }
        var remaining = [Int](repeating: o.operationsPerClient, count: o.clients)
        var history: [Linearizability.Entry] = []
        var open: [Int?] = [Int?](repeating: nil, count: o.clients)  // index into history
        var acknowledgedWrites: [RequestID] = []
        var network: [InFlight] = []
        var order = 0
        var now: UInt64 = 0
        var crashes = 0
        var messages = 0

        func post(_ m: ChainMessage, from: ChainEndpoint, to: ChainEndpoint) {
            messages += 1
            if Double.random(in: 0..<1, using: &rng) < o.dropRate { return }
            let copies = Double.random(in: 0..<1, using: &rng) < o.duplicateRate ? 2 : 1
            for _ in 0..<copies {
                order += 1
                network.append(InFlight(time: now + UInt64.random(in: 1...o.maxDelay, using: &rng), order: order, message: m, from: from, to: to))
            }
        }

        func perform(_ actions: [ChainAction], at replica: Int) {
            for a in actions {
                switch a {
                case .persist(let u): persisted[replica].append(u)
                case .send(let m, let to): post(m, from: .replica(replica), to: to)
                }
            }
        }

        func clientActions(_ actions: [ChainAction], client: Int) {
            for case .send(let m, let to) in actions { post(m, from: .client(client), to: to) }
        }

        func startNext(_ c: Int) {
            guard remaining[c] > 0, clients[c].outstanding == nil else { return }
            remaining[c] -= 1
            let key = "k\(Int.random(in: 0..<o.keys, using: &rng))"
            let operation: ChainClient.Operation
            let recorded: Linearizability.Operation
            if Bool.random(using: &rng) {
                let value = UInt64(c) * 1_000_000 + UInt64(o.operationsPerClient - remaining[c])
                operation = .write(key: key, value: value)
                recorded = .write(value)
            } else {
                operation = .read(key: key)
                recorded = .read(nil)  // filled in when answered
            }
            open[c] = history.count
            history.append(Linearizability.Entry(client: c, key: key, operation: recorded, call: now, returned: nil))
            clientActions(clients[c].start(operation), client: c)
        }

        for c in 0..<o.clients { startNext(c) }

        while now < o.timeLimit {
            now += 1
            // Deliver what is due, in (time, order) order.
            network.sort { ($0.time, $0.order) < ($1.time, $1.order) }
            var due = 0
            while due < network.count && network[due].time <= now { due += 1 }
            let delivering = Array(network[..<due])
            network.removeFirst(due)
            for m in delivering {
                switch m.to {
                case .replica(let r):
                    guard replicas[r] != nil else { continue }  // down: lost
                    let actions = replicas[r]!.handle(m.message, from: m.from)
                    perform(actions, at: r)
                case .client(let c):
                    guard let outcome = clients[c].handle(m.message), let i = open[c] else { continue }
                    history[i].returned = now
                    switch outcome {
                    case .written:
                        if case .write = history[i].operation, case .written(let request) = m.message { acknowledgedWrites.append(request) }
                    case .read(let value):
                        history[i].operation = .read(value)
                    }
                    open[c] = nil
                    startNext(c)
                }
            }
            // Crashes and restarts.
            for r in chain {
                if let until = downUntil[r], until <= now {
                    replicas[r] = ChainReplica(id: r, chain: chain, recovering: persisted[r])
                    downUntil[r] = nil
                }
            }
            if downUntil.allSatisfy({ $0 == nil }), Double.random(in: 0..<1, using: &rng) < o.crashRate {
                let r = Int.random(in: 0..<o.replicas, using: &rng)
                replicas[r] = nil
                downUntil[r] = now + UInt64.random(in: 5...60, using: &rng)
                crashes += 1
            }
            // Timers: replicas resend unacknowledged updates, clients their outstanding request.
            if now % 5 == 0 {
                for r in chain where replicas[r] != nil { perform(replicas[r]!.tick(), at: r) }
            }
            if now % o.resendInterval == 0 {
                for c in 0..<o.clients { clientActions(clients[c].tick(), client: c) }
            }
            if remaining.allSatisfy({ $0 == 0 }) && open.allSatisfy({ $0 == nil }) { break }
        }

        // A pending read's value was never seen: it stays a read of nothing, which the checker ignores.
        let tailLog = Set(persisted[chain.last!].map(\.request))
        let lost = acknowledgedWrites.filter { !tailLog.contains($0) }
        return Outcome(history: history, verdict: Linearizability.check(history), lostWrites: lost,
                       completed: history.filter { $0.returned != nil }.count, crashes: crashes, messages: messages, endTime: now)
    }
}
