import CairnCore
import DequeModule
import Foundation
import Synchronization

/// Tasks submitted to a node and not yet taken in by its scheduler.
final class SubmissionBuffer: Sendable {
    private let specs = Mutex<[TaskSpec]>([])

    /// Adds `spec`; returns whether it is alone (the buffer was empty).
    @discardableResult
    func append(_ spec: TaskSpec) -> Bool {
        specs.withLock { buffer in
            buffer.append(spec)
            return buffer.count == 1
        }
    }

    /// Everything buffered, or nil if nothing is.
    func take() -> [TaskSpec]? {
        specs.withLock { buffer in
            if buffer.isEmpty { return nil }
            let all = buffer
            buffer = []
            buffer.reserveCapacity(min(all.count, 4096))
            return all
        }
    }

    var isEmpty: Bool { specs.withLock { $0.isEmpty } }
}

/// Resource requests known to be feasible, by function; cleared when the node table changes.
struct FeasibilityCache {
    var known: [String: [Resources]] = [:]
    /// The pair asked last, answered without hashing the function's name: a program usually
    /// submits many tasks of one function in a row.
    var last: (function: String, resources: Resources)?

    mutating func learn(_ function: String, _ resources: Resources) {
        if !(known[function]?.contains(resources) ?? false) { known[function, default: []].append(resources) }
        last = (function, resources)
    }

    mutating func forget() {
        known = [:]
        last = nil
    }
}

/// How one node is set up.
public struct NodeConfiguration: Sendable {
    /// What the node offers. `cpus` is also the number of worker threads.
    public var resources: Resources
    /// If set, the only function and actor-type names this node accepts (to model a node
    /// built without some code); nil accepts everything registered in the process.
    public var functions: Set<String>?
    /// Bytes of objects the node keeps before evicting least-recently-used ones that can be
    /// fetched again or rebuilt from lineage. Objects from `put` are never evicted.
    public var storeLimitBytes: Int
    /// A node runs a task itself while fewer than this many tasks per worker wait in its queue;
    /// beyond that it hands tasks to the global scheduler if another node is less loaded.
    public var spillThreshold: Int
    /// For a node process (``ClusterOptions/processes``): the address it listens on and gives
    /// the others; nil: the cluster's host.
    public var host: String?
    /// For a node process: a command its program is started through, such as
    /// `["ip", "netns", "exec", "ns1"]` to run it in a network namespace (the command must
    /// exec the program, keeping its environment). Empty: started directly.
    public var launcher: [String]

    public init(resources: Resources = Resources(cpus: 1), functions: Set<String>? = nil,
                storeLimitBytes: Int = 1 << 30, spillThreshold: Int = 4096, host: String? = nil, launcher: [String] = []) {
        self.resources = resources
        self.functions = functions
        self.storeLimitBytes = storeLimitBytes
        self.spillThreshold = spillThreshold
        self.host = host
        self.launcher = launcher
    }
}

/// A node declared dead, and when this node heard.
struct RecentDeath {
    let node: NodeID
    let at: UInt64
}

/// Work a worker thread can pick up.
enum Work {
    case task(TaskSpec)
    case actor(ActorInstance)
}

/// Messages and callbacks gathered under the node's lock and delivered after it is released.
struct Outgoing {
    var messages: [(Message, Endpoint)] = []
    var objects: [NodeID: [(ObjectID, StoredValue)]] = [:]
    var spilled: [TaskSpec] = []
    /// Lone tasks sent by their owner straight to an idle node (see ``SchedulingPolicy/directTarget(_:from:nodes:start:)``).
    var direct: [(NodeID, TaskSpec)] = []
    var callbacks: [(Waiter, StoredValue)] = []
    var spawnWorkers = 0
    /// Set when a call was routed into the actor outbox.
    var actorCallsRouted = false
    /// Calls for durable actors hosted here: handed to their log stage after the lock is released.
    var durableCalls: [(DurableActor, ActorCall)] = []
    /// The monotonic clock, read once per pass (see ``now()``); 0 until then.
    private var clock: UInt64 = 0

    /// The monotonic clock in nanoseconds, read at the first call of this pass: a pass that
    /// hands up thousands of tasks stamps them all with one reading.
    mutating func now() -> UInt64 {
        if clock == 0 { clock = monotonicNanoseconds() }
        return clock
    }

    /// Empties everything, keeping the storage (a worker reuses one `Outgoing` for every task).
    mutating func clear() {
        if !messages.isEmpty { messages.removeAll(keepingCapacity: true) }
        if !objects.isEmpty { objects.removeAll(keepingCapacity: true) }
        if !spilled.isEmpty { spilled.removeAll(keepingCapacity: true) }
        if !direct.isEmpty { direct.removeAll(keepingCapacity: true) }
        if !callbacks.isEmpty { callbacks.removeAll(keepingCapacity: true) }
        spawnWorkers = 0
        actorCallsRouted = false
        if !durableCalls.isEmpty { durableCalls.removeAll(keepingCapacity: true) }
        clock = 0
    }
}

/// One node: its local scheduler, worker pool, object store and the actors it hosts.
///
/// It talks to other nodes, the global scheduler and the control store only through its
/// ``Transport``. Objects owned by this node (created by tasks, calls or puts submitted here)
/// are kept here: results computed elsewhere are pushed back to their owner, and any node
/// fetches an object from its owner, whose ID it carries.
///
/// Scheduling is bottom-up: a submitted task waits here until its inputs exist, then runs
/// here if this node can run it and its queue is short; otherwise it goes to the global
/// scheduler. A worker blocked in `get` gives its slot back (a replacement thread starts if
/// work is waiting) so nested tasks never deadlock the pool.
final class Node: @unchecked Sendable {
    let id: NodeID
    let configuration: NodeConfiguration
    let transport: any Transport
    let mint: IDMint
    let workersTarget: Int
    private let releaseObject: @Sendable (ObjectID) -> Void
    /// The cluster's durable-actor storage, shared by its nodes (opened on the first durable spawn).
    let actorStorage: LazyActorStorage
    /// This node's requests on replicated storage, through the control store.
    let storageProxy: StorageProxy
    /// Durable actors hosted here, for time-based checkpoints while they are idle.
    private let durables = Mutex<[DurableActor]>([])
    /// Objects at least this large are recorded in the control store's object and task tables.
    static let directoryThreshold = 64 << 10

    /// Tasks submitted here, not yet taken in by the local scheduler. A separate lock keeps
    /// submitters from contending with workers on `condition` for every task.
    private let submissions = SubmissionBuffer()
    /// Workers waiting for work; read without `condition` by submitters to decide whether to wake one.
    private let sleepers = Atomic<Int>(0)
    /// When the last task that found no other waiting to be taken in was submitted here
    /// (monotonic nanoseconds).
    private let lastSubmission = Atomic<UInt64>(0)
    /// On a node with no CPU, a task submitted alone at least this long after the last such
    /// one is taken in by its submitter's thread when the node's lock is free (see
    /// ``submit(_:args:resources:)``).
    static let loneSubmissionNanoseconds: UInt64 = 100_000
    /// Actors hosted here. Its own lock, so that sending to a local actor does not take `condition`.
    private let actors = Mutex<[ActorID: ActorInstance]>([:])
    /// Counts objects stored here, so that a caller about to wait can see one arrive without the lock.
    let storedEvents = Atomic<Int>(0)

    // Everything below is guarded by `condition`, which already makes each access exclusive:
    // the runtime's dynamic exclusivity checks (4% of all samples on the task path) are off for them.
    private let condition = ConditionLock()
    /// Everything this node knows about each object, in one table: one hash lookup per step
    /// of a task's life instead of one per collection (hashing was the largest cost per task).
    @exclusivity(unchecked) private var objects: [ObjectID: ObjectEntry] = [:]
    @exclusivity(unchecked) private var storedCount = 0
    @exclusivity(unchecked) private var storeBytes = 0
    @exclusivity(unchecked) private var evictable = Deque<ObjectID>()
    /// Tasks waiting here for inputs.
    @exclusivity(unchecked) private var pendingCount = 0
    @exclusivity(unchecked) private var ready = Deque<Work>()
    @exclusivity(unchecked) private var threads = 0
    /// Lane threads running a task in a worker's slot (``handleFromLane(_:)``); counted in
    /// `threads`. One blocked in a `get` counts in `blocked` instead, as a worker does.
    @exclusivity(unchecked) private var laneRunning = 0
    @exclusivity(unchecked) private var idle = 0
    @exclusivity(unchecked) private var blocked = 0
    @exclusivity(unchecked) private var actorLocations: [ActorID: NodeID] = [:]
    @exclusivity(unchecked) private var actorQueue: [ActorID: [ActorCall]] = [:]
    /// Calls with a caller ID sent to a durable actor in another process, until their reply:
    /// if the actor's node dies they go again, in order, to where it is restored.
    @exclusivity(unchecked) private var durableCallsInFlight: [ObjectID: ActorCall] = [:]
    /// Calls routed to actors on other nodes, in routing order; sent by `flushActorCalls`.
    @exclusivity(unchecked) private var actorOutbox: [NodeID: [ActorCall]] = [:]
    /// Held while taking and sending `actorOutbox`, so that calls leave in the order they were routed.
    private let actorSendLock = NSLock()
    @exclusivity(unchecked) private var spawnWaiters: [ActorID: @Sendable (Result<NodeID, CairnError>) -> Void] = [:]
    @exclusivity(unchecked) private var describeWaiters: [ActorID: [@Sendable (ActorRecord?) -> Void]] = [:]
    @exclusivity(unchecked) private var locateWaiters: [ObjectID: [@Sendable (ObjectLocation?) -> Void]] = [:]
    /// The control store's node table as the scheduling policy sees it, replaced on every update.
    @exclusivity(unchecked) private var nodeLoads: [SchedulingPolicy.NodeLoad] = []
    @exclusivity(unchecked) private var locationBacklog: [(ObjectID, NodeID, size: Int)] = []
    @exclusivity(unchecked) private var taskBacklog: [TaskRecord] = []
    @exclusivity(unchecked) private var stopped = false
    /// Why this node can no longer reach its cluster (a driver that lost its head), once it cannot.
    @exclusivity(unchecked) private var cutOffError: CairnError?
    /// Set with `cutOffError`, read without the lock.
    private let isCutOff = Atomic<Bool>(false)
    /// Nodes the control store declared dead.
    @exclusivity(unchecked) private var deadNodes: Set<NodeID> = []
    /// Nodes declared dead in the last ``avoidWindowNanoseconds``, with when: tasks handed up
    /// name them, so that a scheduler that has not heard yet places nothing there.
    private let recentDeaths = Locked<[RecentDeath]>([])
    /// Whether `recentDeaths` may hold any, read without its lock on every hand-up.
    private let anyRecentDeaths = Atomic<Bool>(false)
    static let avoidWindowNanoseconds: UInt64 = 10_000_000_000
    /// Tasks owned here and handed up, oldest first, with when. One still unconfirmed
    /// ``confirmWithinNanoseconds`` later is handed up again if a node died or the scheduler
    /// was replaced around then (within that long before it was handed up, or since): the
    /// scheduler may have sent it to a node that was already dead. Without failures nothing
    /// is handed up twice, however long a loaded cluster takes to confirm.
    @exclusivity(unchecked) private var handedUpQueue = Deque<(ObjectID, UInt64)>()
    static let confirmWithinNanoseconds: UInt64 = 2_000_000_000
    /// When this node last heard of a node's death or a new scheduler.
    @exclusivity(unchecked) private var lastFailureNanoseconds: UInt64 = 0
    /// The last task owned here that was sent straight to a node rather than handed up; the
    /// next goes the same way only once this one is back (or was moved after its node died).
    @exclusivity(unchecked) private var directTask: ObjectID?
    /// The node the last direct task went to: the next goes there again while it is listed
    /// idle, so a stream of lone tasks finds one process's threads awake and its caches warm.
    @exclusivity(unchecked) private var directLast: NodeID?
    /// Tasks sent straight to a node since this node started (for tests and status).
    @exclusivity(unchecked) private var directCount = 0
    /// The incarnation of the global scheduler's process this node last heard of.
    @exclusivity(unchecked) private var schedulerIncarnation: UInt64?
    /// Times a task owned here is run again after its node died, before it fails.
    let maxTaskRetries: Int
    /// Part of a cluster of processes, where nodes can die. Then owners track where their
    /// tasks are (nodes confirm each task to its owner; tasks handed up stay awaiting that), and
    /// large results of other owners' tasks stay here (the owner fetches them when needed, or
    /// runs the task again if this node dies) instead of crossing the network to their owner.
    /// In an embedded cluster none of this is needed, and its cost stays off the task path.
    let inProcessCluster: Bool
    /// In a cluster of processes, with ``ClusterOptions/placeLoneTasksDirectly``.
    let placesLoneTasks: Bool
    /// A node of a cluster of processes that offers no CPU (a driver's): every task it owns
    /// leaves it, so a lone one is taken in by its submitter's thread (see ``submit(_:args:resources:)``).
    let takesLoneSubmissionsIn: Bool

    init(id: NodeID, configuration: NodeConfiguration, transport: any Transport, actorStorage: LazyActorStorage,
         maxTaskRetries: Int = 3, inProcessCluster: Bool = false, placeLoneTasksDirectly: Bool = true,
         release: @escaping @Sendable (ObjectID) -> Void) {
        self.id = id
        self.maxTaskRetries = maxTaskRetries
        self.inProcessCluster = inProcessCluster
        placesLoneTasks = inProcessCluster && placeLoneTasksDirectly
        takesLoneSubmissionsIn = inProcessCluster && configuration.resources.cpus == 0
        self.actorStorage = actorStorage
        self.configuration = configuration
        self.transport = transport
        storageProxy = StorageProxy(node: id, transport: transport)
        self.mint = IDMint(node: id)
        self.workersTarget = max(1, Int(configuration.resources.cpus.rounded(.down)))
        self.releaseObject = release
        transport.register(.node(id), { [self] batch in handle(batch) }, onEventLoop: { [self] batch in tryHandle(batch) })
        transport.registerLaneHandler(.node(id)) { [self] batch in handleFromLane(batch) }
        transport.send(.control(.registerNode(NodeRecord(id: id, resources: configuration.resources, functions: configuration.functions,
                                                         queued: 0, alive: true, address: transport.localAddress(.node(id)),
                                                         lane: transport.lanePort(.node(id))))), to: .controlStore)
        transport.send(.control(.subscribeNodes(.node(id))), to: .controlStore)
        condition.lock()
        var out = Outgoing()
        for _ in 0..<workersTarget { out.spawnWorkers += 1 }
        threads += workersTarget
        condition.unlock()
        flush(&out)
    }

    /// The entry for `oid`, created if needed.
    @inline(__always) private func entry(_ oid: ObjectID) -> ObjectEntry {
        if let e = objects[oid] { return e }
        let e = ObjectEntry()
        objects[oid] = e
        return e
    }

    /// Forgets `oid` once nothing refers to its entry any more.
    private func dropIfIdle(_ oid: ObjectID, _ e: ObjectEntry) {
        if !e.hasValue && e.spec == nil && !e.inFlight && e.pendingSpec == nil && e.firstWaiter == nil && e.blockedTasks.isEmpty && e.fetchRequests.isEmpty && !e.freed {
            objects.removeValue(forKey: oid)
        }
    }

    /// Stops the workers; work not yet finished is abandoned.
    func stop() {
        condition.lock()
        stopped = true
        condition.broadcast()
        var all: [Waiter] = []
        for (_, e) in objects where e.firstWaiter != nil { all += e.takeWaiters() }
        condition.unlock()
        let failure = StoredValue.failed(RemoteError(kind: .cancelled, task: ObjectID(raw: 0), function: "", node: id, message: "the cluster was shut down"))
        all.forEach { $0.fire(failure) }
    }

    /// Stops this node for good because it can no longer reach its cluster (a driver whose
    /// head is gone): every `get`, `wait`, spawn and lookup waiting here, and every later one,
    /// fails with `error` instead of waiting for an answer that cannot come.
    func cutOff(_ error: CairnError) {
        condition.lock()
        guard cutOffError == nil else {
            condition.unlock()
            return
        }
        cutOffError = error
        isCutOff.store(true, ordering: .releasing)
        stopped = true
        condition.broadcast()
        var waiters: [Waiter] = []
        for (_, e) in objects where e.firstWaiter != nil { waiters += e.takeWaiters() }
        let spawns = Array(spawnWaiters.values)
        let describes = describeWaiters.values.flatMap { $0 }
        let locates = locateWaiters.values.flatMap { $0 }
        spawnWaiters = [:]
        describeWaiters = [:]
        locateWaiters = [:]
        condition.unlock()
        let failure = StoredValue.failed(RemoteError(kind: .cancelled, task: ObjectID(raw: 0), function: "", node: id, message: error.detail))
        for waiter in waiters {
            switch waiter {
            case .gather(let gather, _): gather.expire(error)
            case .call: waiter.fire(failure)
            }
        }
        spawns.forEach { $0(.failure(error)) }
        describes.forEach { $0(nil) }
        locates.forEach { $0(nil) }
    }

    /// Set once ``cutOff(_:)`` was called: why.
    var cutOffReason: CairnError? {
        guard isCutOff.load(ordering: .acquiring) else { return nil }
        condition.lock()
        defer { condition.unlock() }
        return cutOffError
    }

    var nodeCount: Int {
        condition.lock()
        defer { condition.unlock() }
        return nodeLoads.count
    }

    /// The nodes the control store's table lists as alive, as this node last heard.
    var aliveNodes: [NodeID] {
        condition.lock()
        defer { condition.unlock() }
        return nodeLoads.filter(\.alive).map(\.id)
    }

    // MARK: submission

    func accepts(_ function: String) -> Bool {
        configuration.functions?.contains(function) ?? true
    }

    func newRef<T>(_ id: ObjectID) -> ObjectRef<T> {
        ObjectRef(id: id, token: RefToken(id: id, release: releaseObject))
    }

    /// Submits a task owned by this node, by function name.
    func submit<R: RemoteValue>(function: String, args: [TaskArg], resources: Resources) throws -> ObjectRef<R> {
        guard let f = FunctionRegistry.process.function(function) else {
            throw CairnError(.unknownFunction, "no function is registered as \"\(function)\"; create its RemoteFunction before submitting")
        }
        return try submit(f, args: args, resources: resources)
    }

    /// Submits a task owned by this node.
    func submit<R: RemoteValue>(_ f: ErasedFunction, args: [TaskArg], resources: Resources) throws -> ObjectRef<R> {
        guard f.arity == args.count else {
            throw CairnError(.invalidArgument, "\"\(f.name)\" takes \(f.arity) arguments, got \(args.count)")
        }
        try checkFeasible(function: f.name, resources: resources)
        let taskID = mint.object()
        let ref: ObjectRef<R> = newRef(taskID)
        let alone = submissions.append(TaskSpec(id: taskID, function: f.name, args: args, resources: resources, local: f))
        // On a node with no CPU (a driver's), a lone task (nothing else waiting to be taken in,
        // and the first in a while) is taken in here, so it leaves for another node without
        // waking a worker to send it: one thread hand-off less on its way. Those of a burst,
        // which follow within microseconds or find others waiting, are left to a worker, which
        // takes them in together. (A node that runs its own tasks wakes a worker either way,
        // which then takes the task in itself: measured, that is the quicker.)
        if takesLoneSubmissionsIn, alone, takeInIfLone() { return ref }
        if sleepers.load(ordering: .acquiring) > 0 {
            condition.lock()
            condition.signal()
            condition.unlock()
        }
        return ref
    }

    /// Takes the submitted tasks in on this thread if the last lone submission was a while
    /// ago and the node's lock is free; returns whether it did. Kept out of line, so that the
    /// path every submission takes stays short.
    @inline(never)
    private func takeInIfLone() -> Bool {
        let now = monotonicNanoseconds()
        guard now &- lastSubmission.exchange(now, ordering: .relaxed) >= Self.loneSubmissionNanoseconds, condition.tryLock() else { return false }
        var out = Outgoing()
        drainSubmissionsLocked(&out)
        condition.unlock()
        flush(&out)
        return true
    }

    /// Throws unless some node could ever run `function` with `resources`.
    private func checkFeasible(function: String, resources: Resources) throws {
        let known = feasibility.withLock { cache -> Bool in
            if let last = cache.last, last.function == function, last.resources == resources { return true }
            guard cache.known[function]?.contains(resources) ?? false else { return false }
            cache.last = (function, resources)
            return true
        }
        if known { return }
        condition.lock()
        let stopped = self.stopped
        let cutOff = cutOffError
        let loads = nodeLoads
        condition.unlock()
        if let cutOff { throw cutOff }
        guard !stopped else { throw CairnError(.shutDown, "the cluster was shut down") }
        // A node process that has not yet heard the node table cannot judge: the scheduler will.
        if loads.isEmpty { return }
        if SchedulingPolicy.feasible(.init(resources: resources, function: function), nodes: loads) {
            feasibility.withLock { $0.learn(function, resources) }
            return
        }
        if !SchedulingPolicy.feasible(.init(resources: resources, function: nil), nodes: loads) {
            throw CairnError(.infeasible, "no node offers \(resources); nodes offer \(loads.map { "\($0.id): \($0.resources)" }.joined(separator: "; "))")
        }
        throw CairnError(.unknownFunction, "no node accepts function \"\(function)\" with \(resources)")
    }

    private let feasibility = Mutex(FeasibilityCache())

    /// Takes submitted tasks into the local scheduler.
    private func drainSubmissionsLocked(_ out: inout Outgoing) {
        guard let specs = submissions.take() else { return }
        for spec in specs {
            let e = entry(spec.id)
            e.spec = spec
            acceptLocked(spec, e, placed: false, &out)
        }
    }

    /// Records that a result for `oid` will arrive from elsewhere (for work handed out directly).
    func expectResult(_ oid: ObjectID) {
        condition.lock()
        entry(oid).inFlight = true
        condition.unlock()
    }

    /// Stores a value owned by this node; it is never evicted (there is no lineage to rebuild it).
    func put<T: RemoteValue>(_ value: T) -> ObjectRef<T> {
        let oid = mint.object()
        var out = Outgoing()
        condition.lock()
        entry(oid).pinned = true
        storeLocked(oid, .boxed(value), &out)
        condition.unlock()
        flush(&out)
        return newRef(oid)
    }

    /// Cancels a task that has not started. Returns whether it was cancelled.
    func cancel(_ task: ObjectID) -> Bool {
        var out = Outgoing()
        condition.lock()
        drainSubmissionsLocked(&out)
        var done = false
        let error = RemoteError(kind: .cancelled, task: task, function: objects[task]?.spec?.function ?? "", node: id, message: "cancelled before it ran")
        if let e = objects[task], let spec = e.pendingSpec {
            e.pendingSpec = nil
            pendingCount -= 1
            for case .ref(let dep, _) in spec.args { objects[dep]?.blockedTasks.removeAll { $0 == task } }
            completeLocked(task, .failed(error), &out)
            done = true
        } else if let index = ready.firstIndex(where: { if case .task(let s) = $0 { return s.id == task } else { return false } }) {
            ready.remove(at: index)
            completeLocked(task, .failed(error), &out)
            done = true
        }
        condition.unlock()
        flush(&out)
        return done
    }

    /// Takes a task in: waits for its inputs, then runs it here or hands it up.
    private func acceptLocked(_ spec: TaskSpec, placed: Bool, _ out: inout Outgoing) {
        acceptLocked(spec, entry(spec.id), placed: placed, &out)
    }

    private func acceptLocked(_ spec: TaskSpec, _ task: ObjectEntry, placed: Bool, _ out: inout Outgoing) {
        task.inFlight = true
        var missing = 0
        for case .ref(let dep, _) in spec.args {
            let d = entry(dep)
            if !d.hasValue && !deadNodes.isEmpty && deadNodes.contains(dep.owner) && dep.owner != id {
                storeLocked(dep, lostValue(dep), &out)
            }
            guard !d.hasValue else { continue }
            missing += 1
            d.blockedTasks.append(spec.id)
            requestLocked(dep, d, &out)
        }
        if missing == 0 {
            dispatchLocked(spec, placed: placed, &out)
        } else {
            task.pendingSpec = spec
            task.missing = missing
            task.placed = placed
            pendingCount += 1
        }
    }

    /// Inputs exist: resolve them, then run here or spill.
    private func dispatchLocked(_ spec: TaskSpec, placed: Bool, _ out: inout Outgoing) {
        for (i, arg) in spec.args.enumerated() {
            guard case .ref(let dep, _) = arg, let value = objects[dep]?.value else { continue }
            if case .failed(let upstream) = value {
                let error = RemoteError(kind: .upstreamFailed, task: spec.id, function: spec.function, node: id,
                                        message: upstream.root.message, cause: upstream)
                completeLocked(spec.id, .failed(error), &out)
                return
            }
            spec.resolve(i, with: value)
        }
        let runnable = accepts(spec.function) && configuration.resources.satisfies(spec.resources)
        if placed || (runnable && !spillLocked(spec)) {
            enqueueLocked(.task(spec), &out)
        } else if placesLoneTasks, out.spilled.isEmpty, out.direct.isEmpty, spec.owner == id, spec.resolved,
                  let target = directTargetLocked(spec), let e = objects[spec.id] {
            // Bottom-up, one step further: a lone task (the only one leaving in this pass, the
            // last sent this way back) with every input in hand goes straight to an idle node,
            // a hop and the placement notice shorter than through the scheduler. A burst costs
            // one check: the tasks after its first see that something already left.
            // Its owner knows where it is, so it runs again elsewhere if that node dies.
            e.placedOn = target
            e.handedUp = false
            directTask = spec.id
            directCount += 1
            out.direct.append((target, spec))
        } else {
            out.spilled.append(spec)
            if inProcessCluster, spec.owner == id, let e = objects[spec.id] {
                e.handedUp = true
                handedUpQueue.append((spec.id, out.now()))
            }
        }
    }

    /// An idle node to send `spec` to directly, if the last task sent that way is back.
    private func directTargetLocked(_ spec: TaskSpec) -> NodeID? {
        if let previous = directTask {
            if let p = objects[previous], !p.hasValue, p.placedOn != nil { return nil }
            directTask = nil
        }
        // A node declared dead is never alive in `nodeLoads` (see `.nodeTable`).
        let start = directLast.flatMap { last in nodeLoads.firstIndex { $0.id == last } } ?? 0
        guard let i = SchedulingPolicy.directTarget(.init(resources: spec.resources, function: spec.function), from: id,
                                                    nodes: nodeLoads, start: start) else { return nil }
        directLast = nodeLoads[i].id
        return nodeLoads[i].id
    }

    /// Tasks this node sent straight to an idle node instead of handing them up.
    var directPlacements: Int {
        condition.lock()
        defer { condition.unlock() }
        return directCount
    }

    /// The node a task owned here was placed on, as far as this node knows.
    func placement(of task: ObjectID) -> NodeID? {
        condition.lock()
        defer { condition.unlock() }
        return objects[task]?.placedOn
    }

    /// Bottom-up: keep the task unless the queue is long and another node is less loaded.
    private func spillLocked(_ spec: TaskSpec) -> Bool {
        if SchedulingPolicy.runsLocally(queued: ready.count, workers: workersTarget, spillThreshold: configuration.spillThreshold) { return false }
        return SchedulingPolicy.shouldSpill(.init(resources: spec.resources, function: spec.function), from: id,
                                            localQueued: ready.count, localCPUs: configuration.resources.cpus, nodes: nodeLoads)
    }

    private func enqueueLocked(_ work: Work, _ out: inout Outgoing) {
        ready.append(work)
        if idle > 0 {
            condition.signal()
        } else if threads - blocked < workersTarget {
            threads += 1
            out.spawnWorkers += 1
        }
    }

    /// Makes sure a missing object will arrive: fetch it from its owner, or rebuild it here.
    private func requestLocked(_ oid: ObjectID, _ e: ObjectEntry, _ out: inout Outgoing) {
        if oid.owner != id {
            if !deadNodes.isEmpty && deadNodes.contains(oid.owner) {
                storeLocked(oid, lostValue(oid), &out)
            } else if !e.fetching {
                e.fetching = true
                out.messages.append((.fetch([oid], replyTo: id), .node(oid.owner)))
            }
        } else if let holder = e.heldAt {
            // Computed elsewhere and kept there: fetch it.
            if !e.fetching {
                e.fetching = true
                out.messages.append((.fetch([oid], replyTo: id), .node(holder)))
            }
        } else if !e.inFlight, !e.pinned, let spec = e.spec {
            // Evicted: run the task that made it again. (Owned objects without lineage, such
            // as actor replies, are never evicted, so for those the value is on its way.)
            acceptLocked(spec, placed: false, &out)
        }
    }

    // MARK: objects

    /// A task finished (here): keep the value if it is ours, else send it to its owner.
    private func completeLocked(_ oid: ObjectID, _ value: StoredValue, _ out: inout Outgoing) {
        if oid.owner == id {
            storeLocked(oid, value, &out)
        } else if inProcessCluster, value.failure == nil, value.size >= Self.directoryThreshold {
            // The only copy stays here, pinned until its owner frees it.
            let e = entry(oid)
            e.pinned = true
            storeLocked(oid, value, &out)
            out.messages.append((.objectsHeld([(oid, id, size: value.size)]), .node(oid.owner)))
        } else {
            out.objects[oid.owner, default: []].append((oid, value))
            // The result belongs to its owner: forget the entry that tracked the task here.
            if let e = objects[oid] {
                e.inFlight = false
                dropIfIdle(oid, e)
            }
        }
    }

    private func storeLocked(_ oid: ObjectID, _ value: StoredValue, _ out: inout Outgoing) {
        let e = entry(oid)
        e.inFlight = false
        e.fetching = false
        if !durableCallsInFlight.isEmpty { durableCallsInFlight.removeValue(forKey: oid) }
        if e.freed {
            objects.removeValue(forKey: oid)
            return
        }
        let size = value.size
        if !e.hasValue {
            storedCount += 1
            storeBytes += size
            if !e.pinned { evictable.append(oid) }
        } else {
            storeBytes += size - e.size
        }
        e.store(value)
        e.size = size
        storedEvents.add(1, ordering: .releasing)
        if oid.owner == id && size >= Self.directoryThreshold {
            // Large objects go into the control store's object table (with their lineage), where
            // the scheduler weighs locality; small ones are known to their owner alone.
            locationBacklog.append((oid, id, size))
            if let spec = e.spec {
                taskBacklog.append(TaskRecord(id: oid, function: spec.function, argRefs: spec.args.compactMap { if case .ref(let r, _) = $0 { return r } else { return nil } }))
            }
        }
        if let first = e.firstWaiter {
            out.callbacks.append((first, value))
            for w in e.moreWaiters { out.callbacks.append((w, value)) }
            e.firstWaiter = nil
            e.moreWaiters = []
        }
        if !e.blockedTasks.isEmpty {
            let tasks = e.blockedTasks
            e.blockedTasks = []
            for t in tasks {
                guard let te = objects[t], let spec = te.pendingSpec else { continue }
                te.missing -= 1
                if te.missing == 0 {
                    te.pendingSpec = nil
                    pendingCount -= 1
                    dispatchLocked(spec, placed: te.placed, &out)
                }
            }
        }
        if !e.fetchRequests.isEmpty {
            for r in e.fetchRequests {
                out.objects[r, default: []].append((oid, value))
                if !e.copies.contains(r) { e.copies.append(r) }
            }
            e.fetchRequests = []
        }
        evictLocked()
    }

    /// Drops least-recently-stored objects over the limit: copies (fetchable from their owner)
    /// and owned results with lineage (rebuilt on demand). Never a `put`.
    private func evictLocked() {
        if storeBytes <= configuration.storeLimitBytes {
            // Keep the eviction queue from growing without bound while under the limit.
            if evictable.count > 4 * max(storedCount, 1024) { evictable = Deque(evictable.filter { objects[$0]?.hasValue == true }) }
            return
        }
        var scanned = 0
        while storeBytes > configuration.storeLimitBytes, scanned < evictable.count, let oid = evictable.popFirst() {
            scanned += 1
            guard let e = objects[oid], e.hasValue else { continue }
            if e.pinned || (oid.owner == id && e.spec == nil) {
                evictable.append(oid)
                continue
            }
            e.dropValue()
            storedCount -= 1
            storeBytes -= e.size
            dropIfIdle(oid, e)
        }
    }

    /// The value of `oid`, waiting for it if needed. Blocks the calling thread.
    func blockingGet(_ oid: ObjectID, timeout: Duration?) throws -> StoredValue {
        var out = Outgoing()
        condition.lock()
        if let v = objects[oid]?.value {
            condition.unlock()
            return v
        }
        drainSubmissionsLocked(&out)
        let e = entry(oid)
        if let v = e.value {
            condition.unlock()
            flush(&out)
            return v
        }
        let done = DispatchSemaphore(value: 0)
        let slot = ValueSlot()
        e.addWaiter(.call { value in
            slot.value = value
            done.signal()
        })
        requestLocked(oid, e, &out)
        let context = WorkerContext.current
        let isWorker = context?.node === self
        // A lane's thread holding a slot gives it up while it waits, as a worker does: it
        // counts as blocked, no longer as running, so that every thread is counted once (a
        // worker that counted it twice stayed when it should have left, and the node was left
        // with more idle workers than slots, one of which then left with the next wake-up).
        let onLane = isWorker && context?.lane == true
        if isWorker {
            blocked += 1
            if onLane { laneRunning -= 1 }
            if !ready.isEmpty && idle == 0 && threads - blocked < workersTarget {
                threads += 1
                out.spawnWorkers += 1
            } else if !ready.isEmpty && idle > 0 {
                // A worker may be waiting for the slot this thread gives back (a lane's: see
                // ``handleFromLane(_:)``): nothing else would wake it.
                condition.signal()
            }
        }
        condition.unlock()
        flush(&out)
        let result: DispatchTimeoutResult
        if let timeout {
            let c = timeout.components
            let nanos = Int(c.seconds) * 1_000_000_000 + Int(c.attoseconds / 1_000_000_000)
            result = done.wait(timeout: .now() + .nanoseconds(nanos))
        } else {
            done.wait()
            result = .success
        }
        if isWorker {
            condition.lock()
            blocked -= 1
            if onLane { laneRunning += 1 }
            condition.unlock()
        }
        guard result == .success, let value = slot.value else {
            throw CairnError(.timeout, "\(oid) was not ready within \(timeout.map { "\($0)" } ?? "the wait")")
        }
        return value
    }

    /// Hands each value to `gather` as it becomes available (at once for those present). With
    /// `waiting` false (a poll), only values present now are handed over; missing ones are still
    /// fetched, so that a later poll finds them.
    func whenAvailable(_ oids: [ObjectID], into gather: Gather, waiting: Bool = true) {
        var out = Outgoing()
        var now: [(Int, StoredValue)] = []
        condition.lock()
        if let error = cutOffError {
            condition.unlock()
            gather.expire(error)
            return
        }
        drainSubmissionsLocked(&out)
        for (i, oid) in oids.enumerated() {
            let e = entry(oid)
            if e.hasValue, let v = e.value {
                now.append((i, v))
            } else {
                if waiting { e.addWaiter(.gather(gather, i)) }
                requestLocked(oid, e, &out)
                // A poll still reports a value the request settled at once (an object lost with its node).
                if !waiting, e.hasValue, let v = e.value { now.append((i, v)) }
            }
        }
        condition.unlock()
        flush(&out)
        for (i, v) in now { gather.arrived(i, v) }
    }

    /// The value of `oid` if it is here now.
    func peek(_ oid: ObjectID) -> StoredValue? {
        condition.lock()
        defer { condition.unlock() }
        return objects[oid]?.value
    }

    /// Waits up to `microseconds` for `oid` without suspending: a round trip to a short task
    /// usually completes within it, which saves the caller a thread wake-up. For a task that
    /// went straight to another node (a lone task, see ``directTargetLocked(_:)``), up to
    /// `directMicroseconds`: its result comes back by a lane, a round trip of some tens of
    /// microseconds.
    func spinGet(_ oid: ObjectID, microseconds: UInt64, directMicroseconds: UInt64? = nil) -> StoredValue? {
        var out = Outgoing()
        condition.lock()
        drainSubmissionsLocked(&out)
        let present = objects[oid]?.value
        let direct = directTask == oid
        condition.unlock()
        flush(&out)
        if let present { return present }
        let deadline = monotonicNanoseconds() + (direct ? directMicroseconds ?? microseconds : microseconds) * 1000
        var seen = storedEvents.load(ordering: .acquiring)
        while monotonicNanoseconds() < deadline {
            let now = storedEvents.load(ordering: .acquiring)
            if now != seen {
                seen = now
                if let v = peek(oid) { return v }
            }
        }
        return nil
    }

    /// Entries in the object table (values or not), for tests.
    var trackedObjects: Int {
        condition.lock()
        defer { condition.unlock() }
        return objects.count
    }

    /// Callers waiting for `oid`'s value here, for tests.
    func waiterCount(of oid: ObjectID) -> Int {
        condition.lock()
        defer { condition.unlock() }
        guard let e = objects[oid] else { return 0 }
        return (e.firstWaiter == nil ? 0 : 1) + e.moreWaiters.count
    }

    /// Objects and bytes held, for tests and status.
    var storeStatus: (objects: Int, bytes: Int) {
        condition.lock()
        defer { condition.unlock() }
        return (storedCount, storeBytes)
    }

    // MARK: actors

    /// Creates an actor on a node chosen by the policy; `done` gets the node or the failure.
    /// A durable actor is created, or restored from its storage, before `done` runs.
    func spawnActor(typeName: String, state: StoredValue, resources: Resources, durable: DurableSpawn? = nil,
                    done: @escaping @Sendable (Result<(ActorID, NodeID), CairnError>) -> Void) {
        if let error = cutOffReason {
            done(.failure(error))
            return
        }
        let aid = durable.map { ActorID.durable(name: $0.name) } ?? mint.actor()
        if durable != nil && inProcessCluster {
            // Hosted (or being restored) by some node already: that one is the actor. (In one
            // process the storage's table of hosted names says so; across processes the
            // control store's table does.)
            describeActor(aid) { [self] record in
                if let r = record, r.state == .alive || r.state == .restoring {
                    guard r.typeName == typeName else {
                        done(.failure(CairnError(.invalidArgument, "durable actor \"\(durable!.name)\" is a \(r.typeName), not a \(typeName); use another name")))
                        return
                    }
                    done(.success((aid, r.node)))
                } else {
                    place(aid, typeName: typeName, state: state, resources: resources, durable: durable, done: done)
                }
            }
            return
        }
        place(aid, typeName: typeName, state: state, resources: resources, durable: durable, done: done)
    }

    private func place(_ aid: ActorID, typeName: String, state: StoredValue, resources: Resources, durable: DurableSpawn?,
                       done: @escaping @Sendable (Result<(ActorID, NodeID), CairnError>) -> Void) {
        // Bottom-up: host the actor here when this node can.
        if accepts(typeName), configuration.resources.satisfies(resources), let type = FunctionRegistry.process.actorType(typeName) {
            host(aid, typeName: typeName, type: type, state: state, durable: durable, resources: resources) { result in
                done(result.map { (aid, $0) })
            }
            return
        }
        condition.lock()
        let loads = nodeLoads
        var random = SeededGenerator(seed: aid.raw)
        guard let target = SchedulingPolicy.place(.init(resources: resources, function: typeName), nodes: loads, random: &random) else {
            condition.unlock()
            let anyNode = SchedulingPolicy.feasible(.init(resources: resources, function: nil), nodes: loads)
            done(.failure(CairnError(anyNode ? .unknownFunction : .infeasible,
                                     anyNode ? "no node accepts actor type \"\(typeName)\"" : "no node offers \(resources) for actor \(typeName)")))
            return
        }
        spawnWaiters[aid] = { result in done(result.map { (aid, $0) }) }
        condition.unlock()
        do {
            transport.send(.createActor(ActorSpawn(id: aid, typeName: typeName, state: try state.portable(), replyTo: id, durable: durable,
                                                   resources: resources)), to: .node(target))
        } catch {
            condition.lock()
            spawnWaiters.removeValue(forKey: aid)
            condition.unlock()
            done(.failure(error as? CairnError ?? CairnError(.serialization, "\(error)")))
        }
    }

    /// Creates the actor here. A durable one is created or restored on its own thread (a
    /// restore reads and replays its storage, and in a cluster of processes first waits for the
    /// lock on the actor's directory), and registered only once it can take messages.
    private func host(_ aid: ActorID, typeName: String, type: ErasedActorType, state: StoredValue, durable: DurableSpawn?,
                      resources: Resources, done: @escaping @Sendable (Result<NodeID, CairnError>) -> Void) {
        guard let durable else {
            do {
                let instance = ActorInstance(id: aid, typeName: typeName, box: try type.make(state))
                install(instance, record: ActorRecord(id: aid, typeName: typeName, node: id))
                done(.success(id))
            } catch {
                done(.failure(CairnError(.serialization, "cannot create \(typeName) from its initial state: \(error)")))
            }
            return
        }
        var record = ActorRecord(id: aid, typeName: typeName, node: id)
        record.name = durable.name
        if inProcessCluster {
            // What the control store needs to restore it on another node if this one dies.
            var restorable = durable
            restorable.restoreOnly = false
            record.relocation = ActorRelocation(durability: WireDurability(restorable), resources: resources)
        }
        let template = record
        startThread(named: "cairn-restore") { [self] in
            var record = template
            let storage: ActorStorage
            do {
                storage = try actorStorage.get(for: durable.name) { [storageProxy] in ProxiedMap(proxy: storageProxy, namespace: $0) }
            } catch {
                let e = error as? CairnError ?? CairnError(.storage, "\(error)")
                if durable.restoreOnly {
                    record.state = .failed
                    transport.send(.control(.registerActor(record)), to: .controlStore)
                }
                done(.failure(e))
                return
            }
            // One host per name in the cluster: spawning a hosted name again returns the same actor.
            let alreadyHosted = storage.hosted.withLock { table -> Bool in
                if table[durable.name] != nil { return true }
                table[durable.name] = aid
                return false
            }
            if alreadyHosted {
                if actors.withLock({ $0[aid] }) != nil { done(.success(id)) } else {
                    done(.failure(CairnError(.invalidArgument, "durable actor \"\(durable.name)\" is already hosted in this cluster (or being restored); use its existing handle")))
                }
                return
            }
            record.state = .restoring
            transport.send(.control(.registerActor(record)), to: .controlStore)
            do {
                let (box, d, restarts) = try DurableActor.open(spawn: durable, typeName: typeName, type: type, initial: state, node: self,
                                                              storage: storage, metrics: actorStorage.metrics, log: actorStorage.log)
                let instance = ActorInstance(id: aid, typeName: typeName, box: box, durable: d)
                d.instance = instance
                durables.withLock { $0.append(d) }
                record.state = .alive
                record.restarts = restarts
                record.checkpointSequence = d.newestCheckpoint.load(ordering: .relaxed)
                record.logPosition = d.position
                install(instance, record: record)
                done(.success(id))
            } catch {
                _ = storage.hosted.withLock { $0.removeValue(forKey: durable.name) }
                let e = error as? CairnError ?? CairnError(.storage, "\(error)")
                record.state = e.code == .actorDead ? .dead : .failed
                // Declared dead: the record counts its crashes, as the storage does (which was readable then).
                if e.code == .actorDead, let meta = try? storage.meta(durable.name) { record.restarts = meta.restarts }
                transport.send(.control(.registerActor(record)), to: .controlStore)
                done(.failure(e))
            }
        }
    }

    private func install(_ instance: ActorInstance, record: ActorRecord) {
        actors.withLock { $0[instance.id] = instance }
        condition.lock()
        actorLocations[instance.id] = id
        condition.unlock()
        transport.send(.control(.registerActor(record)), to: .controlStore)
    }

    /// Schedules an actor whose mailbox just became non-empty (from outside the node's lock).
    func schedule(_ instance: ActorInstance) {
        var out = Outgoing()
        condition.lock()
        enqueueLocked(.actor(instance), &out)
        condition.unlock()
        flush(&out)
    }

    /// Completes an object from outside a worker (a durable actor's checkpoint reply, a log failure).
    func complete(_ oid: ObjectID, _ value: StoredValue) {
        var out = Outgoing()
        condition.lock()
        completeLocked(oid, value, &out)
        condition.unlock()
        flush(&out)
    }

    /// Tells the control store where a durable actor's checkpoint and log stand.
    func reportActorProgress(_ d: DurableActor) {
        guard let aid = d.instance?.id else { return }
        let checkpoint = d.newestCheckpoint.load(ordering: .relaxed)
        transport.send(.control(.actorProgress(aid, checkpoint: checkpoint == .max ? nil : checkpoint,
                                               log: d.reportedPosition.load(ordering: .relaxed))), to: .controlStore)
    }

    /// Asks the control store for an actor's record.
    func describeActor(_ aid: ActorID, done: @escaping @Sendable (ActorRecord?) -> Void) {
        condition.lock()
        guard cutOffError == nil else {
            condition.unlock()
            return done(nil)
        }
        let first = describeWaiters[aid] == nil
        describeWaiters[aid, default: []].append(done)
        condition.unlock()
        if first { transport.send(.control(.describeActor(aid, replyTo: .node(id))), to: .controlStore) }
    }

    /// Subscribes to the node table again (a new control store incarnation).
    func resubscribe() {
        transport.send(.control(.subscribeNodes(.node(id))), to: .controlStore)
    }

    /// Asks the control store's object table where an object lives.
    func locateObject(_ oid: ObjectID, done: @escaping @Sendable (ObjectLocation?) -> Void) {
        condition.lock()
        guard cutOffError == nil else {
            condition.unlock()
            return done(nil)
        }
        let first = locateWaiters[oid] == nil
        locateWaiters[oid, default: []].append(done)
        condition.unlock()
        if first { transport.send(.control(.locateObject(oid, replyTo: .node(id))), to: .controlStore) }
    }

    /// Sends a message to an actor wherever it lives; calls from one thread keep their order.
    func sendToActor<R: RemoteValue>(_ actor: ActorID, typeName: String, message: StoredValue, caller: UInt64 = 0, sequence: UInt64 = 0,
                                     checkpointRequest: Bool = false) throws -> ObjectRef<R> {
        let rid = mint.object()
        // Calls to a local actor go straight to its mailbox; the node lock is needed only to
        // schedule the mailbox when it was idle.
        if let instance = actors.withLock({ $0[actor] }) {
            var call = ActorCall(actor: actor, typeName: typeName, result: rid, message: message, caller: caller, callerSequence: sequence,
                                 isCheckpointRequest: checkpointRequest)
            if let durable = instance.durable {
                // A durable actor's message is logged, so it is encoded here, on the caller's thread.
                call.message = try message.portable()
                durable.submit(call)
            } else if instance.post(call) {
                var out = Outgoing()
                condition.lock()
                enqueueLocked(.actor(instance), &out)
                condition.unlock()
                flush(&out)
            }
            return newRef(rid)
        }
        // A call that may leave the node is encoded before it is routed.
        let call = ActorCall(actor: actor, typeName: typeName, result: rid, message: try message.portable(), caller: caller,
                             callerSequence: sequence, isCheckpointRequest: checkpointRequest)
        var out = Outgoing()
        condition.lock()
        routeLocked(call, &out)
        condition.unlock()
        flush(&out)
        return newRef(rid)
    }

    private func routeLocked(_ call: ActorCall, _ out: inout Outgoing) {
        if let instance = actors.withLock({ $0[call.actor] }) {
            deliverLocked(call, to: instance, &out)
        } else if let location = actorLocations[call.actor] {
            actorOutbox[location, default: []].append(call)
            if inProcessCluster {
                entry(call.result).placedOn = location
                if call.actor.isDurable && call.caller != 0 { durableCallsInFlight[call.result] = call }
            }
            out.actorCallsRouted = true
        } else {
            if actorQueue[call.actor] == nil {
                out.messages.append((.control(.lookupActor(call.actor, replyTo: .node(id))), .controlStore))
            }
            actorQueue[call.actor, default: []].append(call)
        }
    }

    /// Sends routed actor calls. Taking and sending happen under one lock, so two threads
    /// flushing at once cannot reorder calls to the same actor.
    private func flushActorCalls() {
        actorSendLock.lock()
        defer { actorSendLock.unlock() }
        condition.lock()
        let pending = actorOutbox
        actorOutbox = [:]
        condition.unlock()
        for (node, calls) in pending { transport.send(.actorCalls(calls), to: .node(node)) }
    }

    private func deliverLocked(_ call: ActorCall, to instance: ActorInstance, _ out: inout Outgoing) {
        if let durable = instance.durable {
            out.durableCalls.append((durable, call))
        } else if instance.post(call) {
            enqueueLocked(.actor(instance), &out)
        }
    }

    // MARK: messages

    private func handle(_ batch: [Message]) {
        condition.lock()
        handleLocked(batch)
    }

    /// Handles `batch` on an event loop, only if that costs no wait: when the node's lock is
    /// free now and nothing in it does more than update memory and send. Otherwise returns
    /// false, and the transport leaves the batch to the node's inbox thread. An event loop
    /// that waited for the lock (which workers and the inbox thread take all the time on a
    /// busy node) would stop every connection it serves, heartbeats included, for as long:
    /// waits of 100–255 ms were measured under load, enough for peers to declare the node dead.
    private func tryHandle(_ batch: [Message]) -> Bool {
        for message in batch {
            switch message {
            case .createActor:
                // Hosting an actor opens its storage and may replay its log.
                return false
            case .nodeTable:
                // A node's death, when the table brings one, is a pass over every object here.
                return false
            default:
                continue
            }
        }
        guard condition.tryLock() else { return false }
        handleLocked(batch)
        return true
    }

    /// Tasks a lane brought (``TCPTransport``), on the lane's reading thread. A lone task
    /// another node owns, with its inputs in hand, runs right here when a worker's slot is free
    /// and nothing is queued: it then reaches its worker, and its result the lane, with no
    /// thread woken. The lane's thread holds the slot while it runs (`laneRunning`, counted in
    /// `threads`), so the node never runs more at once than it has workers. Anything else is
    /// handled as if it came the usual way.
    private func handleFromLane(_ batch: [Message]) {
        guard batch.count == 1, case .runDirect(let specs) = batch[0], specs.count == 1, let spec = specs.first,
              spec.owner != id, spec.resolved, accepts(spec.function),
              let function = FunctionRegistry.process.function(spec.function) else {
            handle(batch)
            return
        }
        condition.lock()
        guard !stopped, ready.isEmpty, idle > 0, threads - blocked - idle < workersTarget else {
            handleLocked(batch)
            return
        }
        threads += 1
        laneRunning += 1
        condition.unlock()
        if WorkerContext.current.map({ $0.node !== self || !$0.lane }) ?? true { WorkerContext.enter(WorkerContext(node: self, lane: true)) }
        spec.local = function
        let value = run(spec)
        var out = Outgoing()
        condition.lock()
        threads -= 1
        laneRunning -= 1
        completeLocked(spec.id, value, &out)
        if idle > 0 && (!ready.isEmpty || !submissions.isEmpty) { condition.signal() }
        condition.unlock()
        flush(&out)
    }

    /// Entered with the lock held; releases it.
    private func handleLocked(_ batch: [Message]) {
        var out = Outgoing()
        var created: [(@Sendable (Result<NodeID, CairnError>) -> Void, Result<NodeID, CairnError>)] = []
        var hostLater: [(ActorSpawn, ErasedActorType)] = []
        var described: [(@Sendable (ActorRecord?) -> Void, ActorRecord?)] = []
        var located: [(@Sendable (ObjectLocation?) -> Void, ObjectLocation?)] = []
        for message in batch {
            switch message {
            case .runTasksEncoded:
                preconditionFailure("tasks in their wire form reached a node undecoded; transports decode them (decodedForDelivery)")
            case .runTasks(let specs), .runDirect(let specs):
                var last: ErasedFunction?
                // Owners learn that their tasks are here, so they can run them again if this
                // node dies (or hand them up again if the scheduler died before sending them).
                // An owner that sent its tasks here itself knows already.
                var notices: [NodeID: [(ObjectID, NodeID)]] = [:]
                let direct: Bool
                if case .runDirect = message { direct = true } else { direct = false }
                for spec in specs where inProcessCluster && !direct {
                    if spec.owner != id {
                        notices[spec.owner, default: []].append((spec.id, id))
                    } else if let e = objects[spec.id] {
                        e.handedUp = false  // placed back here
                    }
                }
                for (owner, list) in notices { out.messages.append((.placed(list), .node(owner))) }
                for spec in specs {
                    // Resolve the code once, on arrival (a batch is usually one function).
                    if last?.name != spec.function { last = FunctionRegistry.process.function(spec.function) }
                    spec.local = last
                    if !accepts(spec.function) || last == nil {
                        let error = RemoteError(kind: .unknownFunction, task: spec.id, function: spec.function, node: id,
                                                message: "\(id) has no function \"\(spec.function)\" registered")
                        completeLocked(spec.id, .failed(error), &out)
                    } else if spec.owner != id && spec.resolved {
                        // Placed here with every input in hand, for another owner: nothing to
                        // track here (the result goes straight back to its owner), just run it.
                        enqueueLocked(.task(spec), &out)
                    } else {
                        acceptLocked(spec, placed: true, &out)
                    }
                }
            case .objects(let objects):
                for (oid, value) in objects { storeLocked(oid, value, &out) }
            case .fetch(let oids, let replyTo):
                for oid in oids {
                    let e = entry(oid)
                    if let value = e.value {
                        out.objects[replyTo, default: []].append((oid, value))
                        if !e.copies.contains(replyTo) { e.copies.append(replyTo) }
                    } else {
                        e.fetchRequests.append(replyTo)
                        requestLocked(oid, e, &out)
                    }
                }
            case .free(let oids):
                var recorded: [ObjectID] = []
                for oid in oids {
                    guard let e = objects[oid] else { continue }
                    if e.hasValue {
                        storedCount -= 1
                        storeBytes -= e.size
                        if e.size >= Self.directoryThreshold { recorded.append(oid) }
                    } else if e.heldAt != nil {
                        recorded.append(oid)
                    }
                    for h in e.copies { out.messages.append((.free([oid]), .node(h))) }
                    if e.inFlight || e.pendingSpec != nil {
                        // Still being computed: drop the value when it arrives.
                        e.dropValue()
                        e.spec = nil
                        e.freed = true
                    } else {
                        objects.removeValue(forKey: oid)
                    }
                }
                if !recorded.isEmpty { out.messages.append((.control(.forgetObjects(recorded)), .controlStore)) }
            case .createActor(let spawn):
                if !accepts(spawn.typeName) {
                    out.messages.append((.actorCreated(spawn.id, on: id, failure: "\(id) does not accept actor type \"\(spawn.typeName)\""), .node(spawn.replyTo)))
                } else if let type = FunctionRegistry.process.actorType(spawn.typeName) {
                    hostLater.append((spawn, type))
                } else {
                    out.messages.append((.actorCreated(spawn.id, on: id, failure: "actor type \"\(spawn.typeName)\" is not registered on \(id)"), .node(spawn.replyTo)))
                }
            case .actorCreated(let aid, let node, let failure):
                if failure == nil { actorLocations[aid] = node }
                if let waiter = spawnWaiters.removeValue(forKey: aid) {
                    created.append((waiter, failure.map { .failure(CairnError(.actorUnavailable, $0)) } ?? .success(node)))
                }
            case .storageReply(let request, let reply):
                storageProxy.complete(request, reply)
            case .actorDescription(let aid, let record):
                for waiter in describeWaiters.removeValue(forKey: aid) ?? [] { described.append((waiter, record)) }
            case .objectLocation(let oid, let location):
                for waiter in locateWaiters.removeValue(forKey: oid) ?? [] { located.append((waiter, location)) }
            case .actorCalls(let calls):
                for call in calls {
                    if let instance = actors.withLock({ $0[call.actor] }) {
                        deliverLocked(call, to: instance, &out)
                    } else {
                        let error = RemoteError(kind: .actorUnavailable, task: call.result, function: "\(call.typeName).receive", node: id,
                                                message: "\(call.actor) is not hosted on \(id)")
                        completeLocked(call.result, .failed(error), &out)
                    }
                }
            case .actorLocation(let aid, let node, let reason):
                let queued = actorQueue.removeValue(forKey: aid) ?? []
                if let node {
                    actorLocations[aid] = node
                    for call in queued { routeLocked(call, &out) }
                } else {
                    for call in queued {
                        let error = RemoteError(kind: .actorUnavailable, task: call.result, function: "\(call.typeName).receive", node: id,
                                                message: "\(aid) is not alive in the cluster: \(reason ?? "it was never created, its creation failed, or it was lost with its node")")
                        completeLocked(call.result, .failed(error), &out)
                    }
                }
            case .nodeTable(let table):
                var died: [NodeID] = []
                for record in table where !record.alive && record.id != id && !deadNodes.contains(record.id) {
                    deadNodes.insert(record.id)
                    lastFailureNanoseconds = monotonicNanoseconds()
                    recentDeaths.update { $0.append(RecentDeath(node: record.id, at: lastFailureNanoseconds)) }
                    anyRecentDeaths.store(true, ordering: .releasing)
                    transport.forget(.node(record.id))
                    died.append(record.id)
                }
                // A node declared dead stays dead here, even in a table that still lists it alive
                // (one sent before its death and delivered after): its death pass runs once, so a
                // task sent to it later would never run again.
                let loads = table.map { SchedulingPolicy.NodeLoad(id: $0.id, resources: $0.resources, queued: $0.queued, functions: $0.functions,
                                                                  alive: $0.alive && !deadNodes.contains($0.id)) }
                if loads.map(\.id) != nodeLoads.map(\.id) || loads.map(\.alive) != nodeLoads.map(\.alive) {
                    feasibility.withLock { $0.forget() }
                }
                nodeLoads = loads
                // Only now, with the table current: a task run again by a death pass must not be
                // sent to a node that died, this one included.
                for node in died { nodeDiedLocked(node, &out) }
            case .placed(let placements):
                for (oid, node) in placements {
                    // (A large result can be reported held before its task's notice arrives:
                    // the worker's message may leave before the inbox thread's.)
                    guard let e = objects[oid], !e.hasValue, e.heldAt == nil, e.spec != nil else { continue }
                    e.placedOn = node
                    e.handedUp = false
                    // Placed on a node that died before this notice came: run it again now.
                    if deadNodes.contains(node) { nodeDiedLocked(node, only: oid, &out) }
                }
            case .objectsHeld(let held):
                for (oid, node, size) in held {
                    guard oid.owner == id, let e = objects[oid], !e.hasValue, !e.freed else {
                        // Freed meanwhile (or unknown): the holder drops its copy.
                        out.messages.append((.free([oid]), .node(node)))
                        continue
                    }
                    e.heldAt = node
                    e.inFlight = false
                    e.placedOn = nil
                    e.handedUp = false
                    e.fetching = false  // a fetch from an earlier holder is moot
                    if !e.copies.contains(node) { e.copies.append(node) }
                    locationBacklog.append((oid, node, size))
                    if let spec = e.spec {
                        taskBacklog.append(TaskRecord(id: oid, function: spec.function, argRefs: []))
                    }
                    if e.firstWaiter != nil || !e.blockedTasks.isEmpty || !e.fetchRequests.isEmpty {
                        requestLocked(oid, e, &out)
                    }
                }
            case .schedulerAt(_, let incarnation):
                if let previous = schedulerIncarnation, previous != incarnation {
                    lastFailureNanoseconds = monotonicNanoseconds()
                    // The scheduler was replaced: what it had not placed is gone with it.
                    for (oid, e) in objects where e.handedUp && !e.hasValue && e.placedOn == nil {
                        if let spec = e.spec { handUpAgainLocked(oid, spec, &out) }
                    }
                }
                schedulerIncarnation = incarnation
            case .schedule, .scheduleEncoded, .control:
                break
            }
        }
        condition.unlock()
        flush(&out)
        for (waiter, result) in created { waiter(result) }
        for (waiter, record) in described { waiter(record) }
        for (waiter, location) in located { waiter(location) }
        for (spawn, type) in hostLater {
            host(spawn.id, typeName: spawn.typeName, type: type, state: spawn.state, durable: spawn.durable, resources: spawn.resources) { [self] result in
                var failure: String?
                if case .failure(let e) = result { failure = e.detail }
                transport.send(.actorCreated(spawn.id, on: id, failure: failure), to: .node(spawn.replyTo))
            }
        }
    }

    // MARK: failures

    /// Hands a task owned here up to the scheduler again, still awaiting its confirmation.
    private func handUpAgainLocked(_ oid: ObjectID, _ spec: TaskSpec, _ out: inout Outgoing) {
        out.spilled.append(spec)
        handedUpQueue.append((oid, monotonicNanoseconds()))
    }

    /// The error value of an object whose owner died.
    private func lostValue(_ oid: ObjectID) -> StoredValue {
        .failed(RemoteError(kind: .objectLost, task: oid, function: "", node: oid.owner,
                            message: "\(oid) was owned by \(oid.owner), which died: its value and its lineage were lost with it"))
    }

    /// `dead` was declared dead: run again the tasks owned here that it was running (or may
    /// have been sent), fail the actor calls it had, and fail the objects it owned that anyone
    /// here waits for. With
    /// `only`, just that object (a placement notice that arrived after the news).
    private func nodeDiedLocked(_ dead: NodeID, only: ObjectID? = nil, _ out: inout Outgoing) {
        if only == nil { actorLocations = actorLocations.filter { $0.value != dead } }
        var retry: [(ObjectID, ObjectEntry)] = []
        var lost: [ObjectID] = []
        for (oid, e) in objects where !e.hasValue && (only == nil || only == oid) {
            if e.placedOn == dead {
                retry.append((oid, e))
            } else if only == nil && e.handedUp && e.placedOn == nil, let spec = e.spec {
                // Handed up and not yet confirmed by the node it went to: perhaps sent to the
                // dead node before it could say so. Handed up again (if it was in fact still
                // with the scheduler, it runs twice; tasks are deterministic).
                handUpAgainLocked(oid, spec, &out)
            } else if oid.owner == dead && (e.fetching || e.firstWaiter != nil || !e.blockedTasks.isEmpty) {
                lost.append(oid)
            } else if e.heldAt == dead {
                // Its only copy died: rebuilt from lineage, now if anyone waits, else when asked.
                e.heldAt = nil
                e.fetching = false
                e.copies.removeAll { $0 == dead }
                if e.firstWaiter != nil || !e.blockedTasks.isEmpty || !e.fetchRequests.isEmpty { retry.append((oid, e)) }
            }
        }
        if only == nil {
            // Copies held here for a dead owner: nobody can ask for them any more.
            for (oid, e) in objects where oid.owner == dead && e.hasValue && e.pinned {
                storedCount -= 1
                storeBytes -= e.size
                objects.removeValue(forKey: oid)
            }
        }
        var again: [ActorCall] = []
        for (oid, e) in retry {
            e.placedOn = nil
            if e.heldAt == dead {
                e.heldAt = nil
                e.fetching = false
            }
            guard let spec = e.spec else {
                if let call = durableCallsInFlight.removeValue(forKey: oid) {
                    // The control store restores the actor on another node; the call goes there,
                    // and its caller ID makes sure it is applied once.
                    again.append(call)
                    continue
                }
                let error = RemoteError(kind: .nodeDied, task: oid, function: "", node: dead,
                                        message: "\(dead), hosting the actor, died with this call in flight; a durable actor is restored on another node, and calls sent with a caller ID (send(_:caller:sequence:)) are delivered to it again, exactly once")
                storeLocked(oid, .failed(error), &out)
                continue
            }
            e.retries += 1
            if e.retries > maxTaskRetries {
                let error = RemoteError(kind: .nodeDied, task: oid, function: spec.function, node: dead,
                                        message: "its node died while running it \(e.retries) times; maxTaskRetries is \(maxTaskRetries)")
                storeLocked(oid, .failed(error), &out)
            } else {
                acceptLocked(spec, e, placed: false, &out)
            }
        }
        for oid in lost { storeLocked(oid, lostValue(oid), &out) }
        // In each caller's order: the actor's caller table takes a lower sequence after a
        // higher one as a retry of something already applied.
        again.sort { ($0.actor.raw, $0.caller, $0.callerSequence) < ($1.actor.raw, $1.caller, $1.callerSequence) }
        for call in again { routeLocked(call, &out) }
    }

    /// Sends what the locked section gathered: encodes values leaving the node (outside the lock).
    private func flush(_ out: inout Outgoing) {
        for _ in 0..<out.spawnWorkers {
            startThread(named: "cairn-worker", stackSize: 4 << 20) { [self] in workerLoop() }
        }
        for (message, endpoint) in out.messages { transport.send(message, to: endpoint) }
        for (node, objects) in out.objects {
            let portable = objects.map { (oid, value) in (oid, (try? value.portable()) ?? .failed(RemoteError(kind: .serialization, task: oid, function: "", node: id, message: "the result could not be encoded to send to its owner"))) }
            transport.send(.objects(portable), to: .node(node))
        }
        // Tasks handed up to a scheduler in another process are encoded from the specs
        // themselves when their values need no coding: no portable copy per task.
        if !out.spilled.isEmpty, out.spilled.allSatisfy(\.encodableAsIs),
           transport.sendIfEncodedAtOnce(.schedule(out.spilled, from: id, avoid: nodesToAvoid()), to: .scheduler) {
            out.spilled.removeAll(keepingCapacity: true)
        }
        if !out.spilled.isEmpty {
            var specs: [TaskSpec] = []
            for spec in out.spilled {
                do {
                    specs.append(try spec.portable())
                } catch {
                    let e = RemoteError(kind: .serialization, task: spec.id, function: spec.function, node: id, message: "\(error)")
                    transport.send(.objects([(spec.id, .failed(e))]), to: .node(spec.owner))
                }
            }
            transport.send(.schedule(specs, from: id, avoid: nodesToAvoid()), to: .scheduler)
        }
        for (node, spec) in out.direct {
            do {
                let message = Message.runDirect([try spec.portable()])
                // A node with no CPU (a driver's) sends its lone tasks by a lane, from this thread.
                if takesLoneSubmissionsIn {
                    transport.send(message, to: .node(node), laneFrom: .node(id))
                } else {
                    transport.send(message, to: .node(node))
                }
            } catch {
                let e = RemoteError(kind: .serialization, task: spec.id, function: spec.function, node: id, message: "\(error)")
                transport.send(.objects([(spec.id, .failed(e))]), to: .node(spec.owner))
            }
        }
        if out.actorCallsRouted { flushActorCalls() }
        for (durable, call) in out.durableCalls { durable.submit(call) }
        for (waiter, value) in out.callbacks { waiter.fire(value) }
        out.clear()
    }

    /// The nodes declared dead lately (see ``recentDeaths``).
    private func nodesToAvoid() -> [NodeID] {
        guard anyRecentDeaths.load(ordering: .acquiring) else { return [] }
        return recentDeaths.update { deaths in
            let now = monotonicNanoseconds()
            deaths.removeAll { $0.at + Self.avoidWindowNanoseconds < now }
            if deaths.isEmpty { anyRecentDeaths.store(false, ordering: .releasing) }
            return deaths.map(\.node)
        }
    }

    /// Reports load and backlogged control-store records; called by the cluster's housekeeping.
    func housekeeping() {
        var out = Outgoing()
        condition.lock()
        let now = monotonicNanoseconds()
        let window = Self.confirmWithinNanoseconds
        while let (oid, at) = handedUpQueue.first, at + window <= now {
            handedUpQueue.removeFirst()
            guard lastFailureNanoseconds > 0, lastFailureNanoseconds + window >= at,
                  let e = objects[oid], e.handedUp, e.placedOn == nil, !e.hasValue, let spec = e.spec else { continue }
            handUpAgainLocked(oid, spec, &out)
        }
        let queued = ready.count + pendingCount
        let locations = locationBacklog
        let tasks = taskBacklog
        locationBacklog = []
        taskBacklog = []
        condition.unlock()
        if !out.spilled.isEmpty { flush(&out) }
        transport.send(.control(.reportLoad(id, queued: queued)), to: .controlStore)
        for d in durables.withLock({ $0 }) {
            if d.idleCheckpointDue, let instance = d.instance {
                d.markIdleCheckpointRequested()
                _ = try? sendToActor(instance.id, typeName: instance.typeName, message: .boxed(0), checkpointRequest: true) as ObjectRef<UInt64>
            }
        }
        if !locations.isEmpty { transport.send(.control(.objectLocations(locations)), to: .controlStore) }
        if !tasks.isEmpty { transport.send(.control(.recordTasks(tasks)), to: .controlStore) }
    }

    // MARK: workers

    private func workerLoop() {
        WorkerContext.enter(WorkerContext(node: self))
        var results: [(ObjectID, StoredValue)] = []
        var batch: [Work] = []
        batch.reserveCapacity(Self.batchSize)
        var out = Outgoing()
        condition.lock()
        while true {
            // One locked section per task: hand in the last result, take the next work.
            for (oid, value) in results { completeLocked(oid, value, &out) }
            results.removeAll(keepingCapacity: true)
            if stopped || threads - laneRunning - blocked > workersTarget {
                threads -= 1
                // This thread may have been woken for work: another takes it.
                if idle > 0 && (!ready.isEmpty || !submissions.isEmpty) { condition.signal() }
                condition.unlock()
                flush(&out)
                return
            }
            if ready.isEmpty { drainSubmissionsLocked(&out) }
            // A lane's thread holds a slot (``handleFromLane(_:)``): with every slot busy, wait.
            if laneRunning > 0 && threads - blocked - idle > workersTarget && !stopped {
                condition.unlock()
                flush(&out)
                condition.lock()
                sleepers.add(1, ordering: .sequentiallyConsistent)
                if laneRunning > 0 && threads - blocked - idle > workersTarget && !stopped {
                    idle += 1
                    condition.wait()
                    idle -= 1
                }
                sleepers.subtract(1, ordering: .sequentiallyConsistent)
                continue
            }
            guard let first = ready.popFirst() else {
                condition.unlock()
                flush(&out)
                condition.lock()
                // Announce the sleep before the last look at the submissions: a submitter either
                // sees the sleeper and signals (under `condition`, so not before the wait), or its
                // task is seen here.
                sleepers.add(1, ordering: .sequentiallyConsistent)
                if ready.isEmpty && !stopped && submissions.isEmpty {
                    idle += 1
                    condition.wait()
                    idle -= 1
                }
                sleepers.subtract(1, ordering: .sequentiallyConsistent)
                continue
            }
            // Under load (a long queue) take up to 32 items at once and hand their results in
            // together: one locked section per batch instead of per task. Results still go out
            // once the batch has run 100 us; with a short queue every result goes out at once.
            batch.append(first)
            if ready.count >= Self.batchingQueueLength {
                while batch.count < Self.batchSize, let next = ready.popFirst() { batch.append(next) }
            }
            condition.unlock()
            flush(&out)
            let started = batch.count > 1 ? monotonicNanoseconds() : 0
            for (i, work) in batch.enumerated() {
                switch work {
                case .task(let spec): results.append((spec.id, run(spec)))
                case .actor(let instance): runActor(instance, into: &results)
                }
                if i + 1 < batch.count && monotonicNanoseconds() - started > 100_000 { deliver(&results) }
            }
            batch.removeAll(keepingCapacity: true)
            condition.lock()
        }
    }

    /// Queue length from which a worker takes work in batches.
    static let batchingQueueLength = 64
    /// Most items a worker takes at once.
    static let batchSize = 32

    private func deliver(_ results: inout [(ObjectID, StoredValue)]) {
        guard !results.isEmpty else { return }
        var out = Outgoing()
        condition.lock()
        for (oid, value) in results { completeLocked(oid, value, &out) }
        condition.unlock()
        results.removeAll(keepingCapacity: true)
        flush(&out)
    }

    private func run(_ spec: TaskSpec) -> StoredValue {
        guard let f = spec.local ?? FunctionRegistry.process.function(spec.function), spec.resolved else {
            return .failed(RemoteError(kind: .unknownFunction, task: spec.id, function: spec.function, node: id,
                                       message: "\(id) has no function \"\(spec.function)\" registered"))
        }
        do {
            return .boxed(try f.invoke(spec.args))
        } catch let error as RemoteError {
            return .failed(RemoteError(kind: .upstreamFailed, task: spec.id, function: spec.function, node: id, message: error.root.message, cause: error))
        } catch {
            return .failed(RemoteError(kind: .threw, task: spec.id, function: spec.function, node: id, message: "\(error)"))
        }
    }

    private func runActor(_ instance: ActorInstance, into results: inout [(ObjectID, StoredValue)]) {
        let calls = instance.mailbox.withLock { box -> [ActorCall] in
            var taken: [ActorCall] = []
            taken.reserveCapacity(min(256, box.calls.count))
            while taken.count < 256, let call = box.calls.popFirst() { taken.append(call) }
            return taken
        }
        if let durable = instance.durable {
            durable.run(calls, box: instance.box, typeName: instance.typeName, nodeID: id, into: &results)
        } else {
            runCalls(calls, on: instance, into: &results)
        }
        let more = instance.mailbox.withLock { box -> Bool in
            if box.calls.isEmpty {
                box.scheduled = false
                return false
            }
            return true
        }
        if more {
            var out = Outgoing()
            condition.lock()
            enqueueLocked(.actor(instance), &out)
            condition.unlock()
            flush(&out)
        }
    }

    private func runCalls(_ calls: [ActorCall], on instance: ActorInstance, into results: inout [(ObjectID, StoredValue)]) {
        let function = "\(instance.typeName).receive"
        for call in calls {
            if call.isCheckpointRequest {
                let error = RemoteError(kind: .invalidRequest, task: call.result, function: "checkpoint", node: id,
                                        message: "\(instance.id) is not durable, so it has no checkpoints; spawn it with a name and DurabilityOptions")
                results.append((call.result, .failed(error)))
                continue
            }
            results.append((call.result, DurableActor.apply(call.message, box: instance.box, task: call.result, function: function, node: id)))
        }
    }
}

/// Someone waiting for an object's value.
enum Waiter {
    /// A blocked thread or another callback.
    case call(@Sendable (StoredValue) -> Void)
    /// Slot `index` of a driver's `get` or `wait`: no closure to allocate per ref.
    case gather(Gather, Int)

    func fire(_ value: StoredValue) {
        switch self {
        case .call(let f): f(value)
        case .gather(let g, let i): g.arrived(i, value)
        }
    }
}

/// What a node knows about one object. Guarded by the node's lock, which already makes each
/// access exclusive: as for the node's own tables, the runtime's exclusivity checks are off.
final class ObjectEntry {
    /// The value, once it is here; set by ``store(_:)``, dropped by ``dropValue()``.
    @exclusivity(unchecked) private(set) var value: StoredValue?
    /// Whether the value is here, kept beside it: asking the optional itself goes through
    /// the enum's value witness (`getEnumTagSinglePayload`), 1.7% of the samples of the head's
    /// inbox thread in a profile of `cairn-bench cluster`, and `value == nil` copies it first.
    @exclusivity(unchecked) private(set) var hasValue = false

    func store(_ value: StoredValue) {
        self.value = value
        hasValue = true
    }

    func dropValue() {
        value = nil
        hasValue = false
    }
    @exclusivity(unchecked) var size = 0
    /// Lineage: the task that makes this object, kept by its owner to run it again if lost.
    @exclusivity(unchecked) var spec: TaskSpec?
    /// A task or call producing it is under way.
    @exclusivity(unchecked) var inFlight = false
    /// Made by `put`: never evicted, no lineage.
    @exclusivity(unchecked) var pinned = false
    /// A fetch from its owner is outstanding.
    @exclusivity(unchecked) var fetching = false
    /// Freed while still being computed: drop the value when it arrives.
    @exclusivity(unchecked) var freed = false
    /// For a task waiting here for its inputs: the task, how many inputs are missing, and
    /// whether it was placed here by the scheduler (so it must not be handed up again).
    @exclusivity(unchecked) var pendingSpec: TaskSpec?
    @exclusivity(unchecked) var missing = 0
    @exclusivity(unchecked) var placed = false
    /// Who waits for the value: the first inline, so that the common single waiter allocates nothing.
    @exclusivity(unchecked) var firstWaiter: Waiter?
    @exclusivity(unchecked) var moreWaiters: [Waiter] = []

    func addWaiter(_ w: Waiter) {
        if firstWaiter == nil { firstWaiter = w } else { moreWaiters.append(w) }
    }

    func takeWaiters() -> [Waiter] {
        guard let first = firstWaiter else { return [] }
        let all = [first] + moreWaiters
        firstWaiter = nil
        moreWaiters = []
        return all
    }
    /// Tasks waiting for this object.
    @exclusivity(unchecked) var blockedTasks: [ObjectID] = []
    /// Nodes that asked for it before it existed.
    @exclusivity(unchecked) var fetchRequests: [NodeID] = []
    /// Nodes holding a copy (to free them too).
    @exclusivity(unchecked) var copies: [NodeID] = []
    /// The node that confirmed it holds the task making it, or where the actor call went: if
    /// that node dies first, the task runs again (its owner keeps the spec) or the call fails.
    @exclusivity(unchecked) var placedOn: NodeID?
    /// Times the task was run again because its node died.
    @exclusivity(unchecked) var retries: Int32 = 0
    /// Handed up to the global scheduler and not yet confirmed by the node it went to: handed
    /// up again if the scheduler is replaced or a node dies first.
    @exclusivity(unchecked) var handedUp = false
    /// For an owned result computed elsewhere and kept there: the node holding it.
    @exclusivity(unchecked) var heldAt: NodeID?
}

func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Carries a value from the thread that produces it to the one blocked on a semaphore.
final class ValueSlot: @unchecked Sendable {
    var value: StoredValue?
}

/// Marks a thread as one of a node's workers, so that blocking calls give the slot back and
/// tasks submitted from a task are owned by the node running it.
final class WorkerContext: Sendable {
    let node: Node
    /// A lane's reading thread (``Node/handleFromLane(_:)``), not one of the node's workers.
    let lane: Bool
    init(node: Node, lane: Bool = false) {
        self.node = node
        self.lane = lane
    }

    private static let slot = ThreadSlot<WorkerContext>()

    static func enter(_ context: WorkerContext) { slot.set(context) }

    static var current: WorkerContext? { slot.value }
}
