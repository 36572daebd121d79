/// One replica of one shard's chain, as a pure value: messages and ticks in, actions out.
///
/// Roles follow the replica's current ``ChainConfig``: head (numbers writes), middle, tail
/// (replies, serves reads while it holds a lease), learner (joins behind the tail and catches
/// up) or standby (in no role; it reports to the coordinator and waits to be added).
///
/// Invariants the protocol keeps:
/// - Along the chain, each replica's log is a prefix of its predecessor's.
/// - Every update after `acknowledged` is in `sent` (it may not have reached the tail), so
///   removing a replica from the middle only needs the predecessor to resend `sent`.
/// - A tail commits only while it holds an unexpired lease for its epoch: it serves reads,
///   replies `written`, acknowledges upstream and sends changes to subscribers only then, and
///   otherwise holds them back. The coordinator grants leases only to the tail of a current
///   configuration and removes a replica only after every lease it granted it has run out. So
///   replicas cut out of the chain that still talk to each other in their old epoch (a head
///   and tail that restarted with an old configuration, say) cannot acknowledge a write the
///   current chain does not have, or answer a read with a stale value.
/// - A promoted tail serves reads only after the previous tail's handoff says how far the
///   previous tail's log went and it has all of that.
public struct ChainReplica: Sendable {
    public struct Options: Sendable {
        /// How long a lease runs, in the shell's time units, from the report that earned it.
        public var leaseDuration: UInt64
        /// How often unacknowledged updates are resent downstream; only updates already
        /// outstanding at the previous resend go again, so a busy pipeline is not flooded with
        /// copies of what is still on its way. 0: at every tick.
        public var retransmitInterval: UInt64
        public init(leaseDuration: UInt64, retransmitInterval: UInt64 = 0) {
            self.leaseDuration = leaseDuration
            self.retransmitInterval = retransmitInterval
        }
    }

    struct Subscription: Sendable {
        var prefix: String
        /// Sequence number of the last change queued.
        var queuedUpTo: UInt64
        /// Changes not yet acknowledged by the subscriber: (update, previous).
        var unacked: [(ChainUpdate, UInt64)]
        /// Sequence number of the last change transmitted at least once.
        var transmittedUpTo: UInt64
    }

    public let id: ReplicaID
    public let shard: Int
    public let options: Options
    public private(set) var config: ChainConfig?
    /// Applied updates; `log[i].sequence == i + 1`.
    public private(set) var log: [ChainUpdate] = []
    public private(set) var store: [String: [UInt8]] = [:]
    /// Per client: its newest request applied here, and that update's sequence number.
    private var applied: [Int: (number: UInt64, sequence: UInt64)] = [:]
    /// Forwarded downstream (to the successor, or from a tail to its learner), not yet acknowledged.
    private var sent: [ChainUpdate] = []
    /// When updates were last resent, and the last sequence number then: what was outstanding.
    private var retransmitted: (at: UInt64, upTo: UInt64) = (0, 0)
    /// Every update up to here has reached the tail.
    public private(set) var acknowledged: UInt64 = 0
    private var lease: (epoch: UInt64, until: UInt64)?
    /// For a promoted tail: how far the previous tail's log went.
    private var handoffUpTo: UInt64?
    /// As learner: the join request outstanding, and whether the tail accepted it.
    private var joinAttempt: UInt64 = 0
    private var joined = false
    /// As tail: the learner's join was accepted, and how far the learner has acknowledged
    /// (nil until the learner confirms it cut its log to the common prefix).
    private var learnerJoined = false
    private var learnerAcked: UInt64?
    private var subscriptions: [Int: Subscription] = [:]
    /// As tail: writes applied but not yet answered, waiting for a lease.
    private var pendingReplies: [RequestID] = []

    /// A new, empty replica; it learns its configuration from the coordinator.
    public init(id: ReplicaID, shard: Int, options: Options) {
        self.id = id
        self.shard = shard
        self.options = options
    }

    /// A replica restarted after a crash: memory is gone; the persisted log and configuration
    /// are back. Nothing is known to be acknowledged, so everything is resent downstream and
    /// the successor ignores what it already has.
    public init(id: ReplicaID, shard: Int, options: Options, recovering persisted: [ChainUpdate], config: ChainConfig?) {
        self.init(id: id, shard: shard, options: options)
        for u in persisted {
            precondition(u.sequence == lastSequence + 1, "persisted log of replica \(id) has a gap before \(u.sequence)")
            apply(u)
        }
        if let config, config.shard == shard { _ = adopt(config) }
    }

    // MARK: roles

    public var lastSequence: UInt64 { UInt64(log.count) }
    public var isHead: Bool { config?.head == id }
    public var isTail: Bool { config?.tail == id }
    public var isLearner: Bool { config?.learner == id }
    /// The tail may serve reads and subscriptions (it still needs a lease for reads).
    public var serving: Bool {
        guard let c = config, c.tail == id else { return false }
        return c.handoffFrom == nil || handoffUpTo.map { lastSequence >= $0 } == true
    }
    public func holdsLease(at now: UInt64) -> Bool {
        guard let c = config, let l = lease else { return false }
        return l.epoch == c.epoch && now < l.until
    }

    var successor: ReplicaID? {
        guard let c = config, let i = c.chain.firstIndex(of: id) else { return nil }
        return i + 1 < c.chain.count ? c.chain[i + 1] : nil
    }
    var predecessor: ReplicaID? {
        guard let c = config else { return nil }
        if c.learner == id { return c.tail }
        guard let i = c.chain.firstIndex(of: id), i > 0 else { return nil }
        return c.chain[i - 1]
    }
    /// Where `sent` goes: the successor, or the learner once it joined.
    var downstream: ReplicaID? {
        if let s = successor { return s }
        return isTail && learnerJoined ? config?.learner : nil
    }

    private mutating func apply(_ u: ChainUpdate) {
        log.append(u)
        store[u.key] = u.value
        applied[u.request.client] = (u.request.number, u.sequence)
    }

    /// Rebuilds the store and the client table from the first `keep` updates.
    private mutating func truncate(keep: UInt64) {
        let kept = log.prefix(Int(keep))
        log = []
        store = [:]
        applied = [:]
        for u in kept { apply(u) }
        acknowledged = min(acknowledged, keep)
        sent.removeAll { $0.sequence > keep }
    }

    /// Describes the log by epoch, for a join.
    func epochRanges() -> [EpochRange] {
        var out: [EpochRange] = []
        for u in log {
            if let last = out.last, last.epoch == u.epoch {
                out[out.count - 1].last = u.sequence
            } else {
                out.append(EpochRange(epoch: u.epoch, first: u.sequence, last: u.sequence))
            }
        }
        return out
    }

    /// How many of a learner's updates agree with this log: the longest prefix whose every
    /// entry has the same (epoch, sequence) here.
    func commonPrefix(with ranges: [EpochRange]) -> UInt64 {
        var keep: UInt64 = 0
        for r in ranges {
            var s = r.first
            while s <= r.last {
                guard s <= lastSequence, log[Int(s - 1)].epoch == r.epoch else { return keep }
                keep = s
                s += 1
            }
        }
        return keep
    }

    // MARK: configuration

    /// Switches to a newer configuration and returns what the new role must send at once.
    private mutating func adopt(_ new: ChainConfig) -> [GCSAction] {
        let old = config
        let wasTail = old?.tail == id
        let oldLearner = old?.learner
        let oldLearnerAcked = learnerAcked ?? 0
        config = new
        // A tail that stays the tail keeps its lease: the coordinator counts leases per replica
        // and removes none before its lease runs out, whatever the epoch.
        lease = wasTail && new.tail == id ? lease.map { (new.epoch, $0.until) } : nil
        handoffUpTo = nil
        joined = false
        learnerJoined = false
        learnerAcked = nil
        var actions: [GCSAction] = []
        if new.tail == id {
            // Everything here is now at the tail; it is acknowledged once a lease arrives, and
            // the writes the old tail had not answered are answered then.
            if !wasTail { pendingReplies += log[Int(acknowledged)...].map(\.request) }
            sent = []
        } else if new.chain.contains(id) {
            subscriptions = [:]
            pendingReplies = []
            if wasTail, let l = oldLearner, successor == l {
                // The learner became the tail: it may lack what it had not acknowledged.
                acknowledged = min(acknowledged, oldLearnerAcked)
            }
            sent = log.filter { $0.sequence > acknowledged }
            if let s = successor {
                if new.handoffFrom == id { actions.append(.send(.handoff(epoch: new.epoch, upTo: lastSequence), to: .replica(s))) }
                actions += sent.map { .send(.forward(epoch: new.epoch, $0), to: .replica(s)) }
            }
        } else {
            subscriptions = [:]
            pendingReplies = []
            sent = []
            if new.learner == id {
                joinAttempt += 1
                actions.append(.send(.join(epoch: new.epoch, attempt: joinAttempt, log: epochRanges()), to: .replica(new.tail)))
            }
        }
        return actions
    }

    // MARK: messages

    /// Handles one message; `now` is the shell's clock (for leases).
    public mutating func handle(_ message: GCSMessage, from: Endpoint, now: UInt64) -> [GCSAction] {
        var actions = step(message, from: from, now: now)
        // What the coordinator acts on is reported at once, not at the next tick: a tail that
        // can serve but holds no lease for this configuration (the lease comes in answer), a
        // learner caught up (its promotion follows). Once per change, so no storm of reports.
        if let c = config {
            let wantsLease = serving && lease?.epoch != c.epoch
            let caughtUp = isTail && learnerJoined && learnerAcked == lastSequence
            if (wantsLease || caughtUp) && (urgent.epoch != c.epoch || urgent.lease != wantsLease || urgent.caughtUp != caughtUp) {
                urgent = (c.epoch, wantsLease, caughtUp)
                actions.append(report(now: now))
            }
        }
        return actions
    }

    /// The last state reported at once (see ``handle(_:from:now:)``).
    private var urgent: (epoch: UInt64, lease: Bool, caughtUp: Bool) = (0, false, false)

    /// The report to the coordinator, which doubles as the heartbeat.
    private func report(now: UInt64) -> GCSAction {
        .send(.report(ReplicaReport(
            replica: id, shard: shard, epoch: config?.epoch ?? 0, sentAt: now, lastSequence: lastSequence,
            learnerCaughtUp: isTail && learnerJoined && learnerAcked == lastSequence,
            serving: serving)), to: .coordinator)
    }

    private mutating func step(_ message: GCSMessage, from: Endpoint, now: UInt64) -> [GCSAction] {
        switch message {
        case .write(let request, let key, let value):
            guard isHead, case .client(let client) = from, let c = config else { return [.send(.notHere(request), to: from)] }
            if let done = applied[client], done.number >= request.number {
                // A retry. Answer it only if the first attempt is known to have reached the
                // tail; otherwise the tail's reply (or a later retry) will.
                return done.number == request.number && done.sequence <= acknowledged ? [.send(.written(request), to: from)] : []
            }
            let u = ChainUpdate(epoch: c.epoch, sequence: lastSequence + 1, key: key, value: value, request: request)
            apply(u)
            return [.persist(u)] + passOn(u, now: now)

        case .read(let request, let key):
            guard serving, holdsLease(at: now) else { return [.send(.notHere(request), to: from)] }
            return [.send(.readResult(request, store[key]), to: from)]

        case .forward(let epoch, let u):
            guard let c = config, epoch == c.epoch, case .replica(let p) = from, p == predecessor else { return [] }
            if isLearner && !joined { return [] }
            if u.sequence <= lastSequence {
                // Seen before: the end of the stream acknowledges again, in case that was lost.
                if isLearner { return [.send(.ack(epoch: epoch, lastSequence), to: from)] }
                return isTail && acknowledged > 0 ? [.send(.ack(epoch: epoch, acknowledged), to: from)] : []
            }
            guard u.sequence == lastSequence + 1 else { return [] }  // a gap: retransmission fills it
            apply(u)
            if isLearner { return [.persist(u), .send(.ack(epoch: epoch, u.sequence), to: from)] }
            return [.persist(u)] + passOn(u, now: now)

        case .ack(let epoch, let sequence):
            guard let c = config, epoch == c.epoch, case .replica(let r) = from else { return [] }
            if isTail {
                guard r == c.learner, learnerJoined else { return [] }
                learnerAcked = max(learnerAcked ?? 0, sequence)
                sent.removeAll { $0.sequence <= sequence }
                return []
            }
            guard r == successor, sequence > acknowledged else { return [] }
            acknowledged = min(sequence, lastSequence)
            sent.removeAll { $0.sequence <= sequence }
            return predecessor.map { [.send(.ack(epoch: epoch, acknowledged), to: .replica($0))] } ?? []

        case .join(let epoch, let attempt, let ranges):
            guard let c = config, epoch == c.epoch, isTail, case .replica(let r) = from, r == c.learner else { return [] }
            let keep = commonPrefix(with: ranges)
            learnerJoined = true
            learnerAcked = nil
            sent = Array(log[Int(keep)...])
            return [.send(.joinAccepted(epoch: epoch, attempt: attempt, keep: keep), to: from)]
                + sent.map { .send(.forward(epoch: epoch, $0), to: from) }

        case .joinAccepted(let epoch, let attempt, let keep):
            guard let c = config, epoch == c.epoch, isLearner, !joined, attempt == joinAttempt, from == .replica(c.tail) else { return [] }
            joined = true
            var actions: [GCSAction] = []
            if lastSequence > keep {
                // The updates after `keep` were numbered by a head whose history the chain did not keep.
                truncate(keep: keep)
                actions.append(.persistTruncation(keep: keep))
            }
            // Tells the tail the log is now a prefix of its own, so it may count this learner caught up.
            return actions + [.send(.ack(epoch: epoch, lastSequence), to: from)]

        case .handoff(let epoch, let upTo):
            guard let c = config, epoch == c.epoch, isTail, from == c.handoffFrom.map(Endpoint.replica) else { return [] }
            handoffUpTo = max(handoffUpTo ?? 0, upTo)
            return []

        case .configure(let new, let leaseFrom):
            guard new.shard == shard else { return [] }
            var actions: [GCSAction] = []
            if config == nil || new.epoch > config!.epoch {
                actions.append(.persistConfig(new))
                actions += adopt(new)
            }
            if let from = leaseFrom, new.epoch == config?.epoch, serving {
                let until = from + options.leaseDuration
                if until > (lease?.until ?? 0) || lease?.epoch != new.epoch { lease = (new.epoch, until) }
                actions += release(now: now)
            }
            return actions

        case .subscribe(let prefix, let after):
            guard serving, case .client(let subscriber) = from else { return [] }
            var sub = Subscription(prefix: prefix, queuedUpTo: after, unacked: [], transmittedUpTo: after)
            for u in log[Int(min(after, lastSequence))...] where u.key.hasPrefix(prefix) {
                sub.unacked.append((u, sub.queuedUpTo))
                sub.queuedUpTo = u.sequence
            }
            subscriptions[subscriber] = sub
            return release(now: now)

        case .changeAck(let upTo):
            guard case .client(let subscriber) = from else { return [] }
            subscriptions[subscriber]?.unacked.removeAll { $0.0.sequence <= upTo }
            return []

        case .written, .readResult, .notHere, .change, .report, .configQuery, .configs:
            return []
        }
    }

    /// After applying `u` as head or middle: forward it; as tail: commit it when the lease allows.
    private mutating func passOn(_ u: ChainUpdate, now: UInt64) -> [GCSAction] {
        let c = config!
        if let s = successor {
            sent.append(u)
            return [.send(.forward(epoch: c.epoch, u), to: .replica(s))]
        }
        var actions: [GCSAction] = []
        if learnerJoined, let l = c.learner {
            sent.append(u)
            actions.append(.send(.forward(epoch: c.epoch, u), to: .replica(l)))
        }
        pendingReplies.append(u.request)
        for (subscriber, var sub) in subscriptions where u.key.hasPrefix(sub.prefix) {
            sub.unacked.append((u, sub.queuedUpTo))
            sub.queuedUpTo = u.sequence
            subscriptions[subscriber] = sub
        }
        return actions + release(now: now)
    }

    /// As a serving tail with a lease: acknowledges what it holds, answers the writes waiting
    /// for that, and sends subscribers the changes they have not been sent.
    private mutating func release(now: UInt64) -> [GCSAction] {
        guard serving, holdsLease(at: now), let c = config else { return [] }
        var actions: [GCSAction] = []
        if acknowledged < lastSequence {
            acknowledged = lastSequence
            if let p = predecessor { actions.append(.send(.ack(epoch: c.epoch, acknowledged), to: .replica(p))) }
        }
        actions += pendingReplies.map { .send(.written($0), to: .client($0.client)) }
        pendingReplies = []
        for (subscriber, var sub) in subscriptions where sub.transmittedUpTo < sub.queuedUpTo {
            for (u, previous) in sub.unacked where u.sequence > sub.transmittedUpTo {
                actions.append(.send(.change(shard: shard, u, previous: previous), to: .client(subscriber)))
            }
            sub.transmittedUpTo = sub.queuedUpTo
            subscriptions[subscriber] = sub
        }
        return actions
    }

    // MARK: timer

    /// Called periodically: reports to the coordinator and resends whatever is unacknowledged.
    public mutating func tick(now: UInt64) -> [GCSAction] {
        var actions: [GCSAction] = [report(now: now)]
        guard let c = config else { return actions }
        if let d = downstream {
            if c.handoffFrom == id { actions.append(.send(.handoff(epoch: c.epoch, upTo: lastSequence), to: .replica(d))) }
            if now >= retransmitted.at + options.retransmitInterval {
                let due = retransmitted.upTo
                actions += sent.lazy.filter { $0.sequence <= due }.map { .send(.forward(epoch: c.epoch, $0), to: .replica(d)) }
                retransmitted = (now, lastSequence)
            }
        }
        if isLearner && !joined {
            actions.append(.send(.join(epoch: c.epoch, attempt: joinAttempt, log: epochRanges()), to: .replica(c.tail)))
        }
        if serving && holdsLease(at: now) {
            for (subscriber, sub) in subscriptions {
                actions += sub.unacked.map { .send(.change(shard: shard, $0.0, previous: $0.1), to: .client(subscriber)) }
            }
        }
        return actions
    }
}
