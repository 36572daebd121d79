import CairnNet
import DequeModule
import Foundation

/// Delivery across reconnections, as pure values: what ``TCPTransport`` keeps so that a lost
/// connection between two live processes loses no message and delivers none twice.
///
/// Each sender's queue to an endpoint is a *stream*, named by a random 64-bit ID, whose messages
/// are numbered 1, 2, 3… in the order sent. A connection starts with a ``Frame/hello(stream:first:)``
/// that gives the number of its first message; the ones after it are numbered implicitly, so a
/// message carries no header. The receiver delivers a message only if its number is above the
/// last it delivered on that stream, and acknowledges now and then (``Frame/ack(stream:upTo:)``,
/// on the same connection, back to the sender). The sender keeps every message until it is
/// acknowledged, and a new connection carries again, from the oldest, those that are not.
///
/// Why nothing is delivered twice or out of order: a receiver acknowledges only what it
/// delivered, so a new connection's first number is at most one above the last delivered; a
/// connection's numbers are consecutive; so on any connection, a number above the last
/// delivered is the next one.
///
/// The frames start with ``marker``, which neither a ``BinaryEncoder`` document (0xCA) nor a
/// hand-coded message (``WireFast/marker``, 0xCB) starts with.
enum TransportStream {
    static let marker: UInt8 = 0xCC

    enum Frame: Equatable {
        /// The first frame on a connection: messages after it are `first`, `first + 1`, …
        case hello(stream: UInt64, first: UInt64)
        /// From the receiver: every message up to `upTo` was delivered.
        case ack(stream: UInt64, upTo: UInt64)
    }

    static func encode(_ frame: Frame) -> [UInt8] {
        var bytes: [UInt8] = [marker]
        bytes.reserveCapacity(18)
        let (kind, stream, number): (UInt8, UInt64, UInt64)
        switch frame {
        case .hello(let s, let first): (kind, stream, number) = (1, s, first)
        case .ack(let s, let upTo): (kind, stream, number) = (2, s, upTo)
        }
        bytes.append(kind)
        withUnsafeBytes(of: stream.littleEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: number.littleEndian) { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// The frame, or nil if `bytes` is not a well-formed one.
    static func decode(_ bytes: [UInt8]) -> Frame? {
        guard bytes.count == 18, bytes[0] == marker else { return nil }
        func number(at offset: Int) -> UInt64 {
            var value: UInt64 = 0
            for i in (0..<8).reversed() { value = value << 8 | UInt64(bytes[offset + i]) }
            return value
        }
        switch bytes[1] {
        case 1: return number(at: 10) >= 1 ? .hello(stream: number(at: 2), first: number(at: 10)) : nil
        case 2: return .ack(stream: number(at: 2), upTo: number(at: 10))
        default: return nil
        }
    }
}

/// The sender's side of a stream: the messages handed to a connection and not yet
/// acknowledged, oldest first, and how many of them the current connection has carried.
struct OutboundStream {
    let id: UInt64
    /// Messages sent and not acknowledged; the first is number ``firstUnacknowledged``.
    private(set) var unacknowledged: Deque<[UInt8]> = []
    private(set) var firstUnacknowledged: UInt64 = 1
    private(set) var unacknowledgedBytes = 0
    /// How many of ``unacknowledged`` the current connection has carried.
    private(set) var carried = 0

    init(id: UInt64) {
        self.id = id
    }

    /// A connection was made: its hello. It carries the unacknowledged messages again first
    /// (``nextResend()``).
    mutating func connected() -> [UInt8] {
        carried = 0
        return TransportStream.encode(.hello(stream: id, first: firstUnacknowledged))
    }

    /// The next unacknowledged message the current connection has not carried, if any; counted
    /// as carried.
    mutating func nextResend() -> [UInt8]? {
        guard carried < unacknowledged.count else { return nil }
        defer { carried += 1 }
        return unacknowledged[carried]
    }

    /// The connection did not take the message ``nextResend()`` gave last (it pushed back): it
    /// is the next again.
    mutating func uncarry() {
        precondition(carried > 0, "nothing was given to take back")
        carried -= 1
    }

    /// A new message was handed to the current connection (after every resend).
    mutating func sent(_ bytes: [UInt8]) {
        precondition(carried == unacknowledged.count, "a new message goes only after the connection has carried every unacknowledged one")
        unacknowledged.append(bytes)
        unacknowledgedBytes += bytes.count
        carried += 1
    }

    /// The receiver delivered every message up to `upTo`. An acknowledgement of another stream,
    /// or of messages already acknowledged, changes nothing; one past what was sent is ignored.
    mutating func acknowledged(stream: UInt64, upTo: UInt64) {
        guard stream == id, upTo >= firstUnacknowledged, upTo < firstUnacknowledged + UInt64(unacknowledged.count) else { return }
        let count = Int(upTo - firstUnacknowledged + 1)
        unacknowledgedBytes -= unacknowledged.prefix(count).reduce(0) { $0 + $1.count }
        unacknowledged.removeFirst(count)
        firstUnacknowledged = upTo + 1
        carried = max(0, carried - count)
    }
}

/// The receiver's side of a stream: the number of the last message delivered.
struct InboundStream {
    private(set) var delivered: UInt64
    /// Delivered since the last acknowledgement.
    private(set) var unacknowledged = 0

    /// A stream first seen in a hello naming `first`: what came before it is not this
    /// receiver's to deliver (it went to an earlier process at this address, or nowhere).
    init(first: UInt64) {
        delivered = first - 1
    }

    /// Whether message `number`, read on a connection of this stream, is delivered now: it is
    /// if it is above the last one delivered (and is then the next, see ``TransportStream``).
    mutating func accept(_ number: UInt64) -> Bool {
        guard number > delivered else { return false }
        delivered = number
        unacknowledged += 1
        return true
    }

    /// The acknowledgement to send for `stream`, if anything was delivered since the last;
    /// `again`: if anything was delivered at all (for a new connection, whose sender may not
    /// have heard the last one).
    mutating func acknowledgement(stream: UInt64, again: Bool = false) -> [UInt8]? {
        guard again ? delivered > 0 : unacknowledged > 0 else { return nil }
        unacknowledged = 0
        return TransportStream.encode(.ack(stream: stream, upTo: delivered))
    }
}

/// An endpoint's receiving side of every stream sent to it, and which stream each of its
/// connections carries. Called on the connections' event loops; a stream's messages are
/// accepted and handed on under that stream's lock, so that a connection being replaced and
/// its replacement (on another event loop) never hand on out of order.
///
/// Thread safety (why `@unchecked Sendable` is sound): `streams` and `readers` are guarded by
/// `lock`; each ``Stream``'s fields by its own lock.
final class InboundStreams: @unchecked Sendable {
    final class Stream: @unchecked Sendable {
        let id: UInt64
        let lock = NSLock()
        /// Guarded by `lock`, as are `connection` and `ackScheduled`.
        var core: InboundStream
        /// The connection that said hello last: where acknowledgements go.
        weak var connection: WireConnection?
        var ackScheduled = false
        /// Guarded by the ``InboundStreams``' lock: how many open connections carry it, and
        /// when the last one closed (monotonic ns).
        var readers = 0
        var closedAt: UInt64 = 0

        init(id: UInt64, first: UInt64) {
            self.id = id
            core = InboundStream(first: first)
        }
    }

    /// A connection, its stream and the number of the next message it brings.
    final class Reader: @unchecked Sendable {
        let connection: WireConnection
        let stream: Stream
        var next: UInt64  // guarded by stream.lock

        init(connection: WireConnection, stream: Stream, next: UInt64) {
            self.connection = connection
            self.stream = stream
            self.next = next
        }
    }

    private let lock = NSLock()
    private var streams: [UInt64: Stream] = [:]
    private var readers: [ObjectIdentifier: Reader] = [:]
    private let log: @Sendable (String) -> Void

    /// An acknowledgement goes when this many messages were delivered since the last, or this
    /// long after the first of them.
    static let acknowledgeEvery = 4_096
    static let acknowledgeAfterMicroseconds: Int64 = 20_000
    /// A stream no connection has carried for this long is forgotten: a sender that comes back
    /// after it is treated as new (what it had not had acknowledged is delivered, even if it
    /// was before).
    static let forgetAfterNanoseconds: UInt64 = 300_000_000_000

    init(log: @escaping @Sendable (String) -> Void) {
        self.log = log
    }

    /// Takes the messages of one read on `connection`: the stream's frames are handled here,
    /// and `deliver` is called with those messages that are delivered now, in order, under the
    /// stream's lock. Messages on a connection that never said hello (a sender without
    /// streams) are all delivered.
    ///
    /// (Closing a connection on its event loop reports the close at once, into ``closed(_:)``,
    /// which therefore never takes a stream's lock: `deliver` may close the connection.)
    func receive(_ connection: WireConnection, _ payloads: [[UInt8]], deliver: ([[UInt8]]) -> Void) {
        let key = ObjectIdentifier(connection)
        var reader = lock.withLock { readers[key] }
        var kept: [[UInt8]] = []
        kept.reserveCapacity(payloads.count)
        reader?.stream.lock.lock()
        var malformed = false
        for payload in payloads {
            if payload.first == TransportStream.marker {
                guard case .hello(let id, let first)? = TransportStream.decode(payload), reader == nil else {
                    malformed = true
                    break
                }
                reader = hello(connection, key, stream: id, first: first)
                continue
            }
            guard let reader else {
                kept.append(payload)
                continue
            }
            let number = reader.next
            reader.next += 1
            if reader.stream.core.accept(number) { kept.append(payload) }
        }
        if !kept.isEmpty { deliver(kept) }
        if let stream = reader?.stream {
            if stream.core.unacknowledged >= Self.acknowledgeEvery {
                if let ack = stream.core.acknowledgement(stream: stream.id) { try? connection.send(ack, control: true) }
            } else if stream.core.unacknowledged > 0 && !stream.ackScheduled {
                stream.ackScheduled = true
                connection.schedule(afterMicroseconds: Self.acknowledgeAfterMicroseconds) {
                    stream.lock.withLock {
                        stream.ackScheduled = false
                        if let ack = stream.core.acknowledgement(stream: stream.id) { try? stream.connection?.send(ack, control: true) }
                    }
                }
            }
            stream.lock.unlock()
        }
        if malformed {
            log("transport: \(connection) sent a stream frame that is malformed or out of place; closing")
            connection.close()
        }
    }

    /// A connection says which stream it carries: acknowledgements go to it from now on, and
    /// it hears at once what was delivered already. Returns with the stream's lock held.
    private func hello(_ connection: WireConnection, _ key: ObjectIdentifier, stream id: UInt64, first: UInt64) -> Reader {
        let stream: Stream = lock.withLock {
            let stream: Stream
            if let known = streams[id] {
                stream = known
            } else {
                let at = monotonicNanoseconds()
                streams = streams.filter { $0.value.readers > 0 || at - $0.value.closedAt < Self.forgetAfterNanoseconds }
                stream = Stream(id: id, first: first)
                streams[id] = stream
            }
            stream.readers += 1
            return stream
        }
        stream.lock.lock()
        stream.connection = connection
        let reader = Reader(connection: connection, stream: stream, next: first)
        lock.withLock { readers[key] = reader }
        if first <= stream.core.delivered, let ack = stream.core.acknowledgement(stream: id, again: true) { try? connection.send(ack, control: true) }
        return reader
    }

    /// A connection closed.
    func closed(_ connection: WireConnection) {
        let key = ObjectIdentifier(connection)
        lock.withLock {
            guard let stream = readers.removeValue(forKey: key)?.stream else { return }
            stream.readers -= 1
            if stream.readers == 0 { stream.closedAt = monotonicNanoseconds() }
        }
    }

    /// Closes every connection that said hello here (for tests: a connection lost between two
    /// live processes).
    func closeAll() {
        for c in lock.withLock({ readers.values.map(\.connection) }) { c.close() }
    }
}
