import CairnStorage
import Foundation
import Synchronization

/// Durable actors' storage kept in the GCS chains (``ActorStorageOptions/Location/replicated``):
/// each actor's log, checkpoints and record live in a ``ReplicatedEngine`` whose journal is
/// written to the GCS, under `store/<namespace>/`. A node reaches the GCS through the control
/// store, which fences: a namespace is written only by the node that claimed it last, and a
/// claim is answered only once the previous holder's writes have settled. So the actor can be
/// restored on any machine of the cluster, with no shared directory.

/// A request of a node to the control store, on a namespace of the GCS's `store/` table.
struct StorageRequest: Sendable, Codable {
    enum Operation: Sendable, Codable {
        /// Take the namespace over (see ``ReplicatedMap/claim()``).
        case claim
        case get([String])
        case put([StorageEntry])
    }

    var id: UInt64
    var node: NodeID
    var namespace: String
    var operation: Operation
}

struct StorageEntry: Sendable, Codable {
    var key: String
    /// nil deletes the key.
    var value: [UInt8]?
}

/// The control store's answer to a ``StorageRequest``.
enum StorageReply: Sendable, Codable {
    case done
    case values([StorageEntry])
    case failed(String)
}

extension EmbeddedGCS {
    /// A ``ReplicatedMap`` over this GCS's `store/<namespace>/` keys, for a ``ReplicatedEngine``
    /// in this process: storage that survives the loss of any replica. It does not fence, so
    /// one writer per namespace at a time is the caller's to ensure (durable actors reach the
    /// GCS through the control store, which fences).
    public func replicatedMap(namespace: String) -> any ReplicatedMap {
        GCSMap(gcs: self, namespace: namespace)
    }

    /// Reads every key at once; the values come back in the order of `keys`.
    func readAll(_ keys: [String], completion: @escaping @Sendable (Result<[[UInt8]?], GCSError>) -> Void) {
        let gather = ResultGather<[UInt8]?>(count: keys.count, completion: completion)
        for (i, key) in keys.enumerated() { read(key) { gather.set(i, $0) } }
    }

    /// Writes every entry at once (nil deletes); completes when all are durable, or with the first failure.
    func writeAll(_ entries: [(key: String, value: [UInt8]?)], completion: @escaping @Sendable (Result<Void, GCSError>) -> Void) {
        let gather = ResultGather<Void>(count: entries.count) { completion($0.map { _ in () }) }
        for (i, e) in entries.enumerated() { write(e.key, e.value) { gather.set(i, $0) } }
    }

    /// The GCS key of `key` in a storage namespace.
    static func storageKey(_ namespace: String, _ key: String) -> String { GCSTable.storage.key(namespace + "/" + key) }
}

/// Collects `count` results and completes once with all of them, or with the first failure.
private final class ResultGather<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [T?]
    private var remaining: Int
    private var finished = false
    private let completion: @Sendable (Result<[T], GCSError>) -> Void

    init(count: Int, completion: @escaping @Sendable (Result<[T], GCSError>) -> Void) {
        values = Array(repeating: nil, count: count)
        remaining = count
        self.completion = completion
        if count == 0 {
            finished = true
            completion(.success([]))
        }
    }

    func set(_ i: Int, _ result: Result<T, GCSError>) {
        let outcome: Result<[T], GCSError>? = lock.withLock {
            guard !finished else { return nil }
            switch result {
            case .failure(let e):
                finished = true
                return .failure(e)
            case .success(let v):
                values[i] = v
                remaining -= 1
                guard remaining == 0 else { return nil }
                finished = true
                return .success(values.map { $0! })
            }
        }
        if let outcome { completion(outcome) }
    }
}

/// A namespace of the GCS's `store/` table, reached directly in the process that runs the GCS.
/// It has no fence: one writer per namespace is the caller's to ensure.
final class GCSMap: ReplicatedMap {
    let gcs: EmbeddedGCS
    let namespace: String

    init(gcs: EmbeddedGCS, namespace: String) {
        self.gcs = gcs
        self.namespace = namespace
    }

    var maxValueBytes: Int { EmbeddedGCS.maxValueBytes }
    var description: String { "the GCS's store/\(namespace)" }

    func claim() throws {}

    func get(_ keys: [String]) throws -> [[UInt8]?] {
        try gcs.wait { gcs.readAll(keys.map { EmbeddedGCS.storageKey(namespace, $0) }, completion: $0) }
    }

    func put(_ entries: [(key: String, value: [UInt8]?)]) throws {
        try gcs.wait { gcs.writeAll(entries.map { (EmbeddedGCS.storageKey(namespace, $0.key), $0.value) }, completion: $0) }
    }
}

/// A node's side of the storage requests it sends the control store: each caller blocks until
/// its answer comes back (on the node's inbox thread) or ``timeout`` passes.
final class StorageProxy: Sendable {
    let node: NodeID
    let transport: any Transport
    /// How long a request waits for its answer. The GCS itself gives up after 10 s.
    static let timeout = Duration.seconds(30)
    private let next = Atomic<UInt64>(1)
    private let waiting = Mutex<[UInt64: ReplyBox]>([:])

    init(node: NodeID, transport: any Transport) {
        self.node = node
        self.transport = transport
    }

    func call(_ namespace: String, _ operation: StorageRequest.Operation) throws -> StorageReply {
        let id = next.add(1, ordering: .relaxed).oldValue
        let box = ReplyBox()
        waiting.withLock { $0[id] = box }
        defer { _ = waiting.withLock { $0.removeValue(forKey: id) } }
        transport.send(.control(.storage(StorageRequest(id: id, node: node, namespace: namespace, operation: operation))), to: .controlStore)
        guard let reply = box.wait(until: ContinuousClock.now + Self.timeout) else {
            throw StorageError(.remote, "the control store did not answer \(node)'s request on store/\(namespace) within \(Self.timeout)")
        }
        return reply
    }

    /// An answer arrived (on the node's inbox thread).
    func complete(_ id: UInt64, _ reply: StorageReply) {
        waiting.withLock { $0[id] }?.set(reply)
    }

    private final class ReplyBox: @unchecked Sendable {
        private let condition = NSCondition()
        private var reply: StorageReply?

        func set(_ r: StorageReply) {
            condition.withLock {
                reply = r
                condition.signal()
            }
        }

        func wait(until deadline: ContinuousClock.Instant) -> StorageReply? {
            condition.lock()
            defer { condition.unlock() }
            while reply == nil {
                let left = ContinuousClock.now.duration(to: deadline)
                guard left > .zero else { return nil }
                let (s, a) = left.components
                _ = condition.wait(until: Date(timeIntervalSinceNow: Double(s) + Double(a) / 1e18))
            }
            return reply
        }
    }
}

/// A namespace of the GCS's `store/` table, reached through the control store (from any node
/// process). Requests are split so that no message carries more than ``messageBytes``.
final class ProxiedMap: ReplicatedMap {
    let proxy: StorageProxy
    let namespace: String
    static let messageBytes = 8 << 20

    init(proxy: StorageProxy, namespace: String) {
        self.proxy = proxy
        self.namespace = namespace
    }

    var maxValueBytes: Int { EmbeddedGCS.maxValueBytes }
    var description: String { "the GCS's store/\(namespace) (through the control store)" }

    func claim() throws {
        _ = try call(.claim)
    }

    func get(_ keys: [String]) throws -> [[UInt8]?] {
        var values: [[UInt8]?] = []
        // Each value can be up to maxValueBytes: ask for few enough that the answer fits.
        let perRequest = max(1, Self.messageBytes / maxValueBytes)
        var i = 0
        while i < keys.count {
            let chunk = Array(keys[i..<min(keys.count, i + perRequest)])
            guard case .values(let entries) = try call(.get(chunk)), entries.count == chunk.count else {
                throw StorageError(.remote, "the control store answered a read of \(description) with something else")
            }
            values += entries.map(\.value)
            i += chunk.count
        }
        return values
    }

    func put(_ entries: [(key: String, value: [UInt8]?)]) throws {
        var chunk: [StorageEntry] = []
        var bytes = 0
        for e in entries {
            let size = e.key.utf8.count + (e.value?.count ?? 0)
            if !chunk.isEmpty && bytes + size > Self.messageBytes {
                _ = try call(.put(chunk))
                chunk = []
                bytes = 0
            }
            chunk.append(StorageEntry(key: e.key, value: e.value))
            bytes += size
        }
        if !chunk.isEmpty { _ = try call(.put(chunk)) }
    }

    private func call(_ operation: StorageRequest.Operation) throws -> StorageReply {
        let reply = try proxy.call(namespace, operation)
        if case .failed(let why) = reply { throw StorageError(.remote, why) }
        return reply
    }
}

/// The control store's side: requests on the GCS's `store/` table, with the fence. Runs on the
/// control store's inbox thread; GCS completions come back to it as
/// ``ControlRequest/storageSettled(_:_:)``.
struct StorageFence {
    /// The node that claimed each namespace last.
    private var owners: [String: NodeID] = [:]
    /// Writes in flight per namespace.
    private var writing: [String: Int] = [:]
    /// Claims waiting for a namespace's writes to settle.
    private var claims: [String: [StorageRequest]] = [:]

    enum Decision {
        case reply(StorageReply)
        /// Send it to the GCS.
        case forward
        /// Answer later.
        case wait
    }

    /// What to do with a request from a live node.
    mutating func admit(_ r: StorageRequest) -> Decision {
        switch r.operation {
        case .claim:
            if writing[r.namespace, default: 0] > 0 {
                claims[r.namespace, default: []].append(r)
                return .wait
            }
            owners[r.namespace] = r.node
            return .reply(.done)
        case .get:
            return .forward
        case .put:
            guard let owner = owners[r.namespace] else {
                return .reply(.failed("store/\(r.namespace) was not claimed by \(r.node) (the control store may have restarted); open the store again"))
            }
            guard owner == r.node else {
                return .reply(.failed("store/\(r.namespace) was taken over by \(owner), so \(r.node)'s writes to it are refused; the actor lives on \(owner) now"))
            }
            writing[r.namespace, default: 0] += 1
            return .forward
        }
    }

    /// A forwarded request settled: the claims that may now be answered.
    mutating func settled(_ r: StorageRequest) -> [StorageRequest] {
        guard case .put = r.operation else { return [] }
        writing[r.namespace, default: 1] -= 1
        guard writing[r.namespace] == 0 else { return [] }
        writing[r.namespace] = nil
        let ready = claims.removeValue(forKey: r.namespace) ?? []
        if let last = ready.last { owners[r.namespace] = last.node }
        return ready
    }
}
