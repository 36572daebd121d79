@testable import Cairn
import CairnCore
import Foundation
import Testing

@Suite("Global scheduler")
struct GlobalSchedulerTests {
    /// Sends `count` tasks owned by node 3 to `scheduler`, naming `avoid`, and waits until the
    /// nodes have received them; returns how many each node got.
    func handUp(_ count: Int, avoid: [NodeID], through transport: InMemoryTransport, counts: Locked<[NodeID: Int]>, first: Int) async throws -> [NodeID: Int] {
        let specs = try (0..<count).map {
            try TaskSpec(id: ObjectID(owner: NodeID(3), counter: UInt64(first + $0)), function: "f", args: [], resources: Resources(cpus: 1)).portable()
        }
        let before = counts.value.values.reduce(0, +)
        transport.send(.schedule(specs, from: NodeID(3), avoid: avoid), to: .scheduler)
        let deadline = ContinuousClock.now + .seconds(30)
        while counts.value.values.reduce(0, +) < before + count {
            guard ContinuousClock.now < deadline else {
                Issue.record("the scheduler placed \(counts.value.values.reduce(0, +) - before) of \(count) tasks")
                break
            }
            try await Task.sleep(for: .milliseconds(2))
        }
        return counts.value
    }

    @Test("a node named dead by the node handing tasks up gets none, even before the scheduler's own table says it died")
    func avoidsNodesNamedDead() async throws {
        let transport = InMemoryTransport()
        defer { transport.shutdown() }
        let counts = Locked<[NodeID: Int]>([:])
        for node in [NodeID(1), NodeID(2)] {
            transport.register(.node(node)) { batch in
                for case .runTasks(let specs) in batch { counts.update { $0[node, default: 0] += specs.count } }
            }
        }
        let scheduler = GlobalScheduler(transport: transport, seed: 7)
        defer { withExtendedLifetime(scheduler) {} }
        let table = [NodeID(1), NodeID(2)].map { NodeRecord(id: $0, resources: Resources(cpus: 4), functions: nil, queued: 0, alive: true) }
        transport.send(.nodeTable(table), to: .scheduler)

        var seen = try await handUp(200, avoid: [NodeID(1)], through: transport, counts: counts, first: 0)
        #expect(seen[NodeID(1)] == nil, "node 1 was named dead")
        #expect(seen[NodeID(2)] == 200)

        // Named by no one, node 1 takes its share again: the table alone still says it lives.
        seen = try await handUp(200, avoid: [], through: transport, counts: counts, first: 200)
        #expect((seen[NodeID(1)] ?? 0) > 0)
        #expect(seen.values.reduce(0, +) == 400)
    }
}
