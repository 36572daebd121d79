import CairnCore
import CairnNet
import CairnWire
import Foundation

/// Carries the runtime's messages over TCP with the Cairn wire protocol: every endpoint
/// listens on its own port, and every message is encoded (``WireMessages``), framed,
/// checksummed and sent over an authenticated connection, even between endpoints of one
/// process.
///
/// Contract (as ``InMemoryTransport``): messages from one sender to one endpoint arrive in the
/// order sent, since each endpoint is reached through one connection fed from one queue.
/// Addresses are known in-process for now (the endpoints this transport registered); the
/// multi-process cluster will take them from the node table.
///
/// Thread safety (why `@unchecked Sendable` is sound): the tables are guarded by `lock`; each
/// ``Outbound`` guards its own queue.
final class TCPTransport: Transport, @unchecked Sendable {
    let host: String
    let token: ClusterToken
    let epoch: UInt64
    let wire: WireOptions
    private let log: @Sendable (String) -> Void
    private let lock = NSLock()
    private var ports: [Endpoint: Int] = [:]
    private var inboxes: [Endpoint: BatchQueue<(WireConnection, [UInt8])>] = [:]
    private var listeners: [Endpoint: WireListener] = [:]
    private var outbound: [Endpoint: Outbound] = [:]
    private var stopped = false

    init(host: String = "127.0.0.1", token: ClusterToken = .generate(), epoch: UInt64 = 1,
         wire: WireOptions = WireOptions(), log: @escaping @Sendable (String) -> Void) {
        self.host = host
        self.token = token
        self.epoch = epoch
        self.wire = wire
        self.log = log
    }

    func register(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void) {
        let log = self.log
        // Messages are decoded on the endpoint's own thread, not on the event loop, which
        // serves every connection of its share.
        let inbox = BatchQueue<(WireConnection, [UInt8])>(name: endpoint.description) { batch in
            var messages: [Message] = []
            messages.reserveCapacity(batch.count)
            for (connection, bytes) in batch {
                do {
                    let (to, message) = try WireMessages.decode(bytes)
                    guard to == endpoint else {
                        log("transport: \(connection) sent a message for \(to) to \(endpoint)'s port; closing")
                        connection.close()
                        continue
                    }
                    messages.append(message)
                } catch {
                    log("transport: \(connection): \(error); closing")
                    connection.close()
                }
            }
            if !messages.isEmpty { handler(messages) }
        }
        let handlers = WireHandlers(message: { connection, bytes in inbox.post((connection, bytes)) },
                                    log: { log("transport: \($0)") })
        let listener: WireListener
        do {
            listener = try Wire.listenBlocking(host: host, port: 0, token: token, epoch: epoch, handlers: handlers, options: wire)
        } catch {
            // `Cluster.local` checked that this host can be listened on; failing now means the
            // machine ran out of ports or descriptors.
            preconditionFailure("cannot listen on \(host) for \(endpoint): \(error)")
        }
        lock.lock()
        let previousInbox = inboxes.updateValue(inbox, forKey: endpoint)
        let previousListener = listeners.updateValue(listener, forKey: endpoint)
        ports[endpoint] = listener.port
        // Senders reconnect to the new port.
        let previousOutbound = outbound.removeValue(forKey: endpoint)
        lock.unlock()
        previousInbox?.stop()
        previousOutbound?.stop()
        previousListener?.closeBlocking()
    }

    func send(_ message: Message, to endpoint: Endpoint) {
        // Encoding traps on a value or task that was not made portable, as InMemoryTransport's check does.
        let bytes: [UInt8]
        do {
            bytes = try WireMessages.encode(message, to: endpoint)
        } catch {
            preconditionFailure("a portable message did not encode: \(error)")
        }
        lock.lock()
        guard !stopped, let port = ports[endpoint] else {
            lock.unlock()
            return  // as in memory: a message to an endpoint nobody registered is dropped
        }
        let out: Outbound
        if let existing = outbound[endpoint] {
            out = existing
        } else {
            out = Outbound(endpoint: endpoint, host: host, port: port, transport: self)
            outbound[endpoint] = out
        }
        lock.unlock()
        out.send(bytes)
    }

    func shutdown() {
        lock.lock()
        stopped = true
        let all = Array(inboxes.values)
        let outs = Array(outbound.values)
        let ls = Array(listeners.values)
        inboxes = [:]
        outbound = [:]
        listeners = [:]
        ports = [:]
        lock.unlock()
        outs.forEach { $0.stop() }
        all.forEach { $0.stop() }
        ls.forEach { $0.closeBlocking() }
    }

    fileprivate func report(_ line: String) { log("transport: \(line)") }
}

/// The queue and connection to one endpoint. Messages wait here while the connection is being
/// made and while the connection pushes back; one drain at a time keeps them in order.
///
/// Thread safety (why `@unchecked Sendable` is sound): every field is guarded by `lock`.
final class Outbound: @unchecked Sendable {
    enum State {
        case idle
        case connecting
        case connected(WireConnection)
        case stopped
    }

    private let lock = NSLock()
    private var state = State.idle
    private var queue: [[UInt8]] = []
    private var draining = false
    private let endpoint: Endpoint
    private let host: String
    private let port: Int
    private weak var transport: TCPTransport?
    private let retry = DispatchQueue(label: "cairn-outbound-retry")

    init(endpoint: Endpoint, host: String, port: Int, transport: TCPTransport) {
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self.transport = transport
    }

    func send(_ bytes: [UInt8]) {
        lock.lock()
        if case .stopped = state {
            lock.unlock()
            return
        }
        queue.append(bytes)
        lock.unlock()
        drain()
    }

    func stop() {
        lock.lock()
        let previous = state
        state = .stopped
        queue = []
        lock.unlock()
        if case .connected(let c) = previous { c.close() }
    }

    /// Sends what is queued, in order, until the queue is empty or the connection pushes back.
    private func drain() {
        lock.lock()
        guard !draining else {
            lock.unlock()
            return
        }
        switch state {
        case .stopped, .connecting:
            lock.unlock()
            return
        case .idle:
            state = .connecting
            lock.unlock()
            connect()
            return
        case .connected(let connection):
            draining = true
            while !queue.isEmpty {
                do {
                    try connection.send(queue[0])
                    queue.removeFirst()
                } catch WireSendError.backpressure {
                    draining = false
                    lock.unlock()
                    retry.asyncAfter(deadline: .now() + .microseconds(200)) { self.drain() }
                    return
                } catch {
                    // Closed under us: reconnect and resend what has not been handed over.
                    state = .idle
                    draining = false
                    lock.unlock()
                    retry.asyncAfter(deadline: .now() + .milliseconds(10)) { self.drain() }
                    return
                }
            }
            draining = false
            lock.unlock()
        }
    }

    private func connect() {
        guard let transport else { return }
        let (host, port, endpoint) = (self.host, self.port, self.endpoint)
        let handlers = WireHandlers(message: { _, _ in }, closed: { [weak self] _, reason in
            self?.closed(reason)
        }, log: { [weak transport] in transport?.report($0) })
        let (token, epoch, wire) = (transport.token, transport.epoch, transport.wire)
        Task {
            do {
                let connection = try await Wire.connect(host: host, port: port, token: token, name: "sender", epoch: epoch,
                                                        serverName: endpoint.description, handlers: handlers, options: wire)
                lock.withLock {
                    if case .connecting = state { state = .connected(connection) }
                }
                drain()
            } catch {
                transport.report("cannot connect to \(endpoint) at \(host):\(port): \(error); retrying")
                lock.withLock {
                    if case .connecting = state { state = .idle }
                }
                retry.asyncAfter(deadline: .now() + .milliseconds(10)) { self.drain() }
            }
        }
    }

    private func closed(_ reason: CloseReason) {
        let again: Bool = lock.withLock {
            if case .connected = state {
                state = .idle
                return !queue.isEmpty
            }
            return false
        }
        if again { drain() }
    }
}
