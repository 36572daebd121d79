import CairnCodec

/// The runtime's messages as they cross between processes: ``Message`` and ``Endpoint`` mapped
/// to `Codable` forms and encoded with ``BinaryEncoder``.
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
            return try BinaryEncoder().encode(Envelope(to: WireEndpoint(endpoint), message: WireMessage(message)))
        } catch {
            throw CairnError(.serialization, "cannot encode a message for \(endpoint): \(error)")
        }
    }

    static func decode(_ bytes: [UInt8]) throws -> (Endpoint, Message) {
        do {
            let envelope = try BinaryDecoder().decode(Envelope.self, from: bytes)
            return (envelope.to.endpoint, try envelope.message.message())
        } catch let error as CairnError {
            throw error
        } catch {
            throw CairnError(.serialization, "a message from another process does not decode: \(error)")
        }
    }

    /// A message and where it goes. The kinds on the task and call paths are coded by hand, as
    /// a tag and their fields (IDs as plain numbers) in one unkeyed container; the others, rare,
    /// follow tag 0 in ``WireMessage``'s synthesized form. Synthesized `Codable` opens a keyed
    /// container per enum case and per ID, which had made coding a third of a cluster's CPU.
    struct Envelope: Codable {
        var to: WireEndpoint
        var message: WireMessage

        init(to: WireEndpoint, message: WireMessage) {
            self.to = to
            self.message = message
        }

        func encode(to encoder: any Encoder) throws {
            var c = encoder.unkeyedContainer()
            switch to {
            case .node(let n):
                try c.encode(UInt8(0))
                try c.encode(n.raw)
            case .scheduler: try c.encode(UInt8(1))
            case .controlStore: try c.encode(UInt8(2))
            }
            switch message {
            case .runTasks(let tasks):
                try c.encode(UInt8(1))
                try c.encode(tasks)
            case .schedule(let tasks, let from, let avoid):
                try c.encode(UInt8(2))
                try c.encode(tasks)
                try c.encode(from.raw)
                try c.encode(avoid.map(\.raw))
            case .objects(let objects):
                try c.encode(UInt8(3))
                try c.encode(objects)
            case .placed(let placements):
                try c.encode(UInt8(4))
                try c.encode(placements.count)
                for p in placements {
                    try c.encode(p.task.raw)
                    try c.encode(p.node.raw)
                }
            case .objectsHeld(let held):
                try c.encode(UInt8(5))
                try c.encode(held.count)
                for h in held {
                    try c.encode(h.object.raw)
                    try c.encode(h.node.raw)
                    try c.encode(h.size)
                }
            case .actorCalls(let calls):
                try c.encode(UInt8(6))
                try c.encode(calls)
            case .fetch(let objects, let replyTo):
                try c.encode(UInt8(7))
                try c.encode(objects.map(\.raw))
                try c.encode(replyTo.raw)
            case .free(let objects):
                try c.encode(UInt8(8))
                try c.encode(objects.map(\.raw))
            default:
                try c.encode(UInt8(0))
                try c.encode(message)
            }
        }

        init(from decoder: any Decoder) throws {
            var c = try decoder.unkeyedContainer()
            switch try c.decode(UInt8.self) {
            case 0: to = .node(NodeID(try c.decode(Int.self)))
            case 1: to = .scheduler
            case 2: to = .controlStore
            case let tag: throw DecodingError.dataCorruptedError(in: c, debugDescription: "endpoint tag \(tag) is not 0, 1 or 2")
            }
            /// A count of entries that follow, each at least a byte: a negative one is refused,
            /// and a large one runs out of input (a typed error) before it runs out of memory.
            func count() throws -> Int {
                let n = try c.decode(Int.self)
                guard n >= 0 else { throw DecodingError.dataCorruptedError(in: c, debugDescription: "negative count \(n)") }
                return n
            }
            switch try c.decode(UInt8.self) {
            case 0: message = try c.decode(WireMessage.self)
            case 1: message = .runTasks(try c.decode([WireTask].self))
            case 2:
                let tasks = try c.decode([WireTask].self)
                let from = NodeID(try c.decode(Int.self))
                message = .schedule(tasks, from: from, avoid: try c.decode([Int].self).map(NodeID.init))
            case 3: message = .objects(try c.decode([WireObject].self))
            case 4:
                var placements: [WirePlacement] = []
                for _ in 0..<(try count()) {
                    placements.append(WirePlacement(task: ObjectID(raw: try c.decode(UInt64.self)), node: NodeID(try c.decode(Int.self))))
                }
                message = .placed(placements)
            case 5:
                var held: [WireLocation] = []
                for _ in 0..<(try count()) {
                    held.append(WireLocation(object: ObjectID(raw: try c.decode(UInt64.self)), node: NodeID(try c.decode(Int.self)), size: try c.decode(Int.self)))
                }
                message = .objectsHeld(held)
            case 6: message = .actorCalls(try c.decode([WireCall].self))
            case 7:
                let objects = try c.decode([UInt64].self).map(ObjectID.init(raw:))
                message = .fetch(objects, replyTo: NodeID(try c.decode(Int.self)))
            case 8: message = .free(try c.decode([UInt64].self).map(ObjectID.init(raw:)))
            case let tag: throw DecodingError.dataCorruptedError(in: c, debugDescription: "message tag \(tag) is not one of 0 to 8")
            }
        }
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

/// The hot types (a value, an argument, a task) are coded by hand as a tag and fields in an
/// unkeyed container: synthesized `Codable` for an enum with payloads opens a keyed container
/// per case and lists its keys, which made them most of a message's coding time.
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

enum WireArg: Codable {
    case value(WireValue)
    case ref(ObjectID)

    func encode(to encoder: any Encoder) throws {
        var c = encoder.unkeyedContainer()
        switch self {
        case .value(let v):
            try c.encode(UInt8(0))
            try c.encode(v)
        case .ref(let id):
            try c.encode(UInt8(1))
            try c.encode(id.raw)
        }
    }

    init(from decoder: any Decoder) throws {
        var c = try decoder.unkeyedContainer()
        switch try c.decode(UInt8.self) {
        case 0: self = .value(try c.decode(WireValue.self))
        case 1: self = .ref(ObjectID(raw: try c.decode(UInt64.self)))
        case let tag: throw DecodingError.dataCorruptedError(in: c, debugDescription: "argument tag \(tag) is not 0 or 1")
        }
    }
}

struct WireTask: Codable {
    var id: ObjectID
    var function: String
    var args: [WireArg]
    var resources: Resources

    func encode(to encoder: any Encoder) throws {
        var c = encoder.unkeyedContainer()
        try c.encode(id.raw)
        try c.encode(function)
        try c.encode(args)
        // Inline, not through `Resources`' keyed form: its dictionary of custom resources
        // costs a keyed container and a key listing even when empty.
        try c.encode(resources.cpus)
        try c.encode(resources.custom.count)
        for (name, amount) in resources.custom.sorted(by: { $0.key < $1.key }) {
            try c.encode(name)
            try c.encode(amount)
        }
    }

    init(from decoder: any Decoder) throws {
        var c = try decoder.unkeyedContainer()
        id = ObjectID(raw: try c.decode(UInt64.self))
        function = try c.decode(String.self)
        args = try c.decode([WireArg].self)
        let cpus = try c.decode(Double.self)
        let n = try c.decode(Int.self)
        guard n >= 0 else { throw DecodingError.dataCorruptedError(in: c, debugDescription: "negative count \(n) of custom resources") }
        var custom: [String: Double] = [:]
        for _ in 0..<n {
            let name = try c.decode(String.self)
            custom[name] = try c.decode(Double.self)
        }
        resources = Resources(cpus: cpus, custom: custom)
    }

    init(_ spec: TaskSpec) {
        precondition(spec.isPortable, "task \(spec.id) would cross between processes without being made portable")
        id = spec.id
        function = spec.function
        resources = spec.resources
        args = spec.args.map { arg in
            switch arg {
            case .value(let v): return .value(WireValue(v))
            case .ref(let id, _): return .ref(id)
            }
        }
    }

    func spec() throws -> TaskSpec {
        let args: [TaskArg] = self.args.map { arg in
            switch arg {
            case .value(let v): return .value(v.stored)
            case .ref(let id): return .ref(id, nil)
            }
        }
        return try TaskSpec(id: id, function: function, args: args, resources: resources).portable()
    }
}

struct WireCall: Codable {
    var actor: ActorID
    var typeName: String
    var result: ObjectID
    var message: WireValue
    var caller: UInt64
    var callerSequence: UInt64
    var isCheckpointRequest: Bool
    var logSequence: UInt64?
    var logged: [UInt8]?

    func encode(to encoder: any Encoder) throws {
        var c = encoder.unkeyedContainer()
        try c.encode(actor.raw)
        try c.encode(typeName)
        try c.encode(result.raw)
        try c.encode(message)
        try c.encode(caller)
        try c.encode(callerSequence)
        try c.encode(isCheckpointRequest)
        if let logSequence { try c.encode(logSequence) } else { try c.encodeNil() }
        if let logged { try c.encode(logged) } else { try c.encodeNil() }
    }

    init(from decoder: any Decoder) throws {
        var c = try decoder.unkeyedContainer()
        actor = ActorID(raw: try c.decode(UInt64.self))
        typeName = try c.decode(String.self)
        result = ObjectID(raw: try c.decode(UInt64.self))
        message = try c.decode(WireValue.self)
        caller = try c.decode(UInt64.self)
        callerSequence = try c.decode(UInt64.self)
        isCheckpointRequest = try c.decode(Bool.self)
        logSequence = try c.decodeNil() ? nil : try c.decode(UInt64.self)
        logged = try c.decodeNil() ? nil : try c.decode([UInt8].self)
    }

    init(_ c: ActorCall) {
        actor = c.actor
        typeName = c.typeName
        result = c.result
        message = WireValue(c.message)
        caller = c.caller
        callerSequence = c.callerSequence
        isCheckpointRequest = c.isCheckpointRequest
        logSequence = c.logSequence
        logged = c.logged
    }

    var call: ActorCall {
        ActorCall(actor: actor, typeName: typeName, result: result, message: message.stored, caller: caller,
                  callerSequence: callerSequence, isCheckpointRequest: isCheckpointRequest, logSequence: logSequence, logged: logged)
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

struct WireObject: Codable {
    var id: ObjectID
    var value: WireValue

    init(id: ObjectID, value: WireValue) {
        self.id = id
        self.value = value
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.unkeyedContainer()
        try c.encode(id.raw)
        try c.encode(value)
    }

    init(from decoder: any Decoder) throws {
        var c = try decoder.unkeyedContainer()
        id = ObjectID(raw: try c.decode(UInt64.self))
        value = try c.decode(WireValue.self)
    }
}

struct WireLocation: Codable {
    var object: ObjectID
    var node: NodeID
    var size: Int
}

struct WirePlacement: Codable {
    var task: ObjectID
    var node: NodeID
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

enum WireMessage: Codable {
    case runTasks([WireTask])
    case schedule([WireTask], from: NodeID, avoid: [NodeID])
    case objects([WireObject])
    case fetch([ObjectID], replyTo: NodeID)
    case free([ObjectID])
    case createActor(WireSpawn)
    case actorCreated(ActorID, on: NodeID, failure: String?)
    case actorCalls([WireCall])
    case actorLocation(ActorID, NodeID?, reason: String?)
    case actorDescription(ActorID, ActorRecord?)
    case objectLocation(ObjectID, ObjectLocation?)
    case control(WireControl)
    case nodeTable([NodeRecord])
    case placed([WirePlacement])
    case schedulerAt(address: String, incarnation: UInt64)
    case objectsHeld([WireLocation])
    case storageReply(UInt64, StorageReply)

    init(_ m: Message) {
        switch m {
        case .runTasks(let s): self = .runTasks(s.map(WireTask.init))
        case .schedule(let s, let from, let avoid): self = .schedule(s.map(WireTask.init), from: from, avoid: avoid)
        case .objects(let o): self = .objects(o.map { WireObject(id: $0.0, value: WireValue($0.1)) })
        case .fetch(let o, let r): self = .fetch(o, replyTo: r)
        case .free(let o): self = .free(o)
        case .createActor(let s): self = .createActor(WireSpawn(s))
        case .actorCreated(let a, let n, let f): self = .actorCreated(a, on: n, failure: f)
        case .actorCalls(let c): self = .actorCalls(c.map(WireCall.init))
        case .actorLocation(let a, let n, let r): self = .actorLocation(a, n, reason: r)
        case .actorDescription(let a, let r): self = .actorDescription(a, r)
        case .objectLocation(let o, let l): self = .objectLocation(o, l)
        case .control(let r): self = .control(WireControl(r))
        case .nodeTable(let t): self = .nodeTable(t)
        case .placed(let p): self = .placed(p.map { WirePlacement(task: $0.0, node: $0.1) })
        case .schedulerAt(let a, let i): self = .schedulerAt(address: a, incarnation: i)
        case .objectsHeld(let l): self = .objectsHeld(l.map { WireLocation(object: $0.0, node: $0.1, size: $0.size) })
        case .storageReply(let id, let r): self = .storageReply(id, r)
        }
    }

    func message() throws -> Message {
        switch self {
        case .runTasks(let s): return .runTasks(try s.map { try $0.spec() })
        case .schedule(let s, let from, let avoid): return .schedule(try s.map { try $0.spec() }, from: from, avoid: avoid)
        case .objects(let o): return .objects(o.map { ($0.id, $0.value.stored) })
        case .fetch(let o, let r): return .fetch(o, replyTo: r)
        case .free(let o): return .free(o)
        case .createActor(let s): return .createActor(try s.spawn())
        case .actorCreated(let a, let n, let f): return .actorCreated(a, on: n, failure: f)
        case .actorCalls(let c): return .actorCalls(c.map(\.call))
        case .actorLocation(let a, let n, let r): return .actorLocation(a, n, reason: r)
        case .actorDescription(let a, let r): return .actorDescription(a, r)
        case .objectLocation(let o, let l): return .objectLocation(o, l)
        case .control(let r): return .control(r.request)
        case .nodeTable(let t): return .nodeTable(t)
        case .placed(let p): return .placed(p.map { ($0.task, $0.node) })
        case .schedulerAt(let a, let i): return .schedulerAt(address: a, incarnation: i)
        case .objectsHeld(let l): return .objectsHeld(l.map { ($0.object, $0.node, size: $0.size) })
        case .storageReply(let id, let r): return .storageReply(id, r)
        }
    }
}
