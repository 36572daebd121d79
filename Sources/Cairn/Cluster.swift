import CairnCore
import CairnNet
import CairnWire
import Foundation
import Synchronization

/// Where the control store keeps its tables.
public enum ControlStoreBacking: Sendable {
    /// In the control store's memory only: lost with it.
    case inMemory
    /// In a chain-replicated GCS started with these options (the default: one shard, chains
    /// of 3 and a standby, in a temporary directory removed at shutdown).
    case chainReplicated(EmbeddedGCS.Options)
}

/// How the cluster's components send each other messages.
public enum TransportKind: Sendable {
    /// In memory, each value encoded as it would be on a wire (the default).
    case inMemory
    /// Over TCP on `host`, with the Cairn wire protocol: each component listens on its own port
    /// and every message is encoded, framed, checksummed and sent over a connection that proved
    /// the cluster token. All components still run in this process.
    case tcp(host: String)
}

/// Settings of an embedded cluster.
public struct ClusterOptions: Sendable {
    /// One configuration per node; node 0 hosts the driver (the program that started the cluster).
    public var nodes: [NodeConfiguration]
    /// Seed of the global scheduler's tie-breaking; printed by tests so a run can be replayed.
    public var schedulerSeed: UInt64
    /// How often nodes report their load to the control store, in milliseconds.
    public var housekeepingIntervalMs: Int
    /// Where durable actors keep their logs and checkpoints. Default: LMDB under `.cairn` in the
    /// working directory, opened only when the first durable actor is spawned.
    public var storage: ActorStorageOptions
    /// Receives the runtime's warnings (a corrupt checkpoint skipped, a torn log record
    /// discarded, a failed checkpoint). Default: printed to standard error.
    public var log: @Sendable (String) -> Void
    /// Where the control store's tables live. Default: `.chainReplicated`, an ``EmbeddedGCS``
    /// (chain-replicated, each replica in LMDB): every change to the node, object, task and
    /// actor tables is a GCS write, and the control store answers from what the GCS's
    /// subscriptions bring back, so a restarted control store rebuilds its tables from the GCS.
    /// ``Cluster/gcs`` exposes it for reading and subscribing. `.inMemory` keeps the tables in
    /// the control store's memory only.
    public var controlStore: ControlStoreBacking = .chainReplicated(EmbeddedGCS.Options())
    /// How components exchange messages. Default: ``TransportKind/inMemory``.
    public var transport: TransportKind = .inMemory
    /// Run nodes 1 and up, and the global scheduler, as separate processes (node 0, with the
    /// driver, and the control store with its GCS stay in this process: the head). Each is this
    /// executable started again (or ``nodeExecutable``), which must call
    /// ``Cluster/runNodeIfLaunched(prepare:)`` first thing in `main`. Implies a TCP transport
    /// (on 127.0.0.1 unless ``transport`` names a host). Default: false.
    public var processes = false
    /// The program node processes run; nil: this one.
    public var nodeExecutable: String?
    /// A node process whose connections stay silent this long is declared dead (one whose
    /// connections close, as when it is killed, at once). Default 250.
    public var failureTimeoutMs = 250
    /// Times a task is run again because the node running it died, before its `get` fails
    /// with ``RemoteError/Kind-swift.enum/nodeDied``. Default 3.
    public var maxTaskRetries = 3
    /// With ``processes``: a lone task (the only one its node sends off at that moment, the
    /// last one sent this way being back) whose inputs are all values goes from its owner
    /// straight to a node the node table lists as idle, instead of through the global
    /// scheduler: one TCP hop and the placement notice fewer. Bursts, tasks with references
    /// among their inputs and everything when no node is idle still go to the scheduler.
    /// Default true; false sends every task a node does not run itself to the scheduler.
    public var placeLoneTasksDirectly = true
    /// With ``processes``: a driver's node (one with no CPU) sends its lone tasks (above) by a
    /// lane, a connection of its own to the node that runs them, written by the thread that
    /// submits and read by a thread blocked on the socket at each end, and the results come
    /// back the same way: no event loop on a lone task's way (a round trip of ~45 µs instead
    /// of ~150 here). Default true; false sends them through the event loops' connections.
    public var lanes = true
    /// Start a replacement node process (with a new node ID) for each one that dies. Default true.
    public var replaceDeadNodes = true
    /// With ``processes``: the head also listens on this port (0: any free one) of the
    /// transport's host for nodes joining from outside (`cairn start --address`), drivers
    /// connecting (``Cluster/connect(to:token:resources:host:)``) and status requests
    /// (`cairn status`). Default nil: not at all.
    public var headPort: Int?
    /// The cluster token every connection must prove; nil: a new random one.
    public var token: ClusterToken?
    /// With ``processes`` and a chain-replicated ``controlStore``: each GCS replica runs in a
    /// process of its own (the same program as the nodes), which the head starts again from
    /// its LMDB whenever it exits. Default false: the replicas run on threads of the head.
    /// (Across processes a failover takes longer, and a replica that rejoins catches up more
    /// slowly; see the README's figures.)
    public var gcsReplicaProcesses = false

    public init(nodes: [NodeConfiguration], schedulerSeed: UInt64 = 1, housekeepingIntervalMs: Int = 2,
                storage: ActorStorageOptions = ActorStorageOptions(), log: @escaping @Sendable (String) -> Void = ClusterOptions.standardErrorLog) {
        precondition(!nodes.isEmpty, "a cluster needs at least one node")
        self.nodes = nodes
        self.schedulerSeed = schedulerSeed
        self.housekeepingIntervalMs = housekeepingIntervalMs
        self.storage = storage
        self.log = log
    }

    /// `count` nodes of `cpus` CPUs each.
    public static func uniform(nodes count: Int, cpus: Double = 1, storage: ActorStorageOptions = ActorStorageOptions()) -> ClusterOptions {
        ClusterOptions(nodes: Array(repeating: NodeConfiguration(resources: Resources(cpus: cpus)), count: count), storage: storage)
    }

    /// Writes `cairn: <line>` to standard error.
    public static let standardErrorLog: @Sendable (String) -> Void = { line in
        FileHandle.standardError.write(Data("cairn: \(line)\n".utf8))
    }
}

/// A Cairn cluster, seen from the driver: submit tasks, spawn actors, `get` and `wait`.
///
/// `Cluster.local()` runs an embedded cluster inside this process (the default, like
/// `ray.init()`): every node, the global scheduler and the control store are separate
/// components that talk only through messages. The most recently started cluster is the
/// one `f.remote(…)` submits to from the driver; inside a task, work goes to the task's node.
public final class Cluster: Sendable {
    let nodes: [Node]
    let transport: any Transport
    /// The control store (nil in a driver connected to a cluster whose head runs elsewhere).
    private let controlStore: Locked<ControlStoreServer>?
    private let log: @Sendable (String) -> Void
    /// The chain-replicated GCS holding the control store's tables (nil with
    /// `ClusterOptions.controlStore = .inMemory`): rows under `node/`, `obj/`, `task/` and
    /// `actor/`, keyed by ID, each a ``BinaryEncoder`` document (see ``ControlTables``).
    public let gcs: EmbeddedGCS?
    /// The global scheduler, in this process (nil when it runs in its own, with ``ClusterOptions/processes``).
    private let scheduler: GlobalScheduler?
    private let releases = ReleaseQueue()
    private let running = Atomic<Bool>(true)
    private let housekeeper: Housekeeper
    private let actorStorage: LazyActorStorage
    /// Starts and watches the node processes of a cluster with ``ClusterOptions/processes``.
    let supervisor: NodeSupervisor?
    private let lostNodes: LostNodeReporter
    /// Whether dead node processes are replaced (durable actors then wait for a node that fits).
    private let replacementsExpected: Bool
    /// ``ClusterOptions/lanes`` in a cluster of processes.
    private let lanes: Bool
    /// The head's port, with ``ClusterOptions/headPort``.
    private let headService = Locked<HeadService?>(nil)

    /// The name the head process gives in its connections.
    static let headName = "head"

    /// The node the driver submits to.
    var driverNode: Node { nodes[0] }

    /// Starts an embedded cluster of `nodes` nodes, each with `cpus` CPUs.
    public static func local(nodes: Int = 4, cpus: Double = 1) async throws -> Cluster {
        try await local(ClusterOptions.uniform(nodes: nodes, cpus: cpus))
    }

    /// Starts an embedded cluster with the given options.
    public static func local(_ options: ClusterOptions) async throws -> Cluster {
        var options = options
        if options.processes, case .inMemory = options.transport { options.transport = .tcp(host: "127.0.0.1") }
        guard options.failureTimeoutMs >= 100 else {
            throw CairnError(.invalidArgument, "failureTimeoutMs must be at least 100 (heartbeats go every 50 ms); got \(options.failureTimeoutMs)")
        }
        if let port = options.headPort {
            guard options.processes else {
                throw CairnError(.invalidArgument, "headPort needs processes = true: nodes and drivers join a cluster of processes")
            }
            guard (0...65_535).contains(port) else { throw CairnError(.invalidArgument, "headPort must be 0 to 65535; got \(port)") }
        }
        guard options.maxTaskRetries >= 0 else {
            throw CairnError(.invalidArgument, "maxTaskRetries must not be negative; got \(options.maxTaskRetries)")
        }
        if let path = options.nodeExecutable, access(path, X_OK) != 0 {
            throw CairnError(.invalidArgument, "nodeExecutable \(path) is not an executable file")
        }
        if case .tcp(let host) = options.transport {
            // Every component will listen on `host`: check that it can, before starting any.
            do {
                let probe = try await Wire.listen(host: host, port: 0, token: .generate(), epoch: 0,
                                                  handlers: WireHandlers(message: { _, _ in }))
                try await probe.close()
            } catch {
                throw CairnError(.invalidArgument, "transport .tcp(host: \"\(host)\"): cannot listen there (\(error)); give an address of this machine, such as 127.0.0.1")
            }
        }
        if options.processes && options.token == nil { options.token = .generate() }
        var gcs: EmbeddedGCS?
        if case .chainReplicated(var gcsOptions) = options.controlStore {
            if options.processes && options.gcsReplicaProcesses, case .tcp(let host) = options.transport, let token = options.token {
                gcsOptions.replicaProcesses = ReplicaProcesses(executable: options.nodeExecutable ?? currentExecutablePath(), host: host, token: token,
                                                               silenceTimeoutMs: max(options.failureTimeoutMs, 1_000))
            }
            do {
                gcs = try EmbeddedGCS.start(gcsOptions)
            } catch let e as GCSError where e.code == .invalidOptions {
                throw CairnError(.invalidArgument, "the chain-replicated control store's options: \(e.detail)")
            } catch {
                throw CairnError(.storage, "the chain-replicated control store could not start: \(error)")
            }
        }
        let cluster = Cluster(options, gcs: gcs)
        if let supervisor = cluster.supervisor {
            do {
                try supervisor.startAll()
                if let port = options.headPort, case .tcp(let host) = options.transport {
                    try cluster.serveHead(host: host, port: port, supervisor: supervisor)
                }
            } catch {
                cluster.shutdown()
                throw error
            }
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while cluster.nodes.contains(where: { $0.aliveNodes.count < options.nodes.count }) {
            guard ContinuousClock.now < deadline else {
                cluster.shutdown()
                throw CairnError(.shutDown, "the cluster's nodes did not all register with the control store within 10 s")
            }
            try await Task.sleep(for: .microseconds(100))
        }
        DefaultCluster.set(cluster)
        return cluster
    }

    private init(_ options: ClusterOptions, gcs: EmbeddedGCS?) {
        let transport: any Transport
        let lost = LostNodeReporter()
        lostNodes = lost
        switch options.transport {
        case .inMemory:
            transport = InMemoryTransport()
        case .tcp(let host) where options.processes:
            // Components of this process talk in memory; node processes over TCP, with
            // connections that declare a silent peer dead after `failureTimeoutMs`.
            transport = TCPTransport(host: host, token: options.token ?? .generate(), name: Self.headName, shortcutLocal: true,
                                     lanes: options.lanes, wire: .failureDetecting(milliseconds: options.failureTimeoutMs), log: options.log) { peer, reason in
                lost.report(peer: peer, reason: "its connection closed (\(reason))")
            }
        case .tcp(let host):
            // A 10 s silence timeout: within one process a silent connection means a starved
            // event loop, not a dead peer. (A closed connection loses nothing, its sender carries
            // again what was not acknowledged, but it is remade for nothing.)
            transport = TCPTransport(host: host, token: options.token ?? .generate(), wire: WireOptions(connection: .init(heartbeatTicks: 5, timeoutTicks: 1_000)),
                                     log: options.log)
        }
        self.transport = transport
        self.gcs = gcs
        log = options.log
        replacementsExpected = options.processes && options.replaceDeadNodes
        lanes = options.processes && options.lanes
        controlStore = Locked(ControlStoreServer(transport: transport, gcs: gcs, replacementsExpected: replacementsExpected, startsNewCluster: true,
                                                 log: options.log))
        scheduler = options.processes ? nil : GlobalScheduler(transport: transport, seed: options.schedulerSeed)
        let releases = self.releases
        var storage = options.storage
        if options.processes, let directory = storage.absoluteDirectory { storage.location = .directory(directory) }
        let actorStorage = LazyActorStorage(options: storage, perActor: options.processes, log: options.log)
        self.actorStorage = actorStorage
        let hereHosted = options.processes ? Array(options.nodes.prefix(1)) : options.nodes
        nodes = hereHosted.enumerated().map { i, config in
            Node(id: NodeID(i), configuration: config, transport: transport, actorStorage: actorStorage,
                 maxTaskRetries: options.maxTaskRetries, inProcessCluster: options.processes,
                 placeLoneTasksDirectly: options.placeLoneTasksDirectly) { oid in
                releases.add(oid)
            }
        }
        if options.processes, case .tcp(let host) = options.transport, let tcp = transport as? TCPTransport {
            lost.connect(transport, local: Set(nodes.map(\.id)))
            let template = NodeLaunch(node: NodeID(0), resources: Resources(), functions: nil, storeLimitBytes: 0, spillThreshold: 0, host: host,
                                      controlStore: tcp.localAddress(.controlStore) ?? "", schedulerSeed: options.schedulerSeed,
                                      tokenFile: "", failureTimeoutMs: options.failureTimeoutMs, maxTaskRetries: options.maxTaskRetries,
                                      placeLoneTasksDirectly: options.placeLoneTasksDirectly,
                                      housekeepingIntervalMs: options.housekeepingIntervalMs, head: getpid(),
                                      storageDirectory: options.storage.absoluteDirectory, replicatedStorage: options.storage.location == .replicated,
                                      checkpointsKept: options.storage.checkpointsKept, logSegmentBytes: options.storage.logSegmentBytes)
            supervisor = NodeSupervisor(executable: options.nodeExecutable ?? currentExecutablePath(), token: tcp.token, template: template,
                                        configurations: Array(options.nodes.dropFirst()), firstID: 1,
                                        restart: options.replaceDeadNodes, log: options.log) { node, reason in
                lost.report(peer: node.description, reason: reason)
            }
            lost.setFence { [supervisor] node in supervisor?.fence(node) }
        } else {
            supervisor = nil
        }
        housekeeper = .nodes(nodes, releases: releases, transport: transport, intervalMs: options.housekeepingIntervalMs)
    }

    /// A driver's cluster handle joined to a cluster whose head runs elsewhere: one node (the
    /// driver's) in this process, talking to the head's control store and the other nodes.
    private init(joined launch: NodeLaunch, token: ClusterToken, log: @escaping @Sendable (String) -> Void) throws {
        // The head is the cluster's control store: without it nothing this driver waits for
        // can be answered (node processes stop when they lose it), so the driver's node is cut
        // off, and every get, wait and spawn fails with the reason instead of waiting.
        let driver = Mutex<Node?>(nil)
        let transport = try launch.transport(token: token, name: launch.node.description, lanes: false, log: log) { peer, reason in
            guard peer == Cluster.headName || peer == Endpoint.controlStore.description,
                  let node = driver.withLock({ $0 }), node.cutOffReason == nil else { return }
            log("lost the head (\(reason)); this cluster handle can no longer reach the cluster")
            node.cutOff(CairnError(.shutDown, "lost the head of the cluster this driver joined (\(reason)); nothing more can be answered: connect again once a head runs"))
        }
        self.transport = transport
        self.log = log
        gcs = nil
        scheduler = nil
        controlStore = nil
        supervisor = nil
        lostNodes = LostNodeReporter()
        replacementsExpected = false
        lanes = false
        let actorStorage = LazyActorStorage(options: launch.storage, perActor: true, log: log)
        self.actorStorage = actorStorage
        let node = launch.node(on: transport, storage: actorStorage, releases: releases)
        driver.withLock { $0 = node }
        nodes = [node]
        housekeeper = .nodes(nodes, releases: releases, transport: transport, intervalMs: launch.housekeepingIntervalMs)
    }

    /// Connects this program, as a driver, to a running cluster of processes: the head at
    /// `address` (its ``ClusterOptions/headPort``, as `cairn start --head` prints it) gives this
    /// process a node of its own (by default with no CPU, so tasks run on the cluster's nodes),
    /// listening on `host`. The returned handle submits tasks, spawns actors and gets values
    /// like a local cluster's; the nodes run them with their own code, so they must be this
    /// program (or one that registers the same functions and actor types).
    ///
    /// Throws ``CairnError/Code-swift.enum/shutDown`` if the head cannot be reached or refuses
    /// the token, ``CairnError/Code-swift.enum/invalidArgument`` for a bad address.
    public static func connect(to address: String, token: ClusterToken, resources: Resources = Resources(cpus: 0),
                               host: String = "127.0.0.1", log: @escaping @Sendable (String) -> Void = ClusterOptions.standardErrorLog) async throws -> Cluster {
        let launch = try await join(address: address, token: token, resources: resources, functions: nil, host: host)
        let cluster = try Cluster(joined: launch, token: token, log: log)
        let deadline = ContinuousClock.now + .seconds(30)
        while !cluster.driverNode.aliveNodes.contains(launch.node) {
            guard ContinuousClock.now < deadline else {
                cluster.shutdown()
                throw CairnError(.shutDown, "\(launch.node) did not register with the head's control store within 30 s")
            }
            try await Task.sleep(for: .milliseconds(1))
        }
        DefaultCluster.set(cluster)
        return cluster
    }

    /// ``connect(to:token:resources:host:log:)`` with the token read from `tokenFile` (as
    /// `cairn start --head` writes it: mode 0600). Throws
    /// ``CairnError/Code-swift.enum/invalidArgument`` if the file cannot be read or others can read it.
    public static func connect(to address: String, tokenFile: String, resources: Resources = Resources(cpus: 0),
                               host: String = "127.0.0.1", log: @escaping @Sendable (String) -> Void = ClusterOptions.standardErrorLog) async throws -> Cluster {
        let token: ClusterToken
        do {
            token = try ClusterToken.read(from: tokenFile)
        } catch {
            throw CairnError(.invalidArgument, "cannot read the cluster token: \(error)")
        }
        return try await connect(to: address, token: token, resources: resources, host: host, log: log)
    }

    /// Asks the head at `address` for a node ID and what a node joining needs to know.
    static func join(address: String, token: ClusterToken, resources: Resources, functions: Set<String>?, host: String) async throws -> NodeLaunch {
        try launch(from: try await HeadService.request(.join(resources: resources, functions: functions, host: host), address: address, token: token),
                   address: address, what: "join")
    }

    /// The launch a head answered a join with.
    private static func launch(from reply: HeadReply, address: String, what: String) throws -> NodeLaunch {
        switch reply {
        case .joined(let launch): return launch
        case .refused(let why): throw CairnError(.invalidArgument, "the head at \(address) refused the \(what): \(why)")
        case .status: throw CairnError(.serialization, "the head at \(address) answered a join with a status report")
        }
    }

    /// Reads the token in `tokenFile`, asks the head at `address` with `request`, and returns
    /// the launch it answers, naming the token file by its absolute path.
    private static func launch(asking request: HeadRequest, of address: String, tokenFile: String, what: String) async throws -> NodeLaunch {
        let token: ClusterToken
        do {
            token = try ClusterToken.read(from: tokenFile)
        } catch {
            throw CairnError(.invalidArgument, "cannot read the cluster token: \(error)")
        }
        var launch = try launch(from: try await HeadService.request(request, address: address, token: token), address: address, what: what)
        launch.tokenFile = tokenFile.hasPrefix("/") ? tokenFile : FileManager.default.currentDirectoryPath + "/" + tokenFile
        return launch
    }

    /// Starts a node process that joins the cluster whose head is at `address` (what
    /// `cairn start --address` does): `executable` (searched in PATH) is started in node mode,
    /// so it must call ``runNodeIfLaunched(prepare:)`` first thing in `main`. Detached (a
    /// process group of its own, hang-ups ignored), its output appended to `logFile`. It stops
    /// when it loses the head. Returns its node and pid.
    public static func startNode(joining address: String, tokenFile: String, executable: String, resources: Resources = Resources(cpus: 1),
                                 functions: Set<String>? = nil, host: String = "127.0.0.1", logFile: String? = nil) async throws -> (node: NodeID, pid: Int32) {
        let launch = try await launch(asking: .join(resources: resources, functions: functions, host: host), of: address, tokenFile: tokenFile, what: "join")
        let pid = try launch.start([executable], detached: true, logFile: logFile)
        return (launch.node, pid)
    }

    /// Starts a global scheduler process that joins the cluster whose head is at `address` as
    /// a standby (what `cairn scheduler` does): it takes over when the active scheduler's
    /// process is lost. `executable` is started in scheduler mode, so it must call
    /// ``runNodeIfLaunched(prepare:)`` first thing in `main`. Detached, its output appended to
    /// `logFile`; it stops when it loses the head. Returns its pid.
    public static func startScheduler(joining address: String, tokenFile: String, executable: String, host: String = "127.0.0.1",
                                      logFile: String? = nil) async throws -> Int32 {
        let launch = try await launch(asking: .joinScheduler(host: host), of: address, tokenFile: tokenFile, what: "scheduler")
        return try launch.start([executable], detached: true, logFile: logFile)
    }

    /// Starts a GCS replica process that joins the GCS of the head at `address` as a standby
    /// of `shard` (nil: the shard with the fewest replicas), keeping its LMDB in
    /// `storage/gcs-replica-<ID>` (what `cairn gcs` does): when a chain of its shard loses a
    /// replica and it is the first standby, it catches up and takes the place. The head must run
    /// its replicas in processes (``ClusterOptions/gcsReplicaProcesses``). `executable` must
    /// call ``runNodeIfLaunched(prepare:)`` first thing in `main`. Detached, its output
    /// appended to `logFile`; it stops when it loses the head, and is not started again.
    /// Returns its replica ID and pid.
    public static func startReplica(joining address: String, tokenFile: String, executable: String, storage: String, shard: Int? = nil,
                                    logFile: String? = nil) async throws -> (replica: Int, pid: Int32) {
        var launch = try await launch(asking: .joinReplica(shard: shard), of: address, tokenFile: tokenFile, what: "replica")
        guard var replica = launch.gcs else { throw CairnError(.serialization, "the head at \(address) answered without a replica") }
        let root = storage.hasPrefix("/") ? storage : FileManager.default.currentDirectoryPath + "/" + storage
        replica.directory = root + "/gcs-replica-\(replica.replica)"
        do {
            // A joining replica is new to the head, so it starts empty. A directory of that name
            // is left by a replica of an earlier head (which numbers its replicas afresh), and
            // its log is not this GCS's history.
            if FileManager.default.fileExists(atPath: replica.directory) { try FileManager.default.removeItem(atPath: replica.directory) }
            try FileManager.default.createDirectory(atPath: replica.directory, withIntermediateDirectories: true)
        } catch {
            throw CairnError(.storage, "cannot make the replica's directory \(replica.directory) afresh: \(error)")
        }
        launch.gcs = replica
        return (replica.replica, try launch.start([executable], detached: true, logFile: logFile))
    }

    /// Starts `arguments` (the program first) detached: a process group of its own, hang-ups
    /// ignored, standard input on `/dev/null`, output and errors appended to `logFile`: how
    /// `cairn start --head` puts the head in the background. Returns its pid.
    public static func startDetached(_ arguments: [String], logFile: String) throws -> Int32 {
        try spawnProcess(arguments, environment: NodeLaunch.inheritedEnvironment, detached: true, logFile: logFile)
    }

    /// The status of the cluster whose head is at `address`: what `cairn status` prints.
    public static func status(of address: String, token: ClusterToken) async throws -> ClusterReport {
        switch try await HeadService.request(.status, address: address, token: token) {
        case .status(let report): return report
        case .refused(let why): throw CairnError(.invalidArgument, "the head at \(address) refused: \(why)")
        case .joined: throw CairnError(.serialization, "the head at \(address) answered a status request with a join")
        }
    }

    /// Opens the head's port.
    private func serveHead(host: String, port: Int, supervisor: NodeSupervisor) throws {
        guard let tcp = transport as? TCPTransport else { throw CairnError(.invalidArgument, "the head port needs a TCP transport") }
        let service = try HeadService(host: host, port: port, token: tcp.token, log: log) { [weak self] request in
            guard let self else { return .refused("the cluster is shutting down") }
            switch request {
            case .joinScheduler(let host):
                return .joined(supervisor.joiningScheduler(host: host))
            case .joinReplica(let shard):
                guard let gcs = self.gcs, let processes = gcs.options.replicaProcesses else {
                    return .refused(self.gcs == nil ? "this head keeps its control store in memory, with no GCS to join"
                                    : "this head runs its GCS replicas on its own threads, so none can join; start it with --gcs-processes")
                }
                do {
                    return .joined(supervisor.joiningReplica(try gcs.join(shard: shard), silenceMs: processes.silenceTimeoutMs))
                } catch {
                    return .refused("\(error)")
                }
            case .join(let resources, let functions, let host):
                do {
                    return .joined(try supervisor.joining(resources: resources, functions: functions, host: host))
                } catch {
                    return .refused("\(error)")
                }
            case .status:
                return .status(self.report())
            }
        }
        headService.update { $0 = service }
    }

    /// `host:port` of the head's port (with ``ClusterOptions/headPort``), for nodes and drivers to join.
    public var headAddress: String? {
        guard let service = headService.value, case let tcp as TCPTransport = transport else { return nil }
        return "\(tcp.host):\(service.listener.port)"
    }

    /// The cluster token (of a cluster over TCP): connections prove it; `cairn start --head` writes it to a 0600 file.
    public var token: ClusterToken? { (transport as? TCPTransport)?.token }

    /// The head's view of the cluster: nodes, actors, GCS chains (empty in a driver connected
    /// to a head elsewhere: ask the head with ``status(of:token:)``).
    public func report() -> ClusterReport {
        let (nodes, actors, schedulers) = controlStore?.value.published.withLock { $0 } ?? ([], [], [])
        return ClusterReport(
            nodes: nodes.map { .init(id: $0.id, address: $0.address, resources: $0.resources, queued: $0.queued, alive: $0.alive) },
            actors: actors.map(\.status),
            schedulers: schedulers,
            chains: gcs.map { gcs in
                let hosts = gcs.replicaHosts
                let statuses = Dictionary(gcs.replicaStatuses().map { ($0.replica, $0) }, uniquingKeysWith: { a, _ in a })
                return gcs.configurations().sorted { $0.shard < $1.shard }.map { c in
                    let standbys = hosts.values.filter { $0.shard == c.shard && !c.contains($0.id) }.map(\.id).sorted()
                    let held = statuses[c.tail].map { "; tail applied \($0.lastSequence) updates, holds \($0.heldUpdates) after its compacted base" } ?? ""
                    return "shard \(c.shard) (epoch \(c.epoch)): \(c.chain.map { "\($0)" }.joined(separator: " -> "))"
                        + (c.learner.map { " (learner \($0))" } ?? "") + (standbys.isEmpty ? "" : "; standby \(standbys.map(String.init).joined(separator: ", "))")
                        + held
                }
            } ?? [])
    }

    /// Stops every component. Pending `get`s fail with a cancelled ``RemoteError``; later calls
    /// throw ``CairnError/Code-swift.enum/shutDown``. Durable actors finish their queued
    /// checkpoints and are recorded as stopped cleanly, so their next start is not a restart.
    public func shutdown() {
        guard running.exchange(false, ordering: .relaxed) else { return }
        headService.value?.listener.closeBlocking()
        housekeeper.stop()
        // Node processes stopped on purpose are not declared dead, and their connections close quietly.
        lostNodes.disconnect()
        (transport as? TCPTransport)?.quiesce()
        supervisor?.stop()
        nodes.forEach { $0.stop() }
        actorStorage.close()
        transport.shutdown()
        gcs?.shutdown()
        DefaultCluster.clear(self)
    }

    /// The number of nodes.
    public var nodeCount: Int { nodes.count }

    // MARK: objects

    /// Stores `value` in the cluster (on the driver's node) and returns a reference to it.
    public func put<T: RemoteValue>(_ value: T) -> ObjectRef<T> {
        driverNode.put(value)
    }

    /// Waits for `ref`'s value. Throws the task's ``RemoteError`` if it failed, or
    /// ``CairnError/Code-swift.enum/timeout`` after `timeout`.
    public func get<T: RemoteValue>(_ ref: ObjectRef<T>, timeout: Duration? = nil) async throws -> T {
        // A short task usually finishes within a few microseconds: look for the result briefly
        // before suspending, which would cost a thread wake-up to resume. With lanes, a lone
        // task sent to another node comes back in some tens of microseconds: look longer.
        if running.load(ordering: .relaxed),
           let value = driverNode.spinGet(ref.id, microseconds: 20, directMicroseconds: lanes ? Self.directSpinMicroseconds : nil) {
            return try value.value(as: T.self)
        }
        return try await get([ref], timeout: timeout)[0]
    }

    /// How long `get` looks for a lone task's result before suspending (see above): 4 paired
    /// `cairn-bench cluster` runs gave `cluster.task_rtt_p50_us` 37–75 µs (median ~47) with
    /// 150 against 68–87 (median ~74) with 20.
    static let directSpinMicroseconds: UInt64 = 150
    /// Waits for every value, returned in the order of `refs`.
    public func get<T: RemoteValue>(_ refs: [ObjectRef<T>], timeout: Duration? = nil) async throws -> [T] {
        let values = try await collect(refs.map(\.id), count: refs.count, timeout: timeout, failOnTimeout: true)
        return try values.map { try $0!.value(as: T.self) }
    }

    /// Ray's `wait`: returns once `count` of `refs` are ready or `timeout` passes, as
    /// (ready, notReady), each in the order of `refs`. A failed task counts as ready.
    ///
    /// Throws ``CairnError/Code-swift.enum/invalidArgument`` if `refs` has duplicates or `count`
    /// is not in `1...refs.count`.
    public func wait<T: RemoteValue>(_ refs: [ObjectRef<T>], count: Int = 1, timeout: Duration? = nil) async throws -> (ready: [ObjectRef<T>], notReady: [ObjectRef<T>]) {
        guard Set(refs.map(\.id)).count == refs.count else {
            throw CairnError(.invalidArgument, "wait was given the same ObjectRef more than once; pass each ref once")
        }
        guard count >= 1 && count <= refs.count else {
            throw CairnError(.invalidArgument, "wait count must be between 1 and the number of refs (\(refs.count)); got \(count)")
        }
        let values = try await collect(refs.map(\.id), count: count, timeout: timeout, failOnTimeout: false)
        var ready: [ObjectRef<T>] = []
        var notReady: [ObjectRef<T>] = []
        for (i, ref) in refs.enumerated() {
            if values[i] != nil { ready.append(ref) } else { notReady.append(ref) }
        }
        return (ready, notReady)
    }

    /// Cancels a task that has not started running; its `get` then throws a cancelled
    /// ``RemoteError``. Returns false if it already ran, is running, or was placed on another node.
    @discardableResult
    public func cancel<T: RemoteValue>(_ ref: ObjectRef<T>) -> Bool {
        driverNode.cancel(ref.id)
    }

    private func collect(_ oids: [ObjectID], count: Int, timeout: Duration?, failOnTimeout: Bool) async throws -> [StoredValue?] {
        guard running.load(ordering: .relaxed) else { throw CairnError(.shutDown, "the cluster was shut down") }
        if let error = driverNode.cutOffReason { throw error }
        let gather = Gather(total: oids.count, needed: count)
        // Values already present are recorded before the timer starts, so even a zero
        // timeout reports everything that is ready at the moment of the call.
        let poll = timeout.map { $0 <= .zero } ?? false
        driverNode.whenAvailable(oids, into: gather, waiting: !poll)
        if poll, let timeout {
            // A poll: what is ready now, with no timer task and no suspension.
            let values = gather.finishNow()
            if failOnTimeout, case let ready = values.count(where: { $0 != nil }), ready < count {
                throw CairnError(.timeout, "\(oids.count - ready) of \(oids.count) objects were not ready within \(timeout)")
            }
            return values
        }
        let timer: Task<Void, Never>? = timeout.map { timeout in
            Task {
                // Cancelled once the values are in; only a timeout that really passes expires the gather.
                guard (try? await Task.sleep(for: timeout)) != nil else { return }
                gather.expire(failOnTimeout ? CairnError(.timeout, "\(oids.count - gather.readyCount) of \(oids.count) objects were not ready within \(timeout)") : nil)
            }
        }
        defer { timer?.cancel() }
        return try await withCheckedThrowingContinuation { continuation in
            gather.start(continuation)
        }
    }

    // MARK: actors

    /// Creates an actor from its initial state on a node with the resources it needs.
    public func spawn<A: RemoteActor>(_ initial: A, resources: Resources = Resources(cpus: 0)) async throws -> ActorHandle<A> {
        FunctionRegistry.process.register(A.self)
        let id: ActorID = try await withCheckedThrowingContinuation { continuation in
            driverNode.spawnActor(typeName: A.actorTypeName, state: .boxed(initial), resources: resources) { result in
                continuation.resume(with: result.map(\.0))
            }
        }
        return ActorHandle(id: id)
    }

    /// Spawns a durable actor named `name`, or restores it if its storage already holds it.
    ///
    /// A new actor starts from `initial`; an existing one comes back from its newest valid
    /// checkpoint plus every logged message after it, replayed in order, before this returns
    /// and before any new message is accepted (`initial` is then ignored). With
    /// ``MessageLogging/durable`` logging every message is in the fsync'd log before it runs and
    /// before its reply exists, so the state after any number of crashes is the state reached
    /// by applying each acknowledged message once, in each caller's order.
    ///
    /// Handlers must be deterministic: replay runs them again and must reach the same state.
    /// Effects outside the state (a file written, a request sent) happen at least once: a
    /// message applied before a crash but after the last checkpoint runs again during replay.
    ///
    /// Spawning a name already hosted in this cluster returns the same actor. Throws
    /// ``CairnError/Code-swift.enum/actorDead`` after more than `maxRestarts` crashes,
    /// ``CairnError/Code-swift.enum/invalidArgument`` if `name` is empty, longer than 200 bytes
    /// or held by another actor type, and ``CairnError/Code-swift.enum/storage`` if the storage
    /// cannot be opened or holds no usable checkpoint.
    public func spawn<A: RemoteActor>(_ initial: A, name: String, durability: DurabilityOptions = DurabilityOptions(),
                                      resources: Resources = Resources(cpus: 0)) async throws -> ActorHandle<A> {
        guard !name.isEmpty, name.utf8.count <= 200 else {
            throw CairnError(.invalidArgument, "a durable actor's name must be 1 to 200 bytes of UTF-8; got \(name.utf8.count)")
        }
        guard running.load(ordering: .relaxed) else { throw CairnError(.shutDown, "the cluster was shut down") }
        FunctionRegistry.process.register(A.self)
        let spawn = DurableSpawn(name: name, options: durability)
        let id: ActorID = try await withCheckedThrowingContinuation { continuation in
            driverNode.spawnActor(typeName: A.actorTypeName, state: .boxed(initial), resources: resources, durable: spawn) { result in
                continuation.resume(with: result.map(\.0))
            }
        }
        return ActorHandle(id: id)
    }

    /// Checkpoints a durable actor now, after the messages sent to it before this call. The
    /// reference resolves, once the checkpoint is durable, to the log position it covers.
    public func checkpoint<A: RemoteActor>(_ actor: ActorHandle<A>) throws -> ObjectRef<UInt64> {
        try driverNode.sendToActor(actor.id, typeName: actor.typeName, message: .boxed(0), checkpointRequest: true)
    }

    /// The control store's record of an actor: where it lives, its state, and for a durable
    /// actor its restarts, newest checkpoint and log position.
    public func status<A: RemoteActor>(of actor: ActorHandle<A>) async throws -> ActorStatus {
        let record: ActorRecord? = await withCheckedContinuation { continuation in
            driverNode.describeActor(actor.id) { continuation.resume(returning: $0) }
        }
        guard let r = record else { throw CairnError(.actorUnavailable, "the control store has no record of \(actor.id)") }
        return r.status
    }

    /// Where the control store's object table says the object behind `ref` lives: the node
    /// and its size (as Ray's `get_object_locations`). Objects of 64 KiB or more are recorded,
    /// shortly after they are stored; nil for smaller ones, and for freed or unknown ones.
    public func location<T>(of ref: ObjectRef<T>) async -> ObjectLocation? {
        await withCheckedContinuation { continuation in
            driverNode.locateObject(ref.id) { continuation.resume(returning: $0) }
        }
    }

    /// Replaces the control store with a new, empty incarnation, as after a crash of its
    /// process: with a chain-replicated backing it rebuilds every table from the GCS before it
    /// answers; in memory, the tables are gone. Nodes and the scheduler subscribe again. (The
    /// previous incarnation's GCS subscriptions stay open, their deliveries ignored by
    /// generation: fine for tests, which is what this is for.)
    func restartControlStore() {
        controlStore?.update { $0 = ControlStoreServer(transport: transport, gcs: gcs, replacementsExpected: replacementsExpected, log: log) }
        transport.send(.control(.subscribeNodes(.scheduler)), to: .controlStore)
        for n in nodes { n.resubscribe() }
    }

    /// Counters of checkpoints, restores and replays since the cluster started.
    public var metrics: RuntimeMetrics { actorStorage.metrics.snapshot }

    // MARK: inspection

    /// The node processes running now (with ``ClusterOptions/processes``), by node, with pids;
    /// empty for an embedded cluster.
    public var nodeProcesses: [(node: NodeID, pid: Int32)] {
        supervisor?.running.compactMap { child in child.node.map { ($0, child.pid) } } ?? []
    }

    /// The pid of the global scheduler's process (with ``ClusterOptions/processes``); nil when
    /// it runs in this process, or between a crash and its replacement.
    public var schedulerProcess: Int32? { supervisor?.schedulerPID }

    /// Messages this process wrote on lanes and read from them (with ``ClusterOptions/lanes``,
    /// in a cluster of processes): a driver's lone tasks and their results. Zero otherwise.
    public var laneMessages: (sent: Int, received: Int) { (transport as? TCPTransport)?.laneMessages ?? (0, 0) }

    /// The nodes the control store lists as alive, as the driver's node last heard.
    public var aliveNodes: [NodeID] { driverNode.aliveNodes }

    /// Objects and bytes held by each node's store (of this process).
    public var storeStatus: [(node: NodeID, objects: Int, bytes: Int)] {
        nodes.map { ($0.id, $0.storeStatus.objects, $0.storeStatus.bytes) }
    }
}

/// Tells the control store of node processes that are gone, as the transport (a connection
/// closed or fell silent) and the supervisor (the process exited) see it.
final class LostNodeReporter: Sendable {
    private struct State {
        var transport: (any Transport)?
        var local: Set<NodeID> = []
        /// Makes sure a node reported lost is gone (its process killed).
        var fence: (@Sendable (NodeID) -> Void)?
    }
    private let state = Mutex(State())

    func connect(_ transport: any Transport, local: Set<NodeID>) {
        state.withLock {
            $0.transport = transport
            $0.local = local
        }
    }

    func setFence(_ fence: @escaping @Sendable (NodeID) -> Void) {
        state.withLock { $0.fence = fence }
    }

    func disconnect() {
        state.withLock { $0 = State() }
    }

    /// `peer` is a connection's peer name; only node processes (`node-N`, not hosted here) and
    /// scheduler processes (`scheduler-<incarnation>`) count.
    func report(peer: String, reason: String) {
        if let incarnation = NodeLaunch.schedulerIncarnation(peer) {
            state.withLock { $0.transport }?.send(.control(.schedulerLost(incarnation: incarnation)), to: .controlStore)
            return
        }
        guard peer.hasPrefix("node-"), let raw = Int(peer.dropFirst(5)) else { return }
        let node = NodeID(raw)
        let s = state.withLock { $0 }
        guard let transport = s.transport, !s.local.contains(node) else { return }
        s.fence?(node)
        transport.send(.control(.nodeLost(node, reason: reason)), to: .controlStore)
    }
}

/// Objects whose last reference in this process is gone, by owner, until the next housekeeping.
/// Indexed by the owner's node number: no hashing on the path of every released reference.
final class ReleaseQueue: Sendable {
    private let table = Mutex<[[ObjectID]]>([])
    func add(_ oid: ObjectID) {
        let owner = oid.owner.raw
        table.withLock { t in
            while t.count <= owner { t.append([]) }
            t[owner].append(oid)
        }
    }
    func take() -> [NodeID: [ObjectID]] {
        let all = table.withLock { t in
            let all = t
            t = Array(repeating: [], count: t.count)
            return all
        }
        var out: [NodeID: [ObjectID]] = [:]
        for (i, oids) in all.enumerated() where !oids.isEmpty { out[NodeID(i)] = oids }
        return out
    }
}

/// Collects values for `get` and `wait`; resumes its continuation exactly once.
final class Gather: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [StoredValue?]
    private var ready = 0
    private let needed: Int
    private var continuation: CheckedContinuation<[StoredValue?], any Error>?
    private var finished = false

    init(total: Int, needed: Int) {
        values = Array(repeating: nil, count: total)
        self.needed = needed
    }

    var readyCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return ready
    }

    func start(_ c: CheckedContinuation<[StoredValue?], any Error>) {
        lock.lock()
        continuation = c
        let done = ready >= needed
        let expiredEarly = expired
        let error = expiryError
        lock.unlock()
        if expiredEarly {
            // The timeout passed before the continuation was installed.
            finish(error, expired: true)
        } else if done {
            finish(nil)
        }
    }

    func arrived(_ index: Int, _ value: StoredValue) {
        lock.lock()
        if values[index] == nil {
            values[index] = value
            ready += 1
        }
        let done = ready >= needed && continuation != nil
        lock.unlock()
        if done { finish(nil) }
    }

    /// Ends the gather with whatever has arrived so far, for a caller that will not wait.
    func finishNow() -> [StoredValue?] {
        lock.lock()
        defer { lock.unlock() }
        finished = true
        return values
    }

    /// Set once the timeout passed, so that an expiry before `start` is not lost.
    private var expired = false
    private var expiryError: CairnError?

    func expire(_ error: CairnError?) {
        lock.lock()
        expired = true
        expiryError = error
        lock.unlock()
        finish(error, expired: true)
    }

    private func finish(_ error: CairnError?, expired: Bool = false) {
        lock.lock()
        guard !finished, let c = continuation else {
            lock.unlock()
            return
        }
        finished = true
        let snapshot = values
        lock.unlock()
        if let error, expired { c.resume(throwing: error) } else { c.resume(returning: snapshot) }
    }
}

/// Runs a closure every few milliseconds on its own thread until stopped.
extension Housekeeper {
    /// Every `intervalMs`: sends the frees `releases` gathered to the objects' owners, then runs
    /// each node's housekeeping (load reports, backlogged control-store records).
    static func nodes(_ nodes: [Node], releases: ReleaseQueue, transport: any Transport, intervalMs: Int) -> Housekeeper {
        Housekeeper(intervalMs: intervalMs) {
            for (owner, oids) in releases.take() { transport.send(.free(oids), to: .node(owner)) }
            nodes.forEach { $0.housekeeping() }
        }
    }
}

final class Housekeeper: @unchecked Sendable {
    private let condition = NSCondition()
    private var stopped = false
    private var done = false

    init(intervalMs: Int, _ body: @escaping @Sendable () -> Void) {
        startThread(named: "cairn-housekeep") { [self] in
            while true {
                condition.lock()
                if !stopped { _ = condition.wait(until: Date(timeIntervalSinceNow: Double(intervalMs) / 1000)) }
                let stop = stopped
                condition.unlock()
                if stop { break }
                body()
            }
            condition.lock()
            done = true
            condition.broadcast()
            condition.unlock()
        }
    }

    func stop() {
        condition.lock()
        stopped = true
        condition.broadcast()
        while !done { condition.wait() }
        condition.unlock()
    }
}

/// The cluster `f.remote(…)` submits to from outside any task: the most recently started.
enum DefaultCluster {
    private static let current = Mutex<(cluster: Cluster?, generation: UInt64)>((nil, 0))
    /// Changes whenever `current` does. A driver's thread reads it on every submission, and
    /// reading shares its cache line; taking the lock would write to it, and that line also
    /// holds type caches that every thread reads, so each submission paid a cache-line transfer.
    private static let generation = Atomic<UInt64>(0)

    static func set(_ c: Cluster) { change { $0 = c } }
    static func clear(_ c: Cluster) { change { if $0 === c { $0 = nil } } }

    private static func change(_ body: (inout Cluster?) -> Void) {
        current.withLock { state in
            body(&state.cluster)
            state.generation += 1
            generation.store(state.generation, ordering: .releasing)
        }
    }

    /// The default cluster's driver node, remembered per thread while the default cluster
    /// stays the same: a submission from the driver reads an atomic, not a lock.
    static func driverNode() -> Node? {
        let now = generation.load(ordering: .acquiring)
        if let cached = DriverThreadCache.current, cached.generation == now, let node = cached.node { return node }
        let (cluster, generation) = current.withLock { ($0.cluster, $0.generation) }
        guard let node = cluster?.driverNode else {
            DriverThreadCache.set(nil)
            return nil
        }
        DriverThreadCache.set(DriverThreadCache(generation: generation, node: node))
        return node
    }
}

/// What ``DefaultCluster/driverNode()`` remembers on a thread. The node is held weakly: a
/// thread that never submits again keeps no cluster that was shut down alive.
final class DriverThreadCache: Sendable {
    let generation: UInt64
    weak let node: Node?
    init(generation: UInt64, node: Node) {
        self.generation = generation
        self.node = node
    }

    private static let slot = ThreadSlot<DriverThreadCache>()

    static var current: DriverThreadCache? { slot.value }

    static func set(_ cache: DriverThreadCache?) { slot.set(cache) }
}

/// Finds the node that owns work submitted from the current thread.
enum Submitter {
    static func current() throws -> Node {
        if let context = WorkerContext.current { return context.node }
        guard let node = DefaultCluster.driverNode() else {
            throw CairnError(.shutDown, "no cluster is running: start one with `try await Cluster.local()` before calling remote()")
        }
        return node
    }
}

/// Facts about the task or actor call running on the current thread.
public enum TaskContext {
    /// The node running the current task or actor call; nil outside one (on the driver).
    public static var node: NodeID? { WorkerContext.current?.node.id }
}
