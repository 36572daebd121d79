@testable import Cairn
import CairnCodec
import CairnCore
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
            .runTasks([spec]), .schedule([spec], from: NodeID(1), avoid: [NodeID(3), NodeID(5)]),
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
}
}
