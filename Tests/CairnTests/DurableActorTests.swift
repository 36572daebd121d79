@testable import Cairn
import CairnChaosKit
import CairnCodec
import CairnCore
@testable import CairnStorage
import Foundation
import Synchronization
import Testing

@Suite("Durable actors (pure): caller table, checkpoint policy, log records")
struct DurableCoreTests {
    @Test("caller table: a new sequence applies, a repeat gets its first reply, an evicted one is stale, anonymous never dedups")
    func callerTable() throws {
        var t = CallerTable(keep: 2)
        guard case .apply = t.decide(caller: 7, sequence: 1) else { Issue.record("a first message must apply"); return }
        t.record(caller: 7, sequence: 1, reply: .boxed(10))
        t.record(caller: 7, sequence: 2, reply: .boxed(20))
        t.record(caller: 7, sequence: 3, reply: .failed(RemoteError(kind: .threw, task: ObjectID(raw: 0), function: "f", node: NodeID(0), message: "no")))
        guard case .duplicate(let r2) = t.decide(caller: 7, sequence: 2) else { Issue.record("sequence 2 was applied"); return }
        #expect(try r2.value(as: Int.self) == 20)
        guard case .duplicate(.failed(let e)) = t.decide(caller: 7, sequence: 3) else { Issue.record("sequence 3 failed, and its failure is its reply"); return }
        #expect(e.message == "no")
        guard case .stale(let last, let oldest) = t.decide(caller: 7, sequence: 1) else { Issue.record("sequence 1's reply was evicted"); return }
        #expect(last == 3 && oldest == 2)
        guard case .apply = t.decide(caller: 7, sequence: 4) else { Issue.record("a higher sequence applies"); return }
        guard case .apply = t.decide(caller: 8, sequence: 1) else { Issue.record("callers are independent"); return }
        t.record(caller: 0, sequence: 1, reply: .boxed(1))
        guard case .apply = t.decide(caller: 0, sequence: 1) else { Issue.record("anonymous sends are never deduplicated"); return }
    }

    @Test("caller table: a snapshot round trip through the codec makes the same decisions")
    func callerTableSnapshot() throws {
        var t = CallerTable(keep: 3)
        for s in 1...5 as ClosedRange<UInt64> { t.record(caller: 42, sequence: s, reply: .boxed(Int(s) * 100)) }
        let bytes = try BinaryEncoder().encode(try t.snapshot())
        let back = try CallerTable(keep: 3, snapshot: try BinaryDecoder().decode([CallerSnapshot].self, from: bytes))
        guard case .duplicate(let r) = back.decide(caller: 42, sequence: 4) else { Issue.record("sequence 4 is kept"); return }
        #expect(try r.value(as: Int.self) == 400)
        guard case .stale = back.decide(caller: 42, sequence: 2) else { Issue.record("sequence 2 was evicted"); return }
        guard case .apply = back.decide(caller: 42, sequence: 6) else { Issue.record("sequence 6 is new"); return }
    }

    @Test("checkpoint policy: due after N messages or T ms with at least one message; never is never due")
    func policy() {
        #expect(CheckpointPolicy.every(messages: 10).isDue(messagesSince: 10, nanosecondsSince: 0))
        #expect(!CheckpointPolicy.every(messages: 10).isDue(messagesSince: 9, nanosecondsSince: .max))
        #expect(CheckpointPolicy.every(milliseconds: 5).isDue(messagesSince: 1, nanosecondsSince: 5_000_000))
        #expect(!CheckpointPolicy.every(milliseconds: 5).isDue(messagesSince: 0, nanosecondsSince: .max))
        #expect(!CheckpointPolicy.every(milliseconds: 5).isDue(messagesSince: 3, nanosecondsSince: 4_999_999))
        #expect(CheckpointPolicy.every(messages: 100, orMilliseconds: 5).isDue(messagesSince: 2, nanosecondsSince: 6_000_000))
        #expect(!CheckpointPolicy.never.isDue(messagesSince: 1_000_000, nanosecondsSince: .max))
    }

    @Test("log record: caller, sequence and message round trip; a record shorter than its header is a typed error")
    func loggedMessage() throws {
        let payload = LoggedMessage.encode(caller: 0xDEAD_BEEF, sequence: 77, message: [1, 2, 3])
        let (c, s, m) = try LoggedMessage.decode(payload)
        #expect(c == 0xDEAD_BEEF && s == 77 && m == [1, 2, 3])
        #expect(throws: CairnError.self) { try LoggedMessage.decode([1, 2, 3]) }
    }
}

/// An actor with 64 MiB of state in 1 MiB chunks, so that the copy a checkpoint takes costs
/// a message at most one chunk when it next writes.
struct BigState: RemoteActor {
    var chunks: [[UInt8]]
    var writes = 0
    init(mebibytes: Int) {
        chunks = (0..<mebibytes).map { i in [UInt8](repeating: UInt8(i & 0xFF), count: 1 << 20) }
    }
    mutating func receive(_ i: Int) throws -> Int {
        chunks[i % chunks.count][i % (1 << 20)] &+= 1
        writes += 1
        return writes
    }
}

/// Sends a Bank message from inside a task, so the call crosses from another node.
let depositFromTask = RemoteFunction2<ActorHandle<Bank>, Int, Int>("test.depositFromTask") { bank, amount in
    try bank.send(.deposit(account: 0, amount: amount)).get().applied
}

/// Log lines a cluster reported, for tests that check what was reported.
final class LogLines: Sendable {
    private let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    var handler: @Sendable (String) -> Void { { [self] line in lines.withLock { $0.append(line) } } }
}

extension ClusterSuites {
@Suite("Durable actors: log, checkpoints, restore, exactly-once", .serialized)
struct DurableActorTests {
    static let intervals = [1, 10, 1000, 0]

    func policy(_ interval: Int) -> CheckpointPolicy { interval == 0 ? .never : .every(messages: interval) }

    func withBank(_ dir: String, interval: Int, durability: DurabilityOptions? = nil, log: LogLines = LogLines(),
                  _ body: (Cluster, ActorHandle<Bank>) async throws -> Void) async throws {
        let options = ClusterOptions(nodes: Array(repeating: NodeConfiguration(resources: Resources(cpus: 1)), count: 2),
                                     storage: ActorStorageOptions(location: .directory(dir), logSegmentBytes: 1 << 20), log: log.handler)
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let bank = try await cluster.spawn(Bank(), name: "bank", durability: durability ?? DurabilityOptions(checkpoint: policy(interval)))
        try await body(cluster, bank)
    }

    /// Sends `messages` as caller 1 from sequence `first`, all outstanding at once, and checks every reply against `model`.
    func drive(_ cluster: Cluster, _ bank: ActorHandle<Bank>, _ messages: [Bank.Message], first: UInt64, model: inout Bank) async throws {
        let refs = try messages.enumerated().map { i, m in try bank.send(m, caller: CallerID(1), sequence: first + UInt64(i)) }
        for (m, ref) in zip(messages, refs) {
            do {
                let expected = try model.receive(m)
                #expect(try await cluster.get(ref) == expected)
            } catch is Bank.InsufficientFunds {
                await #expect(throws: RemoteError.self) { try await cluster.get(ref) }
            }
        }
    }

    /// A fresh directory holding a Bank that was sent 1,200 seeded messages as caller 1, and the model of it.
    func filledBank(seed: UInt64, interval: Int) async throws -> (TemporaryDirectory, Bank) {
        let dir = try TemporaryDirectory()
        var model = Bank()
        try await withBank(dir.path, interval: interval) { cluster, bank in
            try await drive(cluster, bank, randomMessages(1200, seed: seed), first: 1, model: &model)
        }
        return (dir, model)
    }

    func randomMessages(_ n: Int, seed: UInt64) -> [Bank.Message] {
        var rng = SeededGenerator(seed: seed)
        return (0..<n).map { _ in Bank.randomMessage(using: &rng) }
    }

    /// Marks the stored actor as running, as a process that crashed while hosting it leaves it.
    func markCrashed(_ dir: String) throws {
        let store = try DurableStore.lmdb(directory: dir + "/checkpoints")
        defer { store.close() }
        var meta = try BinaryDecoder().decode(DurableActorMeta.self, from: try #require(try store.get(ActorStorage.metaKey("bank"))))
        meta.running = true
        try store.put(ActorStorage.metaKey("bank"), try BinaryEncoder().encode(meta))
    }

    @Test("state survives a restart on the same storage, for checkpoint intervals 1, 10, 1,000 and never", arguments: intervals)
    func survivesRestart(interval: Int) async throws {
        let dir = try TemporaryDirectory()
        let messages = randomMessages(1200, seed: 11)
        var model = Bank()
        var firstID: ActorID?
        try await withBank(dir.path, interval: interval) { cluster, bank in
            firstID = bank.id
            try await drive(cluster, bank, messages, first: 1, model: &model)
        }
        try await withBank(dir.path, interval: interval) { cluster, bank in
            #expect(bank.id == firstID, "a durable actor's ID is the same in every life")
            let status = try await cluster.status(of: bank)
            #expect(status.state == .alive && status.restarts == 0 && status.name == "bank")
            #expect(cluster.metrics.actorsRestored == 1)
            if interval == 0 { #expect(cluster.metrics.messagesReplayed == 1200) }
            try await drive(cluster, bank, [.audit], first: 1201, model: &model)
        }
    }

    @Test("with replicated storage, state survives a cluster restart on the same GCS directory, for checkpoint intervals 1, 10, 1,000 and never",
          arguments: intervals)
    func survivesRestartReplicated(interval: Int) async throws {
        let dir = try TemporaryDirectory()
        var gcsOptions = EmbeddedGCS.Options()
        gcsOptions.directory = dir.path
        var options = ClusterOptions.uniform(nodes: 2, storage: ActorStorageOptions(location: .replicated))
        options.controlStore = .chainReplicated(gcsOptions)
        let messages = randomMessages(300, seed: 13)
        var model = Bank()
        for life in 1...2 {
            let cluster = try await Cluster.local(options)
            let bank = try await cluster.spawn(Bank(), name: "bank", durability: DurabilityOptions(checkpoint: policy(interval)))
            if life == 1 {
                try await drive(cluster, bank, messages, first: 1, model: &model)
            } else {
                let status = try await cluster.status(of: bank)
                #expect(status.state == .alive && status.restarts == 0, "a clean stop is not a crash: \(status)")
                #expect(cluster.metrics.actorsRestored == 1)
                try await drive(cluster, bank, [.audit], first: 301, model: &model)
            }
            cluster.shutdown()
        }
    }

    @Test("exactly once: a retried message is applied once and gets its first reply, also after a restart; an evicted one fails with staleRetry")
    func retries() async throws {
        let dir = try TemporaryDirectory()
        var model = Bank()
        let messages: [Bank.Message] = (1...10).map { .deposit(account: $0 % 3, amount: $0) }
        var tenth: Bank.Reply?
        let options = DurabilityOptions(checkpoint: .every(messages: 4), repliesKeptPerCaller: 4)
        try await withBank(dir.path, interval: 4, durability: options) { cluster, bank in
            try await drive(cluster, bank, messages, first: 1, model: &model)
            tenth = try await cluster.get(bank.send(messages[9], caller: CallerID(1), sequence: 10))
            #expect(tenth?.applied == 10, "the retry must not be applied again")
            #expect(cluster.metrics.duplicatesAnswered == 1)
            do {
                _ = try await cluster.get(bank.send(messages[2], caller: CallerID(1), sequence: 3))
                Issue.record("a retry whose reply was evicted must fail")
            } catch let e as RemoteError {
                #expect(e.kind == .staleRetry)
                #expect(e.message.contains("repliesKeptPerCaller"))
            }
            // Another caller's sequence numbers are its own: its message 3 is new.
            #expect(try await cluster.get(bank.send(.audit, caller: CallerID(2), sequence: 3)) == (try model.receive(.audit)))
        }
        try await withBank(dir.path, interval: 4, durability: options) { cluster, bank in
            #expect(try await cluster.get(bank.send(messages[9], caller: CallerID(1), sequence: 10)) == tenth, "the reply is kept across a restart")
            try await drive(cluster, bank, [.audit], first: 11, model: &model)
        }
    }

    @Test("a corrupt newest checkpoint is reported and an older one used with a longer replay, for intervals 1, 10, 1,000 and never",
          arguments: intervals)
    func corruptCheckpoint(interval: Int) async throws {
        var (dir, model) = try await filledBank(seed: 12, interval: interval)
        // Flip one byte in the middle of the newest checkpoint.
        let checkpoints = try DurableStore.lmdb(directory: dir.path + "/checkpoints")
        let newest = try #require(try checkpoints.checkpointSequences("bank").last)
        let key = Keys.checkpoint("bank", newest)
        var blob = try #require(try checkpoints.engine.read { try $0.get(key) })
        blob[blob.count / 2] ^= 0x40
        try checkpoints.engine.write { try $0.put(key, blob) }
        checkpoints.close()

        let log = LogLines()
        try await withBank(dir.path, interval: interval, log: log) { cluster, bank in
            #expect(cluster.metrics.checkpointsRejected >= 1)
            #expect(log.all.contains { $0.contains("checkpoint \(newest) is unusable") || $0.contains("no checkpoint verifies") }, "log: \(log.all)")
            try await drive(cluster, bank, [.audit], first: 1201, model: &model)
        }
        // The restore wrote a good checkpoint past the damage: the next start rejects nothing.
        try await withBank(dir.path, interval: interval) { cluster, bank in
            #expect(cluster.metrics.checkpointsRejected == 0)
            try await drive(cluster, bank, [.audit], first: 1202, model: &model)
        }
    }

    @Test("a torn last log record is cut and reported; the caller's retry of it then applies once, for intervals 1, 10, 1,000 and never",
          arguments: intervals)
    func tornLogRecord(interval: Int) async throws {
        var (dir, model) = try await filledBank(seed: 13, interval: interval)
        // The process crashes while writing message 1201: its record is cut short (the rest of
        // the record never reached the disk, which reads back as the segment's zeros).
        let last: Bank.Message = .deposit(account: 5, amount: 55)
        let logs = try AppendLog(directory: dir.path + "/log", segmentSize: 1 << 20)
        let seq = try logs.append(to: ActorStorage.logName("bank"), [LoggedMessage.encode(caller: 1, sequence: 1201, message: try BinaryEncoder().encode(last))])
        let (file, offset) = try #require(logs.locationForTest(ActorStorage.logName("bank"), seq))
        logs.close()
        let handle = try #require(FileHandle(forUpdatingAtPath: file))
        try handle.seek(toOffset: UInt64(offset + 12))
        try handle.write(contentsOf: [UInt8](repeating: 0, count: 40))
        try handle.close()
        try markCrashed(dir.path)

        let log = LogLines()
        try await withBank(dir.path, interval: interval, log: log) { cluster, bank in
            #expect(cluster.metrics.logRecordsDiscarded == 1)
            #expect(log.all.contains { $0.contains("last write was torn") }, "log: \(log.all)")
            #expect(try await cluster.status(of: bank).restarts == 1)
            // The caller never got a reply to 1201, so it retries: applied once, now.
            try await drive(cluster, bank, [last, .audit], first: 1201, model: &model)
        }
        try await withBank(dir.path, interval: interval) { cluster, bank in
            #expect(cluster.metrics.logRecordsDiscarded == 0)
            try await drive(cluster, bank, [.audit], first: 1203, model: &model)
        }
    }

    @Test("maxRestarts: an actor restored after more crashes than allowed is declared dead, with a terminal error that stays")
    func maxRestarts() async throws {
        let dir = try TemporaryDirectory()
        let options = DurabilityOptions(checkpoint: .every(messages: 10), maxRestarts: 1)
        try await withBank(dir.path, interval: 10, durability: options) { cluster, bank in
            _ = try await cluster.get(bank.send(.deposit(account: 0, amount: 5)))
        }
        try markCrashed(dir.path)
        try await withBank(dir.path, interval: 10, durability: options) { cluster, bank in
            let status = try await cluster.status(of: bank)
            #expect(status.restarts == 1)
        }
        try markCrashed(dir.path)
        for attempt in 0..<2 {
            do {
                try await withBank(dir.path, interval: 10, durability: options) { _, _ in }
                Issue.record("attempt \(attempt): the actor must be dead")
            } catch let e as CairnError {
                #expect(e.code == .actorDead)
                #expect(e.detail.contains("bank"), "\(e.detail)")
            }
        }
    }

    @Test("on demand: a checkpoint resolves to its log position; status reports it; the log is truncated behind the kept checkpoints")
    func onDemandCheckpoint() async throws {
        let dir = try TemporaryDirectory()
        var model = Bank()
        try await withBank(dir.path, interval: 0) { cluster, bank in
            try await drive(cluster, bank, randomMessages(100, seed: 14), first: 1, model: &model)
            #expect(try await cluster.get(cluster.checkpoint(bank)) == 100)
            try await drive(cluster, bank, randomMessages(50, seed: 15), first: 101, model: &model)
            #expect(try await cluster.get(cluster.checkpoint(bank)) == 150)
            let status = try await cluster.status(of: bank)
            #expect(status.checkpointSequence == 150 && status.logPosition == 150 && status.node == NodeID(0))
            #expect(cluster.metrics.checkpointsWritten == 3, "the initial state, then two on demand")

            let plain = try await cluster.spawn(Counter())
            do {
                _ = try await cluster.get(cluster.checkpoint(plain))
                Issue.record("an actor that is not durable has no checkpoints")
            } catch let e as RemoteError {
                #expect(e.kind == .invalidRequest)
            }
        }
        let logs = try AppendLog(directory: dir.path + "/log", segmentSize: 1 << 20)
        defer { logs.close() }
        #expect(logs.logBounds(ActorStorage.logName("bank")) == LogBounds(first: 100, next: 150),
                "with two checkpoints kept (100 and 150) the log before 100 is gone")
    }

    @Test("memory-only logging: messages are not logged, so a restart comes back at the newest checkpoint")
    func memoryOnly() async throws {
        let dir = try TemporaryDirectory()
        let options = DurabilityOptions(logging: .memoryOnly, checkpoint: .never)
        try await withBank(dir.path, interval: 0, durability: options) { cluster, bank in
            for i in 1...10 { _ = try await cluster.get(bank.send(.deposit(account: 1, amount: i))) }
            #expect(try await cluster.get(cluster.checkpoint(bank)) == 10)
            for _ in 1...5 { _ = try await cluster.get(bank.send(.deposit(account: 1, amount: 1000))) }
        }
        let logs = try AppendLog(directory: dir.path + "/log", segmentSize: 1 << 20)
        #expect(logs.logBounds(ActorStorage.logName("bank")).next == 0, "nothing was logged")
        logs.close()
        try await withBank(dir.path, interval: 0, durability: options) { cluster, bank in
            let audit = try await cluster.get(bank.send(.audit))
            #expect(audit.applied == 11 && audit.total == 55)
        }
    }

    @Test("calls from tasks on other nodes are logged and applied; spawning a hosted name again returns the same actor")
    func fromTasks() async throws {
        let dir = try TemporaryDirectory()
        try await withBank(dir.path, interval: 7) { cluster, bank in
            let again = try await cluster.spawn(Bank(), name: "bank")
            #expect(again.id == bank.id)
            let refs = try (1...40).map { try depositFromTask.remote(bank, $0) }
            let applied = try await cluster.get(refs)
            #expect(Set(applied) == Set(1...40))
            #expect(try await cluster.get(bank.send(.audit)).total == (1...40).reduce(0, +))
        }
        try await withBank(dir.path, interval: 7) { cluster, bank in
            let audit = try await cluster.get(bank.send(.audit))
            #expect(audit.total == (1...40).reduce(0, +))
        }
    }

    @Test("bad input: empty and overlong names, a name held by another actor type, and checkpoints with no record are refused with clear errors")
    func badInput() async throws {
        let dir = try TemporaryDirectory()
        try await withBank(dir.path, interval: 10) { cluster, _ in
            for name in ["", String(repeating: "x", count: 201)] {
                await #expect(throws: CairnError.self) { _ = try await cluster.spawn(Bank(), name: name) }
            }
        }
        do {
            let cluster = try await Cluster.local(ClusterOptions(nodes: [NodeConfiguration()], storage: ActorStorageOptions(location: .directory(dir.path), logSegmentBytes: 1 << 20)))
            defer { cluster.shutdown() }
            do {
                _ = try await cluster.spawn(Counter(), name: "bank")
                Issue.record("the name belongs to a Bank")
            } catch let e as CairnError {
                #expect(e.code == .invalidArgument)
                #expect(e.detail.contains("is a") && e.detail.contains("Bank"), "\(e.detail)")
            }
        }
        // Checkpoints without the actor's record: damaged storage is refused, not taken for a new actor.
        let store = try DurableStore.lmdb(directory: dir.path + "/checkpoints")
        try store.delete(ActorStorage.metaKey("bank"))
        store.close()
        do {
            try await withBank(dir.path, interval: 10) { _, _ in }
            Issue.record("checkpoints with no record must be refused")
        } catch let e as CairnError {
            #expect(e.code == .storage)
            #expect(e.detail.contains("no record"), "\(e.detail)")
        }
    }

    @Test("a 64 MiB state is checkpointed in the background while messages keep completing")
    func bigCheckpoint() async throws {
        let cluster = try await Cluster.local(ClusterOptions(nodes: [NodeConfiguration(resources: Resources(cpus: 2))],
                                                             storage: ActorStorageOptions(location: .inMemory)))
        defer { cluster.shutdown() }
        let big = try await cluster.spawn(BigState(mebibytes: 64), name: "big", durability: DurabilityOptions(checkpoint: .never))
        _ = try await cluster.get(big.send(0))
        let checkpoint = try cluster.checkpoint(big)
        var during = 0
        var i = 1
        while try await cluster.wait([checkpoint], timeout: .zero).ready.isEmpty {
            #expect(try await cluster.get(big.send(i)) == i + 1)
            during += 1
            i += 1
        }
        #expect(try await cluster.get(checkpoint) == 1)
        #expect(during > 0, "messages completed while the checkpoint was written")
        #expect(cluster.metrics.checkpointsWritten == 2)
    }
}
}
