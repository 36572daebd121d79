import CairnCodec
import CairnGCS
import Foundation
import Synchronization

/// A node as the control store records it.
struct NodeRecord: Sendable, Codable {
    let id: NodeID
    let resources: Resources
    /// Names of the functions the node may run; nil means every registered function.
    let functions: Set<String>?
    var queued: Int
    var alive: Bool
    /// `host:port` of the node's listener when it runs in its own process; nil in process.
    var address: String? = nil
    /// The port on `address`'s host where the node accepts lanes (``LaneConnection``), if it does.
    var lane: Int? = nil
}

/// The lineage of one task: enough to run it again.
struct TaskRecord: Sendable, Codable {
    let id: ObjectID
    let function: String
    let argRefs: [ObjectID]
}

/// An actor as the control store records it.
struct ActorRecord: Sendable, Codable {
    let id: ActorID
    let typeName: String
    var node: NodeID
    /// A durable actor's name; nil for others.
    var name: String?
    var state: ActorStatus.State = .alive
    var restarts = 0
    var checkpointSequence: UInt64?
    var logPosition: UInt64 = 0
    /// For a durable actor in a cluster of processes: how to restore it on another node.
    var relocation: ActorRelocation?
}

extension ActorRecord {
    /// Why an actor with this record takes no messages (said to the callers it turns away).
    var unavailability: String {
        switch state {
        case .dead:
            return "it is dead: it crashed \(restarts) time\(restarts == 1 ? "" : "s"), more than its maxRestarts allows, so it takes no more messages; its log and checkpoints are kept"
        case .failed:
            return "its creation or its restore on \(node) failed (the spawn's error says why)"
        case .alive, .restoring:
            return "it was lost with its node"
        }
    }

    /// The record as ``Cluster/status(of:)`` reports it.
    var status: ActorStatus {
        ActorStatus(id: id, typeName: typeName, node: node, name: name, state: state, restarts: restarts,
                    checkpointSequence: checkpointSequence, logPosition: logPosition)
    }
}

/// What the control store needs to restore a durable actor on another node when its node
/// dies: its name and options, and what it needs of a node.
struct ActorRelocation: Sendable, Codable, Equatable {
    var durability: WireDurability
    var resources: Resources
}

/// An actor's entry in the control store's actor table, as ``Cluster/status(of:)`` reports it.
public struct ActorStatus: Sendable, Equatable, Codable {
    public enum State: String, Sendable, Equatable, Codable {
        /// Taking messages.
        case alive
        /// Being restored from its checkpoint and log; messages wait.
        case restoring
        /// Restored more than `maxRestarts` times; it takes no more messages.
        case dead
        /// Its creation or restore failed (the spawn's error says why).
        case failed
    }
    public let id: ActorID
    public let typeName: String
    /// The node hosting it.
    public let node: NodeID
    /// A durable actor's name.
    public let name: String?
    public let state: State
    /// Times a durable actor was restored after a crash.
    public let restarts: Int
    /// The log position the newest durable checkpoint covers.
    public let checkpointSequence: UInt64?
    /// The log position after the last message applied, as last reported.
    public let logPosition: UInt64
}

/// The control store's logic as a pure value (../shared/STYLE.md): requests and committed
/// rows in, actions out. The tables it answers from are the *committed* view: rows as the GCS
/// holds them, learned through its subscriptions (in memory, rows as written). A change the
/// runtime asks for becomes a row write; it shows in answers only once it comes back committed.
///
/// - A read of a row this store wrote and has not yet seen committed waits for it, so whoever
///   caused a write (an actor registered, then its handle passed on) reads it back.
/// - A lookup of an actor that is being restored waits for the row to leave `restoring`: the
///   caller's messages are delivered to the restored actor instead of failing.
/// - Until the view has caught up with the GCS (a marker written on every shard came back
///   through the subscriptions), requests wait, so a restarted control store never answers
///   from a partial table.
struct ControlStoreCore {
    enum Action {
        /// Write a row (nil deletes it).
        case write(key: String, value: [UInt8]?)
        case send(Message, to: Endpoint)
        case log(String)
    }

    /// Committed rows by key, decoded where the runtime reads them by ID.
    private(set) var nodes: [NodeID: NodeRecord] = [:]
    private(set) var actors: [ActorID: ActorRecord] = [:]
    private(set) var locations: [ObjectID: ObjectLocation] = [:]
    private(set) var tasks: [ObjectID: TaskRecord] = [:]
    /// Queue lengths, as nodes last reported them: soft state, never written to the GCS.
    private var loads: [NodeID: Int] = [:]
    /// Grows whenever a committed row changes the tables: when to publish them again.
    private(set) var version: UInt64 = 0
    /// Grows whenever a node's reported load changes.
    private(set) var loadVersion: UInt64 = 0
    /// Rows written whose newest value has not come back committed.
    private var unconfirmed: [String: Written] = [:]
    struct Written: Equatable { var value: [UInt8]? }
    /// The newest record written for each actor: what a progress report updates.
    private var newestActors: [ActorID: ActorRecord] = [:]
    /// Reads waiting on a row.
    private var parked: [String: [ControlRequest]] = [:]
    private var nodeSubscribers: [Endpoint] = []
    /// Nodes reported lost, with the reason: declared dead, and never alive again.
    private var lostNodes: [NodeID: String] = [:]
    /// The global scheduler's process, when it runs in one: soft state, registered again by
    /// each incarnation.
    private var scheduler: (address: String, incarnation: UInt64)?
    /// Scheduler processes registered while another was active (`cairn scheduler`, or the
    /// head's replacement for one that died), oldest first: the newest takes over when the
    /// active one is lost.
    private var standbySchedulers: [(address: String, incarnation: UInt64)] = []
    /// Scheduler incarnations whose process is gone; never active again.
    private var lostSchedulers: Set<UInt64> = []
    private var nodeTableChanged = false
    /// Whether the view has caught up; requests before that wait in `early`.
    private(set) var ready: Bool
    private var early: [ControlRequest] = []
    /// Catch-up markers still to come back: key and the value written.
    private var markers: [String: [UInt8]]
    /// Whether a node process that dies is replaced (so a durable actor no live node can host
    /// waits for a node to join, instead of failing).
    private let replacementsExpected: Bool
    /// Durable actors whose node died and that no live node can host yet.
    private(set) var homeless: [ActorID] = []

    /// Whether, once caught up, the rows of a previous cluster are deleted before any request
    /// is answered (see ``init(markers:replacementsExpected:startsNewCluster:)``).
    private let startsNewCluster: Bool
    /// Rows of a previous cluster being deleted: requests wait until every deletion is back.
    private var clearing: Set<String> = []

    /// A store whose view is complete from the start (`markers` empty), or one that waits for
    /// each marker row to come back with the value it wrote.
    ///
    /// With `startsNewCluster`, the store is the first of a cluster on a GCS that may hold the
    /// tables of a cluster that is gone (a head started again on the GCS's directory): once
    /// caught up it deletes every node, actor, object and task row it found, and answers only
    /// when those deletions are committed, so the new cluster never sees nodes, actors or
    /// objects of the old one. Other rows stay (a durable actor's replicated storage among
    /// them), so an actor spawned again by name comes back from what it had stored.
    init(markers: [String: [UInt8]] = [:], replacementsExpected: Bool = false, startsNewCluster: Bool = false) {
        self.markers = markers
        self.replacementsExpected = replacementsExpected
        self.startsNewCluster = startsNewCluster
        ready = markers.isEmpty
    }

    /// The keys of every row in the tables.
    private var tableKeys: [String] {
        nodes.keys.map(ControlTables.node) + actors.keys.map(ControlTables.actor)
            + locations.keys.map(ControlTables.object) + tasks.keys.map(ControlTables.task)
    }

    /// Caught up: answers what waited, after deleting a previous cluster's rows if asked to.
    private mutating func caughtUp(_ actions: inout [Action]) {
        if startsNewCluster && clearing.isEmpty {
            let stale = tableKeys
            if !stale.isEmpty {
                clearing = Set(stale)
                actions.append(.log("control store: deleting \(stale.count) rows a previous cluster left in the GCS (\(nodes.count) nodes, \(actors.count) actors, \(locations.count) objects, \(tasks.count) tasks) before answering"))
                for key in stale { actions.append(.write(key: key, value: nil)) }
                return
            }
        }
        ready = true
        let waiting = early
        early = []
        for r in waiting { actions += handle(r) }
    }

    /// Makes `s` the active scheduler and tells every node (a new incarnation: the one before
    /// is gone, with what it had not placed).
    private mutating func activate(_ s: (address: String, incarnation: UInt64), _ actions: inout [Action]) {
        scheduler = s
        for endpoint in nodeSubscribers where endpoint != .scheduler {
            actions.append(.send(.schedulerAt(address: s.address, incarnation: s.incarnation), to: endpoint))
        }
        // A standby's own subscription was answered to the scheduler active then: this one
        // learns the nodes now. (The head's transport has learned its address from the
        // announcement to the head's node, sent first.)
        if nodeSubscribers.contains(.scheduler) { actions.append(.send(.nodeTable(nodeTable), to: .scheduler)) }
    }

    /// The scheduler processes: the active one first, then the standbys, newest first.
    var schedulerTable: [SchedulerStatus] {
        (scheduler.map { [SchedulerStatus(address: $0.address, active: true)] } ?? [])
            + standbySchedulers.reversed().map { SchedulerStatus(address: $0.address, active: false) }
    }

    /// Whether `id` was declared dead.
    func isLost(_ id: NodeID) -> Bool { lostNodes[id] != nil }

    /// The writes that start catching up.
    var markerWrites: [Action] { markers.map { .write(key: $0.key, value: $0.value) } }

    mutating func handle(_ request: ControlRequest) -> [Action] {
        guard ready else {
            early.append(request)
            return []
        }
        var actions: [Action] = []
        switch request {
        case .registerNode(let record):
            write(ControlTables.node(record.id), record, &actions)
        case .reportLoad(let id, let queued):
            if loads[id] != queued {
                loads[id] = queued
                loadVersion &+= 1
                if nodes[id] != nil { nodeTableChanged = true }
            }
        case .objectLocations(let entries):
            for (id, node, size) in entries { write(ControlTables.object(id), ObjectLocation(node: node, size: size), &actions) }
        case .forgetObjects(let oids):
            for oid in oids {
                for (key, present) in [(ControlTables.object(oid), locations[oid] != nil), (ControlTables.task(oid), tasks[oid] != nil)] {
                    // A row exists when its newest write, or else its committed value, says so.
                    guard unconfirmed[key].map({ $0.value != nil }) ?? present else { continue }
                    unconfirmed[key] = Written(value: nil)
                    actions.append(.write(key: key, value: nil))
                }
            }
        case .recordTasks(let records):
            for r in records { write(ControlTables.task(r.id), r, &actions) }
        case .registerActor(let record):
            newestActors[record.id] = record
            write(ControlTables.actor(record.id), record, &actions)
        case .actorProgress(let id, let checkpoint, let log):
            guard var record = newestActors[id] ?? actors[id] else { break }
            if let checkpoint { record.checkpointSequence = checkpoint }
            record.logPosition = log
            newestActors[id] = record
            write(ControlTables.actor(id), record, &actions)
        case .describeActor(let id, let replyTo):
            let key = ControlTables.actor(id)
            if unconfirmed[key] != nil { parked[key, default: []].append(request) } else {
                actions.append(.send(.actorDescription(id, actors[id]), to: replyTo))
            }
        case .lookupActor(let id, let replyTo):
            let key = ControlTables.actor(id)
            if unconfirmed[key] != nil || actors[id]?.state == .restoring { parked[key, default: []].append(request) } else {
                let record = actors[id]
                let node = record.flatMap { $0.state == .alive ? $0.node : nil }
                actions.append(.send(.actorLocation(id, node, reason: node == nil ? record?.unavailability : nil), to: replyTo))
            }
        case .locateObject(let id, let replyTo):
            let key = ControlTables.object(id)
            if unconfirmed[key] != nil { parked[key, default: []].append(request) } else {
                actions.append(.send(.objectLocation(id, locations[id]), to: replyTo))
            }
        case .subscribeNodes(let endpoint):
            if !nodeSubscribers.contains(endpoint) { nodeSubscribers.append(endpoint) }
            actions.append(.send(.nodeTable(nodeTable), to: endpoint))
            if let scheduler, endpoint != .scheduler {
                actions.append(.send(.schedulerAt(address: scheduler.address, incarnation: scheduler.incarnation), to: endpoint))
            }
        case .registerScheduler(let address, let incarnation):
            guard !lostSchedulers.contains(incarnation), scheduler?.incarnation != incarnation,
                  !standbySchedulers.contains(where: { $0.incarnation == incarnation }) else { break }
            version &+= 1
            if scheduler == nil {
                activate((address, incarnation), &actions)
            } else {
                standbySchedulers.append((address, incarnation))
                actions.append(.log("scheduler at \(address) registered as a standby: it takes over if the active one at \(scheduler!.address) is lost"))
            }
        case .schedulerLost(let incarnation):
            guard lostSchedulers.insert(incarnation).inserted else { break }
            version &+= 1
            standbySchedulers.removeAll { $0.incarnation == incarnation }
            guard let active = scheduler, active.incarnation == incarnation else { break }
            scheduler = nil
            if let next = standbySchedulers.popLast() {
                actions.append(.log("the scheduler at \(active.address) is lost; the standby at \(next.address) takes over"))
                activate(next, &actions)
            }
        case .nodeLost(let id, let reason):
            // Declared once; a node declared dead never comes back (a replacement gets a new ID).
            guard lostNodes[id] == nil else { break }
            lostNodes[id] = reason
            declareDead(id, &actions)
        case .committed, .writeFailed, .storage, .storageSettled:
            // The shell's: they touch no table.
            break
        }
        return actions
    }

    /// A row as the GCS committed it (nil: deleted).
    mutating func committed(key: String, value: [UInt8]?) -> [Action] {
        var actions: [Action] = []
        if let expected = markers[key] {
            if value == expected {
                markers[key] = nil
                if markers.isEmpty { caughtUp(&actions) }
            }
            return actions
        }
        // An earlier incarnation's marker, or this one's seen again: not a row of the tables.
        if ControlTables.isMarker(key) { return actions }
        if !ready, clearing.contains(key) {
            if value == nil { clearing.remove(key) }
            do {
                try apply(key: key, value: value, updateNewest: true)
            } catch {
                actions.append(.log("control store: the GCS row \(key) does not decode (\(error)); it is left out of the tables"))
            }
            if clearing.isEmpty { caughtUp(&actions) }
            return actions
        }
        let ours = unconfirmed[key]
        if ours == Written(value: value) { unconfirmed[key] = nil }
        do {
            try apply(key: key, value: value, updateNewest: ours == nil)
        } catch {
            actions.append(.log("control store: the GCS row \(key) does not decode (\(error)); it is left out of the tables"))
        }
        if !lostNodes.isEmpty, unconfirmed[key] == nil, let name = key.dropPrefix(GCSTable.nodes.rawValue),
           let id = lostNodes.keys.first(where: { $0.description == name }) {
            // Lost while its registration was being written.
            declareDead(id, &actions)
        }
        if !homeless.isEmpty, value != nil, key.hasPrefix(GCSTable.nodes.rawValue) {
            // A node joined: perhaps one that can host them.
            let waiting = homeless
            homeless = []
            for aid in waiting {
                if let r = newestActors[aid] ?? actors[aid], r.state == .restoring { relocate(r, waited: true, &actions) }
            }
        }
        actions += release(key)
        return actions
    }

    /// The GCS gave up on a write: reads waiting for it are answered from what is committed.
    mutating func writeFailed(key: String, value: [UInt8]?) -> [Action] {
        if !ready, value == nil, clearing.contains(key) {
            // The GCS gave up on a deletion: ask again (requests wait until it is done).
            return [.log("control store: deleting \(key), a previous cluster's row, failed; trying again"), .write(key: key, value: nil)]
        }
        guard unconfirmed[key] == Written(value: value) else { return [] }
        unconfirmed[key] = nil
        return release(key)
    }

    /// Marks a lost node dead once its row is committed, and fails the actors it hosted.
    private mutating func declareDead(_ id: NodeID, _ actions: inout [Action]) {
        guard var record = nodes[id], record.alive, let reason = lostNodes[id] else { return }
        record.alive = false
        record.queued = 0
        actions.append(.log("\(id) declared dead: \(reason)"))
        nodeSubscribers.removeAll { $0 == .node(id) }
        write(ControlTables.node(id), record, &actions)
        var hosted = newestActors
        for (aid, r) in actors where hosted[aid] == nil { hosted[aid] = r }
        for var actor in hosted.values.sorted(by: { $0.id.raw < $1.id.raw }) where actor.node == id && (actor.state == .alive || actor.state == .restoring) {
            if actor.relocation != nil {
                relocate(actor, waited: false, &actions)
            } else {
                actor.state = .failed
                newestActors[actor.id] = actor
                write(ControlTables.actor(actor.id), actor, &actions)
            }
        }
    }

    /// Restores a durable actor whose node died on the least-loaded live node that accepts its
    /// type and has the resources it needs (lowest ID on a tie). Its row says `restoring`, so
    /// lookups wait until the new host registers it alive. With no such node it waits for one
    /// to join when nodes are replaced, and fails otherwise.
    private mutating func relocate(_ actor: ActorRecord, waited: Bool, _ actions: inout [Action]) {
        guard let relocation = actor.relocation else { return }
        var actor = actor
        let name = actor.name ?? actor.id.description
        let target = nodes.values
            .filter { n in
                n.alive && lostNodes[n.id] == nil && (n.functions?.contains(actor.typeName) ?? true) && n.resources.satisfies(relocation.resources)
            }
            .min { a, b in (loads[a.id] ?? a.queued, a.id) < (loads[b.id] ?? b.queued, b.id) }
        guard let target else {
            if replacementsExpected {
                homeless.append(actor.id)
                if waited { return }
                actor.state = .restoring
                actions.append(.log("durable actor \"\(name)\" lost its node \(actor.node) and no live node accepts \(actor.typeName) with \(relocation.resources); it is restored when such a node joins"))
            } else {
                actor.state = .failed
                actions.append(.log("durable actor \"\(name)\" lost its node \(actor.node) and no live node accepts \(actor.typeName) with \(relocation.resources); it stays in its storage until it is spawned again"))
            }
            newestActors[actor.id] = actor
            write(ControlTables.actor(actor.id), actor, &actions)
            return
        }
        var durability = relocation.durability
        durability.restoreOnly = true
        let spawn: DurableSpawn
        do {
            spawn = try durability.spawn(for: actor.id)
        } catch {
            actor.state = .failed
            newestActors[actor.id] = actor
            write(ControlTables.actor(actor.id), actor, &actions)
            actions.append(.log("durable actor \"\(name)\" cannot be restored: \(error)"))
            return
        }
        actions.append(.log("durable actor \"\(name)\" lost its node \(actor.node); restoring it on \(target.id)"))
        actor.node = target.id
        actor.state = .restoring
        newestActors[actor.id] = actor
        write(ControlTables.actor(actor.id), actor, &actions)
        actions.append(.send(.createActor(ActorSpawn(id: actor.id, typeName: actor.typeName, state: .encoded([]), replyTo: target.id,
                                                     durable: spawn, resources: relocation.resources)), to: .node(target.id)))
    }

    /// The node table for subscribers, if it changed since the last call.
    mutating func flush() -> [Action] {
        guard nodeTableChanged else { return [] }
        nodeTableChanged = false
        let table = nodeTable
        return nodeSubscribers.map { .send(.nodeTable(table), to: $0) }
    }

    /// Committed node rows with their latest load, in node order.
    var nodeTable: [NodeRecord] {
        nodes.values.sorted { $0.id < $1.id }.map { record in
            var r = record
            if let q = loads[r.id] { r.queued = q }
            return r
        }
    }

    private mutating func write<T: Encodable>(_ key: String, _ row: T, _ actions: inout [Action]) {
        do {
            let bytes = try BinaryEncoder().encode(row)
            unconfirmed[key] = Written(value: bytes)
            actions.append(.write(key: key, value: bytes))
        } catch {
            actions.append(.log("control store: cannot encode the row \(key): \(error)"))
        }
    }

    private mutating func apply(key: String, value: [UInt8]?, updateNewest: Bool) throws {
        version &+= 1
        let decoder = BinaryDecoder()
        if let name = key.dropPrefix(GCSTable.nodes.rawValue) {
            guard let value else { nodes = nodes.filter { $0.key.description != name }; nodeTableChanged = true; return }
            let r = try decoder.decode(NodeRecord.self, from: value)
            nodes[r.id] = r
            nodeTableChanged = true
        } else if let name = key.dropPrefix(GCSTable.actors.rawValue) {
            guard let value else {
                if let id = actors.keys.first(where: { $0.description == name }) { actors[id] = nil; newestActors[id] = nil }
                return
            }
            let r = try decoder.decode(ActorRecord.self, from: value)
            actors[r.id] = r
            if updateNewest { newestActors[r.id] = r }
        } else if let name = key.dropPrefix(GCSTable.objects.rawValue) {
            guard let id = ObjectID(String(name)) else { throw CairnError(.invalidArgument, "\(name) is not an object ID") }
            locations[id] = try value.map { try decoder.decode(ObjectLocation.self, from: $0) }
        } else if let name = key.dropPrefix(GCSTable.tasks.rawValue) {
            guard let id = ObjectID(String(name)) else { throw CairnError(.invalidArgument, "\(name) is not an object ID") }
            tasks[id] = try value.map { try decoder.decode(TaskRecord.self, from: $0) }
        }
    }

    /// Answers the reads parked on `key` (those that must still wait park again).
    private mutating func release(_ key: String) -> [Action] {
        guard let reads = parked.removeValue(forKey: key) else { return [] }
        var actions: [Action] = []
        for r in reads { actions += handle(r) }
        return actions
    }
}

/// The control store as one component reached only through messages: the pure core on the
/// control store's inbox thread, with its rows kept either in memory (each write committed at
/// once) or in the chain-replicated GCS (written through, and learned back from the GCS's
/// subscriptions to the node, object, task and actor tables).
final class ControlStoreServer: @unchecked Sendable {
    // Touched only on the control store's inbox thread.
    private var core: ControlStoreCore
    private let transport: any Transport
    private let writeThrough: GCSWriteThrough?
    private let gcs: EmbeddedGCS?
    private var storageFence = StorageFence()
    private let log: @Sendable (String) -> Void
    /// Tells this incarnation's subscription deliveries from those of an earlier one.
    private let generation: UInt64
    /// The node and actor tables as of the last change, for status reports from any thread.
    let published = Mutex<(nodes: [NodeRecord], actors: [ActorRecord], schedulers: [SchedulerStatus])>(([], [], []))
    private var publishedVersion: UInt64 = .max
    private var publishedLoads: UInt64 = 0
    private var publishedAt: UInt64 = 0

    /// `startsNewCluster`: the first control store of a cluster (not one started again within
    /// it), which deletes the tables a previous cluster left in the GCS before answering.
    init(transport: any Transport, gcs: EmbeddedGCS?, replacementsExpected: Bool = false, startsNewCluster: Bool = false,
         log: @escaping @Sendable (String) -> Void) {
        self.transport = transport
        self.log = log
        let generation = UInt64.random(in: 1...UInt64.max)
        self.generation = generation
        self.gcs = gcs
        guard let gcs else {
            core = ControlStoreCore(replacementsExpected: replacementsExpected)
            writeThrough = nil
            transport.register(.controlStore) { [self] batch in handle(batch) }
            return
        }
        core = ControlStoreCore(markers: ControlTables.markers(shards: gcs.options.shards, generation: generation),
                                replacementsExpected: replacementsExpected, startsNewCluster: startsNewCluster)
        let writeThrough = GCSWriteThrough(gcs, log: log) { key, value in
            transport.send(.control(.writeFailed(generation: generation, key: key, value: value)), to: .controlStore)
        }
        self.writeThrough = writeThrough
        transport.register(.controlStore) { [self] batch in handle(batch) }
        for prefix in ControlTables.subscribed {
            gcs.subscribe(prefix: prefix) { change in
                transport.send(.control(.committed(generation: generation, key: change.key, value: change.value)), to: .controlStore)
            }
        }
        for case .write(let key, let value) in core.markerWrites { writeThrough.submit(key, value) }
    }

    private func handle(_ batch: [Message]) {
        var actions: [ControlStoreCore.Action] = []
        for message in batch {
            guard case .control(let request) = message else { continue }
            switch request {
            case .committed(let g, let key, let value):
                if g == generation { actions += core.committed(key: key, value: value) }
            case .writeFailed(let g, let key, let value):
                if g == generation { actions += core.writeFailed(key: key, value: value) }
            case .storage(let r):
                storage(r)
            case .storageSettled(let r, let reply):
                answer(r, reply)
                for claim in storageFence.settled(r) { answer(claim, .done) }
            default:
                actions += core.handle(request)
            }
        }
        actions += core.flush()
        var i = 0
        while i < actions.count {
            switch actions[i] {
            case .write(let key, let value):
                if let writeThrough {
                    writeThrough.submit(key, value)
                } else {
                    actions += core.committed(key: key, value: value)
                    actions += core.flush()
                }
            case .send(let message, let endpoint):
                transport.send(message, to: endpoint)
            case .log(let line):
                log(line)
            }
            i += 1
        }
        // Rows as soon as they change; loads (which change all the time under work) at most
        // every 100 ms.
        let now = monotonicNanoseconds()
        if core.version != publishedVersion || (core.loadVersion != publishedLoads && now - publishedAt >= 100_000_000) {
            publishedVersion = core.version
            publishedLoads = core.loadVersion
            publishedAt = now
            let tables = (core.nodeTable, core.actors.values.sorted { $0.id.raw < $1.id.raw }, core.schedulerTable)
            published.withLock { $0 = tables }
        }
    }
}

extension ControlStoreServer {
    /// A node's request on the GCS's `store/` table: fenced, then forwarded to the GCS.
    private func storage(_ r: StorageRequest) {
        // A node declared dead gets nothing more: what it had in flight settles, and a node
        // restoring its actors then claims their storage.
        guard !core.isLost(r.node) else { return }
        guard let gcs else {
            return answer(r, .failed("this cluster's control store keeps its tables in memory, with no GCS, so there is no replicated storage; use ClusterOptions.controlStore = .chainReplicated (the default) or ActorStorageOptions(location: .directory(…))"))
        }
        switch storageFence.admit(r) {
        case .reply(let reply):
            answer(r, reply)
        case .wait:
            break
        case .forward:
            let transport = transport
            let settle: @Sendable (StorageReply) -> Void = { transport.send(.control(.storageSettled(r, $0)), to: .controlStore) }
            switch r.operation {
            case .claim:
                break
            case .get(let keys):
                gcs.readAll(keys.map { EmbeddedGCS.storageKey(r.namespace, $0) }) { result in
                    switch result {
                    case .success(let values): settle(.values(zip(keys, values).map { StorageEntry(key: $0, value: $1) }))
                    case .failure(let e): settle(.failed("the GCS did not answer a read of store/\(r.namespace): \(e)"))
                    }
                }
            case .put(let entries):
                gcs.writeAll(entries.map { (EmbeddedGCS.storageKey(r.namespace, $0.key), $0.value) }) { result in
                    switch result {
                    case .success: settle(.done)
                    case .failure(let e): settle(.failed("the GCS did not take a write to store/\(r.namespace): \(e)"))
                    }
                }
            }
        }
    }

    private func answer(_ r: StorageRequest, _ reply: StorageReply) {
        guard !core.isLost(r.node) else { return }
        transport.send(.storageReply(r.id, reply), to: .node(r.node))
    }
}

/// Where the control store's rows live in the GCS, and how they are encoded.
public enum ControlTables {
    static func node(_ id: NodeID) -> String { GCSTable.nodes.key(id.description) }
    static func object(_ id: ObjectID) -> String { GCSTable.objects.key(id.description) }
    static func task(_ id: ObjectID) -> String { GCSTable.tasks.key(id.description) }
    static func actor(_ id: ActorID) -> String { GCSTable.actors.key(id.description) }

    /// Decodes an `actor/` row, as ``Cluster/status(of:)`` would report it.
    public static func actorStatus(from bytes: [UInt8]) throws -> ActorStatus {
        try BinaryDecoder().decode(ActorRecord.self, from: bytes).status
    }

    /// The key of an actor's row.
    public static func actorKey(_ id: ActorID) -> String { actor(id) }

    /// The tables the control store learns back through subscriptions.
    static let subscribed = [GCSTable.nodes, .objects, .tasks, .actors, .controlStore].map(\.rawValue)

    /// The `n`th catch-up marker row of the table whose keys start with `prefix`.
    static func marker(_ n: Int, in prefix: String = GCSTable.controlStore.rawValue) -> String { prefix + markerInfix + "\(n)" }
    static let markerInfix = "~caught-up-"

    /// Whether `key` is a catch-up marker row (of any incarnation), not a row of the tables.
    static func isMarker(_ key: String) -> Bool {
        subscribed.contains { key.dropPrefix($0)?.hasPrefix(markerInfix) == true }
    }

    /// Catch-up marker rows, each holding the control store incarnation's `generation`: in
    /// every subscribed table, one per shard (the first marker keys that cover every shard).
    /// Each table comes back through a subscription of its own, in order within a shard but
    /// in no order across tables, so a table has caught up on a shard only once its own
    /// marker there has come back.
    static func markers(shards: Int, generation: UInt64) -> [String: [UInt8]] {
        var markers: [String: [UInt8]] = [:]
        for prefix in subscribed {
            var covered = Set<Int>()
            var n = 0
            while covered.count < shards {
                let key = marker(n, in: prefix)
                if covered.insert(shard(of: key, shards: shards)).inserted { markers[key] = withUnsafeBytes(of: generation.bigEndian, Array.init) }
                n += 1
            }
        }
        return markers
    }
}

extension String {
    /// The rest of the string after `prefix`, or nil when it does not start with it.
    func dropPrefix(_ prefix: String) -> Substring? { hasPrefix(prefix) ? dropFirst(prefix.count) : nil }
}

/// A global scheduler's process, as `cairn status` lists it.
public struct SchedulerStatus: Sendable, Codable, Equatable {
    /// `host:port` where it listens.
    public var address: String
    /// Whether nodes hand their tasks to it (the others are standbys).
    public var active: Bool
}

/// An `obj/` row: where an object lives and how big it is.
public struct ObjectLocation: Sendable, Codable, Equatable {
    /// The node holding the object.
    public var node: NodeID
    /// Its encoded size in bytes.
    public var size: Int
}

/// Writes rows through to the GCS with at most one write in flight per row, so a retried
/// older write can never land after a newer one; a row changed while its write is in flight
/// is written again, with its newest value, when that write completes.
final class GCSWriteThrough: @unchecked Sendable {
    private let gcs: EmbeddedGCS
    private let log: @Sendable (String) -> Void
    /// Told of a write the GCS did not take (the row and the value that failed).
    private let failed: @Sendable (String, [UInt8]?) -> Void
    private let lock = NSLock()
    /// A row with a write in flight, and the newest value waiting behind it, if any.
    private struct Row {
        var waiting = false
        /// The waiting value; nil deletes the row.
        var value: [UInt8]?
    }
    private var inFlight: [String: Row] = [:]

    init(_ gcs: EmbeddedGCS, log: @escaping @Sendable (String) -> Void, failed: @escaping @Sendable (String, [UInt8]?) -> Void) {
        self.gcs = gcs
        self.log = log
        self.failed = failed
    }

    /// Writes `value` to `key` (nil deletes it) after any write of the row in flight.
    func submit(_ key: String, _ value: [UInt8]?) {
        let start: Bool = lock.withLock {
            if inFlight[key] != nil {
                inFlight[key] = Row(waiting: true, value: value)
                return false
            }
            inFlight[key] = Row()
            return true
        }
        if start { write(key, value) }
    }

    private func write(_ key: String, _ value: [UInt8]?) {
        gcs.write(key, value) { [self] result in
            if case .failure(let e) = result {
                if e.code != .shutDown { log("control store: the GCS did not take the row \(key): \(e)") }
                failed(key, value)
            }
            let next: Row? = lock.withLock {
                guard let row = inFlight[key], row.waiting else {
                    inFlight[key] = nil
                    return nil
                }
                inFlight[key] = Row()
                return row
            }
            if let row = next { write(key, row.value) }
        }
    }
}
