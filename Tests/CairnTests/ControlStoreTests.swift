@testable import Cairn
import CairnChaosKit
import CairnCodec
import func CairnGCS.shard
import Foundation
import Testing

/// The control store's core, driven by hand: requests and committed rows in, actions out.
@Suite("Control store (pure): answers from committed rows")
struct ControlStoreCoreTests {
    let driver = Endpoint.node(NodeID(0))
    let aid = ActorID(raw: 42)

    func record(_ state: ActorStatus.State, node: Int = 2) -> ActorRecord {
        var r = ActorRecord(id: aid, typeName: "Counter", node: NodeID(node))
        r.state = state
        return r
    }

    /// Commits every write among `actions` (as the GCS would, in order) and returns what followed.
    func commitWrites(_ actions: [ControlStoreCore.Action], _ core: inout ControlStoreCore) -> [ControlStoreCore.Action] {
        var out: [ControlStoreCore.Action] = []
        for case .write(let key, let value) in actions { out += core.committed(key: key, value: value) }
        return out
    }

    func sends(_ actions: [ControlStoreCore.Action]) -> [(Message, Endpoint)] {
        actions.compactMap { if case .send(let m, let e) = $0 { return (m, e) } else { return nil } }
    }

    func location(_ actions: [ControlStoreCore.Action]) -> NodeID?? {
        for (m, _) in sends(actions) { if case .actorLocation(_, let node, _) = m { return .some(node) } }
        return nil
    }

    /// The scheduler incarnations announced to nodes by `actions`.
    func announced(_ actions: [ControlStoreCore.Action]) -> [UInt64] {
        sends(actions).compactMap { if case .schedulerAt(_, let i) = $0.0 { return i } else { return nil } }
    }

    @Test("a scheduler registered while another is active is a standby; the newest standby takes over when the active one is lost")
    func standbySchedulerTakesOver() {
        var core = ControlStoreCore()
        _ = core.handle(.subscribeNodes(driver))
        #expect(announced(core.handle(.registerScheduler(address: "h:1", incarnation: 1))) == [1])
        #expect(announced(core.handle(.registerScheduler(address: "h:2", incarnation: 2))) == [], "a standby is not announced")
        #expect(announced(core.handle(.registerScheduler(address: "h:3", incarnation: 3))) == [])
        #expect(core.schedulerTable == [SchedulerStatus(address: "h:1", active: true), SchedulerStatus(address: "h:3", active: false),
                                        SchedulerStatus(address: "h:2", active: false)])
        // A standby lost is only forgotten; the active one lost hands over to the newest standby.
        #expect(announced(core.handle(.schedulerLost(incarnation: 3))) == [])
        #expect(announced(core.handle(.schedulerLost(incarnation: 1))) == [2])
        #expect(announced(core.handle(.schedulerLost(incarnation: 1))) == [], "a loss is reported once")
        // A lost incarnation never comes back; with no standby left, the next one registered is active.
        #expect(announced(core.handle(.registerScheduler(address: "h:1", incarnation: 1))) == [])
        #expect(announced(core.handle(.schedulerLost(incarnation: 2))) == [])
        #expect(core.schedulerTable.isEmpty)
        #expect(announced(core.handle(.registerScheduler(address: "h:4", incarnation: 4))) == [4])
        // A node subscribing later learns the active one.
        #expect(announced(core.handle(.subscribeNodes(.node(NodeID(5))))) == [4])
    }

    @Test("a read of a row written but not yet committed waits for the commit, then sees the write")
    func readYourWrites() {
        var core = ControlStoreCore()
        let writes = core.handle(.registerActor(record(.alive)))
        #expect(writes.count == 1, "registering an actor is one row write")
        #expect(sends(core.handle(.describeActor(aid, replyTo: driver))).isEmpty, "the row is not committed yet")
        #expect(location(core.handle(.lookupActor(aid, replyTo: driver))) == nil, "neither is a lookup answered")
        let answers = commitWrites(writes, &core)
        #expect(sends(answers).count == 2, "both parked reads are answered once the row is committed")
        #expect(location(answers) == .some(NodeID(2)))
        let described = sends(answers).contains { if case .actorDescription(_, let r) = $0.0 { return r?.node == NodeID(2) } else { return false } }
        #expect(described)
    }

    @Test("a lookup of an actor being restored waits until its row says alive (then its node) or dead (then none)")
    func restoringActorLookup() {
        for final in [ActorStatus.State.alive, .dead] {
            var core = ControlStoreCore()
            _ = commitWrites(core.handle(.registerActor(record(.restoring))), &core)
            #expect(location(core.handle(.lookupActor(aid, replyTo: driver))) == nil, "a restoring actor is not reported missing")
            // Describing a restoring actor is answered at once: the state is what is asked.
            #expect(sends(core.handle(.describeActor(aid, replyTo: driver))).count == 1)
            let answers = commitWrites(core.handle(.registerActor(record(final, node: 3))), &core)
            #expect(location(answers) == .some(final == .alive ? NodeID(3) : nil), "restored \(final)")
        }
    }

    @Test("an actor the tables have never had is answered at once with no node")
    func unknownActor() {
        var core = ControlStoreCore()
        #expect(location(core.handle(.lookupActor(aid, replyTo: driver))) == .some(nil))
    }

    @Test("progress reports update the newest written record, not a stale committed one")
    func progressOnNewest() throws {
        var core = ControlStoreCore()
        _ = core.handle(.registerActor(record(.alive)))
        // The registration is still in flight when the first progress report arrives.
        let progress = core.handle(.actorProgress(aid, checkpoint: 7, log: 9))
        guard case .write(_, let value)? = progress.first, let bytes = value else {
            Issue.record("a progress report writes the actor's row")
            return
        }
        let row = try BinaryDecoder().decode(ActorRecord.self, from: bytes)
        #expect(row.state == .alive && row.checkpointSequence == 7 && row.logPosition == 9 && row.typeName == "Counter")
    }

    @Test("a restarted store answers nothing until its catch-up markers come back, then answers from the replayed rows")
    func catchUp() throws {
        // A first incarnation writes an actor and an object's location.
        var first = ControlStoreCore()
        var history: [(String, [UInt8]?)] = []
        for case .write(let k, let v) in first.handle(.registerActor(record(.alive))) + first.handle(.objectLocations([(ObjectID(raw: 5), NodeID(1), size: 1 << 20)])) {
            history.append((k, v))
        }
        // The second starts with one marker, and requests arrive before the replay.
        var second = ControlStoreCore(markers: [ControlTables.marker(0): [9]])
        #expect(!second.ready)
        #expect(second.markerWrites.count == 1)
        #expect(second.handle(.lookupActor(aid, replyTo: driver)).isEmpty)
        #expect(second.handle(.locateObject(ObjectID(raw: 5), replyTo: driver)).isEmpty)
        for (k, v) in history { #expect(second.committed(key: k, value: v).isEmpty, "replayed rows answer nothing yet") }
        // An older incarnation's marker value is not this one's.
        #expect(second.committed(key: ControlTables.marker(0), value: [8]).isEmpty && !second.ready)
        let answers = second.committed(key: ControlTables.marker(0), value: [9])
        #expect(second.ready)
        #expect(location(answers) == .some(NodeID(2)), "the actor's node, from the replayed row")
        let located = sends(answers).contains { if case .objectLocation(_, let l) = $0.0 { return l == ObjectLocation(node: NodeID(1), size: 1 << 20) } else { return false } }
        #expect(located, "the object's location, from the replayed row")
        // The shell's markers: in every subscribed table (each comes back through a subscription
        // of its own, in no order across tables), one per shard, each holding the generation.
        let markers = ControlTables.markers(shards: 4, generation: 7)
        #expect(markers.count == 4 * ControlTables.subscribed.count)
        for prefix in ControlTables.subscribed {
            let keys = markers.keys.filter { $0.hasPrefix(prefix) }
            #expect(Set(keys.map { shard(of: $0, shards: 4) }) == [0, 1, 2, 3] && keys.count == 4, "\(prefix): \(keys)")
        }
        #expect(markers.values.allSatisfy { $0 == [0, 0, 0, 0, 0, 0, 0, 7] })
        #expect(markers.keys.allSatisfy(ControlTables.isMarker) && !ControlTables.isMarker(ControlTables.node(NodeID(3))))
        // A node-table marker that comes back after the store caught up (seen again) is no row.
        var caught = ControlStoreCore(markers: [ControlTables.marker(0, in: GCSTable.nodes.rawValue): [9]])
        _ = caught.committed(key: ControlTables.marker(0, in: GCSTable.nodes.rawValue), value: [9])
        #expect(caught.ready)
        #expect(caught.committed(key: ControlTables.marker(0, in: GCSTable.nodes.rawValue), value: [8]).isEmpty && caught.nodeTable.isEmpty)
    }

    @Test("the first store of a new cluster deletes the node, actor, object and task rows a previous cluster left before answering; other rows stay")
    func newClusterClearsPreviousTables() throws {
        // A previous cluster left a node, an actor, an object's location and a task record.
        var first = ControlStoreCore()
        var history: [(String, [UInt8]?)] = []
        let previous = first.handle(.registerNode(NodeRecord(id: NodeID(3), resources: Resources(cpus: 1), functions: nil, queued: 0, alive: true)))
            + first.handle(.registerActor(record(.alive)))
            + first.handle(.objectLocations([(ObjectID(raw: 5), NodeID(1), size: 1 << 20)]))
        for case .write(let k, let v) in previous { history.append((k, v)) }
        #expect(history.count == 3)
        let kept = GCSTable.storage.key("actor-ns/journal-1")

        // A restarted store of the same cluster keeps them; a new cluster's first store deletes them.
        for startsNewCluster in [false, true] {
            var core = ControlStoreCore(markers: [ControlTables.marker(0): [9]], startsNewCluster: startsNewCluster)
            #expect(core.handle(.lookupActor(aid, replyTo: driver)).isEmpty)
            for (k, v) in history { _ = core.committed(key: k, value: v) }
            _ = core.committed(key: kept, value: [1, 2, 3])
            let caughtUp = core.committed(key: ControlTables.marker(0), value: [9])
            let deletes = caughtUp.compactMap { if case .write(let k, nil) = $0 { return k } else { return nil } }
            if !startsNewCluster {
                #expect(core.ready && deletes.isEmpty)
                #expect(location(caughtUp) == .some(NodeID(2)), "the actor, from the replayed row")
                continue
            }
            #expect(Set(deletes) == Set(history.map(\.0)), "every table row, and nothing else: \(deletes)")
            #expect(!core.ready && location(caughtUp) == nil, "nothing is answered before the deletions are committed")
            // A deletion the GCS gave up on is asked again.
            let again = core.writeFailed(key: deletes[0], value: nil)
            #expect(again.contains { if case .write(let k, nil) = $0 { return k == deletes[0] } else { return false } })
            var answers: [ControlStoreCore.Action] = []
            for key in deletes { answers += core.committed(key: key, value: nil) }
            #expect(core.ready)
            #expect(location(answers) == .some(nil), "the actor is unknown to the new cluster, so spawning its name again restores it")
            #expect(core.nodeTable.isEmpty && core.actors.isEmpty)
        }
    }

    @Test("a store has caught up only when every table's marker is back: a node row that comes after the control table's marker is still cleared before any answer")
    func catchUpWaitsForEveryTable() throws {
        let control = ControlTables.marker(0)
        let nodes = ControlTables.marker(0, in: GCSTable.nodes.rawValue)
        var core = ControlStoreCore(markers: [control: [9], nodes: [9]], startsNewCluster: true)
        #expect(core.handle(.subscribeNodes(driver)).isEmpty)
        // The control table's subscription is ahead of the node table's.
        #expect(core.committed(key: control, value: [9]).isEmpty && !core.ready)
        var old = ControlStoreCore()
        let row = old.handle(.registerNode(NodeRecord(id: NodeID(1), resources: Resources(cpus: 1), functions: nil, queued: 0, alive: true, address: "127.0.0.1:1")))
        for case .write(let k, let v) in row { _ = core.committed(key: k, value: v) }
        let caughtUp = core.committed(key: nodes, value: [9])
        #expect(caughtUp.contains { if case .write(let k, nil) = $0 { return k == ControlTables.node(NodeID(1)) } else { return false } })
        #expect(!core.ready && sends(caughtUp).isEmpty, "no node table goes out with the dead cluster's node in it")
        let answers = core.committed(key: ControlTables.node(NodeID(1)), value: nil)
        #expect(core.ready)
        let tables = sends(answers).compactMap { if case .nodeTable(let t) = $0.0 { return t } else { return nil } }
        #expect(tables.count == 1 && tables.allSatisfy(\.isEmpty), "the waiting subscriber gets the new cluster's (empty) table: \(tables)")
    }

    @Test("node table: only committed nodes are pushed, in node order, with their latest load; load alone writes nothing")
    func nodeTable() {
        var core = ControlStoreCore()
        let sched = Endpoint.scheduler
        let initial = sends(core.handle(.subscribeNodes(sched)))
        guard case .nodeTable(let empty)? = initial.first?.0 else { Issue.record("a subscriber gets the table at once"); return }
        #expect(empty.isEmpty)
        var writes: [ControlStoreCore.Action] = []
        for n in [2, 0, 1] { writes += core.handle(.registerNode(NodeRecord(id: NodeID(n), resources: Resources(cpus: 1), functions: nil, queued: 0, alive: true))) }
        #expect(core.flush().isEmpty, "nothing committed, nothing pushed")
        _ = commitWrites(writes, &core)
        guard case .nodeTable(let table)? = sends(core.flush()).first?.0 else { Issue.record("the committed nodes are pushed"); return }
        #expect(table.map(\.id) == [NodeID(0), NodeID(1), NodeID(2)])
        let load = core.handle(.reportLoad(NodeID(1), queued: 17))
        #expect(load.isEmpty, "a load report is soft state: no row write")
        guard case .nodeTable(let loaded)? = sends(core.flush()).first?.0 else { Issue.record("a load change is pushed"); return }
        #expect(loaded[1].queued == 17)
        #expect(core.flush().isEmpty, "pushed once per change")
    }

    /// A core with nodes 1 to `count` committed (node `n` offering `far` = 1 when `far` holds it)
    /// and a durable actor, restorable elsewhere and needing `far`, registered alive on node 1.
    func coreWithDurableActor(nodes count: Int, far: Set<Int>, replacementsExpected: Bool) -> ControlStoreCore {
        var core = ControlStoreCore(replacementsExpected: replacementsExpected)
        for n in 1...count {
            let resources = Resources(cpus: 1, custom: far.contains(n) ? ["far": 1] : [:])
            _ = commitWrites(core.handle(.registerNode(NodeRecord(id: NodeID(n), resources: resources, functions: nil, queued: 0, alive: true))), &core)
        }
        var r = record(.alive, node: 1)
        r.name = "bank"
        r.relocation = ActorRelocation(durability: WireDurability(DurableSpawn(name: "bank", options: DurabilityOptions())),
                                       resources: Resources(cpus: 0, custom: ["far": 1]))
        _ = commitWrites(core.handle(.registerActor(r)), &core)
        return core
    }

    func restoreRequests(_ actions: [ControlStoreCore.Action]) -> [(ActorSpawn, Endpoint)] {
        sends(actions).compactMap { if case .createActor(let s) = $0.0 { return (s, $0.1) } else { return nil } }
    }

    @Test("a durable actor whose node dies is restored on the least-loaded live node that has what it needs; lookups wait for it")
    func durableActorRelocated() throws {
        var core = coreWithDurableActor(nodes: 4, far: [1, 2, 3], replacementsExpected: true)
        _ = core.handle(.reportLoad(NodeID(2), queued: 50))
        let lost = core.handle(.nodeLost(NodeID(1), reason: "killed"))
        let requests = restoreRequests(lost)
        try #require(requests.count == 1, "one restore request")
        let (spawn, endpoint) = requests[0]
        // Node 4 is idle but lacks `far`; node 2 is busier than node 3.
        #expect(endpoint == .node(NodeID(3)))
        #expect(spawn.id == aid && spawn.durable?.name == "bank" && spawn.durable?.restoreOnly == true)
        #expect(spawn.resources == Resources(cpus: 0, custom: ["far": 1]))
        _ = commitWrites(lost, &core)
        #expect(core.actors[aid]?.state == .restoring && core.actors[aid]?.node == NodeID(3))
        #expect(location(core.handle(.lookupActor(aid, replyTo: driver))) == nil, "a lookup waits while it is restored")
        var restored = core.actors[aid]!
        restored.state = .alive
        let answers = commitWrites(core.handle(.registerActor(restored)), &core)
        #expect(location(answers) == .some(NodeID(3)), "then it is answered with the new node")
    }

    @Test("a durable actor no live node can host waits for a node that can to join, or fails when none will")
    func durableActorWaitsForNode() throws {
        var core = coreWithDurableActor(nodes: 2, far: [1], replacementsExpected: true)
        let lost = core.handle(.nodeLost(NodeID(1), reason: "killed"))
        #expect(restoreRequests(lost).isEmpty, "node 2 lacks `far`")
        _ = commitWrites(lost, &core)
        #expect(core.actors[aid]?.state == .restoring && core.homeless == [aid])
        // Another node without `far` joins: still waiting, no new row write.
        let other = core.handle(.registerNode(NodeRecord(id: NodeID(5), resources: Resources(cpus: 1), functions: nil, queued: 0, alive: true)))
        let afterOther = commitWrites(other, &core)
        #expect(restoreRequests(afterOther).isEmpty && !afterOther.contains { if case .write = $0 { return true } else { return false } })
        // A replacement with `far` joins: the actor goes there.
        let joined = core.handle(.registerNode(NodeRecord(id: NodeID(6), resources: Resources(cpus: 1, custom: ["far": 1]), functions: nil, queued: 0, alive: true)))
        let requests = restoreRequests(commitWrites(joined, &core))
        #expect(requests.map(\.1) == [.node(NodeID(6))])
        #expect(core.homeless.isEmpty)

        var final = coreWithDurableActor(nodes: 2, far: [1], replacementsExpected: false)
        let failed = final.handle(.nodeLost(NodeID(1), reason: "killed"))
        _ = commitWrites(failed, &final)
        #expect(final.actors[aid]?.state == .failed, "no node will come: the actor fails (its storage is kept)")
    }

    @Test("freeing objects deletes only rows that exist; a failed write releases its readers with the committed row")
    func forgetAndFailure() {
        var core = ControlStoreCore()
        let big = ObjectID(raw: 77)
        _ = commitWrites(core.handle(.objectLocations([(big, NodeID(0), size: 100_000)])), &core)
        let deletes = core.handle(.forgetObjects([big, ObjectID(raw: 78)]))
        #expect(deletes.count == 1, "one delete: the object row (no task row, no row for the unknown object)")
        #expect(core.handle(.locateObject(big, replyTo: driver)).isEmpty, "the delete is in flight")
        guard case .write(let key, let value)? = deletes.first else { return }
        let answers = core.writeFailed(key: key, value: value)
        let located = sends(answers).contains { if case .objectLocation(_, let l) = $0.0 { return l?.node == NodeID(0) } else { return false } }
        #expect(located, "the GCS never took the delete, so the committed row still stands")
    }

    @Test("object IDs parse back from their descriptions, and nothing else parses")
    func objectIDs() {
        for raw: UInt64 in [0, 1, 5 << 48 | 12345, 0xFFFF_FFFF_FFFF_FFFF] { #expect(ObjectID(ObjectID(raw: raw).description) == ObjectID(raw: raw)) }
        for bad in ["", "obj-1", "obj-x-2", "obj-65536-1", "obj-1-281474976710656", "task-1-2", "obj-1-2-3"] { #expect(ObjectID(bad) == nil, "\(bad)") }
    }
}

let addFromTask = RemoteFunction2<ActorHandle<Counter>, Int, Int>("test.addFromTask") { counter, n in
    try counter.send(n).get()
}

extension ClusterSuites {
    @Suite("Runtime control store on the chain-replicated GCS", .serialized)
    struct ControlStoreGCSTests {
        static func options(nodes: Int = 2, gcsDirectory: String? = nil, shards: Int = 2) -> ClusterOptions {
            var gcsOptions = EmbeddedGCS.Options(shards: shards)
            gcsOptions.directory = gcsDirectory
            // A loaded test machine: generous failure detection (kills are reported at once anyway).
            gcsOptions.failureTimeoutMicroseconds = 2_000_000
            gcsOptions.leaseMicroseconds = 500_000
            var options = ClusterOptions(nodes: Array(repeating: NodeConfiguration(resources: Resources(cpus: 1)), count: nodes),
                                         storage: ActorStorageOptions(location: .inMemory))
            options.controlStore = .chainReplicated(gcsOptions)
            return options
        }

        @Test("a cluster whose GCS options cannot work does not start: a typed invalid-argument error says which option to change")
        func invalidGCSOptions() async throws {
            var options = Self.options()
            guard case .chainReplicated(var gcsOptions) = options.controlStore else { Issue.record("no GCS options"); return }
            gcsOptions.reportIntervalMicroseconds = 400_000
            options.controlStore = .chainReplicated(gcsOptions)
            do {
                let cluster = try await Cluster.local(options)
                cluster.shutdown()
                Issue.record("a cluster started with a report interval longer than its lease")
            } catch let e as CairnError {
                #expect(e.code == .invalidArgument)
                #expect(e.detail.contains("reportIntervalMicroseconds"), "\(e.detail)")
            }
        }

        @Test("the node and actor tables land in the GCS, and an actor's row follows its progress")
        func tablesInGCS() async throws {
            let dir = try TemporaryDirectory()
            let cluster = try await Cluster.local(Self.options(gcsDirectory: dir.path + "/gcs"))
            defer { cluster.shutdown() }
            let gcs = try #require(cluster.gcs)
            let counter = try await cluster.spawn(Counter(), name: "counter", durability: DurabilityOptions(checkpoint: .every(messages: 5)))
            for i in 1...20 { #expect(try await cluster.get(counter.send(1)) == i) }
            // Progress reports are asynchronous: wait until the control store reports a position
            // past the start; the store answers only from committed rows, so the GCS has it too.
            let deadline = Date().addingTimeInterval(30)
            var expected = try await cluster.status(of: counter)
            while expected.logPosition == 0 && Date() < deadline {
                try await Task.sleep(for: .milliseconds(5))
                expected = try await cluster.status(of: counter)
            }
            let row = try gcs.get(ControlTables.actorKey(counter.id)).map(ControlTables.actorStatus(from:))
            #expect(row?.state == .alive && row?.name == "counter" && (row?.logPosition ?? 0) >= expected.logPosition && expected.logPosition > 0,
                    "the GCS row is at least as new as what the control store reported")
            for n in 0..<2 { #expect(try gcs.get(.nodes, NodeID(n).description) != nil, "node \(n) is in the node table") }
        }

        @Test("location(of:) reports where a large object lives and its size; a small one is not recorded")
        func objectLocations() async throws {
            let cluster = try await Cluster.local(Self.options())
            defer { cluster.shutdown() }
            let big = cluster.put([UInt8](repeating: 7, count: 256 << 10))
            let small = cluster.put(5)
            let deadline = Date().addingTimeInterval(30)
            var found = await cluster.location(of: big)
            while found == nil && Date() < deadline {
                try await Task.sleep(for: .milliseconds(2))
                found = await cluster.location(of: big)
            }
            #expect(found?.node == NodeID(0))
            #expect((found?.size ?? 0) >= 256 << 10)
            let smallLocation = await cluster.location(of: small)
            #expect(smallLocation == nil)
        }

        @Test("a restarted control store rebuilds its tables from the GCS: actor records, object locations, nodes and routing survive")
        func restartRebuildsFromGCS() async throws {
            let cluster = try await Cluster.local(Self.options(nodes: 3))
            defer { cluster.shutdown() }
            let durable = try await cluster.spawn(Counter(), name: "kept")
            let plain = try await cluster.spawn(Counter())
            #expect(try await cluster.get(durable.send(5)) == 5)
            #expect(try await cluster.get(plain.send(6)) == 6)
            let big = cluster.put([UInt8](repeating: 1, count: 128 << 10))
            var before = await cluster.location(of: big)
            let deadline = Date().addingTimeInterval(30)
            while before == nil && Date() < deadline {
                try await Task.sleep(for: .milliseconds(2))
                before = await cluster.location(of: big)
            }
            let durableBefore = try await cluster.status(of: durable)
            let plainBefore = try await cluster.status(of: plain)

            cluster.restartControlStore()

            #expect(try await cluster.status(of: plain) == plainBefore)
            let durableAfter = try await cluster.status(of: durable)
            #expect(durableAfter.state == .alive && durableAfter.node == durableBefore.node && durableAfter.name == "kept")
            #expect(durableAfter.logPosition >= durableBefore.logPosition)
            let after = await cluster.location(of: big)
            #expect(before != nil && after == before)
            // Routing: tasks on every node (which look the actor up) still reach it, and the
            // scheduler, subscribed again, still places work.
            let adds = try (0..<30).map { _ in try addFromTask.remote(plain, 1) }
            let sums = try await cluster.get(adds)
            #expect(Set(sums).count == 30 && sums.max() == 36, "30 increments applied once each on top of 6")
            // A new actor, registered with the new incarnation, is found as well.
            let fresh = try await cluster.spawn(Counter())
            #expect(try await cluster.get(try addFromTask.remote(fresh, 3)) == 3)
        }

        @Test("a cluster started again on its GCS directory: the old cluster's tables are gone, and a durable actor in replicated storage comes back by name with its state")
        func newClusterOnOldGCS() async throws {
            let dir = try TemporaryDirectory()
            var options = Self.options(nodes: 2, gcsDirectory: dir.path + "/gcs")
            options.storage = ActorStorageOptions(location: .replicated)
            let aid: ActorID
            do {
                let cluster = try await Cluster.local(options)
                defer { cluster.shutdown() }
                let counter = try await cluster.spawn(Counter(), name: "kept-in-gcs")
                aid = counter.id
                for i in 1...25 { #expect(try await cluster.get(counter.send(1)) == i) }
                _ = try await cluster.spawn(Counter())  // an actor with no name: not kept
                let gcs = try #require(cluster.gcs)
                #expect(try gcs.get(ControlTables.actorKey(aid)) != nil)
            }
            let cluster = try await Cluster.local(options)
            defer { cluster.shutdown() }
            let gcs = try #require(cluster.gcs)
            #expect(try gcs.get(ControlTables.actorKey(aid)) == nil, "the old cluster's actor row was deleted")
            #expect(cluster.driverNode.aliveNodes.count == 2)
            let counter = try await cluster.spawn(Counter(), name: "kept-in-gcs")
            #expect(counter.id == aid)
            #expect(try await cluster.get(counter.send(1)) == 26, "25 messages before, restored from the GCS")
        }

        @Test("in memory, a restarted control store has lost its tables (the contrast the GCS removes)")
        func restartInMemoryLoses() async throws {
            var options = Self.options()
            options.controlStore = .inMemory
            let cluster = try await Cluster.local(options)
            defer { cluster.shutdown() }
            let plain = try await cluster.spawn(Counter())
            _ = try await cluster.status(of: plain)
            cluster.restartControlStore()
            await #expect(throws: CairnError.self) { try await cluster.status(of: plain) }
        }

        @Test("killing a GCS replica under a running cluster, tail first then head, loses no row and stalls nothing for good")
        func replicaKillUnderRuntime() async throws {
            let cluster = try await Cluster.local(Self.options(nodes: 2, shards: 1))
            defer { cluster.shutdown() }
            let gcs = try #require(cluster.gcs)
            let counter = try await cluster.spawn(Counter())
            for round in 0..<2 {
                let chain = try #require(gcs.configurations().first?.chain)
                try gcs.kill(replica: round == 0 ? chain.last! : chain.first!)
                let another = try await cluster.spawn(Counter())
                #expect(try await cluster.get(try addFromTask.remote(another, 2)) == 2)
                #expect(try await cluster.get(try addFromTask.remote(counter, 1)) == round + 1)
                #expect(try await cluster.status(of: another).state == .alive)
            }
        }
    }
}

@Suite("Storage fence (pure): a replicated store is written only by the node that claimed it last")
struct StorageFenceTests {
    func request(_ id: UInt64, _ node: Int, _ op: StorageRequest.Operation, _ ns: String = "actor-a") -> StorageRequest {
        StorageRequest(id: id, node: NodeID(node), namespace: ns, operation: op)
    }

    func isDone(_ d: StorageFence.Decision) -> Bool { if case .reply(.done) = d { return true } else { return false } }
    func isForward(_ d: StorageFence.Decision) -> Bool { if case .forward = d { return true } else { return false } }
    func refusal(_ d: StorageFence.Decision) -> String? { if case .reply(.failed(let why)) = d { return why } else { return nil } }

    @Test("a claim waits for the previous holder's writes to settle, then the previous holder's writes are refused")
    func claimWaitsThenFences() {
        var fence = StorageFence()
        let put = StorageRequest.Operation.put([StorageEntry(key: "t1", value: [1])])
        #expect(isDone(fence.admit(request(1, 1, .claim))))
        let write1 = request(2, 1, put)
        #expect(isForward(fence.admit(write1)))
        // Node 2 restores the actor while node 1's write is in flight: it waits.
        let claim2 = request(3, 2, .claim)
        if case .wait = fence.admit(claim2) {} else { Issue.record("the claim did not wait for the write in flight") }
        #expect(fence.settled(write1).map(\.id) == [3])
        let late = fence.admit(request(4, 1, put))
        #expect(refusal(late)?.contains("taken over by node-2") == true, "\(late)")
        #expect(isForward(fence.admit(request(5, 2, put))))
        // Reads are never fenced; other namespaces are independent.
        #expect(isForward(fence.admit(request(6, 1, .get(["m"])))))
        #expect(isDone(fence.admit(request(7, 1, .claim, "actor-b"))))
    }

    @Test("a write to a namespace nobody claimed is refused")
    func unclaimedWriteRefused() {
        var fence = StorageFence()
        let refused = fence.admit(request(1, 3, .put([StorageEntry(key: "m", value: nil)])))
        #expect(refusal(refused)?.contains("was not claimed") == true)
    }
}
