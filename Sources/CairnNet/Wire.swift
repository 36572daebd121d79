import CairnCore
import CairnWire
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Settings of the TCP shell around ``ConnectionCore``.
public struct WireOptions: Sendable {
    /// The clock tick driving heartbeats and the silence timeout.
    public var tick: TimeAmount
    /// Heartbeat and timeout in ticks, and the frame size limit. The defaults (10 ms ticks,
    /// heartbeat after 50 ms idle, dead after 250 ms silent) declare a silent peer dead within
    /// 300 ms; a peer whose socket closes is noticed at once.
    public var connection: ConnectionCore.Options
    /// Bytes that may wait to be written on one connection; beyond it `send` throws
    /// ``WireSendError/backpressure(pendingBytes:)`` until the peer reads. A single larger
    /// message is accepted when nothing is waiting.
    public var maxPendingBytes: Int

    public init(tick: TimeAmount = .milliseconds(10), connection: ConnectionCore.Options = .init(heartbeatTicks: 5, timeoutTicks: 25),
                maxPendingBytes: Int = 4 << 20) {
        self.tick = tick
        self.connection = connection
        self.maxPendingBytes = maxPendingBytes
    }
}

/// What a listener or a connection reports, on its event loop thread; keep these quick.
public struct WireHandlers: Sendable {
    /// Writes a log line to standard error.
    public static let standardError: @Sendable (String) -> Void = { line in
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    public var established: @Sendable (WireConnection) -> Void
    public var message: @Sendable (WireConnection, [UInt8]) -> Void
    /// If set, messages are delivered here instead of to ``message``: everything one read off
    /// the socket brought, in order, as one batch (at the end of the read, and before a close
    /// is reported).
    public var batch: (@Sendable (WireConnection, [[UInt8]]) -> Void)?
    public var closed: @Sendable (WireConnection, CloseReason) -> Void
    /// One line per refused or lost connection, with the reason.
    public var log: @Sendable (String) -> Void

    public init(established: @escaping @Sendable (WireConnection) -> Void = { _ in },
                message: @escaping @Sendable (WireConnection, [UInt8]) -> Void,
                closed: @escaping @Sendable (WireConnection, CloseReason) -> Void = { _, _ in },
                log: @escaping @Sendable (String) -> Void = WireHandlers.standardError,
                batch: (@Sendable (WireConnection, [[UInt8]]) -> Void)? = nil) {
        self.established = established
        self.message = message
        self.batch = batch
        self.closed = closed
        self.log = log
    }
}

/// Why a message could not be queued for sending.
public enum WireSendError: Error, Sendable, Equatable {
    /// The handshake has not finished.
    case notEstablished
    /// The connection is closed; its close reason was reported to ``WireHandlers/closed``.
    case closed
    /// More than ``WireOptions/maxPendingBytes`` are waiting to be written: the peer is not
    /// reading fast enough. Retry later or slow down.
    case backpressure(pendingBytes: Int)
    /// The message exceeds the frame size limit.
    case tooLarge(bytes: Int, limit: Int)
}

/// One established or establishing TCP connection speaking the Cairn wire protocol.
///
/// Thread safety (why `@unchecked Sendable` is sound): `status` is behind a lock; the
/// protocol state lives in the channel handler, touched only on the channel's event loop.
public final class WireConnection: @unchecked Sendable, CustomStringConvertible {
    struct Status {
        var peer: PeerIdentity?
        var closed = false
        var pendingBytes = 0
        var handler: NIOLoopBound<WireHandler>?
        /// Messages queued by `send`, written by the next flush on the event loop: one write
        /// and one flush for everything queued since the last, not one per message.
        var outbox: [[UInt8]] = []
        var flushScheduled = false
    }

    let channel: any Channel
    let options: WireOptions
    let status = Locked(Status())
    /// The other end's address, for logs.
    public var remoteAddress: String { channel.remoteAddress?.description ?? "unknown address" }

    init(channel: any Channel, options: WireOptions) {
        self.channel = channel
        self.options = options
    }

    /// The peer, once the handshake has succeeded.
    public var peer: PeerIdentity? { status.value.peer }

    /// Whether the connection has ended (its reason went to ``WireHandlers/closed``).
    public var isClosed: Bool { status.value.closed }

    public var description: String {
        let peer = self.peer.map { "\($0.name) (epoch \($0.epoch))" } ?? "unauthenticated peer"
        return "\(peer) at \(remoteAddress)"
    }

    /// Queues a message. Messages on one connection arrive in the order sent.
    ///
    /// A `control` message is never refused for ``WireSendError/backpressure(pendingBytes:)``:
    /// it still waits behind what is queued, but a peer that reads slowly gets it. For small,
    /// infrequent messages that keep a protocol alive (leases, reports, configurations), which
    /// must not be lost because bulk data filled the connection.
    public func send(_ payload: [UInt8], control: Bool = false) throws(WireSendError) {
        let limit = options.connection.maxPayload
        guard payload.count <= limit else { throw .tooLarge(bytes: payload.count, limit: limit) }
        let size = payload.count + WireFormat.headerSize
        // Queued, and a flush scheduled unless one already is (it will take this message too).
        let queued: Result<NIOLoopBound<WireHandler>?, WireSendError> = status.update { s in
            if s.closed { return .failure(.closed) }
            if s.peer == nil { return .failure(.notEstablished) }
            // A message larger than the limit still goes when nothing is pending, or it never could.
            if !control && s.pendingBytes > 0 && s.pendingBytes + size > options.maxPendingBytes { return .failure(.backpressure(pendingBytes: s.pendingBytes)) }
            s.pendingBytes += size
            s.outbox.append(payload)
            guard !s.flushScheduled else { return .success(nil) }
            s.flushScheduled = true
            return .success(s.handler)
        }
        guard let handler = try queued.get() else { return }
        // Even on the event loop the write waits for the loop's next turn (which costs no
        // wake-up): a sender called from a delivery may hold its own locks, and a failed write
        // reports the close at once, into code that may take them again.
        channel.eventLoop.execute { handler.value.flush() }
    }

    /// Runs `body` on the connection's event loop after `microseconds` (a timer of the loop's
    /// own, which costs no thread of its own).
    public func schedule(afterMicroseconds microseconds: Int64, _ body: @escaping @Sendable () -> Void) {
        channel.eventLoop.scheduleTask(in: .microseconds(microseconds), body)
    }

    /// Closes the connection; ``WireHandlers/closed`` is called with the reason.
    public func close() {
        channel.close(promise: nil)
    }
}

/// The channel handler: runs one ``ConnectionCore`` on the channel's event loop.
final class WireHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var core: ConnectionCore
    private let connection: WireConnection
    private let handlers: WireHandlers
    private var context: ChannelHandlerContext?
    private var ticker: RepeatedTask?
    /// Messages of the current read, for ``WireHandlers/batch``.
    private var delivered: [[UInt8]] = []
    /// Completed when the handshake succeeds, failed if the connection ends first (clients only).
    var established: EventLoopPromise<WireConnection>?

    init(core: ConnectionCore, connection: WireConnection, handlers: WireHandlers) {
        self.core = core
        self.connection = connection
        self.handlers = handlers
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        ticker = context.eventLoop.scheduleRepeatedTask(initialDelay: connection.options.tick, delay: connection.options.tick) { _ in
            bound.value.perform(bound.value.core.tick())
        }
    }

    func channelActive(context: ChannelHandlerContext) {
        perform(core.connected())
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = Self.unwrapInboundIn(data)
        perform(core.received(buffer.readableBytesView))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        deliverBatch()
        context.fireChannelReadComplete()
    }

    private func deliverBatch() {
        guard !delivered.isEmpty, let batch = handlers.batch else { return }
        let messages = delivered
        delivered = []
        batch(connection, messages)
    }

    func channelInactive(context: ChannelHandlerContext) {
        perform(core.disconnected())
        ticker?.cancel()
        ticker = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        handlers.log("cairn wire: \(connection): \(error); closing")
        context.close(promise: nil)
    }

    /// Writes everything queued by ``WireConnection/send(_:)`` as one write.
    func flush() {
        let queued: [[UInt8]] = connection.status.update { s in
            s.flushScheduled = false
            defer { s.outbox = [] }
            return s.outbox
        }
        guard !queued.isEmpty else { return }
        let size = queued.reduce(0) { $0 + $1.count + WireFormat.headerSize }
        guard let context else {
            connection.status.update { $0.pendingBytes -= size }
            return
        }
        var buffer = context.channel.allocator.buffer(capacity: size)
        for payload in queued {
            guard let bytes = core.send(payload) else { break }
            buffer.writeBytes(bytes)
        }
        let promise = context.eventLoop.makePromise(of: Void.self)
        let connection = self.connection
        promise.futureResult.whenComplete { _ in connection.status.update { $0.pendingBytes -= size } }
        context.writeAndFlush(Self.wrapOutboundOut(buffer), promise: promise)
    }

    private func perform(_ actions: [ConnectionAction]) {
        guard let context else { return }
        for action in actions {
            switch action {
            case .write(let bytes):
                context.writeAndFlush(Self.wrapOutboundOut(context.channel.allocator.buffer(bytes: bytes)), promise: nil)
            case .established(let peer):
                connection.status.update { $0.peer = peer }
                handlers.established(connection)
                established?.succeed(connection)
                established = nil
            case .deliver(let payload):
                if handlers.batch != nil { delivered.append(payload) } else { handlers.message(connection, payload) }
            case .closed(let reason):
                deliverBatch()
                connection.status.update { s in
                    s.closed = true
                    s.handler = nil  // the handler and the connection refer to each other
                }
                if case .connectionLost = reason {} else { handlers.log("cairn wire: closing \(connection): \(reason)") }
                handlers.closed(connection, reason)
                established?.fail(WireRefused(reason: reason))
                established = nil
                ticker?.cancel()
                ticker = nil
                context.close(promise: nil)
            }
        }
    }
}

/// The connection ended before its handshake succeeded.
public struct WireRefused: Error, Sendable, CustomStringConvertible {
    public let reason: CloseReason
    public var description: String { "connection refused: \(reason)" }
}

/// A listening socket accepting Cairn wire connections.
public final class WireListener: Sendable {
    let channel: any Channel
    /// The port it listens on (useful when asked for port 0).
    public let port: Int

    init(channel: any Channel) {
        self.channel = channel
        port = channel.localAddress?.port ?? 0
    }

    /// Stops accepting; connections already accepted stay open.
    public func close() async throws {
        try await channel.close()
    }

    /// ``close()`` for synchronous callers, which it blocks. Never call it on an event loop.
    public func closeBlocking() {
        try? channel.close().wait()
    }
}

/// Entry points of the TCP shell.
public enum Wire {
    /// The event loops connections run on by default: NIO's shared group, each loop at the
    /// process's priority. Its threads start at the nice value of the thread that first uses
    /// the group, which may be a low-priority task's (see ``takeProcessPriority()``).
    public static let eventLoops: MultiThreadedEventLoopGroup = {
        let group = MultiThreadedEventLoopGroup.singleton
        for loop in group.makeIterator() { loop.execute { takeProcessPriority() } }
        return group
    }()

    static func nonce() -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        return (0..<Handshake.nonceSize).map { _ in UInt8.random(in: 0...255, using: &rng) }
    }

    /// Listens on `host:port` (port 0: any free port). Every accepted connection must prove
    /// `token` before any message is delivered; others are refused and logged.
    public static func listen(host: String, port: Int, token: ClusterToken, epoch: UInt64,
                              acceptEpoch: @escaping @Sendable (PeerIdentity) -> Bool = { _ in true },
                              handlers: WireHandlers, options: WireOptions = WireOptions(),
                              group: any EventLoopGroup = Wire.eventLoops) async throws -> WireListener {
        WireListener(channel: try await bind(host: host, port: port, token: token, epoch: epoch, acceptEpoch: acceptEpoch,
                                             handlers: handlers, options: options, group: group).get())
    }

    /// ``listen(host:port:token:epoch:acceptEpoch:handlers:options:group:)`` for synchronous
    /// callers, which it blocks until the socket is bound. Never call it on an event loop.
    public static func listenBlocking(host: String, port: Int, token: ClusterToken, epoch: UInt64,
                                      acceptEpoch: @escaping @Sendable (PeerIdentity) -> Bool = { _ in true },
                                      handlers: WireHandlers, options: WireOptions = WireOptions(),
                                      group: any EventLoopGroup = Wire.eventLoops) throws -> WireListener {
        WireListener(channel: try bind(host: host, port: port, token: token, epoch: epoch, acceptEpoch: acceptEpoch,
                                       handlers: handlers, options: options, group: group).wait())
    }

    private static func bind(host: String, port: Int, token: ClusterToken, epoch: UInt64,
                             acceptEpoch: @escaping @Sendable (PeerIdentity) -> Bool,
                             handlers: WireHandlers, options: WireOptions, group: any EventLoopGroup) -> EventLoopFuture<any Channel> {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let connection = WireConnection(channel: channel, options: options)
                    let core = ConnectionCore.server(ServerHandshake(token: token, epoch: epoch, nonce: nonce(), acceptEpoch: acceptEpoch),
                                                     options: options.connection)
                    let handler = WireHandler(core: core, connection: connection, handlers: handlers)
                    connection.status.update { $0.handler = NIOLoopBound(handler, eventLoop: channel.eventLoop) }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .bind(host: host, port: port)
    }

    /// Connects to `host:port`, runs the handshake as `name` at `epoch`, and returns once the
    /// server has proved the token too; throws ``WireRefused`` if it does not.
    public static func connect(host: String, port: Int, token: ClusterToken, name: String, epoch: UInt64,
                               serverName: String? = nil, handlers: WireHandlers, options: WireOptions = WireOptions(),
                               group: any EventLoopGroup = Wire.eventLoops) async throws -> WireConnection {
        let promise = group.next().makePromise(of: WireConnection.self)
        let server = serverName ?? "\(host):\(port)"
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let connection = WireConnection(channel: channel, options: options)
                    let core = ConnectionCore.client(ClientHandshake(token: token, name: name, epoch: epoch, nonce: nonce(), serverName: server),
                                                     options: options.connection)
                    let handler = WireHandler(core: core, connection: connection, handlers: handlers)
                    handler.established = promise
                    connection.status.update { $0.handler = NIOLoopBound(handler, eventLoop: channel.eventLoop) }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port).get()
        } catch {
            promise.fail(error)
            throw error
        }
        _ = channel
        // The handler fulfils the promise: established, or refused / lost before that.
        return try await promise.futureResult.get()
    }
}
