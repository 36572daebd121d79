import ArgumentParser
import Cairn
import CairnChaosKit
import CairnCore
import CairnNet
import CairnWire
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@main
enum Main {
    static func main() async {
        // The nodes `cairn start` runs are this binary by default, with the built-in workload.
        Cluster.runNodeIfLaunched(prepare: ClusterWorkload.register)
        await CairnCommand.main()
    }
}

struct CairnCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn",
        abstract: "Start, inspect and stop a Cairn cluster of processes.",
        discussion: """
        A session directory (--dir) holds what `cairn start` made: the head's address (head), \
        the cluster token (token, mode 0600), the pids it started (pids), their logs, and the \
        head's GCS (gcs/), which a head started again on the directory reopens, so durable \
        actors come back by name. `cairn status` and `cairn stop` read it.
        """,
        subcommands: [Start.self, Scheduler.self, Gcs.self, Status.self, Stop.self])
}

/// The files of a session directory.
struct Session {
    let directory: String
    var headFile: String { directory + "/head" }
    var tokenFile: String { directory + "/token" }
    var pidsFile: String { directory + "/pids" }
    /// One line per death a supervisor saw, with what it did: `cairn status` shows the last.
    var restartsFile: String { directory + "/restarts" }

    static let defaultDirectory = "/tmp/cairn"
    /// What the pids file calls the process that starts the head again when it dies.
    static let supervisor = "head-supervisor"
    /// What the pids file calls a process that joins a node to the head again when it dies.
    static let nodeSupervisor = "node-supervisor"
    /// What the pids file calls a process that joins a standby scheduler again when it dies.
    static let schedulerSupervisor = "scheduler-supervisor"
    /// What the pids file calls a process that joins a new GCS replica when its replica dies.
    static let replicaSupervisor = "gcs-replica-supervisor"

    func address() throws -> String {
        guard let text = try? String(contentsOfFile: headFile, encoding: .utf8),
              let line = text.split(separator: "\n").first, !line.isEmpty else {
            throw ValidationError("no head is recorded in \(directory) (no \(headFile)); start one with `cairn start --head --dir \(directory)`, or pass --address")
        }
        return String(line)
    }

    /// Before a head starts here: refuses if the recorded head (or its supervisor) still runs;
    /// otherwise removes what a previous head left (stopped, or killed before it could clean
    /// up): its address and its token, which no process of a cluster that is gone can still
    /// use, and which a new head would otherwise refuse to overwrite, and the pids of processes
    /// that have exited. Processes still running stay recorded, so that `cairn stop` stops
    /// them: a supervisor of a joined node, say, waiting for a head, which joins this one.
    func clearForNewHead() throws {
        let running = pids().filter { !processHasExited($0.pid) }
        if let head = running.first(where: { $0.what == "head" || $0.what == Self.supervisor }) {
            throw ValidationError("a \(head.what) (pid \(head.pid)) already runs for \(directory); stop it with `cairn stop --dir \(directory)`")
        }
        for file in [headFile, tokenFile] { try? FileManager.default.removeItem(atPath: file) }
        if running.isEmpty {
            try? FileManager.default.removeItem(atPath: pidsFile)
        } else {
            try running.map { "\($0.pid) \($0.what) \($0.executable)\n" }.joined().write(toFile: pidsFile, atomically: true, encoding: .utf8)
        }
    }

    func token() throws -> ClusterToken {
        do {
            return try ClusterToken.read(from: tokenFile)
        } catch {
            throw ValidationError("cannot read the cluster token in \(tokenFile): \(error)")
        }
    }

    /// Records a pid this session started: one line each, with what it is and the program it
    /// runs (so that `stop` never signals a process that merely reused the number).
    func record(pid: Int32, _ what: String, executable: String) throws {
        let line = "\(pid) \(what) \(executable)\n"
        guard let handle = FileHandle(forWritingAtPath: pidsFile) ?? {
            _ = FileManager.default.createFile(atPath: pidsFile, contents: nil)
            return FileHandle(forWritingAtPath: pidsFile)
        }() else { throw ValidationError("cannot write \(pidsFile)") }
        defer { try? handle.close() }
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(line.utf8))
    }

    /// The processes this session started that still run the program they were started with.
    func pids() -> [(pid: Int32, what: String, executable: String)] {
        guard let text = try? String(contentsOfFile: pidsFile, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let parts = line.split(separator: " ", maxSplits: 2).map(String.init)
            guard parts.count == 3, let pid = Int32(parts[0]), pid > 0,
                  (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")) == parts[2] else { return nil }
            return (pid, parts[1], parts[2])
        }
    }
}

struct Start: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a head (--head), or a node that joins one (--address).",
        discussion: """
        --head starts the head: the driver-side control store with its chain-replicated GCS, \
        a global scheduler process and --nodes node processes, listening for joins on --port. \
        --address HOST:PORT starts one node process that joins the head there. Nodes run \
        --executable in node mode (default: this binary, which knows the built-in workload): \
        a program of yours that calls Cluster.runNodeIfLaunched first thing in main. \
        With --restarts above 0 (the default), each runs under a small supervisor process: a \
        head that dies is started again on the same port with the same token (its GCS and \
        durable actors come back from the session directory; its node processes are new), and a \
        joined node that dies, or stops because it lost the head, joins again as a new node.
        """)

    @Flag(help: "Start the head.") var head = false
    @Option(help: "Join the head at HOST:PORT with one node.") var address: String?
    @Option(help: "The session directory.") var dir = Session.defaultDirectory
    @Option(help: "Address to listen on.") var host = "127.0.0.1"
    @Option(help: "The head's port for joins and status (0: any free one).") var port = 6390
    @Option(help: "Node processes the head starts.") var nodes = 2
    @Option(help: "CPUs of each node started.") var cpus: Double = 1
    @Option(help: "The program nodes run (default: this one).") var executable: String?
    @Option(help: "Durable actors' storage directory (default: DIR/storage).") var storage: String?
    @Flag(help: "With --head: keep durable actors' logs and checkpoints in the GCS chains instead of a directory, so nodes on other machines can restore them.") var replicatedStorage = false
    @Option(help: "With --head: a node whose connections stay silent this long is declared dead (a killed one is at once).") var failureTimeoutMs = 250
    @Flag(help: "With --head: run each GCS replica in a process of its own (started again from its LMDB if it dies), not on the head's threads.") var gcsProcesses = false
    @Flag(help: "With --head: run the head in this process until SIGTERM or SIGINT, instead of in the background.") var foreground = false
    @Option(name: .customLong("restarts"), help: "How many times within any 60 s a head that dies is started again (same port, same token), or a joined node that dies joins again; 0: never. Default 5.")
    var restartsGiven: Int?
    /// Given or not (a head in the foreground refuses it when given).
    var restarts: Int { restartsGiven ?? 5 }
    /// Internal: run as the head's supervisor (what `start --head` detaches when restarts are on).
    @Flag(help: .hidden) var supervise = false
    /// Internal: a head its supervisor started (the session was cleared for it already).
    @Flag(help: .hidden) var supervised = false
    /// Internal: a head its supervisor started again (it keeps the session's token).
    @Flag(help: .hidden) var restarted = false

    func validate() throws {
        guard head != (address != nil) else { throw ValidationError("give exactly one of --head and --address HOST:PORT") }
        guard (0...65_535).contains(port) else { throw ValidationError("--port must be 0 to 65535") }
        guard (0...64).contains(nodes) else { throw ValidationError("--nodes must be 0 to 64") }
        guard cpus >= 0 else { throw ValidationError("--cpus must not be negative") }
        guard failureTimeoutMs >= 100 else { throw ValidationError("--failure-timeout-ms must be at least 100") }
        guard (0...1_000).contains(restarts) else { throw ValidationError("--restarts must be 0 to 1000") }
        if foreground && restartsGiven != nil { throw ValidationError("--restarts applies to a head in the background (or a node); a head in the foreground is not started again") }
        if replicatedStorage && storage != nil { throw ValidationError("--replicated-storage keeps durable actors in the GCS; drop --storage, or drop --replicated-storage to use that directory") }
        if let executable, access(executable, X_OK) != 0 { throw ValidationError("--executable \(executable) is not an executable file") }
    }

    func run() async throws {
        let session = Session(directory: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let program = executable ?? currentExecutablePath()
        if let address {
            if supervise {
                try await superviseNode(session, address: address, program: program)
                return
            }
            if restarts > 0 {
                try startNodeInBackground(session, address: address)
                return
            }
            let started = try await Cluster.startNode(joining: address, tokenFile: session.tokenFile, executable: program,
                                                      resources: Resources(cpus: cpus), host: host, logFile: dir + "/node.log")
            try session.record(pid: started.pid, started.node.description, executable: realPath(program))
            print("\(started.node) (pid \(started.pid)) joined the head at \(address); its log: \(dir)/node.log")
            return
        }
        if supervise {
            try await superviseHead(session)
            return
        }
        if !supervised { try session.clearForNewHead() }
        if !foreground {
            try startInBackground(session)
            return
        }
        try await runHead(session, program: program)
    }

    /// The arguments that start a head like this one: `mode` says how (`--foreground`, `--supervise`).
    private func headArguments(_ mode: [String], port: Int) -> [String] {
        var arguments = [currentExecutablePath(), "start", "--head"] + mode
            + ["--dir", dir, "--host", host, "--port", "\(port)", "--nodes", "\(nodes)", "--cpus", "\(cpus)",
               "--failure-timeout-ms", "\(failureTimeoutMs)"]
        if mode.contains("--supervise") { arguments += ["--restarts", "\(restarts)"] }
        if let executable { arguments += ["--executable", executable] }
        if let storage { arguments += ["--storage", storage] }
        if gcsProcesses { arguments.append("--gcs-processes") }
        if replicatedStorage { arguments.append("--replicated-storage") }
        return arguments
    }

    /// Starts the head's supervisor (`cairn start --head --supervise …`), or with restarts off the
    /// head itself (`--foreground`), detached (``Cluster/startDetached(_:logFile:)``), and waits
    /// until the head has written its address.
    private func startInBackground(_ session: Session) throws {
        let pid = try Cluster.startDetached(headArguments(restarts > 0 ? ["--supervise"] : ["--foreground"], port: port), logFile: dir + "/head.log")
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if let address = try? session.address() {
                let head = session.pids().first { $0.what == "head" }?.pid ?? pid
                print("head (pid \(head)) at \(address); token in \(session.tokenFile)"
                      + (restarts > 0 ? "; started again if it dies (up to \(restarts) times within 60 s, by pid \(pid))" : ""))
                print("join a node:   cairn start --address \(address) --dir \(dir)")
                print("see it:        cairn status --dir \(dir)")
                print("stop it all:   cairn stop --dir \(dir)")
                return
            }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                let log = (try? String(contentsOfFile: dir + "/head.log", encoding: .utf8)) ?? ""
                let reason = log.split(separator: "\n").last { $0.hasPrefix("Error: ") }.map { ": " + $0.dropFirst("Error: ".count) } ?? ""
                throw ValidationError("the head exited before it was ready\(reason); see \(dir)/head.log")
            }
            usleep(10_000)
        }
        throw ValidationError("the head did not start within 60 s; see \(dir)/head.log")
    }

    /// Runs the head as a child of this process, and starts it again when it dies (killed, or
    /// failed) within the budget of ``restarts`` in any 60 s: on the port the first one got, with
    /// the session's token, so drivers and the `cairn` command find it where it was. Its GCS and
    /// durable actors' storage are in the session, so what they held comes back with it. Stops
    /// (and stops the head) on SIGTERM or SIGINT; stops when the head exits by itself with status
    /// 0 (stopped), or when the first head never became ready.
    private func superviseHead(_ session: Session) async throws {
        try session.record(pid: getpid(), Session.supervisor, executable: currentExecutablePath())
        let supervisor = Supervisor(of: "the head", restarts: restarts, journal: session.restartsFile)
        var port = self.port
        var mode = ["--foreground", "--supervised"]
        while let pid = try supervisor.start({ try Cluster.startDetached(headArguments(mode, port: port), logFile: dir + "/head.log") }) {
            guard let death = await supervisor.death(of: pid) else { return }
            guard let address = try? session.address(), let recorded = address.split(separator: ":").last.flatMap({ Int($0) }) else {
                say("supervisor: the head (pid \(pid)) \(death.how) before it was ready; not starting it again")
                throw ExitCode.failure
            }
            port = recorded
            mode = ["--foreground", "--supervised", "--restarted"]
            guard try await supervisor.again(after: death, pid: pid, what: "on port \(port)") else {
                try? FileManager.default.removeItem(atPath: session.headFile)
                throw ExitCode.failure
            }
        }
    }

    /// Starts `cairn start --address … --supervise` detached, and waits until the node it
    /// starts has joined (or the supervisor has given up, saying why in the node's log).
    private func startNodeInBackground(_ session: Session, address: String) throws {
        var arguments = [currentExecutablePath(), "start", "--address", address, "--supervise", "--dir", dir, "--host", host,
                         "--cpus", "\(cpus)", "--restarts", "\(restarts)"]
        if let executable { arguments += ["--executable", executable] }
        let log = dir + "/node.log"
        let (supervisor, node) = try startSupervised(arguments, session: session, log: log) { $0.hasPrefix("node-") }
        print("\(node.what) (pid \(node.pid)) joined the head at \(address); its log: \(log); "
              + "it joins again as a new node if it dies (up to \(restarts) times within 60 s, by pid \(supervisor))")
    }

    /// Runs a node that joins the head at `address` as a child of this process, and joins
    /// again with a new node when it dies (killed, or stopped because it lost the head), within
    /// the budget of ``restarts`` in any 60 s.
    private func superviseNode(_ session: Session, address: String, program: String) async throws {
        try await superviseJoins(session: session, address: address, restarts: restarts, what: "the node", name: Session.nodeSupervisor) {
            let joined = try await Cluster.startNode(joining: address, tokenFile: session.tokenFile, executable: program,
                                                     resources: Resources(cpus: cpus), host: host, logFile: dir + "/node.log")
            return (joined.node.description, joined.pid, realPath(program))
        }
    }

    private func runHead(_ session: Session, program: String) async throws {
        var options = ClusterOptions(nodes: [NodeConfiguration(resources: Resources(cpus: 0))]
                                     + Array(repeating: NodeConfiguration(resources: Resources(cpus: cpus)), count: nodes),
                                     storage: ActorStorageOptions(location: replicatedStorage ? .replicated : .directory(storage ?? dir + "/storage")))
        options.processes = true
        // The GCS lives in the session directory, so a head started again on it (after a stop,
        // or after it was killed) keeps what the GCS held: durable actors' replicated storage.
        // The new cluster's control store deletes the old cluster's tables before answering.
        var gcsOptions = EmbeddedGCS.Options()
        gcsOptions.directory = dir + "/gcs"
        options.controlStore = .chainReplicated(gcsOptions)
        options.transport = .tcp(host: host)
        options.nodeExecutable = program
        options.headPort = port
        options.gcsReplicaProcesses = gcsProcesses
        options.failureTimeoutMs = failureTimeoutMs
        // A head started again by its supervisor keeps the session's token: drivers and nodes
        // that join find it where it was, with what they already hold.
        if restarted { options.token = try session.token() }
        let cluster = try await Cluster.local(options)
        guard let address = cluster.headAddress, let token = cluster.token else {
            cluster.shutdown()
            throw ValidationError("the head has no address")
        }
        do {
            if !restarted { try token.write(to: session.tokenFile) }
        } catch {
            cluster.shutdown()
            throw ValidationError("cannot write the token to \(session.tokenFile): \(error)")
        }
        try session.record(pid: getpid(), "head", executable: currentExecutablePath())
        try (address + "\n").write(toFile: session.headFile, atomically: true, encoding: .utf8)
        print("head at \(address): \(nodes) node processes; token in \(session.tokenFile)")
        // Until SIGTERM or SIGINT.
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        let sig = await waitForSignal([SIGTERM, SIGINT])
        print("signal \(sig): stopping")
        cluster.shutdown()
        try? FileManager.default.removeItem(atPath: session.headFile)
    }
}

struct Scheduler: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a global scheduler process that joins a head as a standby.",
        discussion: """
        The head runs one global scheduler process (and starts another if it dies). A scheduler \
        started here registers as a standby: when the active scheduler's process is lost, the \
        newest standby takes over at once, and the nodes hand it whatever the lost one had not \
        placed. It stops when it loses the head; with --restarts above 0 (the default) a \
        supervisor then joins it again, to the head started again in its place. `cairn stop` \
        stops it and its supervisor.
        """)

    @Option(help: "The head's HOST:PORT (default: the session's).") var address: String?
    @Option(help: "The session directory (for the head's address and the token).") var dir = Session.defaultDirectory
    @Option(help: "Address to listen on.") var host = "127.0.0.1"
    @Option(help: "The program to run (default: this one).") var executable: String?
    @Option(help: "How many times within any 60 s a scheduler that dies (or stops because it lost the head) joins again; 0: never.") var restarts = 5
    /// Internal: run as the scheduler's supervisor.
    @Flag(help: .hidden) var supervise = false

    func validate() throws {
        if let executable, access(executable, X_OK) != 0 { throw ValidationError("--executable \(executable) is not an executable file") }
        guard (0...1_000).contains(restarts) else { throw ValidationError("--restarts must be 0 to 1000") }
    }

    func run() async throws {
        let session = Session(directory: dir)
        let address = try address ?? session.address()
        let program = executable ?? currentExecutablePath()
        let log = dir + "/scheduler.log"
        if supervise {
            try await superviseJoins(session: session, address: address, restarts: restarts, what: "the scheduler", name: Session.schedulerSupervisor) {
                let pid = try await Cluster.startScheduler(joining: address, tokenFile: session.tokenFile, executable: program, host: host, logFile: log)
                return ("scheduler", pid, realPath(program))
            }
            return
        }
        if restarts > 0 {
            var arguments = [currentExecutablePath(), "scheduler", "--address", address, "--supervise", "--dir", dir, "--host", host, "--restarts", "\(restarts)"]
            if let executable { arguments += ["--executable", executable] }
            let (supervisor, scheduler) = try startSupervised(arguments, session: session, log: log) { $0 == "scheduler" }
            print("scheduler (pid \(scheduler.pid)) joined the head at \(address) as a standby; its log: \(log); "
                  + "it joins again if it dies (up to \(restarts) times within 60 s, by pid \(supervisor))")
            return
        }
        let pid = try await Cluster.startScheduler(joining: address, tokenFile: session.tokenFile, executable: program, host: host,
                                                   logFile: log)
        try session.record(pid: pid, "scheduler", executable: realPath(program))
        print("scheduler (pid \(pid)) joined the head at \(address) as a standby; its log: \(log)")
    }
}

struct Gcs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gcs",
        abstract: "Start a GCS replica process that joins a head's GCS as a standby.",
        discussion: """
        The head must run its GCS replicas in processes (`cairn start --head --gcs-processes`). \
        The replica keeps its LMDB in DIR/gcs-replica-<ID>, stands by for --shard (default: the \
        shard with the fewest replicas), and takes the place of a replica that dies when it is \
        the first standby alive: it catches up from the tail and joins the chain. It stops when \
        it loses the head. With --restarts above 0 (the default) a supervisor then joins a new \
        replica (a new ID, an empty directory) in its place, to the head started again, and \
        removes the dead one's directory; `cairn stop` stops both.
        """)

    @Option(help: "The head's HOST:PORT (default: the session's).") var address: String?
    @Option(help: "The session directory (for the head's address and the token; the replica's LMDB goes under it).") var dir = Session.defaultDirectory
    @Option(help: "The shard to stand by for.") var shard: Int?
    @Option(help: "How many times within any 60 s a new replica joins in the place of one that dies (or stops because it lost the head); 0: never.") var restarts = 5
    /// Internal: run as the replica's supervisor.
    @Flag(help: .hidden) var supervise = false
    @Option(help: "The program to run (default: this one).") var executable: String?

    func validate() throws {
        if let shard, shard < 0 { throw ValidationError("--shard must not be negative") }
        guard (0...1_000).contains(restarts) else { throw ValidationError("--restarts must be 0 to 1000") }
        if let executable, access(executable, X_OK) != 0 { throw ValidationError("--executable \(executable) is not an executable file") }
    }

    func run() async throws {
        let session = Session(directory: dir)
        let address = try address ?? session.address()
        let program = executable ?? currentExecutablePath()
        let log = dir + "/gcs.log"
        if supervise {
            // Each join is a new replica with a directory of its own; a dead one's is of no use.
            try await superviseJoins(session: session, address: address, restarts: restarts, what: "the GCS replica", name: Session.replicaSupervisor,
                                     afterDeath: { name in try? FileManager.default.removeItem(atPath: dir + "/" + name) }) {
                let started = try await Cluster.startReplica(joining: address, tokenFile: session.tokenFile, executable: program, storage: dir,
                                                             shard: shard, logFile: log)
                return ("gcs-replica-\(started.replica)", started.pid, realPath(program))
            }
            return
        }
        if restarts > 0 {
            var arguments = [currentExecutablePath(), "gcs", "--address", address, "--supervise", "--dir", dir, "--restarts", "\(restarts)"]
            if let shard { arguments += ["--shard", "\(shard)"] }
            if let executable { arguments += ["--executable", executable] }
            let (supervisor, replica) = try startSupervised(arguments, session: session, log: log) { $0.hasPrefix("gcs-replica-") }
            print("GCS replica \(replica.what.dropFirst("gcs-replica-".count)) (pid \(replica.pid)) joined the head at \(address) as a standby; its log: \(log); "
                  + "a new replica joins in its place if it dies (up to \(restarts) times within 60 s, by pid \(supervisor))")
            return
        }
        let started = try await Cluster.startReplica(joining: address, tokenFile: session.tokenFile, executable: program, storage: dir,
                                                     shard: shard, logFile: log)
        try session.record(pid: started.pid, "gcs-replica-\(started.replica)", executable: realPath(program))
        print("GCS replica \(started.replica) (pid \(started.pid)) joined the head at \(address) as a standby; its log: \(log)")
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the cluster's nodes, actors, schedulers and GCS chains, and the last restarts the session's supervisors made.")

    @Option(help: "The session directory (for the head's address and the token).") var dir = Session.defaultDirectory
    @Option(help: "The head's HOST:PORT (default: the session's).") var address: String?

    func run() async throws {
        let session = Session(directory: dir)
        let address = try address ?? session.address()
        let report = try await Cluster.status(of: address, token: try session.token())
        print("head \(address)\n")
        print(report.table)
        // What the session's supervisors did: the head and joined processes started again.
        if let journal = try? String(contentsOfFile: session.restartsFile, encoding: .utf8) {
            let lines = journal.split(separator: "\n")
            print("\nRESTARTS (the last \(min(lines.count, 5)) of \(lines.count); all in \(session.restartsFile))")
            lines.suffix(5).forEach { print($0) }
        }
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop what `cairn start`, `cairn scheduler` and `cairn gcs` started from this session directory: the head (which stops its node processes), joined nodes, schedulers and GCS replicas.")

    @Option(help: "The session directory.") var dir = Session.defaultDirectory

    func run() throws {
        let session = Session(directory: dir)
        let started = session.pids()
        guard !started.isEmpty else {
            print("nothing was started from \(dir)")
            return
        }
        // Supervisors first (so that none starts its process again), then joined nodes (they
        // would stop on losing the head anyway), then the head.
        let supervisors = [Session.supervisor, Session.nodeSupervisor, Session.schedulerSupervisor, Session.replicaSupervisor]
        let ordered = started.filter { supervisors.contains($0.what) }
            + started.filter { $0.what != "head" && !supervisors.contains($0.what) } + started.filter { $0.what == "head" }
        for p in ordered where !processHasExited(p.pid) { kill(p.pid, SIGTERM) }
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline && ordered.contains(where: { !processHasExited($0.pid) }) { usleep(20_000) }
        for p in ordered where !processHasExited(p.pid) {
            print("\(p.what) (pid \(p.pid)) did not stop within 10 s: SIGKILL")
            kill(p.pid, SIGKILL)
        }
        for p in ordered { print("stopped \(p.what) (pid \(p.pid))") }
        try? FileManager.default.removeItem(atPath: session.pidsFile)
        try? FileManager.default.removeItem(atPath: session.headFile)
        // A head's token goes with it: no process of its cluster is left to use it. (A session
        // that only joined nodes to a head elsewhere keeps the token it was given.)
        if started.contains(where: { $0.what == "head" }) { try? FileManager.default.removeItem(atPath: session.tokenFile) }
    }
}


/// Waits for one of `signals` (ignored by default, so delivered only here).
private func waitForSignal(_ signals: [Int32]) async -> Int32 {
    let sources = SignalSources()
    return await withCheckedContinuation { continuation in
        let resumed = Mutex(false)
        for sig in signals {
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                if resumed.withLock({ done in defer { done = true }; return !done }) { continuation.resume(returning: sig) }
            }
            source.resume()
            sources.keep(source)
        }
    }
}

/// Starts `arguments` (a `cairn … --supervise` command) detached, its output appended to
/// `log`, and waits until the process it supervises is in the session's pids with a name that
/// `matches`: the supervisor's pid and that record. Throws the supervisor's reason (from
/// `log`) if it gives up first.
private func startSupervised(_ arguments: [String], session: Session, log: String,
                             matches: (String) -> Bool) throws -> (supervisor: Int32, child: (pid: Int32, what: String)) {
    let supervisor = try Cluster.startDetached(arguments, logFile: log)
    let deadline = ContinuousClock.now + .seconds(60)
    while ContinuousClock.now < deadline {
        if let child = session.pids().first(where: { matches($0.what) && parentPID(of: $0.pid) == supervisor }) { return (supervisor, (child.pid, child.what)) }
        var status: Int32 = 0
        if waitpid(supervisor, &status, WNOHANG) == supervisor {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            let reason = text.split(separator: "\n").last { $0.hasPrefix("supervisor: cannot join") }
                .map { String($0.dropFirst("supervisor: ".count)) } ?? "its supervisor exited; see \(log)"
            throw ValidationError(reason)
        }
        usleep(10_000)
    }
    throw ValidationError("nothing joined within 60 s; see \(log)")
}

/// Records this process as `name` in the session, then joins a process to the head at
/// `address` with `join` (which starts it and returns its name, pid and program), and joins
/// another each time it dies (killed, or stopped because it lost the head) within the budget
/// of `restarts` in any 60 s, waiting up to 60 s each time for the head to answer (it may be
/// starting again). The first join is tried once. Stops (and stops the process) on SIGTERM or
/// SIGINT.
private func superviseJoins(session: Session, address: String, restarts: Int, what: String, name: String,
                            afterDeath: (String) -> Void = { _ in },
                            join: () async throws -> (name: String, pid: Int32, executable: String)) async throws {
    try session.record(pid: getpid(), name, executable: currentExecutablePath())
    let supervisor = Supervisor(of: what, restarts: restarts, journal: session.restartsFile, stoppedFromOutside: Cluster.lostHeadExitStatus)
    var first = true
    while true {
        let deadline = ContinuousClock.now + .seconds(60)
        var joined: (name: String, pid: Int32, executable: String)?
        while joined == nil {
            // A head started again by hand writes a new token file; until it does, there is none.
            if !first && !FileManager.default.fileExists(atPath: session.tokenFile) && ContinuousClock.now < deadline {
                if supervisor.stopping { return }
                try await Task.sleep(for: .milliseconds(50))
                continue
            }
            do {
                joined = try await join()
            } catch let error as CairnError where !first && error.code == .shutDown && ContinuousClock.now < deadline {
                // The head does not answer yet: it may be starting again.
                if supervisor.stopping { return }
                try await Task.sleep(for: .milliseconds(50))
            } catch {
                say("supervisor: cannot join the head at \(address): \(error); stopping")
                throw ExitCode.failure
            }
        }
        guard let joined, let pid = supervisor.start({ joined.pid }) else { return }
        try session.record(pid: pid, joined.name, executable: joined.executable)
        say("supervisor: \(joined.name) (pid \(pid)) joined the head at \(address)")
        first = false
        let death = await supervisor.death(of: pid)
        afterDeath(joined.name)
        guard let death, try await supervisor.again(after: death, pid: pid, what: "to join the head at \(address)") else { return }
    }
}

/// Starts a child process again each time it dies, within a restart budget, until this
/// process gets SIGTERM or SIGINT (which it passes on to the child).
private final class Supervisor: Sendable {
    struct Death {
        var how: String
        var seconds: Double
        /// Killed by a signal, or stopped from outside: started again at once.
        var killed: Bool
    }

    private let what: String
    private let child: Mutex<(pid: Int32, startedAt: Double, stopping: Bool, budget: RestartBudget)>
    private let origin = ContinuousClock.now

    /// An exit status that means the child was stopped from outside, not that it failed: it
    /// is started again at once, as a killed one is.
    private let stoppedFromOutside: Int32?

    /// Where each death and what was done about it is appended, a line each.
    private let journal: String

    init(of what: String, restarts: Int, journal: String, stoppedFromOutside: Int32? = nil) {
        self.what = what
        self.journal = journal
        self.stoppedFromOutside = stoppedFromOutside
        child = Mutex((0, 0, false, RestartBudget(limit: restarts, windowSeconds: 60)))
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        Task.detached { [self] in
            let sig = await waitForSignal([SIGTERM, SIGINT])
            let pid = self.child.withLock { c in
                c.stopping = true
                return c.pid
            }
            say("supervisor: signal \(sig): stopping \(what) (pid \(pid))")
            if pid > 0 { kill(pid, SIGTERM) }
        }
    }

    /// True once this process was asked to stop.
    var stopping: Bool { child.withLock { $0.stopping } }

    /// The child `start` starts, unless a stop came first (nil; a child started meanwhile is stopped).
    func start(_ start: () throws -> Int32) rethrows -> Int32? {
        let startedAt = Self.seconds(since: origin)
        let pid = try start()
        let stopping = child.withLock { c in
            c.pid = pid
            c.startedAt = startedAt
            return c.stopping
        }
        if stopping { kill(pid, SIGTERM) }
        return stopping ? nil : pid
    }

    /// Waits until child `pid` ends: nil if that was a stop (a stop was asked, or it exited with
    /// status 0, or it ended by SIGTERM or SIGINT, which only a stop sends), else how it died.
    func death(of pid: Int32) async -> Death? {
        let status: Int32 = await withCheckedContinuation { continuation in
            startThread(named: "wait-\(pid)") {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                continuation.resume(returning: status)
            }
        }
        let signalled = status & 0x7f
        let code = (status >> 8) & 0xff
        let how = signalled != 0 ? "was killed by signal \(signalled)" : "exited with status \(code)"
        let (stopped, startedAt) = child.withLock { ($0.stopping, $0.startedAt) }
        if stopped || (signalled == 0 && code == 0) || signalled == SIGTERM || signalled == SIGINT {
            say("supervisor: \(what) (pid \(pid)) \(how); stopping")
            return nil
        }
        return Death(how: how, seconds: Self.seconds(since: origin) - startedAt,
                     killed: signalled != 0 || (stoppedFromOutside != nil && code == stoppedFromOutside))
    }

    /// After `death`: true when the budget allows starting it again (having waited what it
    /// asks); false, having said why, when it does not.
    func again(after death: Death, pid: Int32, what detail: String) async throws -> Bool {
        let decision = child.withLock { $0.budget.died(at: Self.seconds(since: origin), livedSeconds: death.seconds, killed: death.killed) }
        let lived = String(format: "%.1f", death.seconds)
        switch decision {
        case .giveUp(let why):
            record("\(what) (pid \(pid)) \(death.how) after \(lived) s; not starting it again: \(why)")
            return false
        case .restart(let delay):
            record("\(what) (pid \(pid)) \(death.how) after \(lived) s; starting it again \(detail)" + (delay > 0 ? " in \(delay) s" : ""))
            if delay > 0 { try await Task.sleep(for: .seconds(delay)) }
            return true
        }
    }

    /// Says `event` in this process's log, and appends it, with the time, to the session's journal.
    private func record(_ event: String) {
        say("supervisor: " + event)
        let line = Data((ISO8601DateFormatter().string(from: Date()) + " " + event + "\n").utf8)
        if let handle = FileHandle(forWritingAtPath: journal) ?? {
            _ = FileManager.default.createFile(atPath: journal, contents: nil)
            return FileHandle(forWritingAtPath: journal)
        }() {
            _ = try? handle.seekToEnd()
            try? handle.write(contentsOf: line)
            try? handle.close()
        }
    }

    private static func seconds(since instant: ContinuousClock.Instant) -> Double {
        let elapsed = instant.duration(to: .now).components
        return Double(elapsed.seconds) + Double(elapsed.attoseconds) / 1e18
    }
}

/// The parent of process `pid` (0 if it cannot be read).
private func parentPID(of pid: Int32) -> Int32 {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return 0 }
    let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
    return fields.count > 1 ? Int32(fields[1]) ?? 0 : 0
}

/// Writes `line` to standard output at once (a log file, where `print` would hold it in a buffer).
private func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

/// Keeps signal sources alive while they are waited on.
private final class SignalSources: @unchecked Sendable {
    private var sources: [any DispatchSourceSignal] = []
    func keep(_ source: any DispatchSourceSignal) { sources.append(source) }
}

/// `path` with every symbolic link and relative part resolved, as `/proc/<pid>/exe` shows it.
private func realPath(_ path: String) -> String {
    guard let resolved = realpath(path, nil) else { return path }
    defer { free(resolved) }
    return String(cString: resolved)
}
