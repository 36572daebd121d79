/// Chain replication (van Renesse and Schneider, OSDI 2004) for one shard of the GCS, as pure
/// values: events in, actions out. The shell (in-memory, TCP, or the seeded simulation under
/// `Chaos/`) delivers messages, runs timers, and makes `persist` actions durable before it
/// sends anything that follows them.
///
/// Writes enter at the head, which gives each a sequence number and forwards it down the
/// chain; each replica applies updates in sequence order and keeps the ones it forwarded until
/// the tail acknowledges them; the tail replies to the client and sends the acknowledgement
/// back up. Reads are served by the tail. Lost, duplicated or reordered messages are repaired
/// by retransmission (each replica resends its unacknowledged updates on every tick) and by
/// sequence numbers (a replica applies only the next one). A client's retried write carries
/// the same request ID and is applied once.
///
/// Not here yet: reconfiguration by a coordinator (removing a failed replica, adding one at
/// the tail) and configuration epochs. A crashed replica comes back with its persisted log.

/// Identifies a client's request, for exactly-once writes.
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
    public var sequence: UInt64
    public var key: String
    public var value: UInt64
    public var request: RequestID

    public init(sequence: UInt64, key: String, value: UInt64, request: RequestID) {
        self.sequence = sequence
        self.key = key
        self.value = value
        self.request = request
    }
}

/// Who a chain message is for or from.
public enum ChainEndpoint: Hashable, Sendable {
    case replica(Int)
    case client(Int)
}

/// The messages of the chain protocol.
public enum ChainMessage: Hashable, Sendable {
    /// Client to head.
    case write(RequestID, key: String, value: UInt64)
    /// Client to tail.
    case read(RequestID, key: String)
    /// Replica to its successor.
    case forward(ChainUpdate)
    /// Replica to its predecessor: every update up to this sequence number reached the tail.
    case ack(UInt64)
    /// Tail (or head, for a retried write already acknowledged) to client.
    case written(RequestID)
    /// Tail to client.
    case readResult(RequestID, UInt64?)
    /// The request went to a replica in the wrong position.
    case notHere(RequestID)
}

/// What a replica asks its shell to do.
public enum ChainAction: Hashable, Sendable {
    /// Make the update durable; the shell does this before any later action.
    case persist(ChainUpdate)
    case send(ChainMessage, to: ChainEndpoint)
}

/// One replica of a chain. `chain` lists replica IDs, head first.
public struct ChainReplica: Sendable {
    public let id: Int
    public let chain: [Int]
    /// Applied updates, in sequence order (what `persist` made durable).
    public private(set) var log: [ChainUpdate] = []
    public private(set) var store: [String: UInt64] = [:]
    /// Per client: its newest request applied here, and that update's sequence number.
    private var applied: [Int: (number: UInt64, sequence: UInt64)] = [:]
    /// Updates forwarded to the successor and not yet acknowledged by the tail.
    private var sent: [ChainUpdate] = []
    /// Every update up to here has reached the tail.
    public private(set) var acknowledged: UInt64 = 0

    public init(id: Int, chain: [Int]) {
        precondition(chain.contains(id), "replica \(id) is not in the chain \(chain)")
        self.id = id
        self.chain = chain
    }

    /// A replica restarted after a crash: memory is gone, the persisted log is back. Every
    /// update is treated as not yet acknowledged and is resent; the successor ignores what it has.
    public init(id: Int, chain: [Int], recovering persisted: [ChainUpdate]) {
        self.init(id: id, chain: chain)
        for u in persisted { apply(u) }
        if !isTail { sent = persisted }
    }

    public var isHead: Bool { chain.first == id }
    public var isTail: Bool { chain.last == id }
    var lastSequence: UInt64 { log.last?.sequence ?? 0 }
    var successor: Int? { chain.firstIndex(of: id).flatMap { $0 + 1 < chain.count ? chain[$0 + 1] : nil } }
    var predecessor: Int? { chain.firstIndex(of: id).flatMap { $0 > 0 ? chain[$0 - 1] : nil } }

    private mutating func apply(_ u: ChainUpdate) {
        log.append(u)
        store[u.key] = u.value
        applied[u.request.client] = (u.request.number, u.sequence)
    }

    /// Handles one message.
    public mutating func handle(_ message: ChainMessage, from: ChainEndpoint) -> [ChainAction] {
        switch message {
        case .write(let request, let key, let value):
            guard isHead, case .client(let client) = from else { return [.send(.notHere(request), to: from)] }
            if let done = applied[client], done.number >= request.number {
                // A retry. Answer it only if the first attempt is known to have reached the tail;
                // otherwise the tail's reply (or a later retry) will.
                return done.number == request.number && (done.sequence <= acknowledged || isTail) ? [.send(.written(request), to: from)] : []
            }
            let u = ChainUpdate(sequence: lastSequence + 1, key: key, value: value, request: request)
            apply(u)
            if isTail {
                acknowledged = u.sequence
                return [.persist(u), .send(.written(request), to: from)]
            }
            sent.append(u)
            return [.persist(u), .send(.forward(u), to: .replica(successor!))]

        case .read(let request, let key):
            guard isTail else { return [.send(.notHere(request), to: from)] }
            return [.send(.readResult(request, store[key]), to: from)]

        case .forward(let u):
            guard !isHead else { return [] }
            if u.sequence <= lastSequence {
                // Seen before: the tail acknowledges again, in case its acknowledgement was lost.
                return isTail ? [.send(.ack(lastSequence), to: .replica(predecessor!))] : []
            }
            guard u.sequence == lastSequence + 1 else { return [] }  // a gap: retransmission fills it
            apply(u)
            if isTail {
                acknowledged = u.sequence
                return [.persist(u), .send(.written(u.request), to: .client(u.request.client)),
                        .send(.ack(u.sequence), to: .replica(predecessor!))]
            }
            sent.append(u)
            return [.persist(u), .send(.forward(u), to: .replica(successor!))]

        case .ack(let sequence):
            guard !isTail, sequence > acknowledged else { return [] }
            acknowledged = sequence
            sent.removeAll { $0.sequence <= sequence }
            return predecessor.map { [.send(.ack(sequence), to: .replica($0))] } ?? []

        case .written, .readResult, .notHere:
            return []
        }
    }

    /// Resends every update not yet acknowledged (called on a timer).
    public func tick() -> [ChainAction] {
        guard let next = successor else { return [] }
        return sent.map { .send(.forward($0), to: .replica(next)) }
    }
}

/// A client of one chain: sends writes to the head and reads to the tail, one request at a
/// time, and resends the outstanding one (same request ID) until it is answered.
public struct ChainClient: Sendable {
    public enum Operation: Hashable, Sendable {
        case write(key: String, value: UInt64)
        case read(key: String)
    }

    public enum Outcome: Hashable, Sendable {
        case written
        case read(UInt64?)
    }

    public let id: Int
    public let chain: [Int]
    private var number: UInt64 = 0
    public private(set) var outstanding: (request: RequestID, operation: Operation)?

    public init(id: Int, chain: [Int]) {
        self.id = id
        self.chain = chain
    }

    /// Starts an operation; there must be none outstanding.
    public mutating func start(_ operation: Operation) -> [ChainAction] {
        precondition(outstanding == nil, "a chain client has one request outstanding at a time")
        number += 1
        outstanding = (RequestID(client: id, number: number), operation)
        return send()
    }

    /// Resends the outstanding request (called on a timer).
    public func tick() -> [ChainAction] { outstanding == nil ? [] : send() }

    private func send() -> [ChainAction] {
        guard let (request, operation) = outstanding else { return [] }
        switch operation {
        case .write(let key, let value): return [.send(.write(request, key: key, value: value), to: .replica(chain.first!))]
        case .read(let key): return [.send(.read(request, key: key), to: .replica(chain.last!))]
        }
    }

    /// Takes a reply; returns the outcome if it answers the outstanding request.
    public mutating func handle(_ message: ChainMessage) -> Outcome? {
        guard let (request, _) = outstanding else { return nil }
        switch message {
        case .written(let r) where r == request:
            outstanding = nil
            return .written
        case .readResult(let r, let value) where r == request:
            outstanding = nil
            return .read(value)
        default:
            return nil
        }
    }
}
