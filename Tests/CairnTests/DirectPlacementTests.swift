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
    /// never a target for a lone task, but there to run work). Node 4 is reached too, once a
    /// table lists it.
    final class Setup {
        let transport = InMemoryTransport()
        let seen = Recorder()
        let node: Node
        let me = DirectPlacementTests.record(1, alive: true, cpus: 0)
        let busy = DirectPlacementTests.record(3, alive: true, cpus: 1, queued: 5)

        init() throws {
            _ = double  // registered by name
            for endpoint in [Endpoint.controlStore, .scheduler, .node(NodeID(2)), .node(NodeID(3)), .node(NodeID(4))] {
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
            table([me, DirectPlacementTests.record(2, alive: node2Alive, cpus: 1), busy])
        }

        func table(_ records: [NodeRecord]) {
            transport.send(.nodeTable(records), to: .node(NodeID(1)))
        }

        /// Delivers `ref`'s result to node 1, as the node that ran it would, and waits until
        /// node 1 has it.
        func complete(_ ref: ObjectRef<Int>, _ value: Int) throws {
            transport.send(.objects([(ref.id, try StoredValue.boxed(value).portable())]), to: .node(NodeID(1)))
            try barrier()
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
            let ref = try submitOnly(x)
            return (ref, try sent(ref))
        }

        func submitOnly(_ x: Int) throws -> ObjectRef<Int> {
            try node.submit(function: "test.double", args: [.value(try StoredValue.boxed(x).portable())], resources: Resources(cpus: 1))
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
        try setup.complete(first, 2)

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

    @Test("lone tasks one after another keep going to the same idle node, and to another once it is listed busy")
    func loneTasksStayOnOneIdleNode() throws {
        let setup = try Setup()
        defer { setup.stop() }
        // Nodes 2 and 4 idle, or reporting the queues given.
        func table(queued2: Int, queued4: Int) throws {
            setup.table([setup.me, DirectPlacementTests.record(2, alive: true, cpus: 1, queued: queued2), setup.busy,
                         DirectPlacementTests.record(4, alive: true, cpus: 1, queued: queued4)])
            try setup.barrier()
        }
        try table(queued2: 0, queued4: 0)
        var targets: [Endpoint] = []
        for x in 0..<6 {
            let (ref, to) = try setup.submit(x)
            targets.append(to)
            try setup.complete(ref, 2 * x)
        }
        let first = try #require(targets.first)
        #expect(targets.allSatisfy { $0 == first }, "lone tasks went to \(targets)")
        #expect(first == .node(NodeID(2)) || first == .node(NodeID(4)))

        // That node now reports a queue: the next lone task goes to the other idle one, and
        // stays there when both are idle again.
        let other: Endpoint = first == .node(NodeID(2)) ? .node(NodeID(4)) : .node(NodeID(2))
        try first == .node(NodeID(2)) ? table(queued2: 3, queued4: 0) : table(queued2: 0, queued4: 3)
        let (moved, to) = try setup.submit(10)
        #expect(to == other)
        try setup.complete(moved, 20)
        try table(queued2: 0, queued4: 0)
        let (_, again) = try setup.submit(11)
        #expect(again == other)
        #expect(setup.node.directPlacements == 8)
    }

    @Test("a lone task is placed by the time submit returns: its submitter's thread takes it in, no worker is woken for it")
    func loneSubmissionTakenInBySubmitter() throws {
        let setup = try Setup()
        defer { setup.stop() }
        // Each submission comes more than `loneSubmissionNanoseconds` after the one before. The
        // node's lock may be busy at the moment (then a worker takes the task in), so most, not
        // all, must be placed at once; a worker woken for each would almost never be first.
        var placedAtOnce = 0
        for x in 0..<8 {
            usleep(1_000)
            let ref = try setup.submitOnly(x)
            if setup.node.placement(of: ref.id) != nil { placedAtOnce += 1 }
            #expect(try setup.sent(ref) == .node(NodeID(2)))
            try setup.complete(ref, 2 * x)
        }
        #expect(placedAtOnce >= 5, "only \(placedAtOnce) of 8 lone tasks were placed when submit returned")
    }
}
