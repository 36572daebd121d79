@testable import Cairn
import CairnCodec
import CairnCore
import CairnNet
import CairnWire
import Foundation
import Testing

extension ClusterSuites {
@Suite("Runtime over TCP: every message between components framed on loopback", .serialized)
struct TCPTransportTests {
    static func tcpOptions(nodes: Int = 4, spillThreshold: Int? = nil) -> ClusterOptions {
        var options = ClusterOptions.uniform(nodes: nodes)
        options.transport = .tcp(host: "127.0.0.1")
        if let spillThreshold { for i in options.nodes.indices { options.nodes[i].spillThreshold = spillThreshold } }
        return options
    }

    @Test("every message kind round trips through the wire encoding")
    func messagesRoundTrip() throws {
        let spec = try TaskSpec(id: ObjectID(owner: NodeID(2), counter: 7), function: "f",
                                args: [.value(.int(5)), .value(.encoded([1, 2])), .ref(ObjectID(owner: NodeID(1), counter: 3), nil)],
                                resources: Resources(cpus: 1)).portable()
        let messages: [Message] = [
            .runTasks([spec]), .runDirect([spec]), .schedule([spec], from: NodeID(1), avoid: [NodeID(3), NodeID(5)]),
            .objects([(ObjectID(owner: NodeID(0), counter: 1), .failed(RemoteError(kind: .threw, task: ObjectID(raw: 1), function: "f", node: NodeID(1), message: "x")))]),
            .fetch([ObjectID(owner: NodeID(0), counter: 9)], replyTo: NodeID(3)),
            .actorCreated(ActorID(raw: 4), on: NodeID(2), failure: "no such type"),
            .control(.objectLocations([(ObjectID(owner: NodeID(0), counter: 2), NodeID(1), size: 70_000)])),
            .control(.lookupActor(ActorID(raw: 4), replyTo: .scheduler)),
            .control(.committed(generation: 9, key: "obj/x", value: nil)),
            .control(.nodeLost(NodeID(3), reason: "its connection closed")),
            .placed([(ObjectID(owner: NodeID(0), counter: 5), NodeID(2)), (ObjectID(owner: NodeID(1), counter: 6), NodeID(3))]),
            .runTasks([try TaskSpec(id: ObjectID(owner: NodeID(2), counter: 8), function: "g", args: [],
                                    resources: Resources(cpus: 0.5, custom: ["gpu": 2, "far": 1])).portable()]),
            .objectsHeld([(ObjectID(owner: NodeID(0), counter: 9), NodeID(1), size: 70_000)]),
            .free([ObjectID(owner: NodeID(0), counter: 10), ObjectID(owner: NodeID(3), counter: 11)]),
            .actorCalls([ActorCall(actor: ActorID(raw: 4), typeName: "Counter", result: ObjectID(owner: NodeID(1), counter: 12),
                                   message: .encoded([1, 2, 3]), caller: 9, callerSequence: 77, logSequence: 5, logged: [4, 5]),
                          ActorCall(actor: ActorID(raw: 4), typeName: "Counter", result: ObjectID(owner: NodeID(1), counter: 13),
                                    message: .int(3))]),
            .actorLocation(ActorID(raw: 4), nil, reason: "it is dead"),
            .nodeTable([NodeRecord(id: NodeID(1), resources: Resources(cpus: 2), functions: ["f", "g"], queued: 3, alive: false, address: "127.0.0.1:4000"),
                        NodeRecord(id: NodeID(2), resources: Resources(cpus: 1, custom: ["far": 1]), functions: nil, queued: 0, alive: true)]),
            .control(.reportLoad(NodeID(3), queued: 4_096)),
        ]
        for message in messages {
            let bytes = try WireMessages.encode(message, to: .node(NodeID(2)))
            let (to, back) = try WireMessages.decode(bytes)
            #expect(to == .node(NodeID(2)))
            // Encoding is deterministic, so equal re-encodings mean equal messages.
            #expect(try WireMessages.encode(back, to: to) == bytes, "\(message)")
        }
        #expect(throws: CairnError.self) { try WireMessages.decode([0xCA, 0x01, 0xFF]) }
        // A hand-coded placement list claiming a billion entries is refused before anything is allocated.
        do {
            _ = try WireMessages.decode([0xCB, 0x00, 0x04, 0x04, 0x80, 0x94, 0xEB, 0xDC, 0x03, 0x01, 0x02])
            Issue.record("a count past the end of the message decoded")
        } catch let error as CairnError {
            #expect(error.detail.contains("exceeds"), "\(error)")
        }
        // Every cut and seeded byte flips of the hand-coded kinds end in a message or a CairnError.
        var random = SeededGenerator(seed: 41)
        for message in messages {
            let bytes = try WireMessages.encode(message, to: .node(NodeID(2)))
            guard bytes.first == 0xCB else { continue }
            for cut in 0..<bytes.count {
                #expect(throws: CairnError.self) { try WireMessages.decode(Array(bytes[..<cut])) }
            }
            for _ in 0..<2_000 {
                var damaged = bytes
                for _ in 0..<Int.random(in: 1...3, using: &random) {
                    damaged[Int.random(in: 1..<damaged.count, using: &random)] = UInt8.random(in: 0...255, using: &random)
                }
                do { _ = try WireMessages.decode(damaged) } catch is CairnError {}
            }
        }
    }

    @Test("tasks spread over 4 nodes, data edges and refs inside values, all over TCP")
    func tasksOverTCP() async throws {
        let cluster = try await Cluster.local(Self.tcpOptions(spillThreshold: 2))
        defer { cluster.shutdown() }
        #expect(cluster.transport is TCPTransport)
        let refs = try (0..<400).map { try whereAmI.remote($0) }
        #expect(Set(try await cluster.get(refs)) == [0, 1, 2, 3])
        var ref = cluster.put(0)
        for _ in 0..<200 { ref = try increment.remote(ref) }
        #expect(try await cluster.get(ref) == 200)
        let inputs = try (1...4).map { try double.remote($0) }
        let sums = try (0..<40).map { _ in try unwrap.remote(inputs) }
        for s in try await cluster.get(sums) { #expect(s == 20) }
        let results = try (0..<2_000).map { try double.remote($0) }
        #expect(try await cluster.get(results) == (0..<2_000).map { $0 * 2 })
    }

    @Test("actor calls from 4 concurrent callers on 4 nodes keep per-caller order over TCP")
    func actorsOverTCP() async throws {
        let cluster = try await Cluster.local(Self.tcpOptions(spillThreshold: 1))
        defer { cluster.shutdown() }
        let recorder = try await cluster.spawn(Recorder())
        let callers = try (0..<4).map { try sendInOrder.remote(recorder, $0) }
        #expect(Set(try await cluster.get(callers)) == [0, 1, 2, 3])
        let seen = try await cluster.get(try recorder.send(.read))
        for caller in 0..<4 { #expect(seen[caller] == Array(0..<200)) }
    }

    @Test("a peer sending a malformed message, or one for another endpoint, to a node's port is closed with a logged reason; the node keeps serving")
    func badMessagesCloseTheirConnection() async throws {
        let token = ClusterToken.generate()
        let logs = Locked<[String]>([])
        let received = Locked<[Message]>([])
        let transport = TCPTransport(token: token, name: "test", log: { line in logs.update { $0.append(line) } })
        defer { transport.shutdown() }
        transport.register(.node(NodeID(1))) { batch in received.update { $0 += batch } }
        guard let address = transport.localAddress(.node(NodeID(1))), let (host, port) = TCPTransport.split(address) else {
            Issue.record("node 1 has no address")
            return
        }
        let patient = WireOptions(connection: .init(heartbeatTicks: 5, timeoutTicks: 12_000))
        func connect() async throws -> WireConnection {
            try await Wire.connect(host: host, port: port, token: token, name: "peer", epoch: 1,
                                   handlers: WireHandlers(message: { _, _ in }, log: { _ in }), options: patient)
        }
        let freed = Message.free([ObjectID(owner: NodeID(0), counter: 7)])
        // Each bad message arrives alone, so it is handled on the event loop, where the close
        // it causes is reported at once, from inside the handling.
        let garbage = try await connect()
        try garbage.send([WireFast.marker, 0x00, 0x02, 0xFF, 0xFF])
        let misaddressed = try await connect()
        try misaddressed.send(try WireMessages.encode(freed, to: .node(NodeID(2))))
        for _ in 0..<4_000 where !(garbage.isClosed && misaddressed.isClosed) { try await Task.sleep(for: .milliseconds(5)) }
        #expect(garbage.isClosed && misaddressed.isClosed)
        #expect(logs.value.contains { $0.contains("for node-2 to node-1's port; closing") }, "\(logs.value)")
        #expect(logs.value.count >= 2, "\(logs.value)")
        #expect(received.value.isEmpty)
        let good = try await connect()
        for _ in 0..<100 { try good.send(try WireMessages.encode(freed, to: .node(NodeID(1)))) }
        for _ in 0..<4_000 where received.value.count < 100 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(received.value.count == 100)
        good.close()
    }

    @Test("a spec that is not portable is sent only where it is encoded at once: refused for an endpoint reached in memory, delivered over the wire as a decoded copy")
    func sendIfEncodedAtOnce() async throws {
        let token = ClusterToken.generate()
        let spec = TaskSpec(id: ObjectID(owner: NodeID(0), counter: 1), function: "f", args: [.value(.boxed(5))], resources: Resources(cpus: 1))
        let message = Message.schedule([spec], from: NodeID(0), avoid: [])
        // Messages between this process's endpoints handed over in memory: refused, nothing sent.
        let shortcut = TCPTransport(token: token, name: "shortcut", shortcutLocal: true, log: { _ in })
        defer { shortcut.shutdown() }
        let inMemory = Locked<[Message]>([])
        shortcut.register(.scheduler) { batch in inMemory.update { $0 += batch } }
        #expect(!shortcut.sendIfEncodedAtOnce(message, to: .scheduler))
        // Every message over the wire: sent, and what arrives was decoded, not the spec itself.
        let wire = TCPTransport(token: token, name: "wire", log: { _ in })
        defer { wire.shutdown() }
        let arrived = Locked<[Message]>([])
        wire.register(.scheduler) { batch in arrived.update { $0 += batch } }
        #expect(wire.sendIfEncodedAtOnce(message, to: .scheduler))
        for _ in 0..<4_000 where arrived.value.isEmpty { try await Task.sleep(for: .milliseconds(5)) }
        // (A scheduler reads tasks from the wire in their bytes; decoded here to look inside.)
        guard case .schedule(let specs, _, _)? = try arrived.value.first?.decodedForDelivery, let received = specs.first else {
            Issue.record("no schedule arrived over the wire: \(arrived.value)")
            return
        }
        #expect(received !== spec && received.isPortable && received.id == spec.id)
        if case .value(.int(5)) = received.args[0] {} else { Issue.record("the boxed Int arrived as \(received.args[0])") }
        #expect(inMemory.value.isEmpty)
    }

    @Test("tasks handed up reach a scheduler in their bytes, with what placement reads parsed out, and are forwarded as the same bytes; delivered in memory, they are decoded")
    func scheduleForwardedAsBytes() async throws {
        let failure = RemoteError(kind: .threw, task: ObjectID(raw: 1), function: "f", node: NodeID(1), message: "an input failed")
        let first = try TaskSpec(id: ObjectID(owner: NodeID(2), counter: 7), function: "f",
                                 args: [.value(.int(5)), .value(.encoded([1, 2])), .ref(ObjectID(owner: NodeID(1), counter: 3), nil),
                                        .value(.failed(failure)), .ref(ObjectID(owner: NodeID(3), counter: 4), nil)],
                                 resources: Resources(cpus: 1, custom: ["gpu": 2])).portable()
        let second = try TaskSpec(id: ObjectID(owner: NodeID(0), counter: 8), function: "g", args: [.value(.int(-1))],
                                  resources: Resources(cpus: 0.5)).portable()
        let handedUp = try WireMessages.encode(.schedule([first, second], from: NodeID(2), avoid: [NodeID(4)]), to: .scheduler)
        guard case (.scheduler, .scheduleEncoded(let tasks, let from, let avoid)) = try WireMessages.decode(handedUp) else {
            Issue.record("a schedule did not arrive in its bytes")
            return
        }
        #expect(from == NodeID(2) && avoid == [NodeID(4)])
        #expect(tasks.map(\.id) == [first.id, second.id] && tasks.map(\.function) == ["f", "g"])
        #expect(tasks.map(\.resources) == [first.resources, second.resources])
        #expect(tasks[0].inputOwners == [NodeID(1), NodeID(3)] && !tasks[0].resolved && tasks[1].resolved)
        // Forwarded whole, or one, or in another order: the bytes the decoded specs would be written as.
        func batch(_ chosen: [EncodedTask]) -> EncodedBatch {
            var batch = EncodedBatch()
            for t in chosen { batch.append(t) }
            return batch
        }
        #expect(try WireMessages.encode(.runTasksEncoded(batch(tasks)), to: .node(NodeID(1))) == WireMessages.encode(.runTasks([first, second]), to: .node(NodeID(1))))
        #expect(try WireMessages.encode(.runTasksEncoded(batch([tasks[1]])), to: .node(NodeID(1))) == WireMessages.encode(.runTasks([second]), to: .node(NodeID(1))))
        #expect(try WireMessages.encode(.runTasksEncoded(batch(tasks.reversed())), to: .node(NodeID(1))) == WireMessages.encode(.runTasks([second, first]), to: .node(NodeID(1))))
        #expect(try WireMessages.encode(.scheduleEncoded(tasks, from: from, avoid: avoid), to: .scheduler) == handedUp)
        // A node in the process that forwards them gets them decoded.
        let transport = TCPTransport(token: ClusterToken.generate(), name: "local", shortcutLocal: true, log: { _ in })
        defer { transport.shutdown() }
        let arrived = Locked<[Message]>([])
        transport.register(.node(NodeID(1))) { batch in arrived.update { $0 += batch } }
        transport.send(.runTasksEncoded(batch(tasks)), to: .node(NodeID(1)))
        for _ in 0..<4_000 where arrived.value.isEmpty { try await Task.sleep(for: .milliseconds(5)) }
        guard case .runTasks(let specs)? = arrived.value.first else {
            Issue.record("the tasks did not arrive decoded: \(arrived.value)")
            return
        }
        #expect(specs.map(\.id) == [first.id, second.id] && specs.allSatisfy(\.isPortable))
        #expect(try WireMessages.encode(.runTasks(specs), to: .node(NodeID(1))) == WireMessages.encode(.runTasks([first, second]), to: .node(NodeID(1))))
    }

    @Test("a TCP host this machine cannot listen on is refused with a typed error before anything starts")
    func badHostRefused() async throws {
        var options = Self.tcpOptions()
        options.transport = .tcp(host: "192.0.2.1")  // TEST-NET-1: never an address of this machine
        do {
            let cluster = try await Cluster.local(options)
            cluster.shutdown()
            Issue.record("a cluster started on an address that is not this machine's")
        } catch let error as CairnError {
            #expect(error.code == .invalidArgument)
            #expect(error.detail.contains("192.0.2.1"))
        }
    }

    @Test("connections lost between two live transports, at seeded moments, lose no message and deliver none twice, in order")
    func lostConnectionsLoseNothing() async throws {
        let seed: UInt64 = 20_261_128
        print("lostConnectionsLoseNothing: seed \(seed)")
        var random = SeededGenerator(seed: seed)
        let token = ClusterToken.generate()
        let receiver = TCPTransport(token: token, name: "receiver", log: { _ in })
        let sender = TCPTransport(token: token, name: "sender", log: { _ in })
        defer {
            sender.shutdown()
            receiver.shutdown()
        }
        let destination = Endpoint.node(NodeID(1))
        let got = Locked<[Int]>([])
        receiver.register(destination) { messages in
            for case .control(.reportLoad(_, let queued)) in messages { got.update { $0.append(queued) } }
        }
        guard let address = receiver.localAddress(destination), let (host, port) = TCPTransport.split(address) else {
            Issue.record("the receiver has no address")
            return
        }
        sender.setAddress(destination, host: host, port: port)
        let count = 200_000
        var drops = 0
        for i in 0..<count {
            sender.send(.control(.reportLoad(NodeID(3), queued: i)), to: destination)
            // Now and then a connection is cut while messages are in flight: by the receiver
            // (what it had not read is gone) or by the sender (what it had queued on the
            // connection is gone).
            if i % 1_000 == 999 && Int.random(in: 0..<4, using: &random) == 0 {
                (Bool.random(using: &random) ? receiver : sender).dropConnections(to: destination)
                drops += 1
            }
        }
        // Waits while messages keep arriving (a slow machine is not a failure; a stall is).
        var seen = 0
        var quiet = 0
        let deadline = ContinuousClock.now + .seconds(120)
        while got.value.count < count && quiet < 2_000 && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
            let now = got.value.count
            quiet = now == seen ? quiet + 1 : 0
            seen = now
        }
        let received = got.value
        #expect(drops >= 20, "the seed cut only \(drops) connections")
        #expect(received.count == count, "\(received.count) of \(count) messages arrived after \(drops) lost connections")
        #expect(Set(received).count == received.count, "some messages arrived twice")
        let misplaced = zip(received, 0...).first { $0.0 != $0.1 }
        #expect(misplaced == nil, "message \(misplaced?.0 ?? 0) arrived at position \(misplaced?.1 ?? 0)")
        // Everything is acknowledged in the end: the sender holds nothing more.
        for _ in 0..<2_000 where sender.unacknowledged(to: destination) > 0 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(sender.unacknowledged(to: destination) == 0)
    }

    @Test("a read the event loop's handler declines (it would have to wait) is handled on the endpoint's thread, in order with the reads after it, exactly once")
    func declinedReadsGoToTheEndpointThread() async throws {
        let token = ClusterToken.generate()
        let lost = Locked<[String]>([])
        let receiver = TCPTransport(token: token, name: "receiver", log: { _ in })
        let sender = TCPTransport(token: token, name: "sender", log: { _ in }, peerLost: { peer, _ in lost.update { $0.append(peer) } })
        defer {
            sender.shutdown()
            receiver.shutdown()
        }
        let destination = Endpoint.node(NodeID(1))
        // `gate` stands for a lock another thread holds: the event loop's handler declines while
        // it is held, and the endpoint's thread waits for it, as a node's inbox thread waits for
        // the node's lock.
        let gate = Gate()
        struct Handled: Equatable {
            let value: Int
            let onEventLoop: Bool
        }
        let handled = Locked<[Handled]>([])
        let offers = Locked(0)
        receiver.register(destination, { messages in
            gate.waitOpen()
            // The endpoint's own thread is named for its inbox; an event loop's is not.
            let thread = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? ""
            let onLoop = !thread.hasPrefix("cairn-inbox")
            for case .control(.reportLoad(_, let queued)) in messages { handled.update { $0.append(Handled(value: queued, onEventLoop: onLoop)) } }
        }, onEventLoop: { messages in
            offers.update { $0 += 1 }
            guard !gate.isHeld else { return false }
            for case .control(.reportLoad(_, let queued)) in messages { handled.update { $0.append(Handled(value: queued, onEventLoop: true)) } }
            return true
        })
        guard let address = receiver.localAddress(destination), let (host, port) = TCPTransport.split(address) else {
            Issue.record("the receiver has no address")
            return
        }
        sender.setAddress(destination, host: host, port: port)

        func waitFor(_ count: Int) async throws {
            let deadline = ContinuousClock.now + .seconds(30)
            while handled.value.count < count && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(2)) }
        }
        // Free: a lone message is taken on the event loop.
        sender.send(.control(.reportLoad(NodeID(2), queued: 0)), to: destination)
        try await waitFor(1)
        #expect(handled.value == [Handled(value: 0, onEventLoop: true)])

        // Held for longer than a silent peer is given (250 ms): messages sent one at a time are
        // declined on the loop and wait for the endpoint's thread, which waits for the holder.
        gate.hold()
        let offeredBefore = offers.value
        for i in 1...5 {
            try await Task.sleep(for: .milliseconds(2))
            sender.send(.control(.reportLoad(NodeID(2), queued: i)), to: destination)
        }
        try await Task.sleep(for: .milliseconds(400))
        #expect(handled.value.count == 1, "a message was handled while the holder held on")
        #expect(offers.value > offeredBefore, "no read was offered to the event loop while held")
        gate.open()
        try await waitFor(6)
        let after = handled.value
        #expect(after.map(\.value) == Array(0...5), "handled \(after.map(\.value))")
        #expect(after.dropFirst().allSatisfy { !$0.onEventLoop }, "the handler that waits ran on an event loop: \(after)")
        #expect(lost.value.isEmpty, "the sender lost the receiver: \(lost.value)")
    }
}

/// A gate threads wait at while it is held.
final class Gate: @unchecked Sendable {
    private let condition = NSCondition()
    private var held = false

    var isHeld: Bool { condition.withLock { held } }

    func hold() { condition.withLock { held = true } }

    func open() {
        condition.withLock {
            held = false
            condition.broadcast()
        }
    }

    func waitOpen() {
        condition.lock()
        while held { condition.wait() }
        condition.unlock()
    }
}

@Suite("Inbox queue: batches in order, run by the caller when idle")
struct BatchQueueTests {
    @Test("a caller runs items itself only when nothing is waiting or running; the handler never runs twice at once and order holds")
    func runIfIdleKeepsOrderAndExclusion() async throws {
        let seen = Locked<[Int]>([])
        let running = Locked(0)
        let overlaps = Locked(0)
        let queue = BatchQueue<Int>(name: "test") { batch in
            if running.update({ $0 += 1; return $0 }) > 1 { overlaps.update { $0 += 1 } }
            seen.update { $0.append(contentsOf: batch) }
            // Each batch takes a while, so that producer 0 finds the queue busy now and then
            // and has to post (the ordering case), not only by luck of the interleaving.
            usleep(20)
            running.update { $0 -= 1 }
        }
        defer { queue.stop() }
        // Producer 0 is an event loop: a chunk runs on it when the queue is idle, and is posted
        // otherwise. Producer 1 posts, as local messages are. Items are producer * 1e6 + index.
        let total = 100_000
        let inlineRuns = Locked(0)
        let postedByLoop = Locked(0)
        DispatchQueue.concurrentPerform(iterations: 2) { producer in
            var next = 0
            var chunk = 1
            while next < total {
                let items = (next..<min(total, next + chunk)).map { producer * 1_000_000 + $0 }
                next += items.count
                chunk = chunk % 7 + 1
                if producer == 0 && queue.runIfIdle(items) {
                    inlineRuns.update { $0 += 1 }
                } else {
                    for item in items { queue.post(item) }
                    if producer == 0 { postedByLoop.update { $0 += items.count } }
                }
            }
        }
        try await eventuallyTrue("every item handled") { seen.value.count == 2 * total }
        for producer in 0..<2 {
            let sequence = seen.value.filter { $0 / 1_000_000 == producer }.map { $0 % 1_000_000 }
            #expect(sequence == Array(0..<total), "producer \(producer)'s items out of order")
        }
        #expect(overlaps.value == 0)
        #expect(inlineRuns.value > 0, "no chunk ran on the caller")
        #expect(postedByLoop.value > 0, "the caller never found the queue busy; the test did not exercise ordering")
    }

    @Test("runIfIdle refuses while items wait, and after stop")
    func runIfIdleRefusesWhenNotIdle() async throws {
        let release = DispatchSemaphore(value: 0)
        let started = DispatchSemaphore(value: 0)
        let handled = Locked<[Int]>([])
        let queue = BatchQueue<Int>(name: "test") { batch in
            if batch.contains(0) {
                started.signal()
                release.wait()
            }
            handled.update { $0.append(contentsOf: batch) }
        }
        queue.post(0)
        started.wait()
        #expect(!queue.runIfIdle([1]), "ran while the queue's thread was busy")
        queue.post(2)
        release.signal()
        try await eventuallyTrue("both posted items") { handled.value == [0, 2] }
        // Idle once the thread has returned from the batch.
        var ran = false
        try await eventuallyTrue("an idle queue") {
            ran = ran || queue.runIfIdle([3])
            return ran
        }
        #expect(handled.value == [0, 2, 3])
        queue.stop()
        #expect(!queue.runIfIdle([4]))
    }

    @Test("with a quiet interval, runIfIdle refuses an offer that follows the one before it too closely, whether or not that one ran")
    func runIfIdleWaitsForQuiet() {
        let handled = Locked<[Int]>([])
        let queue = BatchQueue<Int>(name: "test") { batch in handled.update { $0.append(contentsOf: batch) } }
        defer { queue.stop() }
        let quiet: UInt64 = 100
        #expect(queue.runIfIdle([1], quietNanoseconds: quiet, now: 1_000), "the first offer, on an idle queue")
        #expect(!queue.runIfIdle([2], quietNanoseconds: quiet, now: 1_099), "ran 99 ns after the offer before it")
        #expect(!queue.runIfIdle([3], quietNanoseconds: quiet, now: 1_150), "a refused offer counts too: a stream stays refused")
        #expect(queue.runIfIdle([4], quietNanoseconds: quiet, now: 1_250), "100 ns after the last offer")
        #expect(handled.value == [1, 4])
    }

    @Test("what a caller's attempt leaves goes to the head of the queue, ahead of items posted while it ran; the handler takes them in that order")
    func attemptLeftoversGoFirst() async throws {
        let seen = Locked<[Int]>([])
        let queue = BatchQueue<Int>(name: "test") { batch in seen.update { $0.append(contentsOf: batch) } }
        defer { queue.stop() }
        let taken = queue.runIfIdle([1, 2, 3]) { items in
            // Posted meanwhile, from the attempt's own thread: it must wait behind what is left.
            queue.post(4)
            return Array(items.dropFirst())  // took 1, left 2 and 3
        }
        #expect(taken)
        try await eventuallyTrue("the leftovers and the later item handled") { seen.value.count == 3 }
        #expect(seen.value == [2, 3, 4])
        // An attempt that takes everything leaves nothing for the thread.
        #expect(queue.runIfIdle([5]) { _ in nil })
        try await Task.sleep(for: .milliseconds(20))
        #expect(seen.value == [2, 3, 4])
    }

    @Test("a ConditionLock can be tried: it fails while another thread holds the lock and succeeds once released; wait and signal hand over")
    func conditionLockTries() async throws {
        let lock = ConditionLock()
        let holding = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        startThread(named: "test-holder") {
            lock.lock()
            holding.signal()
            release.wait()
            lock.unlock()
        }
        holding.wait()
        #expect(!lock.tryLock(), "taken while another thread held it")
        release.signal()
        var taken = false
        for _ in 0..<2_000 where !taken {
            taken = lock.tryLock()
            if !taken { try await Task.sleep(for: .milliseconds(1)) }
        }
        #expect(taken, "never taken after the holder released it")
        if taken { lock.unlock() }
        // A waiter wakes when signalled, with the lock held again.
        let ready = Locked(false)
        let woke = DispatchSemaphore(value: 0)
        startThread(named: "test-waiter") {
            lock.lock()
            while !ready.value { lock.wait() }
            lock.unlock()
            woke.signal()
        }
        try await Task.sleep(for: .milliseconds(10))
        lock.lock()
        ready.update { $0 = true }
        lock.signal()
        lock.unlock()
        #expect(woke.wait(timeout: .now() + 30) == .success, "the waiter was not woken")
    }

    @Test("a ThreadSlot: each thread sees only what it stored; what it held is released when replaced and when its thread ends")
    func threadSlot() {
        final class Tracked {
            let name: String
            let released: Locked<[String]>
            init(_ name: String, _ released: Locked<[String]>) {
                self.name = name
                self.released = released
            }
            deinit { released.update { $0.append(name) } }
        }
        let released = Locked<[String]>([])
        let slot = ThreadSlot<Tracked>()
        let seen = Locked<[String]>([])
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            seen.update { $0.append(slot.value?.name ?? "none") }
            slot.set(Tracked("first", released))
            slot.set(Tracked("second", released))  // releases "first"
            seen.update { $0.append(slot.value?.name ?? "none") }
            done.signal()
        }  // ends holding "second", which the slot releases then
        thread.start()
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(seen.value == ["none", "second"])
        #expect(slot.value == nil, "another thread's value is visible here")
        for _ in 0..<3_000 where released.value.count < 2 { usleep(1_000) }
        #expect(released.value == ["first", "second"])
    }

    @Test("a ConditionLock with two conditions: a signal on one wakes its waiter and leaves the other's asleep")
    func conditionLockSeparateConditions() async throws {
        let lock = ConditionLock(conditions: 2)
        // Guarded by the lock: how often each waiter came back from a wait, and what it waits for.
        let wakeups = Locked([0, 0])
        let go = Locked([false, false])
        let done = DispatchSemaphore(value: 0)
        for which in 0..<2 {
            startThread(named: "test-waiter-\(which)") {
                lock.lock()
                while !go.value[which] {
                    lock.wait(which)
                    wakeups.update { $0[which] += 1 }
                }
                lock.unlock()
                done.signal()
            }
        }
        try await Task.sleep(for: .milliseconds(20))
        // Wake the second waiter 50 times for nothing: the first must not wake at all.
        for _ in 0..<50 {
            lock.lock()
            lock.broadcast(1)
            lock.unlock()
            try await Task.sleep(for: .milliseconds(1))
        }
        let counted = wakeups.value
        #expect(counted[1] > 0, "the second waiter never woke")
        #expect(counted[0] == 0, "the first waiter woke \(counted[0]) times for signals on the other condition")
        for which in 0..<2 {
            lock.lock()
            go.update { $0[which] = true }
            lock.signal(which)
            lock.unlock()
        }
        #expect(done.wait(timeout: .now() + 30) == .success && done.wait(timeout: .now() + 30) == .success, "a waiter was not woken by its own condition")
    }

    func eventuallyTrue(_ what: String, _ condition: () -> Bool) async throws {
        for _ in 0..<4_000 {
            if condition() { return }
            try await Task.sleep(for: .milliseconds(5))
        }
        Issue.record("timed out waiting for \(what)")
    }
}
}

@Suite("Streams: numbered messages, acknowledgements and resends across lost connections, as pure values")
struct TransportStreamTests {
    @Test("stream frames round trip; malformed ones do not decode")
    func framesRoundTrip() {
        for frame in [TransportStream.Frame.hello(stream: 9, first: 1), .hello(stream: .max, first: .max), .ack(stream: 1, upTo: 0), .ack(stream: 77, upTo: 123_456_789)] {
            let bytes = TransportStream.encode(frame)
            #expect(bytes.first == TransportStream.marker)
            #expect(TransportStream.decode(bytes) == frame)
            #expect(TransportStream.decode(Array(bytes.dropLast())) == nil)
        }
        var unknownKind = TransportStream.encode(.ack(stream: 1, upTo: 2))
        unknownKind[1] = 3
        #expect(TransportStream.decode(unknownKind) == nil)
        #expect(TransportStream.decode(TransportStream.encode(.hello(stream: 1, first: 0))) == nil, "messages are numbered from 1")
        #expect(TransportStream.decode([WireFast.marker] + Array(repeating: 0, count: 17)) == nil)
    }

    @Test("the sender keeps what is not acknowledged and carries it again, oldest first, on a new connection")
    func senderResends() {
        var out = OutboundStream(id: 5)
        #expect(TransportStream.decode(out.connected()) == .hello(stream: 5, first: 1))
        for i in 1...5 { out.sent([UInt8(i)]) }
        out.acknowledged(stream: 5, upTo: 3)
        #expect(Array(out.unacknowledged) == [[4], [5]])
        #expect(out.firstUnacknowledged == 4)
        // Acknowledgements of another stream, of what is gone already, or past what was sent change nothing.
        out.acknowledged(stream: 6, upTo: 5)
        out.acknowledged(stream: 5, upTo: 2)
        out.acknowledged(stream: 5, upTo: 9)
        #expect(Array(out.unacknowledged) == [[4], [5]])
        #expect(TransportStream.decode(out.connected()) == .hello(stream: 5, first: 4))
        #expect(out.nextResend() == [4])
        // Pushed back: the same message is next again.
        out.uncarry()
        #expect(out.nextResend() == [4])
        // Acknowledged while being carried again: what is left still goes, once.
        out.acknowledged(stream: 5, upTo: 4)
        #expect(out.nextResend() == [5])
        #expect(out.nextResend() == nil)
        out.sent([6])
        out.acknowledged(stream: 5, upTo: 6)
        #expect(out.unacknowledged.isEmpty && out.unacknowledgedBytes == 0)
        #expect(TransportStream.decode(out.connected()) == .hello(stream: 5, first: 7))
    }

    @Test("the receiver delivers each number once: what a new connection carries again is dropped up to the last delivered")
    func receiverDropsWhatItHas() {
        var stream = InboundStream(first: 1)
        #expect((1...4).map { stream.accept($0) } == [true, true, true, true])
        #expect(TransportStream.decode(stream.acknowledgement(stream: 8)!) == .ack(stream: 8, upTo: 4))
        #expect(stream.acknowledgement(stream: 8) == nil, "nothing new to acknowledge")
        // A new connection from 3: 3 and 4 were delivered, 5 is new.
        #expect((3...5).map { stream.accept($0) } == [false, false, true])
        #expect(TransportStream.decode(stream.acknowledgement(stream: 8, again: true)!) == .ack(stream: 8, upTo: 5))
        // A stream first seen from 40 (its earlier messages went to another process) starts there.
        var later = InboundStream(first: 40)
        #expect(later.accept(39) == false && later.accept(40) == true)
    }

    @Test("over a seeded lossy link (connections cut, acknowledgements lost), every message is delivered once, in order")
    func lossyLinkDeliversEachOnce() {
        for seed: UInt64 in [1, 2, 3, 41, 977] {
            var random = SeededGenerator(seed: seed)
            var out = OutboundStream(id: 3)
            var stream: InboundStream?
            var next: UInt64 = 0          // the number of the next message the receiver reads on this connection
            var link: [[UInt8]] = [out.connected()]   // in flight on the current connection, in order
            var delivered: [Int] = []
            var queued = 0                // messages given to the sender so far
            let total = 3_000
            var steps = 0
            while delivered.count < total && steps < 200_000 {
                steps += 1
                switch Int.random(in: 0..<100, using: &random) {
                case 0..<40 where queued < total:
                    // Sent: resends first, then a new one.
                    if let again = out.nextResend() { link.append(again); continue }
                    let bytes = withUnsafeBytes(of: UInt32(queued)) { Array($0) }
                    out.sent(bytes)
                    link.append(bytes)
                    queued += 1
                case 0..<80:
                    // The receiver reads what is first on the link.
                    guard !link.isEmpty else { continue }
                    let bytes = link.removeFirst()
                    if case .hello(_, let first)? = TransportStream.decode(bytes) {
                        if stream == nil { stream = InboundStream(first: first) }
                        next = first
                        continue
                    }
                    if stream!.accept(next) { delivered.append(Int(bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })) }
                    next += 1
                case 80..<92:
                    // An acknowledgement, which may be lost.
                    if let ack = stream?.acknowledgement(stream: 3), Bool.random(using: &random),
                       case .ack(let id, let upTo)? = TransportStream.decode(ack) {
                        out.acknowledged(stream: id, upTo: upTo)
                    }
                default:
                    // The connection is cut: what was in flight is gone; a new one starts.
                    link = [out.connected()]
                    while let again = out.nextResend() { link.append(again) }
                }
            }
            #expect(delivered == Array(0..<total), "seed \(seed): \(delivered.count) delivered")
        }
    }
}
