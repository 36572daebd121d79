import CairnChaosKit
import CairnCore
import CairnGCS
import Testing

@Suite("Chain replication core (pure), under a seeded simulated network")
struct ChainReplicationTests {
    @Test("a write flows head to tail, the tail replies and acknowledges, reads are served by the tail")
    func happyPath() {
        let chain = [0, 1, 2]
        var head = ChainReplica(id: 0, chain: chain)
        var middle = ChainReplica(id: 1, chain: chain)
        var tail = ChainReplica(id: 2, chain: chain)
        let request = RequestID(client: 7, number: 1)
        let a1 = head.handle(.write(request, key: "k", value: 42), from: .client(7))
        let u = ChainUpdate(sequence: 1, key: "k", value: 42, request: request)
        #expect(a1 == [.persist(u), .send(.forward(u), to: .replica(1))])
        #expect(middle.handle(.forward(u), from: .replica(0)) == [.persist(u), .send(.forward(u), to: .replica(2))])
        #expect(tail.handle(.forward(u), from: .replica(1)) == [.persist(u), .send(.written(request), to: .client(7)), .send(.ack(1), to: .replica(1))])
        #expect(middle.handle(.ack(1), from: .replica(2)) == [.send(.ack(1), to: .replica(0))])
        #expect(head.handle(.ack(1), from: .replica(1)) == [])
        #expect(head.tick() == [] && middle.tick() == [], "nothing is left unacknowledged")
        #expect(tail.handle(.read(RequestID(client: 8, number: 1), key: "k"), from: .client(8)) == [.send(.readResult(RequestID(client: 8, number: 1), 42), to: .client(8))])
        #expect(head.handle(.read(RequestID(client: 8, number: 2), key: "k"), from: .client(8)) == [.send(.notHere(RequestID(client: 8, number: 2)), to: .client(8))])
        // The client retries the write: applied once, answered by the head now that it is acknowledged.
        #expect(head.handle(.write(request, key: "k", value: 42), from: .client(7)) == [.send(.written(request), to: .client(7))])
        #expect(head.log.count == 1)
    }

    @Test("an update arriving out of order waits for the gap to be filled by retransmission; a duplicate is ignored")
    func ordering() {
        let chain = [0, 1]
        var tail = ChainReplica(id: 1, chain: chain)
        let u1 = ChainUpdate(sequence: 1, key: "k", value: 1, request: RequestID(client: 1, number: 1))
        let u2 = ChainUpdate(sequence: 2, key: "k", value: 2, request: RequestID(client: 1, number: 2))
        #expect(tail.handle(.forward(u2), from: .replica(0)) == [])
        #expect(tail.handle(.forward(u1), from: .replica(0)).contains(.persist(u1)))
        #expect(tail.handle(.forward(u1), from: .replica(0)) == [.send(.ack(1), to: .replica(0))], "a duplicate is acknowledged again")
        #expect(tail.handle(.forward(u2), from: .replica(0)).contains(.persist(u2)))
        #expect(tail.store["k"] == 2)
    }

    @Test("500 seeds: drops, duplicates, reordering and replica crashes; every history is linearizable and no acknowledged write is lost")
    func simulation() {
        let base = SeededGenerator.seed(fromEnvironment: "CAIRN_CHAIN_SEED")
        print("chain simulation base seed: \(base) (replay with CAIRN_CHAIN_SEED=\(base))")
        var seeds = SeededGenerator(seed: base)
        var crashes = 0
        var completed = 0
        for _ in 0..<500 {
            let seed = seeds.next()
            let outcome = ChainSimulation.run(.init(seed: seed))
            crashes += outcome.crashes
            completed += outcome.completed
            if !outcome.passed {
                Issue.record("seed \(seed) fails: linearizable \(outcome.verdict.linearizable) (key \(outcome.verdict.failingKey ?? "-")), lost \(outcome.lostWrites); replay with: swift run cairn-chaos chain-sim --seed \(seed)")
                break
            }
        }
        #expect(crashes > 50, "the runs crashed replicas")
        #expect(completed > 500 * 60, "most operations completed despite the faults")
    }
}
