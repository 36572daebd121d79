import CairnCodec
import Foundation
import DequeModule

/// Identifies a caller of durable actors across crashes, for exactly-once retries.
///
/// A caller that sends with ``ActorHandle/send(_:caller:sequence:)`` numbers its messages
/// with strictly increasing sequence numbers; after a crash it resends every message it got
/// no reply to, with the same numbers, and each is applied once. `0` is reserved for
/// anonymous sends (``ActorHandle/send(_:)``), which are not deduplicated.
public struct CallerID: Hashable, Sendable, Codable, CustomStringConvertible {
    public let raw: UInt64
    /// A caller identity; `raw` must not be 0.
    public init(_ raw: UInt64) {
        precondition(raw != 0, "CallerID 0 is reserved for anonymous sends; use any other value")
        self.raw = raw
    }
    public var description: String { "caller-\(raw)" }
}

/// Whether a durable actor's messages are written to its log before they run.
public enum MessageLogging: Sendable, Equatable {
    /// Each message is in the fsync'd log before it runs and before its caller gets a reply.
    /// After a crash the actor comes back with every acknowledged message applied.
    case durable
    /// Messages are not logged; only checkpoints are durable, so a crash loses the messages
    /// applied since the newest checkpoint.
    case memoryOnly
}

/// When a durable actor checkpoints its state. A checkpoint is also taken on demand with
/// ``Cluster/checkpoint(_:)``.
public struct CheckpointPolicy: Sendable, Equatable, CustomStringConvertible {
    /// Checkpoint after this many messages since the last one.
    public var messages: Int?
    /// Checkpoint when this many milliseconds passed since the last one and a message arrived.
    public var milliseconds: Int?

    public init(messages: Int? = nil, milliseconds: Int? = nil) {
        precondition(messages.map { $0 >= 1 } ?? true, "a checkpoint interval in messages must be at least 1")
        precondition(milliseconds.map { $0 >= 1 } ?? true, "a checkpoint interval in milliseconds must be at least 1")
        self.messages = messages
        self.milliseconds = milliseconds
    }

    /// Every `messages` messages.
    public static func every(messages: Int) -> CheckpointPolicy { CheckpointPolicy(messages: messages) }
    /// Every `milliseconds` ms while messages arrive.
    public static func every(milliseconds: Int) -> CheckpointPolicy { CheckpointPolicy(milliseconds: milliseconds) }
    /// Whichever of the two comes first.
    public static func every(messages: Int, orMilliseconds ms: Int) -> CheckpointPolicy { CheckpointPolicy(messages: messages, milliseconds: ms) }
    /// Only on demand; recovery replays the whole log.
    public static let never = CheckpointPolicy()

    /// Whether a checkpoint is due, `messagesSince` messages and `nanosecondsSince` ns after the last.
    public func isDue(messagesSince: Int, nanosecondsSince: UInt64) -> Bool {
        guard messagesSince > 0 else { return false }
        if let m = messages, messagesSince >= m { return true }
        if let ms = milliseconds, nanosecondsSince >= UInt64(ms) * 1_000_000 { return true }
        return false
    }

    public var description: String {
        switch (messages, milliseconds) {
        case (nil, nil): return "never"
        case (let m?, nil): return "every \(m) messages"
        case (nil, let t?): return "every \(t) ms"
        case (let m?, let t?): return "every \(m) messages or \(t) ms"
        }
    }
}

/// How a durable actor keeps its state. See ``Cluster/spawn(_:name:durability:resources:)``.
public struct DurabilityOptions: Sendable {
    /// Default ``MessageLogging/durable``.
    public var logging: MessageLogging
    /// Default every 10,000 messages or 5 s.
    public var checkpoint: CheckpointPolicy
    /// How many times the actor may be restored after a crash before it is declared dead, over
    /// its whole life (the count is kept in its storage). The death of its host counts, including
    /// a head's death that takes the cluster's nodes with it. Default 10.
    public var maxRestarts: Int
    /// Replies remembered per caller, so that a retried message gets its original reply. Default 1,024.
    public var repliesKeptPerCaller: Int

    public init(logging: MessageLogging = .durable, checkpoint: CheckpointPolicy = .every(messages: 10_000, orMilliseconds: 5_000),
                maxRestarts: Int = 10, repliesKeptPerCaller: Int = 1024) {
        precondition(maxRestarts >= 0, "maxRestarts must not be negative")
        precondition(repliesKeptPerCaller >= 1, "repliesKeptPerCaller must be at least 1")
        self.logging = logging
        self.checkpoint = checkpoint
        self.maxRestarts = maxRestarts
        self.repliesKeptPerCaller = repliesKeptPerCaller
    }
}

/// Where durable actors keep their logs and checkpoints.
public struct ActorStorageOptions: Sendable {
    public enum Location: Sendable, Equatable {
        /// Under this directory (created if missing): the message log in `log/` and an LMDB
        /// environment for checkpoints in `checkpoints/`.
        case directory(String)
        /// In memory: gone when the process exits. For tests.
        case inMemory
        /// In the GCS chains: each durable actor's log, checkpoints and record are journalled,
        /// through the control store, to the GCS (``ReplicatedEngine``), so a node on any
        /// machine of the cluster can restore the actor, with no shared directory. Every
        /// message logged is a GCS write (three fsync'd replicas in a row), so calls cost more
        /// than with `.directory`; the actor's state is kept in the hosting node's memory too.
        case replicated
    }
    public var location: Location
    /// Checkpoints kept per actor (newest first); a corrupt newest one falls back to the next. Default 2.
    public var checkpointsKept: Int
    /// Size of each message-log segment file, zero-filled ahead of use (so that an fdatasync
    /// writes data only); segments whose messages are all checkpointed are deleted. Default 16 MiB.
    public var logSegmentBytes: Int

    public init(location: Location = .directory(".cairn"), checkpointsKept: Int = 2, logSegmentBytes: Int = 16 << 20) {
        precondition(checkpointsKept >= 1, "at least one checkpoint must be kept")
        precondition(logSegmentBytes >= 1 << 16 && logSegmentBytes <= 1 << 31, "log segments must be 64 KiB to 2 GiB")
        self.location = location
        self.checkpointsKept = checkpointsKept
        self.logSegmentBytes = logSegmentBytes
    }

    /// The directory as an absolute path (a relative one is taken from the working directory),
    /// for processes that may not share it; nil in memory.
    var absoluteDirectory: String? {
        guard case .directory(let path) = location else { return nil }
        if path.hasPrefix("/") { return path }
        return FileManager.default.currentDirectoryPath + "/" + path
    }
}

/// The exactly-once table of a durable actor: per caller, the last sequence number applied
/// and the newest replies. Part of the actor's checkpointed state, so that replay rebuilds it
/// exactly as it was. A pure value.
struct CallerTable {
    struct Entry {
        var last: UInt64
        /// (sequence, reply), oldest first, at most `keep`.
        var replies: Deque<(UInt64, StoredValue)>
    }

    enum Decision {
        /// A new message: apply it.
        case apply
        /// Applied before: answer with the reply it got then.
        case duplicate(StoredValue)
        /// Applied before, and its reply is no longer kept.
        case stale(last: UInt64, oldestKept: UInt64?)
    }

    private(set) var callers: [UInt64: Entry] = [:]
    let keep: Int

    init(keep: Int) { self.keep = keep }

    func decide(caller: UInt64, sequence: UInt64) -> Decision {
        guard caller != 0, let e = callers[caller], sequence <= e.last else { return .apply }
        for (s, reply) in e.replies.reversed() where s == sequence { return .duplicate(reply) }
        return .stale(last: e.last, oldestKept: e.replies.first?.0)
    }

    mutating func record(caller: UInt64, sequence: UInt64, reply: StoredValue) {
        guard caller != 0 else { return }
        if callers[caller] == nil { callers[caller] = Entry(last: 0, replies: []) }
        callers[caller]!.last = sequence
        callers[caller]!.replies.append((sequence, reply))
        if callers[caller]!.replies.count > keep { callers[caller]!.replies.removeFirst() }
    }

    /// The table as it goes into a checkpoint: every reply encoded.
    func snapshot() throws -> [CallerSnapshot] {
        try callers.sorted { $0.key < $1.key }.map { caller, e in
            CallerSnapshot(caller: caller, last: e.last, sequences: e.replies.map(\.0), replies: try e.replies.map { try ReplyBytes($0.1) })
        }
    }

    init(keep: Int, snapshot: [CallerSnapshot]) throws {
        self.keep = keep
        for c in snapshot {
            guard c.sequences.count == c.replies.count else {
                throw CairnError(.serialization, "a checkpoint's caller table is inconsistent for caller \(c.caller)")
            }
            var replies = Deque<(UInt64, StoredValue)>()
            for (s, r) in zip(c.sequences, c.replies).suffix(keep) { replies.append((s, r.stored)) }
            callers[c.caller] = Entry(last: c.last, replies: replies)
        }
    }
}

struct CallerSnapshot: Codable {
    var caller: UInt64
    var last: UInt64
    var sequences: [UInt64]
    var replies: [ReplyBytes]
}

enum ReplyBytes: Codable {
    case value([UInt8])
    case failure(RemoteError)

    init(_ v: StoredValue) throws {
        if case .failed(let e) = v {
            self = .failure(e)
        } else {
            self = .value(try v.wireBytes()!)
        }
    }

    var stored: StoredValue {
        switch self {
        case .value(let b): return .encoded(b)
        case .failure(let e): return .failed(e)
        }
    }
}

/// One message as it is stored in a durable actor's log: caller, the caller's sequence
/// number, then the message's encoding. Fixed little-endian header, no codec on the hot path.
enum LoggedMessage {
    static let headerSize = 16

    static func encode(caller: UInt64, sequence: UInt64, message: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: headerSize + message.count)
        out.withUnsafeMutableBytes { p in
            p.storeBytes(of: caller.littleEndian, toByteOffset: 0, as: UInt64.self)
            p.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
            if !message.isEmpty {
                message.withUnsafeBytes { m in p.baseAddress!.advanced(by: headerSize).copyMemory(from: m.baseAddress!, byteCount: m.count) }
            }
        }
        return out
    }

    static func decode(_ payload: [UInt8]) throws -> (caller: UInt64, sequence: UInt64, message: [UInt8]) {
        guard payload.count >= headerSize else {
            throw CairnError(.serialization, "a logged message is \(payload.count) bytes, shorter than its \(headerSize)-byte header")
        }
        return payload.withUnsafeBytes { p in
            (UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
             UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
             Array(p[headerSize...]))
        }
    }
}

/// What a durable actor's checkpoint holds besides its position: the state's encoding and the
/// caller table.
struct DurableCheckpoint: Codable {
    static let formatVersion = 1
    var version: Int
    var state: [UInt8]
    var callers: [CallerSnapshot]
    /// Messages applied in the actor's life (for status and for memory-only actors' positions).
    var applied: UInt64
}

/// A durable actor's record in its store: what it is and how its last life ended.
struct DurableActorMeta: Codable, Equatable {
    var typeName: String
    /// Times it was restored after a crash.
    var restarts: Int
    /// True while a process hosts it; still true at the next start means it crashed.
    var running: Bool
    /// Declared dead after too many restarts.
    var dead: Bool
}
