/// A client session of the GCS, as a pure value: it routes each operation to its shard's head
/// (writes) or tail (reads), one at a time, and resends it with the same request ID until it
/// is answered, asking the coordinator for the current configurations whenever a replica turns
/// it away or a resend is due. A reconfiguration is therefore a short delay, not an error. A
/// process runs as many sessions as it wants requests in flight.
public struct GCSClient: Sendable {
    public enum Operation: Hashable, Sendable {
        case write(key: String, value: [UInt8]?)
        case read(key: String)

        public var key: String {
            switch self {
            case .write(let key, _), .read(let key): return key
            }
        }
    }

    public enum Outcome: Hashable, Sendable {
        case written
        case read([UInt8]?)
    }

    public let id: Int
    public let shardCount: Int
    /// Time units to wait for an answer before resending; doubled after each resend of the
    /// same request that went unanswered, up to ``maxResendBackoff`` doublings, so that a
    /// chain that is slow to answer (a learner catching up, a busy machine) is not buried
    /// under copies of what it is still working on.
    public let resendInterval: UInt64
    public static let maxResendBackoff = 4
    /// Time units to wait before resending a request a replica turned away (it may be a new
    /// tail waiting for its lease, for example).
    public let turnedAwayInterval: UInt64
    private var turnedAway = false
    /// The newest configuration known for each shard.
    public private(set) var configs: [Int: ChainConfig] = [:]
    private var number: UInt64 = 0
    public private(set) var outstanding: (request: RequestID, operation: Operation)?
    private var lastSent: UInt64 = 0
    /// Resends of the outstanding request for want of an answer.
    private var resends = 0

    public init(id: Int, shardCount: Int, resendInterval: UInt64, turnedAwayInterval: UInt64? = nil, configs: [ChainConfig] = []) {
        self.id = id
        self.shardCount = shardCount
        self.resendInterval = resendInterval
        self.turnedAwayInterval = turnedAwayInterval ?? max(1, resendInterval / 10)
        learn(configs)
    }

    private mutating func learn(_ list: [ChainConfig]) {
        for c in list where c.epoch > (configs[c.shard]?.epoch ?? 0) { configs[c.shard] = c }
    }

    /// Starts an operation; there must be none outstanding.
    public mutating func start(_ operation: Operation, now: UInt64) -> [GCSAction] {
        precondition(outstanding == nil, "a GCS client session has one request outstanding at a time")
        number += 1
        outstanding = (RequestID(client: id, number: number), operation)
        resends = 0
        return send(now: now)
    }

    private mutating func send(now: UInt64) -> [GCSAction] {
        guard let (request, operation) = outstanding else { return [] }
        lastSent = now
        turnedAway = false
        guard let c = configs[shard(of: operation.key, shards: shardCount)] else {
            return [.send(.configQuery, to: .coordinator)]
        }
        switch operation {
        case .write(let key, let value): return [.send(.write(request, key: key, value: value), to: .replica(c.head))]
        case .read(let key): return [.send(.read(request, key: key), to: .replica(c.tail))]
        }
    }

    /// Gives up on the outstanding request (its caller timed out). It may still be applied; the
    /// next request gets a higher number, so it is never mistaken for a retry of this one.
    public mutating func abandon() { outstanding = nil }

    /// Resends the outstanding request when it has waited long enough, and refreshes the configurations.
    public mutating func tick(now: UInt64) -> [GCSAction] {
        let wait = turnedAway ? turnedAwayInterval : resendInterval << min(resends, Self.maxResendBackoff)
        guard outstanding != nil, now >= lastSent + wait else { return [] }
        if !turnedAway { resends += 1 }
        return [.send(.configQuery, to: .coordinator)] + send(now: now)
    }

    /// Takes a message; returns the outcome if it answers the outstanding request.
    public mutating func handle(_ message: GCSMessage, now: UInt64) -> (outcome: Outcome?, actions: [GCSAction]) {
        switch message {
        case .configs(let list):
            let before = outstanding.map { configs[shard(of: $0.operation.key, shards: shardCount)] }
            learn(list)
            let after = outstanding.map { configs[shard(of: $0.operation.key, shards: shardCount)] }
            // A newer configuration for the shard in question: try it at once.
            return (nil, before != after ? send(now: now) : [])
        case .notHere(let r) where r == outstanding?.request:
            turnedAway = true
            return (nil, [.send(.configQuery, to: .coordinator)])
        case .written(let r) where r == outstanding?.request:
            outstanding = nil
            return (.written, [])
        case .readResult(let r, let value) where r == outstanding?.request:
            outstanding = nil
            return (.read(value), [])
        default:
            return (nil, [])
        }
    }
}

/// A subscriber to every committed change of keys with a prefix, across all shards, as a pure
/// value. Each shard's tail streams its changes in sequence order, each naming the change
/// before it, so a lost or reordered change is noticed and resent. After a reconfiguration the
/// subscriber subscribes at the new tail from the last change it took, so it sees every change
/// once, in each shard's order.
public struct GCSSubscriber: Sendable {
    public let id: Int
    public let prefix: String
    public let shardCount: Int
    /// Time units between re-subscriptions while a shard is quiet, in case a subscription was lost.
    public let resubscribeInterval: UInt64
    public private(set) var configs: [Int: ChainConfig] = [:]
    /// Per shard: the sequence number of the last change taken.
    public private(set) var lastSeen: [UInt64]
    private var lastHeard: [UInt64]

    public init(id: Int, prefix: String, shardCount: Int, resubscribeInterval: UInt64) {
        self.id = id
        self.prefix = prefix
        self.shardCount = shardCount
        self.resubscribeInterval = resubscribeInterval
        lastSeen = Array(repeating: 0, count: shardCount)
        lastHeard = Array(repeating: 0, count: shardCount)
    }

    private func subscribe(_ shard: Int) -> [GCSAction] {
        guard let c = configs[shard] else { return [] }
        return [.send(.subscribe(prefix: prefix, after: lastSeen[shard]), to: .replica(c.tail))]
    }

    /// Subscribes at each shard whose subscription may have lapsed.
    public mutating func tick(now: UInt64) -> [GCSAction] {
        var actions: [GCSAction] = []
        var quiet = false
        for s in 0..<shardCount where now >= lastHeard[s] + resubscribeInterval {
            quiet = true
            lastHeard[s] = now
            actions += subscribe(s)
        }
        if quiet || configs.count < shardCount { actions.append(.send(.configQuery, to: .coordinator)) }
        return actions
    }

    /// Takes a message; returns the changes it delivers, in order.
    public mutating func handle(_ message: GCSMessage, from: Endpoint, now: UInt64) -> (changes: [ChainUpdate], actions: [GCSAction]) {
        switch message {
        case .configs(let list):
            var actions: [GCSAction] = []
            for c in list where c.epoch > (configs[c.shard]?.epoch ?? 0) {
                let movedTail = configs[c.shard]?.tail != c.tail
                configs[c.shard] = c
                if movedTail { actions += subscribe(c.shard) }
            }
            return ([], actions)
        case .change(let s, let u, let previous):
            guard s >= 0, s < shardCount else { return ([], []) }
            lastHeard[s] = now
            if previous == lastSeen[s] && u.sequence > lastSeen[s] {
                lastSeen[s] = u.sequence
                return ([u], [.send(.changeAck(upTo: u.sequence), to: from)])
            }
            // A duplicate, or one after a gap that a resend will fill.
            return ([], u.sequence <= lastSeen[s] ? [.send(.changeAck(upTo: lastSeen[s]), to: from)] : [])
        case .snapshot(let s, let upTo, let epoch, let entries, let previous):
            // In place of the changes up to `upTo`, which the tail's log no longer holds: each
            // key's value then, delivered as a change numbered `upTo` (from no client). It may
            // start before the last change taken (a repeated subscription): it holds every
            // change up to `upTo`, so it is taken all the same.
            guard s >= 0, s < shardCount else { return ([], []) }
            lastHeard[s] = now
            guard previous <= lastSeen[s] && upTo > lastSeen[s] else {
                return ([], upTo <= lastSeen[s] ? [.send(.changeAck(upTo: lastSeen[s]), to: from)] : [])
            }
            lastSeen[s] = upTo
            let changes = entries.sorted { $0.key < $1.key }.map {
                ChainUpdate(epoch: epoch, sequence: upTo, key: $0.key, value: $0.value, request: RequestID(client: -1, number: 0))
            }
            return (changes, [.send(.changeAck(upTo: upTo), to: from)])
        default:
            return ([], [])
        }
    }
}
