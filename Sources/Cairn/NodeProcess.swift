import CairnCodec
import CairnCore
import CairnNet
import CairnWire
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a node process is told to be, in one environment variable (``variable``) set by the
/// head that starts it: a ``BinaryEncoder`` document, hex-encoded.
struct NodeLaunch: Codable, Equatable {
    static let variable = "CAIRN_NODE_LAUNCH"

    enum Role: String, Codable {
        case node
        case scheduler
        case gcsReplica
    }

    var role = Role.node
    var node: NodeID
    var resources: Resources
    var functions: Set<String>?
    var storeLimitBytes: Int
    var spillThreshold: Int
    /// The address this node listens on.
    var host: String
    /// `host:port` of the head's control store (the global scheduler's address comes from it).
    var controlStore: String
    var schedulerSeed: UInt64
    /// The cluster token's file (0600).
    var tokenFile: String
    var failureTimeoutMs: Int
    var maxTaskRetries: Int
    /// ``ClusterOptions/placeLoneTasksDirectly``.
    var placeLoneTasksDirectly = true
    var housekeepingIntervalMs: Int
    /// The head's pid: the node exits when its parent is no longer the head.
    var head: Int32
    /// Durable actors' storage directory, absolute (nil: in memory, so no durable actors here).
    var storageDirectory: String? = nil
    /// Durable actors' storage is in the GCS (``ActorStorageOptions/Location/replicated``).
    var replicatedStorage = false
    var checkpointsKept = 2
    var logSegmentBytes = 16 << 20
    /// For a GCS replica's process.
    var gcs: GCSReplicaLaunch? = nil

    /// The peer name of scheduler process `incarnation`.
    static func schedulerName(_ incarnation: UInt64) -> String { "scheduler-" + String(incarnation, radix: 16) }

    /// The incarnation a scheduler process's peer name carries; nil for any other name.
    static func schedulerIncarnation(_ peer: String) -> UInt64? {
        guard peer.hasPrefix("scheduler-") else { return nil }
        return UInt64(peer.dropFirst(10), radix: 16)
    }

    /// The actor storage options this describes.
    var storage: ActorStorageOptions {
        ActorStorageOptions(location: replicatedStorage ? .replicated : storageDirectory.map { .directory($0) } ?? .inMemory, checkpointsKept: checkpointsKept,
                            logSegmentBytes: logSegmentBytes)
    }

    /// A TCP transport named `name` for this process, which knows where the head's control
    /// store listens; `peerLost` hears of every connection lost. With `lanes`, its node accepts
    /// lanes (``ClusterOptions/lanes``; a driver that has them on opens them).
    func transport(token: ClusterToken, name: String, lanes: Bool = true, log: @escaping @Sendable (String) -> Void,
                   peerLost: @escaping @Sendable (String, CloseReason) -> Void) throws -> TCPTransport {
        guard let control = TCPTransport.split(controlStore) else {
            throw CairnError(.invalidArgument, "bad control store address \(controlStore) in the node's launch description")
        }
        let transport = TCPTransport(host: host, token: token, name: name, shortcutLocal: true, lanes: lanes,
                                     wire: .failureDetecting(milliseconds: failureTimeoutMs), log: log, peerLost: peerLost)
        transport.setAddress(.controlStore, host: control.0, port: control.1)
        return transport
    }

    /// The node this launch describes, on `transport`, in a cluster of processes; references it
    /// releases are gathered in `releases`.
    func node(on transport: TCPTransport, storage: LazyActorStorage, releases: ReleaseQueue) -> Node {
        let configuration = NodeConfiguration(resources: resources, functions: functions, storeLimitBytes: storeLimitBytes,
                                              spillThreshold: spillThreshold)
        return Node(id: node, configuration: configuration, transport: transport, actorStorage: storage,
                    maxTaskRetries: maxTaskRetries, inProcessCluster: true, placeLoneTasksDirectly: placeLoneTasksDirectly) { releases.add($0) }
    }

    func encoded() throws -> String {
        Hex.encode(try BinaryEncoder().encode(self))
    }

    static func decode(_ text: String) throws -> NodeLaunch {
        let bytes: [UInt8]
        do {
            bytes = try Hex.decode(text)
        } catch {
            throw CairnError(.invalidArgument, "\(variable) is not hex (at character \(error.position)); it is set by the head that starts a node, not by hand")
        }
        do {
            return try BinaryDecoder().decode(NodeLaunch.self, from: bytes)
        } catch {
            throw CairnError(.invalidArgument, "\(variable) does not decode (\(error)); it is set by the head that starts a node, not by hand")
        }
    }
}

extension Cluster {
    /// The exit status of a node, scheduler or GCS replica process that stopped because it
    /// lost the head (its connection closed, or the head declared it dead): a supervisor joins
    /// it again at once, as it would a killed one.
    public static let lostHeadExitStatus: Int32 = 3

    /// The entry point of a node process. Call it first thing in `main`.
    ///
    /// A cluster with ``ClusterOptions/processes`` starts its nodes by running this program
    /// again (or ``ClusterOptions/nodeExecutable``) with a launch description in its
    /// environment. In such a process this runs the node (its worker threads, its object
    /// store, its connections to the head) until the head goes away, and then exits; it never
    /// returns. Anywhere else it returns at once, having done nothing.
    ///
    /// `prepare` runs first in a node process: create every ``RemoteFunction`` and register every
    /// actor type (``FunctionRegistry/register(_:)``) that the cluster's tasks may use, since a
    /// Swift global is created only when first touched, and a node knows code only by name.
    public static func runNodeIfLaunched(prepare: () -> Void = {}) {
        guard let text = ProcessInfo.processInfo.environment[NodeLaunch.variable] else { return }
        let launch: NodeLaunch
        do {
            launch = try NodeLaunch.decode(text)
        } catch {
            ClusterOptions.standardErrorLog("\(error)")
            exit(2)
        }
        prepare()
        NodeProcess.run(launch)
    }
}

/// The node side of a cluster of processes.
enum NodeProcess {
    static func run(_ launch: NodeLaunch) -> Never {
        let name: String
        // A scheduler's name carries its incarnation, so the head tells which one's connection closed.
        let incarnation = UInt64.random(in: 1...UInt64.max)
        switch launch.role {
        case .node: name = launch.node.description
        case .scheduler: name = NodeLaunch.schedulerName(incarnation)
        case .gcsReplica: name = "gcs-replica-\(launch.gcs?.replica ?? -1)"
        }
        let log: @Sendable (String) -> Void = { ClusterOptions.standardErrorLog("\(name): \($0)") }
        let token: ClusterToken
        do {
            token = try ClusterToken.read(from: launch.tokenFile)
        } catch {
            log("cannot read the cluster token: \(error)")
            exit(2)
        }
        if launch.role == .gcsReplica {
            guard let g = launch.gcs else {
                log("a GCS replica's launch has no replica description")
                exit(2)
            }
            GCSReplicaProcess.run(launch, g, token: token, log: log)
        }
        let transport: TCPTransport
        do {
            transport = try launch.transport(token: token, name: name, log: log) { peer, reason in
                // Without the head this node can do nothing, and the head has declared it dead
                // (or is gone): it stops, and the head starts a replacement.
                if peer == Cluster.headName || peer == Endpoint.controlStore.description {
                    log("lost the head (\(reason)); exiting")
                    exit(Cluster.lostHeadExitStatus)
                }
            }
        } catch {
            log("\(error)")
            exit(2)
        }
        if launch.role == .scheduler {
            let scheduler = GlobalScheduler(transport: transport, seed: launch.schedulerSeed)
            transport.send(.control(.registerScheduler(address: transport.localAddress(.scheduler) ?? "", incarnation: incarnation)),
                           to: .controlStore)
            withExtendedLifetime(scheduler) { waitForHead(launch, log) }
        }
        let releases = ReleaseQueue()
        let storage = LazyActorStorage(options: launch.storage, perActor: true, log: log)
        let node = launch.node(on: transport, storage: storage, releases: releases)
        let housekeeper = Housekeeper.nodes([node], releases: releases, transport: transport, intervalMs: launch.housekeepingIntervalMs)
        withExtendedLifetime((node, housekeeper)) { waitForHead(launch, log) }
    }

    /// The head started this process; if the head exits, this process is adopted by another
    /// and stops too.
    static func waitForHead(_ launch: NodeLaunch, _ log: @Sendable (String) -> Void) -> Never {
        // A node that joined from outside (head 0) is not the head's child: it stops when its
        // connection to the head is lost.
        while launch.head == 0 || getppid() == launch.head { usleep(20_000) }
        log("the head (pid \(launch.head)) exited; stopping")
        exit(0)
    }
}

extension WireOptions {
    /// Connections that declare a silent peer dead after `milliseconds` (10 ms ticks,
    /// heartbeats after 50 ms idle).
    static func failureDetecting(milliseconds: Int) -> WireOptions {
        WireOptions(connection: .init(heartbeatTicks: 5, timeoutTicks: max(10, milliseconds / 10)))
    }
}

/// The head's side: starts the global scheduler's and the node processes, watches them (one
/// thread per child, blocked in `waitpid`), starts a replacement for each one that dies (a
/// node gets a new node ID), and stops them all at shutdown. Only processes it started are
/// ever signalled, by pid.
///
/// Thread safety (why `@unchecked Sendable` is sound): every mutable field is guarded by `lock`.
final class NodeSupervisor: @unchecked Sendable {
    struct Child {
        /// The node it runs; nil for the global scheduler.
        let node: NodeID?
        let pid: pid_t
        /// What it was started with (nil for the global scheduler), for its replacement.
        let configuration: NodeConfiguration?
    }

    private let lock = NSLock()
    private var children: [pid_t: Child] = [:]
    /// Children whose node was declared dead (and killed) before their process was reaped:
    /// their replacement, if any, was decided then, not when the process is reaped.
    private var retired: Set<pid_t> = []
    private var nextID: Int
    private var stopping = false
    /// Node processes in a row that exited (not killed) within ``quickExit`` of starting: after three, no
    /// more replacements (a program that cannot run as a node would otherwise restart forever).
    private var quickExits = 0
    static let quickExit = Duration.seconds(2)
    private let executable: String
    private let token: ClusterToken
    /// The token's directory and file, made by ``startAll()``.
    private var tokenDirectory = ""
    private var tokenFile = ""
    private let template: NodeLaunch
    private let configurations: [NodeConfiguration]
    private let restart: Bool
    private let log: @Sendable (String) -> Void
    /// Told when a child exits while the cluster runs.
    private let exited: @Sendable (NodeID, String) -> Void

    init(executable: String, token: ClusterToken, template: NodeLaunch, configurations: [NodeConfiguration], firstID: Int,
         restart: Bool, log: @escaping @Sendable (String) -> Void, exited: @escaping @Sendable (NodeID, String) -> Void) {
        self.executable = executable
        self.token = token
        self.template = template
        self.configurations = configurations
        self.restart = restart
        self.log = log
        self.exited = exited
        nextID = firstID
    }

    /// Writes the token to a new 0600 file, then starts the global scheduler's process and one
    /// node process per configuration.
    func startAll() throws {
        var path = Array("\(NSTemporaryDirectory())/cairn-cluster-XXXXXX".utf8CString)
        guard let made = mkdtemp(&path) else { throw CairnError(.storage, "cannot make a directory for the cluster token: errno \(errno)") }
        let directory = String(cString: made)
        let file = directory + "/token"
        lock.withLock { (tokenDirectory, tokenFile) = (directory, file) }
        do {
            try token.write(to: file)
        } catch {
            throw CairnError(.storage, "cannot write the cluster token: \(error)")
        }
        try start(nil)
        for configuration in configurations { try start(configuration) }
    }

    /// The node processes running now, by node.
    var running: [Child] { lock.withLock { children.values.filter { $0.node != nil && !retired.contains($0.pid) }.sorted { $0.node! < $1.node! } } }

    /// The pid of the global scheduler's process, if it runs.
    var schedulerPID: pid_t? { lock.withLock { children.values.first { $0.node == nil }?.pid } }

    /// Starts a node process with `configuration`, or the global scheduler's for nil.
    @discardableResult
    private func start(_ configuration: NodeConfiguration?) throws -> Child {
        var launch = template
        guard let configuration else {
            launch.role = .scheduler
            launch.tokenFile = lock.withLock { tokenFile }
            return try spawn(launch, configuration: nil, launcher: [])
        }
        let id: NodeID = lock.withLock {
            defer { nextID += 1 }
            return NodeID(nextID)
        }
        guard id.raw < 0xFFFF else { throw CairnError(.invalidArgument, "node IDs are exhausted (65,535 nodes started)") }
        launch.node = id
        launch.tokenFile = lock.withLock { tokenFile }
        launch.resources = configuration.resources
        launch.functions = configuration.functions
        launch.storeLimitBytes = configuration.storeLimitBytes
        launch.spillThreshold = configuration.spillThreshold
        if let host = configuration.host { launch.host = host }
        return try spawn(launch, configuration: configuration, launcher: configuration.launcher)
    }

    /// A node joining from outside (`cairn start --address`, a driver connecting): a new node
    /// ID and what its process needs to know. It is not this supervisor's child: it is declared
    /// dead when its connections close or fall silent, and nothing replaces it.
    func joining(resources: Resources, functions: Set<String>?, host: String) throws -> NodeLaunch {
        let id: NodeID = lock.withLock {
            defer { nextID += 1 }
            return NodeID(nextID)
        }
        guard id.raw < 0xFFFF else { throw CairnError(.invalidArgument, "node IDs are exhausted (65,535 nodes started)") }
        let defaults = NodeConfiguration(resources: resources, functions: functions)
        var launch = template
        launch.node = id
        launch.resources = resources
        launch.functions = functions
        launch.storeLimitBytes = defaults.storeLimitBytes
        launch.spillThreshold = defaults.spillThreshold
        launch.host = host
        launch.head = 0
        return launch
    }

    /// What a GCS replica process joining from outside (`cairn gcs`) needs to know; its
    /// connection to the head falls silent after `silenceMs` at most.
    func joiningReplica(_ replica: GCSReplicaLaunch, silenceMs: Int) -> NodeLaunch {
        var launch = template
        launch.role = .gcsReplica
        launch.gcs = replica
        launch.failureTimeoutMs = silenceMs
        launch.head = 0
        return launch
    }

    /// What a global scheduler process joining from outside (`cairn scheduler`) needs to know.
    /// It registers as a standby and takes over when the active scheduler is lost; it is not
    /// this supervisor's child, so nothing replaces it if it dies.
    func joiningScheduler(host: String) -> NodeLaunch {
        var launch = template
        launch.role = .scheduler
        launch.host = host
        launch.head = 0
        return launch
    }

    private func spawn(_ launch: NodeLaunch, configuration: NodeConfiguration?, launcher: [String]) throws -> Child {
        let pid = try launch.start(launcher + [executable])
        let child = Child(node: launch.role == .node ? launch.node : nil, pid: pid, configuration: configuration)
        lock.withLock { children[pid] = child }
        startThread(named: "cairn-watch-\(pid)") { [self] in watch(child) }
        return child
    }

    private func watch(_ child: Child) {
        let started = ContinuousClock.now
        var status: Int32 = 0
        while waitpid(child.pid, &status, 0) < 0 && errno == EINTR {}
        let how = status & 0x7F == 0 ? "exited with status \((status >> 8) & 0xFF)" : "was killed by signal \(status & 0x7F)"
        // A kill is the chaos harness's or the operator's; an exit this soon is the program's.
        let quick = status & 0x7F == 0 && ContinuousClock.now - started < Self.quickExit
        let (stopping, restart, quickExits, retired) = lock.withLock { () -> (Bool, Bool, Int, Bool) in
            children[child.pid] = nil
            self.quickExits = quick ? self.quickExits + 1 : 0
            return (self.stopping, self.restart, self.quickExits, self.retired.remove(child.pid) != nil)
        }
        guard !stopping else { return }
        let what = child.node?.description ?? "the global scheduler"
        if let node = child.node {
            exited(node, "its process (pid \(child.pid)) \(how)")
            // Declared dead before it was reaped: replaced (or not) then.
            guard restart, !retired else { return }
        }
        guard quickExits < 3 else {
            log("\(what)'s process \(how), the third node process in a row to end within \(Self.quickExit) of starting; no replacement (is \(executable) calling Cluster.runNodeIfLaunched first thing in main?)")
            return
        }
        replace(child, because: "\(what)'s process \(how)")
    }

    /// Starts a process in place of `child`, logging why.
    private func replace(_ child: Child, because why: String) {
        do {
            let replacement = try start(child.configuration)
            log("\(why); started \(replacement.node?.description ?? "another") (pid \(replacement.pid)) in its place")
        } catch {
            log("\(why); no replacement: \(error)")
        }
    }

    /// SIGKILLs the process of a node the cluster declared dead, if it still runs (its
    /// connections fell silent but it lives on): it must not keep a durable actor's lock, or
    /// act for a node the others consider gone. Its replacement starts now, not once the
    /// process is reaped: a killed process can take seconds to end on a loaded machine (a
    /// thread finishing a sync, its memory torn down), and a test saw one take over a minute.
    func fence(_ node: NodeID) {
        let replaced: Child? = lock.withLock {
            guard let child = children.values.first(where: { $0.node == node }), !retired.contains(child.pid) else { return nil }
            kill(child.pid, SIGKILL)
            retired.insert(child.pid)
            return restart && !stopping && quickExits < 3 ? child : nil
        }
        // On a thread of its own: starting a process takes a while, and the caller may be an
        // event loop.
        if let replaced {
            startThread(named: "cairn-replace") { [self] in replace(replaced, because: "\(node) was declared dead and its process (pid \(replaced.pid)) killed") }
        }
    }

    /// Stops every node process (SIGTERM, then SIGKILL after a second) and removes the token.
    func stop() {
        let all: [Child] = lock.withLock {
            stopping = true
            return Array(children.values)
        }
        for child in all { kill(child.pid, SIGTERM) }
        let deadline = ContinuousClock.now + .seconds(1)
        while !lock.withLock({ children.isEmpty }) && ContinuousClock.now < deadline { usleep(1_000) }
        for child in lock.withLock({ Array(children.values) }) { kill(child.pid, SIGKILL) }
        let (directory, file) = lock.withLock { (tokenDirectory, tokenFile) }
        if !file.isEmpty {
            unlink(file)
            rmdir(directory)
        }
    }
}

extension NodeLaunch {
    /// Starts `command` (searched in PATH, so that a launcher may be given by name) as a node
    /// process described by this launch; with `detached`, in a process group of its own, hang-ups
    /// ignored, with standard input, output and error on `/dev/null` or `logFile`. Returns its pid.
    func start(_ command: [String], detached: Bool = false, logFile: String? = nil) throws -> pid_t {
        try spawnProcess(command, environment: Self.inheritedEnvironment + ["\(NodeLaunch.variable)=\(try encoded())"],
                         detached: detached, logFile: logFile)
    }

    /// This process's environment for a child, without a launch description of its own.
    static var inheritedEnvironment: [String] {
        ProcessInfo.processInfo.environment.filter { $0.key != variable }.map { "\($0.key)=\($0.value)" }
    }
}

/// Starts `command` with `environment`. The child gets standard input, output and error (or,
/// `detached`, a process group of its own, hang-ups ignored, with them on `/dev/null` and
/// `logFile`), and none of this process's other descriptors: an inherited copy of a connection
/// would keep it open after this process (or the child) dies, hiding the death from the peer.
func spawnProcess(_ command: [String], environment: [String], detached: Bool = false, logFile: String? = nil) throws -> pid_t {
    let argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) } + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
    defer {
        argv.forEach { free($0) }
        envp.forEach { free($0) }
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    if detached {
        // A process group of its own, hang-ups ignored (below), as `nohup … &` gives: it
        // outlives the terminal it was started from. Not a session of its own: Linux shares the
        // CPU between sessions first ("autogroups"), and on a loaded machine the threads of a
        // new session were measured waiting seconds for a CPU while older sessions' ran, long
        // enough for the head to declare a joined scheduler or GCS replica dead by silence.
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let out = logFile ?? "/dev/null"
        posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
    }
    try closeInheritedDescriptors(&actions)
    // A child starts at the spawning thread's nice value: at the process's, not that of a
    // low-priority task that happens to start a cluster (see ``takeProcessPriority()``).
    let nice = takeProcessPriority()
    defer { restoreThreadPriority(nice) }
    var pid: pid_t = 0
    let rc: Int32
    if detached {
        // An ignored signal stays ignored across exec: the child starts ignoring SIGHUP. This
        // process ignores it only while it spawns (one detached spawn at a time).
        // (sigaction, not signal: the program's own handler comes back with its flags.)
        rc = detachedSpawns.withLock { _ in
            var ignore = sigaction()
            ignore.__sigaction_handler.sa_handler = SIG_IGN
            var previous = sigaction()
            sigaction(SIGHUP, &ignore, &previous)
            defer { sigaction(SIGHUP, &previous, nil) }
            return posix_spawnp(&pid, command[0], &actions, &attributes, argv, envp)
        }
    } else {
        rc = posix_spawnp(&pid, command[0], &actions, &attributes, argv, envp)
    }
    guard rc == 0 else {
        throw CairnError(.invalidArgument, "cannot start \(command.joined(separator: " ")): posix_spawn error \(rc)")
    }
    return pid
}

/// Held while a detached process is spawned, with SIGHUP ignored.
private let detachedSpawns = Mutex(())

/// glibc's `posix_spawn_file_actions_addclosefrom_np` (2.34 and later), which the Swift
/// module does not import: looked up once by name.
private let addCloseFrom: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32)? = {
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else { return nil }
    return unsafeBitCast(symbol, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32).self)
}()

/// Makes a spawned child close every descriptor above standard error.
private func closeInheritedDescriptors(_ actions: inout posix_spawn_file_actions_t) throws {
    guard let addCloseFrom else {
        throw CairnError(.invalidArgument, "this C library lacks posix_spawn_file_actions_addclosefrom_np (glibc 2.34 or later is needed to start node processes)")
    }
    let rc = addCloseFrom(&actions, 3)
    guard rc == 0 else { throw CairnError(.invalidArgument, "posix_spawn_file_actions_addclosefrom_np failed: error \(rc)") }
}

