@testable import Cairn
import CairnChaosKit
import CairnCodec
import CairnCore
import CairnStorage
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension ClusterSuites {
/// A cluster whose nodes 1 to 3 are separate processes (the `cairn-chaos` binary, which runs
/// ``ClusterWorkload``), talking to the head over TCP on loopback; killed with SIGKILL.
@Suite("Cluster of processes: nodes in their own processes, killed and replaced", .serialized)
struct ProcessClusterTests {
    static func options(spillThreshold: Int = 1) -> ClusterOptions {
        var options = ClusterOptions.uniform(nodes: 4)
        for i in options.nodes.indices { options.nodes[i].spillThreshold = spillThreshold }
        options.processes = true
        options.nodeExecutable = executableDirectory() + "/cairn-chaos"
        // Patient: a loaded test machine must not starve a live node into being declared dead.
        // A killed node's connections close, so it is still declared dead at once.
        options.failureTimeoutMs = 5_000
        options.controlStore = .inMemory
        return options
    }

    /// ``options(spillThreshold:)`` with a driver's node that runs nothing: every task it
    /// submits leaves it, through the scheduler (bursts) or straight to an idle node (lone tasks).
    static func idleDriverOptions() -> ClusterOptions {
        var options = Self.options()
        options.nodes[0].resources = Resources(cpus: 0)
        return options
    }

    /// GCS options for durable actors kept in the GCS on a loaded test machine: a request waits
    /// up to 60 s. Under two busy loops the replicas' and the coordinator's fsync'd commits were
    /// seen taking 10 s all at once (logged as stall warnings); with the default 10 s, the
    /// actor's store then refuses further writes and its callers get `storageFailed`, as it
    /// should on a GCS that long unavailable, which is not what these tests are about.
    static func patientGCSOptions() -> EmbeddedGCS.Options {
        var gcsOptions = EmbeddedGCS.Options()
        gcsOptions.requestTimeoutMicroseconds = 60_000_000
        return gcsOptions
    }

    /// ``options(spillThreshold:)`` with the GCS's replicas in processes of their own, patient
    /// as a loaded 2-core machine needs (a killed replica's connection closes at once).
    static func gcsProcessOptions() -> ClusterOptions {
        var options = Self.options()
        var gcsOptions = EmbeddedGCS.Options()
        gcsOptions.failureTimeoutMicroseconds = 10_000_000
        gcsOptions.leaseMicroseconds = 2_000_000
        gcsOptions.requestTimeoutMicroseconds = 60_000_000
        options.controlStore = .chainReplicated(gcsOptions)
        options.gcsReplicaProcesses = true
        return options
    }

    /// Waits until the driver hears of `count` live nodes, none of them in `excluding`.
    /// Patient: on a loaded machine the kernel was seen taking seconds to tear down a killed
    /// process's memory, and to map a new one's, before the replacement could join.
    static func waitForAlive(_ cluster: Cluster, count: Int, excluding: Set<NodeID> = [], seconds: Int = 60) async throws -> [NodeID] {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            let alive = cluster.aliveNodes
            if alive.count == count && excluding.isDisjoint(with: alive) { return alive }
            try await Task.sleep(for: .milliseconds(5))
        }
        Issue.record("the cluster did not reach \(count) live nodes without \(excluding) in \(seconds) s: \(cluster.aliveNodes)")
        return cluster.aliveNodes
    }

    @Test("tasks run in the node processes, over TCP, with nested tasks across processes")
    func tasksRunInNodeProcesses() async throws {
        let cluster = try await Cluster.local(Self.options())
        defer { cluster.shutdown() }
        let children = cluster.nodeProcesses
        #expect(children.map(\.node) == [NodeID(1), NodeID(2), NodeID(3)])
        #expect(Set(children.map(\.pid)).count == 3)
        #expect(!children.map(\.pid).contains(getpid()))

        let refs = try (0..<200).map { try ClusterWorkload.whereAmI.remote($0) }
        let results = try await cluster.get(refs)
        #expect(results.map { $0[1] } == Array(0..<200))
        let pids = Set(results.map { Int32($0[0]) })
        // Tasks spread into the node processes, not only the head.
        #expect(pids.subtracting([getpid()]).count >= 2, "tasks ran in \(pids)")
        #expect(pids.isSubset(of: Set(children.map(\.pid)).union([getpid()])))

        let sums = try (1...20).map { try ClusterWorkload.sumOfSquares.remote($0 * 5) }
        let totals = try await cluster.get(sums)
        #expect(totals == (1...20).map { n in (0..<(n * 5)).reduce(0) { $0 + $1 * $1 } })
    }

    @Test("a SIGKILLed node is declared dead, its tasks run elsewhere, and a replacement joins")
    func killedNodeTasksAreRetried() async throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_PROCESS_SEED")
        print("process cluster kill: seed \(seed) (CAIRN_PROCESS_SEED replays)")
        var random = SeededGenerator(seed: seed)
        let cluster = try await Cluster.local(Self.options())
        defer { cluster.shutdown() }
        for round in 0..<3 {
            let before = cluster.nodeProcesses
            let victim = before[Int.random(in: 0..<before.count, using: &random)]
            let base = round * 1_000
            let refs = try (0..<300).map { try ClusterWorkload.slowSquare.remote(base + $0) }
            try await Task.sleep(for: .milliseconds(Int.random(in: 5...60, using: &random)))
            kill(victim.pid, SIGKILL)
            let results = try await cluster.get(refs, timeout: .seconds(60))
            #expect(results == (0..<300).map { (base + $0) * (base + $0) }, "round \(round)")
            // Declared dead, and the cluster back to four live nodes with a replacement.
            let alive = try await Self.waitForAlive(cluster, count: 4, excluding: [victim.node])
            #expect(!alive.contains(victim.node))
            #expect(cluster.nodeProcesses.count == 3)
        }
        // The replacements run tasks too.
        let refs = try (0..<100).map { try ClusterWorkload.whereAmI.remote($0) }
        let pids = Set(try await cluster.get(refs).map { Int32($0[0]) })
        #expect(pids.subtracting([getpid()]).isSubset(of: Set(cluster.nodeProcesses.map(\.pid))))
    }

    @Test("an object owned by a killed node fails its get with objectLost, naming it")
    func objectOwnedByDeadNodeIsLost() async throws {
        var options = Self.options()
        options.replaceDeadNodes = false
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        // Run until one lands in a node process, whose nested result that process then owns.
        var owned: ClusterWorkload.OwnedRef?
        for round in 0..<20 where owned == nil {
            let refs = try (0..<20).map { try ClusterWorkload.ownedElsewhere.remote(round * 20 + $0) }
            owned = try await cluster.get(refs).first { $0.pid != Int(getpid()) }
        }
        let found = try #require(owned)
        let victim = try #require(cluster.nodeProcesses.first { Int($0.pid) == found.pid })
        #expect(found.ref.id.owner == victim.node)
        kill(victim.pid, SIGKILL)
        _ = try await Self.waitForAlive(cluster, count: 3, excluding: [victim.node])
        // The driver never fetched it, so the only copy died with its owner.
        do {
            _ = try await cluster.get(found.ref, timeout: .seconds(30))
            Issue.record("a get of an object owned by a dead node returned a value")
        } catch let error as RemoteError {
            #expect(error.kind == .objectLost)
            #expect(error.message.contains(found.ref.id.description) && error.message.contains(victim.node.description))
        }
        // Tasks still run on the nodes left.
        #expect(try await cluster.get(try ClusterWorkload.square.remote(12)) == 144)
    }

    @Test("an actor in a killed node process: calls in flight fail with nodeDied, later calls with actorUnavailable")
    func actorOnDeadNode() async throws {
        var options = Self.options()
        for i in 1..<options.nodes.count { options.nodes[i].resources = Resources(cpus: 1, custom: ["far": 1]) }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let counter = try await cluster.spawn(ClusterWorkload.Counter(), resources: Resources(cpus: 0, custom: ["far": 1]))
        #expect(try await cluster.get(try (0..<100).map { _ in try counter.send(1) }).last == 100)
        let status = try await cluster.status(of: counter)
        let host = try #require(cluster.nodeProcesses.first { $0.node == status.node })
        let inFlight = try (0..<2_000).map { _ in try counter.send(1) }
        kill(host.pid, SIGKILL)
        _ = try await Self.waitForAlive(cluster, count: 4, excluding: [host.node])
        // Each call either ran before the kill (its reply came back in order) or failed.
        var replies: [Int] = []
        for ref in inFlight {
            do {
                replies.append(try await cluster.get(ref, timeout: .seconds(30)))
            } catch let error as RemoteError {
                #expect(error.kind == .nodeDied, "\(error)")
            }
        }
        #expect(replies == Array(101..<(101 + replies.count)))
        do {
            _ = try await cluster.get(try counter.send(1), timeout: .seconds(30))
            Issue.record("a call to an actor whose node died returned a value")
        } catch let error as RemoteError {
            #expect(error.kind == .actorUnavailable)
        }
        #expect(try await cluster.status(of: counter).state == .failed)
    }

    @Test("a durable actor on a SIGKILLed node is restored on another node: every call, in flight or later, applied exactly once",
          arguments: ["shared directory", "replicated in the GCS"])
    func durableActorRestoredElsewhere(storage: String) async throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_PROCESS_SEED")
        print("durable actor node kill (\(storage)): seed \(seed) (CAIRN_PROCESS_SEED replays)")
        var random = SeededGenerator(seed: seed)
        let directory = try TemporaryDirectory()
        var options = Self.options()
        // Replicated: the node processes share no directory; the actor's storage is in the GCS.
        options.storage = ActorStorageOptions(location: storage == "shared directory" ? .directory(directory.path) : .replicated, logSegmentBytes: 1 << 20)
        if options.storage.location == .replicated { options.controlStore = .chainReplicated(Self.patientGCSOptions()) }
        // Only the node processes can host it (the head's node lacks `far`).
        for i in 1..<options.nodes.count { options.nodes[i].resources = Resources(cpus: 1, custom: ["far": 1]) }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let bank = try await cluster.spawn(Bank(), name: "bank", durability: DurabilityOptions(checkpoint: .every(messages: 40)),
                                           resources: Resources(cpus: 0, custom: ["far": 1]))
        var model = Bank()
        let caller = CallerID(7)
        var sequence: UInt64 = 0
        /// Sends `count` messages, returning each one's ref and the reply the model gives it.
        func sendBatch(_ count: Int) throws -> [(ObjectRef<Bank.Reply>, Result<Bank.Reply, Bank.InsufficientFunds>)] {
            try (0..<count).map { _ in
                let message = Bank.randomMessage(using: &random)
                sequence += 1
                let expected = Result { try model.receive(message) }.mapError { $0 as! Bank.InsufficientFunds }
                return (try bank.send(message, caller: caller, sequence: sequence), expected)
            }
        }
        func check(_ sent: [(ObjectRef<Bank.Reply>, Result<Bank.Reply, Bank.InsufficientFunds>)], _ what: String) async throws {
            for (i, (ref, expected)) in sent.enumerated() {
                do {
                    let reply = try await cluster.get(ref, timeout: .seconds(60))
                    #expect((try? expected.get()) == reply, "\(what), message \(i): the model expected \(expected)")
                } catch let error as RemoteError {
                    guard case .failure(let refused) = expected, error.kind == .threw, error.message.contains(refused.description) else {
                        Issue.record("\(what), message \(i): \(error), the model expected \(expected)")
                        return
                    }
                }
            }
        }
        try await check(try sendBatch(100), "before any kill")
        var killed: [NodeID] = []
        for round in 1...3 {
            let hostNode = try await cluster.status(of: bank).node
            let host = try #require(cluster.nodeProcesses.first { $0.node == hostNode })
            // Calls keep going out while the host is killed: some applied and answered before,
            // some logged but unanswered, some on their way, some sent to a node already dead.
            var sent: [(ObjectRef<Bank.Reply>, Result<Bank.Reply, Bank.InsufficientFunds>)] = []
            let killAt = Int.random(in: 5..<25, using: &random)
            for i in 0..<30 {
                sent += try sendBatch(20)
                if i == killAt {
                    kill(host.pid, SIGKILL)
                    killed.append(host.node)
                }
                try await Task.sleep(for: .microseconds(300))
            }
            // Every call gets the model's reply: the ones the dead node had were sent again.
            try await check(sent, "round \(round)")
            let status = try await cluster.status(of: bank)
            #expect(status.state == .alive && !killed.contains(status.node), "round \(round): \(status)")
            #expect(status.restarts == round, "round \(round): restored \(status.restarts) times")
            _ = try await Self.waitForAlive(cluster, count: 4, excluding: Set(killed))
        }
        // An anonymous call after the restores sees the whole history.
        let audit = try await cluster.get(try bank.send(.audit), timeout: .seconds(60))
        #expect(audit == (try model.receive(.audit)))
        #expect(cluster.metrics.actorsRestored == 0, "the head restored nothing: the node processes did")
        if options.storage.location == .replicated {
            // The actor's record is in the GCS (read here without claiming the store), and nothing was written to disk.
            let gcs = try #require(cluster.gcs)
            let stored = DurableStore(engine: try ReplicatedEngine(map: gcs.replicatedMap(namespace: "actor-" + LazyActorStorage.directoryName("bank"))))
            let meta = try BinaryDecoder().decode(DurableActorMeta.self, from: try #require(try stored.get(ActorStorage.metaKey("bank"))))
            #expect(meta.restarts == 3 && meta.typeName.hasSuffix("Bank"), "\(meta)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
        }
    }

    @Test("a durable actor whose node dies once more than maxRestarts allows is declared dead, and its callers are told so")
    func durableActorPastMaxRestarts() async throws {
        let directory = try TemporaryDirectory()
        var options = Self.options()
        options.storage = ActorStorageOptions(location: .directory(directory.path))
        for i in 1..<options.nodes.count { options.nodes[i].resources = Resources(cpus: 1, custom: ["far": 1]) }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let bank = try await cluster.spawn(Bank(), name: "fragile", durability: DurabilityOptions(checkpoint: .every(messages: 10), maxRestarts: 0),
                                           resources: Resources(cpus: 0, custom: ["far": 1]))
        _ = try await cluster.get(try bank.send(.deposit(account: 1, amount: 5)), timeout: .seconds(60))
        let hostNode = try await cluster.status(of: bank).node
        let host = try #require(cluster.nodeProcesses.first { $0.node == hostNode })
        kill(host.pid, SIGKILL)
        _ = try await Self.waitForAlive(cluster, count: 4, excluding: [host.node])
        // The restore on another node refuses (one crash, none allowed); the actor is dead.
        let deadline = ContinuousClock.now + .seconds(60)
        var status = try await cluster.status(of: bank)
        while status.state != .dead && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
            status = try await cluster.status(of: bank)
        }
        #expect(status.state == .dead, "\(status)")
        #expect(status.restarts == 1, "the record counts the crash: \(status)")
        do {
            _ = try await cluster.get(try bank.send(.audit), timeout: .seconds(60))
            Issue.record("a dead actor answered")
        } catch let error as RemoteError {
            #expect(error.kind == .actorUnavailable)
            #expect(error.message.contains("it is dead: it crashed 1 time, more than its maxRestarts allows"), "\(error)")
        }
    }

    @Test("a node that stops answering is declared dead by silence and killed, so its durable actor can be restored elsewhere")
    func silentNodeIsFenced() async throws {
        let directory = try TemporaryDirectory()
        var options = Self.options()
        options.failureTimeoutMs = 1_000
        options.storage = ActorStorageOptions(location: .directory(directory.path), logSegmentBytes: 1 << 20)
        for i in 1..<options.nodes.count { options.nodes[i].resources = Resources(cpus: 1, custom: ["far": 1]) }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let counter = try await cluster.spawn(ClusterWorkload.Counter(), name: "fenced", resources: Resources(cpus: 0, custom: ["far": 1]))
        let caller = CallerID(3)
        for n in 1...50 { #expect(try await cluster.get(try counter.send(1, caller: caller, sequence: UInt64(n))) == n) }
        let hostNode = try await cluster.status(of: counter).node
        let host = try #require(cluster.nodeProcesses.first { $0.node == hostNode })
        // Stopped, not dead: it still holds the actor's directory lock, and would forever.
        kill(host.pid, SIGSTOP)
        let refs = try (51...60).map { try counter.send(1, caller: caller, sequence: UInt64($0)) }
        #expect(try await cluster.get(refs, timeout: .seconds(60)) == Array(51...60))
        let status = try await cluster.status(of: counter)
        #expect(status.node != hostNode && status.state == .alive && status.restarts >= 1, "\(status)")
        // The stopped process was killed (a SIGKILL ends even a stopped process), not left holding
        // the lock, and is no longer listed as running. Its supervisor reaps it (on a loaded
        // machine, some time after the actor moved): then no process has its pid any more.
        #expect(!cluster.nodeProcesses.contains { $0.pid == host.pid })
        let deadline = ContinuousClock.now + .seconds(60)
        while kill(host.pid, 0) == 0 && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(kill(host.pid, 0) == -1 && errno == ESRCH, "the stopped node's process (pid \(host.pid)) was not killed")
        // A replacement joined in its place.
        _ = try await Self.waitForAlive(cluster, count: options.nodes.count, excluding: [hostNode])
    }

    @Test("a node declared dead is replaced at once, while its killed process cannot be reaped yet")
    func replacementDoesNotWaitForTheReap() async throws {
        let options = Self.options()
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let victim = try #require(cluster.nodeProcesses.first)
        // A process traced by another is reported to its parent only once the tracer has let
        // it go: the killed node stays a zombie the head cannot reap, as a killed process whose
        // threads take long to end does on a loaded machine. The tracer is a few lines of
        // Python (ptrace is variadic in C, so Swift cannot call it).
        let tracer = Process()
        tracer.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        tracer.arguments = ["python3", "-c", """
            import ctypes, os, sys
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:  # PTRACE_SEIZE
                print("cannot trace: " + os.strerror(ctypes.get_errno()), flush=True); sys.exit(1)
            print("traced", flush=True)
            sys.stdin.read()
            """, String(victim.pid)]
        let input = Pipe(), output = Pipe()
        tracer.standardInput = input
        tracer.standardOutput = output
        tracer.standardError = output
        try tracer.run()
        let said = String(decoding: output.fileHandleForReading.availableData, as: UTF8.self)
        guard said.hasPrefix("traced") else {
            print("replacement without the reap: skipped, no tracer (\(said.isEmpty ? "python3 did not start" : said.trimmingCharacters(in: .whitespacesAndNewlines)))")
            try? input.fileHandleForWriting.close()
            tracer.waitUntilExit()
            return
        }
        kill(victim.pid, SIGKILL)
        _ = try await Self.waitForAlive(cluster, count: options.nodes.count, excluding: [victim.node])
        #expect(kill(victim.pid, 0) == 0, "the killed node's process was reaped before its replacement joined; the test proves nothing")
        #expect(!cluster.nodeProcesses.contains { $0.pid == victim.pid })
        // The tracer lets go; the head reaps the process.
        try input.fileHandleForWriting.close()
        tracer.waitUntilExit()
        let deadline = ContinuousClock.now + .seconds(60)
        while kill(victim.pid, 0) == 0 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(kill(victim.pid, 0) == -1 && errno == ESRCH, "the killed node's process (pid \(victim.pid)) was never reaped")
        // Nothing starts a second replacement once it is reaped.
        try await Task.sleep(for: .milliseconds(200))
        #expect(cluster.nodeProcesses.count == options.nodes.count - 1, "node processes after the reap: \(cluster.nodeProcesses)")
    }

    @Test("GCS replicas in their own processes under a cluster of processes: the chain's head, middle and tail SIGKILLed in turn while tasks and a durable actor run; nothing is lost")
    func gcsReplicaProcessesKilled() async throws {
        let directory = try TemporaryDirectory()
        var options = Self.gcsProcessOptions()
        options.storage = ActorStorageOptions(location: .directory(directory.path), logSegmentBytes: 1 << 20)
        for i in 1..<options.nodes.count { options.nodes[i].resources = Resources(cpus: 1, custom: ["far": 1]) }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let gcs = try #require(cluster.gcs)
        let first = gcs.replicaProcesses
        #expect(first.count == 4, "a chain of 3 and a standby, each in a process: \(first)")
        #expect(Set(first.map(\.pid)).count == 4 && !first.contains { $0.pid == getpid() })
        let bank = try await cluster.spawn(Bank(), name: "gcs-bank", resources: Resources(cpus: 0, custom: ["far": 1]))
        var model = Bank()
        var sequence: UInt64 = 0
        for (round, position) in ["head", "middle", "tail"].enumerated() {
            let chain = try #require(gcs.configurations().first?.chain)
            try #require(chain.count == 3, "round \(round): the chain is whole before the kill: \(chain)")
            let victim = position == "head" ? chain[0] : position == "middle" ? chain[1] : chain[2]
            let pid = try #require(gcs.replicaProcesses.first { $0.replica == victim }?.pid)
            let base = round * 1_000
            let tasks = try (0..<200).map { try ClusterWorkload.slowSquare.remote(base + $0) }
            var calls: [(ObjectRef<Bank.Reply>, Bank.Reply)] = []
            for i in 0..<50 {
                sequence += 1
                let message = Bank.Message.deposit(account: i % Bank.accounts, amount: round + 1)
                calls.append((try bank.send(message, caller: CallerID(9), sequence: sequence), try model.receive(message)))
            }
            kill(pid, SIGKILL)
            // Rows written during and after the kill (a new actor's) land, and are read back.
            let counter = try await cluster.spawn(ClusterWorkload.Counter(), resources: Resources(cpus: 0))
            #expect(try await cluster.get(try counter.send(5), timeout: .seconds(60)) == 5, "\(position)")
            #expect(try await cluster.get(tasks, timeout: .seconds(60)) == (0..<200).map { (base + $0) * (base + $0) }, "\(position)")
            for (ref, expected) in calls { #expect(try await cluster.get(ref, timeout: .seconds(60)) == expected, "\(position)") }
            #expect(try await cluster.status(of: counter).state == .alive, "\(position): the new actor's row was written")
            // Back to full strength: a chain of 3 again, the killed replica's process started again.
            let deadline = ContinuousClock.now + .seconds(60)
            while ContinuousClock.now < deadline, gcs.configurations().first?.chain.count != 3 || gcs.replicaProcesses.first(where: { $0.replica == victim })?.pid == pid {
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(gcs.configurations().first?.chain.count == 3, "\(position): \(gcs.configurations())")
            #expect(gcs.replicaProcesses.first { $0.replica == victim }?.pid != pid, "\(position): the replica was started again")
        }
        // Every call applied once: the audit sees all 150 deposits.
        sequence += 1
        let audit = try await cluster.get(try bank.send(.audit, caller: CallerID(9), sequence: sequence), timeout: .seconds(60))
        #expect(audit == (try model.receive(.audit)) && audit.applied == 151)
    }

    @Test("nodes in separate network namespaces talk over real addresses through a bridge; one is killed and replaced, and its durable actor, stored in the GCS, answers from another")
    func nodesInNetworkNamespaces() async throws {
        let network: NamespaceNetwork
        do {
            network = try NamespaceNetwork(nodes: 3)
        } catch {
            print("skipped: network namespaces cannot be made here (\(error))")
            return
        }
        defer { network.remove() }
        var options = Self.options()
        options.transport = .tcp(host: network.headAddress)
        // As on separate machines, the nodes share no storage: durable actors live in the GCS.
        options.controlStore = .chainReplicated(Self.patientGCSOptions())
        options.storage = ActorStorageOptions(location: .replicated)
        for k in 1...3 {
            options.nodes[k].host = network.nodeAddresses[k - 1]
            options.nodes[k].launcher = ["ip", "netns", "exec", network.namespaces[k - 1]]
            options.nodes[k].resources = Resources(cpus: 1, custom: ["far": 1])
        }
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let counter = try await cluster.spawn(ClusterWorkload.Counter(), name: "counted", resources: Resources(cpus: 0, custom: ["far": 1]))
        let caller = CallerID(5)
        #expect(try await cluster.get(try (1...50).map { try counter.send(1, caller: caller, sequence: UInt64($0)) }) == Array(1...50))
        let refs = try (0..<200).map { try ClusterWorkload.whereAmI.remote($0) }
        let results = try await cluster.get(refs)
        #expect(results.map { $0[1] } == Array(0..<200))
        #expect(Set(results.map { Int32($0[0]) }).subtracting([getpid()]).count >= 2)
        let sums = try await cluster.get(try (1...10).map { try ClusterWorkload.sumOfSquares.remote($0 * 10) })
        #expect(sums == (1...10).map { n in (0..<(n * 10)).reduce(0) { $0 + $1 * $1 } })

        let hostNode = try await cluster.status(of: counter).node
        let victim = try #require(cluster.nodeProcesses.first { $0.node == hostNode })
        let slow = try (0..<300).map { try ClusterWorkload.slowSquare.remote($0) }
        let counted = try (51...70).map { try counter.send(1, caller: caller, sequence: UInt64($0)) }
        try await Task.sleep(for: .milliseconds(20))
        kill(victim.pid, SIGKILL)
        #expect(try await cluster.get(slow, timeout: .seconds(60)) == (0..<300).map { $0 * $0 })
        #expect(try await cluster.get(counted, timeout: .seconds(60)) == Array(51...70))
        let status = try await cluster.status(of: counter)
        #expect(status.state == .alive && status.node != hostNode && status.restarts == 1, "\(status)")
        _ = try await Self.waitForAlive(cluster, count: 4, excluding: [victim.node])
    }

    @Test("the global scheduler's process SIGKILLed while tasks are handed to it: a replacement places them all")
    func killedSchedulerIsReplaced() async throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_PROCESS_SEED")
        print("scheduler kill: seed \(seed) (CAIRN_PROCESS_SEED replays)")
        var random = SeededGenerator(seed: seed)
        // The driver's node runs nothing: every burst goes through the scheduler.
        let options = Self.idleDriverOptions()
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        #expect(try await cluster.get(try ClusterWorkload.square.remote(3)) == 9)
        for round in 0..<3 {
            let scheduler = try #require(cluster.schedulerProcess)
            let refs = try (0..<2_000).map { try ClusterWorkload.square.remote(round * 10_000 + $0) }
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...20, using: &random)))
            kill(scheduler, SIGKILL)
            let more = try (0..<500).map { try ClusterWorkload.square.remote(round * 10_000 + 5_000 + $0) }
            #expect(try await cluster.get(refs, timeout: .seconds(60)) == (0..<2_000).map { (round * 10_000 + $0) * (round * 10_000 + $0) })
            #expect(try await cluster.get(more, timeout: .seconds(60)) == (0..<500).map { (round * 10_000 + 5_000 + $0) * (round * 10_000 + 5_000 + $0) })
            let deadline = ContinuousClock.now + .seconds(20)
            while cluster.schedulerProcess == nil || cluster.schedulerProcess == scheduler {
                guard ContinuousClock.now < deadline else { break }
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(cluster.schedulerProcess != nil && cluster.schedulerProcess != scheduler)
        }
    }

    @Test("a GCS replica joined from outside stands by, takes the place of killed replicas, and no acknowledged write is lost")
    func joinedReplicaTakesOver() async throws {
        var options = Self.gcsProcessOptions()
        options.headPort = 0
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let gcs = try #require(cluster.gcs)
        let files = try TemporaryDirectory()
        try #require(cluster.token).write(to: files.path + "/token")
        let (joined, pid) = try await Cluster.startReplica(joining: try #require(cluster.headAddress), tokenFile: files.path + "/token",
                                                           executable: try #require(options.nodeExecutable), storage: files.path, shard: 0,
                                                           logFile: files.path + "/replica.log")
        var reaped = false
        defer {
            if !reaped {
                kill(pid, SIGKILL)  // this test's own child, if it still runs
                var status: Int32 = 0
                waitpid(pid, &status, 0)
            }
        }
        #expect(gcs.replicaIDs.contains(joined))
        var acknowledged: [String: [UInt8]] = [:]
        var n = 0
        func write(_ count: Int) throws {
            for _ in 0..<count {
                n += 1
                let key = GCSTable.keyValue.key("joined-\(n % 30)")
                try gcs.put(key, Array("\(n)".utf8))
                acknowledged[key] = Array("\(n)".utf8)
            }
        }
        try write(30)
        let listed = cluster.report().chains.first ?? ""
        #expect(listed.contains("standby") && listed.contains("\(joined)"), "the joined replica is listed as a standby: \(listed)")

        // The tail and the built-in standby die together: the joined replica is the one standby
        // alive, so it catches up and becomes the tail. The head starts the killed ones again
        // 100 ms later; if the head was held up that long (a loaded machine), one of them may
        // take the place first, which is right too, and the round is repeated.
        func chainIsWhole() -> Bool {
            let c = gcs.configurations()[0]  // one reading: the chain and the learner of the same configuration
            return c.chain.count == 3 && c.learner == nil
        }
        var rounds: [String] = []
        while rounds.count < 5 && !gcs.configurations()[0].chain.contains(joined) {
            let whole = ContinuousClock.now + .seconds(60)
            while ContinuousClock.now < whole && !chainIsWhole() {
                try write(1)
                try await Task.sleep(for: .milliseconds(10))
            }
            let before = gcs.configurations()[0]
            #expect(chainIsWhole(), "the chain is whole before the kills: \(before)")
            let victims = [before.tail] + gcs.replicaProcesses.map(\.replica).filter { !before.contains($0) }
            #expect(victims.count == 2, "the tail and the standby started by the head: \(victims)")
            for v in victims { kill(try #require(gcs.replicaProcesses.first { $0.replica == v }?.pid), SIGKILL) }
            let deadline = ContinuousClock.now + .seconds(60)
            while ContinuousClock.now < deadline && !(gcs.configurations()[0].epoch > before.epoch && chainIsWhole()) {
                try write(1)
                try await Task.sleep(for: .milliseconds(10))
            }
            rounds.append("\(before) became \(gcs.configurations()[0])")
            for (key, value) in acknowledged { #expect(try gcs.get(key) == value, "\(key)") }
        }
        print("joined replica: \(rounds.count) round(s) of kills: \(rounds)")
        let took = gcs.configurations()[0]
        #expect(took.chain.contains(joined) && took.chain.count == 3, "the joined replica is in the chain: \(took), after \(rounds)")
        for (key, value) in acknowledged { #expect(try gcs.get(key) == value, "\(key)") }

        // The joined replica dies: it is cut out and the chain made whole from the head's own.
        kill(pid, SIGKILL)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        reaped = true
        let again = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < again && (gcs.configurations()[0].chain.contains(joined) || gcs.configurations()[0].chain.count < 3) {
            try write(1)
            try await Task.sleep(for: .milliseconds(10))
        }
        let repaired = gcs.configurations()[0]
        #expect(!repaired.chain.contains(joined) && repaired.chain.count == 3, "\(repaired)")
        try write(20)
        for (key, value) in acknowledged { #expect(try gcs.get(key) == value, "\(key)") }
    }

    @Test("the cluster chaos campaign: seeded SIGKILLs of nodes, the scheduler and GCS replicas (compacting) and cuts of the connections between node processes, while tasks, nested tasks and a durable actor stored in the GCS run; every result and reply right, full strength after each")
    func chaosCampaign() async throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_PROCESS_SEED")
        print("cluster chaos campaign: seed \(seed) (CAIRN_PROCESS_SEED replays; swift run cairn-chaos cluster --seed \(seed) runs it alone)")
        var configuration = ClusterCampaign.Configuration(executable: executableDirectory() + "/cairn-chaos", seed: seed, kills: 4,
                                                          tasksPerRound: 200, callsPerRound: 30)
        let noCuts = ConnectionCutter.unavailable()
        if let noCuts { print("cluster chaos campaign: no connection cuts: \(noCuts)") }
        configuration.cutsPerRound = noCuts == nil ? 3 : 0
        let report = await ClusterCampaign.run(configuration)
        report.timeline.forEach { print($0) }
        print("cluster chaos campaign: \(report.connectionsCut) connections between node processes cut")
        #expect(report.failures.isEmpty, "\(report.failures)")
        #expect(report.kills.values.reduce(0, +) == 4 && report.tasksChecked == 4 * (200 + 4) && report.callsChecked == 121, "\(report.kills)")
        // The campaign's GCS compacts every 8 updates: the kills landed on compacting replicas.
        #expect(report.gcsReplicas.contains { $0.base > 0 }, "the GCS replicas compacted: \(report.gcsReplicas)")
    }

    /// Waits until the head's report lists schedulers that satisfy `condition`.
    static func schedulers(_ cluster: Cluster, until condition: ([SchedulerStatus]) -> Bool) async throws -> [SchedulerStatus] {
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline {
            let listed = cluster.report().schedulers
            if condition(listed) { return listed }
            try await Task.sleep(for: .milliseconds(5))
        }
        Issue.record("the schedulers never matched; last: \(cluster.report().schedulers)")
        return cluster.report().schedulers
    }

    @Test("a standby scheduler joined from outside takes over when the active one's process is SIGKILLed; every task handed to either completes")
    func standbySchedulerTakesOver() async throws {
        var options = Self.idleDriverOptions()
        options.headPort = 0
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let files = try TemporaryDirectory()
        try #require(cluster.token).write(to: files.path + "/token")
        let standby = try await Cluster.startScheduler(joining: try #require(cluster.headAddress), tokenFile: files.path + "/token",
                                                       executable: try #require(options.nodeExecutable), logFile: files.path + "/scheduler.log")
        defer {
            kill(standby, SIGKILL)  // this test's own child, if it still runs
            var status: Int32 = 0
            waitpid(standby, &status, 0)
        }
        let both = try await Self.schedulers(cluster) { $0.count == 2 }
        let standbyAddress = try #require(both.first { !$0.active }?.address)
        #expect(try await cluster.get(try ClusterWorkload.square.remote(3)) == 9)

        // The head's scheduler dies with tasks handed to it: the standby takes over.
        let first = try #require(cluster.schedulerProcess)
        let refs = try (0..<2_000).map { try ClusterWorkload.square.remote($0) }
        kill(first, SIGKILL)
        let more = try (0..<500).map { try ClusterWorkload.square.remote(5_000 + $0) }
        #expect(try await cluster.get(refs, timeout: .seconds(60)) == (0..<2_000).map { $0 * $0 })
        #expect(try await cluster.get(more, timeout: .seconds(60)) == (0..<500).map { (5_000 + $0) * (5_000 + $0) })
        // The head's replacement for the one that died registers as the standby now.
        let after = try await Self.schedulers(cluster) { $0.count == 2 && $0.first?.active == true }
        #expect(after.first?.address == standbyAddress, "the standby is active: \(after)")

        // The former standby dies in turn: the head's replacement takes over.
        kill(standby, SIGKILL)
        let last = try (0..<1_000).map { try ClusterWorkload.square.remote(9_000 + $0) }
        #expect(try await cluster.get(last, timeout: .seconds(60)) == (0..<1_000).map { (9_000 + $0) * (9_000 + $0) })
        let final = try await Self.schedulers(cluster) { $0.count == 1 && $0[0].active }
        #expect(final.first?.address != standbyAddress, "\(final)")
    }

    @Test("a large result kept on the node that computed it is rebuilt from lineage when that node is killed")
    func lineageRebuildsLargeResult() async throws {
        let options = Self.idleDriverOptions()
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        for round in 0..<(Int(ProcessInfo.processInfo.environment["CAIRN_LINEAGE_ROUNDS"] ?? "") ?? 3) {
            let ref = try ClusterWorkload.block.remote(round)
            // Wait until the owner (the driver's node) has recorded where the result is kept.
            var location: ObjectLocation?
            let deadline = ContinuousClock.now + .seconds(30)
            while location == nil && ContinuousClock.now < deadline {
                location = await cluster.location(of: ref)
                if location == nil { try await Task.sleep(for: .milliseconds(2)) }
            }
            let holder = try #require(location?.node)
            let victim = try #require(cluster.nodeProcesses.first { $0.node == holder }, "kept on \(holder), not on a node process")
            kill(victim.pid, SIGKILL)
            let value = try await cluster.get(ref, timeout: .seconds(60))
            #expect(value == (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ round) })
            _ = try await Self.waitForAlive(cluster, count: 4, excluding: [victim.node])
        }
        // A result fetched before its holder dies stays with its owner.
        let kept = try ClusterWorkload.block.remote(9)
        let first = try await cluster.get(kept)
        #expect(try await cluster.get(kept) == first)
    }

    /// Runs `count` tasks from the driver one at a time (each alone); the pids they ran in.
    static func loneTasks(_ cluster: Cluster, count: Int) async throws -> Set<Int> {
        var pids: Set<Int> = []
        for i in 0..<count {
            let result = try await cluster.get(try ClusterWorkload.whereAmI.remote(i))
            #expect(result[1] == i)
            pids.insert(result[0])
        }
        return pids
    }

    @Test("a lone task goes from its owner straight to an idle node process, without the scheduler; SIGKILLed there, it runs again elsewhere")
    func loneTasksGoStraightToIdleNodes() async throws {
        let options = Self.idleDriverOptions()
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        // One at a time, every node idle: each is sent straight to a node process (the same
        // one while it stays idle).
        let pids = try await Self.loneTasks(cluster, count: 20)
        let direct = cluster.driverNode.directPlacements
        #expect(direct >= 15, "only \(direct) of 20 lone tasks went straight to a node")
        #expect(!pids.isEmpty && !pids.contains(Int(getpid())))

        // A lone task's node is killed while it runs: its owner knows where it was and runs it again.
        let ref = try ClusterWorkload.sleep.remote(2_000)
        let deadline = ContinuousClock.now + .seconds(30)
        var placedOn: NodeID?
        while placedOn == nil && ContinuousClock.now < deadline {
            placedOn = cluster.driverNode.placement(of: ref.id)
            if placedOn == nil { try await Task.sleep(for: .milliseconds(1)) }
        }
        #expect(cluster.driverNode.directPlacements == direct + 1)
        let victim = try #require(cluster.nodeProcesses.first { $0.node == placedOn }, "the task was placed on \(String(describing: placedOn))")
        try await Task.sleep(for: .milliseconds(200))
        kill(victim.pid, SIGKILL)
        #expect(try await cluster.get(ref, timeout: .seconds(60)) == 2_000)
        #expect(cluster.driverNode.placement(of: ref.id) != victim.node)
        let alive = try await Self.waitForAlive(cluster, count: 4, excluding: [victim.node])
        #expect(!alive.contains(victim.node))
    }

    @Test("with placeLoneTasksDirectly off, lone tasks take the scheduler's path and still run in the node processes")
    func loneTasksThroughTheScheduler() async throws {
        var options = Self.idleDriverOptions()
        options.placeLoneTasksDirectly = false
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let pids = try await Self.loneTasks(cluster, count: 10)
        #expect(cluster.driverNode.directPlacements == 0)
        #expect(!pids.isEmpty && !pids.contains(Int(getpid())))
    }

    @Test("past maxTaskRetries, a task whose node died fails with nodeDied")
    func retriesAreBounded() async throws {
        var options = Self.idleDriverOptions()
        options.maxTaskRetries = 0
        options.replaceDeadNodes = false
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        let ref = try ClusterWorkload.sleep.remote(5_000)
        try await Task.sleep(for: .milliseconds(300))
        // Wherever it runs, its node dies: every node process is killed.
        for child in cluster.nodeProcesses { kill(child.pid, SIGKILL) }
        do {
            _ = try await cluster.get(ref, timeout: .seconds(30))
            Issue.record("a task whose node died returned a value with maxTaskRetries 0")
        } catch let error as RemoteError {
            #expect(error.kind == .nodeDied, "\(error)")
            #expect(error.message.contains("maxTaskRetries is 0"))
        }
    }

    @Test("connections between live node processes, cut for real (ss -K) while nested tasks run across them, lose nothing: every result right, no node declared dead")
    func cutConnectionsLoseNothing() async throws {
        if let reason = ConnectionCutter.unavailable() {
            print("cutConnectionsLoseNothing: skipped: \(reason)")
            return
        }
        let seed: UInt64 = 2_026_112_805
        print("cutConnectionsLoseNothing: seed \(seed)")
        ClusterWorkload.register()  // the head's node runs some of the nested tasks too
        let cluster = try await Cluster.local(Self.options())
        defer { cluster.shutdown() }
        let children = cluster.nodeProcesses
        let pids = Set(children.map { Int($0.pid) })
        let stop = Locked(false)
        let cuts = Locked(0)
        // Every few milliseconds (seeded), every connection from one node process to another's
        // port is destroyed by the kernel: both ends see it reset, as after a network fault.
        let cutter = Thread {
            var random = SeededGenerator(seed: seed)
            while !stop.value {
                usleep(UInt32.random(in: 1_000...5_000, using: &random))
                cuts.update { $0 += ConnectionCutter.cutConnections(among: pids) }
            }
        }
        cutter.start()
        var round = 0
        // Rounds until the cuts have hit many connections in use (and at least 3 rounds).
        while round < 3 || (cuts.value < 100 && round < 40) {
            round += 1
            let sums = try (0..<12).map { try ClusterWorkload.sumOfSquares.remote(100 + $0) }
            let fans = try (0..<6).map { try ClusterWorkload.fanOut.remote(1_000 + $0) }
            let totals = try await cluster.get(sums, timeout: .seconds(120))
            #expect(totals == (0..<12).map { n in (0..<(100 + n)).reduce(0) { $0 + $1 * $1 } }, "round \(round)")
            let fanned = try await cluster.get(fans, timeout: .seconds(120))
            #expect(fanned == (0..<6).map { n in (0..<(1_000 + n)).reduce(0, +) }, "round \(round)")
        }
        stop.update { $0 = true }
        while !cutter.isFinished { usleep(1_000) }
        print("cutConnectionsLoseNothing: \(cuts.value) connections cut over \(round) rounds")
        #expect(cuts.value >= 100, "only \(cuts.value) connections between node processes were cut")
        // A cut is not a death: the same processes serve, and none was declared dead.
        #expect(cluster.nodeProcesses.map(\.pid) == children.map(\.pid))
        #expect(cluster.aliveNodes.count == 4)
    }

    @Test("a bad node executable is refused before anything starts")
    func badExecutableIsRefused() async throws {
        var options = Self.options()
        options.nodeExecutable = "/nonexistent/cairn-node"
        await #expect(throws: CairnError.self) { _ = try await Cluster.local(options) }
        options = Self.options()
        options.failureTimeoutMs = 10
        await #expect(throws: CairnError.self) { _ = try await Cluster.local(options) }
    }
}
}

/// A bridge in this namespace (the head's address) and one network namespace per node, each
/// joined to the bridge by a veth pair: nodes reach the head and each other over real
/// addresses, not loopback. Needs root.
struct NamespaceNetwork {
    let tag: String
    let namespaces: [String]
    let headAddress: String
    let nodeAddresses: [String]
    private var bridge: String { "cbr\(tag)" }

    init(nodes: Int) throws {
        tag = String(getpid() % 100_000)
        namespaces = (1...nodes).map { "cairn-\(getpid())-\($0)" }
        let subnet = "10.\(77 + Int(getpid() % 100)).0"
        headAddress = "\(subnet).1"
        nodeAddresses = (1...nodes).map { "\(subnet).\($0 + 1)" }
        do {
            try Self.ip(["link", "add", bridge, "type", "bridge"])
            try Self.ip(["addr", "add", "\(headAddress)/24", "dev", bridge])
            try Self.ip(["link", "set", bridge, "up"])
            for (k, ns) in namespaces.enumerated() {
                let outside = "cv\(tag)-\(k)", inside = "cp\(tag)-\(k)"
                try Self.ip(["netns", "add", ns])
                try Self.ip(["link", "add", outside, "type", "veth", "peer", "name", inside])
                try Self.ip(["link", "set", inside, "netns", ns])
                try Self.ip(["link", "set", outside, "master", bridge])
                try Self.ip(["link", "set", outside, "up"])
                try Self.ip(["netns", "exec", ns, "ip", "addr", "add", "\(nodeAddresses[k])/24", "dev", inside])
                try Self.ip(["netns", "exec", ns, "ip", "link", "set", inside, "up"])
                try Self.ip(["netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            }
        } catch {
            remove()
            throw error
        }
    }

    func remove() {
        for ns in namespaces { try? Self.ip(["netns", "del", ns]) }
        try? Self.ip(["link", "del", bridge])
    }

    static func ip(_ arguments: [String]) throws {
        try runTool("/usr/sbin/ip", arguments)
    }
}
