import Foundation

/// A node as the control store records it.
struct NodeRecord: Sendable {
    let id: NodeID
    let resources: Resources
    /// Names of the functions the node may run; nil means every registered function.
    let functions: Set<String>?
    var queued: Int
    var alive: Bool
}

/// The lineage of one task: enough to run it again.
struct TaskRecord: Sendable {
    let id: ObjectID
    let function: String
    let argRefs: [ObjectID]
}

/// An actor as the control store records it.
struct ActorRecord: Sendable {
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
    public enum State: String, Sendable, Equatable {
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
/// This in-memory version keeps the tables in one process; the chain-replicated GCS
/// replaces it behind the same messages.
final class ControlStoreServer: @unchecked Sendable {
    // Touched only on the control store's inbox thread.
    private var nodes: [NodeID: NodeRecord] = [:]
    private var locations: [ObjectID: (node: NodeID, size: Int)] = [:]
    private var tasks: [ObjectID: TaskRecord] = [:]
    private var actors: [ActorID: ActorRecord] = [:]
    private var nodeSubscribers: [Endpoint] = []
    private let transport: any Transport
    private var loadChanged = false

    init(transport: any Transport) {
        self.transport = transport
        transport.register(.controlStore) { [self] batch in handle(batch) }
    }

    private func handle(_ batch: [Message]) {
        var tableChanged = false
        for message in batch {
            guard case .control(let request) = message else { continue }
            switch request {
            case .registerNode(let record):
                nodes[record.id] = record
                tableChanged = true
            case .reportLoad(let id, let queued):
                if nodes[id]?.queued != queued {
                    nodes[id]?.queued = queued
                    tableChanged = true
                }
            case .objectLocations(let entries):
                for (id, node, size) in entries { locations[id] = (node, size) }
            case .forgetObjects(let oids):
                for oid in oids {
                    locations.removeValue(forKey: oid)
                    tasks.removeValue(forKey: oid)
                }
            case .recordTasks(let records):
                for r in records { tasks[r.id] = r }
            case .registerActor(let record):
                actors[record.id] = record
            case .actorProgress(let id, let checkpoint, let log):
                if let checkpoint { actors[id]?.checkpointSequence = checkpoint }
                actors[id]?.logPosition = log
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
