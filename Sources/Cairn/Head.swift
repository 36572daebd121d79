import CairnCodec
import CairnCore
import CairnNet
import CairnWire
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a program outside the cluster asks its head over the head's port
/// (``ClusterOptions/headPort``): the `cairn` CLI, a node joining, a driver connecting.
enum HeadRequest: Codable {
    /// A node joining (a driver's node too): it is given a node ID and everything a node
    /// process needs to know. `host` is the address it will listen on.
    case join(resources: Resources, functions: Set<String>?, host: String)
    /// A global scheduler process joining (`cairn scheduler`), as a standby: it is given what
    /// a scheduler process needs to know. `host` is the address it will listen on.
    case joinScheduler(host: String)
    /// A GCS replica process joining (`cairn gcs`) as a standby of `shard` (nil: the shard with
    /// the fewest replicas): it is given a replica ID and the head's address for replicas.
    case joinReplica(shard: Int?)
    /// The cluster's nodes, actors and GCS chains.
    case status
}

enum HeadReply: Codable {
    case joined(NodeLaunch)
    case status(ClusterReport)
    case refused(String)
}

/// The cluster as its head sees it: what `cairn status` prints.
public struct ClusterReport: Codable, Sendable {
    public struct Node: Codable, Sendable {
        public var id: NodeID
        /// `host:port` of its listener; nil for the head's own node.
        public var address: String?
        public var resources: Resources
        /// Tasks queued there, as last reported.
        public var queued: Int
        public var alive: Bool
    }
    public var nodes: [Node]
    public var actors: [ActorStatus]
    /// The global scheduler processes, the active one first (empty when the scheduler runs in the head).
    public var schedulers: [SchedulerStatus]
    /// One line per GCS shard: its chain, head first (empty with an in-memory control store).
    public var chains: [String]

    /// The report as three plain-text tables.
    public var table: String {
        var lines = ["NODE      ALIVE  QUEUED  RESOURCES                 ADDRESS"]
        for n in nodes {
            lines.append(pad(n.id.description, 10) + pad(n.alive ? "yes" : "no", 7) + pad(String(n.queued), 8)
                         + pad(n.resources.description, 26) + (n.address ?? "(head)"))
        }
        lines.append("")
        lines.append("ACTOR                       TYPE                  NODE      STATE      RESTARTS  CHECKPOINT  LOG")
        if actors.isEmpty { lines.append("(none)") }
        for a in actors {
            lines.append(pad(a.name ?? a.id.description, 28) + pad(a.typeName.split(separator: ".").last.map(String.init) ?? a.typeName, 22)
                         + pad(a.node.description, 10) + pad(a.state.rawValue, 11) + pad(String(a.restarts), 10)
                         + pad(a.checkpointSequence.map(String.init) ?? "-", 12) + String(a.logPosition))
        }
        lines.append("")
        lines.append("SCHEDULER              ROLE")
        if schedulers.isEmpty { lines.append("(in the head)") }
        for s in schedulers { lines.append(pad(s.address, 23) + (s.active ? "active" : "standby")) }
        lines.append("")
        lines.append("GCS CHAINS")
        lines += chains.isEmpty ? ["(in-memory control store: no chains)"] : chains
        return lines.joined(separator: "\n")
    }

    private func pad(_ s: String, _ width: Int) -> String {
        s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
    }
}

/// The head's port: answers joins and status requests, one reply per request, on connections
/// that proved the cluster token.
final class HeadService: Sendable {
    /// Requests are one-shot, so a slow peer is not a dead one: only a long silence closes a connection.
    static let patience = WireOptions.failureDetecting(milliseconds: 10_000)

    let listener: WireListener

    init(host: String, port: Int, token: ClusterToken, log: @escaping @Sendable (String) -> Void,
         handle: @escaping @Sendable (HeadRequest) -> HeadReply) throws {
        let handlers = WireHandlers(message: { connection, bytes in
            let reply: HeadReply
            do {
                reply = handle(try BinaryDecoder().decode(HeadRequest.self, from: bytes))
            } catch {
                reply = .refused("the request does not decode (\(error)); is the client's Cairn version the head's?")
            }
            do {
                try connection.send(try BinaryEncoder().encode(reply))
            } catch {
                log("head: cannot answer \(connection): \(error)")
            }
        }, log: { log("head: \($0)") })
        do {
            listener = try Wire.listenBlocking(host: host, port: port, token: token, epoch: 1, handlers: handlers, options: Self.patience)
        } catch {
            throw CairnError(.invalidArgument, "the head cannot listen on \(host):\(port) (\(error)); is another head running there? choose another port")
        }
    }

    /// Sends one request to the head at `address` and waits for its reply.
    static func request(_ request: HeadRequest, address: String, token: ClusterToken, timeout: Duration = .seconds(10)) async throws -> HeadReply {
        guard let (host, port) = TCPTransport.split(address) else {
            throw CairnError(.invalidArgument, "\"\(address)\" is not HOST:PORT")
        }
        let answer = OneShot<Result<HeadReply, CairnError>>()
        let handlers = WireHandlers(message: { _, bytes in
            answer.fulfil(Result { try BinaryDecoder().decode(HeadReply.self, from: bytes) }
                .mapError { CairnError(.serialization, "the head's reply does not decode: \($0)") })
        }, closed: { _, reason in
            answer.fulfil(.failure(CairnError(.shutDown, "the head at \(address) closed the connection: \(reason)")))
        }, log: { _ in })
        let connection: WireConnection
        do {
            connection = try await Wire.connect(host: host, port: port, token: token, name: "client-\(getpid())", epoch: 1, handlers: handlers,
                                                options: Self.patience)
        } catch {
            throw CairnError(.shutDown, "cannot reach a Cairn head at \(address) (\(error)); is it running, and is the token file its own?")
        }
        defer { connection.close() }
        do {
            try connection.send(try BinaryEncoder().encode(request))
        } catch {
            throw CairnError(.shutDown, "the connection to the head at \(address) ended before the request went out (\(error)); try again")
        }
        return try await answer.value(timeout: timeout, what: "the head at \(address)").get()
    }
}

/// A value set once by one thread and awaited by another.
final class OneShot<Value: Sendable>: Sendable {
    private let state = Mutex<(value: Value?, waiter: CheckedContinuation<Value?, Never>?)>((nil, nil))

    func fulfil(_ value: Value) {
        let waiter: CheckedContinuation<Value?, Never>? = state.withLock { s in
            guard s.value == nil else { return nil }
            s.value = value
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume(returning: value)
    }

    func value(timeout: Duration, what: String) async throws -> Value {
        let timer = Task {
            try? await Task.sleep(for: timeout)
            let waiter: CheckedContinuation<Value?, Never>? = state.withLock { s in
                let w = s.waiter
                s.waiter = nil
                return w
            }
            waiter?.resume(returning: nil)
        }
        defer { timer.cancel() }
        let value: Value? = await withCheckedContinuation { continuation in
            let ready: Value? = state.withLock { s in
                if let v = s.value { return v }
                s.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
        guard let value else { throw CairnError(.timeout, "\(what) did not answer within \(timeout)") }
        return value
    }
}
