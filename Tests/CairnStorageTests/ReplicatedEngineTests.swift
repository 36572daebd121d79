import Cairn
import CairnChaosKit
import CairnCore
@testable import CairnStorage
import Foundation
import Testing

@Suite("Replicated engine: a store journalled to the GCS chains, read back anywhere")
struct ReplicatedEngineTests {
    /// Everything a store holds, in key order.
    static func contents(_ engine: any StorageEngine) throws -> [Record] {
        try engine.read { r in
            var all: [Record] = []
            try r.scan(from: []) { k, v in
                all.append(Record(key: [UInt8](k), value: [UInt8](v)))
                return true
            }
            return all
        }
    }

    @Test("an engine opened again over the same GCS keys reads back every commit, across compactions")
    func reopenAcrossCompactions() throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_TEST_SEED")
        print("replicated reopen: seed \(seed) (CAIRN_TEST_SEED replays)")
        var random = SeededGenerator(seed: seed)
        let gcs = try RunningGCS()
        let options = ReplicatedEngine.Options(compactAfterBytes: 4_096, compactAfterTransactions: 16)
        let first = try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "reopen"), options: options)
        let store = DurableStore(engine: first, options: StoreOptions(syncMode: .eachCommit))
        for i in 0..<120 {
            switch Int.random(in: 0..<4, using: &random) {
            case 0: try store.put(bytes("k\(i % 17)"), (0..<Int.random(in: 1...600, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) })
            case 1: try store.delete(bytes("k\(Int.random(in: 0..<17, using: &random))"))
            case 2: _ = try store.append(to: "log", [bytes("entry \(i)"), bytes("and \(i)")])
            default: _ = try store.writeCheckpoint("cp", sequence: UInt64(i), payload: bytes(String(repeating: "state \(i) ", count: 50)))
            }
        }
        let expected = try Self.contents(first)
        first.waitForCompactions()
        let position = first.position
        #expect(position.generation >= 2, "compactions happened: \(position)")
        store.close()

        let second = try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "reopen"), options: options)
        #expect(try Self.contents(second) == expected)
        #expect(second.recovery.generation == position.generation)
        #expect(UInt64(second.recovery.transactions) == position.nextTransaction - 1 - position.baseTransaction,
                "only the transactions since the last base are replayed: \(second.recovery), \(position)")
        #expect(second.recovery.transactions < 120)
        // And it goes on where the first left off.
        let reopened = DurableStore(engine: second, options: StoreOptions(syncMode: .eachCommit))
        let next = try reopened.logBounds("log").next
        #expect(try reopened.append(to: "log", [bytes("after")]) == next)
        #expect(try reopened.newestCheckpoint("cp") != nil)
        reopened.close()
    }

    @Test("a compaction deletes the previous generation's keys from the GCS")
    func compactionDeletesOldKeys() throws {
        let gcs = try RunningGCS()
        let engine = try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "gc"),
                                          options: ReplicatedEngine.Options(compactAfterBytes: 1 << 30, compactAfterTransactions: 4))
        let store = DurableStore(engine: engine, options: StoreOptions(syncMode: .eachCommit))
        defer { store.close() }
        try store.put(bytes("a"), bytes("1"))
        #expect(try gcs.gcs.get(GCSTable.storage.key("gc/t1")) != nil)
        for i in 2...4 { try store.put(bytes("a"), bytes("\(i)")) }
        engine.waitForCompactions()
        #expect(engine.position.generation == 1 && engine.position.baseTransaction == 4)
        for n in 1...4 { #expect(try gcs.gcs.get(GCSTable.storage.key("gc/t\(n)")) == nil, "transaction \(n), in the base now") }
        #expect(try gcs.gcs.get(GCSTable.storage.key("gc/1/b0")) != nil)
        #expect(try gcs.gcs.get(GCSTable.storage.key("gc/m")) != nil)
    }

    @Test("a transaction larger than one GCS value is split into pieces and read back whole")
    func largeTransactionInPieces() throws {
        let gcs = try RunningGCS()
        let big = (0..<(2_500_000)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        do {
            // No compaction, so that the pieces stay where they were written.
            let store = DurableStore(engine: try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "big"),
                                                                  options: ReplicatedEngine.Options(compactAfterBytes: 1 << 30)),
                                     options: StoreOptions(syncMode: .eachCommit))
            try store.put(bytes("big"), big)
            try store.put(bytes("small"), bytes("x"))
            store.close()
        }
        #expect(try gcs.gcs.get(GCSTable.storage.key("big/t1/2")) != nil, "the first transaction has a third piece")
        let again = DurableStore(engine: try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "big")))
        defer { again.close() }
        #expect(try again.get(bytes("big")) == big)
        #expect(try again.get(bytes("small")) == bytes("x"))
    }

    @Test("damaged journal entries in the GCS are reported as corrupt records, naming the transaction")
    func damageIsReported() throws {
        let gcs = try RunningGCS()
        do {
            let store = DurableStore(engine: try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "d")), options: StoreOptions(syncMode: .eachCommit))
            for i in 0..<3 { try store.put(bytes("k\(i)"), bytes("value \(i)")) }
            store.close()
        }
        let key = GCSTable.storage.key("d/t2")
        var damaged = try #require(try gcs.gcs.get(key))
        damaged[damaged.count - 1] ^= 0x40
        try gcs.gcs.put(key, damaged)
        #expect {
            _ = try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "d"))
        } throws: { ($0 as? StorageError)?.code == .corruptRecord && ($0 as? StorageError)?.sequence == 2 }

        try gcs.gcs.put(GCSTable.storage.key("m/m"), bytes("not a manifest"))
        #expect {
            _ = try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "m"))
        } throws: { ($0 as? StorageError)?.code == .corruptRecord }
    }

    @Test("a GCS replica killed while transactions stream loses none that was acknowledged")
    func replicaKilledMidStream() throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_TEST_SEED")
        print("replicated replica kill: seed \(seed) (CAIRN_TEST_SEED replays)")
        var random = SeededGenerator(seed: seed)
        let gcs = try RunningGCS(shards: 1)
        let store = DurableStore(engine: try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "kill"),
                                                              options: ReplicatedEngine.Options(compactAfterTransactions: 50)),
                                 options: StoreOptions(syncMode: .eachCommit))
        let killAt = Int.random(in: 20..<120, using: &random)
        var acknowledged: [UInt64: [UInt8]] = [:]
        for i in 0..<150 {
            if i == killAt {
                let chain = try #require(gcs.gcs.configurations().first).chain
                try gcs.gcs.kill(replica: chain[Int.random(in: 0..<chain.count, using: &random)])
            }
            let payload = bytes("entry \(i)")
            acknowledged[try store.append(to: "log", [payload])] = payload
        }
        store.close()
        let again = DurableStore(engine: try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "kill")))
        defer { again.close() }
        let entries = try again.readLog("log")
        #expect(entries.count == acknowledged.count)
        for e in entries { #expect(acknowledged[e.sequence] == e.payload) }
    }

    @Test("a write the GCS cannot take fails with .remote and changes nothing; the engine then refuses writes")
    func unreachableMapRefuses() throws {
        let gcs = try RunningGCS()
        let store = DurableStore(engine: try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "down")), options: StoreOptions(syncMode: .eachCommit))
        defer { store.close() }
        try store.put(bytes("kept"), bytes("1"))
        gcs.gcs.shutdown()
        #expect { try store.put(bytes("lost"), bytes("2")) } throws: { ($0 as? StorageError)?.code == .remote }
        #expect(try store.get(bytes("lost")) == nil)
        #expect(try store.get(bytes("kept")) == bytes("1"))
        #expect { try store.put(bytes("later"), bytes("3")) } throws: { ($0 as? StorageError)?.code == .remote }
    }

    @Test("journal formats: operations round-trip, and a cut or extended body is refused")
    func journalFormat() throws {
        let ops: [Journal.Operation] = [.put(bytes("a"), bytes("1")), .delete(bytes("b")), .deleteRange(bytes("c"), bytes("d")), .put([], [])]
        let body = Journal.encode(ops)
        #expect(try Journal.decode(body, where: "test") == ops)
        for cut in [1, 5, body.count - 1] {
            #expect(throws: StorageError.self) { try Journal.decode(Array(body.prefix(cut)), where: "test") }
        }
        #expect(throws: StorageError.self) { try Journal.decode(body + [0], where: "test") }
        let manifest = Journal.Manifest(generation: 3, parts: 2, baseTransaction: 40, length: 1_000, crc: 7)
        #expect(try Journal.Manifest.decode(manifest.encoded, where: "test") == manifest)
        var bad = manifest.encoded
        bad[9] ^= 1
        #expect(throws: StorageError.self) { try Journal.Manifest.decode(bad, where: "test") }
    }
}
