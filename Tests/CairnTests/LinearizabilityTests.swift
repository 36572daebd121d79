import CairnChaosKit
import CairnCore
import Testing

@Suite("Linearizability checker (registers, per key)")
struct LinearizabilityTests {
    typealias E = Linearizability.Entry

    func w(_ client: Int, _ v: UInt64, _ call: UInt64, _ ret: UInt64?, key: String = "k") -> E {
        E(client: client, key: key, operation: .write(v), call: call, returned: ret)
    }
    func r(_ client: Int, _ v: UInt64?, _ call: UInt64, _ ret: UInt64?, key: String = "k") -> E {
        E(client: client, key: key, operation: .read(v), call: call, returned: ret)
    }

    @Test("sequential histories: reads that see the last write pass; a read of a value never written fails")
    func sequential() {
        #expect(Linearizability.checkRegister([r(1, nil, 0, 1), w(1, 5, 2, 3), r(1, 5, 4, 5), w(1, 7, 6, 7), r(1, 7, 8, 9)]))
        #expect(!Linearizability.checkRegister([w(1, 5, 0, 1), r(1, 6, 2, 3)]))
        #expect(!Linearizability.checkRegister([r(1, 5, 0, 1)]))
    }

    @Test("a read concurrent with a write may see the old or the new value; one that starts after the write returned must see the new")
    func concurrency() {
        #expect(Linearizability.checkRegister([w(1, 1, 0, 1), w(2, 2, 2, 10), r(3, 1, 3, 4)]))
        #expect(Linearizability.checkRegister([w(1, 1, 0, 1), w(2, 2, 2, 10), r(3, 2, 3, 4)]))
        #expect(!Linearizability.checkRegister([w(1, 1, 0, 1), w(2, 2, 2, 3), r(3, 1, 4, 5)]), "a stale read")
        // Two reads in real-time order cannot see the values of two writes in the opposite order.
        #expect(!Linearizability.checkRegister([w(1, 1, 0, 10), w(2, 2, 0, 10), r(3, 2, 1, 2), r(3, 1, 3, 4), r(4, 2, 5, 6)]))
    }

    @Test("a write that never returned may be seen later, or never")
    func pending() {
        #expect(Linearizability.checkRegister([w(1, 1, 0, 1), w(2, 2, 2, nil), r(3, 2, 5, 6)]))
        #expect(Linearizability.checkRegister([w(1, 1, 0, 1), w(2, 2, 2, nil), r(3, 1, 5, 6)]))
        #expect(!Linearizability.checkRegister([w(1, 1, 0, 1), w(2, 2, 2, nil), r(3, 2, 5, 6), r(3, 1, 7, 8)]),
                "once seen, a pending write cannot be unseen")
        #expect(Linearizability.checkRegister([w(1, 1, 0, 1), r(2, 9, 2, nil)]), "a read that never returned says nothing")
    }

    @Test("keys are checked separately and the failing one is named")
    func perKey() {
        let verdict = Linearizability.check([w(1, 1, 0, 1, key: "a"), r(1, 1, 2, 3, key: "a"), w(1, 1, 0, 1, key: "b"), r(1, 2, 2, 3, key: "b")])
        #expect(!verdict.linearizable && verdict.failingKey == "b")
        #expect(Linearizability.check([w(1, 1, 0, 1, key: "a"), r(2, nil, 0, 1, key: "b")]).linearizable)
    }

    /// A history of an atomic register: each operation takes effect at a random instant between
    /// its call and its return, so the history is linearizable by construction.
    func atomicHistory(seed: UInt64, clients: Int, operations: Int) -> [E] {
        var rng = SeededGenerator(seed: seed)
        struct Op { var client: Int; var write: UInt64?; var call: UInt64; var point: UInt64; var ret: UInt64 }
        var ops: [Op] = []
        var clock = [UInt64](repeating: 0, count: clients)
        var nextValue: UInt64 = 1
        for _ in 0..<operations {
            let c = Int.random(in: 0..<clients, using: &rng)
            let call = clock[c] + UInt64.random(in: 0...3, using: &rng)
            let point = call + UInt64.random(in: 0...5, using: &rng)
            let ret = point + UInt64.random(in: 0...5, using: &rng)
            clock[c] = ret + 1
            let isWrite = Bool.random(using: &rng)
            ops.append(Op(client: c, write: isWrite ? nextValue : nil, call: call, point: point, ret: ret))
            if isWrite { nextValue += 1 }
        }
        // Apply in order of the linearization points (ties broken by index) to learn each read's value.
        var value: UInt64?
        var observed = [UInt64?](repeating: nil, count: ops.count)
        for i in ops.indices.sorted(by: { (ops[$0].point, $0) < (ops[$1].point, $1) }) {
            if let v = ops[i].write { value = v } else { observed[i] = value }
        }
        return ops.enumerated().map { i, o in
            o.write.map { w(o.client, $0, o.call, o.ret) } ?? r(o.client, observed[i], o.call, o.ret)
        }
    }

    @Test("500 seeded histories of an atomic register pass; each with one read changed to an unwritten value fails")
    func randomized() {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_LINEARIZABILITY_SEED")
        print("linearizability test seed: \(seed) (replay with CAIRN_LINEARIZABILITY_SEED=\(seed))")
        var rng = SeededGenerator(seed: seed)
        for round in 0..<500 {
            let history = atomicHistory(seed: rng.next(), clients: 4, operations: 40)
            #expect(Linearizability.checkRegister(history), "round \(round): an atomic register's history must pass")
            guard let i = history.indices.filter({ if case .read = history[$0].operation { return true } else { return false } }).randomElement(using: &rng) else { continue }
            var broken = history
            broken[i].operation = .read(999_999)
            #expect(!Linearizability.checkRegister(broken), "round \(round): a read of a value never written must fail")
        }
    }
}
