/// The opening of every connection: both sides prove they know the cluster token without
/// sending it, and the client states who it is and which incarnation (epoch) it is.
///
/// ```
/// client                                   server
///   hello(version, epoch, clientNonce, name) →
///                                          ← challenge(serverNonce)
///   proof(HMAC(token, "client" · hello · serverNonce)) →
///                                          ← welcome(epoch, HMAC(token, "server" · clientNonce · serverNonce))
/// ```
///
/// The proofs bind fresh nonces from both sides, so a recorded handshake cannot be replayed,
/// and the client checks the server's proof too. Until the handshake ends, any other frame
/// ends the connection. Both sides are pure state machines: frames in, ``HandshakeAction``s
/// out, nonces given by the caller.
public enum Handshake {
    public static let protocolVersion: UInt16 = 1
    public static let nonceSize = 32
    static let clientLabel = Array("cairn/client".utf8)
    static let serverLabel = Array("cairn/server".utf8)
}

/// Who is on the other end of an established connection.
public struct PeerIdentity: Sendable, Equatable {
    /// The name the client gave (such as `node-3`), or the server's name as the client knows it.
    public var name: String
    /// The peer's incarnation: a restarted process has a larger one.
    public var epoch: UInt64

    public init(name: String, epoch: UInt64) {
        self.name = name
        self.epoch = epoch
    }
}

/// What a handshake side asks its shell to do.
public enum HandshakeAction: Sendable, Equatable {
    /// Write this frame to the connection.
    case send(Frame)
    /// The handshake is over: messages may flow.
    case established(PeerIdentity)
    /// Close the connection (after sending what came before); log the reason.
    case close(WireError)
}

/// The accepting side.
public struct ServerHandshake: Sendable {
    enum State {
        case awaitingHello
        case awaitingProof(hello: [UInt8], clientNonce: [UInt8], peer: PeerIdentity)
        case established(PeerIdentity)
        case closed
    }

    private let token: ClusterToken
    private let epoch: UInt64
    private let nonce: [UInt8]
    private let acceptEpoch: @Sendable (PeerIdentity) -> Bool
    private(set) var state = State.awaitingHello

    /// - Parameters:
    ///   - nonce: ``Handshake/nonceSize`` fresh random bytes.
    ///   - acceptEpoch: whether a peer's stated epoch is current (false: it is a replaced
    ///     incarnation, and the connection is refused).
    public init(token: ClusterToken, epoch: UInt64, nonce: [UInt8], acceptEpoch: @escaping @Sendable (PeerIdentity) -> Bool = { _ in true }) {
        precondition(nonce.count == Handshake.nonceSize, "a handshake nonce is \(Handshake.nonceSize) bytes")
        self.token = token
        self.epoch = epoch
        self.nonce = nonce
        self.acceptEpoch = acceptEpoch
    }

    public var isEstablished: Bool {
        if case .established = state { return true }
        return false
    }

    public mutating func receive(_ frame: Frame) -> [HandshakeAction] {
        switch state {
        case .awaitingHello:
            guard frame.kind == .hello else { return refuse(.protocolViolation, "expected hello, got \(frame.kind)") }
            guard let hello = Hello(frame.payload) else { return refuse(.malformedPayload, "hello payload of \(frame.payload.count) bytes is malformed") }
            guard hello.version == Handshake.protocolVersion else {
                return refuse(.unsupportedVersion, "handshake version \(hello.version); this process speaks \(Handshake.protocolVersion)")
            }
            state = .awaitingProof(hello: frame.payload, clientNonce: hello.nonce, peer: PeerIdentity(name: hello.name, epoch: hello.epoch))
            return [.send(Frame(.challenge, nonce))]
        case .awaitingProof(let hello, let clientNonce, let peer):
            guard frame.kind == .proof else { return refuse(.protocolViolation, "expected proof, got \(frame.kind)") }
            let expected = HMACSHA256.authenticate(Handshake.clientLabel + hello + nonce, key: token.bytes)
            guard HMACSHA256.equal(frame.payload, expected) else {
                return refuse(.authenticationFailed, "\(peer.name) did not prove the cluster token")
            }
            guard acceptEpoch(peer) else {
                return refuse(.staleEpoch, "\(peer.name) epoch \(peer.epoch) is older than one already seen: a replaced incarnation")
            }
            state = .established(peer)
            var welcome: [UInt8] = []
            appendLE(epoch, to: &welcome)
            welcome += HMACSHA256.authenticate(Handshake.serverLabel + clientNonce + nonce, key: token.bytes)
            return [.send(Frame(.welcome, welcome)), .established(peer)]
        case .established:
            preconditionFailure("ServerHandshake.receive after the handshake ended; the connection passes frames on")
        case .closed:
            return []
        }
    }

    private mutating func refuse(_ code: WireError.Code, _ detail: String) -> [HandshakeAction] {
        state = .closed
        let error = WireError(code, detail)
        return [.send(Frame(.refused, Array(error.description.utf8))), .close(error)]
    }
}

/// The connecting side.
public struct ClientHandshake: Sendable {
    enum State {
        case idle
        case awaitingChallenge(hello: [UInt8])
        case awaitingWelcome(serverNonce: [UInt8])
        case established
        case closed
    }

    private let token: ClusterToken
    private let name: String
    private let epoch: UInt64
    private let nonce: [UInt8]
    /// The name the client calls the server by, for the established identity and errors.
    private let serverName: String
    private(set) var state = State.idle

    public init(token: ClusterToken, name: String, epoch: UInt64, nonce: [UInt8], serverName: String) {
        precondition(nonce.count == Handshake.nonceSize, "a handshake nonce is \(Handshake.nonceSize) bytes")
        precondition(name.utf8.count <= Int(UInt16.max), "a peer name is at most 65,535 bytes")
        self.token = token
        self.name = name
        self.epoch = epoch
        self.nonce = nonce
        self.serverName = serverName
    }

    /// The first frame, to send once connected.
    public mutating func start() -> [HandshakeAction] {
        guard case .idle = state else { preconditionFailure("ClientHandshake.start called twice") }
        let hello = Hello(version: Handshake.protocolVersion, epoch: epoch, nonce: nonce, name: name).encoded
        state = .awaitingChallenge(hello: hello)
        return [.send(Frame(.hello, hello))]
    }

    public mutating func receive(_ frame: Frame) -> [HandshakeAction] {
        if frame.kind == .refused, !isClosed {
            state = .closed
            let reason = String(decoding: frame.payload, as: UTF8.self)
            return [.close(WireError(.authenticationFailed, "\(serverName) refused the connection: \(reason)"))]
        }
        switch state {
        case .idle:
            preconditionFailure("ClientHandshake.receive before start()")
        case .awaitingChallenge(let hello):
            guard frame.kind == .challenge else { return fail(.protocolViolation, "expected challenge from \(serverName), got \(frame.kind)") }
            guard frame.payload.count == Handshake.nonceSize else { return fail(.malformedPayload, "challenge of \(frame.payload.count) bytes") }
            state = .awaitingWelcome(serverNonce: frame.payload)
            return [.send(Frame(.proof, HMACSHA256.authenticate(Handshake.clientLabel + hello + frame.payload, key: token.bytes)))]
        case .awaitingWelcome(let serverNonce):
            guard frame.kind == .welcome else { return fail(.protocolViolation, "expected welcome from \(serverName), got \(frame.kind)") }
            guard frame.payload.count == 8 + 32 else { return fail(.malformedPayload, "welcome of \(frame.payload.count) bytes") }
            let expected = HMACSHA256.authenticate(Handshake.serverLabel + nonce + serverNonce, key: token.bytes)
            guard HMACSHA256.equal(Array(frame.payload[8...]), expected) else {
                return fail(.authenticationFailed, "\(serverName) did not prove the cluster token")
            }
            state = .established
            return [.established(PeerIdentity(name: serverName, epoch: readLE(frame.payload, 0)))]
        case .established:
            preconditionFailure("ClientHandshake.receive after the handshake ended; the connection passes frames on")
        case .closed:
            return []
        }
    }

    private var isClosed: Bool {
        if case .closed = state { return true }
        return false
    }

    private mutating func fail(_ code: WireError.Code, _ detail: String) -> [HandshakeAction] {
        state = .closed
        return [.close(WireError(code, detail))]
    }
}

/// The hello payload: version16 · epoch64 · nonce(32) · nameLength16 · name, little-endian.
struct Hello: Equatable {
    var version: UInt16
    var epoch: UInt64
    var nonce: [UInt8]
    var name: String

    init(version: UInt16, epoch: UInt64, nonce: [UInt8], name: String) {
        self.version = version
        self.epoch = epoch
        self.nonce = nonce
        self.name = name
    }

    init?(_ bytes: [UInt8]) {
        let fixed = 2 + 8 + Handshake.nonceSize + 2
        guard bytes.count >= fixed else { return nil }
        version = UInt16(truncatingIfNeeded: readLE(bytes, 0, size: 2))
        epoch = readLE(bytes, 2)
        nonce = Array(bytes[10..<(10 + Handshake.nonceSize)])
        let nameLength = Int(readLE(bytes, 10 + Handshake.nonceSize, size: 2))
        guard bytes.count == fixed + nameLength,
              let name = String(validating: bytes[fixed...], as: UTF8.self) else { return nil }
        self.name = name
    }

    var encoded: [UInt8] {
        var out: [UInt8] = []
        appendLE(UInt64(version), size: 2, to: &out)
        appendLE(epoch, to: &out)
        out += nonce
        let utf8 = Array(name.utf8)
        appendLE(UInt64(utf8.count), size: 2, to: &out)
        out += utf8
        return out
    }
}
