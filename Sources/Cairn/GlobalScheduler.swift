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
        var failed: [NodeID: [(ObjectID, StoredValue)]] = [:]
        for message in batch {
            switch message {
            case .nodeTable(let table):
                // Stop trying to reach nodes declared dead (their owners run their tasks again).
                for record in table where !record.alive && nodes[record.id]?.alive != false { transport.forget(.node(record.id)) }
                nodes = Dictionary(uniqueKeysWithValues: table.map { ($0.id, $0) })
                placedSinceReport = [:]
            case .schedule(let specs, let from, let avoid):
                var view = nodes.values.map {
                    SchedulingPolicy.NodeLoad(id: $0.id, resources: $0.resources, queued: $0.queued + (placedSinceReport[$0.id] ?? 0),
                                              functions: $0.functions, alive: $0.alive && !avoid.contains($0.id))
                }
                // Per node of the view, by index: no dictionary operation per task.
                var chosen = [[TaskSpec]](repeating: [], count: view.count)
                // The nodes that can run a task depend only on its function and resources, which
                // a batch's tasks usually share: found once per run of alike tasks.
                var shape: SchedulingPolicy.Work?
                var eligible: [Int] = []
                for spec in specs {
                    var inputs: [NodeID: Int] = [:]
                    if !spec.resolved {
                        for case .ref(let id, _) in spec.args { inputs[id.owner, default: 0] += 1 << 20 }
                    }
                    if shape?.function != spec.function || shape?.resources != spec.resources {
                        let work = SchedulingPolicy.Work(resources: spec.resources, function: spec.function)
                        shape = work
                        eligible = SchedulingPolicy.eligible(work, nodes: view)
                    }
                    if let i = SchedulingPolicy.placeIndex(among: eligible, nodes: view, inputBytes: inputs, handedUpBy: from, random: &random) {
                        chosen[i].append(spec)
                        view[i].queued += 1
                    } else {
                        let error = RemoteError(kind: .infeasible, task: spec.id, function: spec.function, node: spec.owner,
                                                message: "no live node can run it (needs \(spec.resources), function \"\(spec.function)\")")
                        failed[spec.owner, default: []].append((spec.id, .failed(error)))
                    }
                }
                for (i, specs) in chosen.enumerated() where !specs.isEmpty {
                    placed[view[i].id, default: []] += specs
                    placedSinceReport[view[i].id, default: 0] += specs.count
                }
            default:
                break
            }
        }
        for (node, specs) in placed { transport.send(.runTasks(specs), to: .node(node)) }
        for (node, objects) in failed { transport.send(.objects(objects), to: .node(node)) }
    }
}
