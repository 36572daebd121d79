/// One connection's protocol, either side: the handshake, then messages and heartbeats, with
/// failure detection by silence. A pure value: the shell feeds it received bytes and clock
/// ticks and carries out the ``ConnectionAction``s it returns.
///
/// Liveness: after the handshake each side sends a heartbeat when it has sent nothing for
/// `heartbeatTicks`, and declares the peer dead (closing the connection) when it has received
/// nothing for `timeoutTicks`. A peer that closes its socket or dies with its process is
/// noticed sooner, by the shell, as connection loss.
public struct ConnectionCore: Sendable {
    public struct Options: Sendable {
        /// Largest frame payload accepted.
        public var maxPayload = WireFormat.defaultMaxPayload
        /// Send a heartbeat after this many ticks without sending anything.
        public var heartbeatTicks = 5
        /// Close after this many ticks without receiving anything (including during the handshake).
        public var timeoutTicks = 25

        public init(maxPayload: Int = WireFormat.defaultMaxPayload, heartbeatTicks: Int = 5, timeoutTicks: Int = 25) {
            precondition(heartbeatTicks >= 1 && timeoutTicks > heartbeatTicks, "timeoutTicks must exceed heartbeatTicks, both at least 1")
            self.maxPayload = maxPayload
            self.heartbeatTicks = heartbeatTicks
            self.timeoutTicks = timeoutTicks
        }
    }

    enum Role: Sendable {
        case client(ClientHandshake)
        case server(ServerHandshake)
        case open(PeerIdentity)
        case closed
    }

    private var role: Role
    private var decoder: FrameDecoder
    private let options: Options
    private var ticksSinceSent = 0
    private var ticksSinceReceived = 0
    private var started = false

    public static func client(_ handshake: ClientHandshake, options: Options = Options()) -> ConnectionCore {
        ConnectionCore(role: .client(handshake), options: options)
    }

    public static func server(_ handshake: ServerHandshake, options: Options = Options()) -> ConnectionCore {
        ConnectionCore(role: .server(handshake), options: options)
    }

    private init(role: Role, options: Options) {
        self.role = role
        self.options = options
        decoder = FrameDecoder(maxPayload: options.maxPayload)
    }

    /// The peer, once the handshake has succeeded.
    public var peer: PeerIdentity? {
        if case .open(let p) = role { return p }
        return nil
    }

    public var isClosed: Bool {
        if case .closed = role { return true }
        return false
    }

    /// Call once the socket is connected: the client sends its hello. Later calls do nothing.
    public mutating func connected() -> [ConnectionAction] {
        guard !started, case .client(var handshake) = role else { return [] }
        started = true
        let actions = handshake.start()
        role = .client(handshake)
        return translate(actions)
    }

    /// Bytes from the socket.
    public mutating func received<Bytes: Sequence>(_ bytes: Bytes) -> [ConnectionAction] where Bytes.Element == UInt8 {
        guard !isClosed else { return [] }
        ticksSinceReceived = 0
        decoder.feed(bytes)
        var out: [ConnectionAction] = []
        while !isClosed {
            let frame: Frame
            do {
                guard let next = try decoder.next() else { break }
                frame = next
            } catch {
                out += close(error)
                break
            }
            out += handle(frame)
        }
        return out
    }

    /// A message to send; refused (nil) unless the handshake is over.
    public mutating func send(_ payload: [UInt8]) -> [UInt8]? {
        guard case .open = role else { return nil }
        guard payload.count <= options.maxPayload else {
            preconditionFailure("a message of \(payload.count) bytes exceeds the wire limit of \(options.maxPayload); check before sending")
        }
        ticksSinceSent = 0
        return Frame(.message, payload).encoded
    }

    /// One clock tick (the shell's heartbeat interval divided by `heartbeatTicks`).
    public mutating func tick() -> [ConnectionAction] {
        guard !isClosed else { return [] }
        ticksSinceReceived += 1
        ticksSinceSent += 1
        if ticksSinceReceived >= options.timeoutTicks {
            let what = peer.map { "\($0.name) (epoch \($0.epoch))" } ?? "the peer"
            role = .closed
            return [.closed(.timedOut("nothing received from \(what) for \(ticksSinceReceived) ticks: declared dead"))]
        }
        if case .open = role, ticksSinceSent >= options.heartbeatTicks {
            ticksSinceSent = 0
            return [.write(Frame(.heartbeat).encoded)]
        }
        return []
    }

    /// The shell saw the socket close or fail.
    public mutating func disconnected() -> [ConnectionAction] {
        guard !isClosed else { return [] }
        let what = peer.map { "\($0.name) (epoch \($0.epoch))" } ?? "the peer"
        role = .closed
        return [.closed(.connectionLost("connection to \(what) lost"))]
    }

    private mutating func handle(_ frame: Frame) -> [ConnectionAction] {
        switch role {
        case .client(var handshake):
            let actions = handshake.receive(frame)
            role = .client(handshake)
            return translate(actions)
        case .server(var handshake):
            let actions = handshake.receive(frame)
            role = .server(handshake)
            return translate(actions)
        case .open(let peer):
            switch frame.kind {
            case .message: return [.deliver(frame.payload)]
            case .heartbeat: return []
            case .refused:
                role = .closed
                return [.closed(.refused(WireError(.protocolViolation, "\(peer.name) closed the connection: \(String(decoding: frame.payload, as: UTF8.self))")))]
            default:
                return close(WireError(.protocolViolation, "\(frame.kind) frame from \(peer.name) after the handshake"))
            }
        case .closed:
            return []
        }
    }

    private mutating func translate(_ actions: [HandshakeAction]) -> [ConnectionAction] {
        var out: [ConnectionAction] = []
        for action in actions {
            switch action {
            case .send(let frame):
                ticksSinceSent = 0
                out.append(.write(frame.encoded))
            case .established(let peer):
                role = .open(peer)
                out.append(.established(peer))
            case .close(let error):
                role = .closed
                out.append(.closed(.refused(error)))
            }
        }
        return out
    }

    /// Tells the peer why, then closes.
    private mutating func close(_ error: WireError) -> [ConnectionAction] {
        role = .closed
        return [.write(Frame(.refused, Array(error.description.utf8)).encoded), .closed(.refused(error))]
    }
}

/// What a connection core asks its shell to do.
public enum ConnectionAction: Sendable, Equatable {
    /// Write these bytes to the socket.
    case write([UInt8])
    /// The handshake succeeded with this peer.
    case established(PeerIdentity)
    /// A message arrived.
    case deliver([UInt8])
    /// Close the socket (after the writes before this); the reason is for the log.
    case closed(CloseReason)
}

/// Why a connection ended.
public enum CloseReason: Sendable, Equatable, CustomStringConvertible {
    /// A protocol error, a failed handshake or the peer's refusal.
    case refused(WireError)
    /// Nothing was received for the timeout: the peer is presumed dead.
    case timedOut(String)
    /// The socket closed or failed.
    case connectionLost(String)

    public var description: String {
        switch self {
        case .refused(let e): return e.description
        case .timedOut(let s): return "timed out: \(s)"
        case .connectionLost(let s): return s
        }
    }
}
