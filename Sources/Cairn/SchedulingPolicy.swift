/// Where work should run: the decisions of bottom-up scheduling, as pure functions.
///
/// A node first asks ``runsLocally(queued:workers:spillThreshold:)``; if not, the global
/// scheduler calls ``place(_:nodes:inputBytes:random:)``. Neither touches a clock, a socket
/// or a global random source, so they are tested directly and replayed in simulation.
public enum SchedulingPolicy {
    /// What the policy knows about a node.
    public struct NodeLoad: Sendable, Equatable {
        public var id: NodeID
        public var resources: Resources
        /// Tasks queued or running there.
        public var queued: Int
        /// Functions it may run; nil means all.
        public var functions: Set<String>?
        public var alive: Bool

        public init(id: NodeID, resources: Resources, queued: Int, functions: Set<String>? = nil, alive: Bool = true) {
            self.id = id
            self.resources = resources
            self.queued = queued
            self.functions = functions
            self.alive = alive
        }

        func canRun(_ need: Resources, _ function: String?) -> Bool {
            alive && resources.satisfies(need) && (function == nil || functions == nil || functions!.contains(function!))
        }
    }

    /// What is being placed.
    public struct Work: Sendable {
        public var resources: Resources
        public var function: String?
        public init(resources: Resources, function: String?) {
            self.resources = resources
            self.function = function
        }
    }

    /// A node runs a task itself while its queue is shorter than `spillThreshold` per worker.
    public static func runsLocally(queued: Int, workers: Int, spillThreshold: Int) -> Bool {
        queued < max(1, workers) * spillThreshold
    }

    /// Whether a node whose queue is long should hand `work` up: only if another live node
    /// that can run it has a shorter queue per CPU. Handing up to a scheduler that can only
    /// choose this node again would cost a round trip and gain nothing.
    public static func shouldSpill(_ work: Work, from local: NodeID, localQueued: Int, localCPUs: Double, nodes: [NodeLoad]) -> Bool {
        let ours = Double(localQueued) / max(localCPUs, 1)
        return nodes.contains { $0.id != local && $0.canRun(work.resources, work.function) && Double($0.queued) / max($0.resources.cpus, 1) < ours }
    }

    /// Where a node may send `work` itself instead of handing it up, or nil: a live node other
    /// than `local` that can run it and whose last reported queue was empty, searched from
    /// index `start` on (the node calls it with the node it sent its last lone task to, which
    /// keeps getting them while it stays idle).
    ///
    /// The node calls this only for a lone task (its previous direct one has finished) whose
    /// inputs are all values: one task more on an idle node cannot unbalance the cluster, and
    /// there is no input whose location the scheduler should weigh. Anything else goes to the
    /// global scheduler.
    public static func directTarget(_ work: Work, from local: NodeID, nodes: [NodeLoad], start: Int) -> Int? {
        guard !nodes.isEmpty else { return nil }
        let first = ((start % nodes.count) + nodes.count) % nodes.count
        for k in 0..<nodes.count {
            let i = (first + k) % nodes.count
            let node = nodes[i]
            if node.id != local && node.queued == 0 && node.canRun(work.resources, work.function) { return i }
        }
        return nil
    }

    /// Whether any node could ever run `work`.
    public static func feasible(_ work: Work, nodes: [NodeLoad]) -> Bool {
        nodes.contains { $0.canRun(work.resources, work.function) }
    }

    /// Picks the node with the shortest estimated wait (queued tasks per CPU), discounted by
    /// the bytes of the task's inputs already there (`bytesPerQueuedTask` bytes of local input
    /// are worth one queued task), breaking ties at random. Nil if no live node can run it.
    ///
    /// `handedUpBy` is the node that handed the work up because its own queue was long: it is
    /// chosen only if no other node can run the work (sending work back where it came from
    /// costs two hops and gains nothing).
    public static func place<R: RandomNumberGenerator>(_ work: Work, nodes: [NodeLoad], inputBytes: [NodeID: Int] = [:],
                                                       bytesPerQueuedTask: Double = 65_536, handedUpBy: NodeID? = nil,
                                                       random: inout R) -> NodeID? {
        placeIndex(work, nodes: nodes, inputBytes: inputBytes, bytesPerQueuedTask: bytesPerQueuedTask,
                   handedUpBy: handedUpBy, random: &random).map { nodes[$0].id }
    }

    /// ``place(_:nodes:inputBytes:bytesPerQueuedTask:handedUpBy:random:)``, returning the
    /// chosen node's index in `nodes`.
    static func placeIndex<R: RandomNumberGenerator>(_ work: Work, nodes: [NodeLoad], inputBytes: [NodeID: Int] = [:],
                                                     bytesPerQueuedTask: Double = 65_536, handedUpBy: NodeID? = nil,
                                                     random: inout R) -> Int? {
        placeIndex(among: nodes.indices.lazy.filter { nodes[$0].canRun(work.resources, work.function) }, nodes: nodes,
                   inputBytes: inputBytes, bytesPerQueuedTask: bytesPerQueuedTask, handedUpBy: handedUpBy, random: &random)
    }

    /// The indices of the nodes in `nodes` that can run `work` (alive, with the resources, accepting
    /// the function), in order: what ``placeIndex(among:nodes:inputBytes:bytesPerQueuedTask:handedUpBy:random:)``
    /// takes, computed once for a run of tasks of the same function and resources.
    static func eligible(_ work: Work, nodes: [NodeLoad]) -> [Int] {
        nodes.indices.filter { nodes[$0].canRun(work.resources, work.function) }
    }

    /// ``placeIndex(_:nodes:inputBytes:bytesPerQueuedTask:handedUpBy:random:)`` among the nodes
    /// at `eligible`, which must be those that can run the work, in order: the same choice
    /// and the same draws from `random`.
    static func placeIndex<R: RandomNumberGenerator, S: Sequence<Int>>(among eligible: S, nodes: [NodeLoad], inputBytes: [NodeID: Int] = [:],
                                                                       bytesPerQueuedTask: Double = 65_536, handedUpBy: NodeID? = nil,
                                                                       random: inout R) -> Int? {
        // Ties are broken by reservoir sampling: the k-th tied node replaces the pick with
        // probability 1/k, so each is equally likely and no array is built per task.
        var best: Int?
        var ties: UInt64 = 0
        var bestScore = Double.infinity
        var fallback: Int?
        for i in eligible {
            let node = nodes[i]
            if node.id == handedUpBy {
                fallback = i
                continue
            }
            let wait = Double(node.queued) / max(node.resources.cpus, 1)
            let score = inputBytes.isEmpty ? wait : wait - Double(inputBytes[node.id] ?? 0) / bytesPerQueuedTask
            if score < bestScore - 1e-9 {
                bestScore = score
                best = i
                ties = 1
            } else if abs(score - bestScore) <= 1e-9 {
                ties += 1
                if random.next() % ties == 0 { best = i }
            }
        }
        return best ?? fallback
    }
}
