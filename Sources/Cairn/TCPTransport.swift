import CairnCore
import CairnNet
import CairnWire
import DequeModule
import Foundation
import Synchronization

/// Carries the runtime's messages over TCP with the Cairn wire protocol: every endpoint
/// listens on its own port, and every message is encoded (``WireMessages``), framed,
/// checksummed and sent over an authenticated connection.
///
/// Contract (as ``InMemoryTransport``): messages from one sender to one endpoint arrive in the
/// order sent, since each endpoint is reached through one connection fed from one queue.
///
/// Addresses: an endpoint registered here is reached at its own listener; others are learned
/// with ``setAddress(_:host:port:)`` (the head's control store and scheduler, given to a node
/// process when it starts) and from the addresses nodes put in their records, which this
/// transport reads off the `registerNode` and `nodeTable` messages it delivers. A message for
/// an endpoint whose address is not known yet waits for it. ``forget(_:)`` drops an endpoint
/// declared dead, and everything queued for it.
///
/// With `shortcutLocal`, a message for an endpoint registered in this process is handed to its
/// inbox without the network, as ``InMemoryTransport`` does (portability still checked): the
/// multi-process cluster uses TCP only between processes.
///
/// Thread safety (why `@unchecked Sendable` is sound): the tables are guarded by `lock`; each
/// ``Outbound`` guards its own queue.
final class TCPTransport: Transport, @unchecked Sendable {
    /// What an endpoint's inbox thread takes: bytes off a connection, or a message from this process.
    enum Delivery {
        case wire(WireConnection, [UInt8])
        case local(Message)
    }

    let host: String
    let token: ClusterToken
    let epoch: UInt64
    let wire: WireOptions
    /// The name this process gives in its handshakes (`node-3`, `head`): how a peer that sees
    /// the connection close knows who went.
    let name: String
    let shortcutLocal: Bool
    private let log: @Sendable (String) -> Void
    /// Told the peer name of every connection that closed, inbound or outbound.
    private let peerLost: @Sendable (String, CloseReason) -> Void
    private let lock = NSLock()
    private var addresses: [Endpoint: (host: String, port: Int)] = [:]
    private var inboxes: [Endpoint: BatchQueue<Delivery>] = [:]
    private var inboundStreams: [Endpoint: InboundStreams] = [:]
    private var listeners: [Endpoint: WireListener] = [:]
    private var outbound: [Endpoint: Outbound] = [:]
    /// Messages for endpoints whose address is not known yet, in order.
    private var waiting: [Endpoint: [[UInt8]]] = [:]
    private var forgotten: Set<Endpoint> = []
    private var stopped = false

    /// Lanes (``LaneConnection``): with `lanes`, every node endpoint registered here also
    /// accepts lanes on a port of its own (named in its node record), and
    /// ``send(_:to:laneFrom:)`` opens one to a node whose record names its port. A lane carries
    /// only tasks sent straight to a node (`.runDirect`) and, back, their results, each written
    /// by the thread that produced it and read by a thread blocked on the socket: a lone task
    /// then meets no event loop at either end. Everything else, and everything while a lane is
    /// being made or after it failed, goes the usual way.
    let lanes: Bool
    private var laneListeners: [Endpoint: LaneListener] = [:]
    private var laneAddresses: [Endpoint: (host: String, port: Int)] = [:]
    private var handlers: [Endpoint: @Sendable ([Message]) -> Void] = [:]
    private var laneHandlers: [Endpoint: @Sendable ([Message]) -> Void] = [:]
    /// Lanes this process opened, by the endpoint they reach.
    private var outLanes: [Endpoint: OutLane] = [:]
    /// Lanes other processes opened to endpoints here, by the endpoint that opened them.
    private var inLanes: [Endpoint: InLane] = [:]
    /// `inLanes.count`, read without `lock` on every send of results.
    private let inLaneCount = Atomic<Int>(0)
    private let laneSent = Atomic<Int>(0)
    private let laneReceived = Atomic<Int>(0)
    /// Messages this process wrote on lanes and read from them (for tests and benchmarks).
    var laneMessages: (sent: Int, received: Int) { (laneSent.load(ordering: .relaxed), laneReceived.load(ordering: .relaxed)) }
    /// After a lane to an endpoint failed, no new one is tried for this long.
    static let laneRetryNanoseconds: UInt64 = 1_000_000_000

    init(host: String = "127.0.0.1", token: ClusterToken = .generate(), epoch: UInt64 = 1, name: String = "sender",
         shortcutLocal: Bool = false, lanes: Bool = false, wire: WireOptions = WireOptions(), log: @escaping @Sendable (String) -> Void,
         peerLost: @escaping @Sendable (String, CloseReason) -> Void = { _, _ in }) {
        self.lanes = lanes
        self.host = host
        self.token = token
        self.epoch = epoch
        self.name = name
        self.shortcutLocal = shortcutLocal
        self.wire = wire
        let quiet = self.quiet
        self.log = { line in if !quiet.isSet { log(line) } }
        self.peerLost = peerLost
    }

    /// Set by ``quiesce()``: connections closing from here on are expected.
    private let quiet = Latch()

    /// Stops logging lost connections and reporting lost peers: the cluster is stopping its
    /// node processes on purpose.
    func quiesce() {
        quiet.set()
    }

    func register(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void,
                  onEventLoop: (@Sendable ([Message]) -> Bool)?) {
        let log = self.log
        let decode: @Sendable ([Delivery]) -> [Message] = { [weak self] batch in
            var messages: [Message] = []
            messages.reserveCapacity(batch.count)
            for delivery in batch {
                switch delivery {
                case .local(let message):
                    messages.append(message)
                case .wire(let connection, let bytes):
                    do {
                        let (to, message) = try WireMessages.decode(bytes)
                        guard to == endpoint else {
                            log("transport: \(connection) sent a message for \(to) to \(endpoint)'s port; closing")
                            connection.close()
                            continue
                        }
                        self?.learnAddresses(from: message)
                        messages.append(message)
                    } catch {
                        log("transport: \(connection): \(error); closing")
                        connection.close()
                    }
                }
            }
            return messages
        }
        // Messages are decoded on the endpoint's own thread, not on the event loop, which
        // serves every connection of its share.
        let inbox = BatchQueue<Delivery>(name: endpoint.description) { batch in
            let messages = decode(batch)
            if !messages.isEmpty { handler(messages) }
        }
        // A read that brought a little, to an endpoint that takes reads on the event loop
        // (`onEventLoop`), is offered to it when the inbox is idle and the read before came a
        // while ago: a message's way through a process then costs no thread wake-up. A larger
        // read, one behind earlier messages, or one of a stream goes through the inbox, so a
        // long batch never holds up the loop's other connections (nor their heartbeats), and a
        // busy endpoint's thread takes what accumulated at once. What `onEventLoop` declines
        // (it would have to wait) goes to the inbox's thread, ahead of anything queued since.
        let offer: (@Sendable ([Delivery]) -> [Delivery]?)? = onEventLoop.map { onEventLoop in
            { @Sendable (deliveries: [Delivery]) -> [Delivery]? in
                let messages = decode(deliveries)
                if messages.isEmpty || onEventLoop(messages) { return nil }
                return messages.map { Delivery.local($0) }
            }
        }
        // Which messages are new is decided as they are read, before they reach the inbox
        // (see ``TransportStream``).
        let streams = InboundStreams(log: log)
        // (`message` is never called while `batch` is set.)
        let handlers = WireHandlers(message: { connection, bytes in streams.receive(connection, [bytes]) { for p in $0 { inbox.post(.wire(connection, p)) } } },
                                    closed: { [weak self] connection, reason in
                                        streams.closed(connection)
                                        if let peer = connection.peer { self?.notifyLost(peer.name, reason) }
                                    },
                                    log: { log("transport: \($0)") },
                                    batch: { connection, payloads in
                                        streams.receive(connection, payloads) { payloads in
                                            let deliveries = payloads.map { Delivery.wire(connection, $0) }
                                            if let offer, Self.isSmall(payloads),
                                               inbox.runIfIdle(deliveries, quietNanoseconds: Self.inlineQuietNanoseconds, attempt: offer) { return }
                                            for delivery in deliveries { inbox.post(delivery) }
                                        }
                                    })
        let listener: WireListener
        var laneListener: LaneListener?
        do {
            listener = try Wire.listenBlocking(host: host, port: 0, token: token, epoch: epoch, handlers: handlers, options: wire)
            if lanes, case .node = endpoint {
                laneListener = try LaneListener(host: host, token: token, epoch: epoch, name: endpoint.description, log: { log("transport: \($0)") }) { [weak self] lane in
                    self?.serveLane(lane, at: endpoint)
                }
            }
        } catch {
            // `Cluster.local` checked that this host can be listened on; failing now means the
            // machine ran out of ports or descriptors.
            preconditionFailure("cannot listen on \(host) for \(endpoint): \(error)")
        }
        lock.lock()
        self.handlers[endpoint] = handler
        let previousLaneListener = laneListener.flatMap { laneListeners.updateValue($0, forKey: endpoint) }
        let previousInbox = inboxes.updateValue(inbox, forKey: endpoint)
        inboundStreams[endpoint] = streams
        let previousListener = listeners.updateValue(listener, forKey: endpoint)
        addresses[endpoint] = (host, listener.port)
        forgotten.remove(endpoint)
        // Senders reconnect to the new port.
        let previousOutbound = outbound.removeValue(forKey: endpoint)
        let held = waiting.removeValue(forKey: endpoint) ?? []
        lock.unlock()
        previousInbox?.stop()
        previousOutbound?.stop()
        previousListener?.closeBlocking()
        previousLaneListener?.close()
        for bytes in held { sendEncoded(bytes, to: endpoint) }
    }

    /// Reads up to this many messages and bytes may be handled on the event loop.
    static let inlineMessages = 16
    static let inlineBytes = 16 << 10

    /// ... and only when the read before it, on any of the endpoint's connections, came at
    /// least this long before: one message at a time. A stream of small reads (a busy cluster)
    /// goes through the inbox, whose thread takes what accumulated in one batch.
    static let inlineQuietNanoseconds: UInt64 = 100_000

    static func isSmall(_ payloads: [[UInt8]]) -> Bool {
        payloads.count <= inlineMessages && payloads.reduce(0, { $0 + $1.count }) <= inlineBytes
    }

    /// `host:port` of an endpoint registered in this process (what a node puts in its record).
    func localAddress(_ endpoint: Endpoint) -> String? {
        lock.withLock { listeners[endpoint].map { "\(host):\($0.port)" } }
    }

    func lanePort(_ endpoint: Endpoint) -> Int? {
        lock.withLock { laneListeners[endpoint]?.port }
    }

    func registerLaneHandler(_ endpoint: Endpoint, _ handler: @escaping @Sendable ([Message]) -> Void) {
        lock.withLock { laneHandlers[endpoint] = handler }
    }

    /// Where `endpoint` is reached; messages that waited for it are sent.
    func setAddress(_ endpoint: Endpoint, host: String, port: Int) {
        lock.lock()
        if stopped || listeners[endpoint] != nil || forgotten.contains(endpoint) {
            lock.unlock()
            return
        }
        let known = addresses[endpoint]
        if let known, known.host == host, known.port == port {
            lock.unlock()
            return
        }
        addresses[endpoint] = (host, port)
        let previous = outbound.removeValue(forKey: endpoint)
        var held = waiting.removeValue(forKey: endpoint) ?? []
        lock.unlock()
        // What the old address had not yet taken goes to the new one (the endpoint's new
        // process, as when the global scheduler is replaced), in order.
        if let previous { held = previous.stop() + held }
        for bytes in held { sendEncoded(bytes, to: endpoint) }
    }

    /// Drops an endpoint declared dead: its address, its connection and whatever waits for it.
    /// Later messages to it are dropped; registering it again brings it back.
    func forget(_ endpoint: Endpoint) {
        lock.lock()
        forgotten.insert(endpoint)
        addresses[endpoint] = nil
        laneAddresses[endpoint] = nil
        waiting[endpoint] = nil
        let out = outbound.removeValue(forKey: endpoint)
        let lanes = (outLanes.removeValue(forKey: endpoint), removeInLaneLocked(endpoint)?.connection)
        lock.unlock()
        out?.stop()
        // What it carried goes nowhere now: the endpoint is gone (its owner runs it again).
        lanes.0?.close()
        lanes.1?.close()
    }

    private func learnAddresses(from message: Message) {
        switch message {
        case .control(.registerNode(let record)):
            learn(record)
        case .nodeTable(let table):
            for record in table where record.alive { learn(record) }
        case .schedulerAt(let address, _):
            if let (host, port) = Self.split(address) { setAddress(.scheduler, host: host, port: port) }
        default:
            break
        }
    }

    func learn(_ record: NodeRecord) {
        guard let address = record.address, let (host, port) = Self.split(address) else { return }
        if lanes, let lane = record.lane {
            lock.withLock {
                if !forgotten.contains(.node(record.id)) { laneAddresses[.node(record.id)] = (host, lane) }
            }
        }
        setAddress(.node(record.id), host: host, port: port)
    }

    /// `host:port` split at its last colon; nil unless the port is a number.
    static func split(_ address: String) -> (String, Int)? {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
              (1...65_535).contains(port) else { return nil }
        return (String(address[..<colon]), port)
    }

    func send(_ message: Message, to endpoint: Endpoint) {
        if lanes, case .objects(let objects) = message, inLaneCount.load(ordering: .relaxed) > 0,
           let lane = lock.withLock({ inLanes[endpoint] }) {
            // Results of tasks that came by a lane go back by it; the rest the usual way.
            let (mine, others) = lane.take(objects)
            if !mine.isEmpty {
                let bytes = Self.encode(.objects(mine), to: endpoint)
                do {
                    try lane.connection.send(bytes)
                    laneSent.add(1, ordering: .relaxed)
                } catch {
                    sendEncoded(bytes, to: endpoint)
                }
            }
            if !others.isEmpty { sendEncoded(Self.encode(.objects(others), to: endpoint), to: endpoint) }
            return
        }
        if shortcutLocal {
            lock.lock()
            let inbox = inboxes[endpoint]
            lock.unlock()
            if let inbox {
                switch message {
                case .runTasksEncoded, .scheduleEncoded:
                    // Tasks a scheduler read from the wire, forwarded within this process.
                    do {
                        inbox.post(.local(try message.decodedForDelivery))
                    } catch {
                        preconditionFailure("tasks read from the wire do not decode again: \(error)")
                    }
                default:
                    InMemoryTransport.checkPortable(message)
                    learnAddresses(from: message)
                    inbox.post(.local(message))
                }
                return
            }
        }
        sendEncoded(Self.encode(message, to: endpoint), to: endpoint)
    }

    func sendIfEncodedAtOnce(_ message: Message, to endpoint: Endpoint) -> Bool {
        if shortcutLocal {
            lock.lock()
            let local = inboxes[endpoint] != nil
            lock.unlock()
            if local { return false }
        }
        sendEncoded(Self.encode(message, to: endpoint), to: endpoint)
        return true
    }

    /// Encoding traps on a value or task that was not made portable, as InMemoryTransport's check does.
    private static func encode(_ message: Message, to endpoint: Endpoint) -> [UInt8] {
        do {
            return try WireMessages.encode(message, to: endpoint)
        } catch {
            preconditionFailure("a portable message did not encode: \(error)")
        }
    }

    func send(_ message: Message, to endpoint: Endpoint, laneFrom from: Endpoint) {
        guard lanes, case .runDirect(let specs) = message, case .node = endpoint, case .node = from else {
            send(message, to: endpoint)
            return
        }
        let bytes = Self.encode(message, to: endpoint)
        let now = monotonicNanoseconds()
        lock.lock()
        var lane = outLanes[endpoint]
        var opening: (OutLane, host: String, port: Int)?
        if lane?.retryDue(now) ?? true, !stopped, !forgotten.contains(endpoint), let address = laneAddresses[endpoint] {
            let new = OutLane()
            outLanes[endpoint] = new
            lane = new
            opening = (new, address.host, address.port)
        }
        lock.unlock()
        if let opening { openLane(opening.0, to: endpoint, from: from, host: opening.host, port: opening.port) }
        if let lane, lane.send(bytes, tasks: specs.map(\.id)) {
            laneSent.add(1, ordering: .relaxed)
            return
        }
        sendEncoded(bytes, to: endpoint)
    }

    /// Makes `lane` on a thread of its own, which then reads the results it brings back and
    /// hands them to `from`'s handler; when it closes, the tasks it carried and brought no
    /// result for go again the usual way (the node may have run them: a task may run twice,
    /// as after any failure, never zero times).
    private func openLane(_ lane: OutLane, to endpoint: Endpoint, from: Endpoint, host: String, port: Int) {
        let (token, epoch, name) = (self.token, self.epoch, self.name)
        startThread(named: "cairn-lane-out") { [weak self] in
            do {
                let connection = try LaneConnection.connect(host: host, port: port, token: token, name: name, epoch: epoch, serverName: endpoint.description)
                try connection.send(LaneHello(from: from, to: endpoint).encoded)
                if lane.opened(connection) {
                    while let bytes = connection.receive(), let self {
                        guard let (to, message) = try? WireMessages.decode(bytes), to == from, case .objects(let objects) = message else {
                            self.report("the lane to \(endpoint) brought something other than results for \(from); closing it")
                            break
                        }
                        lane.answered(objects.map(\.0))
                        self.laneReceived.add(1, ordering: .relaxed)
                        self.lock.withLock { self.handlers[from] }?([message])
                    }
                }
                connection.close()
            } catch {
                self?.report("no lane to \(endpoint) at \(host):\(port) (\(error)); its tasks go by its listener")
            }
            let left = lane.closed(at: monotonicNanoseconds())
            for bytes in left { self?.sendEncoded(bytes, to: endpoint) }
        }
    }

    /// Reads a lane another process opened to `endpoint`, handing its tasks to the endpoint's
    /// handler on this thread, until it closes.
    private func serveLane(_ connection: LaneConnection, at endpoint: Endpoint) {
        guard let first = connection.receive(), let hello = LaneHello(first), hello.to == endpoint else {
            report("a lane to \(endpoint) from \(connection.peer.name) did not say where it goes; closing it")
            connection.close()
            return
        }
        let lane = InLane(connection)
        let previous: InLane?? = lock.withLock {
            guard !stopped, !forgotten.contains(hello.from) else { return .none }
            let previous = inLanes.updateValue(lane, forKey: hello.from)
            if previous == nil { inLaneCount.add(1, ordering: .relaxed) }
            return .some(previous)
        }
        guard let previous else {
            connection.close()
            return
        }
        previous?.connection.close()
        while let bytes = connection.receive() {
            guard let (to, message) = try? WireMessages.decode(bytes), to == endpoint, case .runDirect(let specs) = message else {
                report("the lane from \(hello.from) to \(endpoint) brought something other than tasks; closing it")
                break
            }
            lane.carried(specs.map(\.id))
            laneReceived.add(1, ordering: .relaxed)
            lock.withLock { laneHandlers[endpoint] ?? handlers[endpoint] }?([message])
        }
        connection.close()
        lock.withLock {
            if inLanes[hello.from] === lane { _ = removeInLaneLocked(hello.from) }
        }
    }

    private func removeInLaneLocked(_ from: Endpoint) -> InLane? {
        guard let lane = inLanes.removeValue(forKey: from) else { return nil }
        inLaneCount.subtract(1, ordering: .relaxed)
        return lane
    }

    private func sendEncoded(_ bytes: [UInt8], to endpoint: Endpoint) {
        lock.lock()
        guard !stopped, !forgotten.contains(endpoint) else {
            lock.unlock()
            return  // as in memory: a message to an endpoint that is gone is dropped
        }
        guard let address = addresses[endpoint] else {
            waiting[endpoint, default: []].append(bytes)
            lock.unlock()
            return
        }
        let out: Outbound
        if let existing = outbound[endpoint] {
            out = existing
        } else {
            out = Outbound(endpoint: endpoint, host: address.host, port: address.port, transport: self)
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
        inboundStreams = [:]
        outbound = [:]
        listeners = [:]
        addresses = [:]
        waiting = [:]
        let lanesOut = Array(outLanes.values)
        let lanesIn = inLanes.values.map(\.connection)
        let laneListening = Array(laneListeners.values)
        outLanes = [:]
        inLanes = [:]
        inLaneCount.store(0, ordering: .relaxed)
        laneListeners = [:]
        handlers = [:]
        laneHandlers = [:]
        lock.unlock()
        outs.forEach { $0.stop() }
        all.forEach { $0.stop() }
        ls.forEach { $0.closeBlocking() }
        laneListening.forEach { $0.close() }
        lanesOut.forEach { $0.close() }
        lanesIn.forEach { $0.close() }
    }

    /// Closes every connection to `endpoint`, here and in this process's senders, as a network
    /// fault would (for tests of what a lost connection loses).
    func dropConnections(to endpoint: Endpoint) {
        let (streams, out) = lock.withLock { (inboundStreams[endpoint], outbound[endpoint]) }
        streams?.closeAll()
        out?.dropConnection()
    }

    /// Closes the lanes other processes opened to endpoints here, as a network fault would (for
    /// tests): what they carried and brought no result for goes again the usual way.
    func dropLanes() {
        let lanes = lock.withLock { Array(inLanes.values) }
        for lane in lanes { lane.connection.close() }
    }

    /// Messages for `endpoint` a connection took and it did not acknowledge (for tests).
    func unacknowledged(to endpoint: Endpoint) -> Int {
        lock.withLock { outbound[endpoint] }?.unacknowledgedCount ?? 0
    }

    fileprivate func report(_ line: String) { log("transport: \(line)") }
    fileprivate func lost(_ endpoint: Endpoint, _ reason: CloseReason) { notifyLost(endpoint.description, reason) }

    private func notifyLost(_ peer: String, _ reason: CloseReason) {
        guard !quiet.isSet, !lock.withLock({ stopped }) else { return }
        peerLost(peer, reason)
    }
}

/// A lane's first message: which endpoint opened it, and which it reaches.
struct LaneHello: Equatable {
    let from: Endpoint
    let to: Endpoint

    init(from: Endpoint, to: Endpoint) {
        self.from = from
        self.to = to
    }

    /// Only node endpoints open and accept lanes.
    var encoded: [UInt8] {
        guard case .node(let f) = from, case .node(let t) = to else { preconditionFailure("lanes join nodes only") }
        var bytes: [UInt8] = Array("lane".utf8)
        for n in [f.raw, t.raw] { withUnsafeBytes(of: Int64(n).littleEndian) { bytes += $0 } }
        return bytes
    }

    init?(_ bytes: [UInt8]) {
        guard bytes.count == 20, bytes.starts(with: Array("lane".utf8)) else { return nil }
        func int(_ at: Int) -> Int {
            Int(Int64(littleEndian: bytes[at..<at + 8].withUnsafeBytes { $0.loadUnaligned(as: Int64.self) }))
        }
        from = .node(NodeID(int(4)))
        to = .node(NodeID(int(12)))
    }
}

/// A lane this process opened: tasks written on it wait in `inFlight` until their results come
/// back on it. Thread safety: every field is guarded by `lock`.
final class OutLane: @unchecked Sendable {
    private let lock = NSLock()
    private var connection_: LaneConnection?
    /// Set once the lane failed or closed: when.
    private var failedAt: UInt64?
    private var inFlight: [ObjectID: [UInt8]] = [:]
    /// Tasks sent straight to a node leave one at a time (``Node``'s `directTask`), so a lane has
    /// one in flight; past this many, the oldest results went another way and are forgotten.
    static let maxInFlight = 64

    /// Whether a new lane should replace this failed one.
    func retryDue(_ now: UInt64) -> Bool {
        lock.withLock { failedAt.map { now &- $0 >= TCPTransport.laneRetryNanoseconds } ?? false }
    }

    /// False if the lane was closed before it opened.
    func opened(_ connection: LaneConnection) -> Bool {
        lock.withLock {
            guard failedAt == nil else { return false }
            connection_ = connection
            return true
        }
    }

    /// Writes `bytes` (carrying `tasks`) on the lane; false if it is not open (send them the usual way).
    func send(_ bytes: [UInt8], tasks: [ObjectID]) -> Bool {
        lock.lock()
        guard failedAt == nil, let connection = connection_ else {
            lock.unlock()
            return false
        }
        if inFlight.count + tasks.count > Self.maxInFlight { inFlight.removeAll() }
        for t in tasks { inFlight[t] = bytes }
        lock.unlock()
        do {
            try connection.send(bytes)
            return true
        } catch {
            // Closed under us: unless its reader already sent them again, the caller does.
            return lock.withLock { tasks.contains { inFlight.removeValue(forKey: $0) != nil } }  == false
        }
    }

    func answered(_ tasks: [ObjectID]) {
        lock.withLock { for t in tasks { inFlight.removeValue(forKey: t) } }
    }

    /// Closes the lane for good, dropping what it carried; one still being made is closed once
    /// made (``opened(_:)`` refuses it).
    func close() {
        let connection: LaneConnection? = lock.withLock {
            failedAt = failedAt ?? 0
            inFlight = [:]
            defer { connection_ = nil }
            return connection_
        }
        connection?.close()
    }

    /// Marks the lane failed; returns the messages of the tasks it carried that are not back.
    func closed(at now: UInt64) -> [[UInt8]] {
        lock.withLock {
            failedAt = now
            connection_ = nil
            var seen = Set<[UInt8]>()
            let left = inFlight.values.filter { seen.insert($0).inserted }
            inFlight = [:]
            return left
        }
    }
}

/// A lane another process opened to an endpoint here, with the tasks it brought whose
/// results have not gone back yet. Thread safety: `tasks` is guarded by `lock`.
final class InLane: @unchecked Sendable {
    let connection: LaneConnection
    private let lock = NSLock()
    private var tasks: Set<ObjectID> = []

    init(_ connection: LaneConnection) {
        self.connection = connection
    }

    func carried(_ ids: [ObjectID]) {
        lock.withLock {
            if tasks.count + ids.count > OutLane.maxInFlight { tasks.removeAll() }
            tasks.formUnion(ids)
        }
    }

    /// Splits results into those of tasks this lane brought (taken off its list) and the rest.
    func take(_ objects: [(ObjectID, StoredValue)]) -> (mine: [(ObjectID, StoredValue)], others: [(ObjectID, StoredValue)]) {
        lock.withLock {
            if tasks.isEmpty { return ([], objects) }
            var mine: [(ObjectID, StoredValue)] = []
            var others: [(ObjectID, StoredValue)] = []
            for o in objects {
                if tasks.remove(o.0) != nil { mine.append(o) } else { others.append(o) }
            }
            return (mine, others)
        }
    }
}

/// The queue and connection to one endpoint. Messages wait here while the connection is being
/// made and while the connection pushes back; one drain at a time keeps them in order. The
/// messages a connection took are kept until the endpoint acknowledges them, and a new
/// connection carries those again first (see ``TransportStream``): a connection lost while
/// both ends live loses nothing, and the endpoint delivers nothing twice.
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
    private var queue: Deque<[UInt8]> = []
    private var stream = OutboundStream(id: UInt64.random(in: 1...UInt64.max))
    /// Set when a connection is made: its first message is the stream's hello.
    private var helloPending = false
    private var draining = false
    private let endpoint: Endpoint
    private let host: String
    private let port: Int
    private weak var transport: TCPTransport?
    private let retry = DispatchQueue(label: "cairn-outbound-retry")
    /// Failed connection attempts in a row (only the first of a streak is logged).
    private var failures = 0

    /// New messages wait in the queue while this many bytes are unacknowledged (an endpoint
    /// that reads but falls behind in acknowledging).
    static let maxUnacknowledgedBytes = 64 << 20

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

    /// Stops for good; returns the messages no connection had taken. (Those a connection took
    /// and the endpoint did not acknowledge are not among them: the endpoint's process may have
    /// handled them before it went.)
    @discardableResult
    func stop() -> [[UInt8]] {
        lock.lock()
        let previous = state
        state = .stopped
        let left = Array(queue)
        queue = []
        stream = OutboundStream(id: stream.id)
        lock.unlock()
        if case .connected(let c) = previous { c.close() }
        return left
    }

    /// Messages taken by a connection and not acknowledged (for tests).
    var unacknowledgedCount: Int { lock.withLock { stream.unacknowledged.count } }

    /// Sends, in order, the stream's hello on a new connection, what earlier connections took
    /// and the endpoint did not acknowledge, then the queue, until everything went or the
    /// connection pushes back.
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
            do {
                if helloPending {
                    try connection.send(stream.connected(), control: true)
                    helloPending = false
                }
                while let bytes = stream.nextResend() {
                    do {
                        try connection.send(bytes)
                    } catch {
                        stream.uncarry()
                        throw error
                    }
                }
                while let bytes = queue.first, stream.unacknowledgedBytes < Self.maxUnacknowledgedBytes {
                    do {
                        try connection.send(bytes)
                    } catch WireSendError.tooLarge(let size, let limit) {
                        // No connection will ever take it.
                        queue.removeFirst()
                        transport?.report("dropped a message of \(size) bytes for \(endpoint): frames carry at most \(limit)")
                        continue
                    }
                    queue.removeFirst()
                    stream.sent(bytes)
                }
                draining = false
                let waiting = !queue.isEmpty
                lock.unlock()
                // Full of unacknowledged messages: an acknowledgement drains again, or this.
                if waiting { retry.asyncAfter(deadline: .now() + .milliseconds(1)) { self.drain() } }
            } catch WireSendError.backpressure {
                draining = false
                lock.unlock()
                retry.asyncAfter(deadline: .now() + .microseconds(200)) { self.drain() }
            } catch {
                // Closed under us: a new connection carries again what was not acknowledged.
                if case .connected(let c) = state, c === connection { state = .idle }
                draining = false
                lock.unlock()
                connection.close()
                retry.asyncAfter(deadline: .now() + .milliseconds(10)) { self.drain() }
            }
        }
    }

    private func connect() {
        guard let transport else { return }
        let (host, port, endpoint) = (self.host, self.port, self.endpoint)
        let handlers = WireHandlers(message: { [weak self] _, bytes in
            self?.acknowledged(bytes)
        }, closed: { [weak self, weak transport] connection, reason in
            self?.closed(connection)
            transport?.lost(endpoint, reason)
        }, log: { [weak transport] in transport?.report($0) })
        let (token, epoch, wire, name) = (transport.token, transport.epoch, transport.wire, transport.name)
        Task {
            do {
                let connection = try await Wire.connect(host: host, port: port, token: token, name: name, epoch: epoch,
                                                        serverName: endpoint.description, handlers: handlers, options: wire)
                let stopped: Bool = lock.withLock {
                    failures = 0
                    guard case .connecting = state else { return true }
                    state = .connected(connection)
                    helloPending = true
                    return false
                }
                if stopped { connection.close() }
                drain()
            } catch {
                let (first, stopped): (Bool, Bool) = lock.withLock {
                    failures += 1
                    if case .connecting = state { state = .idle }
                    if case .stopped = state { return (failures == 1, true) }
                    return (failures == 1, false)
                }
                guard !stopped else { return }
                if first {
                    transport.report("cannot connect to \(endpoint) at \(host):\(port): \(error); retrying every 10 ms")
                    transport.lost(endpoint, .connectionLost("cannot connect: \(error)"))
                }
                retry.asyncAfter(deadline: .now() + .milliseconds(10)) { self.drain() }
            }
        }
    }

    /// A frame from the endpoint: an acknowledgement of the stream (nothing else comes this way).
    private func acknowledged(_ bytes: [UInt8]) {
        guard case .ack(let id, let upTo)? = TransportStream.decode(bytes) else {
            transport?.report("\(endpoint) sent something other than an acknowledgement; ignored")
            return
        }
        let waiting: Bool = lock.withLock {
            let full = stream.unacknowledgedBytes >= Self.maxUnacknowledgedBytes
            stream.acknowledged(stream: id, upTo: upTo)
            return full && !queue.isEmpty
        }
        if waiting { drain() }
    }

    private func closed(_ connection: WireConnection) {
        let again: Bool = lock.withLock {
            guard case .connected(let c) = state, c === connection else { return false }
            state = .idle
            return !queue.isEmpty || !stream.unacknowledged.isEmpty
        }
        if again { drain() }
    }

    /// Closes the current connection, as a network fault would (for tests).
    func dropConnection() {
        if case .connected(let c) = lock.withLock({ state }) { c.close() }
    }
}
