import CairnCore
import Foundation

/// Where a message goes: a node, the global scheduler, or the control store.
enum Endpoint: Hashable, Sendable, CustomStringConvertible {
    case node(NodeID)
    case scheduler
    case controlStore

    var description: String {
        switch self {
        case .node(let n): return n.description
        case .scheduler: return "scheduler"
        case .controlStore: return "control-store"
        }
    }
}

/// A task as it travels: what to run, on what, for whom.
///
/// A class, so that handing a task between the intake buffer, the lineage table, the ready
/// queue and a worker retains one reference instead of copying five reference-counted fields.
/// Thread safety (why `@unchecked Sendable` is sound): `args` and `local` change only on the
/// node that owns the spec, under that node's lock, while resolving inputs before the task is
/// queued or sent; after that every field is only read. A spec sent to another component is
/// always a fresh copy made by ``portable()``, except one encoded into bytes before its send
/// returns (``Transport/sendIfEncodedAtOnce(_:to:)``), which no other component ever sees. So
/// no two accesses overlap, and the runtime's exclusivity checks are off for its fields.
final class TaskSpec: @unchecked Sendable {
    /// The task's result ID (and so the task's ID).
    let id: ObjectID
    let function: String
    /// Arguments; references are replaced by values before the task runs (``resolve(_:with:)``).
    @exclusivity(unchecked) private(set) var args: [TaskArg]
    /// How many of ``args`` are still references: stored rather than counted when asked, since
    /// walking the arguments copies each one and ``resolved`` is asked on every hop of a task.
    @exclusivity(unchecked) private var references: Int
    let resources: Resources
    /// The function's code, when the spec has not left the process that submitted it.
    @exclusivity(unchecked) var local: ErasedFunction?
    /// Made by ``portable()``: every value encoded, so the spec may cross between components.
    @exclusivity(unchecked) private(set) var isPortable = false
    /// The node that submitted the task and receives its result.
    var owner: NodeID { id.owner }

    init(id: ObjectID, function: String, args: [TaskArg], resources: Resources, local: ErasedFunction? = nil) {
        self.id = id
        self.function = function
        self.args = args
        self.resources = resources
        self.local = local
        references = args.reduce(0) { n, arg in
            if case .ref = arg { return n + 1 }
            return n
        }
    }

    /// Whether every argument is a value (no reference left to resolve).
    var resolved: Bool { references == 0 }

    /// Replaces argument `index`, a reference, with its value.
    func resolve(_ index: Int, with value: StoredValue) {
        guard case .ref = args[index] else { return }
        args[index] = .value(value)
        references -= 1
    }

    /// A spec read from another process: its values are encoded bytes and its references
    /// carry no token, so it is portable as it stands.
    static func received(id: ObjectID, function: String, args: [TaskArg], resources: Resources) -> TaskSpec {
        let spec = TaskSpec(id: id, function: function, args: args, resources: resources)
        spec.isPortable = true
        return spec
    }

    /// Whether the wire's writer can encode this spec as it stands, though it is not portable:
    /// every value needs no coding (``StoredValue/portableWithoutCoding``; references are
    /// written without their tokens). Only a transport that encodes before `send` returns may
    /// be handed such a spec (``Transport/sendIfEncodedAtOnce(_:to:)``): no other component
    /// ever holds it.
    var encodableAsIs: Bool {
        if isPortable { return true }
        for case .value(let v) in args where v.portableWithoutCoding == nil { return false }
        return true
    }

    /// A copy that may cross to another node: values encoded, no process-local tokens or code.
    func portable() throws -> TaskSpec {
        let args = try self.args.map { arg -> TaskArg in
            switch arg {
            case .value(let v): return .value(try v.portable())
            case .ref(let id, _): return .ref(id, nil)
            }
        }
        let copy = TaskSpec(id: id, function: function, args: args, resources: resources)
        copy.isPortable = true
        return copy
    }
}

/// A request to create an actor on a node.
struct ActorSpawn: Sendable {
    let id: ActorID
    let typeName: String
    let state: StoredValue
    let replyTo: NodeID
    /// Set for a durable actor: its name and options (the node creates or restores it).
    var durable: DurableSpawn?
    /// What the actor needs of its node (kept in its row, to restore it on a node that fits).
    var resources = Resources(cpus: 0)
}

/// The requests the control store answers (the GCS tables of DESIGN.md).
enum ControlRequest: Sendable {
    case registerNode(NodeRecord)
    case reportLoad(NodeID, queued: Int)
    case objectLocations([(ObjectID, NodeID, size: Int)])
    /// The objects were freed: drop their locations and lineage.
    case forgetObjects([ObjectID])
    case recordTasks([TaskRecord])
    /// Creates or replaces an actor's record.
    case registerActor(ActorRecord)
    /// A durable actor's newest checkpoint and log position.
    case actorProgress(ActorID, checkpoint: UInt64?, log: UInt64)
    case lookupActor(ActorID, replyTo: Endpoint)
    /// Answered with ``Message/actorDescription(_:_:)``.
    case describeActor(ActorID, replyTo: Endpoint)
    case subscribeNodes(Endpoint)
    /// Answered with ``Message/objectLocation(_:_:)``.
    case locateObject(ObjectID, replyTo: Endpoint)
    /// A row as the GCS committed it, from the control store's own subscriptions
    /// (`generation` names the control store incarnation that subscribed).
    case committed(generation: UInt64, key: String, value: [UInt8]?)
    /// The GCS gave up on the control store's write of a row.
    case writeFailed(generation: UInt64, key: String, value: [UInt8]?)
    /// The node's process is gone (its connections closed or fell silent): declare it dead.
    case nodeLost(NodeID, reason: String)
    /// A global scheduler process listens at `address`; `incarnation` tells a replacement
    /// from the one before.
    case registerScheduler(address: String, incarnation: UInt64)
    /// The process of scheduler `incarnation` is gone (its connection to the head closed).
    case schedulerLost(incarnation: UInt64)
    /// A node's request on the GCS's `store/` table (replicated actor storage), answered with
    /// ``Message/storageReply(_:_:)``.
    case storage(StorageRequest)
    /// The GCS finished a forwarded storage request (posted by the control store to itself).
    case storageSettled(StorageRequest, StorageReply)
}

/// Everything that crosses between components.
enum Message: Sendable {
    /// Tasks placed on the receiving node: run them there.
    case runTasks([TaskSpec])
    /// Tasks their owner sent straight to the receiving node, which was idle, without the
    /// global scheduler (``SchedulingPolicy/directTarget(_:from:nodes:start:)``): run them
    /// there. The owner already knows where they are, so no ``placed(_:)`` notice goes back.
    case runDirect([TaskSpec])
    /// Tasks a node hands to the global scheduler (from: the node handing them up). `avoid`:
    /// nodes the sender heard were declared dead lately, which the scheduler must not place
    /// them on even if its own node table does not say so yet (the news reaches the two by
    /// different paths, and a task sent to a dead node waits for its owner's retry timer).
    case schedule([TaskSpec], from: NodeID, avoid: [NodeID])
    /// ``schedule(_:from:avoid:)`` as read from the wire: each task still in its bytes, with
    /// what placement needs read out (``EncodedTask``), so a scheduler in a process of its own
    /// forwards tasks without decoding and encoding them again.
    case scheduleEncoded([EncodedTask], from: NodeID, avoid: [NodeID])
    /// ``runTasks(_:)`` with tasks still in their wire form, as a scheduler forwards them:
    /// written out as they are, and decoded into ``runTasks(_:)`` where delivered in memory
    /// (``decodedForDelivery``).
    case runTasksEncoded(EncodedBatch)
    /// Object values, pushed to their owner or sent in answer to a fetch.
    case objects([(ObjectID, StoredValue)])
    /// Please send these objects to `replyTo` once they exist.
    case fetch([ObjectID], replyTo: NodeID)
    /// No references to these objects remain.
    case free([ObjectID])
    case createActor(ActorSpawn)
    /// The actor exists (or failed to start, with the reason).
    case actorCreated(ActorID, on: NodeID, failure: String?)
    case actorCalls([ActorCall])
    /// Where the control store says an actor lives; if nowhere, why not.
    case actorLocation(ActorID, NodeID?, reason: String?)
    case actorDescription(ActorID, ActorRecord?)
    /// Where the control store's object table says a (large) object lives.
    case objectLocation(ObjectID, ObjectLocation?)
    case control(ControlRequest)
    case nodeTable([NodeRecord])
    /// From the node the global scheduler placed tasks on to their owner: the tasks are
    /// there, so the owner runs them again if that node dies (and, until this comes, hands
    /// them up again if the scheduler is replaced).
    case placed([(ObjectID, NodeID)])
    /// From the control store: the global scheduler's process listens at `address`. A new
    /// `incarnation` means the one before is gone, with the tasks it had not placed.
    case schedulerAt(address: String, incarnation: UInt64)
    /// From the node that computed them to their owner: these large results stay there (the
    /// only copy); fetch them from it, or run their tasks again if it dies.
    case objectsHeld([(ObjectID, NodeID, size: Int)])
    /// The control store's answer to the node's storage request `id`.
    case storageReply(UInt64, StorageReply)
}

/// Carries messages between components.
///
/// Contract: messages from one sender to one endpoint arrive in the order sent; a handler
/// receives messages in batches on the endpoint's own thread. The embedded cluster uses
/// ``InMemoryTransport``; a TCP transport implements the same contract between processes.
protocol Transport: Sendable {
    /// Registers `endpoint`'s handler. `onEventLoop`, if given, is offered a read of a few
    /// messages on the event loop that read them, to save the endpoint thread's wake-up; it
    /// must never wait (no contended lock, no I/O), and returns false to leave the batch to the
    /// endpoint's thread, which then hands it to `handler` in order. A transport without event
    /// loops ignores it.
    func register(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void,
                  onEventLoop: (@Sendable ([Message]) -> Bool)?)
    func send(_ message: Message, to endpoint: Endpoint)
    func shutdown()
    /// `host:port` where another process reaches `endpoint`, if it is registered here and
    /// reachable from other processes.
    func localAddress(_ endpoint: Endpoint) -> String?
    /// Drops an endpoint declared dead and whatever is queued for it.
    func forget(_ endpoint: Endpoint)
    /// Sends a message from endpoint `from` of this process, on a lane (a connection written
    /// by the sending thread itself, ``LaneConnection``) if the transport keeps one to
    /// `endpoint`: the replies come back the same way. Otherwise as ``send(_:to:)``.
    func send(_ message: Message, to endpoint: Endpoint, laneFrom from: Endpoint)
    /// The port where `endpoint`, registered here, accepts lanes, if it does.
    func lanePort(_ endpoint: Endpoint) -> Int?
    /// What a lane's reading thread calls with the tasks it brings to `endpoint` (registered
    /// already), instead of the endpoint's handler: it may run them on that thread.
    func registerLaneHandler(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void)
    /// Sends `message` only if it is encoded into bytes before this returns (`endpoint` is in
    /// another process), and returns whether it was sent; otherwise sends nothing. A message
    /// sent this way may hold specs that are not portable but ``TaskSpec/encodableAsIs``:
    /// nothing of it outlives the call.
    func sendIfEncodedAtOnce(_ message: Message, to endpoint: Endpoint) -> Bool
}

extension Transport {
    func register(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void) {
        register(endpoint, handler, onEventLoop: nil)
    }
    func localAddress(_ endpoint: Endpoint) -> String? { nil }
    func forget(_ endpoint: Endpoint) {}
    func send(_ message: Message, to endpoint: Endpoint, laneFrom from: Endpoint) { send(message, to: endpoint) }
    func lanePort(_ endpoint: Endpoint) -> Int? { nil }
    func registerLaneHandler(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void) {}
    func sendIfEncodedAtOnce(_ message: Message, to endpoint: Endpoint) -> Bool { false }
}

/// Messages between components of one process: one inbox thread per endpoint.
///
/// Values never cross as shared Swift references: every value in a message is encoded
/// bytes (checked on send), exactly as it would be on a wire.
final class InMemoryTransport: Transport, @unchecked Sendable {
    private let lock = NSLock()
    private var inboxes: [Endpoint: Inbox] = [:]

    /// Registers `endpoint`'s handler; one registered before is stopped, with whatever was
    /// still queued for it (as when the process behind an endpoint is replaced).
    func register(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void,
                  onEventLoop: (@Sendable ([Message]) -> Bool)?) {
        let inbox = Inbox(name: endpoint.description, handler: handler)
        lock.lock()
        let previous = inboxes.updateValue(inbox, forKey: endpoint)
        lock.unlock()
        previous?.stop()
    }

    func send(_ message: Message, to endpoint: Endpoint) {
        Self.checkPortable(message)
        lock.lock()
        let inbox = inboxes[endpoint]
        lock.unlock()
        inbox?.post(message)
    }

    func shutdown() {
        lock.lock()
        let all = Array(inboxes.values)
        inboxes = [:]
        lock.unlock()
        all.forEach { $0.stop() }
    }

    static func checkPortable(_ message: Message) {
        func check(_ v: StoredValue) {
            if case .boxed(let b) = v { preconditionFailure("a \(type(of: b)) would cross between components as a shared reference; encode it first") }
        }
        switch message {
        case .runTasksEncoded, .scheduleEncoded:
            preconditionFailure("tasks in their wire form are decoded before they are delivered in memory (decodedForDelivery)")
        case .runTasks(let specs), .runDirect(let specs), .schedule(let specs, _, _):
            // Only `portable()` makes specs that may cross; checking its stamp is O(1) per spec.
            for s in specs where !s.isPortable {
                preconditionFailure("task \(s.id) would cross between components without being made portable")
            }
        case .objects(let objects): objects.forEach { check($0.1) }
        case .actorCalls(let calls): calls.forEach { check($0.message) }
        case .createActor(let spawn): check(spawn.state)
        default: break
        }
    }
}

/// A task in its wire form (``WireWriter/tasks(_:)``), with what the global scheduler reads to
/// place it: a scheduler in a process of its own forwards it as these bytes.
struct EncodedTask: Sendable {
    let id: ObjectID
    let function: String
    let resources: Resources
    /// The owner of each of its reference arguments (empty: every input is in the spec).
    let inputOwners: [NodeID]
    /// The message the task came in, and where in it the task's bytes are.
    let message: [UInt8]
    let range: Range<Int>

    var owner: NodeID { id.owner }
    var resolved: Bool { inputOwners.isEmpty }
}

/// Tasks in their wire form, one after another (what ``WireWriter/tasks(_:)`` writes after
/// the count): a scheduler's forwarded share for one node.
struct EncodedBatch: Sendable {
    private(set) var count = 0
    private(set) var bytes: [UInt8] = []

    mutating func reserve(_ more: Int) { bytes.reserveCapacity(bytes.count + more) }

    mutating func append(_ task: EncodedTask) {
        count += 1
        bytes.append(contentsOf: task.message[task.range])
    }
}

extension Message {
    /// The message as a component in this process receives it: tasks in their wire form
    /// decoded (only a scheduler's transport reads them so, and it may forward them to a node
    /// in its own process).
    var decodedForDelivery: Message {
        get throws {
            switch self {
            case .runTasksEncoded(let batch): return .runTasks(try batch.decode())
            case .scheduleEncoded(let tasks, let from, let avoid): return .schedule(try EncodedTask.decode(tasks), from: from, avoid: avoid)
            default: return self
            }
        }
    }
}

/// A batched queue drained by one thread.
typealias Inbox = BatchQueue<Message>

/// A batched queue drained by one thread: items posted from any thread are handed to the
/// handler in batches, in the order posted. ``runIfIdle(_:quietNanoseconds:now:)`` lets a caller
/// with a few items run them itself when nothing is waiting, saving the thread's wake-up; the
/// handler never runs on two threads at once.
final class BatchQueue<Item>: @unchecked Sendable {
    private let condition = NSCondition()
    private var pending: [Item] = []
    /// The handler is running (on the queue's thread or a caller's).
    private var busy = false
    private var stopped = false
    private let handler: @Sendable ([Item]) -> Void

    init(name: String, handler: @escaping @Sendable ([Item]) -> Void) {
        self.handler = handler
        startThread(named: "cairn-inbox-\(name)") { [self] in run() }
    }

    func post(_ item: Item) {
        condition.lock()
        pending.append(item)
        if pending.count == 1 && !busy { condition.signal() }
        condition.unlock()
    }

    /// When ``runIfIdle(_:quietNanoseconds:now:)`` was last offered items (nil: never).
    private var lastOffered: UInt64?

    /// Hands `items` to the handler on the calling thread if nothing posted earlier is waiting
    /// or being handled, and the last offer came at least `quietNanoseconds` before `now`, and
    /// returns true; otherwise does nothing and returns false (post them).
    ///
    /// With `attempt`, that runs instead of the handler, with the same exclusion, and returns
    /// what it left (nil if nothing): those items go to the head of the queue, ahead of any
    /// posted meanwhile, for the queue's thread.
    func runIfIdle(_ items: [Item], quietNanoseconds: UInt64 = 0, now: UInt64 = DispatchTime.now().uptimeNanoseconds,
                   attempt: (([Item]) -> [Item]?)? = nil) -> Bool {
        condition.lock()
        let quiet = lastOffered.map { now &- $0 >= quietNanoseconds } ?? true
        lastOffered = now
        guard quiet && pending.isEmpty && !busy && !stopped else {
            condition.unlock()
            return false
        }
        busy = true
        condition.unlock()
        var left: [Item]?
        if let attempt { left = attempt(items) } else { handler(items) }
        condition.lock()
        if let left, !left.isEmpty { pending.insert(contentsOf: left, at: 0) }
        busy = false
        if !pending.isEmpty || stopped { condition.signal() }
        condition.unlock()
        return true
    }

    func stop() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
    }

    private func run() {
        var batch: [Item] = []
        while true {
            condition.lock()
            while (pending.isEmpty || busy) && !stopped { condition.wait() }
            if stopped {
                condition.unlock()
                return
            }
            swap(&batch, &pending)
            busy = true
            condition.unlock()
            handler(batch)
            batch.removeAll(keepingCapacity: true)
            condition.lock()
            busy = false
            condition.unlock()
        }
    }
}
