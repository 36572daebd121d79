import CairnChaosKit
@testable import CairnStorage
import CairnCore
import Foundation
import Testing

@Suite("Durable store: records, logs, batches and checkpoints on every engine")
struct DurableStoreTests {
    @Test("records: put, get, overwrite, delete and prefix scan", arguments: Backend.allCases)
    func records(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        try store.put(bytes("user/2"), bytes("bob"))
        try store.put(bytes("user/1"), bytes("alice"))
        try store.put(bytes("team/1"), bytes("core"))
        try store.put(bytes("user/1"), bytes("alice v2"))
        #expect(try store.get(bytes("user/1")) == bytes("alice v2"))
        #expect(try store.get(bytes("user/9")) == nil)
        let users = try store.scan(prefix: bytes("user/"))
        #expect(users.map(\.key) == [bytes("user/1"), bytes("user/2")])
        #expect(try store.scan(prefix: bytes("user/"), limit: 1).count == 1)
        try store.delete(bytes("user/1"))
        #expect(try store.get(bytes("user/1")) == nil)
        #expect(try store.scan(prefix: bytes("u")).map(\.value) == [bytes("bob")])
    }

    @Test("batches: every write of a batch lands, or none does", arguments: Backend.allCases)
    func batchAtomicity(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        var good = WriteBatch()
        good.put(bytes("a"), bytes("1"))
        good.put(bytes("b"), bytes("2"))
        good.append(to: "log", [bytes("x"), bytes("y")])
        good.delete(bytes("a"))
        let result = try store.commit(good)
        #expect(result.firstSequences == [0])
        #expect(try store.get(bytes("a")) == nil)
        #expect(try store.get(bytes("b")) == bytes("2"))

        var bad = WriteBatch()
        bad.put(bytes("c"), bytes("3"))
        bad.put([], bytes("empty key"))
        #expect(throws: StorageError.self) { try store.commit(bad) }
        #expect(try store.get(bytes("c")) == nil)

        // A transaction whose body fails part-way leaves nothing behind, in either engine.
        struct Abort: Error {}
        #expect(throws: Abort.self) {
            try store.engine.write { w in
                try w.put(Keys.record(bytes("d")), bytes("4"))
                try w.delete(Keys.record(bytes("b")))
                throw Abort()
            }
        }
        #expect(try store.get(bytes("d")) == nil)
        #expect(try store.get(bytes("b")) == bytes("2"))
    }

    @Test("logs: append, read from a position, truncate, and bounds", arguments: Backend.allCases)
    func logs(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        #expect(try store.logBounds("events") == LogBounds(first: 0, next: 0))
        let first = try store.append(to: "events", (0..<10).map { bytes("e\($0)") })
        #expect(first == 0)
        #expect(try store.append(to: "events", [bytes("e10")]) == 10)
        #expect(try store.append(to: "other", [bytes("o0")]) == 0)
        #expect(try store.readLog("events").map(\.payload) == (0...10).map { bytes("e\($0)") })
        #expect(try store.readLog("events", from: 4, limit: 3).map(\.sequence) == [4, 5, 6])
        #expect(try store.readLog("events", from: 2, upTo: 4).map(\.sequence) == [2, 3])
        try store.truncateLog("events", before: 7)
        #expect(try store.logBounds("events") == LogBounds(first: 7, next: 11))
        #expect(try store.readLog("events").map(\.sequence) == [7, 8, 9, 10])
        #expect(try store.readLog("other").map(\.payload) == [bytes("o0")])
    }

    @Test("logs: sequence numbers are never reused, even after truncating every entry", arguments: Backend.allCases)
    func sequencesNotReused(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        try store.append(to: "l", [bytes("a"), bytes("b"), bytes("c")])
        try store.truncateLog("l", before: 100)
        #expect(try store.logBounds("l") == LogBounds(first: 3, next: 3))
        #expect(try store.append(to: "l", [bytes("d")]) == 3)
    }

    @Test("logs: concurrent appenders get distinct, gap-free sequence numbers",
          arguments: Backend.allCases, [SyncMode.eachCommit, .group])
    func concurrentAppends(backend: Backend, mode: SyncMode) throws {
        let (store, dir) = try backend.makeStore(StoreOptions(syncMode: mode))
        defer { store.close(); _ = dir }
        let writers = 8
        let perWriter = 60
        let seen = SeenSequences()
        DispatchQueue.concurrentPerform(iterations: writers) { w in
            for i in 0..<perWriter {
                let payload = bytes("w\(w)-\(i)")
                let seq = try! store.append(to: "shared", [payload])
                seen.add(seq, payload)
            }
        }
        let all = seen.all()
        #expect(all.count == writers * perWriter)
        #expect(Set(all.keys) == Set((0..<UInt64(writers * perWriter))))
        for entry in try store.readLog("shared") {
            #expect(all[entry.sequence] == entry.payload)
        }
    }

    @Test("commits: the async and completion forms are durable when they return", arguments: Backend.allCases)
    func asyncCommits(backend: Backend) async throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        var batch = WriteBatch()
        batch.append(to: "a", [bytes("1"), bytes("2")])
        let result = try await store.commit(batch)
        #expect(result.firstSequences == [0])
        let second: CommitResult = try await withCheckedThrowingContinuation { c in
            store.commit(batch) { c.resume(with: $0) }
        }
        #expect(second.firstSequences == [2])
        #expect(try store.logBounds("a").next == 4)
    }

    @Test("checkpoints: the newest K are kept and the newest is read back", arguments: Backend.allCases)
    func checkpointsKeepNewest(backend: Backend) throws {
        let (store, dir) = try backend.makeStore(StoreOptions(checkpointsKept: 3))
        defer { store.close(); _ = dir }
        #expect(try store.newestCheckpoint("actor") == nil)
        for seq in [5, 10, 15, 20, 25] as [UInt64] {
            try store.writeCheckpoint("actor", sequence: seq, payload: bytes("state at \(seq)"))
        }
        #expect(try store.checkpointSequences("actor") == [15, 20, 25])
        let newest = try #require(try store.newestCheckpoint("actor"))
        #expect(newest.sequence == 25)
        #expect(newest.payload == bytes("state at 25"))
        #expect(newest.rejected.isEmpty)
    }

    @Test("checkpoints: a Codable state round-trips through encode, zstd and checksum", arguments: Backend.allCases)
    func typedCheckpoint(backend: Backend) throws {
        struct Bank: Codable, Equatable { var balances: [String: Int]; var applied: UInt64; var blob: [UInt8] }
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        let state = Bank(balances: ["a": 10, "b": -3], applied: 42, blob: [UInt8](repeating: 7, count: 100_000))
        let stored = try store.writeCheckpoint("bank", sequence: 42, state: state)
        #expect(stored < 2_000)  // 100 KB of repeated bytes compresses
        let back = try #require(try store.newestCheckpoint(Bank.self, "bank"))
        #expect(back.state == state)
        #expect(back.read.sequence == 42)
    }

    @Test("checkpoints: a corrupt newest checkpoint is reported and the previous one is used", arguments: Backend.allCases)
    func checkpointFallback(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        try store.writeCheckpoint("c", sequence: 1, payload: bytes("one"))
        try store.writeCheckpoint("c", sequence: 2, payload: bytes("two"))
        var blob = try #require(try store.engine.read { try $0.get(Keys.checkpoint("c", 2)) })
        blob[blob.count - 1] ^= 0x40
        try store.engine.write { try $0.put(Keys.checkpoint("c", 2), blob) }
        let read = try #require(try store.newestCheckpoint("c"))
        #expect(read.sequence == 1)
        #expect(read.payload == bytes("one"))
        #expect(read.rejected.count == 1)
        #expect(read.rejected.first?.sequence == 2)
        #expect(read.rejected.first?.error.code == .checksumMismatch)

        // Now cut the older one short too: no checkpoint verifies, and the error says so.
        let older = try #require(try store.engine.read { try $0.get(Keys.checkpoint("c", 1)) })
        try store.engine.write { try $0.put(Keys.checkpoint("c", 1), Array(older.prefix(20))) }
        do {
            _ = try store.newestCheckpoint("c")
            Issue.record("expected noValidCheckpoint")
        } catch let error as StorageError {
            #expect(error.code == .noValidCheckpoint)
            #expect(error.detail.contains("truncated"))
        }
    }

    @Test("checkpoints in parts: read back whole; a corrupt or missing part falls back to the previous one; pruning deletes parts",
          arguments: Backend.allCases)
    func checkpointParts(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        var rng = SeededGenerator(seed: 5)
        let payloads = (0..<4).map { _ in (0..<100_000).map { _ in UInt8(truncatingIfNeeded: rng.next() & 0x0F) } }
        let countParts = { (seq: UInt64) throws -> Int in
            try store.engine.read { r in
                var n = 0
                let prefix = Keys.checkpointPartPrefix("p") + Keys.be(seq)
                try r.scan(from: prefix) { k, _ in
                    guard Keys.hasPrefix(k, prefix) else { return false }
                    n += 1
                    return true
                }
                return n
            }
        }
        for (i, payload) in payloads.prefix(2).enumerated() {
            try store.writeCheckpoint("p", sequence: UInt64(i + 1), payload: payload, partSize: 8192)
        }
        #expect(try countParts(2) > 1, "written in several parts")
        var read = try #require(try store.newestCheckpoint("p"))
        #expect(read.sequence == 2 && read.payload == payloads[1] && read.rejected.isEmpty)

        // A flipped byte in a part fails the checkpoint's checksum: the previous one is used.
        let key = Keys.checkpointPart("p", 2, 1)
        var part = try #require(try store.engine.read { try $0.get(key) })
        part[100] ^= 0x01
        try store.engine.write { try $0.put(key, part) }
        read = try #require(try store.newestCheckpoint("p"))
        #expect(read.sequence == 1 && read.payload == payloads[0])
        #expect(read.rejected.first?.error.code == .checksumMismatch)

        // A missing part (a write cut short) is reported as truncated.
        try store.engine.write { _ = try $0.delete(key) }
        read = try #require(try store.newestCheckpoint("p"))
        #expect(read.sequence == 1)
        #expect(read.rejected.first?.error.code == .truncated)

        // Two newer checkpoints: the oldest two go, with their parts.
        try store.writeCheckpoint("p", sequence: 3, payload: payloads[2], partSize: 8192)
        try store.writeCheckpoint("p", sequence: 4, payload: payloads[3], partSize: 8192)
        #expect(try store.checkpointSequences("p") == [3, 4])
        #expect(try countParts(1) == 0 && countParts(2) == 0)
        #expect(try store.newestCheckpoint("p")?.payload == payloads[3])
    }

    @Test("logs: a flipped byte or a torn (cut) entry is reported with its sequence number", arguments: Backend.allCases)
    func logCorruption(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        // One commit per entry, so each entry is its own chunk.
        for i in 0..<5 { try store.append(to: "l", [bytes("entry number \(i)")]) }
        var entry = try #require(try store.engine.read { try $0.get(Keys.log("l", 2)) })
        entry[12] ^= 0x01
        try store.engine.write { try $0.put(Keys.log("l", 2), entry) }
        do {
            _ = try store.readLog("l")
            Issue.record("expected corruptRecord")
        } catch let error as StorageError {
            #expect(error.code == .corruptRecord)
            #expect(error.sequence == 2)
        }
        #expect(try store.readLog("l", upTo: 2).count == 2)

        // A torn write of the last entry: its frame is cut short.
        let last = try #require(try store.engine.read { try $0.get(Keys.log("l", 4)) })
        try store.engine.write { try $0.put(Keys.log("l", 4), Array(last.prefix(last.count - 3))) }
        #expect(throws: StorageError.self) { try store.readLog("l", from: 3) }
        do {
            _ = try store.readLog("l", from: 3)
        } catch let error as StorageError {
            #expect(error.sequence == 4)
            #expect(error.detail.contains("torn"))
        }
        #expect(try store.readLog("l", from: 3, upTo: 4).map(\.sequence) == [3])
    }

    @Test("bad input: empty or oversized keys and names are refused with a typed error", arguments: Backend.allCases)
    func validation(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        defer { store.close(); _ = dir }
        func code(_ body: () throws -> Void) -> StorageError.Code? {
            do { try body(); return nil } catch let e as StorageError { return e.code } catch { return nil }
        }
        #expect(code { try store.put([], bytes("v")) } == .invalidKey)
        #expect(code { try store.put([UInt8](repeating: 1, count: 600), bytes("v")) } == .invalidKey)
        #expect(code { try store.append(to: "", [bytes("x")]) } == .invalidName)
        #expect(code { try store.append(to: String(repeating: "n", count: 300), [bytes("x")]) } == .invalidName)
        #expect(code { try store.writeCheckpoint("", sequence: 1, payload: []) } == .invalidName)
    }

    @Test("a closed store refuses further work with a typed error", arguments: Backend.allCases)
    func closed(backend: Backend) throws {
        let (store, dir) = try backend.makeStore()
        _ = dir
        try store.put(bytes("k"), bytes("v"))
        store.close()
        do {
            _ = try store.get(bytes("k"))
            Issue.record("expected closed")
        } catch let e as StorageError {
            #expect(e.code == .closed)
        }
        do {
            try store.put(bytes("k"), bytes("v2"))
            Issue.record("expected closed")
        } catch let e as StorageError {
            #expect(e.code == .closed)
        }
    }
}

@Suite("LMDB engine")
struct LMDBEngineTests {
    @Test("the map grows instead of failing when a write does not fit")
    func mapGrows() throws {
        let dir = try TemporaryDirectory()
        let engine = try LMDBEngine(directory: dir.path, initialMapSize: 1 << 20)
        let store = DurableStore(engine: engine)
        defer { store.close() }
        let chunk = [UInt8](repeating: 0xAB, count: 256 << 10)
        for i in 0..<64 { try store.put(bytes("big/\(i)"), chunk) }
        #expect(engine.mapSize >= 16 << 20)
        #expect(try store.get(bytes("big/63")) == chunk)
        // One value larger than the whole current map.
        try store.writeCheckpoint("huge", sequence: 1, payload: StateGenerator.random(seed: 1, count: 40 << 20))
        #expect(try store.newestCheckpoint("huge")?.payload.count == 40 << 20)
    }

    @Test("a write past the configured maximum map size fails with .full, and earlier data is intact")
    func mapLimit() throws {
        let dir = try TemporaryDirectory()
        let store = DurableStore(engine: try LMDBEngine(directory: dir.path, initialMapSize: 1 << 20, maxMapSize: 4 << 20))
        defer { store.close() }
        try store.put(bytes("small"), bytes("kept"))
        do {
            try store.put(bytes("too-big"), [UInt8](repeating: 1, count: 8 << 20))
            Issue.record("expected full")
        } catch let e as StorageError {
            #expect(e.code == .full)
        }
        #expect(try store.get(bytes("small")) == bytes("kept"))
    }

    @Test("everything committed is there after closing and reopening the directory")
    func reopen() throws {
        let dir = try TemporaryDirectory()
        do {
            let store = try DurableStore.lmdb(directory: dir.path)
            try store.put(bytes("k"), bytes("v"))
            try store.append(to: "log", [bytes("a"), bytes("b")])
            try store.truncateLog("log", before: 1)
            try store.writeCheckpoint("cp", sequence: 9, payload: bytes("nine"))
            store.close()
        }
        let store = try DurableStore.lmdb(directory: dir.path)
        defer { store.close() }
        #expect(try store.get(bytes("k")) == bytes("v"))
        #expect(try store.readLog("log").map(\.payload) == [bytes("b")])
        #expect(try store.logBounds("log") == LogBounds(first: 1, next: 2))
        #expect(try store.newestCheckpoint("cp")?.payload == bytes("nine"))
    }

    @Test("a byte flipped inside data.mdb on disk is caught by the record checksum")
    func onDiskBitFlip() throws {
        let dir = try TemporaryDirectory()
        let marker = bytes("MARKER-7f3a9c-payload-that-is-unique")
        do {
            let store = try DurableStore.lmdb(directory: dir.path)
            try store.append(to: "disk", [bytes("before"), marker, bytes("after")])
            store.close()
        }
        let file = dir.path + "/data.mdb"
        var data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        let at = try #require(find(marker, in: data))
        data[at + 10] ^= 0x20
        try Data(data).write(to: URL(fileURLWithPath: file))
        let store = try DurableStore.lmdb(directory: dir.path)
        defer { store.close() }
        do {
            _ = try store.readLog("disk")
            Issue.record("expected corruptRecord")
        } catch let e as StorageError {
            #expect(e.code == .corruptRecord)
            #expect(e.sequence == 1)
        }
    }

    @Test("an unwritable location fails to open with .cannotOpen")
    func cannotOpen() throws {
        let dir = try TemporaryDirectory()
        let file = dir.path + "/plain-file"
        #expect(FileManager.default.createFile(atPath: file, contents: Data([1])))
        do {
            _ = try LMDBEngine(directory: file + "/sub")
            Issue.record("expected cannotOpen")
        } catch let e as StorageError {
            #expect(e.code == .cannotOpen)
        }
    }
}

func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
    guard needle.count <= haystack.count else { return nil }
    for i in 0...(haystack.count - needle.count) where haystack[i] == needle[0] {
        if Array(haystack[i..<(i + needle.count)]) == needle { return i }
    }
    return nil
}

enum StateGenerator {
    static func random(seed: UInt64, count: Int) -> [UInt8] {
        var rng = SeededGenerator(seed: seed)
        return rng.bytes(count)
    }
}

/// Collects (sequence, payload) pairs from several threads.
final class SeenSequences: @unchecked Sendable {
    private let lock = NSLock()
    private var seen: [UInt64: [UInt8]] = [:]

    func add(_ seq: UInt64, _ payload: [UInt8]) {
        lock.lock()
        precondition(seen[seq] == nil, "sequence \(seq) handed out twice")
        seen[seq] = payload
        lock.unlock()
    }

    func all() -> [UInt64: [UInt8]] {
        lock.lock()
        defer { lock.unlock() }
        return seen
    }
}
