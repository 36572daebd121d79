import CairnCodec
import CairnCore
import CairnGCS
import CairnNet
import CairnStorage
import CairnWire
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One GCS message between the head and a replica process, with where it comes from and
/// goes to (the head relays messages between replicas).
struct GCSFrame: Codable {
    var from: CairnGCS.Endpoint
    var to: CairnGCS.Endpoint
    var message: GCSMessage
}

/// Where a ``GCSFrame`` comes from and goes to, decoded without its message (which the
/// binary format skips by its length).
struct GCSFrameHeader: Decodable {
    var from: CairnGCS.Endpoint
    var to: CairnGCS.Endpoint
}

extension GCSMessage {
    /// Small messages that keep the chains alive: configurations and leases, reports,
    /// acknowledgements, handoffs. They are never refused for a connection's pending limit
    /// (see ``WireConnection/send(_:control:)``): a tail whose lease was dropped behind a flood
    /// of resent updates acknowledges nothing, which keeps the flood going.
    var isControl: Bool {
        switch self {
        case .configure, .configs, .configQuery, .report, .ack, .learnerAck, .handoff: return true
        default: return false
        }
    }
}

/// Runs each replica of an ``EmbeddedGCS`` in a process of its own (see
/// ``EmbeddedGCS/Options/replicaProcesses``).
public struct ReplicaProcesses: Sendable {
    /// The program the replicas run: it must call ``Cluster/runNodeIfLaunched(prepare:)`` first
    /// thing in `main` (a cluster of processes passes its node executable).
    public var executable: String
    /// The address the head listens on for its replicas.
    public var host: String
    /// The token every replica's connection must prove.
    public var token: ClusterToken
    /// A replica's connection silent this long is closed (a replica process that dies closes
    /// it at once). Default 1,000.
    public var silenceTimeoutMs: Int
    /// How often a replica process ticks (reports to the coordinator, resends what is not yet
    /// acknowledged): each tick is a few messages over its connection, relayed by the head. Default 20,000.
    public var tickIntervalMicroseconds: UInt64
    /// How long after a replica's process exits its next process is started. The chain fails
    /// over to a standby first, without the CPU a starting process takes. Default 100.
    public var restartDelayMs: Int

    public init(executable: String, host: String = "127.0.0.1", token: ClusterToken, silenceTimeoutMs: Int = 1_000,
                tickIntervalMicroseconds: UInt64 = 20_000, restartDelayMs: Int = 100) {
        precondition(tickIntervalMicroseconds >= 100, "replica processes tick at most every 100 µs")
        precondition(restartDelayMs >= 0, "restartDelayMs must not be negative")
        self.restartDelayMs = restartDelayMs
        self.executable = executable
        self.host = host
        self.token = token
        self.silenceTimeoutMs = silenceTimeoutMs
        self.tickIntervalMicroseconds = tickIntervalMicroseconds
    }
}

/// What a GCS replica process is told, inside its ``NodeLaunch``.
struct GCSReplicaLaunch: Codable, Equatable {
    var replica: Int
    var shard: Int
    /// Its LMDB environment.
    var directory: String
    var leaseMicroseconds: UInt64
    var retransmitIntervalMicroseconds: UInt64
    var reportIntervalMicroseconds: UInt64
    var compactEvery: UInt64
    var compactionRetain: UInt64
    var tickIntervalMicroseconds: UInt64
    /// `host:port` of the head's listener for replicas.
    var hub: String
}

/// The replicas' connections by ID, for the hub's handlers (replicas may join while it runs).
final class RemoteTable: Sendable {
    private let table = Mutex<[ReplicaID: RemoteReplica]>([:])
    func add(_ r: ReplicaID) -> RemoteReplica {
        table.withLock { t in
            if let existing = t[r] { return existing }
            let remote = RemoteReplica(id: r)
            t[r] = remote
            return remote
        }
    }
    func get(_ r: ReplicaID) -> RemoteReplica? { table.withLock { $0[r] } }
    var all: [RemoteReplica] { table.withLock { Array($0.values) } }
}

/// The head's side of one replica process: its pid and its connection.
final class RemoteReplica: Sendable {
    let id: ReplicaID
    private let state = Mutex<(pid: pid_t, connection: WireConnection?)>((0, nil))

    init(id: ReplicaID) { self.id = id }

    var pid: pid_t { state.withLock { $0.pid } }

    func started(_ pid: pid_t) { state.withLock { $0.pid = pid } }

    /// Sends a frame; false (as from a closed connection) when the replica is not connected.
    func send(_ frame: GCSFrame) -> Bool {
        guard let bytes = try? BinaryEncoder().encode(frame) else { return false }
        return send(encoded: bytes, control: frame.message.isControl)
    }

    /// Sends a frame already encoded (one relayed from another replica, checked by decoding it).
    func send(encoded bytes: [UInt8], control: Bool) -> Bool {
        guard let connection = state.withLock({ $0.connection }) else { return false }
        do {
            try connection.send(bytes, control: control)
            return true
        } catch {
            let now = monotonicNanoseconds()
            if now - lastDropLog.load(ordering: .relaxed) > 1_000_000_000 {
                lastDropLog.store(now, ordering: .relaxed)
                FileHandle.standardError.write(Data("cairn gcs: a message to replica \(id) was dropped: \(error)\n".utf8))
            }
            return false
        }
    }
    private let lastDropLog = Atomic<UInt64>(0)

    func connected(_ connection: WireConnection) {
        let previous: WireConnection? = state.withLock { s in
            defer { s.connection = connection }
            return s.connection
        }
        if let previous, previous !== connection { previous.close() }
    }

    /// Forgets `connection`; true if it was the replica's current one.
    func disconnected(_ connection: WireConnection) -> Bool {
        state.withLock { s in
            guard s.connection === connection else { return false }
            s.connection = nil
            return true
        }
    }

    /// Forgets the connection of a process that exited: what still comes on it is not delivered.
    func exited() { state.withLock { $0.connection = nil } }

    /// Whether `connection` is the replica's current one (frames from another are stale).
    func isCurrent(_ connection: WireConnection) -> Bool { state.withLock { $0.connection === connection } }

    /// SIGKILLs the replica's process (one this head started).
    func kill() {
        let pid = state.withLock { $0.pid }
        if pid > 0 { Glibc.kill(pid, SIGKILL) }
    }
}

/// Starts the replica processes of an ``EmbeddedGCS``, listens for their connections, relays
/// their messages, and starts a replica again (same ID, same LMDB) whenever its process exits.
/// A closed connection tells the coordinator at once that the replica is gone.
final class ReplicaSupervisor: @unchecked Sendable {
    private let listener: WireListener
    private let tokenFile: String
    private let processes: ReplicaProcesses
    private let launches: [ReplicaID: NodeLaunch]
    /// Every replica's connection: those started here, and those that joined.
    private let remotes: RemoteTable
    private let stopping = Atomic<Bool>(false)
    /// A frame as it came: from which replica, on which connection, its bytes.
    typealias Incoming = (ReplicaID, WireConnection, [UInt8])
    /// What the inbox takes, in order: frames, and the end of a replica's process or connection.
    /// A replica's end goes through the same queue as its frames, and frames from a connection
    /// that is no longer the replica's are dropped, so the coordinator never hears from a
    /// replica after it heard that it exited (a late report would make it alive again).
    enum Arrival {
        case frame(Incoming)
        case gone(ReplicaID)
    }
    private let inbox: BatchQueue<Arrival>
    /// Frames from one replica to another, one queue and thread per destination: a long
    /// stream to one replica (a learner's snapshot and catch-up, each frame decoded here to check
    /// it) does not hold up what goes to the others, or the replies to clients.
    /// (None once stopped, so that no relay starts after `stop`.)
    private let relays = Locked<[ReplicaID: BatchQueue<Incoming>]?>([:])
    private let log: @Sendable (String) -> Void = { FileHandle.standardError.write(Data("cairn gcs: \($0)\n".utf8)) }

    /// Told of every exit, before the replica's next process starts.
    private weak var gcs: EmbeddedGCS?

    init(_ gcs: EmbeddedGCS, _ processes: ReplicaProcesses) throws {
        self.processes = processes
        self.gcs = gcs
        tokenFile = gcs.directory + "/token"
        // A token file left by a head that was killed is this GCS's own: replaced, not reused.
        unlink(tokenFile)
        do {
            try processes.token.write(to: tokenFile)
        } catch {
            throw GCSError(.storage, "cannot write the token for the replica processes: \(error)")
        }
        let remotes = RemoteTable()
        for (r, host) in gcs.replicaHosts { host.remote = remotes.add(r) }
        self.remotes = remotes
        let log = self.log
        let relays = self.relays
        // Frames are decoded and routed on threads of their own, never on an event loop,
        // which must stay free to keep every connection's heartbeats going.
        let inbox = BatchQueue<Arrival>(name: "gcs-replicas") { [weak gcs] batch in
            guard let gcs else { return }
            let decoder = BinaryDecoder()
            for arrival in batch {
                let item: Incoming
                switch arrival {
                case .gone(let r):
                    gcs.coordinatorWorker.post(.exited(r))
                    gcs.clientWorker.post(.exited(r))
                    continue
                case .frame(let frame):
                    guard remotes.get(frame.0)?.isCurrent(frame.1) == true else { continue }  // from a connection that ended
                    item = frame
                }
                // A frame for another replica goes to that replica's relay, which checks it and
                // sends it on as it came.
                if let header = try? decoder.decode(GCSFrameHeader.self, from: item.2), case .replica(let to) = header.to,
                   let remote = gcs.remote(of: to) {
                    let relay = relays.update { queues -> BatchQueue<Incoming>? in
                        guard queues != nil else { return nil }  // stopped
                        if let q = queues?[to] { return q }
                        let q = Self.relay(to: remote, log: log)
                        queues?[to] = q
                        return q
                    }
                    relay?.post(item)
                    continue
                }
                guard let frame = Self.check(item, decoder, log) else { continue }
                gcs.route(frame.message, from: frame.from, to: frame.to)
            }
        }
        self.inbox = inbox
        let handlers = WireHandlers(established: { connection in
            guard let r = Self.replica(connection), let remote = remotes.get(r) else {
                log("a connection from \(connection.peer?.name ?? "?") is not one of this GCS's replicas; closing it")
                connection.close()
                return
            }
            remote.connected(connection)
        }, message: { connection, bytes in
            guard let r = Self.replica(connection) else { return }
            inbox.post(.frame((r, connection, bytes)))
        }, closed: { connection, _ in
            guard let r = Self.replica(connection), let remote = remotes.get(r), remote.disconnected(connection) else { return }
            inbox.post(.gone(r))
        }, log: { log($0) })
        do {
            listener = try Wire.listenBlocking(host: processes.host, port: 0, token: processes.token, epoch: 1, handlers: handlers,
                                               options: .failureDetecting(milliseconds: processes.silenceTimeoutMs))
        } catch {
            throw GCSError(.storage, "the GCS cannot listen on \(processes.host) for its replica processes: \(error)")
        }
        let describe: @Sendable (ReplicaID, Int, String) -> GCSReplicaLaunch = { [options = gcs.options, hub = "\(processes.host):\(listener.port)"] r, shard, directory in
            GCSReplicaLaunch(replica: r, shard: shard, directory: directory, leaseMicroseconds: options.leaseMicroseconds,
                             retransmitIntervalMicroseconds: options.retransmitIntervalMicroseconds,
                             reportIntervalMicroseconds: options.reportIntervalMicroseconds,
                             compactEvery: options.compactEvery, compactionRetain: options.compactionRetain,
                             tickIntervalMicroseconds: processes.tickIntervalMicroseconds, hub: hub)
        }
        self.describe = describe
        var launches: [ReplicaID: NodeLaunch] = [:]
        for (r, host) in gcs.replicaHosts {
            var launch = NodeLaunch(node: NodeID(0), resources: Resources(cpus: 0), functions: nil, storeLimitBytes: 0, spillThreshold: 0,
                                    host: processes.host, controlStore: "", schedulerSeed: 0, tokenFile: tokenFile,
                                    failureTimeoutMs: processes.silenceTimeoutMs,
                                    maxTaskRetries: 0, housekeepingIntervalMs: 0, head: getpid())
            launch.role = .gcsReplica
            launch.gcs = describe(r, host.shard, host.directory)
            launches[r] = launch
        }
        self.launches = launches
        for r in launches.keys.sorted() {
            do {
                try start(r)
            } catch {
                stop()
                throw error
            }
        }
    }

    /// What replica `r`'s process needs to know: its shard, its LMDB directory, the GCS's timings
    /// and where this head listens for replicas.
    let describe: @Sendable (ReplicaID, Int, String) -> GCSReplicaLaunch

    /// Decodes a frame from replica `r` and checks that it names `r` as its sender; closes the
    /// connection of a replica that sends one that does not.
    private static func check(_ item: Incoming, _ decoder: BinaryDecoder, _ log: @Sendable (String) -> Void) -> GCSFrame? {
        let (r, connection, bytes) = item
        guard let frame = try? decoder.decode(GCSFrame.self, from: bytes), frame.from == .replica(r) else {
            log("replica \(r) sent a frame that does not decode or claims another sender; closing its connection")
            connection.close()
            return nil
        }
        return frame
    }

    /// The relay to `remote`: checks each frame and sends it on as it came. (If the replica is
    /// not connected the frame is lost, as any message between replicas may be: the sender
    /// resends what is not acknowledged.)
    private static func relay(to remote: RemoteReplica, log: @escaping @Sendable (String) -> Void) -> BatchQueue<Incoming> {
        BatchQueue<Incoming>(name: "gcs-relay-\(remote.id)") { batch in
            let decoder = BinaryDecoder()
            for item in batch {
                guard let frame = check(item, decoder, log) else { continue }
                _ = remote.send(encoded: item.2, control: frame.message.isControl)
            }
        }
    }

    /// A replica that joins from outside: its connection will be accepted.
    func add(_ r: ReplicaID) -> RemoteReplica { remotes.add(r) }

    private static func replica(_ connection: WireConnection) -> ReplicaID? {
        guard let name = connection.peer?.name, name.hasPrefix("gcs-replica-") else { return nil }
        return Int(name.dropFirst("gcs-replica-".count))
    }

    private func start(_ r: ReplicaID) throws {
        guard let launch = launches[r], let remote = remotes.get(r) else { return }
        let pid = try launch.start([processes.executable])
        remote.started(pid)
        startThread(named: "cairn-gcs-w-\(r)") { [self] in watch(r, pid) }
    }

    /// Waits for the replica's process to exit, then starts it again from its LMDB, unless the
    /// GCS stops or the program keeps exiting by itself at once.
    private func watch(_ r: ReplicaID, _ pid: pid_t) {
        var quickExits = 0
        var pid = pid
        while true {
            let started = ContinuousClock.now
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            if stopping.load(ordering: .relaxed) { return }
            // The coordinator hears of the exit before the next process can report: a replica
            // that came back in the same configuration would have lost what it held in memory
            // (updates not yet acknowledged downstream, subscriptions), and the chain would stall.
            // Nothing the dead process sent is delivered after this.
            remotes.get(r)?.exited()
            inbox.post(.gone(r))
            let selfExit = status & 0x7F == 0
            log("replica \(r)'s process (pid \(pid)) \(selfExit ? "exited with status \((status >> 8) & 0xFF)" : "was killed by signal \(status & 0x7F)"); starting it again from its LMDB")
            quickExits = selfExit && ContinuousClock.now - started < .seconds(2) ? quickExits + 1 : 0
            if processes.restartDelayMs > 0 { usleep(UInt32(processes.restartDelayMs) * 1_000) }
            if stopping.load(ordering: .relaxed) { return }
            guard quickExits < 3 else {
                log("replica \(r)'s process exited by itself three times in a row at once; not starting it again (does \(processes.executable) call Cluster.runNodeIfLaunched first thing in main?)")
                return
            }
            guard let launch = launches[r], let remote = remotes.get(r), let next = try? launch.start([processes.executable]) else {
                log("replica \(r)'s process exited and cannot be started again")
                return
            }
            // Started at a low priority: the chain has failed over already, and the CPU a
            // starting process takes (loading, opening its LMDB, reading its log) would
            // otherwise come out of the requests in flight. It restores its own priority once
            // it is connected (see ``GCSReplicaProcess/run``). Only where it may raise it again.
            if geteuid() == 0 { setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(next), Self.startingNice) }
            remote.started(next)
            pid = next
        }
    }

    /// The nice value a restarted replica process starts with.
    static let startingNice: Int32 = 10

    /// Stops every replica process (SIGTERM, then SIGKILL after a second) and the listener.
    func stop() {
        guard !stopping.exchange(true, ordering: .relaxed) else { return }
        // Joined replicas (no pid here) stop when their connection to the head closes.
        let pids = remotes.all.map(\.pid).filter { $0 > 0 }
        for pid in pids { kill(pid, SIGTERM) }
        let deadline = ContinuousClock.now + .seconds(1)
        while ContinuousClock.now < deadline && pids.contains(where: { !processHasExited($0) }) { usleep(1_000) }
        for pid in pids { kill(pid, SIGKILL) }
        listener.closeBlocking()
        inbox.stop()
        let queues = relays.update { queues in
            defer { queues = nil }
            return Array((queues ?? [:]).values)
        }
        for q in queues { q.stop() }
        unlink(tokenFile)
    }

}

/// The process of one GCS replica: its ``ChainReplica`` core on a worker thread, its LMDB, a
/// ticker, and one connection to the head, which relays its messages. It exits when it loses
/// the head.
enum GCSReplicaProcess {
    static func run(_ launch: NodeLaunch, _ g: GCSReplicaLaunch, token: ClusterToken, log: @escaping @Sendable (String) -> Void) -> Never {
        let host = EmbeddedGCS.ReplicaHost(id: g.replica, shard: g.shard, directory: g.directory)
        do {
            let persisted = try EmbeddedGCS.openStore(host)
            host.core = ChainReplica(id: g.replica, shard: g.shard,
                                     options: ChainReplica.Options(leaseDuration: g.leaseMicroseconds, retransmitInterval: g.retransmitIntervalMicroseconds,
                                                                   reportInterval: g.reportIntervalMicroseconds,
                                                                   compactEvery: g.compactEvery, retain: g.compactionRetain),
                                     recovering: persisted.log, config: persisted.config, snapshot: persisted.snapshot)
        } catch {
            log("\(error)")
            exit(2)
        }
        guard let (hubHost, hubPort) = TCPTransport.split(g.hub) else {
            log("bad hub address \(g.hub)")
            exit(2)
        }
        // The replica's clock: the machine's monotonic clock in µs, not one from this process's
        // start, so that it keeps running across the replica's restarts (see
        // ``ChainReplica``'s join numbering).
        let clock: @Sendable () -> UInt64 = { monotonicNanoseconds() / 1_000 }
        let link = Mutex<WireConnection?>(nil)
        let r = g.replica
        host.worker.start(name: "cairn-gcs-replica-\(r)") { batch, tick in
            let actions = host.step(batch, tick: tick, now: clock())
            do {
                let warning = try GCSStall.commit(by: "replica \(r)") { try EmbeddedGCS.persist(actions, coordinator: false, to: host.store) }
                if let warning { log("warning: " + warning) }
            } catch {
                // Nothing that depends on the failed commit may be sent: stop, as a crash would.
                log("cannot persist: \(error); exiting")
                exit(4)
            }
            guard let connection = link.withLock({ $0 }) else { return false }
            let encoder = BinaryEncoder()
            let sentAt = clock()
            for case .send(let m, let to) in actions {
                guard let bytes = try? encoder.encode(GCSFrame(from: .replica(r), to: to, message: EmbeddedGCS.stamped(m, at: sentAt))) else { continue }
                try? connection.send(bytes, control: m.isControl)
            }
            return false  // this process ticks at its own pace, busy or not
        }
        let handlers = WireHandlers(message: { _, bytes in
            guard let frame = try? BinaryDecoder().decode(GCSFrame.self, from: bytes) else {
                log("a frame from the head does not decode; exiting")
                exit(3)
            }
            host.worker.post(.message(frame.message, from: frame.from))
        }, closed: { _, reason in
            log("lost the head (\(reason)); exiting")
            exit(Cluster.lostHeadExitStatus)
        }, log: log)
        let connected = DispatchSemaphore(value: 0)
        Task {
            do {
                let connection = try await Wire.connect(host: hubHost, port: hubPort, token: token, name: "gcs-replica-\(r)", epoch: 1,
                                                        handlers: handlers, options: .failureDetecting(milliseconds: launch.failureTimeoutMs))
                link.withLock { $0 = connection }
            } catch {
                log("cannot connect to the head at \(g.hub): \(error)")
                exit(3)
            }
            connected.signal()
        }
        connected.wait()
        // Started again at a low priority by the head (see ``ReplicaSupervisor``): loaded and
        // connected, it takes its share again. A nice value is per thread here, inherited by
        // the threads a thread starts; the dispatch pool's threads set their own, and keep them.
        let which = __priority_which_t(PRIO_PROCESS.rawValue)
        if getpriority(which, 0) == ReplicaSupervisor.startingNice, let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task") {
            for t in tasks {
                guard let tid = id_t(t) else { continue }
                errno = 0
                if getpriority(which, tid) == ReplicaSupervisor.startingNice && errno == 0 { setpriority(which, tid, 0) }
            }
        }
        startThread(named: "cairn-gcs-tick") {
            while true {
                if let warning = GCSStall.sleep(microseconds: g.tickIntervalMicroseconds) { log("warning: " + warning) }
                host.worker.tick()
            }
        }
        NodeProcess.waitForHead(launch, log)
    }
}
