import CairnCore
import CairnWire
import Foundation
import Testing

func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

@Suite("Wire: SHA-256 and HMAC against published vectors")
struct DigestTests {
    @Test("SHA-256 of the FIPS 180-4 examples")
    func sha256Vectors() {
        #expect(hex(SHA256.hash([])) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(hex(SHA256.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hex(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(hex(SHA256.hash([UInt8](repeating: UInt8(ascii: "a"), count: 1_000_000)))
                == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test("HMAC-SHA256 of RFC 4231 cases 1, 2 and 6 (a key longer than a block)")
    func hmacVectors() {
        #expect(hex(HMACSHA256.authenticate(Array("Hi There".utf8), key: [UInt8](repeating: 0x0b, count: 20)))
                == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        #expect(hex(HMACSHA256.authenticate(Array("what do ya want for nothing?".utf8), key: Array("Jefe".utf8)))
                == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        #expect(hex(HMACSHA256.authenticate(Array("Test Using Larger Than Block-Size Key - Hash Key First".utf8),
                                            key: [UInt8](repeating: 0xaa, count: 131)))
                == "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
        #expect(HMACSHA256.equal([1, 2, 3], [1, 2, 3]))
        #expect(!HMACSHA256.equal([1, 2, 3], [1, 2, 4]))
        #expect(!HMACSHA256.equal([1, 2, 3], [1, 2]))
    }
}

@Suite("Wire: cluster token")
struct ClusterTokenTests {
    @Test("a token round trips through its hex form; its description hides it")
    func tokenRoundTrip() throws {
        let token = ClusterToken.generate()
        #expect(token.bytes.count == 32)
        #expect(try ClusterToken(hex: token.hex) == token)
        #expect(try ClusterToken(hex: "  " + token.hex.uppercased() + "\n") == token)
        #expect(!token.description.contains(token.hex))
        #expect(ClusterToken.generate() != token)
    }

    @Test("malformed tokens are refused with a reason")
    func badTokens() {
        for bad in ["", "abc", String(repeating: "g", count: 64), String(repeating: "a", count: 66)] {
            do {
                _ = try ClusterToken(hex: bad)
                Issue.record("accepted \(bad)")
            } catch {
                #expect(error.code == .malformed)
            }
        }
    }
}

@Suite("Wire: frames")
struct FrameTests {
    @Test("frames fed one byte at a time, or several in one piece, come out whole and in order")
    func framesRoundTrip() throws {
        let frames = [Frame(.hello, Array("x".utf8)), Frame(.message, []), Frame(.message, (0..<70_000).map { UInt8(truncatingIfNeeded: $0) }), Frame(.heartbeat)]
        var all: [UInt8] = []
        for f in frames { all += f.encoded }
        var one = FrameDecoder()
        var out: [Frame] = []
        for b in all {
            one.feed([b])
            while let f = try one.next() { out.append(f) }
        }
        #expect(out == frames)
        #expect(one.buffered == 0)
        var whole = FrameDecoder()
        whole.feed(all)
        out = []
        while let f = try whole.next() { out.append(f) }
        #expect(out == frames)
    }

    @Test("a flipped bit anywhere in a frame is caught: header fields by their checks, the rest by the CRC")
    func corruptionCaught() throws {
        let frame = Frame(.message, Array("the payload".utf8)).encoded
        for index in frame.indices {
            var bad = frame
            bad[index] ^= 0x10
            var decoder = FrameDecoder()
            decoder.feed(bad)
            do {
                if let f = try decoder.next() { Issue.record("byte \(index) flipped yet decoded \(f)") }
                // A larger length leaves the frame incomplete: no frame, and no error yet.
                #expect(index >= 4 && index < 8)
            } catch {
                let expected: WireError.Code = switch index {
                case 0, 1: .badMagic
                case 2: .unsupportedVersion
                case 3: .unknownKind
                case 7: .tooLarge  // the length's top byte: 256 MiB more than declared
                default: .checksumMismatch
                }
                #expect(error.code == expected, "byte \(index): \(error)")
            }
        }
    }

    @Test("a frame larger than the limit is refused from its header, before its payload is buffered")
    func tooLargeRefusedEarly() throws {
        let frame = Frame(.message, [UInt8](repeating: 7, count: 5_000)).encoded
        var decoder = FrameDecoder(maxPayload: 4_096)
        decoder.feed(frame.prefix(WireFormat.headerSize))
        #expect(throws: WireError(.tooLarge, "frame declares 5000 payload bytes; the limit is 4096")) { try decoder.next() }
        // The stream stays failed.
        decoder.feed(Frame(.heartbeat).encoded)
        #expect(throws: WireError.self) { try decoder.next() }
    }

    @Test("garbage is refused as soon as its first byte arrives")
    func garbageRefused() throws {
        var decoder = FrameDecoder()
        decoder.feed(Array("GET / HTTP/1.1\r\n".utf8).prefix(1))
        do {
            _ = try decoder.next()
            Issue.record("accepted an HTTP request")
        } catch {
            #expect(error.code == .badMagic)
        }
    }

    @Test("fuzz: 20,000 seeded random and mutated streams end in frames or a WireError, never a trap")
    func fuzz() throws {
        let fuzzSeed = SeededGenerator.seed(fromEnvironment: "CAIRN_WIRE_SEED")
        print("frame fuzz seed \(fuzzSeed) (CAIRN_WIRE_SEED=\(fuzzSeed) repeats it)")
        var rng = SeededGenerator(seed: fuzzSeed)
        let valid = Frame(.message, Array("payload".utf8)).encoded + Frame(.heartbeat).encoded
        var frames = 0, errors = 0
        for _ in 0..<20_000 {
            var input = valid
            if Bool.random(using: &rng) {
                input = (0..<Int.random(in: 0..<40, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            } else {
                for _ in 0..<Int.random(in: 1...3, using: &rng) where !input.isEmpty {
                    input[Int.random(in: 0..<input.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            }
            var decoder = FrameDecoder(maxPayload: 1 << 16)
            var at = 0
            do {
                while at < input.count {
                    let n = Int.random(in: 1...8, using: &rng)
                    decoder.feed(input[at..<min(at + n, input.count)])
                    at += n
                    while try decoder.next() != nil { frames += 1 }
                }
            } catch {
                errors += 1
            }
        }
        #expect(errors > 10_000)
        #expect(frames > 0)
    }
}

@Suite("Wire: handshake")
struct HandshakeTests {
    static func nonce(_ b: UInt8) -> [UInt8] { [UInt8](repeating: b, count: Handshake.nonceSize) }

    /// Runs a client and a server core against each other, passing frames both ways through
    /// encoding and decoding; returns what each side ended with.
    static func run(client: inout ClientHandshake, server: inout ServerHandshake, tamper: (Frame) -> Frame = { $0 })
        -> (client: [HandshakeAction], server: [HandshakeAction]) {
        var clientLog: [HandshakeAction] = []
        var serverLog: [HandshakeAction] = []
        var toServer: [Frame] = []
        var toClient: [Frame] = []
        func route(_ actions: [HandshakeAction], into queue: inout [Frame], log: inout [HandshakeAction]) {
            for a in actions {
                log.append(a)
                if case .send(let f) = a {
                    var d = FrameDecoder()
                    d.feed(tamper(f).encoded)
                    queue.append(try! d.next()!)
                }
            }
        }
        route(client.start(), into: &toServer, log: &clientLog)
        var rounds = 0
        while !(toServer.isEmpty && toClient.isEmpty), rounds < 10 {
            rounds += 1
            for f in toServer { route(server.receive(f), into: &toClient, log: &serverLog) }
            toServer = []
            for f in toClient { route(client.receive(f), into: &toServer, log: &clientLog) }
            toClient = []
        }
        return (clientLog, serverLog)
    }

    @Test("both sides prove the same token: each learns the other's name and epoch")
    func handshakeSucceeds() {
        let token = ClusterToken.generate()
        var client = ClientHandshake(token: token, name: "node-3", epoch: 7, nonce: Self.nonce(1), serverName: "head")
        var server = ServerHandshake(token: token, epoch: 2, nonce: Self.nonce(2))
        let (c, s) = Self.run(client: &client, server: &server)
        #expect(c.last == .established(PeerIdentity(name: "head", epoch: 2)))
        #expect(s.last == .established(PeerIdentity(name: "node-3", epoch: 7)))
        #expect(server.isEstablished)
    }

    @Test("a client with another token is refused, and told why")
    func wrongTokenRefused() {
        var client = ClientHandshake(token: .generate(), name: "intruder", epoch: 1, nonce: Self.nonce(1), serverName: "head")
        var server = ServerHandshake(token: .generate(), epoch: 1, nonce: Self.nonce(2))
        let (c, s) = Self.run(client: &client, server: &server)
        guard case .close(let serverReason) = s.last, case .close(let clientReason) = c.last else {
            Issue.record("expected both sides to close: \(c) / \(s)")
            return
        }
        #expect(serverReason.code == .authenticationFailed)
        #expect(clientReason.code == .authenticationFailed)
        #expect(clientReason.detail.contains("did not prove the cluster token"))
        #expect(!server.isEstablished)
    }

    @Test("a server that does not know the token is not trusted by the client")
    func impostorServerRejected() {
        let token = ClusterToken.generate()
        var client = ClientHandshake(token: token, name: "node-1", epoch: 1, nonce: Self.nonce(1), serverName: "head")
        // The impostor passes the client's proof along as if valid but cannot make its own.
        var server = ServerHandshake(token: .generate(), epoch: 1, nonce: Self.nonce(2))
        var actions = client.start()
        guard case .send(let hello) = actions[0] else { return }
        actions = server.receive(hello)
        guard case .send(let challenge) = actions[0] else { return }
        _ = client.receive(challenge)
        let forged = Frame(.welcome, [1, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0xAB, count: 32))
        guard case .close(let error) = client.receive(forged).last else {
            Issue.record("client accepted a forged welcome")
            return
        }
        #expect(error.code == .authenticationFailed)
    }

    @Test("a message before the handshake ends the connection")
    func messageBeforeHandshakeRefused() {
        var server = ServerHandshake(token: .generate(), epoch: 1, nonce: Self.nonce(2))
        let actions = server.receive(Frame(.message, [1, 2, 3]))
        guard case .close(let error) = actions.last else {
            Issue.record("accepted a message before hello")
            return
        }
        #expect(error.code == .protocolViolation)
        #expect(actions.contains { if case .send(let f) = $0 { return f.kind == .refused } else { return false } })
        #expect(server.receive(Frame(.hello, [])).isEmpty)
    }

    @Test("a proof recorded from one handshake does not pass another (fresh server nonce)")
    func replayedProofFails() {
        let token = ClusterToken.generate()
        var client = ClientHandshake(token: token, name: "node-1", epoch: 1, nonce: Self.nonce(1), serverName: "head")
        var server = ServerHandshake(token: token, epoch: 1, nonce: Self.nonce(2))
        var recorded: [Frame] = []
        _ = Self.run(client: &client, server: &server) { f in
            recorded.append(f)
            return f
        }
        let hello = recorded.first { $0.kind == .hello }!
        let proof = recorded.first { $0.kind == .proof }!
        var replayTarget = ServerHandshake(token: token, epoch: 1, nonce: Self.nonce(3))
        _ = replayTarget.receive(hello)
        guard case .close(let error) = replayTarget.receive(proof).last else {
            Issue.record("a replayed proof was accepted")
            return
        }
        #expect(error.code == .authenticationFailed)
    }

    @Test("a peer whose epoch is stale is refused after proving the token")
    func staleEpochRefused() {
        let token = ClusterToken.generate()
        var client = ClientHandshake(token: token, name: "node-2", epoch: 3, nonce: Self.nonce(1), serverName: "head")
        var server = ServerHandshake(token: token, epoch: 1, nonce: Self.nonce(2)) { $0.epoch >= 4 }
        let (c, s) = Self.run(client: &client, server: &server)
        guard case .close(let error) = s.last else {
            Issue.record("stale epoch accepted")
            return
        }
        #expect(error.code == .staleEpoch)
        guard case .close = c.last else {
            Issue.record("client not told")
            return
        }
    }

    @Test("a malformed hello is refused with a typed error")
    func malformedHello() {
        var server = ServerHandshake(token: .generate(), epoch: 1, nonce: Self.nonce(2))
        guard case .close(let error) = server.receive(Frame(.hello, [1, 2, 3])).last else {
            Issue.record("accepted a 3-byte hello")
            return
        }
        #expect(error.code == .malformedPayload)
    }
}

@Suite("Wire: connection core")
struct ConnectionCoreTests {
    static func pair(_ token: ClusterToken = .generate(), serverToken: ClusterToken? = nil, options: ConnectionCore.Options = .init())
        -> (ConnectionCore, ConnectionCore) {
        let client = ConnectionCore.client(ClientHandshake(token: token, name: "node-1", epoch: 5, nonce: HandshakeTests.nonce(1), serverName: "head"), options: options)
        let server = ConnectionCore.server(ServerHandshake(token: serverToken ?? token, epoch: 9, nonce: HandshakeTests.nonce(2)), options: options)
        return (client, server)
    }

    /// Delivers every write to the other side until both are quiet; returns the other actions seen.
    static func pump(_ client: inout ConnectionCore, _ server: inout ConnectionCore, _ first: [ConnectionAction])
        -> (client: [ConnectionAction], server: [ConnectionAction]) {
        var seenByClient: [ConnectionAction] = []
        var seenByServer: [ConnectionAction] = []
        var toServer: [[UInt8]] = []
        var toClient: [[UInt8]] = []
        func split(_ actions: [ConnectionAction], _ writes: inout [[UInt8]], _ seen: inout [ConnectionAction]) {
            for a in actions {
                if case .write(let bytes) = a { writes.append(bytes) } else { seen.append(a) }
            }
        }
        split(first, &toServer, &seenByClient)
        while !(toServer.isEmpty && toClient.isEmpty) {
            for bytes in toServer { split(server.received(bytes), &toClient, &seenByServer) }
            toServer = []
            for bytes in toClient { split(client.received(bytes), &toServer, &seenByClient) }
            toClient = []
        }
        return (seenByClient, seenByServer)
    }

    @Test("after the handshake, messages flow both ways; before it, send is refused")
    func messagesFlow() {
        var (client, server) = Self.pair()
        #expect(client.send([1]) == nil)
        let (c, s) = Self.pump(&client, &server, client.connected())
        #expect(c == [.established(PeerIdentity(name: "head", epoch: 9))])
        #expect(s == [.established(PeerIdentity(name: "node-1", epoch: 5))])
        let ping = client.send(Array("ping".utf8))!
        #expect(server.received(ping) == [.deliver(Array("ping".utf8))])
        let pong = server.send(Array("pong".utf8))!
        #expect(client.received(pong) == [.deliver(Array("pong".utf8))])
    }

    @Test("an idle open connection sends heartbeats, and a silent peer is declared dead after the timeout")
    func heartbeatsAndTimeout() {
        let options = ConnectionCore.Options(heartbeatTicks: 2, timeoutTicks: 6)
        var (client, server) = Self.pair(options: options)
        _ = Self.pump(&client, &server, client.connected())
        var heartbeats = 0
        for _ in 0..<5 {
            for action in client.tick() {
                if case .write(let bytes) = action {
                    heartbeats += 1
                    #expect(server.received(bytes).isEmpty)
                }
            }
        }
        #expect(heartbeats == 2)
        // The server heard the heartbeats, so it is not timing out; the client heard nothing.
        #expect(server.tick().allSatisfy { if case .closed = $0 { false } else { true } })
        let last = client.tick()
        guard case .closed(.timedOut(let why)) = last.last else {
            Issue.record("client did not time out: \(last)")
            return
        }
        #expect(why.contains("head"))
        #expect(client.isClosed)
        #expect(client.send([1]) == nil)
    }

    @Test("garbage, or a wrong token, closes the connection with a typed reason and nothing delivered")
    func badPeersClosed() {
        var (_, server) = Self.pair()
        let actions = server.received(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        guard case .closed(.refused(let error)) = actions.last else {
            Issue.record("garbage accepted: \(actions)")
            return
        }
        #expect(error.code == .badMagic)
        #expect(!actions.contains { if case .deliver = $0 { true } else { false } })

        var (client, other) = Self.pair(.generate(), serverToken: .generate())
        let (c, s) = Self.pump(&client, &other, client.connected())
        guard case .closed(.refused(let clientError)) = c.last, case .closed(.refused(let serverError)) = s.last else {
            Issue.record("wrong token not refused: \(c) / \(s)")
            return
        }
        #expect(clientError.code == .authenticationFailed)
        #expect(serverError.code == .authenticationFailed)
        #expect(other.peer == nil)
    }

    @Test("a socket closing is reported once, naming the peer")
    func disconnectReported() {
        var (client, server) = Self.pair()
        _ = Self.pump(&client, &server, client.connected())
        #expect(server.disconnected() == [.closed(.connectionLost("connection to node-1 (epoch 5) lost"))])
        #expect(server.disconnected().isEmpty)
        #expect(server.received(client.send([1])!).isEmpty)
    }
}
