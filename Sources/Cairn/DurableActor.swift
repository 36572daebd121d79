import CairnCodec
import CairnCore
import CairnStorage
import CairnWire
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counters of the durable-actor machinery, as ``Cluster/metrics`` reports them.
public struct RuntimeMetrics: Sendable, Equatable {
    /// Checkpoints written and fsync'd.
    public var checkpointsWritten = 0
    /// Checkpoints found corrupt or truncated during a restore and skipped for an older one.
    public var checkpointsRejected = 0
    /// Checkpoints that could not be encoded or written.
    public var checkpointFailures = 0
    /// Log records found corrupt (a torn write) during a restore, and the records after them, discarded.
    public var logRecordsDiscarded = 0
    /// Durable actors restored from storage (after a crash or a clean stop).
    public var actorsRestored = 0
    /// Logged messages applied again during restores.
    public var messagesReplayed = 0
    /// Retried messages answered from the reply cache instead of being applied again.
    public var duplicatesAnswered = 0
}

final class MetricsCounters: Sendable {
    let checkpointsWritten = Atomic<Int>(0)
    let checkpointsRejected = Atomic<Int>(0)
    let checkpointFailures = Atomic<Int>(0)
    let logRecordsDiscarded = Atomic<Int>(0)
    let actorsRestored = Atomic<Int>(0)
    let messagesReplayed = Atomic<Int>(0)
    let duplicatesAnswered = Atomic<Int>(0)

    var snapshot: RuntimeMetrics {
        RuntimeMetrics(checkpointsWritten: checkpointsWritten.load(ordering: .relaxed),
                       checkpointsRejected: checkpointsRejected.load(ordering: .relaxed),
                       checkpointFailures: checkpointFailures.load(ordering: .relaxed),
                       logRecordsDiscarded: logRecordsDiscarded.load(ordering: .relaxed),
                       actorsRestored: actorsRestored.load(ordering: .relaxed),
                       messagesReplayed: messagesReplayed.load(ordering: .relaxed),
                       duplicatesAnswered: duplicatesAnswered.load(ordering: .relaxed))
    }
}

/// Where durable actors' messages are logged: an ``AppendLog`` on disk (one fdatasync per
/// group commit), or a ``DurableStore`` log (in memory, for tests).
protocol ActorLog: Sendable {
    /// Appends durably; `completion` gets the first entry's sequence number, on a thread that must not block.
    func append(to log: String, _ payloads: [[UInt8]], completion: @escaping @Sendable (Result<UInt64, StorageError>) -> Void)
    func readLog(_ log: String, from: UInt64, upTo: UInt64, limit: Int) throws -> [LogEntry]
    func logBounds(_ log: String) throws -> LogBounds
    func truncateLog(_ log: String, before sequence: UInt64) throws
    /// Makes the next sequence number at least `next` (the owner's checkpoint knows where the log stood).
    func reserve(_ log: String, next: UInt64)
    func close()
}

extension AppendLog: ActorLog {}

extension DurableStore: ActorLog {
    func append(to log: String, _ payloads: [[UInt8]], completion: @escaping @Sendable (Result<UInt64, StorageError>) -> Void) {
        var batch = WriteBatch()
        batch.append(to: log, payloads)
        commit(batch) { completion($0.map { $0.firstSequences[0] }) }
    }

    /// A store keeps each log's next sequence number itself.
    func reserve(_ log: String, next: UInt64) {}
}

/// The logs and checkpoints of a cluster's durable actors, opened on the first durable spawn.
///
/// On disk, messages go to an ``AppendLog`` under `log/` and checkpoints (and each actor's
/// record) to an LMDB environment under `checkpoints/`: two sets of files, so that writing a
/// large checkpoint never holds up the group commits that make messages durable.
final class ActorStorage: Sendable {
    let logs: any ActorLog
    let checkpoints: DurableStore
    let writer: BackgroundWriter
    let location: ActorStorageOptions.Location
    /// Durable actors hosted in this cluster, by name.
    let hosted = Mutex<[String: ActorID]>([:])

    /// Held while this process hosts the actor whose directory this is (a cluster of processes).
    private let hostLock: HostLock?
    /// Where replicated storage lives.
    private let replicatedMap: (any ReplicatedMap)?

    init(_ options: ActorStorageOptions, hostLock: HostLock? = nil, replicated: (any ReplicatedMap)? = nil) throws {
        location = options.location
        self.hostLock = hostLock
        replicatedMap = replicated
        let checkpointOptions = StoreOptions(syncMode: .eachCommit, checkpointsKept: options.checkpointsKept)
        switch options.location {
        case .inMemory:
            logs = DurableStore.inMemory(options: StoreOptions(syncMode: .group))
            checkpoints = .inMemory(options: checkpointOptions)
        case .replicated:
            guard let replicated else { preconditionFailure("replicated actor storage is opened with its map") }
            do {
                // One engine, two stores: messages group-committed, checkpoints one commit each.
                let engine = try ReplicatedEngine(map: replicated)
                logs = DurableStore(engine: engine, options: StoreOptions(syncMode: .group))
                checkpoints = DurableStore(engine: engine, options: checkpointOptions)
            } catch {
                throw CairnError(.storage, "cannot open durable actor storage: \(error)")
            }
        case .directory(let path):
            do {
                try FileManager.default.createDirectory(atPath: path + "/checkpoints", withIntermediateDirectories: true)
                checkpoints = try .lmdb(directory: path + "/checkpoints", options: checkpointOptions)
                logs = try AppendLog(directory: path + "/log", segmentSize: options.logSegmentBytes)
            } catch {
                throw CairnError(.storage, "cannot open durable actor storage in \(path): \(error); check that the directory is writable, or pass another with ClusterOptions.storage")
            }
        }
        writer = BackgroundWriter()
    }

    /// Finishes queued checkpoints and commits, then closes both stores.
    func close() {
        writer.stop()
        logs.close()
        checkpoints.close()
        hostLock?.release()
    }

    static func logName(_ name: String) -> String { "actor/" + name }
    static func metaKey(_ name: String) -> [UInt8] { Array(("actor-meta/" + name).utf8) }

    func meta(_ name: String) throws -> DurableActorMeta? {
        try checkpoints.get(Self.metaKey(name)).map { try BinaryDecoder().decode(DurableActorMeta.self, from: $0) }
    }

    func putMeta(_ name: String, _ meta: DurableActorMeta) throws {
        try checkpoints.put(Self.metaKey(name), try BinaryEncoder().encode(meta))
    }

    var locationDescription: String {
        switch location {
        case .inMemory: return "memory"
        case .directory(let d): return d
        case .replicated: return replicatedMap?.description ?? "the GCS"
        }
    }
}

/// Opens the cluster's actor storage on first use, so clusters without durable actors touch no disk.
///
/// In an embedded cluster every durable actor shares one storage (one message log, one
/// checkpoint environment). In a cluster of processes (`perActor`) each durable actor has a
/// directory of its own under `actors/` in the storage directory, held with an exclusive
/// `flock` by the one process hosting it: when that node dies, the node the control store
/// picks to restore the actor opens the same directory, once the kernel has released the dead
/// process's lock.
final class LazyActorStorage: Sendable {
    let options: ActorStorageOptions
    let metrics = MetricsCounters()
    let log: @Sendable (String) -> Void
    let perActor: Bool
    private let shared = Mutex<ActorStorage?>(nil)
    private let byActor = Mutex<[String: ActorStorage]>([:])
    private let closed = Atomic<Bool>(false)
    private let replicatedOpens = Mutex<Void>(())
    /// How long a process waits for another's lock on an actor's directory before giving up.
    static let hostLockTimeout = Duration.seconds(10)

    init(options: ActorStorageOptions, perActor: Bool = false, log: @escaping @Sendable (String) -> Void) {
        self.options = options
        self.perActor = perActor
        self.log = log
    }

    /// The storage of the durable actor `name`: the shared one, or (per actor) its own, opened
    /// and locked on first use. Blocks while another process holds the actor's lock (up to
    /// ``hostLockTimeout``), so it runs on the restoring thread.
    /// With ``ActorStorageOptions/Location/replicated`` storage, `remote` gives the GCS
    /// namespace's map, and opening claims it (so another node's copy can no longer write).
    func get(for name: String, remote: (String) -> any ReplicatedMap) throws -> ActorStorage {
        if closed.load(ordering: .relaxed) { throw CairnError(.shutDown, "the cluster was shut down") }
        if options.location == .replicated {
            // One open at a time, so that two spawns of one name never both claim it.
            return try replicatedOpens.withLock { _ in
                if let s = byActor.withLock({ $0[name] }) { return s }
                let opened = try open(options, replicated: remote("actor-" + Self.directoryName(name)))
                return try keep(opened, name)
            }
        }
        guard perActor else {
            return try shared.withLock { s in
                // Checked under the lock that `close` takes, so nothing opens after it.
                if closed.load(ordering: .relaxed) { throw CairnError(.shutDown, "the cluster was shut down") }
                if let s { return s }
                let opened = try open(options)
                s = opened
                return opened
            }
        }
        if let s = byActor.withLock({ $0[name] }) { return s }
        guard case .directory(let root) = options.location else {
            throw CairnError(.storage, "durable actor \"\(name)\": in a cluster of processes durable actors need ActorStorageOptions(location: .directory(…)), a directory every node process can reach (a node restores the actors of a dead node from it), or location: .replicated (in the GCS); the storage is in memory")
        }
        let directory = root + "/actors/" + Self.directoryName(name)
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw CairnError(.storage, "cannot make the directory of durable actor \"\(name)\" in \(root): \(error); check that it is writable")
        }
        let lock = try HostLock.acquire(directory + "/host.lock", what: "durable actor \"\(name)\"", timeout: Self.hostLockTimeout)
        var own = options
        own.location = .directory(directory)
        let opened: ActorStorage
        do {
            opened = try open(own, hostLock: lock)
        } catch {
            lock.release()
            throw error
        }
        return try keep(opened, name)
    }

    /// Records `opened` as `name`'s storage, unless another thread got there first.
    private func keep(_ opened: ActorStorage, _ name: String) throws -> ActorStorage {
        let raced: ActorStorage? = byActor.withLock { table in
            if let earlier = table[name] { return earlier }
            table[name] = opened
            return nil
        }
        if let raced {
            opened.close()
            return raced
        }
        if closed.load(ordering: .relaxed) {
            byActor.withLock { _ = $0.removeValue(forKey: name) }
            opened.close()
            throw CairnError(.shutDown, "the cluster was shut down")
        }
        return opened
    }

    private func open(_ options: ActorStorageOptions, hostLock: HostLock? = nil, replicated: (any ReplicatedMap)? = nil) throws -> ActorStorage {
        let opened = try ActorStorage(options, hostLock: hostLock, replicated: replicated)
        if let log = opened.logs as? AppendLog, log.recovery.tornBytes > 0 {
            // The last write before a crash was cut short: never fsync'd, so never acknowledged.
            metrics.logRecordsDiscarded.add(1, ordering: .relaxed)
            self.log("the actor message log in \(opened.locationDescription)'s last write was torn by a crash: \(log.recovery.tornBytes) bytes of unacknowledged records were cut")
        }
        return opened
    }

    /// An actor's directory: the name's safe characters (for people reading the directory),
    /// then a hash of the whole name (so that two names never share one).
    static func directoryName(_ name: String) -> String {
        let safe = String(name.unicodeScalars.prefix(40).map { s -> Character in
            s.isASCII && (CharacterSet.alphanumerics.contains(s) || s == "-" || s == "_" || s == ".") ? Character(s) : "_"
        })
        return safe + "-" + Hex.encode(Array(SHA256.hash(Array(name.utf8)).prefix(8)))
    }

    /// Marks every hosted actor as stopped cleanly (so the next start is not counted as a restart) and closes.
    func close() {
        closed.store(true, ordering: .relaxed)
        var all = byActor.withLock { t in
            let taken = Array(t.values)
            t = [:]
            return taken
        }
        if let s = shared.withLock({ s in
            let taken = s
            s = nil
            return taken
        }) { all.append(s) }
        for s in all {
            s.writer.drain()
            for name in s.hosted.withLock({ Array($0.keys) }) {
                if var meta = try? s.meta(name), !meta.dead {
                    meta.running = false
                    try? s.putMeta(name, meta)
                }
            }
            s.close()
        }
    }
}

/// An exclusive `flock` on a file: held by the one process that hosts a durable actor, and
/// released by the kernel when that process dies, however it dies.
final class HostLock: Sendable {
    private let fd: Atomic<Int32>

    private init(fd: Int32) { self.fd = Atomic(fd) }

    /// Takes the lock, waiting while another process holds it, for up to `timeout`.
    static func acquire(_ path: String, what: String, timeout: Duration) throws -> HostLock {
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw CairnError(.storage, "cannot open \(path), the lock of \(what): errno \(errno); check that the directory is writable")
        }
        let deadline = ContinuousClock.now + timeout
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            guard e == EWOULDBLOCK || e == EINTR, ContinuousClock.now < deadline else {
                Glibc.close(fd)
                throw CairnError(.storage, e == EWOULDBLOCK
                    ? "\(what) is held by another process (its lock \(path) stayed taken for \(timeout)): it is hosted elsewhere; use its existing handle"
                    : "cannot lock \(path) for \(what): errno \(e)")
            }
            usleep(1_000)
        }
        return HostLock(fd: fd)
    }

    func release() {
        let fd = fd.exchange(-1, ordering: .relaxed)
        if fd >= 0 { Glibc.close(fd) }
    }

    deinit { release() }
}

/// One thread that encodes, compresses and writes checkpoints, behind the actors' backs.
///
/// It runs at a lower priority (nice 10) than the workers, so that on a busy machine the
/// scheduler lets a worker preempt it at once: the actor keeps answering while its copy is written.
final class BackgroundWriter: @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [() -> Void] = []
    private var stopping = false
    private var busy = false
    private var finished = false

    init() {
        startThread(named: "cairn-ckpt") { [self] in run() }
    }

    func enqueue(_ job: @escaping () -> Void) {
        condition.lock()
        jobs.append(job)
        condition.broadcast()
        condition.unlock()
    }

    /// Waits until every queued job has run.
    func drain() {
        condition.lock()
        while (!jobs.isEmpty || busy) && !finished { condition.wait() }
        condition.unlock()
    }

    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        while !finished { condition.wait() }
        condition.unlock()
    }

    private func run() {
        // On Linux the nice value is per thread, and `who == 0` means the calling thread.
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
        condition.lock()
        while true {
            while jobs.isEmpty && !stopping { condition.wait() }
            if jobs.isEmpty && stopping { break }
            let job = jobs.removeFirst()
            busy = true
            condition.unlock()
            job()
            condition.lock()
            busy = false
            condition.broadcast()
        }
        finished = true
        condition.broadcast()
        condition.unlock()
    }
}

/// What a node needs to spawn a durable actor.
struct DurableSpawn: Sendable {
    let name: String
    let options: DurabilityOptions
    /// Set when the control store restores the actor on another node after its node died:
    /// there is no initial state, so the storage must hold the actor.
    var restoreOnly = false
}

/// The durable side of one hosted actor: its log stage, its exactly-once table, its checkpoints.
///
/// Messages pass through three steps. **Stage**: calls wait in `stage` while the previous
/// batch is being committed; then everything waiting is appended to the actor's log in one
/// write, which the store's group committer joins with other writers into one fsync'd commit.
/// **Run**: once durable, the batch goes to the mailbox, where a worker applies each message
/// unless the caller table says it was applied before. **Checkpoint**: between two messages the
/// worker copies the state (copy-on-write, O(1)) and the caller table, and the background
/// writer encodes, compresses and writes the copy while the actor keeps running.
///
/// Thread safety (why `@unchecked Sendable` is sound): `stage` is a mutex; the fields marked
/// "run side" are touched only by the worker that owns the actor's mailbox (one at a time, the
/// mailbox's `scheduled` flag guarantees it) or by recovery before the actor is visible.
final class DurableActor: @unchecked Sendable {
    let name: String
    let options: DurabilityOptions
    let storage: ActorStorage
    let metrics: MetricsCounters
    let log: @Sendable (String) -> Void
    let logName: String
    unowned let node: Node
    weak var instance: ActorInstance?

    private struct Stage {
        var pending: [ActorCall] = []
        var committing = false
    }
    private let stage = Mutex(Stage())

    // Run side.
    var table: CallerTable
    /// Messages applied in the actor's whole life.
    var applied: UInt64 = 0
    /// The log position after the last message applied: a checkpoint taken now covers the log before it.
    var position: UInt64 = 0
    private var sinceCheckpoint = 0
    /// When the last checkpoint was taken; atomic because housekeeping reads it for time-based checkpoints.
    private let lastCheckpoint = Atomic<UInt64>(monotonicNanoseconds())
    private let idleRequested = Atomic<Bool>(false)

    /// Readable from any thread: for status reports.
    let reportedPosition = Atomic<UInt64>(0)
    let newestCheckpoint = Atomic<UInt64>(UInt64.max)
    private let checkpointBusy = Atomic<Bool>(false)

    init(name: String, options: DurabilityOptions, node: Node, storage: ActorStorage, metrics: MetricsCounters, log: @escaping @Sendable (String) -> Void) {
        self.name = name
        self.node = node
        self.options = options
        self.storage = storage
        self.metrics = metrics
        self.log = log
        self.logName = ActorStorage.logName(name)
        self.table = CallerTable(keep: options.repliesKeptPerCaller)
    }

    // MARK: stage

    /// Takes a call for this actor (its message already encoded); it runs once it is durable.
    /// The log record is built here, on the sender's thread, so that the thread completing
    /// commits only gathers records.
    func submit(_ call: ActorCall) {
        guard options.logging == .durable else {
            post([call])
            return
        }
        var call = call
        if !call.isCheckpointRequest {
            guard let bytes = try? call.message.wireBytes() else {
                node.complete(call.result, .failed(RemoteError(kind: .storageFailed, task: call.result, function: "\(call.typeName).receive", node: node.id,
                                                               message: "the message to durable actor \"\(name)\" could not be encoded for its log")))
                return
            }
            call.logged = LoggedMessage.encode(caller: call.caller, sequence: call.callerSequence, message: bytes)
        }
        let batch: [ActorCall]? = stage.withLock { s in
            s.pending.append(call)
            if s.committing { return nil }
            s.committing = true
            let all = s.pending
            s.pending = []
            return all
        }
        if let batch { commit(batch) }
    }

    private func commit(_ calls: [ActorCall]) {
        var payloads: [[UInt8]] = []
        payloads.reserveCapacity(calls.count)
        for call in calls { if let logged = call.logged { payloads.append(logged) } }
        if payloads.isEmpty {
            finish(calls, .success(0))
            return
        }
        storage.logs.append(to: logName, payloads) { [self] result in
            finish(calls, result)
        }
    }

    /// The batch is durable (or failed): hand it to the mailbox, then commit what gathered meanwhile.
    private func finish(_ calls: [ActorCall], _ result: Result<UInt64, StorageError>) {
        switch result {
        case .success(var seq):
            var durable = calls
            for i in durable.indices where !durable[i].isCheckpointRequest {
                durable[i].logSequence = seq
                durable[i].logged = nil
                seq += 1
            }
            post(durable)
        case .failure(let error):
            for call in calls {
                let e = RemoteError(kind: .storageFailed, task: call.result, function: "\(call.typeName).receive", node: node.id,
                                    message: "the message to durable actor \"\(name)\" could not be logged, so it did not run: \(error)")
                node.complete(call.result, .failed(e))
            }
        }
        let next: [ActorCall]? = stage.withLock { s in
            if s.pending.isEmpty {
                s.committing = false
                return nil
            }
            let all = s.pending
            s.pending = []
            return all
        }
        if let next { commit(next) }
    }

    private func post(_ calls: [ActorCall]) {
        guard let instance else { return }
        if instance.post(calls) { node.schedule(instance) }
    }

    // MARK: run side

    /// Runs a drained batch of the mailbox; called by the worker that owns it.
    func run(_ calls: [ActorCall], box: AnyActorBox, typeName: String, nodeID: NodeID, into results: inout [(ObjectID, StoredValue)]) {
        for call in calls {
            if call.isCheckpointRequest {
                checkpoint(box: box, reply: call.result)
                continue
            }
            let value: StoredValue
            switch table.decide(caller: call.caller, sequence: call.callerSequence) {
            case .apply:
                value = Self.apply(call.message, box: box, task: call.result, function: "\(typeName).receive", node: nodeID)
                table.record(caller: call.caller, sequence: call.callerSequence, reply: value)
                applied += 1
            case .duplicate(let reply):
                metrics.duplicatesAnswered.add(1, ordering: .relaxed)
                value = reply
            case .stale(let last, let oldest):
                value = .failed(RemoteError(kind: .staleRetry, task: call.result, function: "\(typeName).receive", node: nodeID,
                                            message: "message \(call.callerSequence) of caller \(call.caller) was applied before (the caller's last is \(last)) and its reply is no longer kept (oldest kept: \(oldest.map(String.init) ?? "none")); raise repliesKeptPerCaller or retry sooner"))
            }
            if let s = call.logSequence { position = s + 1 } else if options.logging == .memoryOnly { position = applied }
            sinceCheckpoint += 1
            results.append((call.result, value))
        }
        reportedPosition.store(position, ordering: .relaxed)
        if options.checkpoint.isDue(messagesSince: sinceCheckpoint, nanosecondsSince: monotonicNanoseconds() - lastCheckpoint.load(ordering: .relaxed)),
           !checkpointBusy.load(ordering: .acquiring) {
            checkpoint(box: box, reply: nil)
        }
    }

    static func apply(_ message: StoredValue, box: AnyActorBox, task: ObjectID, function: String, node: NodeID) -> StoredValue {
        do {
            return .boxed(try box.handle(message))
        } catch let error as RemoteError {
            return .failed(RemoteError(kind: .upstreamFailed, task: task, function: function, node: node, message: error.root.message, cause: error))
        } catch {
            return .failed(RemoteError(kind: .threw, task: task, function: function, node: node, message: "\(error)"))
        }
    }

    /// Whether a time-based checkpoint is due while the actor is idle (asked by housekeeping):
    /// messages ran since the newest checkpoint, and the interval has passed.
    var idleCheckpointDue: Bool {
        guard let ms = options.checkpoint.milliseconds, !checkpointBusy.load(ordering: .relaxed), !idleRequested.load(ordering: .relaxed) else { return false }
        return reportedPosition.load(ordering: .relaxed) != newestCheckpoint.load(ordering: .relaxed)
            && monotonicNanoseconds() - lastCheckpoint.load(ordering: .relaxed) >= UInt64(ms) * 1_000_000
    }

    func markIdleCheckpointRequested() { idleRequested.store(true, ordering: .relaxed) }

    /// Copies the state between two messages and has the background writer store it.
    private func checkpoint(box: AnyActorBox, reply: ObjectID?) {
        let encodeState = box.snapshot()
        let tableCopy = table
        let sequence = position
        let appliedCopy = applied
        sinceCheckpoint = 0
        lastCheckpoint.store(monotonicNanoseconds(), ordering: .relaxed)
        idleRequested.store(false, ordering: .relaxed)
        checkpointBusy.store(true, ordering: .releasing)
        storage.writer.enqueue { [self] in
            let result = Result<UInt64, Error> {
                try write(DurableCheckpoint(version: DurableCheckpoint.formatVersion, state: try encodeState(),
                                            callers: try tableCopy.snapshot(), applied: appliedCopy), at: sequence)
                return sequence
            }
            checkpointBusy.store(false, ordering: .releasing)
            if case .failure(let error) = result {
                metrics.checkpointFailures.add(1, ordering: .relaxed)
                log("durable actor \"\(name)\": checkpoint at \(sequence) failed: \(error); the log is kept, so nothing is lost")
            }
            if let reply {
                node.complete(reply, result.map { .boxed($0) as StoredValue }.mapErrorValue { error in
                    .failed(RemoteError(kind: .storageFailed, task: reply, function: "checkpoint", node: node.id, message: "\(error)"))
                })
            }
        }
    }

    /// Writes a checkpoint durably, then truncates the log before the oldest checkpoint kept
    /// (so that falling back past a corrupt newest checkpoint still finds its log).
    func write(_ checkpoint: DurableCheckpoint, at sequence: UInt64) throws {
        // In parts, so that the log's fsyncs (and the kernel's work) never queue behind the whole checkpoint.
        _ = try BinaryEncoder().withEncoded(checkpoint) {
            try storage.checkpoints.writeCheckpoint(name, sequence: sequence, payload: $0, partSize: Self.checkpointPartSize)
        }
        metrics.checkpointsWritten.add(1, ordering: .relaxed)
        newestCheckpoint.store(sequence, ordering: .relaxed)
        if options.logging == .durable, let oldest = try storage.checkpoints.checkpointSequences(name).first, oldest > 0 {
            try storage.logs.truncateLog(logName, before: oldest)
        }
        node.reportActorProgress(self)
    }

    /// Large checkpoints are written in parts of this size, each its own durable commit.
    static let checkpointPartSize = 256 << 10

    // MARK: recovery

    /// Creates the actor's storage on first spawn, or restores it: newest valid checkpoint, then
    /// the log after it, in order. Runs before the actor accepts any message. Returns the state,
    /// the durable side, and how many times the actor has been restored after a crash.
    static func open(spawn: DurableSpawn, typeName: String, type: ErasedActorType, initial: StoredValue, node: Node,
                     storage: ActorStorage, metrics: MetricsCounters, log: @escaping @Sendable (String) -> Void) throws -> (AnyActorBox, DurableActor, restarts: Int) {
        let name = spawn.name
        let d = DurableActor(name: name, options: spawn.options, node: node, storage: storage, metrics: metrics, log: log)
        do {
            guard var meta = try storage.meta(name) else {
                if spawn.restoreOnly {
                    throw CairnError(.storage, "durable actor \"\(name)\" has no record in \(storage.locationDescription): its node died before its first checkpoint was written, so there is nothing to restore on \(node.id); spawn it again")
                }
                // A new actor: its initial state is checkpoint zero, so a log replay always has a base.
                let stale = try storage.checkpoints.checkpointSequences(name)
                guard stale.isEmpty else {
                    throw CairnError(.storage, "\(storage.locationDescription) holds checkpoints \(stale) of durable actor \"\(name)\" but no record of it: the storage is damaged or from an incompatible version; move it aside or use another name")
                }
                let box = try type.make(initial)
                let start = try storage.logs.logBounds(d.logName).next
                d.position = start
                try d.write(DurableCheckpoint(version: DurableCheckpoint.formatVersion, state: try box.snapshot()(), callers: [], applied: 0), at: start)
                try storage.putMeta(name, DurableActorMeta(typeName: typeName, restarts: 0, running: true, dead: false))
                return (box, d, 0)
            }
            guard meta.typeName == typeName else {
                throw CairnError(.invalidArgument, "durable actor \"\(name)\" in \(storage.locationDescription) is a \(meta.typeName), not a \(typeName); use another name")
            }
            if meta.dead {
                throw CairnError(.actorDead, "durable actor \"\(name)\" was declared dead after \(meta.restarts) restarts; its log and checkpoints are kept in \(storage.locationDescription)")
            }
            let restarts = meta.restarts + (meta.running ? 1 : 0)
            if restarts > spawn.options.maxRestarts {
                meta.dead = true
                meta.restarts = restarts
                try storage.putMeta(name, meta)
                throw CairnError(.actorDead, "durable actor \"\(name)\" crashed \(restarts) times, more than maxRestarts (\(spawn.options.maxRestarts)); it is now marked dead; its log and checkpoints are kept in \(storage.locationDescription)")
            }
            var box: AnyActorBox
            var base: UInt64
            var rejected = 0
            do {
                guard let read = try storage.checkpoints.newestCheckpoint(name) else {
                    throw CairnError(.storage, "durable actor \"\(name)\" has a record but no checkpoint in \(storage.locationDescription); the store is damaged")
                }
                for (seq, error) in read.rejected {
                    log("durable actor \"\(name)\": checkpoint \(seq) is unusable (\(error)); falling back to checkpoint \(read.sequence) and a longer replay")
                }
                rejected = read.rejected.count
                let checkpoint = try BinaryDecoder().decode(DurableCheckpoint.self, from: read.payload)
                guard checkpoint.version == DurableCheckpoint.formatVersion else {
                    throw CairnError(.storage, "durable actor \"\(name)\": checkpoint \(read.sequence) has format version \(checkpoint.version); this build reads \(DurableCheckpoint.formatVersion)")
                }
                box = try type.make(.encoded(checkpoint.state))
                d.table = try CallerTable(keep: spawn.options.repliesKeptPerCaller, snapshot: checkpoint.callers)
                d.applied = checkpoint.applied
                base = read.sequence
            } catch let error as StorageError where error.code == .noValidCheckpoint {
                // Every checkpoint is damaged. If the log still starts at 0 it holds the actor's
                // whole life, so the initial state given to spawn plus a full replay rebuilds it.
                let bounds = try storage.logs.logBounds(d.logName)
                rejected = try storage.checkpoints.checkpointSequences(name).count
                guard bounds.first == 0, spawn.options.logging == .durable else {
                    throw CairnError(.storage, "durable actor \"\(name)\": \(error.detail); the log starts at \(bounds.first), so the state before it is gone")
                }
                guard !spawn.restoreOnly else {
                    throw CairnError(.storage, "durable actor \"\(name)\": \(error.detail); rebuilding it needs its initial state, which only its spawner has: spawn it again with that state")
                }
                log("durable actor \"\(name)\": no checkpoint verifies (\(error.detail)); rebuilding it from the initial state and the whole log (\(bounds.next) records)")
                box = try type.make(initial)
                d.table = CallerTable(keep: spawn.options.repliesKeptPerCaller)
                d.applied = 0
                base = 0
            }
            metrics.checkpointsRejected.add(rejected, ordering: .relaxed)
            d.position = base
            let (replayed, discarded) = try d.replay(box: box, typeName: typeName)
            metrics.actorsRestored.add(1, ordering: .relaxed)
            metrics.messagesReplayed.add(replayed, ordering: .relaxed)
            d.sinceCheckpoint = 0
            if discarded > 0 || rejected > 0 {
                // Start the next life from a good checkpoint past the damage.
                try d.write(DurableCheckpoint(version: DurableCheckpoint.formatVersion, state: try box.snapshot()(),
                                              callers: try d.table.snapshot(), applied: d.applied), at: d.position)
            } else {
                d.newestCheckpoint.store(base, ordering: .relaxed)
            }
            meta.running = true
            meta.restarts = restarts
            try storage.putMeta(name, meta)
            storage.logs.reserve(d.logName, next: d.position)
            d.reportedPosition.store(d.position, ordering: .relaxed)
            return (box, d, restarts)
        } catch let error as CairnError {
            throw error
        } catch {
            throw CairnError(.storage, "durable actor \"\(name)\" could not be restored from \(storage.locationDescription): \(error)")
        }
    }

    /// Applies the logged messages after `position`, in pages. A corrupt record (a torn write)
    /// ends the replay: it and every record after it are discarded and reported.
    private func replay(box: AnyActorBox, typeName: String) throws -> (replayed: Int, discarded: Int) {
        let bounds = try storage.logs.logBounds(logName)
        guard bounds.first <= position || bounds.first == bounds.next else {
            throw CairnError(.storage, "durable actor \"\(name)\": the log starts at \(bounds.first) but the newest usable checkpoint needs it from \(position); the records between are gone")
        }
        var replayed = 0
        var from = position
        let function = "\(typeName).receive"
        while from < bounds.next {
            var entries: [LogEntry]
            var corruptAt: UInt64?
            do {
                entries = try storage.logs.readLog(logName, from: from, upTo: .max, limit: 65_536)
            } catch let error as StorageError where error.code == .corruptRecord && error.sequence != nil {
                corruptAt = error.sequence!
                entries = try storage.logs.readLog(logName, from: from, upTo: error.sequence!, limit: 65_536)
                if entries.count == 65_536 { corruptAt = nil }
            }
            for entry in entries {
                let (caller, seq, message) = try LoggedMessage.decode(entry.payload)
                if case .apply = table.decide(caller: caller, sequence: seq) {
                    let reply = Self.apply(.encoded(message), box: box, task: ObjectID(raw: 0), function: function, node: node.id)
                    table.record(caller: caller, sequence: seq, reply: reply)
                    applied += 1
                }
                replayed += 1
                position = entry.sequence + 1
            }
            if let corruptAt {
                let discarded = Int(bounds.next - corruptAt)
                metrics.logRecordsDiscarded.add(discarded, ordering: .relaxed)
                log("durable actor \"\(name)\": log record \(corruptAt) is corrupt (a torn write); it and the \(discarded - 1) records after it are discarded, and the actor continues from the \(replayed) records before it")
                position = bounds.next
                return (replayed, discarded)
            }
            guard let last = entries.last else { break }
            from = last.sequence + 1
        }
        position = max(position, bounds.next)
        return (replayed, 0)
    }
}

extension Result {
    /// The success value, or the failure mapped to a value.
    fileprivate func mapErrorValue(_ f: (Failure) -> Success) -> Success {
        switch self {
        case .success(let v): return v
        case .failure(let e): return f(e)
        }
    }
}
