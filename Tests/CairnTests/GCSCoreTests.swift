import CairnChaosKit
import CairnCore
import CairnGCS
import Foundation
import Testing

/// Drives cores by hand: each test delivers chosen messages, so every step is visible.
@Suite("GCS cores (pure): chain replicas, coordinator, clients, subscribers")
struct GCSCoreTests {
    static let lease: UInt64 = 100
    static let options = ChainReplica.Options(leaseDuration: lease)

    static func replica(_ id: ReplicaID, _ config: ChainConfig?, log: [ChainUpdate] = []) -> ChainReplica {
        ChainReplica(id: id, shard: 0, options: options, recovering: log, config: config)
    }

    /// Grants `r` a lease as its coordinator would after a report sent at `now`.
    static func grant(_ r: inout ChainReplica, now: UInt64) -> [GCSAction] {
        r.handle(.configure(r.config!, leaseFrom: now), from: .coordinator, now: now)
    }

    static func sends(_ actions: [GCSAction]) -> [GCSMessage] {
        actions.compactMap { if case .send(let m, _) = $0 { return m } else { return nil } }
    }

    static func value(_ v: UInt8) -> [UInt8] { [v] }

    /// The join request among a step's sends, and its number; records an issue if there is none.
    static func join(in actions: [GCSAction], _ what: String = "no join sent") -> (message: GCSMessage, attempt: UInt64)? {
        for m in sends(actions) { if case .join(_, let attempt, _, _) = m { return (m, attempt) } }
        Issue.record("\(what): \(actions)")
        return nil
    }

    @Test("a write flows head to tail; the tail answers it and acknowledges it up the chain only while it holds a lease")
    func writeNeedsTailLease() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1, 2])
        var head = Self.replica(0, config), middle = Self.replica(1, config), tail = Self.replica(2, config)
        let request = RequestID(client: 7, number: 1)
        let a1 = head.handle(.write(request, key: "k", value: Self.value(42)), from: .client(7), now: 0)
        let u = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(42), request: request)
        #expect(a1 == [.persist(u), .send(.forward(epoch: 1, u), to: .replica(1))])
        #expect(middle.handle(.forward(epoch: 1, u), from: .replica(0), now: 0) == [.persist(u), .send(.forward(epoch: 1, u), to: .replica(2))])
        // No lease yet: applied and persisted, not answered; the tail reports at once, so that its lease comes.
        let reportNow = GCSAction.send(.report(ReplicaReport(replica: 2, shard: 0, epoch: 1, sentAt: 0, lastSequence: 1, learnerCaughtUp: false,
                                                             serving: true)), to: .coordinator)
        #expect(tail.handle(.forward(epoch: 1, u), from: .replica(1), now: 0) == [.persist(u), reportNow])
        #expect(Self.grant(&tail, now: 5) == [.send(.ack(epoch: 1, 1), to: .replica(1)), .send(.written(request), to: .client(7))])
        #expect(middle.handle(.ack(epoch: 1, 1), from: .replica(2), now: 6) == [.send(.ack(epoch: 1, 1), to: .replica(0))])
        #expect(head.handle(.ack(epoch: 1, 1), from: .replica(1), now: 7) == [])
        // The client retries: applied once, answered by the head now that it is acknowledged.
        #expect(head.handle(.write(request, key: "k", value: Self.value(42)), from: .client(7), now: 8) == [.send(.written(request), to: .client(7))])
        #expect(head.log.count == 1)
    }

    @Test("reads are served by the tail only under an unexpired lease; elsewhere the client is turned away")
    func readsNeedLease() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1])
        var head = Self.replica(0, config)
        var tail = Self.replica(1, config)
        let r1 = RequestID(client: 3, number: 1)
        let reportNow = GCSAction.send(.report(ReplicaReport(replica: 1, shard: 0, epoch: 1, sentAt: 0, lastSequence: 0, learnerCaughtUp: false,
                                                             serving: true)), to: .coordinator)
        #expect(tail.handle(.read(r1, key: "k"), from: .client(3), now: 0) == [.send(.notHere(r1), to: .client(3)), reportNow],
                "a tail without a lease turns the read away and asks for its lease at once")
        #expect(tail.handle(.read(r1, key: "k"), from: .client(3), now: 1) == [.send(.notHere(r1), to: .client(3))], "once per change, not per message")
        _ = Self.grant(&tail, now: 10)
        #expect(tail.handle(.read(r1, key: "k"), from: .client(3), now: 50) == [.send(.readResult(r1, nil), to: .client(3))])
        #expect(tail.handle(.read(r1, key: "k"), from: .client(3), now: 10 + Self.lease) == [.send(.notHere(r1), to: .client(3))], "the lease ran out")
        #expect(head.handle(.read(r1, key: "k"), from: .client(3), now: 50) == [.send(.notHere(r1), to: .client(3))])
    }

    @Test("an update out of order waits for retransmission to fill the gap; a duplicate is acknowledged again, not applied")
    func ordering() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1])
        var tail = Self.replica(1, config)
        _ = Self.grant(&tail, now: 0)
        let u1 = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(1), request: RequestID(client: 1, number: 1))
        let u2 = ChainUpdate(epoch: 1, sequence: 2, key: "k", value: Self.value(2), request: RequestID(client: 1, number: 2))
        #expect(tail.handle(.forward(epoch: 1, u2), from: .replica(0), now: 1) == [])
        #expect(tail.handle(.forward(epoch: 1, u1), from: .replica(0), now: 1).contains(.persist(u1)))
        #expect(tail.handle(.forward(epoch: 1, u1), from: .replica(0), now: 1) == [.send(.ack(epoch: 1, 1), to: .replica(0))])
        #expect(tail.handle(.forward(epoch: 1, u2), from: .replica(0), now: 1).contains(.persist(u2)))
        #expect(tail.store["k"] == Self.value(2))
    }

    @Test("a middle sent an update it already passed on acknowledges what reached the tail, so a head that restarted learns it")
    func middleAcknowledgesResentUpdate() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1, 2])
        var middle = Self.replica(1, config)
        let u = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(1), request: RequestID(client: 7, number: 1))
        _ = middle.handle(.forward(epoch: 1, u), from: .replica(0), now: 0)
        #expect(middle.handle(.ack(epoch: 1, 1), from: .replica(2), now: 1) == [.send(.ack(epoch: 1, 1), to: .replica(0))])
        // The head restarts before that acknowledgement arrives: it knows nothing acknowledged,
        // resends the update, and without an answer would resend it (and hold the client's
        // retry) forever, since the middle has nothing left to pass on for a new acknowledgement.
        var head = Self.replica(0, config, log: [u])
        #expect(head.acknowledged == 0)
        let again = middle.handle(.forward(epoch: 1, u), from: .replica(0), now: 2)
        #expect(again == [.send(.ack(epoch: 1, 1), to: .replica(0))])
        _ = head.handle(.ack(epoch: 1, 1), from: .replica(1), now: 3)
        #expect(head.handle(.write(u.request, key: "k", value: Self.value(1)), from: .client(7), now: 4) == [.send(.written(u.request), to: .client(7))],
                "the client's retry is answered")
        let fresh = Self.replica(1, config)
        var unacknowledged = fresh
        _ = unacknowledged.handle(.forward(epoch: 1, u), from: .replica(0), now: 0)
        #expect(unacknowledged.handle(.forward(epoch: 1, u), from: .replica(0), now: 1) == [], "nothing is acknowledged before the tail has it")
    }

    @Test("a replica reports once per report interval, and at once when it can serve but holds no lease for its configuration")
    func reportsPaced() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1])
        let options = ChainReplica.Options(leaseDuration: Self.lease, reportInterval: 10)
        var head = ChainReplica(id: 0, shard: 0, options: options, recovering: [], config: config)
        let reports = { (actions: [GCSAction]) in Self.sends(actions).filter { if case .report = $0 { return true } else { return false } }.count }
        #expect(reports(head.tick(now: 0)) == 1)
        #expect((1..<10).map { reports(head.tick(now: UInt64($0))) } == Array(repeating: 0, count: 9))
        #expect(reports(head.tick(now: 10)) == 1)
        #expect(reports(head.tick(now: 15)) == 0)
        var tail = ChainReplica(id: 1, shard: 0, options: options, recovering: [], config: config)
        _ = tail.tick(now: 0)
        let u = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(1), request: RequestID(client: 7, number: 1))
        #expect(reports(tail.handle(.forward(epoch: 1, u), from: .replica(0), now: 2)) == 1, "a tail without a lease asks between reports")
        _ = tail.handle(.configure(config, leaseFrom: 2), from: .coordinator, now: 3)
        #expect(reports(tail.tick(now: 5)) == 0)
        #expect(reports(tail.tick(now: 12)) == 1, "the next one renews the lease")
    }

    @Test("the tail resends a subscriber's unacknowledged changes once per retransmit interval, doubling it while none is acknowledged, and not while acknowledgements come")
    func subscriptionResendsPaced() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0])
        var tail = ChainReplica(id: 0, shard: 0, options: ChainReplica.Options(leaseDuration: 1_000, retransmitInterval: 10), recovering: [], config: config)
        _ = Self.grant(&tail, now: 0)
        _ = tail.handle(.subscribe(prefix: "", after: 0), from: .client(50), now: 0)
        let changes = { (actions: [GCSAction]) in Self.sends(actions).filter { if case .change = $0 { return true } else { return false } }.count }
        var sent = 0
        for n in 1...3 as ClosedRange<UInt64> {
            sent += changes(tail.handle(.write(RequestID(client: 7, number: n), key: "k\(n)", value: [UInt8(n)]), from: .client(7), now: n))
        }
        #expect(sent == 3, "each change goes once at commit")
        // The subscriber acknowledges nothing: the three go again at 10 (what was outstanding at the
        // check at 0 is none, so nothing at 0), then at 20, then 20 later, then 40 later.
        var resentAt: [UInt64: Int] = [:]
        for t in 4...100 as ClosedRange<UInt64> {
            let n = changes(tail.tick(now: t))
            if n > 0 { resentAt[t] = n }
        }
        #expect(resentAt == [20: 3, 40: 3, 80: 3], "\(resentAt.sorted { $0.key < $1.key })")
        // Acknowledgements come: no more resends of what is acknowledged, and the interval is back to 10.
        _ = tail.handle(.changeAck(upTo: 3), from: .client(50), now: 101)
        sent = changes(tail.handle(.write(RequestID(client: 7, number: 4), key: "k4", value: [4]), from: .client(7), now: 102))
        #expect(sent == 1)
        var later: [UInt64: Int] = [:]
        for t in 103...200 as ClosedRange<UInt64> {
            let n = changes(tail.tick(now: t))
            if n > 0 { later[t] = n }
        }
        // The check due at 160 sees the acknowledgement and resets the interval; change 4 goes
        // again at 170, then 20 later.
        #expect(later == [170: 1, 190: 1], "only the unacknowledged change goes again: \(later.sorted { $0.key < $1.key })")
    }

    @Test("a message from another epoch is dropped, so a replica cut out of the chain cannot change it")
    func staleEpochRejected() {
        let new = ChainConfig(shard: 0, epoch: 2, chain: [1, 2])
        var tail = Self.replica(2, new)
        _ = Self.grant(&tail, now: 0)
        let stale = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(9), request: RequestID(client: 1, number: 1))
        #expect(tail.handle(.forward(epoch: 1, stale), from: .replica(1), now: 1) == [])
        #expect(tail.handle(.ack(epoch: 1, 5), from: .replica(1), now: 1) == [])
        #expect(tail.log.isEmpty)
        // The same update in the current epoch is taken.
        #expect(tail.handle(.forward(epoch: 2, stale), from: .replica(1), now: 1).contains(.persist(stale)))
    }

    @Test("an update or handoff that overtakes its configuration is taken once the configuration comes; one of a skipped epoch is dropped; the held messages are bounded")
    func earlyMessagesWaitForTheirConfiguration() {
        let first = ChainConfig(shard: 0, epoch: 1, chain: [0, 1], learner: 2)
        var tail = Self.replica(1, first)
        var learner = Self.replica(2, first)
        let u = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(1), request: RequestID(client: 1, number: 1))
        // The learner is promoted: the head and the previous tail adopt epoch 2 first and send at once.
        let promoted = ChainConfig(shard: 0, epoch: 2, chain: [0, 1, 2], handoffFrom: 1)
        #expect(learner.handle(.forward(epoch: 2, u), from: .replica(1), now: 1) == [], "held, not applied, before its configuration")
        #expect(learner.handle(.handoff(epoch: 2, upTo: 1, answered: 0), from: .replica(1), now: 1) == [])
        #expect(learner.log.isEmpty && !learner.isTail)
        let adopted = learner.handle(.configure(promoted, leaseFrom: nil), from: .coordinator, now: 2)
        #expect(adopted.contains(.persist(u)), "the held update is applied once its epoch is adopted")
        #expect(learner.serving, "the held handoff counts: the new tail has everything the previous one had")
        #expect(Self.sends(adopted).contains { if case .report(let r) = $0 { return r.serving && r.epoch == 2 } else { return false } },
                "and it asks for its lease at once")
        // Held messages from an epoch this replica never adopts are dropped when it moves past it.
        let v = ChainUpdate(epoch: 3, sequence: 1, key: "k", value: Self.value(9), request: RequestID(client: 1, number: 2))
        #expect(tail.handle(.forward(epoch: 3, v), from: .replica(0), now: 3) == [])
        let skipped = tail.handle(.configure(ChainConfig(shard: 0, epoch: 4, chain: [0, 1]), leaseFrom: nil), from: .coordinator, now: 4)
        #expect(!skipped.contains(.persist(v)))
        #expect(tail.handle(.configure(ChainConfig(shard: 0, epoch: 4, chain: [0, 1]), leaseFrom: 4), from: .coordinator, now: 5) == [])
        #expect(tail.log.isEmpty)
        // What is held is bounded: beyond `maxEarly` messages the rest are dropped (retransmission covers them).
        var bounded = Self.replica(1, ChainConfig(shard: 0, epoch: 4, chain: [0, 1]))
        for n in 1...(ChainReplica.maxEarly + 6) {
            let w = ChainUpdate(epoch: 5, sequence: UInt64(n), key: "k", value: Self.value(1), request: RequestID(client: 2, number: UInt64(n)))
            #expect(bounded.handle(.forward(epoch: 5, w), from: .replica(0), now: 6) == [])
        }
        _ = bounded.handle(.configure(ChainConfig(shard: 0, epoch: 5, chain: [0, 1]), leaseFrom: nil), from: .coordinator, now: 7)
        #expect(bounded.lastSequence == UInt64(ChainReplica.maxEarly))
    }

    @Test("a promoted learner answers only the writes the previous tail had not answered, as its handoff says")
    func promotedLearnerAnswersOnlyUnanswered() {
        let updates = (1...5).map { ChainUpdate(epoch: 1, sequence: UInt64($0), key: "k", value: Self.value(UInt8($0)), request: RequestID(client: 9, number: UInt64($0))) }
        let first = ChainConfig(shard: 0, epoch: 1, chain: [0, 1], learner: 2)
        var tail = Self.replica(1, first, log: updates)
        _ = Self.grant(&tail, now: 0)  // answers all five: the tail answered up to 5
        var learner = Self.replica(2, first, log: updates)
        let promoted = ChainConfig(shard: 0, epoch: 2, chain: [0, 1, 2], handoffFrom: 1)
        let fromTail = Self.sends(tail.handle(.configure(promoted, leaseFrom: nil), from: .coordinator, now: 1))
        #expect(fromTail.contains(.handoff(epoch: 2, upTo: 5, answered: 5)))
        _ = learner.handle(.configure(promoted, leaseFrom: nil), from: .coordinator, now: 1)
        // Had the previous tail answered only up to 3, the new tail answers 4 and 5 once it holds a lease.
        _ = learner.handle(.handoff(epoch: 2, upTo: 5, answered: 3), from: .replica(1), now: 2)
        #expect(learner.serving)
        let replies = Self.sends(Self.grant(&learner, now: 3)).filter { if case .written = $0 { return true } else { return false } }
        #expect(replies == [.written(RequestID(client: 9, number: 4)), .written(RequestID(client: 9, number: 5))])
        // A write that reaches it after its promotion is answered too.
        let u6 = ChainUpdate(epoch: 2, sequence: 6, key: "k", value: Self.value(6), request: RequestID(client: 9, number: 6))
        #expect(Self.sends(learner.handle(.forward(epoch: 2, u6), from: .replica(1), now: 4)).contains(.written(u6.request)))
    }

    @Test("a head and tail restarted with an old configuration do not acknowledge a write: the old tail has no lease")
    func restartedOldChainCannotAcknowledge() {
        let old = ChainConfig(shard: 0, epoch: 3, chain: [0, 2])
        var head = Self.replica(0, old), tail = Self.replica(2, old)
        let request = RequestID(client: 1, number: 14)
        let forward = Self.sends(head.handle(.write(request, key: "k", value: Self.value(1)), from: .client(1), now: 0))
        guard case .forward(let epoch, let u) = forward.first else { Issue.record("the head did not forward"); return }
        let actions = tail.handle(.forward(epoch: epoch, u), from: .replica(0), now: 1)
        #expect(!Self.sends(actions).contains(.written(request)), "a tail without a lease must not answer")
        #expect(!Self.sends(actions).contains { if case .ack = $0 { return true } else { return false } })
        // The coordinator, whose current epoch is newer, grants no lease for epoch 3: it sends the new configuration.
        let current = ChainConfig(shard: 0, epoch: 7, chain: [3], learner: 2)
        let reply = tail.handle(.configure(current, leaseFrom: nil), from: .coordinator, now: 2)
        #expect(reply.contains(.persistConfig(current)))
        #expect(!Self.sends(reply).contains(.written(request)))
        #expect(tail.isLearner)
    }

    @Test("a tail restarted from its persisted configuration ignores a lease its previous life was granted, so it cannot answer a read the new chain has overtaken")
    func restartedTailIgnoresPreviousLifesLease() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 2])
        let u = ChainUpdate(epoch: 1, sequence: 1, key: "k", value: Self.value(1), request: RequestID(client: 1, number: 1))
        // The tail reports at 10 and the coordinator grants a lease from 10; the tail's process is
        // killed before the grant arrives, the coordinator hears it exited (and so counts no
        // lease) and gives the chain to the head alone, which acknowledges newer writes.
        var tail = Self.replica(2, config, log: [u])
        _ = tail.tick(now: 10)
        // Its next life starts from what it persisted: the old configuration, in which it is the tail.
        var restarted = Self.replica(2, config, log: [u])
        _ = restarted.tick(now: 20)
        let taken = Self.sends(restarted.handle(.configure(config, leaseFrom: 10), from: .coordinator, now: 21))
        #expect(taken.allSatisfy { if case .report = $0 { return true } else { return false } }, "it asks for a lease of its own: \(taken)")
        #expect(!restarted.holdsLease(at: 21), "a lease granted for a report of the previous life")
        let read = RequestID(client: 3, number: 1)
        #expect(Self.sends(restarted.handle(.read(read, key: "k"), from: .client(3), now: 22)) == [.notHere(read)])
        // A lease for a report of this life is taken.
        _ = restarted.handle(.configure(config, leaseFrom: 20), from: .coordinator, now: 23)
        #expect(restarted.holdsLease(at: 24))
    }

    @Test("a rejoining replica cuts the part of its log the chain never kept, then catches up from the tail")
    func learnerTruncatesDivergentSuffix() {
        let r = { (n: UInt64) in RequestID(client: 1, number: n) }
        let common = [ChainUpdate(epoch: 1, sequence: 1, key: "a", value: [1], request: r(1)),
                      ChainUpdate(epoch: 1, sequence: 2, key: "b", value: [2], request: r(2))]
        // The old head numbered 3 in epoch 1, but it never left it; the chain numbered 3 and 4 in epoch 2.
        let divergent = common + [ChainUpdate(epoch: 1, sequence: 3, key: "a", value: [99], request: RequestID(client: 2, number: 1))]
        let chainLog = common + [ChainUpdate(epoch: 2, sequence: 3, key: "a", value: [3], request: r(3)),
                                 ChainUpdate(epoch: 2, sequence: 4, key: "c", value: [4], request: r(4))]
        let config = ChainConfig(shard: 0, epoch: 5, chain: [1], learner: 0)
        var tail = Self.replica(1, config, log: chainLog)
        var learner = ChainReplica(id: 0, shard: 0, options: Self.options, recovering: divergent, config: nil)
        guard let (join, attempt) = Self.join(in: learner.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 0)) else { return }
        let accepted = tail.handle(join, from: .replica(0), now: 1)
        #expect(Self.sends(accepted).first == .joinAccepted(epoch: 5, attempt: attempt, keep: 2, snapshotChunks: 0))
        for m in Self.sends(accepted) {
            // The learner's acknowledgements go back to the tail.
            for ack in Self.sends(learner.handle(m, from: .replica(1), now: 2)) { _ = tail.handle(ack, from: .replica(0), now: 2) }
        }
        #expect(learner.log == chainLog, "the learner's log equals the tail's")
        #expect(learner.store["a"] == [3])
        #expect(tail.tick(now: 3).contains(.send(.report(ReplicaReport(replica: 1, shard: 0, epoch: 5, sentAt: 3, lastSequence: 4, learnerCaughtUp: true, serving: true)), to: .coordinator)))
    }

    /// A tail (1) with four updates in epoch 1, and a learner (0) added in epoch 5, whose log
    /// holds the first two.
    static let learnerJoin: (log: [ChainUpdate], options: ChainReplica.Options, config: ChainConfig) = (
        (1...4 as ClosedRange<UInt64>).map { ChainUpdate(epoch: 1, sequence: $0, key: "k", value: [UInt8($0)], request: RequestID(client: 1, number: $0)) },
        ChainReplica.Options(leaseDuration: lease, retransmitInterval: 10),
        ChainConfig(shard: 0, epoch: 5, chain: [1], learner: 0))

    @Test("a learner that crashed during its join and restarted ignores the tail's answers to its previous life's request, and joins with a number of its own")
    func restartedLearnerIgnoresStaleAcceptance() {
        let (chainLog, options, config) = Self.learnerJoin
        var tail = ChainReplica(id: 1, shard: 0, options: options, recovering: chainLog, config: config)
        var learner = ChainReplica(id: 0, shard: 0, options: options, recovering: Array(chainLog.prefix(2)), config: nil)
        guard let (join, firstAttempt) = Self.join(in: learner.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 100)) else { return }
        // The tail answers the first life's join: keep 2, then updates 3 and 4 on their way.
        let answer = Self.sends(tail.handle(join, from: .replica(0), now: 101))
        guard let accepted = answer.first, case .joinAccepted(_, firstAttempt, 2, 0) = accepted else {
            Issue.record("the first join was not accepted as expected: \(answer)")
            return
        }
        // Before the answer arrives, the learner took update 3 from an earlier stream, persisted
        // it, and crashed: it restarts from its log of three, still the learner.
        var restarted = ChainReplica(id: 0, shard: 0, options: options, recovering: Array(chainLog.prefix(3)), config: config)
        let stale = restarted.handle(accepted, from: .replica(1), now: 102)
        #expect(stale.isEmpty, "the previous life's acceptance was taken: \(stale)")
        #expect(restarted.lastSequence == 3, "the log was cut to what the tail found in common with the previous life's")
        guard let (rejoin, secondAttempt) = Self.join(in: restarted.tick(now: 103), "the restarted learner did not ask to join") else { return }
        #expect(secondAttempt > firstAttempt, "the new request reuses the previous life's number")
        let fresh = Self.sends(tail.handle(rejoin, from: .replica(0), now: 104))
        #expect(fresh.first == .joinAccepted(epoch: 5, attempt: secondAttempt, keep: 3, snapshotChunks: 0))
        for m in fresh { _ = restarted.handle(m, from: .replica(1), now: 105) }
        #expect(restarted.log == chainLog)
    }

    @Test("a learner's acknowledgement from before its restart, arriving after a snapshot replaced its log, does not count it caught up; the tail streams it what the snapshot lacks")
    func staleLearnerAckIsIgnored() {
        let options = ChainReplica.Options(leaseDuration: Self.lease, retransmitInterval: 10, compactEvery: 2)
        let chainLog = (1...4 as ClosedRange<UInt64>).map {
            ChainUpdate(epoch: 1, sequence: $0, key: "k\($0)", value: [UInt8($0)], request: RequestID(client: 1, number: $0))
        }
        let config = ChainConfig(shard: 0, epoch: 5, chain: [1], learner: 0)
        var tail = ChainReplica(id: 1, shard: 0, options: options, recovering: chainLog, config: config)
        _ = Self.grant(&tail, now: 0)
        func caughtUp(_ actions: [GCSAction]) -> Bool? {
            Self.sends(actions).compactMap { if case .report(let r) = $0 { return r.learnerCaughtUp } else { return nil } }.last
        }
        // First life: the learner holds 1 and 2, keeps them, and takes 3 and 4. Of its
        // acknowledgements only the first arrives for now, and the tail folds 1 and 2.
        var learner = ChainReplica(id: 0, shard: 0, options: options, recovering: Array(chainLog.prefix(2)), config: nil)
        guard let (join, firstAttempt) = Self.join(in: learner.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 1)) else { return }
        var acks: [GCSMessage] = []
        for m in Self.sends(tail.handle(join, from: .replica(0), now: 2)) { acks += Self.sends(learner.handle(m, from: .replica(1), now: 3)) }
        #expect(acks.first == .learnerAck(epoch: 5, attempt: firstAttempt, upTo: 2))
        #expect(acks.last == .learnerAck(epoch: 5, attempt: firstAttempt, upTo: 4))
        _ = tail.handle(acks[0], from: .replica(0), now: 4)
        #expect(tail.base.sequence == 2, "the tail folded what its learner acknowledged")
        // The learner restarts from its log of four. Its new join finds 1 and 2 folded at the
        // tail: a snapshot as of 2 replaces its log, and the updates after it are lost on the way.
        var restarted = ChainReplica(id: 0, shard: 0, options: options, recovering: chainLog, config: config)
        guard let (rejoin, _) = Self.join(in: restarted.tick(now: 5), "the restarted learner did not ask to join") else { return }
        for m in Self.sends(tail.handle(rejoin, from: .replica(0), now: 6)) {
            if case .forward = m { continue }
            for ack in Self.sends(restarted.handle(m, from: .replica(1), now: 7)) { _ = tail.handle(ack, from: .replica(0), now: 7) }
        }
        #expect(restarted.lastSequence == 2, "the snapshot replaced the log")
        // The first life's last acknowledgement arrives now: it must not count.
        let stale = tail.handle(acks.last!, from: .replica(0), now: 8)
        #expect(stale.isEmpty, "the previous life's acknowledgement was taken: \(stale)")
        #expect(caughtUp(tail.tick(now: 9)) == false, "counted caught up while it lacks 3 and 4")
        // Retransmission brings 3 and 4.
        for t in stride(from: 20 as UInt64, through: 200, by: 20) {
            for m in Self.sends(tail.tick(now: t)) {
                guard case .forward = m else { continue }
                for ack in Self.sends(restarted.handle(m, from: .replica(1), now: t)) { _ = tail.handle(ack, from: .replica(0), now: t) }
            }
        }
        #expect(restarted.lastSequence == 4)
        #expect(restarted.store == tail.store)
        #expect(caughtUp(tail.tick(now: 201)) == true)
    }

    @Test("the last replica of a chain, restarted while its learner caught up, comes back in a new configuration: the learner joins again and catches up")
    func restartedLastReplicaRenewsConfiguration() {
        let (chainLog, options, config) = Self.learnerJoin
        var coordinator = Coordinator(configs: [config], replicas: [0: 0, 1: 0],
                                      options: Coordinator.Options(replicationFactor: 2, failureTimeout: 30, leaseDuration: Self.lease), now: 0)
        var tail = ChainReplica(id: 1, shard: 0, options: options, recovering: chainLog, config: config)
        var learner = ChainReplica(id: 0, shard: 0, options: options, recovering: Array(chainLog.prefix(2)), config: nil)
        guard let (join, _) = Self.join(in: learner.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 1)) else { return }
        // The tail accepts the join and dies before the updates it streams arrive.
        for m in Self.sends(tail.handle(join, from: .replica(0), now: 2)) {
            if case .joinAccepted = m { _ = learner.handle(m, from: .replica(1), now: 3) }
        }
        #expect(coordinator.replicaExited(1, now: 4).isEmpty, "the last replica is kept; the shard waits for it")
        var restarted = ChainReplica(id: 1, shard: 0, options: options, recovering: chainLog, config: config)
        /// Delivers messages between the two replicas, and ticks both, until `t` reaches `until`.
        func run(_ first: [GCSAction], from t0: UInt64, until: UInt64) {
            var queue = first.compactMap { a -> (GCSMessage, Endpoint, Endpoint)? in
                if case .send(let m, let to) = a { return (m, .coordinator, to) } else { return nil }
            }
            var t = t0
            while t < until {
                t += 1
                var next: [(GCSMessage, Endpoint, Endpoint)] = []
                func step(_ actions: [GCSAction], from: Endpoint) {
                    for case .send(let m, let to) in actions { next.append((m, from, to)) }
                }
                for (m, from, to) in queue {
                    if to == .replica(0) { step(learner.handle(m, from: from, now: t), from: .replica(0)) }
                    if to == .replica(1) { step(restarted.handle(m, from: from, now: t), from: .replica(1)) }
                }
                step(learner.tick(now: t), from: .replica(0))
                step(restarted.tick(now: t), from: .replica(1))
                queue = next
            }
        }
        // In the same configuration the restarted tail knows nothing of the join, and the
        // learner, which was accepted, never asks again: nothing moves.
        run([], from: 4, until: 200)
        #expect(learner.lastSequence == 2, "the learner took updates from a tail that forgot it")
        // The tail reports: the coordinator, which saw it exit, issues a new configuration.
        _ = coordinator.handle(Self.report(0, epoch: 5, at: 200), from: .replica(0), now: 200)
        #expect(coordinator.configs[0] == config, "a learner's report changes nothing")
        let renewed = coordinator.handle(Self.report(1, epoch: 5, at: 201, serving: true), from: .replica(1), now: 201)
        #expect(coordinator.configs[0] == ChainConfig(shard: 0, epoch: 6, chain: [1], learner: 0))
        #expect(renewed.contains(.persistConfig(coordinator.configs[0])))
        run(renewed, from: 201, until: 400)
        #expect(learner.log == chainLog, "the learner caught up in the new configuration")
        #expect(Self.sends(restarted.tick(now: 401)).contains { if case .report(let r) = $0 { return r.learnerCaughtUp } else { return false } })
    }

    @Test("a learner asks to join again only after an interval, and a join asked again gets the same answer without the stream starting over")
    func repeatedJoinIsAnsweredCheaply() {
        let (chainLog, options, config) = Self.learnerJoin
        var tail = ChainReplica(id: 1, shard: 0, options: options, recovering: chainLog, config: config)
        var learner = ChainReplica(id: 0, shard: 0, options: options, recovering: Array(chainLog.prefix(2)), config: nil)
        guard let (join, attempt) = Self.join(in: learner.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 0)) else { return }
        #expect(!Self.sends(learner.tick(now: 5)).contains(join), "asked at adoption: not again before the interval")
        #expect(Self.sends(learner.tick(now: 10)).contains(join), "no answer within the interval: the same join again")
        let first = tail.handle(join, from: .replica(0), now: 11)
        #expect(Self.sends(first).first == .joinAccepted(epoch: 5, attempt: attempt, keep: 2, snapshotChunks: 0))
        #expect(Self.forwards(first) == [3, 4])
        let again = tail.handle(join, from: .replica(0), now: 12)
        #expect(Self.sends(again) == [.joinAccepted(epoch: 5, attempt: attempt, keep: 2, snapshotChunks: 0)], "the same answer, and the stream goes on as it was")
        // A learner whose log changed asks with other ranges: that is answered as a new join.
        var restarted = ChainReplica(id: 0, shard: 0, options: options, recovering: Array(chainLog.prefix(3)), config: nil)
        guard let (other, _) = Self.join(in: restarted.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 13),
                                         "the restarted learner sent no join") else { return }
        #expect(Self.forwards(tail.handle(other, from: .replica(0), now: 14)) == [4])
    }

    static func forwards(_ actions: [GCSAction]) -> [UInt64] {
        sends(actions).compactMap { if case .forward(_, let u) = $0 { return u.sequence } else { return nil } }
    }

    @Test("a learner catching up on a long log has at most a window of updates in flight; each acknowledgement lets the next through")
    func learnerCatchUpIsWindowed() {
        let log = (1...50 as ClosedRange<UInt64>).map {
            ChainUpdate(epoch: 1, sequence: $0, key: "k\($0 % 7)", value: [UInt8($0)], request: RequestID(client: 1, number: $0))
        }
        let config = ChainConfig(shard: 0, epoch: 2, chain: [1], learner: 0)
        let options = ChainReplica.Options(leaseDuration: Self.lease, retransmitInterval: 10, window: 4)
        var tail = ChainReplica(id: 1, shard: 0, options: options, recovering: log, config: config)
        var learner = ChainReplica(id: 0, shard: 0, options: options, recovering: [], config: nil)
        guard let (join, _) = Self.join(in: learner.handle(.configure(config, leaseFrom: nil), from: .coordinator, now: 0)) else { return }
        var inFlight = tail.handle(join, from: .replica(0), now: 1)
        #expect(Self.forwards(inFlight) == [1, 2, 3, 4], "only the window goes at first")
        var delivered = 0
        while !Self.forwards(inFlight).isEmpty {
            #expect(Self.forwards(inFlight).count <= 4)
            var next: [GCSAction] = []
            for m in Self.sends(inFlight) {
                for reply in Self.sends(learner.handle(m, from: .replica(1), now: 2)) {
                    if case .learnerAck = reply { next += tail.handle(reply, from: .replica(0), now: 2) }
                }
                if case .forward = m { delivered += 1 }
            }
            inFlight = next
        }
        #expect(delivered == 50)
        #expect(learner.log == log, "the learner has the tail's whole log")
    }

    @Test("unacknowledged updates are resent only once acknowledgements stop coming, less often while none come, and not while they flow")
    func resendOnlyWithoutProgress() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1])
        let options = ChainReplica.Options(leaseDuration: Self.lease, retransmitInterval: 10)
        var head = ChainReplica(id: 0, shard: 0, options: options, recovering: [], config: config)
        for n in 1...6 as ClosedRange<UInt64> {
            _ = head.handle(.write(RequestID(client: 1, number: n), key: "k", value: [UInt8(n)]), from: .client(1), now: 0)
        }
        // The first check marks what is outstanding; at the next, nothing was acknowledged: it goes again, and the interval doubles.
        #expect(Self.forwards(head.tick(now: 10)) == [])
        #expect(Self.forwards(head.tick(now: 20)) == [1, 2, 3, 4, 5, 6])
        #expect(Self.forwards(head.tick(now: 30)) == [], "the interval doubled: the next check is at 40")
        #expect(Self.forwards(head.tick(now: 40)) == [1, 2, 3, 4, 5, 6])
        #expect(Self.forwards(head.tick(now: 70)) == [], "doubled again: the next check is at 80")
        // The tail acknowledges part of it: progress, so nothing is resent at that check, and the interval is back to 10.
        _ = head.handle(.ack(epoch: 1, 3), from: .replica(1), now: 75)
        #expect(Self.forwards(head.tick(now: 80)) == [], "acknowledgements came since the last check")
        // Then they stop (update 4 was lost): the rest goes again one interval later.
        #expect(Self.forwards(head.tick(now: 90)) == [4, 5, 6])
        // Everything acknowledged, then a long idle time: checks that find nothing outstanding earn
        // no backoff, so an update lost after it goes again within two intervals.
        _ = head.handle(.ack(epoch: 1, 6), from: .replica(1), now: 95)
        for t in stride(from: 100 as UInt64, through: 1_000, by: 10) { #expect(Self.forwards(head.tick(now: t)) == []) }
        _ = head.handle(.write(RequestID(client: 1, number: 7), key: "k", value: [7]), from: .client(1), now: 1_001)
        #expect(Self.forwards(head.tick(now: 1_010)) == [])
        #expect(Self.forwards(head.tick(now: 1_020)) == [7])
    }

    @Test("a client waits twice as long before each resend of a request that goes unanswered, up to a cap")
    func clientResendBacksOff() {
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0])
        var client = GCSClient(id: 9, shardCount: 1, resendInterval: 10, configs: [config])
        _ = client.start(.write(key: "k", value: [1]), now: 0)
        var resentAt: [UInt64] = []
        for t in stride(from: 1 as UInt64, through: 700, by: 1) where Self.sends(client.tick(now: t)).contains(where: { if case .write = $0 { true } else { false } }) {
            resentAt.append(t)
        }
        #expect(resentAt == [10, 30, 70, 150, 310, 470, 630], "10, 20, 40, 80, then 160 apart")
    }

    static func coordinator(chain: [ReplicaID], standby: [ReplicaID] = [], now: UInt64 = 0) -> Coordinator {
        var map: [ReplicaID: Int] = [:]
        for r in chain + standby { map[r] = 0 }
        return Coordinator(configs: [ChainConfig(shard: 0, epoch: 1, chain: chain)], replicas: map,
                           options: Coordinator.Options(replicationFactor: 3, failureTimeout: 30, leaseDuration: lease), now: now)
    }

    static func report(_ r: ReplicaID, epoch: UInt64, at now: UInt64, caughtUp: Bool = false, serving: Bool = false) -> GCSMessage {
        .report(ReplicaReport(replica: r, shard: 0, epoch: epoch, sentAt: now, lastSequence: 0, learnerCaughtUp: caughtUp, serving: serving))
    }

    @Test("the coordinator removes a failed head, middle or tail, and never the last replica")
    func coordinatorRemovesFailed() {
        for failed in [0, 1, 2] {
            var c = Self.coordinator(chain: [0, 1, 2], now: 0)
            // Everyone but `failed` keeps reporting; the tail is not serving, so no lease holds things up.
            var t: UInt64 = 0
            var actions: [GCSAction] = []
            while t < 400 {
                t += 10
                for r in [0, 1, 2] where r != failed { actions += c.handle(Self.report(r, epoch: c.configs[0].epoch, at: t), from: .replica(r), now: t) }
                actions += c.tick(now: t)
            }
            #expect(c.configs[0].chain == [0, 1, 2].filter { $0 != failed }, "failed \(failed)")
            #expect(actions.contains(.persistConfig(c.configs[0])))
        }
        var alone = Self.coordinator(chain: [4])
        _ = alone.tick(now: 1_000)
        #expect(alone.configs[0].chain == [4], "the last replica stays; the shard waits for it")
    }

    @Test("the coordinator waits out the lease of a suspected tail before replacing it, unless its process is known to have exited")
    func coordinatorWaitsForLease() {
        var c = Self.coordinator(chain: [0, 1], now: 190)
        _ = c.handle(Self.report(0, epoch: 1, at: 200), from: .replica(0), now: 200)
        _ = c.handle(Self.report(1, epoch: 1, at: 200, serving: true), from: .replica(1), now: 200)  // granted at 200
        for t in stride(from: 210 as UInt64, through: 290, by: 10) { _ = c.handle(Self.report(0, epoch: 1, at: t), from: .replica(0), now: t) }
        _ = c.tick(now: 295)  // 1 silent for 95 > 30, but its lease runs to 300
        #expect(c.configs[0].chain == [0, 1])
        _ = c.handle(Self.report(0, epoch: 1, at: 301), from: .replica(0), now: 301)
        #expect(c.configs[0].chain == [0])

        var d = Self.coordinator(chain: [0, 1], now: 0)
        _ = d.handle(Self.report(1, epoch: 1, at: 5, serving: true), from: .replica(1), now: 5)
        _ = d.replicaExited(1, now: 6)
        #expect(d.configs[0].chain == [0], "an exited process holds no lease")
    }

    @Test("the coordinator adds a standby as learner, and promotes it to tail with a handoff once it caught up")
    func coordinatorAddsAndPromotes() {
        var c = Self.coordinator(chain: [0, 1], standby: [5])
        _ = c.handle(Self.report(5, epoch: 0, at: 1), from: .replica(5), now: 1)
        #expect(c.configs[0].learner == 5 && c.configs[0].epoch == 2)
        _ = c.handle(Self.report(5, epoch: 2, at: 2), from: .replica(5), now: 2)
        _ = c.handle(Self.report(1, epoch: 2, at: 3, caughtUp: true, serving: true), from: .replica(1), now: 3)
        #expect(c.configs[0] == ChainConfig(shard: 0, epoch: 3, chain: [0, 1, 5], handoffFrom: 1))
        // No lease for the new tail until it reports serving, i.e. after the handoff.
        let early = c.handle(Self.report(5, epoch: 3, at: 4), from: .replica(5), now: 4)
        #expect(early == [], "a replica with the current configuration and no lease to take is not answered")
        let served = c.handle(Self.report(5, epoch: 3, at: 5, serving: true), from: .replica(5), now: 5)
        #expect(served == [.send(.configure(c.configs[0], leaseFrom: 5), to: .replica(5))])
    }

    @Test("after a chain loses a replica, a standby joins as learner only once learnerDelay has passed")
    func coordinatorDelaysLearner() {
        var c = Coordinator(configs: [ChainConfig(shard: 0, epoch: 1, chain: [0, 1, 2])], replicas: [0: 0, 1: 0, 2: 0, 5: 0],
                            options: Coordinator.Options(replicationFactor: 3, failureTimeout: 30, leaseDuration: Self.lease, learnerDelay: 50), now: 0)
        for r in [1, 2, 5] { _ = c.handle(Self.report(r, epoch: r == 5 ? 0 : 1, at: 100), from: .replica(r), now: 100) }
        #expect(c.configs[0].learner == nil, "a full chain takes no learner")
        _ = c.replicaExited(0, now: 100)
        #expect(c.configs[0] == ChainConfig(shard: 0, epoch: 2, chain: [1, 2]), "the dead head is removed at once")
        for t in stride(from: 101 as UInt64, through: 149, by: 4) {
            for r in [1, 2, 5] { _ = c.handle(Self.report(r, epoch: 2, at: t), from: .replica(r), now: t) }
            _ = c.tick(now: t)
        }
        #expect(c.configs[0].learner == nil && c.configs[0].epoch == 2, "no learner within 50 of the removal")
        let joined = c.tick(now: 150)
        #expect(c.configs[0] == ChainConfig(shard: 0, epoch: 3, chain: [1, 2], learner: 5))
        #expect(joined.contains(.send(.configure(c.configs[0], leaseFrom: nil), to: .replica(5))))
    }

    @Test("keys route to shards by FNV-1a, the same in every process")
    func shardRouting() {
        #expect(shard(of: "", shards: 1_000_003) == Int(UInt64(0xcbf2_9ce4_8422_2325) % 1_000_003))
        #expect(shard(of: "a", shards: 1 << 32) == Int(UInt64(0xaf63_dc4c_8601_ec8c) % (1 << 32)))
        let counts = (0..<4_000).reduce(into: [0, 0, 0, 0]) { c, i in c[shard(of: "object-\(i)", shards: 4)] += 1 }
        #expect(counts.allSatisfy { $0 > 800 }, "keys spread over the shards: \(counts)")
    }

    @Test("a client turned away asks the coordinator, then resends to the new head with the same request ID")
    func clientFollowsReconfiguration() {
        var client = GCSClient(id: 9, shardCount: 1, resendInterval: 10, configs: [ChainConfig(shard: 0, epoch: 1, chain: [0, 1])])
        let first = client.start(.write(key: "k", value: [1]), now: 0)
        let request = RequestID(client: 9, number: 1)
        #expect(first == [.send(.write(request, key: "k", value: [1]), to: .replica(0))])
        #expect(client.handle(.notHere(request), now: 1).actions == [.send(.configQuery, to: .coordinator)])
        let resent = client.handle(.configs([ChainConfig(shard: 0, epoch: 2, chain: [1])]), now: 2).actions
        #expect(resent == [.send(.write(request, key: "k", value: [1]), to: .replica(1))])
        #expect(client.handle(.written(request), now: 3).outcome == .written)
        #expect(client.outstanding == nil)
    }

    @Test("a subscriber takes each change once, in order, and waits for a resend after a gap")
    func subscriberOrder() {
        var s = GCSSubscriber(id: 50, prefix: "obj/", shardCount: 1, resubscribeInterval: 100)
        let u = { (n: UInt64) in ChainUpdate(epoch: 1, sequence: n, key: "obj/\(n)", value: [UInt8(n)], request: RequestID(client: 1, number: n)) }
        #expect(s.handle(.change(shard: 0, u(3), previous: 1), from: .replica(2), now: 0).changes == [], "change 1 is missing")
        #expect(s.handle(.change(shard: 0, u(1), previous: 0), from: .replica(2), now: 0).changes == [u(1)])
        #expect(s.handle(.change(shard: 0, u(1), previous: 0), from: .replica(2), now: 0).changes == [], "a duplicate")
        #expect(s.handle(.change(shard: 0, u(3), previous: 1), from: .replica(2), now: 0).changes == [u(3)])
        #expect(s.lastSeen == [3])
    }

    @Test("10,000 seeds of the whole GCS: lossy network, replica and coordinator crashes, partitions, compaction; linearizable, nothing acknowledged lost, subscriptions exact")
    func simulation() {
        let base = SeededGenerator.seed(fromEnvironment: "CAIRN_GCS_SEED")
        print("GCS simulation base seed: \(base) (replay all with CAIRN_GCS_SEED=\(base); each failing seed prints its own command)")
        let runs = 10_000
        let workers = 2
        let tallies = Tallies(workers)
        DispatchQueue.concurrentPerform(iterations: workers) { w in
            var t = Tally()
            for i in stride(from: w, to: runs, by: workers) {
                let outcome = GCSSimulation.run(.init(seed: base &+ UInt64(i)))
                t.crashes += outcome.crashes
                t.reconfigurations += outcome.reconfigurations
                t.partitions += outcome.partitions
                t.completed += outcome.completed
                t.compactions += outcome.compactions
                t.snapshotInstalls += outcome.snapshotInstalls
                t.subscriberSnapshots += outcome.subscriberSnapshots
                if !outcome.passed { t.failures.append("seed \(outcome.seed): \(outcome.failures.joined(separator: "; ")); replay: \(outcome.replay)") }
            }
            tallies.set(w, t)
        }
        let total = tallies.sum()
        let (failures, crashes, reconfigurations, partitions, completed) = (total.failures, total.crashes, total.reconfigurations, total.partitions, total.completed)
        for f in failures.prefix(5) { Issue.record(Comment(rawValue: f)) }
        #expect(failures.isEmpty)
        #expect(crashes > runs, "the runs crashed replicas (\(crashes))")
        #expect(partitions > runs / 2, "the runs cut replicas off (\(partitions))")
        #expect(reconfigurations > runs * 3, "the coordinator reconfigured chains (\(reconfigurations))")
        #expect(completed == runs * 76, "every operation completed once the faults stopped")
        #expect(total.compactions > runs, "replicas compacted their logs (\(total.compactions))")
        #expect(total.snapshotInstalls > runs / 10, "learners installed snapshots (\(total.snapshotInstalls))")
        #expect(total.subscriberSnapshots > runs / 10, "subscribers took snapshots (\(total.subscriberSnapshots) keys)")
    }
}

struct Tally {
    var failures: [String] = []
    var crashes = 0, reconfigurations = 0, partitions = 0, completed = 0
    var compactions = 0, snapshotInstalls = 0, subscriberSnapshots = 0
}

/// One slot per worker, each written by its worker only, read after they all finish.
final class Tallies: @unchecked Sendable {
    private var slots: [Tally]
    private let lock = NSLock()
    init(_ n: Int) { slots = Array(repeating: Tally(), count: n) }
    func set(_ i: Int, _ t: Tally) { lock.withLock { slots[i] = t } }
    func sum() -> Tally {
        lock.withLock {
            slots.reduce(into: Tally()) { s, t in
                s.failures += t.failures
                s.crashes += t.crashes
                s.reconfigurations += t.reconfigurations
                s.partitions += t.partitions
                s.completed += t.completed
                s.compactions += t.compactions
                s.snapshotInstalls += t.snapshotInstalls
                s.subscriberSnapshots += t.subscriberSnapshots
            }
        }
    }
}

/// Compaction, driven by hand: a small synchronous network between cores, and a disk per replica
/// that applies the persist actions as a shell does.
@Suite("GCS compaction (pure): bases, snapshots for learners and subscribers, restarts")
struct GCSCompactionTests {
    struct Disk {
        var log: [ChainUpdate] = []
        var snapshot: ChainSnapshot?
        var config: ChainConfig?
        var compactions: [ChainCompaction] = []
        var installs = 0

        mutating func apply(_ actions: [GCSAction]) {
            for a in actions {
                switch a {
                case .persist(let u): log.append(u)
                case .persistTruncation(let keep): log.removeAll { $0.sequence > keep }
                case .persistConfig(let c): config = c
                case .persistCompaction(let c):
                    var store = snapshot?.store ?? [:]
                    for (key, value) in c.changes { store[key] = value }
                    snapshot = ChainSnapshot(base: c.base, store: store)
                    log.removeAll { $0.sequence <= c.base.sequence }
                    compactions.append(c)
                case .persistSnapshot(let s):
                    snapshot = s
                    log = []
                    installs += 1
                case .send: break
                }
            }
        }
    }

    struct Net {
        var replicas: [ReplicaID: ChainReplica]
        var disks: [ReplicaID: Disk] = [:]
        /// Messages to clients, in order.
        var toClients: [(GCSMessage, from: Endpoint)] = []
        /// Drops the messages this returns true for.
        var drop: (GCSMessage) -> Bool = { _ in false }

        init(_ replicas: [ChainReplica]) {
            self.replicas = Dictionary(uniqueKeysWithValues: replicas.map { ($0.id, $0) })
            for r in replicas { disks[r.id] = Disk(config: r.config) }
        }

        /// Runs `actions` of `from`, then everything they cause, to quiescence.
        mutating func run(_ actions: [GCSAction], from: Endpoint, now: UInt64) {
            var queue: [(GCSAction, Endpoint)] = actions.map { ($0, from) }
            while !queue.isEmpty {
                let (action, sender) = queue.removeFirst()
                if case .replica(let r) = sender { disks[r]!.apply([action]) }
                guard case .send(let m, let to) = action else { continue }
                if drop(m) { continue }
                switch to {
                case .replica(let r):
                    guard replicas[r] != nil else { continue }
                    queue += replicas[r]!.handle(m, from: sender, now: now).map { ($0, to) }
                case .client:
                    toClients.append((m, sender))
                case .coordinator:
                    break
                }
            }
        }

        mutating func deliver(_ m: GCSMessage, from: Endpoint, to r: ReplicaID, now: UInt64) {
            let actions = replicas[r]!.handle(m, from: from, now: now)
            run(actions, from: .replica(r), now: now)
        }

        mutating func grant(_ r: ReplicaID, now: UInt64) {
            deliver(.configure(replicas[r]!.config!, leaseFrom: now), from: .coordinator, to: r, now: now)
        }

        mutating func write(_ n: UInt64, key: String, client: Int = 7, now: UInt64) {
            let head = replicas.values.first { $0.isHead }!.id
            deliver(.write(RequestID(client: client, number: n), key: key, value: [UInt8(truncatingIfNeeded: n)]), from: .client(client), to: head, now: now)
        }
    }

    static func fold(_ updates: [ChainUpdate]) -> [String: [UInt8]] {
        var store: [String: [UInt8]] = [:]
        for u in updates { store[u.key] = u.value }
        return store
    }

    @Test("a chain folds committed updates into its base and keeps the newest in its log; a replica restarted from what it persisted has the same store")
    func compactionKeepsStore() {
        let options = ChainReplica.Options(leaseDuration: 1_000, compactEvery: 4, retain: 2)
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0, 1, 2])
        var net = Net([0, 1, 2].map { ChainReplica(id: $0, shard: 0, options: options, recovering: [], config: config) })
        net.grant(2, now: 0)
        net.write(1, key: "solo", client: 8, now: 1)
        var expected: [String: [UInt8]] = ["solo": [1]]
        for n in 1...40 as ClosedRange<UInt64> {
            net.write(n, key: "k\(n % 5)", now: 1)
            expected["k\(n % 5)"] = [UInt8(n)]
        }
        #expect(net.toClients.filter { if case .written = $0.0 { return true } else { return false } }.count == 41, "every write answered")
        for r in 0...2 {
            let replica = net.replicas[r]!
            #expect(replica.store == expected, "replica \(r)'s store")
            #expect(replica.lastSequence == 41)
            #expect(replica.base.sequence >= 41 - 4 - 2 - 1, "replica \(r) folded all but the newest updates (base \(replica.base.sequence))")
            #expect(replica.log.count == Int(41 - replica.base.sequence))
            let disk = net.disks[r]!
            #expect(disk.compactions.allSatisfy { $0.base.sequence - $0.previous >= 4 }, "folds at least compactEvery updates at a time")
            #expect(disk.log.count == replica.log.count, "the persisted log holds only what is after the base")
            let restarted = ChainReplica(id: r, shard: 0, options: options, recovering: disk.log, config: disk.config, snapshot: disk.snapshot)
            #expect(restarted.store == expected, "replica \(r) restarted from its base and log")
            #expect(restarted.lastSequence == 41)
        }
        // The head still recognises a retried write that was folded into its base, also after a restart.
        let disk = net.disks[0]!
        net.replicas[0] = ChainReplica(id: 0, shard: 0, options: options, recovering: disk.log, config: disk.config, snapshot: disk.snapshot)
        net.grant(2, now: 2)
        net.toClients = []
        net.deliver(.write(RequestID(client: 8, number: 1), key: "solo", value: [99]), from: .client(8), to: 0, now: 2)
        #expect(net.toClients.map(\.0) == [.written(RequestID(client: 8, number: 1))])
        #expect(net.replicas[0]!.store["solo"] == [1], "the retry was not applied again")
        #expect(net.replicas[0]!.lastSequence == 41)
    }

    @Test("a learner whose missing updates were compacted installs the tail's snapshot in parts, asks again when a part is lost, and catches up")
    func learnerInstallsSnapshot() {
        let options = ChainReplica.Options(leaseDuration: 50, compactEvery: 2, retain: 0, snapshotChunkBytes: 3)
        let first = ChainConfig(shard: 0, epoch: 1, chain: [1])
        var net = Net([ChainReplica(id: 1, shard: 0, options: options, recovering: [], config: first),
                       ChainReplica(id: 0, shard: 0, options: options)])
        net.grant(1, now: 0)
        for n in 1...12 as ClosedRange<UInt64> { net.write(n, key: "key\(n % 4)", now: 1) }
        let tailBase = net.replicas[1]!.base.sequence
        #expect(tailBase >= 10, "the tail compacted (base \(tailBase))")

        // The learner joins; the first snapshot's second part is lost.
        let joining = ChainConfig(shard: 0, epoch: 2, chain: [1], learner: 0)
        var lost = 0
        var firstAttempt: UInt64?
        net.drop = { m in
            guard case .snapshotChunk(_, let attempt, let index, _, _) = m else { return false }
            if firstAttempt == nil { firstAttempt = attempt }
            if attempt == firstAttempt, index == 1 { lost += 1; return true }
            return false
        }
        net.deliver(.configure(joining, leaseFrom: 2), from: .coordinator, to: 1, now: 2)
        net.deliver(.configure(joining, leaseFrom: nil), from: .coordinator, to: 0, now: 2)
        #expect(lost == 1)
        #expect(net.replicas[0]!.lastSequence == 0, "nothing installed from an incomplete snapshot")
        // The learner's tick asks again only once the parts have stalled for a lease.
        net.run(net.replicas[0]!.tick(now: 10), from: .replica(0), now: 10)
        #expect(net.replicas[0]!.lastSequence == 0)
        net.run(net.replicas[0]!.tick(now: 60), from: .replica(0), now: 60)
        #expect(net.disks[0]!.installs == 1, "the second attempt installed the snapshot")
        // The updates after the base arrive with the tail's retransmissions.
        for t in [61, 62, 63] as [UInt64] { net.run(net.replicas[1]!.tick(now: t), from: .replica(1), now: t) }
        let learner = net.replicas[0]!, tail = net.replicas[1]!
        #expect(learner.lastSequence == tail.lastSequence)
        #expect(learner.store == tail.store)
        #expect(learner.base.sequence == tailBase)
        #expect(net.replicas[1]!.tick(now: 64).contains(.send(.report(ReplicaReport(
            replica: 1, shard: 0, epoch: 2, sentAt: 64, lastSequence: 12, base: tailBase, learnerCaughtUp: true, serving: true)), to: .coordinator)))
        let disk = net.disks[0]!
        let restarted = ChainReplica(id: 0, shard: 0, options: options, recovering: disk.log, config: disk.config, snapshot: disk.snapshot)
        #expect(restarted.store == tail.store, "the learner persisted its snapshot and the log after it")
    }

    @Test("a subscriber takes a snapshot that starts before its last change (a repeated subscription) and acknowledges an old one without delivering it")
    func subscriberSnapshotOrder() {
        var s = GCSSubscriber(id: 50, prefix: "", shardCount: 1, resubscribeInterval: 100)
        let change = ChainUpdate(epoch: 1, sequence: 3, key: "a", value: [3], request: RequestID(client: 1, number: 1))
        #expect(s.handle(.change(shard: 0, change, previous: 0), from: .replica(2), now: 0).changes == [change])
        let taken = s.handle(.snapshot(shard: 0, upTo: 9, epoch: 1, entries: ["a": [7], "b": [8]], previous: 0), from: .replica(2), now: 1)
        #expect(taken.changes.map(\.key) == ["a", "b"] && taken.changes.allSatisfy { $0.sequence == 9 && $0.request.client < 0 })
        #expect(taken.actions == [.send(.changeAck(upTo: 9), to: .replica(2))])
        #expect(s.lastSeen == [9])
        let old = s.handle(.snapshot(shard: 0, upTo: 5, epoch: 1, entries: ["a": [5]], previous: 0), from: .replica(2), now: 2)
        #expect(old.changes.isEmpty && old.actions == [.send(.changeAck(upTo: 9), to: .replica(2))], "an older snapshot is only acknowledged")
    }

    @Test("a subscriber that starts before the tail's compacted base gets every key's value as of the base, then each change after it")
    func subscriberGetsSnapshot() {
        let options = ChainReplica.Options(leaseDuration: 1_000, compactEvery: 3, retain: 1)
        let config = ChainConfig(shard: 0, epoch: 1, chain: [0])
        var net = Net([ChainReplica(id: 0, shard: 0, options: options, recovering: [], config: config)])
        net.grant(0, now: 0)
        for n in 1...10 as ClosedRange<UInt64> { net.write(n, key: n % 3 == 0 ? "other" : "obj/\(n % 4)", now: 1) }
        let base = net.replicas[0]!.base.sequence
        #expect(base > 0 && base < 10)
        var subscriber = GCSSubscriber(id: 50, prefix: "obj/", shardCount: 1, resubscribeInterval: 100)
        net.toClients = []
        net.run(subscriber.handle(.configs([config]), from: .coordinator, now: 2).actions, from: .client(50), now: 2)
        var view: [String: [UInt8]] = [:]
        var fromSnapshot = 0
        while !net.toClients.isEmpty {
            let (m, from) = net.toClients.removeFirst()
            let (changes, actions) = subscriber.handle(m, from: from, now: 3)
            for u in changes {
                view[u.key] = u.value
                if u.request.client < 0 { fromSnapshot += 1 }
            }
            net.run(actions, from: .client(50), now: 3)
        }
        #expect(fromSnapshot > 0, "the subscriber was sent a snapshot")
        #expect(view == net.replicas[0]!.store.filter { $0.key.hasPrefix("obj/") })
        #expect(subscriber.lastSeen == [10])
        // Later changes follow the snapshot.
        net.write(11, key: "obj/new", now: 4)
        let change = net.toClients.first { if case .change = $0.0 { return true } else { return false } }
        #expect(change.map { subscriber.handle($0.0, from: $0.from, now: 4).changes.map(\.key) } == ["obj/new"])
    }
}
