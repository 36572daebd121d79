import CairnCore
import CairnNet
import CairnWire
import Foundation
import NIOCore
import NIOPosix
import Testing

/// What a side of a connection saw, filled from the event loop threads.
final class Inbox: Sendable {
    let messages = Locked<[[UInt8]]>([])
    let closes = Locked<[CloseReason]>([])
    let logs = Locked<[String]>([])
    let established = Locked<[PeerIdentity]>([])

    func handlers(echo: Bool = false) -> WireHandlers {
        WireHandlers(established: { c in self.established.update { $0.append(c.peer!) } },
                     message: { c, m in
                         self.messages.update { $0.append(m) }
                         if echo { try? c.send(Array("echo:".utf8) + m) }
                     },
                     closed: { _, r in self.closes.update { $0.append(r) } },
                     log: { line in self.logs.update { $0.append(line) } })
    }
}

/// Options for tests about something other than liveness: a silence timeout of 120 s, so that
/// a loaded machine does not end their connections. Under `swift test` the test itself can be
/// held up for half a minute: the GCS simulation's 10,000 seeds occupy both of the cooperative
/// pool's threads, and a test that had connected but not yet written was cut off by a 10 s timeout.
let patient = WireOptions(connection: .init(heartbeatTicks: 5, timeoutTicks: 12_000))

/// Polls `condition` every 5 ms for up to 20 s (generous, for a loaded 2-core machine).
func eventually(_ what: String, _ condition: () -> Bool) async throws {
    for _ in 0..<4_000 {
        if condition() { return }
        try await Task.sleep(for: .milliseconds(5))
    }
    Issue.record("timed out waiting for \(what)")
}

@Suite("Net: the wire protocol over TCP on loopback")
struct WireNetTests {
    @Test("a client with the token is accepted; 1,000 messages each way arrive in order")
    func authenticatedExchange() async throws {
        let token = ClusterToken.generate()
        let server = Inbox()
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 3, handlers: server.handlers(echo: true), options: patient)
        let client = Inbox()
        let connection = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: token, name: "node-7", epoch: 11,
                                                serverName: "head", handlers: client.handlers(), options: patient)
        #expect(connection.peer == PeerIdentity(name: "head", epoch: 3))
        for i in 0..<1_000 { try connection.send(Array("m\(i)".utf8)) }
        try await eventually("1,000 echoes") { client.messages.value.count == 1_000 }
        #expect(server.messages.value == (0..<1_000).map { Array("m\($0)".utf8) })
        #expect(client.messages.value == (0..<1_000).map { Array("echo:m\($0)".utf8) })
        #expect(server.established.value == [PeerIdentity(name: "node-7", epoch: 11)])
        connection.close()
        try await eventually("the server to see the close") { !server.closes.value.isEmpty }
        guard case .connectionLost(let why) = server.closes.value.first else {
            Issue.record("unexpected close reason \(server.closes.value)")
            return
        }
        #expect(why.contains("node-7"))
        try await listener.close()
    }

    @Test("a lane's sockets, the listener's, the client's and the accepted one, are close-on-exec: a process started meanwhile inherits none")
    func laneSocketsCloseOnExec() throws {
        let token = ClusterToken.generate()
        let accepted = Locked<LaneConnection?>(nil)
        let listener = try LaneListener(host: "127.0.0.1", token: token, epoch: 1, name: "server", log: { _ in },
                                        serve: { lane in accepted.update { $0 = lane } })
        defer { listener.close() }
        let client = try LaneConnection.connect(host: "127.0.0.1", port: listener.port, token: token, name: "client", epoch: 1, serverName: "server")
        defer { client.close() }
        let deadline = Date().addingTimeInterval(20)
        while accepted.value == nil && Date() < deadline { usleep(1_000) }
        #expect(accepted.value != nil, "the lane was not accepted within 20 s")
        // The lane's sockets, and only they (tests beside this one open sockets of their own):
        // those with the listener's port at either end in /proc/net/tcp, found by inode.
        // Read to its end: a file of /proc reports no size, and its text comes a page at a time.
        let table = FileHandle(forReadingAtPath: "/proc/net/tcp").map { String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) } ?? ""
        let portHex = String(format: "%04X", listener.port)
        let inodes = Set(table.split(separator: "\n").dropFirst().compactMap { line -> String? in
            let fields = line.split(separator: " ")
            guard fields.count > 9, fields[1].hasSuffix(":" + portHex) || fields[2].hasSuffix(":" + portHex) else { return nil }
            return String(fields[9])
        })
        var checked = 0
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            guard let fd = Int32(name), let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)"),
                  target.hasPrefix("socket:["), inodes.contains(String(target.dropFirst(8).dropLast())) else { continue }
            let flags = fcntl(fd, F_GETFD)
            guard flags >= 0 else { continue }
            checked += 1
            #expect(flags & FD_CLOEXEC != 0, "the lane's socket \(fd) (\(target)) is inherited by processes started from this one")
        }
        #expect(checked == 3, "expected the listener's, the client's and the accepted socket; found \(checked) (port \(portHex), inodes \(inodes))")
        accepted.value?.close()
    }

    @Test("a client with another token is refused and logged; nothing it sends is delivered")
    func wrongTokenRefused() async throws {
        let server = Inbox()
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: .generate(), epoch: 1, handlers: server.handlers(), options: patient)
        do {
            _ = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: .generate(), name: "intruder", epoch: 1,
                                       handlers: Inbox().handlers(), options: patient)
            Issue.record("a client with the wrong token was accepted")
        } catch let refused as WireRefused {
            guard case .refused(let error) = refused.reason else {
                Issue.record("unexpected reason \(refused)")
                return
            }
            #expect(error.code == .authenticationFailed)
        }
        try await eventually("the server's log line") { !server.logs.value.isEmpty }
        #expect(server.logs.value.contains { $0.contains("authenticationFailed") && $0.contains("intruder") })
        #expect(server.messages.value.isEmpty)
        #expect(server.established.value.isEmpty)
        try await listener.close()
    }

    @Test("garbage is closed with a logged reason, and the server keeps serving")
    func garbageClosed() async throws {
        let token = ClusterToken.generate()
        let server = Inbox()
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: server.handlers(), options: patient)
        // A raw TCP peer, no Cairn handler, sending an HTTP request.
        let garbage = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connect(host: "127.0.0.1", port: listener.port).get()
        try await garbage.writeAndFlush(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        try await eventually("the raw connection closed by the server") { !server.closes.value.isEmpty }
        guard case .refused(let error) = server.closes.value.first else {
            Issue.record("unexpected close \(server.closes.value)")
            return
        }
        #expect(error.code == .badMagic)
        try await garbage.closeFuture.get()
        #expect(server.logs.value.contains { $0.contains("closing") && $0.contains("badMagic") })
        // A proper client is still served.
        let connection = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: token, name: "node-1", epoch: 1,
                                                handlers: Inbox().handlers(), options: patient)
        try connection.send([42])
        try await eventually("the message") { server.messages.value == [[42]] }
        connection.close()
        try await listener.close()
    }

    @Test("a connection that sends nothing is closed by the silence timeout, with a logged reason")
    func silenceClosed() async throws {
        let server = Inbox()
        // The default timeout (25 ticks of 10 ms); on a loaded machine it can only fire later.
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: .generate(), epoch: 1, handlers: server.handlers())
        let silent = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connect(host: "127.0.0.1", port: listener.port).get()
        try await eventually("the silent connection closed by the server") { !server.closes.value.isEmpty }
        guard case .timedOut(let why) = server.closes.value.first else {
            Issue.record("unexpected close \(server.closes.value)")
            return
        }
        #expect(why.contains("25 ticks"))
        try await silent.closeFuture.get()
        #expect(server.logs.value.contains { $0.contains("timed out") })
        try await listener.close()
    }

    @Test("sends are refused with typed errors: too large, over the pending limit (a single large one still goes, and control messages always), after close")
    func sendRefusals() async throws {
        let token = ClusterToken.generate()
        let options = WireOptions(connection: .init(maxPayload: 1_000, heartbeatTicks: 5, timeoutTicks: 12_000), maxPendingBytes: 500)
        let server = Inbox()
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: server.handlers(), options: options)
        let connection = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: token, name: "node-1", epoch: 1,
                                                handlers: Inbox().handlers(), options: options)
        #expect(throws: WireSendError.tooLarge(bytes: 1_001, limit: 1_000)) { try connection.send([UInt8](repeating: 0, count: 1_001)) }
        // A message over the pending limit goes when nothing is pending; the next one, sent before
        // the event loop has written the first, is pushed back.
        var pushedBack: WireSendError?
        for _ in 0..<10_000 where pushedBack == nil {
            do {
                try connection.send([UInt8](repeating: 0, count: 600))
            } catch {
                pushedBack = error
            }
        }
        guard case .backpressure(let pending)? = pushedBack else {
            Issue.record("never pushed back: \(String(describing: pushedBack))")
            return
        }
        #expect(pending >= 612)
        // A control message is not refused for the pending limit.
        var controlRefused: WireSendError?
        for _ in 0..<100 {
            do { try connection.send([UInt8](repeating: 1, count: 600), control: true) } catch { controlRefused = error }
        }
        #expect(controlRefused == nil, "a control message was refused: \(String(describing: controlRefused))")
        connection.close()
        try await eventually("the close") { connection.isClosed }
        #expect(throws: WireSendError.closed) { try connection.send([1]) }
        try await listener.close()
    }

    @Test("a flood sent from two threads under a small pending limit arrives whole and, per thread, in order")
    func floodUnderBackpressure() async throws {
        let token = ClusterToken.generate()
        var options = patient
        options.maxPendingBytes = 64 << 10
        let server = Inbox()
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: server.handlers(), options: options)
        let connection = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: token, name: "node-1", epoch: 1,
                                                handlers: Inbox().handlers(), options: options)
        let perThread = 50_000
        let pushedBack = Locked(0)
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            var i = 0
            while i < perThread {
                do {
                    try connection.send([UInt8(thread)] + withUnsafeBytes(of: UInt32(i).littleEndian, Array.init))
                    i += 1
                } catch WireSendError.backpressure {
                    pushedBack.update { $0 += 1 }
                    usleep(100)
                } catch {
                    Issue.record("send failed: \(error)")
                    return
                }
            }
        }
        try await eventually("every message") { server.messages.value.count == 2 * perThread }
        for thread in 0..<2 {
            let sequence = server.messages.value.filter { $0[0] == UInt8(thread) }.map { m in
                m[1...].reversed().reduce(0) { $0 << 8 | Int($1) }
            }
            let firstOutOfPlace = zip(sequence, 0...).first { $0.0 != $0.1 }?.1
            #expect(sequence.count == perThread && firstOutOfPlace == nil,
                    "thread \(thread): \(sequence.count) messages, first out of place at \(String(describing: firstOutOfPlace))")
        }
        #expect(pushedBack.value > 0, "the pending limit never pushed back; the test did not exercise it")
        #expect(server.closes.value.isEmpty)
        connection.close()
        try await listener.close()
    }
}

extension WireNetTests {
    @Test("with a batch handler, messages come in batches, whole and in order, and never one by one")
    func batchDelivery() async throws {
        let token = ClusterToken.generate()
        let batches = Locked<[[[UInt8]]]>([])
        let singles = Locked(0)
        let handlers = WireHandlers(message: { _, _ in singles.update { $0 += 1 } },
                                    batch: { _, messages in batches.update { $0.append(messages) } })
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: handlers, options: patient)
        let connection = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: token, name: "node-1", epoch: 1,
                                                handlers: Inbox().handlers(), options: patient)
        let total = 20_000
        for i in 0..<total { try connection.send(withUnsafeBytes(of: UInt32(i).littleEndian, Array.init), control: true) }
        try await eventually("every message") { batches.value.reduce(0) { $0 + $1.count } == total }
        let received = batches.value.flatMap { $0 }.map { m in m.reversed().reduce(0) { $0 << 8 | Int($1) } }
        #expect(received == Array(0..<total))
        #expect(singles.value == 0)
        #expect(batches.value.allSatisfy { !$0.isEmpty })
        // 20,000 messages sent at once are read in far fewer reads than messages.
        #expect(batches.value.count < total, "\(batches.value.count) batches")
        connection.close()
        try await listener.close()
    }
}

@Suite("Net: token files")
struct TokenFileTests {
    @Test("a token round trips through a new 0600 file, which is never overwritten")
    func tokenFile() throws {
        let token = ClusterToken.generate()
        let dir = NSTemporaryDirectory() + "cairn-token-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/token"
        try token.write(to: path)
        let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
        #expect(mode == 0o600)
        #expect(try ClusterToken.read(from: path) == token)
        #expect(throws: TokenError.self) { try ClusterToken.generate().write(to: path) }
        #expect(try ClusterToken.read(from: path) == token)
    }

    @Test("a token file others can read, or a missing one, is refused with a reason")
    func badTokenFiles() throws {
        let dir = NSTemporaryDirectory() + "cairn-token-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/token"
        try ClusterToken.generate().write(to: path)
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: path)
        do {
            _ = try ClusterToken.read(from: path)
            Issue.record("read a token file of mode 0644")
        } catch {
            #expect(error.code == .insecureFile)
            #expect(error.detail.contains("chmod 600"))
        }
        do {
            _ = try ClusterToken.read(from: dir + "/missing")
            Issue.record("read a missing token file")
        } catch {
            #expect(error.code == .io)
        }
    }
}

@Suite("Net: event loop priority")
struct EventLoopPriorityTests {
    @Test("the wire's event loops run at the process's priority, also when a background task uses them first",
          .enabled(if: geteuid() == 0, "raising a thread's priority back needs root (or RLIMIT_NICE)"))
    func eventLoopsTakeTheProcessPriority() async throws {
        let base = processNiceValue()
        let loops = await Task.detached(priority: .background) { Wire.eventLoops.makeIterator().map { $0 } }.value
        // Each loop sets its priority from a task of its own: wait for those to have run.
        for loop in loops { try await loop.submit {}.get() }
        let values = threadNiceValues(of: getpid(), namedWith: "NIO-SGLTN")
        #expect(!values.isEmpty && values.allSatisfy { $0 == base }, "event loop threads at nice \(values), the process at \(base)")
    }
}
