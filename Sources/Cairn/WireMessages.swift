import CairnCodec

/// The runtime's messages as they cross between processes: the kinds on the task and call
/// paths written by hand (``WireFast``), the others mapped to `Codable` forms and encoded
/// with ``BinaryEncoder``.
///
/// Only portable messages cross (every value encoded, no process-local reference or code): a
/// task's function travels by name and the receiving process finds it in its registry; a
/// reference's process-local token is dropped. Decoding checks shapes, never trusts a length,
/// and ends in a ``CairnError`` naming what was wrong.
enum WireMessages {
    /// Encodes `message` for `endpoint`. Traps on a message that is not portable, as the
    /// in-memory transport does: that is a bug in the sender, not bad input.
    static func encode(_ message: Message, to endpoint: Endpoint) throws -> [UInt8] {
        do {
            if let bytes = try WireFast.encode(message, to: endpoint) { return bytes }
            return try BinaryEncoder().encode(Envelope(to: WireEndpoint(endpoint), message: WireMessage(message)))
        } catch {
            throw CairnError(.serialization, "cannot encode a message for \(endpoint): \(error)")
        }
    }

    static func decode(_ bytes: [UInt8]) throws -> (Endpoint, Message) {
        if bytes.first == WireFast.marker { return try WireFast.decode(bytes) }
        do {
            let envelope = try BinaryDecoder().decode(Envelope.self, from: bytes)
            return (envelope.to.endpoint, try envelope.message.message())
        } catch let error as CairnError {
            throw error
        } catch {
            throw CairnError(.serialization, "a message from another process does not decode: \(error)")
        }
    }

    struct Envelope: Codable {
        var to: WireEndpoint
        var message: WireMessage
    }
}

enum WireEndpoint: Codable, Equatable {
    case node(NodeID)
    case scheduler
    case controlStore

    init(_ e: Endpoint) {
        switch e {
        case .node(let n): self = .node(n)
        case .scheduler: self = .scheduler
        case .controlStore: self = .controlStore
        }
    }

    var endpoint: Endpoint {
        switch self {
        case .node(let n): return .node(n)
        case .scheduler: return .scheduler
        case .controlStore: return .controlStore
        }
    }
}

/// A value in a message's `Codable` form (an actor's initial state), coded by hand as a tag and
/// its payload in an unkeyed container: synthesized `Codable` for an enum with payloads opens a
/// keyed container per case and lists its keys.
enum WireValue: Codable {
    case encoded([UInt8])
    case int(Int)
    case failed(RemoteError)

    func encode(to encoder: any Encoder) throws {
        var c = encoder.unkeyedContainer()
        switch self {
        case .encoded(let b):
            try c.encode(UInt8(0))
            try c.encode(b)
        case .int(let i):
            try c.encode(UInt8(1))
            try c.encode(i)
        case .failed(let e):
            try c.encode(UInt8(2))
            try c.encode(e)
        }
    }

    init(from decoder: any Decoder) throws {
        var c = try decoder.unkeyedContainer()
        switch try c.decode(UInt8.self) {
        case 0: self = .encoded(try c.decode([UInt8].self))
        case 1: self = .int(try c.decode(Int.self))
        case 2: self = .failed(try c.decode(RemoteError.self))
        case let tag: throw DecodingError.dataCorruptedError(in: c, debugDescription: "value tag \(tag) is not 0, 1 or 2")
        }
    }

    init(_ v: StoredValue) {
        switch v {
        case .encoded(let b): self = .encoded(b)
        case .int(let i): self = .int(i)
        case .failed(let e): self = .failed(e)
        case .boxed(let b): preconditionFailure("a \(type(of: b)) would cross between processes as a shared reference; encode it first")
        }
    }

    var stored: StoredValue {
        switch self {
        case .encoded(let b): return .encoded(b)
        case .int(let i): return .int(i)
        case .failed(let e): return .failed(e)
        }
    }
}

struct WireSpawn: Codable {
    var id: ActorID
    var typeName: String
    var state: WireValue
    var replyTo: NodeID
    var durable: WireDurability?
    var resources: Resources

    init(_ s: ActorSpawn) {
        id = s.id
        typeName = s.typeName
        state = WireValue(s.state)
        replyTo = s.replyTo
        durable = s.durable.map(WireDurability.init)
        resources = s.resources
    }

    func spawn() throws -> ActorSpawn {
        ActorSpawn(id: id, typeName: typeName, state: state.stored, replyTo: replyTo, durable: try durable?.spawn(for: id), resources: resources)
    }
}

/// A durable actor's name and options as they cross processes, and as its control-store row
/// keeps them so that it can be restored on another node.
struct WireDurability: Codable, Equatable, Sendable {
    var name: String
    var durableLogging: Bool
    var checkpointMessages: Int?
    var checkpointMilliseconds: Int?
    var maxRestarts: Int
    var repliesKeptPerCaller: Int
    var restoreOnly: Bool

    init(_ d: DurableSpawn) {
        name = d.name
        durableLogging = d.options.logging == .durable
        checkpointMessages = d.options.checkpoint.messages
        checkpointMilliseconds = d.options.checkpoint.milliseconds
        maxRestarts = d.options.maxRestarts
        repliesKeptPerCaller = d.options.repliesKeptPerCaller
        restoreOnly = d.restoreOnly
    }

    func spawn(for id: ActorID) throws -> DurableSpawn {
        guard checkpointMessages.map({ $0 >= 1 }) ?? true, checkpointMilliseconds.map({ $0 >= 1 }) ?? true,
              maxRestarts >= 0, repliesKeptPerCaller >= 1 else {
            throw CairnError(.serialization, "actor \(id): durability options out of range in a message from another process")
        }
        return DurableSpawn(name: name, options: DurabilityOptions(
            logging: durableLogging ? .durable : .memoryOnly,
            checkpoint: CheckpointPolicy(messages: checkpointMessages, milliseconds: checkpointMilliseconds),
            maxRestarts: maxRestarts, repliesKeptPerCaller: repliesKeptPerCaller), restoreOnly: restoreOnly)
    }
}

struct WireLocation: Codable {
    var object: ObjectID
    var node: NodeID
    var size: Int
}

enum WireControl: Codable {
    case registerNode(NodeRecord)
    case reportLoad(NodeID, queued: Int)
    case objectLocations([WireLocation])
    case forgetObjects([ObjectID])
    case recordTasks([TaskRecord])
    case registerActor(ActorRecord)
    case actorProgress(ActorID, checkpoint: UInt64?, log: UInt64)
    case lookupActor(ActorID, replyTo: WireEndpoint)
    case describeActor(ActorID, replyTo: WireEndpoint)
    case subscribeNodes(WireEndpoint)
    case locateObject(ObjectID, replyTo: WireEndpoint)
    case committed(generation: UInt64, key: String, value: [UInt8]?)
    case writeFailed(generation: UInt64, key: String, value: [UInt8]?)
    case nodeLost(NodeID, reason: String)
    case registerScheduler(address: String, incarnation: UInt64)
    case storage(StorageRequest)
    case storageSettled(StorageRequest, StorageReply)
    case schedulerLost(incarnation: UInt64)

    init(_ r: ControlRequest) {
        switch r {
        case .registerNode(let n): self = .registerNode(n)
        case .reportLoad(let n, let q): self = .reportLoad(n, queued: q)
        case .objectLocations(let l): self = .objectLocations(l.map { WireLocation(object: $0.0, node: $0.1, size: $0.size) })
        case .forgetObjects(let o): self = .forgetObjects(o)
        case .recordTasks(let t): self = .recordTasks(t)
        case .registerActor(let a): self = .registerActor(a)
        case .actorProgress(let a, let c, let l): self = .actorProgress(a, checkpoint: c, log: l)
        case .lookupActor(let a, let e): self = .lookupActor(a, replyTo: WireEndpoint(e))
        case .describeActor(let a, let e): self = .describeActor(a, replyTo: WireEndpoint(e))
        case .subscribeNodes(let e): self = .subscribeNodes(WireEndpoint(e))
        case .locateObject(let o, let e): self = .locateObject(o, replyTo: WireEndpoint(e))
        case .committed(let g, let k, let v): self = .committed(generation: g, key: k, value: v)
        case .writeFailed(let g, let k, let v): self = .writeFailed(generation: g, key: k, value: v)
        case .nodeLost(let n, let r): self = .nodeLost(n, reason: r)
        case .registerScheduler(let a, let i): self = .registerScheduler(address: a, incarnation: i)
        case .storage(let r): self = .storage(r)
        case .storageSettled(let r, let a): self = .storageSettled(r, a)
        case .schedulerLost(let i): self = .schedulerLost(incarnation: i)
        }
    }

    var request: ControlRequest {
        switch self {
        case .registerNode(let n): return .registerNode(n)
        case .reportLoad(let n, let q): return .reportLoad(n, queued: q)
        case .objectLocations(let l): return .objectLocations(l.map { ($0.object, $0.node, size: $0.size) })
        case .forgetObjects(let o): return .forgetObjects(o)
        case .recordTasks(let t): return .recordTasks(t)
        case .registerActor(let a): return .registerActor(a)
        case .actorProgress(let a, let c, let l): return .actorProgress(a, checkpoint: c, log: l)
        case .lookupActor(let a, let e): return .lookupActor(a, replyTo: e.endpoint)
        case .describeActor(let a, let e): return .describeActor(a, replyTo: e.endpoint)
        case .subscribeNodes(let e): return .subscribeNodes(e.endpoint)
        case .locateObject(let o, let e): return .locateObject(o, replyTo: e.endpoint)
        case .committed(let g, let k, let v): return .committed(generation: g, key: k, value: v)
        case .writeFailed(let g, let k, let v): return .writeFailed(generation: g, key: k, value: v)
        case .nodeLost(let n, let r): return .nodeLost(n, reason: r)
        case .registerScheduler(let a, let i): return .registerScheduler(address: a, incarnation: i)
        case .storage(let r): return .storage(r)
        case .storageSettled(let r, let a): return .storageSettled(r, a)
        case .schedulerLost(let i): return .schedulerLost(incarnation: i)
        }
    }
}

/// The messages ``WireFast`` does not write, in their `Codable` form.
enum WireMessage: Codable {
    case createActor(WireSpawn)
    case actorCreated(ActorID, on: NodeID, failure: String?)
    case actorLocation(ActorID, NodeID?, reason: String?)
    case actorDescription(ActorID, ActorRecord?)
    case objectLocation(ObjectID, ObjectLocation?)
    case control(WireControl)
    case nodeTable([NodeRecord])
    case schedulerAt(address: String, incarnation: UInt64)
    case storageReply(UInt64, StorageReply)

    init(_ m: Message) {
        switch m {
        case .createActor(let s): self = .createActor(WireSpawn(s))
        case .actorCreated(let a, let n, let f): self = .actorCreated(a, on: n, failure: f)
        case .actorLocation(let a, let n, let r): self = .actorLocation(a, n, reason: r)
        case .actorDescription(let a, let r): self = .actorDescription(a, r)
        case .objectLocation(let o, let l): self = .objectLocation(o, l)
        case .control(let r): self = .control(WireControl(r))
        case .nodeTable(let t): self = .nodeTable(t)
        case .schedulerAt(let a, let i): self = .schedulerAt(address: a, incarnation: i)
        case .storageReply(let id, let r): self = .storageReply(id, r)
        case .runTasks, .runDirect, .schedule, .objects, .fetch, .free, .actorCalls, .placed, .objectsHeld, .runTasksEncoded, .scheduleEncoded:
            preconditionFailure("\(m) is written by WireFast")
        }
    }

    func message() throws -> Message {
        switch self {
        case .createActor(let s): return .createActor(try s.spawn())
        case .actorCreated(let a, let n, let f): return .actorCreated(a, on: n, failure: f)
        case .actorLocation(let a, let n, let r): return .actorLocation(a, n, reason: r)
        case .actorDescription(let a, let r): return .actorDescription(a, r)
        case .objectLocation(let o, let l): return .objectLocation(o, l)
        case .control(let r): return .control(r.request)
        case .nodeTable(let t): return .nodeTable(t)
        case .schedulerAt(let a, let i): return .schedulerAt(address: a, incarnation: i)
        case .storageReply(let id, let r): return .storageReply(id, r)
        }
    }
}
