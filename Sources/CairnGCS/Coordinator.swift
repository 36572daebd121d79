/// The coordinator of every shard's chain, as a pure value (van Renesse and Schneider's
/// "master"). It learns of replicas from their periodic reports, declares a replica failed
/// when it has not reported for `failureTimeout`, and changes a chain by issuing a new
/// ``ChainConfig`` with the next epoch:
///
/// - A failed head, middle or tail is removed. The new head is the old second replica; a
///   middle's predecessor resends what its new successor may lack; the new tail is the old
///   tail's predecessor, whose log holds everything the old tail had. A replica is removed
///   only once every read lease granted to it has run out, so a tail that is cut out but still
///   alive has stopped serving reads before its successor starts.
/// - When a chain is shorter than the replication factor and a standby replica of the shard is
///   alive, it is added as a learner behind the tail, `learnerDelay` after the chain last lost
///   a replica. Once the tail reports that the learner has caught up, the learner becomes the
///   tail, after a handoff from the previous tail.
/// - The last replica of a chain is never removed: the shard waits for it to come back, and
///   when it does, issues a new configuration with the same members, so that a replica that
///   restarted and its learner begin their parts again.
///
/// The configurations are persisted (`persistConfig`) before they are sent; a restarted
/// coordinator starts from them and treats every replica as holding a fresh lease, because it
/// forgot which leases it granted.
public struct Coordinator: Sendable {
    public struct Options: Sendable {
        /// Chain length the coordinator restores when it can.
        public var replicationFactor: Int
        /// A replica that has not reported for this long (the shell's time units) has failed.
        public var failureTimeout: UInt64
        /// Must equal the replicas' ``ChainReplica/Options/leaseDuration``.
        public var leaseDuration: UInt64
        /// How long after a chain loses a replica a standby is added as a learner. Bringing a
        /// learner up costs the new tail a step (a snapshot, the log after it, a commit); made
        /// at once, that step delays the writes the failure held up, which go through the
        /// shortened chain first this way.
        public var learnerDelay: UInt64

        public init(replicationFactor: Int = 3, failureTimeout: UInt64, leaseDuration: UInt64, learnerDelay: UInt64 = 0) {
            precondition(replicationFactor >= 1, "a chain needs at least one replica")
            self.replicationFactor = replicationFactor
            self.failureTimeout = failureTimeout
            self.leaseDuration = leaseDuration
            self.learnerDelay = learnerDelay
        }
    }

    public let options: Options
    /// The current configuration of each shard, by shard.
    public private(set) var configs: [ChainConfig]
    /// Every replica the coordinator manages, and its shard.
    public private(set) var replicas: [ReplicaID: Int]
    private var lastHeard: [ReplicaID: UInt64] = [:]
    private var lastGrant: [ReplicaID: UInt64] = [:]
    /// Replicas whose process the shell saw exit, until they report again.
    private var exited: Set<ReplicaID> = []
    private var reports: [ReplicaID: ReplicaReport] = [:]
    /// The latest report of each replica that reported since this coordinator started.
    public var latestReports: [ReplicaID: ReplicaReport] { reports }
    /// Per shard: the epoch in which its tail reported serving.
    private var servingEpoch: [Int: UInt64] = [:]
    /// Per shard: when its chain last lost a replica (see ``Options/learnerDelay``).
    private var shrunkAt: [Int: UInt64] = [:]
    /// Shards that need a new configuration even if their chain stays the same.
    private var renew: Set<Int> = []

    /// A coordinator for shards whose first configurations are `configs` (shard i at index i).
    /// `replicas` maps every replica, in a chain or standing by, to its shard.
    public init(configs: [ChainConfig], replicas: [ReplicaID: Int], options: Options, now: UInt64) {
        precondition(configs.enumerated().allSatisfy { $0.offset == $0.element.shard }, "configs[i] must be shard i's")
        for c in configs {
            for r in c.chain + (c.learner.map { [$0] } ?? []) {
                precondition(replicas[r] == c.shard, "replica \(r) of shard \(c.shard) is missing from the replica map")
            }
        }
        self.options = options
        self.configs = configs
        self.replicas = replicas
        for r in replicas.keys {
            // Heard from "now", so a replica gets a full timeout to report; granted "now", so a
            // coordinator that restarts waits out any lease its previous life granted.
            lastHeard[r] = now
            lastGrant[r] = now
        }
    }

    /// The configuration, to a replica that reported with another, and the lease, to the tail.
    public mutating func handle(_ message: GCSMessage, from: Endpoint, now: UInt64) -> [GCSAction] {
        switch message {
        case .report(let r):
            guard case .replica(let id) = from, id == r.replica, let shard = replicas[id], shard == r.shard else { return [] }
            // A chain member heard from again after it was counted failed (the last replica,
            // which is never removed): it may have restarted and lost what it held in memory,
            // such as its learner's join or its subscribers. A new configuration makes every
            // member start its part again.
            if !alive(id, now: now) && configs[shard].chain.contains(id) { renew.insert(shard) }
            lastHeard[id] = now
            exited.remove(id)
            reports[id] = r
            let c = configs[shard]
            var leaseFrom: UInt64?
            if c.tail == id && r.epoch == c.epoch && r.serving {
                servingEpoch[shard] = c.epoch
                lastGrant[id] = now
                leaseFrom = r.sentAt
            }
            // Answered only with something new: the configuration, to a replica that lacks it,
            // or a lease. A replica that has the current configuration and no lease to take
            // needs no answer, and a coordinator answering every heartbeat of every replica
            // spends its time on answers nobody uses.
            var actions: [GCSAction] = []
            if r.epoch != c.epoch || leaseFrom != nil { actions.append(.send(.configure(c, leaseFrom: leaseFrom), to: from)) }
            actions += reconfigure(shard, now: now)
            return actions
        case .configQuery:
            return [.send(.configs(configs), to: from)]
        default:
            return []
        }
    }

    /// A replica joins `shard` as a standby (`cairn gcs`): it is alive from `now` for a full
    /// failure timeout, and becomes a learner once it has reported and a chain lacks a replica.
    public mutating func addReplica(_ r: ReplicaID, shard: Int, now: UInt64) {
        precondition(shard >= 0 && shard < configs.count, "shard \(shard) does not exist")
        precondition(replicas[r] == nil, "replica \(r) is already known")
        replicas[r] = shard
        lastHeard[r] = now
        lastGrant[r] = now
    }

    /// Called periodically: detects failures and repairs chains.
    public mutating func tick(now: UInt64) -> [GCSAction] {
        var actions: [GCSAction] = []
        for shard in configs.indices { actions += reconfigure(shard, now: now) }
        return actions
    }

    /// The shell knows for certain that a replica's process is gone (its supervisor saw it
    /// exit, or the kernel closed its connections on exit): it has failed now, without waiting
    /// for `failureTimeout`, and holds no lease, since a lease lives in the process's memory.
    public mutating func replicaExited(_ r: ReplicaID, now: UInt64) -> [GCSAction] {
        guard let shard = replicas[r] else { return [] }
        exited.insert(r)
        lastGrant[r] = nil
        return reconfigure(shard, now: now)
    }

    func alive(_ r: ReplicaID, now: UInt64) -> Bool {
        !exited.contains(r) && now <= (lastHeard[r] ?? 0) + options.failureTimeout
    }

    func leaseExpired(_ r: ReplicaID, now: UInt64) -> Bool {
        guard let granted = lastGrant[r] else { return true }
        return now > granted + options.leaseDuration
    }

    /// Whether `learnerDelay` has passed since the shard's chain last lost a replica.
    func learnerMayJoin(_ shard: Int, now: UInt64) -> Bool {
        guard let shrunk = shrunkAt[shard] else { return true }
        return now >= shrunk && now - shrunk >= options.learnerDelay
    }

    /// Decides the shard's next configuration, if it needs one, and announces it.
    mutating func reconfigure(_ shard: Int, now: UInt64) -> [GCSAction] {
        let c = configs[shard]
        var chain = c.chain
        var learner = c.learner
        var handoff = c.handoffFrom
        if handoff != nil && servingEpoch[shard] == c.epoch { handoff = nil }  // the handoff is done

        if let l = learner, !alive(l, now: now) { learner = nil }
        let dead = chain.filter { !alive($0, now: now) }
        if !dead.isEmpty {
            var removed = Set(dead)
            if let h = handoff {
                let newTail = chain[chain.count - 1]
                if removed.contains(newTail) {
                    // The previous tail takes the role back; it has everything the new one had.
                    handoff = nil
                } else if removed.contains(h) {
                    // The new tail never got the handoff: it cannot know what it lacks. It goes
                    // back to learning, behind the replica before the previous tail.
                    removed.insert(newTail)
                    if learner == nil { learner = newTail }
                    handoff = nil
                }
                // Otherwise the handoff is still owed, in the next configuration too.
            }
            let remaining = chain.filter { !removed.contains($0) }
            guard !remaining.isEmpty else { return [] }  // never remove the last replica
            // Wait until no removed replica can still serve a read.
            guard removed.allSatisfy({ leaseExpired($0, now: now) }) else { return [] }
            chain = remaining
            if learner.map(removed.contains) == true { learner = nil }
            shrunkAt[shard] = now
        } else if let l = learner, handoff == nil, let r = reports[c.tail], r.epoch == c.epoch, r.learnerCaughtUp,
                  reports[l]?.epoch == c.epoch {
            handoff = c.tail
            chain.append(l)
            learner = nil
        } else if learner == nil, chain.count < options.replicationFactor, learnerMayJoin(shard, now: now),
                  let standby = replicas.keys.sorted().first(where: { replicas[$0] == shard && !chain.contains($0) && alive($0, now: now) && reports[$0] != nil }) {
            learner = standby
        }

        guard chain != c.chain || learner != c.learner || renew.contains(shard) else { return [] }
        renew.remove(shard)
        let next = ChainConfig(shard: shard, epoch: c.epoch + 1, chain: chain, learner: learner, handoffFrom: handoff)
        configs[shard] = next
        var actions: [GCSAction] = [.persistConfig(next)]
        for r in next.chain + (next.learner.map { [$0] } ?? []) {
            actions.append(.send(.configure(next, leaseFrom: nil), to: .replica(r)))
        }
        return actions
    }
}
