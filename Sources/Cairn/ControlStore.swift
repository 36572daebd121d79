import CairnCodec
import CairnGCS
import Foundation

/// A node as the control store records it.
struct NodeRecord: Sendable, Codable {
    let id: NodeID
    let resources: Resources
    /// Names of the functions the node may run; nil means every registered function.
    let functions: Set<String>?
    var queued: Int
    var alive: Bool
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
    let node: NodeID
    /// A durable actor's name; nil for others.
    var name: String?
    var state: ActorStatus.State = .alive
    var restarts = 0
    var checkpointSequence: UInt64?
    var logPosition: UInt64 = 0
}

/// An actor's entry in the control store's actor table, as ``Cluster/status(of:)`` reports it.
public struct ActorStatus: Sendable, Equatable {
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

/// The Global Control Store's tables, as one component reached only through messages:
/// nodes (resources, load, liveness), objects (locations and sizes), tasks (lineage),
/// actors (where each lives). Functions are recorded per node in the node table.
///
/// The tables live in this component's memory, and with a chain-replicated backing every
/// change is also written through to the GCS (one write in flight per row, the newest value
/// last). Reads are answered from memory.
final class ControlStoreServer: @unchecked Sendable {
    // Touched only on the control store's inbox thread.
    private var nodes: [NodeID: NodeRecord] = [:]
    private var locations: [ObjectID: (node: NodeID, size: Int)] = [:]
    private var tasks: [ObjectID: TaskRecord] = [:]
    private var actors: [ActorID: ActorRecord] = [:]
    private var nodeSubscribers: [Endpoint] = []
    private let transport: any Transport
    private var loadChanged = false
    private let writeThrough: GCSWriteThrough?

    init(transport: any Transport, writeThrough: GCSWriteThrough? = nil) {
        self.transport = transport
        self.writeThrough = writeThrough
        transport.register(.controlStore) { [self] batch in handle(batch) }
    }

    private func handle(_ batch: [Message]) {
        var tableChanged = false
        for message in batch {
            guard case .control(let request) = message else { continue }
            switch request {
            case .registerNode(let record):
                nodes[record.id] = record
                writeThrough?.set(ControlTables.node(record.id), record)
                tableChanged = true
            case .reportLoad(let id, let queued):
                if nodes[id]?.queued != queued {
                    nodes[id]?.queued = queued
                    tableChanged = true
                }
            case .objectLocations(let entries):
                for (id, node, size) in entries {
                    locations[id] = (node, size)
                    writeThrough?.set(ControlTables.object(id), ObjectLocation(node: node, size: size))
                }
            case .forgetObjects(let oids):
                for oid in oids {
                    if locations.removeValue(forKey: oid) != nil { writeThrough?.delete(ControlTables.object(oid)) }
                    if tasks.removeValue(forKey: oid) != nil { writeThrough?.delete(ControlTables.task(oid)) }
                }
            case .recordTasks(let records):
                for r in records {
                    tasks[r.id] = r
                    writeThrough?.set(ControlTables.task(r.id), r)
                }
            case .registerActor(let record):
                actors[record.id] = record
                writeThrough?.set(ControlTables.actor(record.id), record)
            case .actorProgress(let id, let checkpoint, let log):
                if let checkpoint { actors[id]?.checkpointSequence = checkpoint }
                actors[id]?.logPosition = log
                if let record = actors[id] { writeThrough?.set(ControlTables.actor(id), record) }
            case .describeActor(let id, let replyTo):
                transport.send(.actorDescription(id, actors[id]), to: replyTo)
            case .lookupActor(let id, let replyTo):
                transport.send(.actorLocation(id, actors[id].flatMap { $0.state == .alive ? $0.node : nil }), to: replyTo)
            case .subscribeNodes(let endpoint):
                nodeSubscribers.append(endpoint)
                transport.send(.nodeTable(Array(nodes.values)), to: endpoint)
            }
        }
        if tableChanged {
            let table = Array(nodes.values)
            for s in nodeSubscribers { transport.send(.nodeTable(table), to: s) }
        }
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
        let r = try BinaryDecoder().decode(ActorRecord.self, from: bytes)
        return ActorStatus(id: r.id, typeName: r.typeName, node: r.node, name: r.name, state: r.state, restarts: r.restarts,
                           checkpointSequence: r.checkpointSequence, logPosition: r.logPosition)
    }

    /// The key of an actor's row.
    public static func actorKey(_ id: ActorID) -> String { actor(id) }
}

/// An `obj/` row: where an object lives and how big it is.
struct ObjectLocation: Codable {
    var node: NodeID
    var size: Int
}

/// Writes rows through to the GCS with at most one write in flight per row, so a retried
/// older write can never land after a newer one; a row changed while its write is in flight
/// is written again, with its newest value, when that write completes.
final class GCSWriteThrough: @unchecked Sendable {
    private let gcs: EmbeddedGCS
    private let log: @Sendable (String) -> Void
    private let lock = NSLock()
    /// A row with a write in flight, and the newest value waiting behind it, if any.
    private struct Row {
        var waiting = false
        /// The waiting value; nil deletes the row.
        var value: [UInt8]?
    }
    private var inFlight: [String: Row] = [:]

    init(_ gcs: EmbeddedGCS, log: @escaping @Sendable (String) -> Void) {
        self.gcs = gcs
        self.log = log
    }

    func set<T: Encodable>(_ key: String, _ value: T) {
        do {
            submit(key, try BinaryEncoder().encode(value))
        } catch {
            log("control store: cannot encode the row \(key) for the GCS: \(error)")
        }
    }

    func delete(_ key: String) { submit(key, nil) }

    private func submit(_ key: String, _ value: [UInt8]?) {
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
            if case .failure(let e) = result, e.code != .shutDown { log("control store: the GCS did not take the row \(key): \(e)") }
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

    /// Whether every write has completed (for tests).
    var idle: Bool { lock.withLock { inFlight.isEmpty } }
}
