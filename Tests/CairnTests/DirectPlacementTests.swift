@testable import Cairn
import CairnCore
import Foundation
import Synchronization
import Testing

/// A node of a cluster of processes, alone on an in-memory transport: the test plays the
/// control store, the scheduler and the other nodes, and sees every message sent to them.
@Suite("Lone tasks sent straight to a node, seen from their owner")
struct DirectPlacementTests {
    final class Recorder: Sendable {
        let messages = Mutex<[(Endpoint, Message)]>([])

        /// Waits up to `timeout` seconds for a message (and where it went) matching `match`.
        func await(_ what: String, timeout: Double = 10, _ match: @escaping (Endpoint, Message) -> Bool) throws -> (Endpoint, Message) {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                if let found = messages.withLock({ $0.first(where: match) }) { return found }
                usleep(1_000)
            }
            throw CairnError(.timeout, "no \(what) within \(timeout) s")
        }
    }

    static func record(_ id: Int, alive: Bool, cpus: Double, queued: Int = 0) -> NodeRecord {
        NodeRecord(id: NodeID(id), resources: Resources(cpus: cpus), functions: nil, queued: queued, alive: alive)
    }

    static func tasks(in message: Message) -> [ObjectID] {
        switch message {
        case .runDirect(let specs), .runTasks(let specs), .schedule(let specs, _, _): specs.map(\.id)
        default: []
        }
    }

    /// Node 1 (no CPUs: every task leaves), told of node 2 (idle) and node 3 (busy throughout:
    /// never a target for a lone task, but there to run work).
    final class Setup {
        let transport = InMemoryTransport()
        let seen = Recorder()
        let node: Node
        let me = DirectPlacementTests.record(1, alive: true, cpus: 0)
        let busy = DirectPlacementTests.record(3, alive: true, cpus: 1, queued: 5)

        init() throws {
            _ = double  // registered by name
            for endpoint in [Endpoint.controlStore, .scheduler, .node(NodeID(2)), .node(NodeID(3))] {
                transport.register(endpoint) { [seen] batch in seen.messages.withLock { all in for m in batch { all.append((endpoint, m)) } } }
            }
            node = Node(id: NodeID(1), configuration: NodeConfiguration(resources: Resources(cpus: 0)), transport: transport,
                        actorStorage: LazyActorStorage(options: ActorStorageOptions(location: .inMemory), log: { _ in }),
                        inProcessCluster: true, release: { _ in })
            table(node2Alive: true)
            try barrier()
        }

        func stop() {
            node.stop()
            transport.shutdown()
        }

        func table(node2Alive: Bool) {
            transport.send(.nodeTable([me, DirectPlacementTests.record(2, alive: node2Alive, cpus: 1), busy]), to: .node(NodeID(1)))
        }

        /// Returns once the node has handled everything sent to it before: its inbox handles
        /// messages in order, and a fetch of a value it holds is answered (to node 3, recorded).
        func barrier() throws {
            let marker = node.put(7)
            transport.send(.fetch([marker.id], replyTo: NodeID(3)), to: .node(node.id))
            _ = try seen.await("fetch answer") { endpoint, message in
                if endpoint == .node(NodeID(3)), case .objects(let objects) = message { return objects.contains { $0.0 == marker.id } }
                return false
            }
        }

        /// Submits `double(x)` at node 1 and returns it with where it was sent.
        func submit(_ x: Int) throws -> (ObjectRef<Int>, Endpoint) {
            let ref: ObjectRef<Int> = try node.submit(function: "test.double", args: [.value(try StoredValue.boxed(x).portable())], resources: Resources(cpus: 1))
            return (ref, try sent(ref))
        }

        /// Where `ref`'s task was sent (the first message carrying it).
        func sent(_ ref: ObjectRef<Int>) throws -> Endpoint {
            try seen.await("task \(ref.id)") { DirectPlacementTests.tasks(in: $1).contains(ref.id) }.0
        }
    }

    @Test("a node declared dead is never sent a lone task, even when a node table sent before its death arrives after it")
    func staleTableAfterDeath() throws {
        let setup = try Setup()
        defer { setup.stop() }
        // Node 2 is idle: a lone task goes straight there.
        let (first, to) = try setup.submit(1)
        #expect(to == .node(NodeID(2)))
        // Its result comes back, so the next lone task may go straight to a node too.
        setup.transport.send(.objects([(first.id, try StoredValue.boxed(2).portable())]), to: .node(NodeID(1)))

        // Node 2 dies; then a table sent before that is delivered, still listing it alive.
        setup.table(node2Alive: false)
        setup.table(node2Alive: true)
        try setup.barrier()

        let (_, went) = try setup.submit(3)
        #expect(went == .scheduler, "the second task went to \(went), declared dead before it was submitted")
        #expect(setup.node.directPlacements == 1)
    }

    @Test("a lone task run again because its node died is never sent back to that node")
    func retryAfterDeath() throws {
        let setup = try Setup()
        defer { setup.stop() }
        let (task, to) = try setup.submit(1)
        #expect(to == .node(NodeID(2)))
        setup.seen.messages.withLock { $0.removeAll() }

        // Node 2 dies with the task: it runs again, and the only idle node is the dead one.
        setup.table(node2Alive: false)
        let again = try setup.sent(task)
        #expect(again == .scheduler, "run again on \(again), the node that had just died")
    }
}
