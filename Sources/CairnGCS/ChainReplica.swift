import DequeModule
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
        /// How often unacknowledged updates are resent downstream, and unacknowledged changes
        /// to a subscriber; only what was already outstanding at the previous resend goes again,
        /// and only when nothing was acknowledged since, so a busy pipeline or a subscriber that
        /// lags is not flooded with copies of what is still on its way. 0: at every tick.
        public var retransmitInterval: UInt64
        /// How often the report (the heartbeat, which renews a tail's lease) goes to the
        /// coordinator; 0: at every tick. Keep it well under the lease and the coordinator's
        /// failure timeout. What the coordinator must act on is reported at once regardless.
        public var reportInterval: UInt64
        /// Compaction: once this many updates that reached the tail are in the log beyond the
        /// `retain` newest, they are folded into the base (the store as of them) and dropped,
        /// so memory and storage hold the state rather than its history. 0: never.
        public var compactEvery: UInt64
        /// Updates kept in the log after compaction, so that a subscriber a little behind, or
        /// one moving to a new tail, resumes from the log rather than from a snapshot.
        public var retain: UInt64
        /// Largest part, in bytes of values and keys, of a snapshot sent to a learner.
        public var snapshotChunkBytes: Int
        /// Most updates in flight from a tail to its learner (sent, not yet acknowledged) at
        /// once; the rest go as acknowledgements come. A learner catching up on thousands of
        /// updates then takes them in step with the chain's other traffic instead of flooding
        /// every queue ahead of it.
        public var window: Int
        public init(leaseDuration: UInt64, retransmitInterval: UInt64 = 0, reportInterval: UInt64 = 0, compactEvery: UInt64 = 0,
                    retain: UInt64 = 0, snapshotChunkBytes: Int = 4 << 20, window: Int = 64) {
            precondition(window >= 1, "the window must let at least one update through")
            precondition(reportInterval < leaseDuration, "a report interval of \(reportInterval) would let the tail's lease (\(leaseDuration)) run out between reports")
            self.reportInterval = reportInterval
            self.window = window
            self.leaseDuration = leaseDuration
            self.retransmitInterval = retransmitInterval
            self.compactEvery = compactEvery
            self.retain = retain
            self.snapshotChunkBytes = snapshotChunkBytes
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
        /// Sent in place of the changes the log no longer holds, until acknowledged.
        var snapshot: (upTo: UInt64, epoch: UInt64, entries: [String: [UInt8]], previous: UInt64)?
        /// The highest sequence number the subscriber acknowledged.
        var acked: UInt64 = 0
        /// Resends, as for updates downstream: when the last check was, what had been
        /// transmitted and acknowledged then, and the doublings of the interval earned by
        /// resends that brought no acknowledgement.
        var checked: (at: UInt64, transmittedUpTo: UInt64, acked: UInt64) = (0, 0, 0)
        var backoff = 0
    }

    /// As learner: a snapshot being received from the tail.
    struct Install: Sendable {
        var chunks: Int
        var next = 0
        var entries: [String: [UInt8]] = [:]
        /// When the last part arrived; the join is asked again if the parts stall.
        var progressAt: UInt64
    }

    public let id: ReplicaID
    public let shard: Int
    public let options: Options
    public private(set) var config: ChainConfig?
    /// What compaction folded: updates 1 through `base.sequence`.
    public private(set) var base = ChainBase()
    /// The store as of `base` (what a truncation rebuilds from, and a learner's snapshot).
    private var baseStore: [String: [UInt8]] = [:]
    /// Applied updates after the base; `log[i].sequence == base.sequence + i + 1`.
    public private(set) var log: [ChainUpdate] = []
    public private(set) var store: [String: [UInt8]] = [:]
    /// Per client: its newest request applied here, and that update's sequence number.
    private var applied: [Int: AppliedRequest] = [:]
    private var install: Install?
    /// When a tick last asked to join: asked again only after a retransmit interval, so that a
    /// tail busy sending a large log or snapshot is not asked to send it again meanwhile.
    private var joinAskedAt: UInt64?
    /// For downstream (the successor, or a tail's learner), not yet acknowledged; in sequence
    /// order, so an acknowledgement removes a prefix. The first `transmitted` have been sent;
    /// the rest wait for the window (``Options/window``) to open.
    private var sent: Deque<ChainUpdate> = []
    private var transmitted = 0
    /// When updates were last resent (or a resend was found unneeded), the last sequence
    /// number then (what was outstanding), and how far downstream had acknowledged then.
    private var retransmitted: (at: UInt64, upTo: UInt64, acked: UInt64) = (0, 0, 0)
    /// Doublings of the retransmit interval: one more after each resend that brought no
    /// acknowledgement, back to none once acknowledgements come (see ``maxRetransmitBackoff``).
    private var retransmitBackoff = 0
    /// A tail with no lease acknowledges nothing however often it is sent the same updates; a
    /// flood of resends would then fill the very queue its lease has to come through.
    static let maxRetransmitBackoff = 4
    /// Every update up to here has reached the tail.
    public private(set) var acknowledged: UInt64 = 0
    private var lease: (epoch: UInt64, until: UInt64)?
    /// For a promoted tail: how far the previous tail's log went.
    private var handoffUpTo: UInt64?
    /// For a promoted tail: its last sequence number when it was promoted. The writes up to
    /// there that the previous tail had not answered are answered once its handoff says which.
    private var promotedAt: UInt64 = 0
    /// For a previous tail owing a handoff: how far it had answered writes, as its tail.
    private var handoffAnswered: UInt64 = 0
    /// As learner: the join request outstanding (0: none numbered yet in this life; see
    /// ``nextJoinAttempt(now:)``), and whether the tail accepted it.
    private var joinAttempt: UInt64 = 0
    private var joined = false
    /// As tail: the learner's join was accepted, and how far the learner has acknowledged
    /// (nil until the learner confirms it cut its log to the common prefix).
    private var learnerJoined = false
    private var learnerAcked: UInt64?
    /// As tail: the join last accepted (the whole request) and the answer given. A learner
    /// asks again when the answer is slow to come; the same request again gets the same answer,
    /// without rebuilding the snapshot or restarting the stream the first one started. (A
    /// learner whose log changed, after a restart for example, asks with other ranges: that
    /// is a new join.)
    private var acceptedJoin: (epoch: UInt64, attempt: UInt64, base: UInt64, ranges: [EpochRange], keep: UInt64, chunks: Int)?
    private var subscriptions: [Int: Subscription] = [:] {
        didSet { if subscriptions.count != subscribers.count { subscribers = subscriptions.keys.sorted() } }
    }
    /// When the last report went to the coordinator.
    private var reportedAt: UInt64?
    /// The clock at this life's first step (message or tick). A lease runs from the send time
    /// of the report it answers, so one that runs from earlier was granted to a previous life:
    /// the shells' clock keeps running across a restart, and moves on between a life's last
    /// step and the next life's first.
    private var lifeStart: UInt64?
    /// The keys of `subscriptions` in order: what goes to subscribers is sent in this order, so
    /// that a seeded simulation runs the same in every process (a dictionary's order does not).
    private var subscribers: [Int] = []
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
    /// With `snapshot`, the persisted log starts after it.
    public init(id: ReplicaID, shard: Int, options: Options, recovering persisted: [ChainUpdate], config: ChainConfig?, snapshot: ChainSnapshot? = nil) {
        self.init(id: id, shard: shard, options: options)
        if let snapshot { installSnapshot(snapshot) }
        for u in persisted {
            precondition(u.sequence == lastSequence + 1, "persisted log of replica \(id) has a gap before \(u.sequence)")
            apply(u)
        }
        if let config, config.shard == shard { _ = adopt(config, now: nil) }
    }

    // MARK: roles

    public var lastSequence: UInt64 { base.sequence + UInt64(log.count) }
    /// The update numbered `sequence`, which must be in the log (after the base).
    @inline(__always) func entry(_ sequence: UInt64) -> ChainUpdate { log[Int(sequence - base.sequence - 1)] }
    /// The log's updates after `sequence` (at least the base).
    @inline(__always) func updates(after sequence: UInt64) -> ArraySlice<ChainUpdate> { log[Int(max(sequence, base.sequence) - base.sequence)...] }
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

    /// Drops what downstream acknowledged: a prefix of `sent`, so the cost is what is dropped.
    private mutating func removeAcknowledged(upTo sequence: UInt64) {
        while let u = sent.first, u.sequence <= sequence {
            sent.removeFirst()
            transmitted = max(0, transmitted - 1)
        }
    }

    /// Replaces what is owed downstream; nothing of it sent yet.
    private mutating func resetSent<S: Sequence>(_ updates: S) where S.Element == ChainUpdate {
        sent = Deque(updates)
        transmitted = 0
    }

    /// Sends downstream what the window lets through. The window applies to a tail's learner
    /// only, which acknowledges every update it takes, even one it had. Within the chain a
    /// successor may not acknowledge at all for a while (a promoted tail waiting for its
    /// handoff acknowledges nothing), so everything owed goes at once, as it must for the
    /// handoff to complete.
    private mutating func transmit(epoch: UInt64, to d: ReplicaID) -> [GCSAction] {
        var actions: [GCSAction] = []
        let window = successor == nil ? options.window : Int.max
        while transmitted < sent.count && transmitted < window {
            actions.append(.send(.forward(epoch: epoch, sent[transmitted]), to: .replica(d)))
            transmitted += 1
        }
        return actions
    }

    private mutating func apply(_ u: ChainUpdate) {
        log.append(u)
        store[u.key] = u.value
        applied[u.request.client] = AppliedRequest(number: u.request.number, sequence: u.sequence)
    }

    /// Rebuilds the store and the client table from the base and the updates up to `keep`
    /// (at least the base: what compaction folded had reached a tail, so no chain drops it).
    private mutating func truncate(keep: UInt64) {
        let kept = log.prefix(Int(max(keep, base.sequence) - base.sequence))
        log = []
        store = baseStore
        applied = base.applied
        for u in kept { apply(u) }
        acknowledged = min(acknowledged, lastSequence)
        let last = lastSequence
        while let u = sent.last, u.sequence > last { sent.removeLast() }
        transmitted = min(transmitted, sent.count)
    }

    /// Replaces the log, the store and the client table with `snapshot`.
    private mutating func installSnapshot(_ snapshot: ChainSnapshot) {
        base = snapshot.base
        baseStore = snapshot.store
        store = snapshot.store
        applied = snapshot.base.applied
        log = []
        resetSent([])
        acknowledged = base.sequence
    }

    /// The updates that may be folded: those every replica that could need them again has.
    /// A replica resends only what is after `acknowledged`; a tail streams to its learner what
    /// the learner has not acknowledged.
    private var compactable: UInt64 {
        var bound = acknowledged
        if isTail && config?.learner != nil { bound = min(bound, learnerJoined ? (learnerAcked ?? base.sequence) : base.sequence) }
        return bound > options.retain ? bound - options.retain : 0
    }

    /// Folds the log into the base when enough of it may go (see ``Options/compactEvery``).
    private mutating func compactIfDue() -> [GCSAction] {
        guard options.compactEvery > 0, install == nil else { return [] }
        let upTo = min(compactable, lastSequence)
        guard upTo >= base.sequence + options.compactEvery else { return [] }
        let previous = base.sequence
        let folded = log.prefix(Int(upTo - previous))
        var changes: [String: [UInt8]?] = [:]
        for u in folded {
            changes[u.key] = .some(u.value)
            baseStore[u.key] = u.value
            base.applied[u.request.client] = AppliedRequest(number: u.request.number, sequence: u.sequence)
        }
        base.sequence = upTo
        base.epoch = folded.last!.epoch
        log.removeFirst(folded.count)
        return [.persistCompaction(ChainCompaction(previous: previous, base: base, changes: changes))]
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
    /// The learner's first `learnerBase` updates were folded after they reached a tail, so they
    /// agree with this log; its later ones are checked here, but only where this log still
    /// holds them (nil: the learner needs a snapshot).
    func commonPrefix(with ranges: [EpochRange], learnerBase: UInt64) -> UInt64? {
        var keep = learnerBase
        guard keep <= lastSequence else { return nil }
        for r in ranges {
            var s = max(r.first, learnerBase + 1)
            while s <= r.last {
                guard s <= lastSequence else { return keep }
                guard s > base.sequence else { return nil }
                guard entry(s).epoch == r.epoch else { return keep }
                keep = s
                s += 1
            }
        }
        return keep >= base.sequence ? keep : nil
    }

    // MARK: configuration

    /// Switches to a newer configuration and returns what the new role must send at once.
    /// `now` is nil for a replica restarted from what it persisted: a join it owes is
    /// numbered and sent at its first tick.
    private mutating func adopt(_ new: ChainConfig, now: UInt64?) -> [GCSAction] {
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
        install = nil
        learnerJoined = false
        learnerAcked = nil
        acceptedJoin = nil
        var actions: [GCSAction] = []
        if new.tail == id {
            // Everything here is now at the tail; it is acknowledged once a lease arrives, and
            // the writes the old tail had not answered are answered then. A promoted learner
            // learns which those are from the handoff: what it acknowledged says nothing of
            // what the previous tail answered, and answering its whole log again would send
            // thousands of stale replies ahead of everything else.
            if !wasTail {
                if new.handoffFrom == nil {
                    pendingReplies += updates(after: acknowledged).map(\.request)
                } else {
                    promotedAt = lastSequence
                }
            }
            resetSent([])
        } else if new.chain.contains(id) {
            subscriptions = [:]
            pendingReplies = []
            if wasTail { handoffAnswered = acknowledged }
            if wasTail, let l = oldLearner, successor == l {
                // The learner became the tail: it may lack what it had not acknowledged.
                // (Never below the base: the coordinator promotes only a learner that caught up.)
                acknowledged = max(base.sequence, min(acknowledged, oldLearnerAcked))
            }
            resetSent(updates(after: acknowledged))
            if let s = successor {
                if new.handoffFrom == id { actions.append(.send(.handoff(epoch: new.epoch, upTo: lastSequence, answered: handoffAnswered), to: .replica(s))) }
                actions += transmit(epoch: new.epoch, to: s)
            }
        } else {
            subscriptions = [:]
            pendingReplies = []
            resetSent([])
            if new.learner == id {
                if let now {
                    nextJoinAttempt(now: now)
                    actions.append(joinRequest(new))
                } else {
                    joinAttempt = 0
                }
            }
        }
        return actions
    }

    // MARK: messages

    /// Numbers a new join request. A replica that crashed and restarts forgets the numbers of
    /// its previous life, while the tail's answers to them (acceptances, snapshot parts) may
    /// still be on their way: taken for answers to its new request, one would make it cut its
    /// log to what the tail found in common with its old one. So numbers come from the
    /// clock, which the shells keep running across a replica's restarts, scaled so that the
    /// few attempts of one life within one time unit stay below the next unit's numbers; a
    /// life's first number is past the current unit's, in case the previous life asked in it.
    private mutating func nextJoinAttempt(now: UInt64) {
        joinAttempt = max(joinAttempt + 1, (joinAttempt == 0 ? now + 1 : now) << 8)
    }

    private func joinRequest(_ c: ChainConfig) -> GCSAction {
        .send(.join(epoch: c.epoch, attempt: joinAttempt, base: base.sequence, log: epochRanges()), to: .replica(c.tail))
    }

    /// Handles one message; `now` is the shell's clock (for leases).
    public mutating func handle(_ message: GCSMessage, from: Endpoint, now: UInt64) -> [GCSAction] {
        if lifeStart == nil { lifeStart = now }
        if holdIfEarly(message, from: from) { return [] }
        var actions = step(message, from: from, now: now)
        actions += compactIfDue()
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

    /// Messages from replicas already in a newer configuration than this one, in the order they
    /// came. The coordinator sends a new configuration to every member, and the first to adopt
    /// it starts sending at once (a head resends what is unacknowledged, a previous tail its
    /// handoff): without this, whatever overtook the configuration would be dropped and go
    /// again only at the sender's next retransmission. They are taken once this replica adopts
    /// their epoch, as if the network had delayed them until then; those of an epoch it skips
    /// are dropped. Bounded by ``maxEarly`` and ``maxEarlyBytes``; beyond that a message is
    /// dropped, as the network may drop any, and retransmission covers it.
    private var early: [(message: GCSMessage, from: Endpoint)] = []
    private var earlyBytes = 0
    public static let maxEarly = 1_024
    public static let maxEarlyBytes = 8 << 20

    /// The epoch a message between replicas belongs to (nil for every other message).
    static func chainEpoch(_ m: GCSMessage) -> UInt64? {
        switch m {
        case .forward(let e, _), .ack(let e, _), .learnerAck(let e, _, _), .join(let e, _, _, _), .joinAccepted(let e, _, _, _),
             .snapshotChunk(let e, _, _, _, _), .handoff(let e, _, _):
            return e
        default:
            return nil
        }
    }

    /// Roughly what holding `m` costs: its keys and values.
    static func heldBytes(_ m: GCSMessage) -> Int {
        switch m {
        case .forward(_, let u): return 64 + u.key.utf8.count + (u.value?.count ?? 0)
        case .snapshotChunk(_, _, _, let entries, _): return 64 + entries.reduce(0) { $0 + $1.key.utf8.count + $1.value.count }
        case .join(_, _, _, let ranges): return 64 + 24 * ranges.count
        default: return 64
        }
    }

    /// Holds a message from a newer epoch than this replica's; false if it is from no newer one.
    private mutating func holdIfEarly(_ m: GCSMessage, from: Endpoint) -> Bool {
        guard case .replica = from, let e = Self.chainEpoch(m), e > (config?.epoch ?? 0) else { return false }
        let size = Self.heldBytes(m)
        if early.count < Self.maxEarly && earlyBytes + size <= Self.maxEarlyBytes {
            early.append((m, from))
            earlyBytes += size
        }
        return true
    }

    /// Takes the held messages of the epoch just adopted, in order; drops those of older epochs.
    private mutating func takeEarly(now: UInt64) -> [GCSAction] {
        guard let c = config, !early.isEmpty else { return [] }
        let held = early
        early = []
        earlyBytes = 0
        var actions: [GCSAction] = []
        for (m, from) in held {
            guard let e = Self.chainEpoch(m), e >= c.epoch else { continue }
            if e == c.epoch {
                actions += step(m, from: from, now: now)
            } else {
                early.append((m, from))
                earlyBytes += Self.heldBytes(m)
            }
        }
        return actions
    }

    /// The report to the coordinator, which doubles as the heartbeat.
    private mutating func report(now: UInt64) -> GCSAction {
        reportedAt = now
        return .send(.report(ReplicaReport(
            replica: id, shard: shard, epoch: config?.epoch ?? 0, sentAt: now, lastSequence: lastSequence, base: base.sequence,
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
                // Seen before: acknowledged again, in case that was lost, by the end of the
                // stream and by a middle too. A predecessor that restarted forgot what reached
                // the tail and resends it; a middle that has nothing left to send downstream
                // hears no new acknowledgement to pass on, so it answers from what it knows.
                if isLearner { return [.send(.learnerAck(epoch: epoch, attempt: joinAttempt, upTo: lastSequence), to: from)] }
                return acknowledged > 0 ? [.send(.ack(epoch: epoch, acknowledged), to: from)] : []
            }
            guard u.sequence == lastSequence + 1 else { return [] }  // a gap: retransmission fills it
            apply(u)
            if isLearner { return [.persist(u), .send(.learnerAck(epoch: epoch, attempt: joinAttempt, upTo: u.sequence), to: from)] }
            return [.persist(u)] + passOn(u, now: now)

        case .ack(let epoch, let sequence):
            guard let c = config, epoch == c.epoch, case .replica(let r) = from, r == successor, sequence > acknowledged else { return [] }
            acknowledged = min(sequence, lastSequence)
            removeAcknowledged(upTo: sequence)
            return (predecessor.map { [.send(.ack(epoch: epoch, acknowledged), to: .replica($0))] } ?? []) + transmit(epoch: epoch, to: r)

        case .learnerAck(let epoch, let attempt, let sequence):
            // Only for the join accepted last: a learner that restarted may still have
            // acknowledgements of its previous life on their way, for updates it has since
            // dropped (cutting its log, or installing a snapshot in their place).
            guard let c = config, epoch == c.epoch, isTail, case .replica(let r) = from, r == c.learner, learnerJoined,
                  let a = acceptedJoin, a.epoch == epoch, a.attempt == attempt else { return [] }
            learnerAcked = max(learnerAcked ?? 0, sequence)
            removeAcknowledged(upTo: sequence)
            return transmit(epoch: epoch, to: r)

        case .join(let epoch, let attempt, let learnerBase, let ranges):
            guard let c = config, epoch == c.epoch, isTail, case .replica(let r) = from, r == c.learner else { return [] }
            if learnerJoined, let a = acceptedJoin, a.epoch == epoch, a.attempt == attempt, a.base == learnerBase, a.ranges == ranges {
                // Asked again before the answer arrived. (If the answer was lost, what followed it
                // is retransmitted, or the learner's install times out and it asks anew.)
                return [.send(.joinAccepted(epoch: epoch, attempt: attempt, keep: a.keep, snapshotChunks: a.chunks), to: from)]
            }
            learnerJoined = true
            learnerAcked = nil
            if let keep = commonPrefix(with: ranges, learnerBase: learnerBase) {
                resetSent(updates(after: keep))
                acceptedJoin = (epoch, attempt, learnerBase, ranges, keep, 0)
                return [.send(.joinAccepted(epoch: epoch, attempt: attempt, keep: keep, snapshotChunks: 0), to: from)]
                    + transmit(epoch: epoch, to: r)
            }
            // The learner lacks updates this log no longer holds: it gets the base as a
            // snapshot, in parts, then the log after it (resent until acknowledged).
            resetSent(log)
            let chunks = snapshotChunks()
            acceptedJoin = (epoch, attempt, learnerBase, ranges, 0, chunks.count)
            var actions: [GCSAction] = [.send(.joinAccepted(epoch: epoch, attempt: attempt, keep: 0, snapshotChunks: chunks.count), to: from)]
            for (i, part) in chunks.enumerated() {
                actions.append(.send(.snapshotChunk(epoch: epoch, attempt: attempt, index: i, entries: part, base: i == chunks.count - 1 ? base : nil), to: from))
            }
            return actions + transmit(epoch: epoch, to: r)

        case .joinAccepted(let epoch, let attempt, let keep, let chunks):
            guard let c = config, epoch == c.epoch, isLearner, !joined, install == nil, joinAttempt != 0, attempt == joinAttempt,
                  from == .replica(c.tail) else { return [] }
            if chunks > 0 {
                install = Install(chunks: chunks, progressAt: now)
                return []
            }
            joined = true
            var actions: [GCSAction] = []
            if lastSequence > keep {
                // The updates after `keep` were numbered by a head whose history the chain did not keep.
                truncate(keep: keep)
                actions.append(.persistTruncation(keep: keep))
            }
            // Tells the tail the log is now a prefix of its own, so it may count this learner caught up.
            return actions + [.send(.learnerAck(epoch: epoch, attempt: attempt, upTo: lastSequence), to: from)]

        case .snapshotChunk(let epoch, let attempt, let index, let entries, let snapshotBase):
            guard let c = config, epoch == c.epoch, isLearner, !joined, joinAttempt != 0, attempt == joinAttempt, from == .replica(c.tail),
                  var pending = install, index == pending.next else { return [] }
            pending.entries.merge(entries) { _, new in new }
            pending.next += 1
            pending.progressAt = now
            install = pending
            guard pending.next == pending.chunks else { return [] }
            guard let snapshotBase else {
                // The last part must carry the base; ask again.
                install = nil
                nextJoinAttempt(now: now)
                return [joinRequest(c)]
            }
            let snapshot = ChainSnapshot(base: snapshotBase, store: pending.entries)
            install = nil
            installSnapshot(snapshot)
            joined = true
            return [.persistSnapshot(snapshot), .send(.learnerAck(epoch: epoch, attempt: attempt, upTo: lastSequence), to: from)]

        case .handoff(let epoch, let upTo, let answered):
            guard let c = config, epoch == c.epoch, isTail, from == c.handoffFrom.map(Endpoint.replica) else { return [] }
            if handoffUpTo == nil && promotedAt > answered {
                // The writes this replica held when promoted that the previous tail had not
                // answered (those it took since are answered as they come).
                pendingReplies += updates(after: answered).prefix { $0.sequence <= promotedAt }.map(\.request)
            }
            handoffUpTo = max(handoffUpTo ?? 0, upTo)
            return []

        case .configure(let new, let leaseFrom):
            guard new.shard == shard else { return [] }
            var actions: [GCSAction] = []
            if config == nil || new.epoch > config!.epoch {
                actions.append(.persistConfig(new))
                actions += adopt(new, now: now)
                // A learner asked to join just now (in `adopt`): it asks again only after an interval.
                if new.learner == id { joinAskedAt = now }
                actions += takeEarly(now: now)
            }
            // Only a lease for a report of this life: one granted to the previous life may arrive
            // after a restart, when the coordinator, told the process exited, counts no lease
            // and has given the chain to others.
            if let from = leaseFrom, let start = lifeStart, from >= start, new.epoch == config?.epoch, serving {
                let until = from + options.leaseDuration
                if until > (lease?.until ?? 0) || lease?.epoch != new.epoch { lease = (new.epoch, until) }
                actions += release(now: now)
            }
            return actions

        case .subscribe(let prefix, let after):
            guard serving, case .client(let subscriber) = from else { return [] }
            var sub = Subscription(prefix: prefix, queuedUpTo: after, unacked: [], transmittedUpTo: after)
            if after < base.sequence {
                // What the subscriber lacks was compacted: the keys' values as of the base instead.
                sub.snapshot = (base.sequence, base.epoch, baseStore.filter { $0.key.hasPrefix(prefix) }, after)
                sub.queuedUpTo = base.sequence
            }
            for u in updates(after: min(after, lastSequence)) where u.key.hasPrefix(prefix) {
                sub.unacked.append((u, sub.queuedUpTo))
                sub.queuedUpTo = u.sequence
            }
            subscriptions[subscriber] = sub
            return release(now: now)

        case .changeAck(let upTo):
            guard case .client(let subscriber) = from else { return [] }
            subscriptions[subscriber]?.unacked.removeAll { $0.0.sequence <= upTo }
            if let acked = subscriptions[subscriber]?.acked, upTo > acked { subscriptions[subscriber]?.acked = upTo }
            if let s = subscriptions[subscriber]?.snapshot, s.upTo <= upTo { subscriptions[subscriber]?.snapshot = nil }
            return []

        case .written, .readResult, .notHere, .change, .snapshot, .report, .configQuery, .configs:
            return []
        }
    }

    /// What a subscription holds for its subscriber after sequence number `after`, in order:
    /// the snapshot (if it reaches past `after`), then the changes.
    private func transmissions(_ sub: Subscription, to subscriber: Int, after: UInt64, upTo: UInt64 = .max) -> [GCSAction] {
        var actions: [GCSAction] = []
        if let s = sub.snapshot, s.upTo > after {
            actions.append(.send(.snapshot(shard: shard, upTo: s.upTo, epoch: s.epoch, entries: s.entries, previous: s.previous), to: .client(subscriber)))
        }
        for (u, previous) in sub.unacked where u.sequence > after {
            guard u.sequence <= upTo else { break }
            actions.append(.send(.change(shard: shard, u, previous: previous), to: .client(subscriber)))
        }
        return actions
    }

    /// The base's store in parts of at most ``Options/snapshotChunkBytes`` (at least one part).
    private func snapshotChunks() -> [[String: [UInt8]]] {
        // Parts are cut in key order, so that they are the same in every run (the simulation
        // replays a seed); a store that fits in one part is that part as it is. Sorting a
        // store of 5,000 keys took a tail ~2 ms, which the writes behind it waited for.
        var total = 0
        for (key, value) in baseStore {
            total += key.utf8.count + value.count
            if total > options.snapshotChunkBytes { break }
        }
        if total <= options.snapshotChunkBytes { return [baseStore] }
        var parts: [[String: [UInt8]]] = [[:]]
        var bytes = 0
        for (key, value) in baseStore.sorted(by: { $0.key < $1.key }) {
            let size = key.utf8.count + value.count
            if bytes > 0 && bytes + size > options.snapshotChunkBytes {
                parts.append([:])
                bytes = 0
            }
            parts[parts.count - 1][key] = value
            bytes += size
        }
        return parts
    }

    /// After applying `u` as head or middle: forward it; as tail: commit it when the lease allows.
    private mutating func passOn(_ u: ChainUpdate, now: UInt64) -> [GCSAction] {
        let c = config!
        if let s = successor {
            sent.append(u)
            return transmit(epoch: c.epoch, to: s)
        }
        var actions: [GCSAction] = []
        if learnerJoined, let l = c.learner {
            sent.append(u)
            actions += transmit(epoch: c.epoch, to: l)
        }
        pendingReplies.append(u.request)
        for subscriber in subscribers {
            guard var sub = subscriptions[subscriber], u.key.hasPrefix(sub.prefix) else { continue }
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
        for subscriber in subscribers {
            guard var sub = subscriptions[subscriber], sub.transmittedUpTo < sub.queuedUpTo else { continue }
            actions += transmissions(sub, to: subscriber, after: sub.transmittedUpTo)
            sub.transmittedUpTo = sub.queuedUpTo
            subscriptions[subscriber] = sub
        }
        return actions
    }

    // MARK: timer

    /// Called periodically: reports to the coordinator and resends whatever is unacknowledged.
    public mutating func tick(now: UInt64) -> [GCSAction] {
        if lifeStart == nil { lifeStart = now }
        var actions: [GCSAction] = compactIfDue()
        if reportedAt.map({ now >= $0 + options.reportInterval }) ?? true { actions.append(report(now: now)) }
        guard let c = config else { return actions }
        if let d = downstream {
            if c.handoffFrom == id { actions.append(.send(.handoff(epoch: c.epoch, upTo: lastSequence, answered: handoffAnswered), to: .replica(d))) }
            if now >= retransmitted.at + (options.retransmitInterval << retransmitBackoff) {
                // Resent only when downstream acknowledged nothing since the last check: while
                // acknowledgements come, the stream flows, and a long backlog (a learner catching
                // up) is not sent again, and again, while it is still on its way. A lost update
                // stops the acknowledgements, so it goes again one interval later, and less
                // often while none arrive.
                let acked = successor != nil ? acknowledged : (learnerAcked ?? 0)
                let due = retransmitted.upTo
                if acked == retransmitted.acked, let first = sent.first, first.sequence <= due, transmitted > 0 {
                    for u in sent.prefix(transmitted) {
                        guard u.sequence <= due else { break }
                        actions.append(.send(.forward(epoch: c.epoch, u), to: .replica(d)))
                    }
                    retransmitBackoff = min(retransmitBackoff + 1, Self.maxRetransmitBackoff)
                } else {
                    // Acknowledgements came, or nothing was outstanding: the next loss is
                    // resent after one interval, not after a backoff earned while idle.
                    retransmitBackoff = 0
                }
                retransmitted = (now, lastSequence, acked)
            }
        }
        if isLearner && !joined {
            if let pending = install {
                // Parts of a snapshot stopped coming (one was lost): the join starts again.
                if now >= pending.progressAt + options.leaseDuration {
                    install = nil
                    nextJoinAttempt(now: now)
                    actions.append(joinRequest(c))
                }
            } else if joinAskedAt.map({ now >= $0 + options.retransmitInterval }) ?? true {
                if joinAttempt == 0 { nextJoinAttempt(now: now) }
                joinAskedAt = now
                actions.append(joinRequest(c))
            }
        }
        if serving && holdsLease(at: now) {
            for subscriber in subscribers {
                guard var sub = subscriptions[subscriber], now >= sub.checked.at + (options.retransmitInterval << sub.backoff) else { continue }
                // As downstream: resent only when the subscriber acknowledged nothing since the
                // last check, and only what had been sent by then.
                let due = sub.checked.transmittedUpTo
                let outstanding = (sub.snapshot.map { $0.upTo <= due } ?? false) || (sub.unacked.first.map { $0.0.sequence <= due } ?? false)
                if sub.acked == sub.checked.acked && outstanding {
                    actions += transmissions(sub, to: subscriber, after: 0, upTo: due)
                    sub.backoff = min(sub.backoff + 1, Self.maxRetransmitBackoff)
                } else {
                    sub.backoff = 0
                }
                sub.checked = (now, sub.transmittedUpTo, sub.acked)
                subscriptions[subscriber] = sub
            }
        }
        return actions
    }
}
