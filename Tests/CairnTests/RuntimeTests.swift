@testable import Cairn
import CairnCore
import CairnCodec
import Foundation
import Testing

// Functions are registered by name, once per process, as a program would at start-up.
let double = RemoteFunction<Int, Int>("test.double") { $0 * 2 }
let whereAmI = RemoteFunction<Int, Int>("test.whereAmI") { _ in
    usleep(200)
    return TaskContext.node!.raw
}
let add = RemoteFunction2<Int, Int, Int>("test.add") { $0 + $1 }
let increment = RemoteFunction<Int, Int>("test.increment") { $0 + 1 }
struct Boom: Error, CustomStringConvertible { var description: String { "boom: the input was 13" } }
let failOn13 = RemoteFunction<Int, Int>("test.failOn13") { x in
    if x == 13 { throw Boom() }
    return x
}
let sleepy = RemoteFunction<Int, Int>("test.sleepy") { ms in
    usleep(UInt32(ms) * 1000)
    return ms
}
/// Recursion through the cluster: depth d submits depth d-1 and blocks on it.
let nested = RemoteFunction<Int, Int>("test.nested") { depth in
    depth == 0 ? 0 : try nested.remote(depth - 1).get() + 1
}
let needsGPU = RemoteFunction<Int, Int>("test.needsGPU", resources: Resources(cpus: 1, custom: ["gpu": 1])) { $0 }
let onlyOnNode0 = RemoteFunction<Int, Int>("test.onlyOnNode0") { _ in TaskContext.node!.raw }
/// Gets an object whose reference arrives inside a value, so the task's node must fetch it.
let unwrap = RemoteFunction<[ObjectRef<Int>], Int>("test.unwrap") { refs in try refs.reduce(0) { $0 + (try $1.get()) } }
let bigBlob = RemoteFunction<Int, [UInt8]>("test.bigBlob") { n in [UInt8](repeating: UInt8(n & 0xFF), count: 1 << 20) }

struct Recorder: RemoteActor {
    enum Message: Codable, Sendable { case record(caller: Int, seq: Int), read }
    var seen: [Int: [Int]] = [:]
    mutating func receive(_ message: Message) throws -> [Int: [Int]] {
        if case .record(let caller, let seq) = message { seen[caller, default: []].append(seq) }
        return seen
    }
}

struct Counter: RemoteActor {
    var total = 0
    mutating func receive(_ n: Int) throws -> Int {
        if n < 0 { throw Boom() }
        total += n
        return total
    }
}

/// A caller that sends its messages from a task, so callers run concurrently on several nodes.
let sendInOrder = RemoteFunction2<ActorHandle<Recorder>, Int, Int>("test.sendInOrder") { actor, caller in
    var last: ObjectRef<[Int: [Int]]>?
    for seq in 0..<200 { last = try actor.send(.record(caller: caller, seq: seq)) }
    _ = try last!.get()
    return caller
}

/// Every suite that starts an embedded cluster nests here: the driver's cluster is process-wide
/// (as `ray.init()` is), so two suites must not run clusters at the same time.
@Suite("Embedded clusters", .serialized)
enum ClusterSuites {}

extension ClusterSuites {
@Suite("Runtime: tasks, objects, actors on an embedded 4-node cluster", .serialized)
struct RuntimeTests {
    func withCluster(_ options: ClusterOptions = .uniform(nodes: 4), _ body: (Cluster) async throws -> Void) async throws {
        let cluster = try await Cluster.local(options)
        defer { cluster.shutdown() }
        try await body(cluster)
    }

    @Test("remote returns at once and get returns the value; put makes an object")
    func basics() async throws {
        try await withCluster { cluster in
            let slow = try sleepy.remote(300)
            let quick = try double.remote(21)
            #expect(try await cluster.get(quick) == 42)
            let put = cluster.put([1, 2, 3])
            #expect(try await cluster.get(put) == [1, 2, 3])
            #expect(try await cluster.get(try double.remote(cluster.put(5))) == 10)
            #expect(try await cluster.get(slow) == 300)
        }
    }

    @Test("4 nodes in one process: a burst of tasks spills past the driver's node and runs on all four")
    func spreadsAcrossNodes() async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        for i in options.nodes.indices { options.nodes[i].spillThreshold = 2 }
        try await withCluster(options) { cluster in
            let refs = try (0..<400).map { try whereAmI.remote($0) }
            let nodes = Set(try await cluster.get(refs))
            #expect(nodes == [0, 1, 2, 3])
            // Nodes that ran tasks for node 0 keep nothing about them once the results are sent.
            #expect(cluster.nodes.dropFirst().allSatisfy { $0.trackedObjects == 0 })
        }
    }

    @Test("data edges: a chain of 1,000 dependent tasks and a pairwise fan-in of 1,024 leaves")
    func dataEdges() async throws {
        try await withCluster { cluster in
            var ref = cluster.put(0)
            for _ in 0..<1000 { ref = try increment.remote(ref) }
            #expect(try await cluster.get(ref) == 1000)

            var level = try (0..<1024).map { try double.remote($0) }
            while level.count > 1 {
                level = try stride(from: 0, to: level.count, by: 2).map { try add.remote(level[$0], level[$0 + 1]) }
            }
            #expect(try await cluster.get(level[0]) == 2 * (0..<1024).reduce(0, +))
        }
    }

    @Test("nested tasks 100 deep on a pool of 2 workers do not deadlock")
    func nestedDeep() async throws {
        try await withCluster(ClusterOptions(nodes: [NodeConfiguration(resources: Resources(cpus: 2))])) { cluster in
            let depth = try await cluster.get(try nested.remote(100), timeout: .seconds(60))
            #expect(depth == 100)
        }
    }

    @Test("a reference inside a value is fetched by the node that needs it")
    func nestedRefsAreFetched() async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        for i in options.nodes.indices { options.nodes[i].spillThreshold = 1 }
        try await withCluster(options) { cluster in
            let refs = try (1...4).map { try double.remote($0) }
            let sums = try (0..<40).map { _ in try unwrap.remote(refs) }
            for s in try await cluster.get(sums) { #expect(s == 20) }
        }
    }

    @Test("errors: a thrown error comes back typed with task, function and node; downstream tasks fail with it")
    func errorPropagation() async throws {
        try await withCluster { cluster in
            let bad = try failOn13.remote(13)
            let chain = try increment.remote(try increment.remote(bad))
            do {
                _ = try await cluster.get(chain)
                Issue.record("expected a RemoteError")
            } catch let error as RemoteError {
                #expect(error.kind == .upstreamFailed)
                #expect(error.function == "test.increment")
                #expect(error.root.kind == .threw)
                #expect(error.root.function == "test.failOn13")
                #expect(error.root.task == bad.id)
                #expect(error.root.message.contains("boom: the input was 13"))
                #expect(error.description.contains("test.failOn13"))
            }
            #expect(try await cluster.get(try failOn13.remote(12)) == 12)
        }
    }

    @Test("wait: returns the first `count` ready in input order, honours the timeout, rejects duplicates and bad counts")
    func waitSemantics() async throws {
        try await withCluster { cluster in
            let fast = try (0..<3).map { try double.remote($0) }
            let slow = try sleepy.remote(2_000)
            let refs = [slow] + fast
            let (ready, notReady) = try await cluster.wait(refs, count: 3, timeout: .seconds(10))
            #expect(ready.count == 3)
            #expect(Set(ready) == Set(fast))
            #expect(notReady == [slow])
            let (none, all) = try await cluster.wait([slow], count: 1, timeout: .milliseconds(50))
            #expect(none.isEmpty && all == [slow])
            // A zero timeout returns at once with whatever is ready.
            let (readyNow, _) = try await cluster.wait(fast + [slow], count: 4, timeout: .zero)
            #expect(Set(readyNow) == Set(fast))
            await #expect(throws: CairnError.self) { try await cluster.wait([fast[0], fast[0]], count: 1) }
            await #expect(throws: CairnError.self) { try await cluster.wait(fast, count: 4) }
            await #expect(throws: CairnError.self) { try await cluster.wait(fast, count: 0) }
            do {
                _ = try await cluster.get(slow, timeout: .milliseconds(20))
                Issue.record("expected a timeout")
            } catch let e as CairnError {
                #expect(e.code == .timeout)
            }
        }
    }

    @Test("a zero timeout polls: it reports what is ready now, leaves no waiter behind, and fetches a value held elsewhere")
    func zeroTimeoutPolls() async throws {
        var options = ClusterOptions.uniform(nodes: 2)
        options.nodes[0].resources = Resources(cpus: 0)
        try await withCluster(options) { cluster in
            let slow = try sleepy.remote(1_000)
            for _ in 0..<100 {
                let (ready, notReady) = try await cluster.wait([slow], timeout: .zero)
                #expect(ready.isEmpty && notReady == [slow])
            }
            #expect(cluster.driverNode.waiterCount(of: slow.id) == 0)
            do {
                _ = try await cluster.get(slow, timeout: .zero)
                Issue.record("expected a timeout")
            } catch let e as CairnError {
                #expect(e.code == .timeout)
            }
            // 1 MiB made on the other node (the driver's has no CPUs) stays there until asked
            // for; polling alone brings it here.
            let far = try bigBlob.remote(7)
            var polls = 0
            while try await cluster.wait([far], timeout: .zero).ready.isEmpty {
                polls += 1
                try await Task.sleep(for: .milliseconds(1))
                #expect(polls < 20_000, "the value never arrived")
                if polls >= 20_000 { return }
            }
            #expect(polls > 0)
            #expect(try await cluster.get(far, timeout: .zero) == [UInt8](repeating: 7, count: 1 << 20))
        }
    }

    @Test("resources: a task no node can satisfy fails at once; one that a node can is placed there")
    func resources() async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        options.nodes[3].resources.custom["gpu"] = 1
        options.nodes[0].spillThreshold = 0
        try await withCluster(options) { cluster in
            #expect(throws: CairnError.self) { try double.options(resources: Resources(cpus: 64)).remote(1) }
            do {
                _ = try double.options(resources: Resources(cpus: 1, custom: ["tpu": 1])).remote(1)
            } catch let e as CairnError {
                #expect(e.code == .infeasible)
                #expect(e.detail.contains("tpu"))
            }
            #expect(try await cluster.get(try needsGPU.remote(7)) == 7)
        }
    }

    @Test("registry: a node refuses a function it does not have; the scheduler never sends it there")
    func unknownFunctions() async throws {
        var options = ClusterOptions.uniform(nodes: 2)
        options.nodes[1].functions = ["test.double"]
        options.nodes[0].spillThreshold = 1
        try await withCluster(options) { cluster in
            let refs = try (0..<50).map { try onlyOnNode0.remote($0) }
            for n in try await cluster.get(refs) { #expect(n == 0) }
            #expect(throws: CairnError.self) { try cluster.nodes[1].submit(function: "test.nonexistent", args: [.value(.boxed(1))], resources: .default) as ObjectRef<Int> }
            // A node handed a task it lacks refuses it with a typed error rather than running it.
            let spec = try TaskSpec(id: cluster.nodes[0].mint.object(), function: "test.onlyOnNode0", args: [.value(.boxed(1))], resources: .default).portable()
            cluster.nodes[0].expectResult(spec.id)
            cluster.transport.send(.runTasks([spec]), to: .node(NodeID(1)))
            let ref: ObjectRef<Int> = cluster.nodes[0].newRef(spec.id)
            do {
                _ = try await cluster.get(ref, timeout: .seconds(10))
                Issue.record("expected refusal")
            } catch let e as RemoteError {
                #expect(e.kind == .unknownFunction)
                #expect(e.node == NodeID(1))
            }
        }
    }

    @Test("cancel: a queued task is cancelled and its get throws; a finished one is not")
    func cancellation() async throws {
        try await withCluster(ClusterOptions(nodes: [NodeConfiguration(resources: Resources(cpus: 1))])) { cluster in
            let blocker = try sleepy.remote(300)
            let queued = try double.remote(1)
            #expect(cluster.cancel(queued))
            do {
                _ = try await cluster.get(queued)
                Issue.record("expected cancelled")
            } catch let e as RemoteError {
                #expect(e.kind == .cancelled)
            }
            #expect(try await cluster.get(blocker) == 300)
            #expect(!cluster.cancel(blocker))
            // A task waiting on an input can be cancelled too.
            let waiting = try increment.remote(try sleepy.remote(200))
            #expect(cluster.cancel(waiting))
            await #expect(throws: RemoteError.self) { try await cluster.get(waiting) }
        }
    }

    @Test("actors: state persists across calls, a handle works from tasks, a throwing handler fails only its call")
    func actors() async throws {
        try await withCluster { cluster in
            let counter = try await cluster.spawn(Counter())
            var last: ObjectRef<Int>?
            for _ in 0..<100 { last = try counter.send(1) }
            #expect(try await cluster.get(last!) == 100)
            await #expect(throws: RemoteError.self) { try await cluster.get(try counter.send(-1)) }
            #expect(try await cluster.get(try counter.send(5)) == 105)
        }
    }

    @Test("actors: messages from each of 8 concurrent callers on 4 nodes run in the order each sent them")
    func perCallerOrdering() async throws {
        var options = ClusterOptions.uniform(nodes: 4)
        for i in options.nodes.indices { options.nodes[i].spillThreshold = 1 }
        try await withCluster(options) { cluster in
            let recorder = try await cluster.spawn(Recorder())
            let callers = try (0..<8).map { try sendInOrder.remote(recorder, $0) }
            _ = try await cluster.get(callers)
            let seen = try await cluster.get(try recorder.send(.read))
            #expect(seen.count == 8)
            for caller in 0..<8 { #expect(seen[caller] == Array(0..<200)) }
        }
    }

    @Test("memory: objects are freed when their last reference goes, and a store over its limit evicts and rebuilds")
    func memory() async throws {
        var options = ClusterOptions(nodes: [NodeConfiguration(resources: Resources(cpus: 1), storeLimitBytes: 8 << 20)])
        options.housekeepingIntervalMs = 1
        try await withCluster(options) { cluster in
            do {
                let refs = try (0..<1000).map { try double.remote($0) }
                _ = try await cluster.get(refs)
                #expect(cluster.storeStatus[0].objects >= 1000)
            }
            var freed = false
            for _ in 0..<500 where !freed {
                try await Task.sleep(for: .milliseconds(5))
                freed = cluster.storeStatus[0].objects < 10
            }
            #expect(freed, "objects were not freed: \(cluster.storeStatus)")

            // 32 objects of 1 MiB through an 8 MiB store: it stays bounded, and every value is still right.
            let blobs = try (0..<32).map { try bigBlob.remote($0) }
            _ = try await cluster.wait(blobs, count: 32, timeout: .seconds(30))
            #expect(cluster.storeStatus[0].bytes <= 9 << 20)
            for (i, b) in blobs.enumerated() {
                let value = try await cluster.get(b, timeout: .seconds(30))
                #expect(value.count == 1 << 20 && value[0] == UInt8(i))
            }
        }
    }

    @Test("stress: 100,000 tasks on 4 nodes, every result checked")
    func stress() async throws {
        try await withCluster { cluster in
            let refs = try (0..<100_000).map { try double.remote($0) }
            let values = try await cluster.get(refs, timeout: .seconds(120))
            #expect(values.count == 100_000)
            for (i, v) in values.enumerated() where v != 2 * i {
                Issue.record("task \(i) returned \(v)")
                break
            }
        }
    }

    @Test("a driver thread that submitted to one cluster submits to the next one started, and is refused once none runs")
    func driverThreadFollowsTheDefaultCluster() async throws {
        // One thread of our own submits every time, so its remembered driver node is the one tested.
        let submitter = SubmitThread()
        defer { submitter.stop() }
        for round in 0..<3 {
            let cluster = try await Cluster.local(nodes: 2)
            let submitsTo = try submitter.run { try Submitter.current() }.get()
            #expect(submitsTo === cluster.driverNode, "round \(round): the thread submits to a node of an earlier cluster")
            let ref = try submitter.run { try double.remote(round) }.get()
            #expect(try await cluster.get([ref], timeout: .seconds(30)) == [2 * round])
            cluster.shutdown()
            let refused = submitter.run { try double.remote(round) }
            guard case .failure(let error as CairnError) = refused else {
                Issue.record("round \(round): submitting with no cluster running gave \(refused)")
                continue
            }
            #expect(error.code == .shutDown)
        }
    }

    @Test("no cluster: remote() says how to start one")
    func noCluster() throws {
        do {
            _ = try double.remote(1)
            Issue.record("expected an error")
        } catch let e as CairnError {
            #expect(e.code == .shutDown)
            #expect(e.detail.contains("Cluster.local"))
        }
    }
}
}

@Suite("Object IDs (pure)")
struct ObjectIDHashTests {
    /// The bucket an ID falls in, in a table of 2^`bits` buckets, as `Dictionary` picks it.
    func bucket(_ id: ObjectID, seed: Int, bits: Int) -> Int { id._rawHashValue(seed: seed) & (1 << bits - 1) }

    @Test("hashing: 8 IDs minted in a row share a group of 8 buckets, each its own")
    func runsOfEightStayTogether() {
        for seed in [0, 1, 0x5EED, -7] {
            for start in stride(from: UInt64(0), to: 4_096, by: 8) {
                let buckets = (0..<UInt64(8)).map { bucket(ObjectID(owner: NodeID(3), counter: start + $0), seed: seed, bits: 16) }
                #expect(Set(buckets).count == 8, "seed \(seed), IDs from \(start)")
                #expect(Set(buckets.map { $0 >> 3 }).count == 1, "seed \(seed), IDs from \(start)")
            }
        }
    }

    @Test("hashing: runs of IDs from several owners, and the same counters under different seeds, are scattered")
    func groupsAreScattered() {
        // 4 owners × 8,192 IDs (1,024 groups each) in a table of 2^16 buckets (8,192 groups):
        // scattered at random, about 8,192 × (1 - e^(-0.5)) = 3,223 distinct groups are hit.
        // Owners laid on top of each other would hit only 1,024.
        let ids = (0..<4).flatMap { owner in (0..<UInt64(8_192)).map { ObjectID(owner: NodeID(owner), counter: $0) } }
        let groups = Set(ids.map { bucket($0, seed: 42, bits: 16) >> 3 })
        #expect(groups.count > 3_000 && groups.count < 3_450, "\(groups.count) groups hit")
        // Another seed (another dictionary) orders the same groups differently.
        let a = (0..<UInt64(64)).map { bucket(ObjectID(owner: NodeID(0), counter: $0 * 8), seed: 1, bits: 16) >> 3 }
        let b = (0..<UInt64(64)).map { bucket(ObjectID(owner: NodeID(0), counter: $0 * 8), seed: 2, bits: 16) >> 3 }
        #expect(a != b)
    }

    @Test("a table of 1,000,000 IDs from 4 owners, dense runs and strided ones, finds each and only those")
    func denseTablesWork() {
        var table: [ObjectID: Int] = [:]
        for owner in 0..<4 {
            for i in 0..<200_000 { table[ObjectID(owner: NodeID(owner), counter: UInt64(i))] = owner * 1_000_000 + i }
            for i in 0..<50_000 { table[ObjectID(owner: NodeID(owner), counter: UInt64(1_000_000 + i * 8))] = -1 }
        }
        #expect(table.count == 1_000_000)
        for owner in 0..<4 {
            for i in stride(from: 0, to: 200_000, by: 997) {
                #expect(table[ObjectID(owner: NodeID(owner), counter: UInt64(i))] == owner * 1_000_000 + i)
            }
            #expect(table[ObjectID(owner: NodeID(owner), counter: 1_000_001)] == nil)
        }
        for i in 0..<100_000 { table.removeValue(forKey: ObjectID(owner: NodeID(1), counter: UInt64(i))) }
        #expect(table.count == 900_000)
        #expect(table[ObjectID(owner: NodeID(1), counter: 100_000)] == 1_100_000)
    }
}

@Suite("Task specs (pure)")
struct TaskSpecTests {
    @Test("a spec is resolved once every reference among its arguments is replaced by a value, and not before")
    func resolvedCountsReferences() {
        let a = ObjectID(owner: NodeID(1), counter: 1), b = ObjectID(owner: NodeID(2), counter: 7)
        let spec = TaskSpec(id: ObjectID(owner: NodeID(0), counter: 9), function: "f",
                            args: [.ref(a, nil), .value(.int(3)), .ref(b, nil)], resources: Resources(cpus: 1))
        #expect(!spec.resolved)
        spec.resolve(0, with: .int(10))
        #expect(!spec.resolved)
        spec.resolve(1, with: .int(99))  // already a value: left as it is
        if case .value(.int(let v)) = spec.args[1] { #expect(v == 3) } else { Issue.record("argument 1 changed kind") }
        #expect(!spec.resolved)
        spec.resolve(2, with: .int(20))
        #expect(spec.resolved)
        spec.resolve(2, with: .int(21))  // resolving again changes nothing
        if case .value(.int(let v)) = spec.args[2] { #expect(v == 20) } else { Issue.record("argument 2 is not a value") }
        #expect(spec.resolved)
        #expect(TaskSpec(id: ObjectID(owner: NodeID(0), counter: 10), function: "g", args: [.value(.int(1))], resources: Resources()).resolved)
        #expect(TaskSpec(id: ObjectID(owner: NodeID(0), counter: 11), function: "g", args: [], resources: Resources()).resolved)
    }

    @Test("a spec whose values need no coding is written as it stands, to the same bytes as its portable copy; one holding any other boxed value is not")
    func encodableAsIs() throws {
        let token = RefToken(id: ObjectID(owner: NodeID(0), counter: 1), release: { _ in })
        let spec = TaskSpec(id: ObjectID(owner: NodeID(0), counter: 2), function: "f",
                            args: [.value(.boxed(41)), .ref(ObjectID(owner: NodeID(3), counter: 5), token), .value(.int(-7)),
                                   .value(.encoded([1, 2, 3]))],
                            resources: Resources(cpus: 1, custom: ["gpu": 1]))
        #expect(!spec.isPortable && spec.encodableAsIs)
        let asIs = try WireMessages.encode(.schedule([spec], from: NodeID(0), avoid: []), to: .scheduler)
        let copied = try WireMessages.encode(.schedule([try spec.portable()], from: NodeID(0), avoid: []), to: .scheduler)
        #expect(asIs == copied)
        guard case .schedule(let back, _, _) = try WireMessages.decode(asIs).1.decodedForDelivery, let received = back.first else {
            Issue.record("the message did not decode as the schedule it was")
            return
        }
        #expect(received.id == spec.id && received.function == "f" && received.args.count == 4)
        if case .value(.int(41)) = received.args[0] {} else { Issue.record("the boxed Int crossed as \(received.args[0])") }
        let strings = TaskSpec(id: ObjectID(owner: NodeID(0), counter: 3), function: "f", args: [.value(.boxed("text"))], resources: Resources())
        #expect(!strings.encodableAsIs)
        #expect(try strings.portable().encodableAsIs)
    }
}

@Suite("Scheduling policy (pure)")
struct SchedulingPolicyTests {
    let nodes = [
        SchedulingPolicy.NodeLoad(id: NodeID(0), resources: Resources(cpus: 2), queued: 10),
        SchedulingPolicy.NodeLoad(id: NodeID(1), resources: Resources(cpus: 2), queued: 2),
        SchedulingPolicy.NodeLoad(id: NodeID(2), resources: Resources(cpus: 4, custom: ["gpu": 2]), queued: 8),
        SchedulingPolicy.NodeLoad(id: NodeID(3), resources: Resources(cpus: 1), queued: 0, alive: false),
    ]

    @Test("place: the shortest estimated wait wins; dead nodes are never chosen")
    func shortestWait() {
        var rng = SeededGenerator(seed: 7)
        #expect(SchedulingPolicy.place(.init(resources: .default, function: nil), nodes: nodes, random: &rng) == NodeID(1))
    }

    @Test("place: inputs already on a node pull the task there")
    func locality() {
        var rng = SeededGenerator(seed: 7)
        let choice = SchedulingPolicy.place(.init(resources: .default, function: nil), nodes: nodes,
                                            inputBytes: [NodeID(0): 64 << 20], random: &rng)
        #expect(choice == NodeID(0))
    }

    @Test("place: custom resources and function availability restrict the choice; nothing fits gives nil")
    func constraints() {
        var rng = SeededGenerator(seed: 7)
        #expect(SchedulingPolicy.place(.init(resources: Resources(cpus: 1, custom: ["gpu": 1]), function: nil), nodes: nodes, random: &rng) == NodeID(2))
        #expect(SchedulingPolicy.place(.init(resources: Resources(cpus: 8), function: nil), nodes: nodes, random: &rng) == nil)
        var limited = nodes
        limited[1].functions = ["other"]
        #expect(SchedulingPolicy.place(.init(resources: .default, function: "f"), nodes: limited, random: &rng) != NodeID(1))
        #expect(!SchedulingPolicy.feasible(.init(resources: Resources(cpus: 1, custom: ["tpu": 1]), function: nil), nodes: nodes))
    }

    @Test("place: work handed up by a node goes elsewhere, back to it only if no other node can run it")
    func handedUp() {
        var rng = SeededGenerator(seed: 7)
        // Node 1 is the least loaded, but it handed the work up: node 2 (wait 2) beats node 0 (wait 5).
        #expect(SchedulingPolicy.place(.init(resources: .default, function: nil), nodes: nodes, handedUpBy: NodeID(1), random: &rng) == NodeID(2))
        // Only node 2 has a GPU: work it handed up comes back to it rather than failing.
        #expect(SchedulingPolicy.place(.init(resources: Resources(cpus: 1, custom: ["gpu": 1]), function: nil), nodes: nodes, handedUpBy: NodeID(2), random: &rng) == NodeID(2))
    }

    @Test("place: ties are broken by the injected random source, reproducibly per seed")
    func ties() {
        let even = (0..<4).map { SchedulingPolicy.NodeLoad(id: NodeID($0), resources: .default, queued: 0) }
        func picks(_ seed: UInt64) -> [NodeID?] {
            var rng = SeededGenerator(seed: seed)
            return (0..<32).map { _ in SchedulingPolicy.place(.init(resources: .default, function: nil), nodes: even, random: &rng) }
        }
        #expect(picks(3) == picks(3))
        #expect(Set(picks(3).compactMap { $0 }).count == 4)
    }

    @Test("place among nodes found eligible once: the same choices and the same random draws as placing each task alone")
    func eligibleOnce() {
        // Seeded loads, shapes and inputs; printed so a failure can be replayed.
        let seed: UInt64 = 20261129
        print("eligibleOnce seed \(seed)")
        var setup = SeededGenerator(seed: seed)
        let shapes = [
            SchedulingPolicy.Work(resources: .default, function: "f"),
            SchedulingPolicy.Work(resources: Resources(cpus: 1, custom: ["gpu": 1]), function: nil),
            SchedulingPolicy.Work(resources: Resources(cpus: 16), function: "f"),
        ]
        for round in 0..<200 {
            var view = (0..<6).map { i in
                SchedulingPolicy.NodeLoad(id: NodeID(i), resources: Resources(cpus: Double(1 + setup.next() % 3), custom: setup.next() % 3 == 0 ? ["gpu": 1] : [:]),
                                          queued: Int(setup.next() % 4), functions: setup.next() % 4 == 0 ? ["g"] : nil, alive: setup.next() % 5 != 0)
            }
            let work = shapes[round % shapes.count]
            let handedUpBy: NodeID? = setup.next() % 2 == 0 ? NodeID(Int(setup.next() % 6)) : nil
            let inputs: [NodeID: Int] = setup.next() % 3 == 0 ? [NodeID(Int(setup.next() % 6)): 1 << 20] : [:]
            var each = SeededGenerator(seed: UInt64(round))
            var once = SeededGenerator(seed: UInt64(round))
            var other = view
            let eligible = SchedulingPolicy.eligible(work, nodes: view)
            for _ in 0..<20 {
                let a = SchedulingPolicy.placeIndex(work, nodes: view, inputBytes: inputs, handedUpBy: handedUpBy, random: &each)
                let b = SchedulingPolicy.placeIndex(among: eligible, nodes: other, inputBytes: inputs, handedUpBy: handedUpBy, random: &once)
                #expect(a == b, "round \(round): \(String(describing: a)) placing alone, \(String(describing: b)) among \(eligible)")
                guard let a, let b else { break }
                view[a].queued += 1
                other[b].queued += 1
            }
            #expect(each.next() == once.next(), "round \(round): the two drew differently from the random source")
        }
    }

    @Test("shouldSpill: a long queue is handed up only if another node that can run the work is less loaded")
    func spill() {
        let work = SchedulingPolicy.Work(resources: .default, function: nil)
        #expect(SchedulingPolicy.shouldSpill(work, from: NodeID(0), localQueued: 100, localCPUs: 2, nodes: nodes))
        let alone = [SchedulingPolicy.NodeLoad(id: NodeID(0), resources: Resources(cpus: 2), queued: 100)]
        #expect(!SchedulingPolicy.shouldSpill(work, from: NodeID(0), localQueued: 100, localCPUs: 2, nodes: alone))
        let busier = alone + [SchedulingPolicy.NodeLoad(id: NodeID(1), resources: Resources(cpus: 1), queued: 80)]
        #expect(!SchedulingPolicy.shouldSpill(work, from: NodeID(0), localQueued: 100, localCPUs: 2, nodes: busier))
    }

    @Test("directTarget: only a live, idle node other than the sender that can run the work; successive starts take turns")
    func direct() {
        let work = SchedulingPolicy.Work(resources: .default, function: "f")
        let view = [
            SchedulingPolicy.NodeLoad(id: NodeID(0), resources: Resources(cpus: 0), queued: 0),
            SchedulingPolicy.NodeLoad(id: NodeID(1), resources: Resources(cpus: 1), queued: 0),
            SchedulingPolicy.NodeLoad(id: NodeID(2), resources: Resources(cpus: 1), queued: 3),
            SchedulingPolicy.NodeLoad(id: NodeID(3), resources: Resources(cpus: 1), queued: 0, alive: false),
            SchedulingPolicy.NodeLoad(id: NodeID(4), resources: Resources(cpus: 1), queued: 0, functions: ["g"]),
            SchedulingPolicy.NodeLoad(id: NodeID(5), resources: Resources(cpus: 1), queued: 0),
            SchedulingPolicy.NodeLoad(id: NodeID(6), resources: Resources(cpus: 2), queued: 0),
        ]
        // Node 0 has no CPU, 2 is busy, 3 dead, 4 lacks the function: 1, 5 and 6 remain.
        let picks = (0..<14).map { SchedulingPolicy.directTarget(work, from: NodeID(6), nodes: view, start: $0).map { view[$0].id } }
        #expect(Set(picks.compactMap { $0 }) == [NodeID(1), NodeID(5)], "the sender itself is never chosen")
        #expect(picks.allSatisfy { $0 != nil })
        #expect(picks.filter { $0 == NodeID(1) }.count >= 2 && picks.filter { $0 == NodeID(5) }.count >= 2)
        #expect(SchedulingPolicy.directTarget(work, from: NodeID(0), nodes: view, start: -5).map { view[$0].id } != nil)
        // Nothing idle that fits: the work goes to the global scheduler.
        #expect(SchedulingPolicy.directTarget(.init(resources: Resources(cpus: 4), function: "f"), from: NodeID(0), nodes: view, start: 0) == nil)
        var busy = view
        for i in busy.indices { busy[i].queued += 1 }
        #expect(SchedulingPolicy.directTarget(work, from: NodeID(0), nodes: busy, start: 0) == nil)
        #expect(SchedulingPolicy.directTarget(work, from: NodeID(0), nodes: [], start: 0) == nil)
    }

    @Test("runsLocally: a node keeps work while its queue is short")
    func local() {
        #expect(SchedulingPolicy.runsLocally(queued: 3, workers: 2, spillThreshold: 2))
        #expect(!SchedulingPolicy.runsLocally(queued: 4, workers: 2, spillThreshold: 2))
    }
}

@Suite("Values crossing nodes")
struct ValueTests {
    @Test("the fast Int encoding is byte-for-byte the binary encoder's, and decodes back", arguments: [0, 1, -1, 63, -64, 64, 1 << 40, Int.max, Int.min])
    func fastInt(value: Int) throws {
        #expect(FastCodec.encode(value) == (try BinaryEncoder().encode(value)))
        #expect(FastCodec.decodeInt(FastCodec.encode(value)) == value)
        #expect(try StoredValue.boxed(value).portable().value(as: Int.self) == value)
    }

    @Test("an Int crosses as an immediate value: its wire bytes are the binary encoder's, and it reads as any type those bytes decode to",
          arguments: [0, -1, 1 << 40, Int.min])
    func immediateInt(value: Int) throws {
        let portable = try StoredValue.boxed(value).portable()
        guard case .int(let i) = portable, i == value else { Issue.record("an Int must cross as .int, got \(portable)"); return }
        #expect(try portable.wireBytes() == (try BinaryEncoder().encode(value)))
        #expect(try portable.value(as: Int64.self) == Int64(value))
        #expect(throws: CairnError.self) { try portable.value(as: String.self) }
    }

    @Test("malformed bytes are left to the general decoder, which reports a typed error")
    func fastIntRejects() {
        #expect(FastCodec.decodeInt([0xCA, 1, 0x03]) == nil)
        #expect(FastCodec.decodeInt([0xCA, 1, 0x03, 0x80]) == nil)
        #expect(FastCodec.decodeInt([0xCA, 1, 0x07, 1, 65]) == nil)
        #expect(throws: CairnError.self) { try StoredValue.encoded([0xCA, 1, 0x03, 0x80]).value(as: Int.self) }
    }
}

/// A thread of its own that runs closures one at a time, for tests that need the same thread
/// every time.
final class SubmitThread: @unchecked Sendable {
    private let condition = NSCondition()
    private var job: (() -> Void)?
    private var stopped = false

    init() {
        let thread = Thread { [self] in
            condition.lock()
            while true {
                while job == nil && !stopped { condition.wait() }
                if let run = job {
                    condition.unlock()
                    run()
                    condition.lock()
                    job = nil
                    condition.broadcast()
                } else {
                    break
                }
            }
            condition.unlock()
        }
        thread.start()
    }

    /// Runs `body` on the thread and waits for it.
    func run<T>(_ body: @escaping () throws -> T) -> Result<T, any Error> {
        var result: Result<T, any Error>?
        condition.lock()
        job = { result = Result { try body() } }
        condition.broadcast()
        while job != nil { condition.wait() }
        condition.unlock()
        return result!
    }

    func stop() {
        condition.lock()
        stopped = true
        condition.broadcast()
        condition.unlock()
    }
}
