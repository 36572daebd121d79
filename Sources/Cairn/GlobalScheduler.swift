import CairnCore

/// The global scheduler: places the tasks that nodes hand up.
///
/// Stateless apart from what it reads from the control store (the node table, pushed to it
/// on every change) and the tasks it placed since the last load report, so it can be
/// restarted or replaced at any time. Decisions are ``SchedulingPolicy/place(_:nodes:inputBytes:bytesPerQueuedTask:random:)``.
final class GlobalScheduler: @unchecked Sendable {
    // Touched only on the scheduler's inbox thread.
    private var nodes: [NodeID: NodeRecord] = [:]
    private var placedSinceReport: [NodeID: Int] = [:]
    private var random: SeededGenerator
    private let transport: any Transport
    /// Tasks handed up before the first node table came (a new scheduler process): placed
    /// once it comes, instead of being refused against an empty table.
    private var early: [Message]? = []

    init(transport: any Transport, seed: UInt64) {
        self.transport = transport
        random = SeededGenerator(seed: seed)
        // Its state is touched only by whoever holds its inbox, so a read handled on the event
        // loop waits for nothing.
        transport.register(.scheduler, { [self] batch in handle(batch) }, onEventLoop: { [self] batch in
            handle(batch)
            return true
        })
        transport.send(.control(.subscribeNodes(.scheduler)), to: .controlStore)
    }

    private func handle(_ batch: [Message]) {
        var batch = batch
        if var waiting = early {
            guard batch.contains(where: { if case .nodeTable = $0 { return true } else { return false } }) else {
                waiting += batch
                early = waiting
                return
            }
            // The table first, then what waited, in order.
            batch = batch.filter { if case .nodeTable = $0 { return true } else { return false } } + waiting
                + batch.filter { if case .nodeTable = $0 { return false } else { return true } }
            early = nil
        }
        var placed: [NodeID: [TaskSpec]] = [:]
        var placedEncoded: [NodeID: EncodedBatch] = [:]
        var failed: [NodeID: [(ObjectID, StoredValue)]] = [:]
        for message in batch {
            switch message {
            case .nodeTable(let table):
                // Stop trying to reach nodes declared dead (their owners run their tasks again).
                for record in table where !record.alive && nodes[record.id]?.alive != false { transport.forget(.node(record.id)) }
                nodes = Dictionary(uniqueKeysWithValues: table.map { ($0.id, $0) })
                placedSinceReport = [:]
            case .schedule(let specs, let from, let avoid):
                for (node, chosen) in place(specs, from: from, avoid: avoid, failed: &failed) {
                    placed[node, default: []] += chosen.map { specs[$0] }
                }
            case .scheduleEncoded(let tasks, let from, let avoid):
                // Tasks read from the wire go on as the bytes they came in.
                for (node, chosen) in place(tasks, from: from, avoid: avoid, failed: &failed) {
                    var batch = placedEncoded.removeValue(forKey: node) ?? EncodedBatch()
                    batch.reserve(chosen.reduce(0) { $0 + tasks[$1].range.count })
                    for i in chosen { batch.append(tasks[i]) }
                    placedEncoded[node] = batch
                }
            default:
                break
            }
        }
        for (node, batch) in placedEncoded { transport.send(.runTasksEncoded(batch), to: .node(node)) }
        for (node, specs) in placed { transport.send(.runTasks(specs), to: .node(node)) }
        for (node, objects) in failed { transport.send(.objects(objects), to: .node(node)) }
    }

    /// Places `tasks` handed up by `from` on the nodes of the table, none in `avoid`: the
    /// indices in `tasks` of each node's share, in order; each task no live node can run gets
    /// an error result for its owner in `failed`.
    private func place<T: Placeable>(_ tasks: [T], from: NodeID, avoid: [NodeID],
                                     failed: inout [NodeID: [(ObjectID, StoredValue)]]) -> [(NodeID, [Int])] {
        var view = nodes.values.map {
            SchedulingPolicy.NodeLoad(id: $0.id, resources: $0.resources, queued: $0.queued + (placedSinceReport[$0.id] ?? 0),
                                      functions: $0.functions, alive: $0.alive && !avoid.contains($0.id))
        }
        // Per node of the view, by index: no dictionary operation per task, and no copy of one.
        var chosen = [[Int]](repeating: [], count: view.count)
        // The nodes that can run a task depend only on its function and resources, which a
        // batch's tasks usually share: found once per run of alike tasks.
        var shape: SchedulingPolicy.Work?
        var eligible: [Int] = []
        for t in tasks.indices {
            var inputs: [NodeID: Int] = [:]
            tasks[t].forEachInputOwner { inputs[$0, default: 0] += 1 << 20 }
            if shape?.function != tasks[t].function || shape?.resources != tasks[t].resources {
                let work = SchedulingPolicy.Work(resources: tasks[t].resources, function: tasks[t].function)
                shape = work
                eligible = SchedulingPolicy.eligible(work, nodes: view)
            }
            if let i = SchedulingPolicy.placeIndex(among: eligible, nodes: view, inputBytes: inputs, handedUpBy: from, random: &random) {
                chosen[i].append(t)
                view[i].queued += 1
            } else {
                let task = tasks[t]
                let error = RemoteError(kind: .infeasible, task: task.id, function: task.function, node: task.owner,
                                        message: "no live node can run it (needs \(task.resources), function \"\(task.function)\")")
                failed[task.owner, default: []].append((task.id, .failed(error)))
            }
        }
        var shares: [(NodeID, [Int])] = []
        for (i, share) in chosen.enumerated() where !share.isEmpty {
            shares.append((view[i].id, share))
            placedSinceReport[view[i].id, default: 0] += share.count
        }
        return shares
    }
}

/// What the global scheduler reads of a task to place it: a decoded spec, or one still in its bytes.
protocol Placeable {
    var id: ObjectID { get }
    var function: String { get }
    var resources: Resources { get }
    var owner: NodeID { get }
    /// Calls `body` with the owner of each input not yet in the task (each reference argument).
    func forEachInputOwner(_ body: (NodeID) -> Void)
}

extension TaskSpec: Placeable {
    func forEachInputOwner(_ body: (NodeID) -> Void) {
        guard !resolved else { return }
        for case .ref(let id, _) in args { body(id.owner) }
    }
}

extension EncodedTask: Placeable {
    func forEachInputOwner(_ body: (NodeID) -> Void) { inputOwners.forEach(body) }
}
