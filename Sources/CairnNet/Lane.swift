import CairnCore
import CairnWire
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A Cairn wire connection over a blocking socket, with no event loop: the thread that sends
/// writes to the socket itself, and one thread of the owner's blocks reading it. A message
/// then crosses with no thread hand-off at either end, which an event loop costs twice (the
/// sender wakes the loop to write; the loop wakes the receiver's thread). The handshake and
/// framing are ``ConnectionCore``'s, as on every connection: the cluster token is proven
/// before any message is accepted, and a malformed frame closes the connection.
///
/// There are no heartbeats: a lane rides beside the cluster's event-loop connections between
/// the same two processes, which detect a silent peer. A closed or reset socket ends
/// ``receive()`` at once.
///
/// Thread safety (why `@unchecked Sendable` is sound): ``send(_:)`` serializes writers with
/// `writeLock`; `core`, `delivered` and `buffer` are used only by the one thread that calls
/// ``receive()`` (after the handshake, which runs before the connection is shared); the
/// descriptor is closed only in `deinit`, so no thread can use a number the process reused.
public final class LaneConnection: @unchecked Sendable {
    private let fd: Int32
    private var core: ConnectionCore
    private var delivered: [[UInt8]] = []
    /// What ``receive()`` reads into (allocated once: a lane carries one small message at a time).
    private var buffer = [UInt8](repeating: 0, count: 64 << 10)
    private let writeLock = NSLock()
    private let isClosed = Latch()
    private let maxPayload: Int
    /// Who is at the other end, proven by the handshake.
    public let peer: PeerIdentity

    private init(fd: Int32, core: ConnectionCore, peer: PeerIdentity, delivered: [[UInt8]], maxPayload: Int) {
        self.fd = fd
        self.core = core
        self.peer = peer
        self.delivered = delivered
        self.maxPayload = maxPayload
    }

    deinit { _ = Glibc.close(fd) }

    public var closed: Bool { isClosed.isSet }

    /// Connects to `host:port` and runs the client's side of the handshake, blocking the
    /// calling thread for at most `timeout` seconds.
    public static func connect(host: String, port: Int, token: ClusterToken, name: String, epoch: UInt64, serverName: String,
                               timeout: Double = 5, maxPayload: Int = WireFormat.defaultMaxPayload) throws -> LaneConnection {
        let fd = try Socket.connected(host: host, port: port, timeout: timeout)
        let core = ConnectionCore.client(ClientHandshake(token: token, name: name, epoch: epoch, nonce: Wire.nonce(), serverName: serverName),
                                         options: .init(maxPayload: maxPayload))
        return try handshake(fd: fd, core: core, timeout: timeout, maxPayload: maxPayload)
    }

    /// Runs the server's side of the handshake on an accepted socket.
    static func accepted(fd: Int32, token: ClusterToken, epoch: UInt64, timeout: Double, maxPayload: Int) throws -> LaneConnection {
        let core = ConnectionCore.server(ServerHandshake(token: token, epoch: epoch, nonce: Wire.nonce()), options: .init(maxPayload: maxPayload))
        return try handshake(fd: fd, core: core, timeout: timeout, maxPayload: maxPayload)
    }

    private static func handshake(fd: Int32, core: ConnectionCore, timeout: Double, maxPayload: Int) throws -> LaneConnection {
        var core = core
        var delivered: [[UInt8]] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        func perform(_ actions: [ConnectionAction]) throws -> PeerIdentity? {
            var peer: PeerIdentity?
            for action in actions {
                switch action {
                case .write(let bytes): try Socket.writeAll(fd, bytes)
                case .established(let p): peer = p
                case .deliver(let payload): delivered.append(payload)
                case .closed(let reason): throw WireError(.protocolViolation, "lane handshake failed: \(reason)")
                }
            }
            return peer
        }
        do {
            Socket.setReceiveTimeout(fd, seconds: timeout)
            var peer = try perform(core.connected())
            while peer == nil {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw WireError(.protocolViolation, n == 0 ? "lane closed during the handshake" : "lane handshake: \(String(cString: strerror(errno)))")
                }
                peer = try perform(core.received(buffer[0..<n]))
            }
            Socket.setReceiveTimeout(fd, seconds: 0)
            return LaneConnection(fd: fd, core: core, peer: peer!, delivered: delivered, maxPayload: maxPayload)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }

    /// Sends one message from the calling thread, blocking while the socket's buffer is full.
    /// Throws once the connection is closed (the message may not have arrived).
    public func send(_ payload: [UInt8]) throws {
        guard payload.count <= maxPayload else { throw WireSendError.tooLarge(bytes: payload.count, limit: maxPayload) }
        var frame: [UInt8] = []
        frame.reserveCapacity(WireFormat.headerSize + payload.count)
        Frame.append(.message, payload, to: &frame)
        writeLock.lock()
        defer { writeLock.unlock() }
        guard !closed else { throw WireSendError.closed }
        do {
            try Socket.writeAll(fd, frame)
        } catch {
            close()
            throw WireSendError.closed
        }
    }

    /// The next message, blocking until one arrives; nil once the connection is closed (by
    /// either end, or for a malformed frame). Only one thread may call it.
    public func receive() -> [UInt8]? {
        while delivered.isEmpty {
            guard !closed else { return nil }
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                close()
                return nil
            }
            for action in core.received(buffer[0..<n]) {
                switch action {
                case .deliver(let payload): delivered.append(payload)
                case .write(let bytes): writeLock.withLock { _ = try? Socket.writeAll(fd, bytes) }
                case .established: break
                case .closed:
                    close()
                }
            }
        }
        return delivered.removeFirst()
    }

    /// Closes both directions: a thread blocked in ``receive()`` returns nil, later sends throw.
    public func close() {
        guard isClosed.set() else { return }
        _ = shutdown(fd, Int32(SHUT_RDWR))
    }
}

/// Accepts lanes on a port of its own: a thread blocks in `accept`, and each connection gets
/// a thread that runs the handshake and then hands the connection to `serve`, which reads it
/// until it closes.
public final class LaneListener: @unchecked Sendable {
    private let fd: Int32
    public let port: Int
    private let isClosed = Latch()

    public init(host: String, token: ClusterToken, epoch: UInt64, name: String, maxPayload: Int = WireFormat.defaultMaxPayload,
                log: @escaping @Sendable (String) -> Void, serve: @escaping @Sendable (LaneConnection) -> Void) throws {
        (fd, port) = try Socket.listening(host: host)
        let fd = self.fd
        let isClosed = self.isClosed
        let closed: @Sendable () -> Bool = { isClosed.isSet }
        startThread(named: "cairn-lane-accept") {
            while !closed() {
                let client = accept(fd, nil, nil)
                if client < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    if !closed() { log("lane listener of \(name): accept failed: \(String(cString: strerror(errno)))") }
                    return
                }
                // Close-on-exec, as the lane's other sockets (`accept4` is not imported from
                // Glibc; the processes Cairn starts close inherited descriptors anyway).
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                Socket.noDelay(client)
                startThread(named: "cairn-lane-in") {
                    do {
                        serve(try LaneConnection.accepted(fd: client, token: token, epoch: epoch, timeout: 5, maxPayload: maxPayload))
                    } catch {
                        log("lane of \(name): \(error); refused")
                    }
                }
            }
        }
    }

    deinit { _ = Glibc.close(fd) }

    /// Stops accepting (connections already made stay open).
    public func close() {
        guard isClosed.set() else { return }
        _ = shutdown(fd, Int32(SHUT_RDWR))
    }
}

/// Blocking socket calls of the lanes.
enum Socket {
    static func error(_ what: String) -> WireError {
        WireError(.protocolViolation, "\(what): \(String(cString: strerror(errno)))")
    }

    static func addresses(host: String, port: Int, passive: Bool) throws -> UnsafeMutablePointer<addrinfo> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        if passive { hints.ai_flags = AI_PASSIVE }
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let list else {
            throw WireError(.protocolViolation, "cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
        }
        return list
    }

    static func connected(host: String, port: Int, timeout: Double) throws -> Int32 {
        let list = try addresses(host: host, port: port, passive: false)
        defer { freeaddrinfo(list) }
        var failure: WireError?
        var next: UnsafeMutablePointer<addrinfo>? = list
        while let a = next {
            next = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            guard fd >= 0 else {
                failure = error("socket")
                continue
            }
            setSendTimeout(fd, seconds: timeout)
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 {
                setSendTimeout(fd, seconds: 0)
                noDelay(fd)
                return fd
            }
            failure = error("cannot connect to \(host):\(port)")
            _ = Glibc.close(fd)
        }
        throw failure ?? WireError(.protocolViolation, "no address for \(host)")
    }

    static func listening(host: String) throws -> (Int32, Int) {
        let list = try addresses(host: host, port: 0, passive: true)
        defer { freeaddrinfo(list) }
        let a = list.pointee
        let fd = socket(a.ai_family, a.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.ai_protocol)
        guard fd >= 0 else { throw error("socket") }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, a.ai_addr, a.ai_addrlen) == 0, listen(fd, 64) == 0 else {
            let e = error("cannot listen on \(host)")
            _ = Glibc.close(fd)
            throw e
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let port = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        } == 0 ? Self.port(of: storage) : 0
        return (fd, port)
    }

    static func port(of storage: sockaddr_storage) -> Int {
        var storage = storage
        let family = Int32(storage.ss_family)
        return withUnsafePointer(to: &storage) { p in
            if family == AF_INET6 {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
    }

    static func noDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    static func setReceiveTimeout(_ fd: Int32, seconds: Double) { setTimeout(fd, SO_RCVTIMEO, seconds) }
    static func setSendTimeout(_ fd: Int32, seconds: Double) { setTimeout(fd, SO_SNDTIMEO, seconds) }

    private static func setTimeout(_ fd: Int32, _ option: Int32, _ seconds: Double) {
        var t = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        _ = setsockopt(fd, SOL_SOCKET, option, &t, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Writes every byte, retrying short writes; never raises SIGPIPE.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw error("lane write")
                }
                offset += n
            }
        }
    }
}
