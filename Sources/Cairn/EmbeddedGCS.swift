import CairnCodec
import CairnCore
import CairnGCS
import CairnStorage
import Foundation

/// An error from the GCS.
public struct GCSError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable, Equatable {
        /// The key is empty or longer than ``EmbeddedGCS/maxKeyBytes``.
        case invalidKey
        /// The value is larger than ``EmbeddedGCS/maxValueBytes``.
        case valueTooLarge
        /// No chain answered within the request timeout (every replica of the shard down, say).
        case unavailable
        /// A replica's or the coordinator's storage could not be opened, read or written.
        case storage
        /// The GCS was shut down.
        case shutDown
        /// A replica ID that this GCS does not have.
        case unknownReplica
        /// What was asked needs the GCS started otherwise (replicas join only when each runs
        /// in a process of its own).
        case unsupported
        /// The options contradict each other; the detail says which and how to fix them.
        case invalidOptions
    }

    public let code: Code
    public let detail: String
    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }
    public var description: String { "GCSError.\(code.rawValue): \(detail)" }
}

/// The tables of the GCS: one key space, split by prefix. Keys hash to shards whole, so a
/// table's rows spread over every shard.
public enum GCSTable: String, Sendable, CaseIterable {
    case objects = "obj/"
    case tasks = "task/"
    case functions = "fn/"
    case actors = "actor/"
    case nodes = "node/"
    case keyValue = "kv/"
    /// The runtime control store's own bookkeeping (its catch-up markers).
    case controlStore = "ctl/"
    /// Replicated storage (``ReplicatedEngine`` journals), one namespace per store.
    case storage = "store/"

    public func key(_ name: String) -> String { rawValue + name }
}

/// The GCS running embedded in one process: every replica, the coordinator and the client
/// sessions on their own threads, each replica persisting its log and configuration in its own
/// LMDB environment, the same cores as the simulation (`CairnGCS`) driven by real time. A
/// replica compacts: updates that reached the tail, beyond the newest few, are folded into a
/// base (one LMDB record per key, `b/<key>`, and a `base` record) and their records deleted,
/// so memory and disk hold the state, not the history (``Options/compactEvery``).
///
/// Each component drains its inbox in batches; everything the batch asked to persist is one
/// fsync'd LMDB commit, made before any message the batch produced is sent. ``kill(replica:)``
/// stops a replica as a SIGKILL would (its memory is gone; its LMDB stays), and tells the
/// coordinator at once, as a supervisor that saw the process exit would; messages to a dead
/// replica are refused, as a closed connection would be. ``restart(replica:)`` brings it back
/// from its LMDB; the coordinator adds it back as a learner when its chain is short.
public final class EmbeddedGCS: @unchecked Sendable {
    public static let maxKeyBytes = 1_024
    public static let maxValueBytes = 1 << 20

    public struct Options: Sendable {
        public var shards = 1
        public var replicationFactor = 3
        /// Replicas per shard beyond the chain, ready to replace a failed one.
        public var standbysPerShard = 1
        /// Where each replica keeps its LMDB environment; nil: a new temporary directory,
        /// removed at shutdown.
        public var directory: String?
        public var tickIntervalMicroseconds: UInt64 = 1_000
        /// How often each replica reports to the coordinator (its heartbeat, which renews the
        /// tail's lease), and how often a component with nothing in flight is ticked. Must be
        /// under the lease and the failure timeout.
        public var reportIntervalMicroseconds: UInt64 = 10_000
        /// A replica silent this long has failed (a replica known to have exited fails at once).
        public var failureTimeoutMicroseconds: UInt64 = 300_000
        /// How long a tail may serve after the report that earned its lease. As long as the
        /// failure timeout by default: a silent tail is removed only once both have run out, so
        /// a longer lease would delay failover, while a shorter one only makes a tail whose
        /// commits a loaded disk slows lose its lease, and stall every write, for nothing.
        public var leaseMicroseconds: UInt64 = 300_000
        /// How long after a chain loses a replica a standby joins it as a learner
        /// (``Coordinator/Options/learnerDelay``). The new tail's step for a learner (a snapshot
        /// and the first updates) would otherwise run before the writes the failover held up.
        public var learnerDelayMicroseconds: UInt64 = 20_000
        public var resendIntervalMicroseconds: UInt64 = 10_000
        /// How long a subscriber waits, hearing nothing from a shard, before it subscribes
        /// there again in case its subscription was lost. (A subscriber moves to a new tail as
        /// soon as the configuration changes; this is for a subscription lost otherwise.)
        public var resubscribeIntervalMicroseconds: UInt64 = 100_000
        /// How often a replica resends updates its successor has not acknowledged.
        public var retransmitIntervalMicroseconds: UInt64 = 5_000
        /// Compaction: once this many committed updates are in a replica's log beyond the
        /// `compactionRetain` newest, they are folded into its store (in memory and in its
        /// LMDB), so a replica holds the state, not every write ever made. 0: never.
        public var compactEvery: UInt64 = 4_000
        /// Updates a replica keeps after compacting, so that a subscriber a little behind
        /// resumes from the log rather than from a snapshot.
        public var compactionRetain: UInt64 = 1_000
        /// Client sessions, so the most requests in flight at once.
        public var sessions = 256
        /// A request not answered by then fails with ``GCSError/Code-swift.enum/unavailable``.
        public var requestTimeoutMicroseconds: UInt64 = 10_000_000
        /// Run each replica in a process of its own (the coordinator and the client sessions
        /// stay in this one); nil: on threads of this process.
        public var replicaProcesses: ReplicaProcesses?

        public init(shards: Int = 1) { self.shards = shards }

        /// What each replica's core is given.
        var replica: ChainReplica.Options {
            ChainReplica.Options(leaseDuration: leaseMicroseconds, retransmitInterval: retransmitIntervalMicroseconds,
                                 reportInterval: reportIntervalMicroseconds, compactEvery: compactEvery, retain: compactionRetain)
        }

        /// Throws ``GCSError/Code-swift.enum/invalidOptions`` for options that cannot work.
        func validate() throws {
            guard shards >= 1, replicationFactor >= 1, standbysPerShard >= 0, sessions >= 1 else {
                throw GCSError(.invalidOptions, "an embedded GCS needs at least one shard, one replica per chain and one session (got \(shards) shards, replication factor \(replicationFactor), \(standbysPerShard) standbys per shard, \(sessions) sessions)")
            }
            guard tickIntervalMicroseconds >= 1, tickIntervalMicroseconds <= reportIntervalMicroseconds else {
                throw GCSError(.invalidOptions, "the tick interval (\(tickIntervalMicroseconds) µs) must be at least 1 µs and at most the report interval (\(reportIntervalMicroseconds) µs)")
            }
            guard reportIntervalMicroseconds * 2 <= leaseMicroseconds, reportIntervalMicroseconds * 2 <= failureTimeoutMicroseconds else {
                throw GCSError(.invalidOptions, "the report interval (\(reportIntervalMicroseconds) µs) must be at most half the lease (\(leaseMicroseconds) µs) and half the failure timeout (\(failureTimeoutMicroseconds) µs), or a live tail loses its lease or a live replica is declared failed between two reports; lower reportIntervalMicroseconds or raise the others")
            }
        }
    }

    enum Event {
        case message(GCSMessage, from: CairnGCS.Endpoint)
        /// The process of this replica is known to be gone.
        case exited(ReplicaID)
        /// A replica joined this shard as a standby.
        case joined(ReplicaID, shard: Int)
        /// A new request or subscription is waiting in the client queues.
        case wake
        /// To one client session or subscriber.
        case toClient(GCSMessage, from: CairnGCS.Endpoint, id: Int)
    }

    /// One thread draining one component's inbox.
    final class Worker: @unchecked Sendable {
        let condition = NSCondition()
        var inbox: [Event] = []
        /// For a replica: whether it runs (a killed one refuses messages). Under `condition`.
        var alive = true
        var tickDue = false
        var stopped = false
        /// Held while a batch is handled, so a kill waits for the batch in progress.
        let processing = NSLock()

        func post(_ e: Event) {
            condition.lock()
            inbox.append(e)
            condition.signal()
            condition.unlock()
        }

        /// Posts unless the component is dead; says whether it was posted.
        func postIfAlive(_ e: Event) -> Bool {
            condition.lock()
            defer { condition.unlock() }
            guard alive else { return false }
            inbox.append(e)
            condition.signal()
            return true
        }

        /// Until when (``monotonicNanoseconds()``) the worker counts as busy: it handled work
        /// recently, so it is ticked at every tick; otherwise only at the idle ticks (see
        /// ``tick(at:idle:)``). Under `condition`.
        var busyUntil: UInt64 = 0
        /// How long a batch that did work keeps a worker on the fast ticks.
        static let busyNanoseconds: UInt64 = 30_000_000

        func tick() {
            condition.lock()
            tickDue = true
            condition.signal()
            condition.unlock()
        }

        /// Ticks the worker if it is busy at `now`, or at an idle tick. A component with nothing
        /// in flight needs a tick only to report and to notice silence; waking every thread of
        /// every component every millisecond for that kept a fair part of a core busy per GCS.
        /// Says whether the worker is busy.
        @discardableResult
        func tick(at now: UInt64, idle: Bool) -> Bool {
            condition.lock()
            defer { condition.unlock() }
            let busy = now < busyUntil
            if idle || busy {
                tickDue = true
                condition.signal()
            }
            return busy
        }

        /// Starts the thread. `handle` takes a batch and whether a tick is due, and says whether
        /// it did work that wants the fast ticks (see ``busyUntil``).
        func start(name: String, handle: @escaping @Sendable ([Event], Bool) -> Bool) {
            startThread(named: name) { [self] in
                while true {
                    condition.lock()
                    while inbox.isEmpty && !tickDue && !stopped { condition.wait() }
                    if stopped { condition.unlock(); return }
                    let batch = inbox
                    inbox = []
                    let tick = tickDue
                    tickDue = false
                    condition.unlock()
                    processing.lock()
                    condition.lock()
                    let stopping = stopped
                    condition.unlock()
                    let busy = !stopping && handle(batch, tick)
                    processing.unlock()
                    if busy {
                        let until = monotonicNanoseconds() + Self.busyNanoseconds
                        condition.lock()
                        busyUntil = until
                        condition.unlock()
                    }
                }
            }
        }

        func stop() {
            condition.lock()
            stopped = true
            condition.signal()
            condition.unlock()
        }
    }

    final class ReplicaHost: @unchecked Sendable {
        let id: ReplicaID
        let shard: Int
        let directory: String
        let worker = Worker()
        // Touched by the worker's thread, or under `worker.processing`; nil while killed.
        var core: ChainReplica?
        var store: DurableStore?
        /// Set when the replica runs in a process of its own.
        var remote: RemoteReplica?
        init(id: ReplicaID, shard: Int, directory: String) {
            self.id = id
            self.shard = shard
            self.directory = directory
        }

        /// Whether a batch holds work for a replica that its ticks may have to follow up (resend,
        /// ask again): anything but a configuration, which comes when the chain changes or the
        /// lease is renewed, and a subscription, which an idle subscriber renews now and then.
        static func busy(_ batch: [Event]) -> Bool {
            batch.contains { e in
                switch e {
                case .message(.configure, _), .message(.subscribe, _): return false
                default: return true
                }
            }
        }

        /// Runs a batch of its inbox, and a tick if one is due, through the core (which must be
        /// there): what to persist and send, in order.
        func step(_ batch: [Event], tick: Bool, now: UInt64) -> [GCSAction] {
            var actions: [GCSAction] = []
            for case .message(let m, let from) in batch { actions += core!.handle(m, from: from, now: now) }
            if tick { actions += core!.tick(now: now) }
            return Self.coalescingAcks(actions)
        }

        /// `actions` without the acknowledgements that a later one in the same list covers (same
        /// destination and epoch, a sequence number at least as high): an acknowledgement is
        /// cumulative, and every send of a step goes after all of its persists, so the last says
        /// all the others did. A learner taking a batch of forwarded updates answers with one
        /// message instead of one per update.
        static func coalescingAcks(_ actions: [GCSAction]) -> [GCSAction] {
            // A learner's acknowledgements are a stream of their own per join attempt.
            struct Stream: Hashable { let to: ReplicaID, epoch: UInt64, attempt: UInt64? }
            func acknowledgement(_ a: GCSAction) -> (Stream, UInt64)? {
                switch a {
                case .send(.ack(let epoch, let sequence), .replica(let to)):
                    return (Stream(to: to, epoch: epoch, attempt: nil), sequence)
                case .send(.learnerAck(let epoch, let attempt, let sequence), .replica(let to)):
                    return (Stream(to: to, epoch: epoch, attempt: attempt), sequence)
                default:
                    return nil
                }
            }
            // The last acknowledgement of each stream: its position and sequence number.
            var last: [Stream: (index: Int, sequence: UInt64)] = [:]
            var acks = 0
            for (i, a) in actions.enumerated() {
                guard let (stream, sequence) = acknowledgement(a) else { continue }
                last[stream] = (i, sequence)
                acks += 1
            }
            guard acks > last.count else { return actions }
            return actions.enumerated().compactMap { i, a in
                guard let (stream, sequence) = acknowledgement(a), let covering = last[stream], covering.index != i,
                      covering.sequence >= sequence else { return a }
                return nil
            }
        }
    }

    struct Pending {
        var operation: GCSClient.Operation
        var deadline: UInt64
        var completion: @Sendable (Result<GCSClient.Outcome, GCSError>) -> Void
    }

    public let options: Options
    let directory: String
    let removeDirectory: Bool
    let start = monotonicNanoseconds()
    /// Every replica, by ID: fixed at start, except that replicas may join (``join(shard:)``).
    var replicaHosts: [ReplicaID: ReplicaHost] { hostsLock.withLock { hostStorage } }
    private let hostsLock = NSLock()
    private var hostStorage: [ReplicaID: ReplicaHost]
    /// The ID the next replica to join gets (under `hostsLock`): past every ID the coordinator knows.
    private var nextReplicaID: ReplicaID
    let coordinatorWorker = Worker()
    var coordinator: Coordinator
    let coordinatorStore: DurableStore
    let clientWorker = Worker()
    // Client state: touched on the client worker's thread only (requests arrive as messages).
    var sessions: [GCSClient]
    var free: [Int]
    var inFlight: [Int: Pending] = [:]
    var queued: [Pending] = []
    /// The newest epoch the sessions know, per shard.
    var knownEpochs: [Int: UInt64] = [:]
    var subscribers: [Int: (core: GCSSubscriber, handler: @Sendable (ChainUpdate) -> Void)] = [:]
    let requests = NSLock()
    var newRequests: [Pending] = []
    var newSubscribers: [(prefix: String, handler: @Sendable (ChainUpdate) -> Void)] = []
    let stopped = Locked(false)
    /// Starts and watches the replica processes (with ``Options/replicaProcesses``).
    var replicaSupervisor: ReplicaSupervisor?
    /// Client IDs of this incarnation: a random base, so that request numbers never repeat
    /// under an ID a chain's heads have seen before (they would be taken for retries).
    let clientBase = Int.random(in: 1..<(1 << 40)) << 16
    var subscriberCount = 0

    var now: UInt64 { (monotonicNanoseconds() - start) / 1_000 }

    public static func start(_ options: Options = Options()) throws -> EmbeddedGCS {
        try EmbeddedGCS(options)
    }

    static let temporaryPrefix = "cairn-gcs-"

    /// Removes the temporary directories of GCSs whose process is gone (killed before its
    /// shutdown could remove them): `cairn-gcs-<pid>-<random>` with no process `<pid>`.
    static func removeOrphanedTemporaryDirectories() {
        let base = NSTemporaryDirectory()
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: base) else { return }
        for name in names where name.hasPrefix(temporaryPrefix) {
            guard let pid = Int32(name.dropFirst(temporaryPrefix.count).prefix { $0 != "-" }), pid > 0 else { continue }
            // No signal is sent: the process table in /proc says whether the pid is running.
            if !FileManager.default.fileExists(atPath: "/proc/\(pid)") { try? FileManager.default.removeItem(atPath: base + name) }
        }
    }

    init(_ options: Options) throws {
        try options.validate()
        self.options = options
        if let d = options.directory {
            directory = d
            removeDirectory = false
        } else {
            Self.removeOrphanedTemporaryDirectories()
            directory = NSTemporaryDirectory() + "\(Self.temporaryPrefix)\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
            removeDirectory = true
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            coordinatorStore = try DurableStore.lmdb(directory: directory + "/coordinator", options: StoreOptions(syncMode: .eachCommit))
        } catch {
            throw GCSError(.storage, "cannot open the coordinator's store under \(directory): \(error)")
        }
        let perShard = options.replicationFactor + options.standbysPerShard
        var hosts: [ReplicaID: ReplicaHost] = [:]
        var shardOf: [ReplicaID: Int] = [:]
        var initial: [ChainConfig] = []
        for s in 0..<options.shards {
            let ids = (0..<perShard).map { s * perShard + $0 }
            for r in ids {
                shardOf[r] = s
                hosts[r] = ReplicaHost(id: r, shard: s, directory: directory + "/replica-\(r)")
            }
            initial.append(ChainConfig(shard: s, epoch: 1, chain: Array(ids.prefix(options.replicationFactor))))
        }
        hostStorage = hosts
        nextReplicaID = hosts.count
        // A coordinator that persisted configurations before resumes them.
        var configs = initial
        do {
            let stored = try Self.storedConfigs(coordinatorStore)
            if !stored.isEmpty && stored.count != options.shards {
                throw GCSError(.storage, "the GCS under \(directory) was created with \(stored.count) shards, not \(options.shards); start it with shards: \(stored.count), or use a new directory")
            }
            let layout = options.shards * perShard
            for c in stored {
                let members = c.chain + (c.learner.map { [$0] } ?? [])
                guard c.shard >= 0 && c.shard < options.shards && members.allSatisfy({ shardOf[$0] == c.shard || $0 >= layout }) else {
                    throw GCSError(.storage, "the coordinator's stored configuration \(c) does not fit \(options.shards) shards of \(perShard) replicas; use the options the directory was created with")
                }
                // Members past the layout had joined from outside (`cairn gcs`) and are gone
                // with the head that knew them: the coordinator hears nothing from them and
                // cuts them out after its failure timeout.
                for r in members where r >= layout { shardOf[r] = c.shard }
                configs[c.shard] = c
            }
            if stored.isEmpty {
                // A new GCS: its first configurations are recorded, and with them its shape.
                var batch = WriteBatch()
                for c in initial { batch.put(Self.coordinatorConfigKey(c.shard), try BinaryEncoder().encode(c)) }
                _ = try coordinatorStore.commit(batch)
            }
        } catch let e as GCSError {
            coordinatorStore.close()
            throw e
        } catch {
            coordinatorStore.close()
            throw GCSError(.storage, "cannot read the coordinator's configurations under \(directory): \(error)")
        }
        let coordinatorOptions = Coordinator.Options(replicationFactor: options.replicationFactor,
                                                     failureTimeout: options.failureTimeoutMicroseconds,
                                                     leaseDuration: options.leaseMicroseconds,
                                                     learnerDelay: options.learnerDelayMicroseconds)
        coordinator = Coordinator(configs: configs, replicas: shardOf, options: coordinatorOptions, now: 0)
        nextReplicaID = (shardOf.keys.max() ?? -1) + 1
        precondition(options.sessions < 1 << 15, "at most 32,767 sessions")
        let base = clientBase
        sessions = (0..<options.sessions).map {
            GCSClient(id: base + $0, shardCount: options.shards, resendInterval: options.resendIntervalMicroseconds, configs: configs)
        }
        free = Array((0..<options.sessions).reversed())
        do {
            for (r, host) in hosts where options.replicaProcesses == nil {
                let persisted = try Self.openStore(host)
                let config = persisted.config ?? (initial[host.shard].chain.contains(r) ? initial[host.shard] : nil)
                host.core = ChainReplica(id: r, shard: host.shard, options: options.replica,
                                         recovering: persisted.log, config: config, snapshot: persisted.snapshot)
            }
        } catch {
            for host in hosts.values { host.store?.close() }
            coordinatorStore.close()
            throw error
        }
        if let processes = options.replicaProcesses {
            do {
                replicaSupervisor = try ReplicaSupervisor(self, processes)
            } catch {
                coordinatorStore.close()
                throw error
            }
        } else {
            for host in hosts.values { startReplica(host) }
        }
        coordinatorWorker.start(name: "cairn-gcs-coordinator") { [self] batch, tick in
            var actions: [GCSAction] = []
            let t = now
            var busy = false
            for e in Self.latestReports(batch) {
                switch e {
                case .message(let m, let from): actions += coordinator.handle(m, from: from, now: t)
                case .exited(let r):
                    busy = true
                    actions += coordinator.replicaExited(r, now: t)
                case .joined(let r, let shard):
                    busy = true
                    coordinator.addReplica(r, shard: shard, now: t)
                case .wake, .toClient: break
                }
            }
            if tick { actions += coordinator.tick(now: t) }
            perform(actions, from: .coordinator)
            // The clients share this process: they learn a new configuration as soon as it is
            // made, instead of from a replica that turns them away or a resend that times out.
            let changed = actions.compactMap { a -> ChainConfig? in if case .persistConfig(let c) = a { return c } else { return nil } }
            if !changed.isEmpty { clientWorker.post(.toClient(.configs(changed), from: .coordinator, id: -1)) }
            // A chain that changed may change again soon (a learner joins, then is promoted).
            return busy || !changed.isEmpty
        }
        clientWorker.start(name: "cairn-gcs-clients") { [self] batch, tick in clientStep(batch, tick: tick) }
        let (interval, idleInterval) = (options.tickIntervalMicroseconds, options.reportIntervalMicroseconds)
        startThread(named: "cairn-gcs-tick") { [self] in
            var idleTickAt = monotonicNanoseconds()
            var anyBusy = false
            while !stopped.value {
                // With every component idle, the ticker itself sleeps until the next idle tick.
                if let warning = GCSStall.sleep(microseconds: anyBusy ? interval : idleInterval) { GCSStall.log(warning) }
                let at = monotonicNanoseconds()
                let idle = at >= idleTickAt + (idleInterval - interval / 2) * 1_000
                if idle { idleTickAt = at }
                let workers = replicaHosts.values.map(\.worker) + [coordinatorWorker, clientWorker]
                anyBusy = false
                for w in workers { anyBusy = w.tick(at: at, idle: idle) || anyBusy }
            }
        }
    }

    // MARK: replicas

    static func updateKey(_ sequence: UInt64) -> [UInt8] { [UInt8(ascii: "u")] + withUnsafeBytes(of: sequence.bigEndian) { Array($0) } }
    static let updatePrefix = [UInt8(ascii: "u")]
    /// A replica's store as of its compacted base: one record per key.
    static let basePrefix = Array("b/".utf8)
    static func baseKey(_ key: String) -> [UInt8] { basePrefix + Array(key.utf8) }
    /// The replica's ``ChainBase``.
    static let baseMarkerKey = Array("base".utf8)
    static let configKey = Array("config".utf8)
    static let coordinatorConfigPrefix = Array("config/".utf8)
    static func coordinatorConfigKey(_ shard: Int) -> [UInt8] { coordinatorConfigPrefix + Array(String(shard).utf8) }

    /// The configurations the coordinator persisted, in no particular order.
    static func storedConfigs(_ store: DurableStore) throws -> [ChainConfig] {
        try store.scan(prefix: coordinatorConfigPrefix).map { try BinaryDecoder().decode(ChainConfig.self, from: $0.value) }
    }

    /// Opens a replica's LMDB and reads back its compacted base, its log after it, and its
    /// configuration.
    static func openStore(_ host: ReplicaHost) throws -> (log: [ChainUpdate], config: ChainConfig?, snapshot: ChainSnapshot?) {
        do {
            let store = try DurableStore.lmdb(directory: host.directory, options: StoreOptions(syncMode: .eachCommit))
            host.store = store
            let decoder = BinaryDecoder()
            var snapshot: ChainSnapshot?
            if let marker = try store.get(baseMarkerKey) {
                var entries: [String: [UInt8]] = [:]
                for r in try store.scan(prefix: basePrefix) {
                    entries[String(decoding: r.key[basePrefix.count...], as: UTF8.self)] = r.value
                }
                snapshot = ChainSnapshot(base: try decoder.decode(ChainBase.self, from: marker), store: entries)
            }
            let first = (snapshot?.base.sequence ?? 0) + 1
            let log = try store.scan(prefix: updatePrefix).map { try decoder.decode(ChainUpdate.self, from: $0.value) }
            let config = try store.get(configKey).map { try decoder.decode(ChainConfig.self, from: $0) }
            for (i, u) in log.enumerated() where u.sequence != first + UInt64(i) {
                throw GCSError(.storage, "replica \(host.id)'s log at \(host.directory) jumps from \(first + UInt64(i) - 1) to \(u.sequence): its store is damaged; delete the directory so it rejoins as a new replica")
            }
            return (log, config, snapshot)
        } catch let e as GCSError {
            throw e
        } catch {
            throw GCSError(.storage, "replica \(host.id) cannot read its store at \(host.directory): \(error)")
        }
    }

    func startReplica(_ host: ReplicaHost) {
        host.worker.start(name: "cairn-gcs-replica-\(host.id)") { [self, host] batch, tick in
            guard host.core != nil else { return false }
            perform(host.step(batch, tick: tick, now: now), from: .replica(host.id), store: host.store)
            return ReplicaHost.busy(batch)
        }
    }

    /// `batch` without the reports that a later report of the same replica in it supersedes.
    /// A report is a heartbeat and a bid for a lease that runs from when it was sent: of a
    /// replica's reports waiting together, only the newest says anything the coordinator still
    /// needs. A coordinator that fell behind thus catches up in one batch instead of granting
    /// leases from stale reports, already run out when they arrive, for as long as it lags.
    static func latestReports(_ batch: [Event]) -> [Event] {
        var last: [ReplicaID: Int] = [:]
        var reports = 0
        for (i, e) in batch.enumerated() {
            if case .message(.report(let r), _) = e {
                last[r.replica] = i
                reports += 1
            }
        }
        guard reports > last.count else { return batch }  // none superseded
        return batch.enumerated().compactMap { i, e in
            if case .message(.report(let r), _) = e, last[r.replica] != i { return nil }
            return e
        }
    }

    /// Persists what the actions ask, in one fsync'd commit, then sends the messages.
    func perform(_ actions: [GCSAction], from: CairnGCS.Endpoint, store: DurableStore? = nil) {
        do {
            let warning = try GCSStall.commit(by: "\(from)") {
                try Self.persist(actions, coordinator: from == .coordinator, to: from == .coordinator ? coordinatorStore : store)
            }
            if let warning { GCSStall.log(warning) }
        } catch {
            // A replica that cannot persist must not send what depends on it: it stops, as a
            // crashed process would, and the coordinator replaces it.
            FileHandle.standardError.write(Data("cairn gcs: \(from) failed to persist, stopping it: \(error)\n".utf8))
            if case .replica(let r) = from { killAsync(r) }
            return
        }
        let t = now
        for case .send(let m, let to) in actions { route(Self.stamped(m, at: t), from: from, to: to) }
    }

    /// `m`, and if it is a report, stamped with `t`, the time it is sent. The core stamped it
    /// when its step began, before the step's commit; the lease granted in reply runs from the
    /// stamp, and a commit slowed by a loaded disk would otherwise have used up the lease
    /// before the report even left. A later stamp is still one before the coordinator hears
    /// the report, which is what keeps its count of the lease the longer one.
    static func stamped(_ m: GCSMessage, at t: UInt64) -> GCSMessage {
        guard case .report(var r) = m else { return m }
        r.sentAt = max(r.sentAt, t)
        return .report(r)
    }

    /// Makes what `actions` ask to persist durable in `store`, in one fsync'd commit.
    static func persist(_ actions: [GCSAction], coordinator: Bool, to store: DurableStore?) throws {
        var batch = WriteBatch()
        let encoder = BinaryEncoder()
        /// Updates put earlier in this batch, which a scan of the store does not see yet.
        var putInBatch: [UInt64] = []
        for a in actions {
            switch a {
            case .persist(let u):
                batch.put(updateKey(u.sequence), try encoder.encode(u))
                putInBatch.append(u.sequence)
            case .persistTruncation(let keep):
                // Update keys are big-endian, so byte order is sequence order.
                let last = updateKey(keep)
                if let store {
                    for r in try store.scan(prefix: updatePrefix) where last.lexicographicallyPrecedes(r.key) { batch.delete(r.key) }
                }
                for s in putInBatch where s > keep { batch.delete(updateKey(s)) }
            case .persistCompaction(let c):
                for (key, value) in c.changes {
                    if let value = value { batch.put(baseKey(key), value) } else { batch.delete(baseKey(key)) }
                }
                var s = c.previous + 1
                while s <= c.base.sequence {
                    batch.delete(updateKey(s))
                    s += 1
                }
                batch.put(baseMarkerKey, try encoder.encode(c.base))
            case .persistSnapshot(let snapshot):
                if let store {
                    for r in try store.scan(prefix: updatePrefix) { batch.delete(r.key) }
                    for r in try store.scan(prefix: basePrefix) { batch.delete(r.key) }
                }
                for s in putInBatch { batch.delete(updateKey(s)) }
                for (key, value) in snapshot.store { batch.put(baseKey(key), value) }
                batch.put(baseMarkerKey, try encoder.encode(snapshot.base))
            case .persistConfig(let c):
                batch.put(coordinator ? coordinatorConfigKey(c.shard) : configKey, try encoder.encode(c))
            case .send:
                break
            }
        }
        if !batch.isEmpty { _ = try store?.commit(batch) }
    }

    func route(_ m: GCSMessage, from: CairnGCS.Endpoint, to: CairnGCS.Endpoint) {
        switch to {
        case .replica(let r):
            guard let host = replicaHosts[r] else { return }
            let delivered = host.remote.map { $0.send(GCSFrame(from: from, to: to, message: m)) } ?? host.worker.postIfAlive(.message(m, from: from))
            if !delivered {
                // Refused, as by a closed connection: a client hears at once.
                switch m {
                case .write(let request, _, _), .read(let request, _):
                    if case .client(let id) = from { clientWorker.post(.toClient(.notHere(request), from: to, id: id)) }
                default: break
                }
            }
        case .coordinator:
            coordinatorWorker.post(.message(m, from: from))
        case .client(let id):
            clientWorker.post(.toClient(m, from: from, id: id))
        }
    }

    /// The connection to replica `r`'s process, when it runs in one.
    func remote(of r: ReplicaID) -> RemoteReplica? { replicaHosts[r]?.remote }

    /// Makes room for a replica that joins from outside (`cairn gcs`): a new replica ID in
    /// `shard` (default: the shard with the fewest replicas), a standby from now on. It runs in
    /// a process the caller starts, with the returned launch, and connects to this GCS's head;
    /// it is not started again if it dies. Throws ``GCSError/Code-swift.enum/unsupported``
    /// unless the replicas run in processes (``Options/replicaProcesses``).
    func join(shard: Int?) throws -> GCSReplicaLaunch {
        guard let supervisor = replicaSupervisor else {
            throw GCSError(.unsupported, "this GCS runs its replicas on the head's threads, so none can join; start the head with --gcs-processes (EmbeddedGCS.Options.replicaProcesses)")
        }
        if let shard, !(0..<options.shards).contains(shard) {
            throw GCSError(.unknownReplica, "there is no shard \(shard); shards are 0..<\(options.shards)")
        }
        let (r, s): (ReplicaID, Int) = hostsLock.withLock {
            let r = nextReplicaID
            nextReplicaID += 1
            let counts = Dictionary(grouping: hostStorage.values, by: \.shard).mapValues(\.count)
            let s = shard ?? (0..<options.shards).min { counts[$0, default: 0] < counts[$1, default: 0] }!
            let host = ReplicaHost(id: r, shard: s, directory: "")
            host.remote = supervisor.add(r)
            hostStorage[r] = host
            return (r, s)
        }
        coordinatorWorker.post(.joined(r, shard: s))
        // The joining process chooses its LMDB directory.
        return supervisor.describe(r, s, "")
    }

    /// Stops a replica as a SIGKILL would: its memory is gone, its LMDB stays. The coordinator
    /// hears of the exit at once, as from a supervisor that saw the process end.
    public func kill(replica r: ReplicaID) throws {
        guard let host = replicaHosts[r] else { throw GCSError(.unknownReplica, "no replica \(r); replicas are 0..<\(replicaHosts.count)") }
        if let remote = host.remote {
            // A real SIGKILL; the closed connection tells the coordinator, and the replica's
            // process is started again from its LMDB.
            remote.kill()
            return
        }
        host.worker.processing.lock()
        host.worker.condition.lock()
        let wasAlive = host.worker.alive
        host.worker.alive = false
        let lost = host.worker.inbox
        host.worker.inbox = []
        host.worker.condition.unlock()
        // The requests it had not handled are lost with it; their clients hear so at once, as
        // they would when the kernel resets the connections of a dead process.
        for case .message(let m, let from) in lost {
            switch (m, from) {
            case (.write(let request, _, _), .client(let id)), (.read(let request, _), .client(let id)):
                clientWorker.post(.toClient(.notHere(request), from: .replica(r), id: id))
            default: break
            }
        }
        host.core = nil
        host.store?.close()
        host.store = nil
        host.worker.processing.unlock()
        if wasAlive { coordinatorWorker.post(.exited(r)) }
    }

    func killAsync(_ r: ReplicaID) {
        DispatchQueue.global().async { try? self.kill(replica: r) }
    }

    /// Restarts a killed replica from its LMDB.
    public func restart(replica r: ReplicaID) throws {
        guard let host = replicaHosts[r] else { throw GCSError(.unknownReplica, "no replica \(r); replicas are 0..<\(replicaHosts.count)") }
        // A replica process is started again by its supervisor as soon as it exits.
        guard host.remote == nil else { return }
        host.worker.processing.lock()
        defer { host.worker.processing.unlock() }
        guard host.core == nil else { return }
        let persisted = try Self.openStore(host)
        host.core = ChainReplica(id: r, shard: host.shard, options: options.replica,
                                 recovering: persisted.log, config: persisted.config, snapshot: persisted.snapshot)
        host.worker.condition.lock()
        host.worker.alive = true
        host.worker.condition.unlock()
    }

    /// Stops every thread, fails what is still waiting with ``GCSError/Code-swift.enum/shutDown``,
    /// and closes the stores (a temporary directory is removed). The GCS cannot be used after.
    public func shutdown() {
        guard !stopped.value else { return }
        stopped.update { $0 = true }
        replicaSupervisor?.stop()
        for w in [coordinatorWorker, clientWorker] + replicaHosts.values.map(\.worker) {
            w.stop()
            w.processing.lock()  // waits for a batch in progress
            w.processing.unlock()
        }
        let waiting = Array(inFlight.values) + queued + requests.withLock { newRequests }
        for p in waiting { p.completion(.failure(GCSError(.shutDown, "the GCS was shut down"))) }
        for h in replicaHosts.values {
            h.store?.close()
            h.store = nil
        }
        coordinatorStore.close()
        if removeDirectory { try? FileManager.default.removeItem(atPath: directory) }
    }

    /// Restarts the coordinator as after a crash: its memory (who reported when, which leases it
    /// granted, messages in its inbox) is gone; it starts again from its persisted
    /// configurations and waits out any lease its previous life may have granted.
    public func restartCoordinator() throws {
        coordinatorWorker.processing.lock()
        defer { coordinatorWorker.processing.unlock() }
        coordinatorWorker.condition.lock()
        coordinatorWorker.inbox = []
        coordinatorWorker.condition.unlock()
        var configs = coordinator.configs
        do {
            for c in try Self.storedConfigs(coordinatorStore) { configs[c.shard] = c }
        } catch {
            throw GCSError(.storage, "the coordinator cannot read its configurations under \(directory): \(error)")
        }
        coordinator = Coordinator(configs: configs, replicas: coordinator.replicas, options: coordinator.options, now: now)
    }

    /// With ``Options/replicaProcesses``: each replica's process as it runs now (its pid changes
    /// when it is started again); empty when the replicas run on threads.
    public var replicaProcesses: [(replica: ReplicaID, pid: Int32)] {
        // Replicas that joined from outside run in processes this one did not start: no pid here.
        replicaHosts.values.compactMap { h in h.remote.map { (h.id, $0.pid) } }.filter { $0.pid > 0 }.sorted { $0.replica < $1.replica }
    }

    /// Replica IDs by shard, and each shard's current configuration as the coordinator has it.
    public var replicaIDs: [ReplicaID] { replicaHosts.keys.sorted() }

    /// What a replica holds, as it last reported to the coordinator.
    public struct ReplicaStatus: Sendable, Equatable {
        public var replica: ReplicaID
        public var shard: Int
        /// Updates it has applied, from the first.
        public var lastSequence: UInt64
        /// Of those, the ones folded into its compacted base.
        public var base: UInt64
        /// The rest, held one by one in memory and in its LMDB.
        public var heldUpdates: Int { Int(lastSequence - base) }
    }

    /// Every replica as of its latest report to the coordinator (a tick old at most; replicas
    /// in processes of their own included).
    public func replicaStatuses() -> [ReplicaStatus] {
        coordinatorWorker.processing.lock()
        defer { coordinatorWorker.processing.unlock() }
        return coordinator.latestReports.values.sorted { $0.replica < $1.replica }.map {
            ReplicaStatus(replica: $0.replica, shard: $0.shard, lastSequence: $0.lastSequence, base: $0.base)
        }
    }

    public func configurations() -> [ChainConfig] {
        coordinatorWorker.processing.lock()
        defer { coordinatorWorker.processing.unlock() }
        return coordinator.configs
    }

    // MARK: clients

    /// Writes `value` under `key` (nil deletes it) and calls `completion` once the write is
    /// durable on every replica of the key's chain. `completion` runs on the GCS's client thread.
    public func write(_ key: String, _ value: [UInt8]?, completion: @escaping @Sendable (Result<Void, GCSError>) -> Void) {
        if let e = validate(key, value) { return completion(.failure(e)) }
        submit(.write(key: key, value: value)) { r in completion(r.map { _ in () }) }
    }

    /// Reads `key` at its chain's tail.
    public func read(_ key: String, completion: @escaping @Sendable (Result<[UInt8]?, GCSError>) -> Void) {
        if let e = validate(key, nil) { return completion(.failure(e)) }
        submit(.read(key: key)) { r in
            completion(r.map { if case .read(let v) = $0 { return v } else { return nil } })
        }
    }

    /// Blocking forms of ``write(_:_:completion:)`` and ``read(_:completion:)``.
    public func put(_ key: String, _ value: [UInt8]) throws { try wait { self.write(key, value, completion: $0) } }
    public func delete(_ key: String) throws { try wait { self.write(key, nil, completion: $0) } }
    public func get(_ key: String) throws -> [UInt8]? { try wait { self.read(key, completion: $0) } }
    public func put(_ table: GCSTable, _ name: String, _ value: [UInt8]) throws { try put(table.key(name), value) }
    public func get(_ table: GCSTable, _ name: String) throws -> [UInt8]? { try get(table.key(name)) }

    /// Calls `handler`, on the GCS's client thread, with every committed change to a key that
    /// starts with `prefix`, from the start of each shard's log (so a new subscriber replays
    /// the table's history, then follows it): each once, in each shard's order. Where a shard's
    /// tail compacted the changes the subscriber lacks, it gets instead each key's value as of
    /// the compacted base (changes from client -1, all numbered with the base's sequence
    /// number), then the changes after it. A key deleted among compacted changes is then not
    /// reported: a subscriber sees that only if it was not a full `compactionRetain` updates
    /// behind the tail (a new subscriber, which knows no keys, sees the state exactly).
    public func subscribe(prefix: String, handler: @escaping @Sendable (ChainUpdate) -> Void) {
        requests.withLock { newSubscribers.append((prefix, handler)) }
        clientWorker.post(.wake)
    }

    func validate(_ key: String, _ value: [UInt8]?) -> GCSError? {
        if key.isEmpty || key.utf8.count > Self.maxKeyBytes {
            return GCSError(.invalidKey, "a GCS key has 1 to \(Self.maxKeyBytes) bytes of UTF-8; got \(key.utf8.count)")
        }
        if let v = value, v.count > Self.maxValueBytes {
            return GCSError(.valueTooLarge, "a GCS value has at most \(Self.maxValueBytes) bytes; got \(v.count) for key \(key.prefix(64))")
        }
        return nil
    }

    func wait<T: Sendable>(_ start: (@escaping @Sendable (Result<T, GCSError>) -> Void) -> Void) throws -> T {
        let box = ResultBox<T>()
        start { box.set($0) }
        return try box.wait().get()
    }

    func submit(_ operation: GCSClient.Operation, completion: @escaping @Sendable (Result<GCSClient.Outcome, GCSError>) -> Void) {
        guard !stopped.value else { return completion(.failure(GCSError(.shutDown, "the GCS was shut down"))) }
        let pending = Pending(operation: operation, deadline: now + options.requestTimeoutMicroseconds, completion: completion)
        requests.withLock { newRequests.append(pending) }
        clientWorker.post(.wake)
    }

    /// One batch on the client thread: new requests, replies, resends, timeouts.
    /// Says whether requests are in flight or waiting (which want the fast ticks: resends and
    /// timeouts).
    func clientStep(_ batch: [Event], tick: Bool) -> Bool {
        let t = now
        var actions: [(GCSAction, CairnGCS.Endpoint)] = []
        let (incoming, incomingSubscribers) = requests.withLock { () -> ([Pending], [(prefix: String, handler: @Sendable (ChainUpdate) -> Void)]) in
            defer { newRequests = []; newSubscribers = [] }
            return (newRequests, newSubscribers)
        }
        queued += incoming
        for (prefix, handler) in incomingSubscribers {
            let id = clientBase + (1 << 15) + subscriberCount
            subscriberCount += 1
            var core = GCSSubscriber(id: id, prefix: prefix, shardCount: options.shards, resubscribeInterval: options.resubscribeIntervalMicroseconds)
            // Learning the configurations, the subscriber subscribes at each shard's tail.
            for a in core.handle(.configs(Array(sessions[0].configs.values)), from: .coordinator, now: t).actions { actions.append((a, .client(id))) }
            subscribers[id] = (core, handler)
        }
        for case .exited(let r) in batch {
            // A replica process is gone: what the sessions sent it since their last resend may
            // have gone down with it, so each session waiting on it is turned away now (as a
            // reset connection would do), not at its next resend.
            for (i, p) in inFlight {
                let shard = shard(of: p.operation.key, shards: options.shards)
                guard let c = sessions[i].configs[shard], let outstanding = sessions[i].outstanding else { continue }
                let target: ReplicaID
                switch p.operation {
                case .write: target = c.head
                case .read: target = c.tail
                }
                guard target == r else { continue }
                for a in sessions[i].handle(.notHere(outstanding.request), now: t).actions { actions.append((a, .client(clientBase + i))) }
            }
        }
        for case .toClient(let m, let from, let id) in batch {
            if case .configs(let list) = m {
                // Only news matters: an answer with nothing newer changes no session.
                guard list.contains(where: { $0.epoch > (knownEpochs[$0.shard] ?? 0) }) else { continue }
                for c in list where c.epoch > (knownEpochs[c.shard] ?? 0) { knownEpochs[c.shard] = c.epoch }
                // Every session learns the new configurations (one query answers them all).
                for (i, _) in inFlight { for a in sessions[i].handle(m, now: t).actions { actions.append((a, .client(clientBase + i))) } }
                for i in free { _ = sessions[i].handle(m, now: t) }
                for (sid, var sub) in subscribers {
                    for a in sub.core.handle(m, from: from, now: t).actions { actions.append((a, .client(sid))) }
                    subscribers[sid] = sub
                }
                continue
            }
            if var sub = subscribers[id] {
                let (changes, acts) = sub.core.handle(m, from: from, now: t)
                subscribers[id] = sub
                for u in changes { sub.handler(u) }
                for a in acts { actions.append((a, .client(id))) }
                continue
            }
            let i = id - clientBase
            guard i >= 0, i < sessions.count, inFlight[i] != nil else { continue }
            let (outcome, acts) = sessions[i].handle(m, now: t)
            for a in acts { actions.append((a, .client(id))) }
            if let outcome {
                let p = inFlight.removeValue(forKey: i)!
                free.append(i)
                p.completion(.success(outcome))
            }
        }
        if tick {
            for (i, p) in inFlight {
                if t > p.deadline {
                    inFlight[i] = nil
                    free.append(i)
                    sessions[i].abandon()
                    p.completion(.failure(GCSError(.unavailable, "no chain answered for key \(p.operation.key.prefix(64)) within \(options.requestTimeoutMicroseconds / 1_000) ms; is every replica of its shard down?")))
                    continue
                }
                for a in sessions[i].tick(now: t) { actions.append((a, .client(clientBase + i))) }
            }
            for (id, var sub) in subscribers {
                for a in sub.core.tick(now: t) { actions.append((a, .client(id))) }
                subscribers[id] = sub
            }
        }
        while !queued.isEmpty, let i = free.popLast() {
            let p = queued.removeFirst()
            inFlight[i] = p
            for a in sessions[i].start(p.operation, now: t) { actions.append((a, .client(clientBase + i))) }
        }
        // However many sessions ask, one configuration query per step is enough: its answer
        // reaches them all.
        var queried = false
        for (a, from) in actions {
            guard case .send(let m, let to) = a else { continue }
            if case .configQuery = m {
                if queried { continue }
                queried = true
            }
            route(m, from: from, to: to)
        }
        return !inFlight.isEmpty || !queued.isEmpty
    }
}

/// One result, waited for by one thread.
final class ResultBox<T: Sendable>: @unchecked Sendable {
    private let condition = NSCondition()
    private var result: Result<T, GCSError>?
    func set(_ r: Result<T, GCSError>) {
        condition.lock()
        result = r
        condition.signal()
        condition.unlock()
    }
    func wait() -> Result<T, GCSError> {
        condition.lock()
        defer { condition.unlock() }
        while result == nil { condition.wait() }
        return result!
    }
}

/// Warnings for waits far longer than asked. A tick thread that wakes seconds late stops every
/// replica's reports, so the tails' leases lapse and writes go unanswered; a commit that takes
/// seconds holds up its replica's whole chain. Either shows as a GCS that stops answering,
/// and the warning in the log says which it was, and for how long.
enum GCSStall {
    /// Waits longer than this (beyond what was asked) are reported.
    static let thresholdNanoseconds: UInt64 = 1_000_000_000

    /// The warning for a tick thread that asked to sleep `askedMicroseconds` and slept
    /// `sleptNanoseconds`; nil if it woke in time.
    static func lateTick(askedMicroseconds: UInt64, sleptNanoseconds: UInt64) -> String? {
        let late = sleptNanoseconds &- min(sleptNanoseconds, askedMicroseconds * 1_000)
        guard late > thresholdNanoseconds else { return nil }
        return "the tick thread woke \(milliseconds(late)) ms late (it asked to sleep \(askedMicroseconds) µs): reports, leases and resends waited as long; this process or the machine was stalled"
    }

    /// The warning for a commit by `component` that took `nanoseconds`; nil if it was quick enough.
    static func slowCommit(by component: String, nanoseconds: UInt64) -> String? {
        guard nanoseconds > thresholdNanoseconds else { return nil }
        return "\(component)'s fsync'd commit took \(milliseconds(nanoseconds)) ms; its chain waited as long: the disk, or the machine, is overloaded"
    }

    static func milliseconds(_ nanoseconds: UInt64) -> String { String(nanoseconds / 1_000_000) }

    /// Sleeps `microseconds`; returns the warning if the thread woke over a second late.
    static func sleep(microseconds: UInt64) -> String? {
        let before = monotonicNanoseconds()
        usleep(UInt32(microseconds))
        return lateTick(askedMicroseconds: microseconds, sleptNanoseconds: monotonicNanoseconds() - before)
    }

    /// Runs `persist`; returns the warning if it took over a second.
    static func commit(by component: String, _ persist: () throws -> Void) rethrows -> String? {
        let started = monotonicNanoseconds()
        try persist()
        return slowCommit(by: component, nanoseconds: monotonicNanoseconds() - started)
    }

    static func log(_ warning: String) {
        FileHandle.standardError.write(Data("cairn gcs: warning: \(warning)\n".utf8))
    }
}
