@testable import Cairn
import CairnChaosKit
import CairnCore
import CairnNet
import CairnWire
import Foundation
import Testing

/// The kernel's name for the calling thread.
private func threadName() -> String {
    ((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "").trimmingCharacters(in: .newlines)
}

extension ClusterSuites {
@Suite("Lanes: a driver's lone tasks and their results on sockets of their own", .serialized)
struct LaneTests {
    /// Two transports with lanes on loopback: node 1 (an owner) and node 2, each knowing the
    /// other's record; what reaches each is recorded with the name of the thread it reached.
    final class Pair: @unchecked Sendable {
        let token = ClusterToken.generate()
        let owner: TCPTransport
        let node: TCPTransport
        let logs = Locked<[String]>([])
        let atOwner = Locked<[(Message, String)]>([])
        let atNode = Locked<[(Message, String)]>([])
        let byLane = Locked<[(Message, String)]>([])

        init() {
            let logs = self.logs
            owner = TCPTransport(token: token, name: "owner", lanes: true, log: { line in logs.update { $0.append(line) } })
            node = TCPTransport(token: token, name: "node", lanes: true, log: { line in logs.update { $0.append(line) } })
            let (atOwner, atNode, byLane) = (self.atOwner, self.atNode, self.byLane)
            owner.register(.node(NodeID(1))) { batch in atOwner.update { $0 += batch.map { ($0, threadName()) } } }
            node.register(.node(NodeID(2))) { batch in atNode.update { $0 += batch.map { ($0, threadName()) } } }
            node.registerLaneHandler(.node(NodeID(2))) { batch in byLane.update { $0 += batch.map { ($0, threadName()) } } }
            owner.learn(record(of: node, NodeID(2)))
            node.learn(record(of: owner, NodeID(1)))
        }

        func record(of transport: TCPTransport, _ id: NodeID) -> NodeRecord {
            NodeRecord(id: id, resources: Resources(cpus: 1), functions: nil, queued: 0, alive: true,
                       address: transport.localAddress(.node(id)), lane: transport.lanePort(.node(id)))
        }

        func stop() {
            owner.shutdown()
            node.shutdown()
        }

        static func task(_ counter: UInt64) throws -> TaskSpec {
            try TaskSpec(id: ObjectID(owner: NodeID(1), counter: counter), function: "f", args: [.value(.int(Int(counter)))],
                         resources: Resources(cpus: 1)).portable()
        }

        /// IDs of the tasks that reached node 2 by the lane, or the usual way.
        func tasks(byLane lane: Bool) -> [ObjectID] {
            (lane ? byLane : atNode).value.flatMap { message, _ -> [ObjectID] in
                if case .runDirect(let specs) = message { return specs.map(\.id) }
                return []
            }
        }

        /// Sends lone tasks from node 1 to node 2, each once the one before arrived, until one
        /// arrives by the lane (the first goes the usual way while the lane is made). Returns it.
        func sendUntilOneCrossesByLane() async throws -> ObjectID {
            for counter in UInt64(1)...200 {
                let spec = try Self.task(counter)
                owner.send(.runDirect([spec]), to: .node(NodeID(2)), laneFrom: .node(NodeID(1)))
                for _ in 0..<2_000 where !(tasks(byLane: true) + tasks(byLane: false)).contains(spec.id) {
                    try await Task.sleep(for: .milliseconds(1))
                }
                if tasks(byLane: true).contains(spec.id) { return spec.id }
            }
            throw CairnError(.timeout, "no task crossed by the lane: \(logs.value)")
        }

        func results() -> [ObjectID: Int] {
            var seen: [ObjectID: Int] = [:]
            for case (.objects(let objects), _) in atOwner.value {
                for (oid, value) in objects { if case .int(let v) = value { seen[oid] = v } }
            }
            return seen
        }
    }

    @Test("a task sent by lane reaches the node on the lane's thread, once; its result returns by the lane, other results the usual way")
    func taskAndResultCrossByLane() async throws {
        let pair = Pair()
        defer { pair.stop() }
        let crossed = try await pair.sendUntilOneCrossesByLane()
        let byLane = pair.tasks(byLane: true)
        let usual = pair.tasks(byLane: false)
        #expect(Set(byLane).isDisjoint(with: usual), "a task arrived both ways")
        #expect(Set(byLane + usual).count == byLane.count + usual.count, "a task arrived twice")
        #expect(pair.byLane.value.allSatisfy { $0.1.hasPrefix("cairn-lane") }, "\(pair.byLane.value.map(\.1))")
        #expect(pair.owner.laneMessages.sent == byLane.count)
        #expect(pair.node.laneMessages.received == byLane.count)

        // The lane task's result goes back by the lane; another task's by the node's listener.
        let other = ObjectID(owner: NodeID(1), counter: 9_999)
        pair.node.send(.objects([(crossed, .int(42)), (other, .int(7))]), to: .node(NodeID(1)))
        for _ in 0..<4_000 where pair.results().count < 2 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(pair.results() == [crossed: 42, other: 7])
        #expect(pair.node.laneMessages.sent == 1)
        #expect(pair.owner.laneMessages.received == 1)
        let laneReader = pair.atOwner.value.first { message, _ in
            if case .objects(let objects) = message { return objects.contains { $0.0 == crossed } }
            return false
        }
        #expect(laneReader?.1.hasPrefix("cairn-lane") == true, "the lane's result was handled on \(laneReader?.1 ?? "nothing")")
    }

    @Test("a lane closed while its task is out: the task goes again the usual way and arrives; later tasks go the usual way")
    func lostLaneSendsItsTaskAgain() async throws {
        let pair = Pair()
        defer { pair.stop() }
        let crossed = try await pair.sendUntilOneCrossesByLane()
        // No result yet: the node's side of the lane closes, as a network fault would.
        pair.node.dropLanes()
        for _ in 0..<4_000 where !pair.tasks(byLane: false).contains(crossed) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(pair.tasks(byLane: false).contains(crossed), "the task the lost lane carried did not come again")
        let next = try Pair.task(10_000)
        pair.owner.send(.runDirect([next]), to: .node(NodeID(2)), laneFrom: .node(NodeID(1)))
        for _ in 0..<4_000 where !pair.tasks(byLane: false).contains(next.id) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(pair.tasks(byLane: false).contains(next.id))
        #expect(pair.logs.value.contains { $0.contains("did not say") || $0.contains("refused") } == false, "\(pair.logs.value)")
    }

    @Test("a lane without the cluster's token is refused and logged; one that does not say where it goes, or brings anything but tasks, is closed and logged; the node gets nothing from them")
    func badLanesAreRefused() async throws {
        let pair = Pair()
        defer { pair.stop() }
        let port = try #require(pair.node.lanePort(.node(NodeID(2))))
        #expect(throws: (any Error).self) {
            _ = try LaneConnection.connect(host: "127.0.0.1", port: port, token: ClusterToken.generate(), name: "intruder", epoch: 1, serverName: "node-2")
        }
        let silent = try LaneConnection.connect(host: "127.0.0.1", port: port, token: pair.token, name: "peer", epoch: 1, serverName: "node-2")
        try silent.send([1, 2, 3])
        #expect(silent.receive() == nil)
        let chatty = try LaneConnection.connect(host: "127.0.0.1", port: port, token: pair.token, name: "peer", epoch: 1, serverName: "node-2")
        try chatty.send(LaneHello(from: .node(NodeID(1)), to: .node(NodeID(2))).encoded)
        try chatty.send(try WireMessages.encode(.free([ObjectID(owner: NodeID(1), counter: 3)]), to: .node(NodeID(2))))
        #expect(chatty.receive() == nil)
        for _ in 0..<4_000 where pair.logs.value.count < 3 { try await Task.sleep(for: .milliseconds(1)) }
        let logs = pair.logs.value
        #expect(logs.contains { $0.contains("lane of node-2") && $0.contains("refused") }, "\(logs)")
        #expect(logs.contains { $0.contains("did not say where it goes") }, "\(logs)")
        #expect(logs.contains { $0.contains("brought something other than tasks") }, "\(logs)")
        #expect(pair.byLane.value.isEmpty && pair.atNode.value.isEmpty)
    }

    @Test("in a cluster of processes a driver's lone tasks cross by lanes and run on the lane's thread; a node never runs more tasks at once than its CPUs; a lane's task may wait on tasks it submits")
    func lanesInAClusterOfProcesses() async throws {
        var options = ProcessClusterTests.idleDriverOptions()
        options.lanes = true
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let transport = try #require(cluster.transport as? TCPTransport)
        var onLane = 0
        for _ in 0..<20 {
            let r = try await cluster.get(try ClusterWorkload.overlap.remote(1), timeout: .seconds(60))
            #expect(r[1] == 1)
            onLane += r[2]
        }
        #expect(onLane >= 10, "only \(onLane) of 20 lone tasks ran on a lane's thread")
        #expect(transport.laneMessages.sent >= onLane && transport.laneMessages.received >= onLane, "\(transport.laneMessages)")

        // A lone task holds a lane's thread while bursts reach the same nodes through the
        // scheduler: each node process (1 CPU) still runs one task at a time.
        var laneRuns = 0
        for _ in 0..<6 {
            let lone = try ClusterWorkload.overlap.remote(40)
            try await Task.sleep(for: .milliseconds(5))
            let burst = try (0..<9).map { _ in try ClusterWorkload.overlap.remote(3) }
            let all = try await cluster.get([lone] + burst, timeout: .seconds(60))
            laneRuns += all[0][2]
            for r in all { #expect(r[1] == 1, "\(r[1]) tasks ran at once in process \(r[0])") }
        }
        #expect(laneRuns >= 3, "only \(laneRuns) of 6 long lone tasks ran on a lane's thread")

    }

    @Test("lone tasks on a lane's thread that submit tasks on their own node and wait for them all complete: the node's worker gets the slot the waiting task gives back")
    func laneTaskWaitsOnItsOwnTasks() async throws {
        // Nothing spills: the nested tasks all run on the node whose lane runs the task.
        var options = ProcessClusterTests.options(spillThreshold: 1_000_000)
        options.nodes[0].resources = Resources(cpus: 0)
        options.lanes = true
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let transport = try #require(cluster.transport as? TCPTransport)
        for round in 0..<30 {
            let n = 50 + 10 * round
            #expect(try await cluster.get(try ClusterWorkload.fanOut.remote(n), timeout: .seconds(60)) == (0..<n).reduce(0, +))
        }
        #expect(transport.laneMessages.received >= 10, "\(transport.laneMessages)")
    }

    @Test("a lane's task and a worker's, both waiting on tasks of their own node, leave it no more workers than CPUs: the actor call that follows is answered")
    func waitingLaneTaskLeavesNoExtraWorker() async throws {
        // The driver and one node process with 2 CPUs; nothing spills.
        var options = ProcessClusterTests.options(spillThreshold: 1_000_000)
        options.nodes = [NodeConfiguration(resources: Resources(cpus: 0)), NodeConfiguration(resources: Resources(cpus: 2))]
        options.lanes = true
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let counter = try await cluster.spawn(ClusterWorkload.Counter(), resources: Resources(cpus: 1))
        var onLane = 0
        for round in 1...6 {
            // A lone task crosses by lane and waits on the lane's thread for a 300 ms task, which
            // a worker runs; meanwhile a second task, sent through the scheduler, waits on the
            // other worker for a 50 ms task, which a worker started for it runs. The second is
            // done long before the first. A lane's waiting thread was counted twice (running
            // and blocked), so the worker that finished the second stayed, and the node was
            // left with 3 idle workers for 2 CPUs: the next one woken (for the actor call
            // below) left without taking the call, which was never answered.
            let first = try ClusterWorkload.waitForSleep.remote(300)
            try await Task.sleep(for: .milliseconds(20))
            let second = try ClusterWorkload.waitForSleep.remote(50)
            let ran = try await cluster.get([first, second], timeout: .seconds(60))
            onLane += ran[0]
            #expect(try await cluster.get(try counter.send(1), timeout: .seconds(20)) == round)
        }
        #expect(onLane >= 3, "only \(onLane) of 6 waiting tasks ran on a lane's thread")
    }
}
}
