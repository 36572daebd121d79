/// The GCS protocol: the values that flow between clients, chain replicas and the
/// coordinator. Everything here is a pure value; shells (the seeded simulation under `Chaos/`,
/// the embedded runtime, TCP) move them around.
///
/// A shard is a chain of replicas (van Renesse and Schneider, OSDI 2004). Writes enter at the
/// head, which gives each a sequence number; each replica applies updates in sequence order,
/// persists them, forwards them down and keeps them until the tail acknowledges them; the tail
/// replies to the client and sends the acknowledgement back up. Reads are served by the tail.
/// A coordinator watches the replicas and changes a chain by issuing a new ``ChainConfig``
/// with a higher epoch; a replica drops chain messages from any other epoch, so a replica that
/// was cut out cannot corrupt the chain when it comes back.

/// A replica's identity, unique across every shard.
public typealias ReplicaID = Int

/// Identifies a client's request, for exactly-once writes. A client session has one write
/// outstanding at a time and numbers its requests 1, 2, 3…
public struct RequestID: Hashable, Sendable, Codable, CustomStringConvertible {
    public var client: Int
    public var number: UInt64
    public init(client: Int, number: UInt64) {
        self.client = client
        self.number = number
    }
    public var description: String { "c\(client)#\(number)" }
}

/// One write, as it flows down the chain and sits in each replica's log.
public struct ChainUpdate: Hashable, Sendable, Codable {
    /// The epoch of the head that numbered it. Two logs holding the same (epoch, sequence)
    /// agree on every update before it, which is what lets a rejoining replica find where its
    /// log left the chain's.
    public var epoch: UInt64
    public var sequence: UInt64
    public var key: String
    /// The new value; nil deletes the key.
    public var value: [UInt8]?
    public var request: RequestID

    public init(epoch: UInt64, sequence: UInt64, key: String, value: [UInt8]?, request: RequestID) {
        self.epoch = epoch
        self.sequence = sequence
        self.key = key
        self.value = value
        self.request = request
    }
}

/// A client's newest request applied by a replica, and that update's sequence number: what
/// lets a head answer a retried write without applying it twice.
public struct AppliedRequest: Hashable, Sendable, Codable {
    public var number: UInt64
    public var sequence: UInt64
    public init(number: UInt64, sequence: UInt64) {
        self.number = number
        self.sequence = sequence
    }
}

/// What compaction leaves of a replica's log up to `sequence`: the update numbers and the
/// client table as of that update. The store's contents as of it travel beside it (in a
/// ``ChainSnapshot`` or a ``ChainCompaction``).
public struct ChainBase: Hashable, Sendable, Codable {
    /// The last update folded in (0: none).
    public var sequence: UInt64
    /// The epoch that numbered that update (0: none).
    public var epoch: UInt64
    public var applied: [Int: AppliedRequest]
    public init(sequence: UInt64 = 0, epoch: UInt64 = 0, applied: [Int: AppliedRequest] = [:]) {
        self.sequence = sequence
        self.epoch = epoch
        self.applied = applied
    }
}

/// A replica's whole state as of one update, which replaces its log and store when installed.
public struct ChainSnapshot: Hashable, Sendable, Codable {
    public var base: ChainBase
    public var store: [String: [UInt8]]
    public init(base: ChainBase, store: [String: [UInt8]]) {
        self.base = base
        self.store = store
    }
}

/// Updates folded out of a replica's log: from `previous` (exclusive) to `base.sequence`, and,
/// per key they touched, its value after them (nil: deleted).
public struct ChainCompaction: Hashable, Sendable, Codable {
    public var previous: UInt64
    public var base: ChainBase
    public var changes: [String: [UInt8]?]
    public init(previous: UInt64, base: ChainBase, changes: [String: [UInt8]?]) {
        self.previous = previous
        self.base = base
        self.changes = changes
    }
}

/// One configuration of one shard's chain, issued by the coordinator.
public struct ChainConfig: Hashable, Sendable, Codable, CustomStringConvertible {
    public var shard: Int
    /// Grows with every change; messages between replicas carry it.
    public var epoch: UInt64
    /// Replicas, head first. Never empty.
    public var chain: [ReplicaID]
    /// A replica joining behind the tail: the tail streams its log to it, but it serves nothing
    /// until a later configuration makes it the tail.
    public var learner: ReplicaID?
    /// Set when the tail was just promoted from learner: the previous tail, which must tell the
    /// new one how far its log went (a handoff) before the new tail serves reads.
    public var handoffFrom: ReplicaID?

    public init(shard: Int, epoch: UInt64, chain: [ReplicaID], learner: ReplicaID? = nil, handoffFrom: ReplicaID? = nil) {
        precondition(!chain.isEmpty, "a chain has at least one replica")
        precondition(Set(chain).count == chain.count, "a replica appears twice in the chain \(chain)")
        precondition(learner.map { !chain.contains($0) } ?? true, "the learner \(learner!) is already in the chain \(chain)")
        precondition(handoffFrom.map { chain.count >= 2 && chain[chain.count - 2] == $0 } ?? true,
                     "the replica handing off must be the one before the tail")
        self.shard = shard
        self.epoch = epoch
        self.chain = chain
        self.learner = learner
        self.handoffFrom = handoffFrom
    }

    public var head: ReplicaID { chain[0] }
    public var tail: ReplicaID { chain[chain.count - 1] }
    public func contains(_ r: ReplicaID) -> Bool { chain.contains(r) || learner == r }

    public var description: String {
        var s = "shard \(shard) epoch \(epoch): \(chain.map(String.init).joined(separator: " -> "))"
        if let l = learner { s += " (+ learner \(l))" }
        if let h = handoffFrom { s += " (handoff from \(h))" }
        return s
    }
}

/// Where a message goes.
public enum Endpoint: Hashable, Sendable, Codable {
    case replica(ReplicaID)
    /// A client session or a subscriber.
    case client(Int)
    case coordinator
}

/// A run of consecutive log entries numbered in one epoch (how a learner describes its log).
public struct EpochRange: Hashable, Sendable, Codable {
    public var epoch: UInt64
    public var first: UInt64
    public var last: UInt64
}

/// A replica's periodic report to the coordinator; it doubles as the heartbeat.
public struct ReplicaReport: Hashable, Sendable, Codable {
    public var replica: ReplicaID
    public var shard: Int
    /// The configuration the replica runs (0: none yet).
    public var epoch: UInt64
    /// The replica's clock when it sent this; a lease granted in reply runs from here.
    public var sentAt: UInt64
    public var lastSequence: UInt64
    /// How many of those its compacted base holds (the rest are held one by one).
    public var base: UInt64
    /// The tail's learner has every update the tail has.
    public var learnerCaughtUp: Bool
    /// The replica is the tail and may serve reads (given a lease).
    public var serving: Bool

    public init(replica: ReplicaID, shard: Int, epoch: UInt64, sentAt: UInt64, lastSequence: UInt64, base: UInt64 = 0, learnerCaughtUp: Bool, serving: Bool) {
        self.replica = replica
        self.shard = shard
        self.epoch = epoch
        self.sentAt = sentAt
        self.lastSequence = lastSequence
        self.base = base
        self.learnerCaughtUp = learnerCaughtUp
        self.serving = serving
    }
}

/// The messages of the GCS protocol.
public enum GCSMessage: Hashable, Sendable, Codable {
    // Clients and replicas.
    /// Client to head: set (or, with nil, delete) a key.
    case write(RequestID, key: String, value: [UInt8]?)
    /// Client to tail.
    case read(RequestID, key: String)
    /// Tail (or head, for a retried write already acknowledged) to client.
    case written(RequestID)
    /// Tail to client.
    case readResult(RequestID, [UInt8]?)
    /// The request reached a replica that cannot serve it (wrong position, no lease, stale
    /// configuration); the client asks the coordinator for the current configuration.
    case notHere(RequestID)
    /// Subscriber to tail: send every committed update whose key starts with `prefix`, after
    /// sequence number `after`, in order.
    case subscribe(prefix: String, after: UInt64)
    /// Tail to subscriber: one change; `previous` is the sequence number of the change sent
    /// before it on this subscription, so the subscriber can tell a gap from a duplicate.
    case change(shard: Int, ChainUpdate, previous: UInt64)
    /// Tail to subscriber, in place of the changes up to `upTo` when the subscription starts
    /// before what the tail's log still holds (compacted): every key with the prefix and its
    /// value as of `upTo`. Acknowledged with `changeAck(upTo:)` like a change.
    case snapshot(shard: Int, upTo: UInt64, epoch: UInt64, entries: [String: [UInt8]], previous: UInt64)
    /// Subscriber to tail: every change up to this sequence number arrived.
    case changeAck(upTo: UInt64)

    // Between replicas of one chain; dropped unless the epoch is the receiver's.
    case forward(epoch: UInt64, ChainUpdate)
    /// Every update up to this sequence number reached the tail.
    case ack(epoch: UInt64, UInt64)
    /// Learner to tail: my log holds every update up to `upTo`, in the join numbered `attempt`.
    /// The attempt tells the tail an acknowledgement of the join it accepted from one sent
    /// earlier (before the learner restarted, say), which says nothing of the log since cut to
    /// a common prefix or replaced by a snapshot.
    case learnerAck(epoch: UInt64, attempt: UInt64, upTo: UInt64)
    /// Learner to tail: here is my log, by epoch, after the `base` updates compaction folded
    /// (those reached a tail, so every later log has them); start streaming.
    case join(epoch: UInt64, attempt: UInt64, base: UInt64, log: [EpochRange])
    /// Tail to learner: keep your first `keep` updates (the rest left the chain's history), and
    /// take the stream that follows. With `snapshotChunks` > 0, the tail no longer holds the
    /// updates the learner lacks: the learner drops its log and store and installs the tail's
    /// snapshot, sent next in that many `snapshotChunk`s, before it takes the stream.
    case joinAccepted(epoch: UInt64, attempt: UInt64, keep: UInt64, snapshotChunks: Int)
    /// Tail to learner: part `index` of the snapshot of a join (see `joinAccepted`); the keys and
    /// values of the store, and with the last part, the base.
    case snapshotChunk(epoch: UInt64, attempt: UInt64, index: Int, entries: [String: [UInt8]], base: ChainBase?)
    /// Previous tail to new tail: my log went up to `upTo`; serve reads once you have it. I
    /// answered the writes up to `answered`: answer those after it.
    case handoff(epoch: UInt64, upTo: UInt64, answered: UInt64)

    // Replicas and the coordinator.
    case report(ReplicaReport)
    /// Coordinator to replica: the shard's current configuration, and, for a serving tail, a
    /// read lease that runs from the report's `sentAt`.
    case configure(ChainConfig, leaseFrom: UInt64?)

    // Clients and the coordinator.
    case configQuery
    case configs([ChainConfig])
}

/// What a core asks its shell to do, in order. A `persist…` action must be durable before the
/// shell performs any action after it.
public enum GCSAction: Hashable, Sendable {
    case persist(ChainUpdate)
    /// Drop every persisted update after this sequence number.
    case persistTruncation(keep: UInt64)
    /// Fold the persisted updates up to the compaction's base into the persisted store.
    case persistCompaction(ChainCompaction)
    /// Replace everything persisted (updates, store, base) with this snapshot.
    case persistSnapshot(ChainSnapshot)
    case persistConfig(ChainConfig)
    case send(GCSMessage, to: Endpoint)
}

/// Which shard holds a key: FNV-1a of its UTF-8 bytes, modulo the shard count. (Swift's
/// `hashValue` is seeded per process, so it cannot route between processes.)
public func shard(of key: String, shards: Int) -> Int {
    precondition(shards > 0, "a GCS has at least one shard")
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in key.utf8 {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return Int(h % UInt64(shards))
}
