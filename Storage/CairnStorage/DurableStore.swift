import CairnCore
import CairnCodec
import Foundation

/// How a ``DurableStore`` turns writes into fsync'd commits.
public enum SyncMode: Sendable, Equatable {
    /// Every call commits its own transaction, fsync'd, on the caller's thread.
    case eachCommit
    /// Writers hand their batches to the store's committer thread, which gathers everything
    /// waiting into one fsync'd transaction (at most `maxOperationsPerCommit` operations) and
    /// then completes every writer. Throughput grows with the number of concurrent writers;
    /// each write still returns only once it is durable.
    case groupCommit(maxOperationsPerCommit: Int)

    /// Group commit with a limit of 65,536 operations per transaction.
    public static let group = SyncMode.groupCommit(maxOperationsPerCommit: 65_536)
}

/// Settings of a ``DurableStore``.
public struct StoreOptions: Sendable {
    /// How writes are committed. Default: ``SyncMode/group``.
    public var syncMode: SyncMode = .group
    /// How many checkpoints per name are kept; older ones are deleted when a new one is written. Default 2.
    public var checkpointsKept: Int = 2
    /// zstd level for checkpoints (1 = fastest). Default 1.
    public var compressionLevel: Int32 = 1
    /// zstd threads that compress a large checkpoint in parallel; 0 compresses on the writing
    /// thread. Default 0, which leaves the other cores to the actors while a checkpoint is written
    /// in the background; raise it where checkpoint write time matters more.
    public var compressionWorkers: Int32 = 0

    public init(syncMode: SyncMode = .group, checkpointsKept: Int = 2, compressionLevel: Int32 = 1, compressionWorkers: Int32 = 0) {
        precondition(checkpointsKept >= 1, "checkpointsKept must be at least 1")
        precondition(compressionWorkers >= 0, "compressionWorkers must be 0 or more")
        self.syncMode = syncMode
        self.checkpointsKept = checkpointsKept
        self.compressionLevel = compressionLevel
        self.compressionWorkers = compressionWorkers
    }
}

/// A stored record: a key and its value.
public struct Record: Sendable, Equatable {
    public let key: [UInt8]
    public let value: [UInt8]
}

/// One entry of an append-only log.
public struct LogEntry: Sendable, Equatable {
    /// Position in the log, from 0, never reused.
    public let sequence: UInt64
    public let payload: [UInt8]
}

/// The extent of a log: entries `first ..< next` are present.
public struct LogBounds: Sendable, Equatable {
    /// The oldest entry still present (equal to `next` when the log is empty).
    public let first: UInt64
    /// The sequence number the next append gets.
    public let next: UInt64
}

/// Several writes applied in one atomic transaction: all of them or none.
public struct WriteBatch: Sendable {
    enum Operation: Sendable {
        case put([UInt8], [UInt8])
        case delete([UInt8])
        case append(String, [[UInt8]])
        case truncate(String, before: UInt64)
        case checkpoint(String, sequence: UInt64, blob: [UInt8])
        case checkpointPart(String, sequence: UInt64, part: UInt32, bytes: [UInt8])
    }

    var operations: [Operation] = []

    public init() {}

    /// Whether the batch has no operations.
    public var isEmpty: Bool { operations.isEmpty }

    /// Stores `value` under `key`.
    public mutating func put(_ key: [UInt8], _ value: [UInt8]) { operations.append(.put(key, value)) }
    /// Removes `key`.
    public mutating func delete(_ key: [UInt8]) { operations.append(.delete(key)) }
    /// Appends `payloads` to `log`; their sequence numbers are reported in ``CommitResult/firstSequences``.
    public mutating func append(to log: String, _ payloads: [[UInt8]]) { operations.append(.append(log, payloads)) }
    /// Deletes the entries of `log` before `sequence`.
    public mutating func truncate(log: String, before sequence: UInt64) { operations.append(.truncate(log, before: sequence)) }

    var weight: Int {
        operations.reduce(0) { n, op in
            if case .append(_, let payloads) = op { return n + payloads.count }
            return n + 1
        }
    }
}

/// What a committed ``WriteBatch`` produced.
public struct CommitResult: Sendable, Equatable {
    /// For each append in the batch, in order, the sequence number of its first entry.
    public let firstSequences: [UInt64]
}

/// A verified checkpoint read back from the store.
public struct CheckpointRead: Sendable {
    /// The sequence number the checkpoint was written with.
    public let sequence: UInt64
    /// The raw payload, decompressed and verified.
    public let payload: [UInt8]
    /// Newer checkpoints that failed verification and were skipped, newest first.
    public let rejected: [(sequence: UInt64, error: CheckpointError)]
}

/// Durable keyed records, append-only logs and checkpoints over a ``StorageEngine``.
///
/// Everything durable in Cairn goes through this one type: the engine decides where the
/// bytes live (``LMDBEngine`` by default, ``MemoryEngine`` for tests), the store decides
/// their layout, framing and checksums, and how writes become commits (``SyncMode``).
///
/// Layout inside the engine (first byte is the namespace):
/// - `0x01 key` → record value
/// - `0x02 len16 name last64` → a chunk of consecutive log entries ending at sequence `last`:
///   `first64 · frame*`, each frame `length32 · crc32c(seq64 · payload) · payload` (see ``LogChunk``)
/// - `0x03 name` → the log's truncation point, so sequence numbers are never reused
/// - `0x04 len16 name seq64` → checkpoint in ``CheckpointFormat``
///
/// Sequence numbers are assigned inside the commit, so concurrent appenders to one log
/// get distinct, gap-free numbers in commit order. The entries a commit appends to one log
/// are stored as one chunk (up to ``LogChunk/targetSize``), not one B-tree entry each:
/// that keeps LMDB's write amplification near 1 and lets group commit run at disk speed.
public final class DurableStore: Sendable {
    /// The engine underneath.
    public let engine: any StorageEngine
    /// The settings this store was opened with.
    public let options: StoreOptions
    private let committer: GroupCommitter?

    /// Opens a store over `engine`.
    public init(engine: any StorageEngine, options: StoreOptions = StoreOptions()) {
        self.engine = engine
        self.options = options
        if case .groupCommit(let limit) = options.syncMode {
            let keep = options.checkpointsKept
            committer = GroupCommitter(maxOperations: limit, execute: { batches in
                try engine.writeUnsynced { w in try Self.apply(batches, w, keep: keep) }
            }, sync: { try engine.sync() })
        } else {
            committer = nil
        }
    }

    /// Opens (creating if needed) an LMDB-backed store in `directory`.
    public static func lmdb(directory: String, options: StoreOptions = StoreOptions(), initialMapSize: Int = 64 << 20) throws -> DurableStore {
        DurableStore(engine: try LMDBEngine(directory: directory, initialMapSize: initialMapSize), options: options)
    }

    /// Creates an empty in-memory store.
    public static func inMemory(options: StoreOptions = StoreOptions()) -> DurableStore {
        DurableStore(engine: MemoryEngine(), options: options)
    }

    /// Finishes queued commits, then closes the engine. Later calls throw ``StorageError/Code-swift.enum/closed``.
    public func close() {
        committer?.stop()
        engine.close()
    }

    deinit {
        committer?.stop()
    }

    // MARK: records

    /// The value stored under `key`, or nil.
    public func get(_ key: [UInt8]) throws -> [UInt8]? {
        try validate(key: key)
        return try engine.read { try $0.get(Keys.record(key)) }
    }

    /// Durably stores `value` under `key`.
    public func put(_ key: [UInt8], _ value: [UInt8]) throws {
        var batch = WriteBatch()
        batch.put(key, value)
        _ = try commit(batch)
    }

    /// Durably removes `key`.
    public func delete(_ key: [UInt8]) throws {
        var batch = WriteBatch()
        batch.delete(key)
        _ = try commit(batch)
    }

    /// Records whose keys start with `prefix`, in key order, at most `limit`.
    public func scan(prefix: [UInt8], limit: Int = .max) throws -> [Record] {
        let start = Keys.record(prefix)
        return try engine.read { r in
            var out: [Record] = []
            try r.scan(from: start) { k, v in
                guard out.count < limit, Keys.hasPrefix(k, start) else { return false }
                out.append(Record(key: [UInt8](k.dropFirst()), value: [UInt8](v)))
                return true
            }
            return out
        }
    }

    // MARK: logs

    /// Durably appends `payloads` to `log`; returns the sequence number of the first.
    @discardableResult
    public func append(to log: String, _ payloads: [[UInt8]]) throws -> UInt64 {
        var batch = WriteBatch()
        batch.append(to: log, payloads)
        return try commit(batch).firstSequences[0]
    }

    /// Entries of `log` with `from <= sequence < upTo`, in order, at most `limit`.
    ///
    /// Every entry's length and checksum are verified; the first that fails throws
    /// ``StorageError/Code-swift.enum/corruptRecord`` with its ``StorageError/sequence``, and a
    /// caller that wants the entries before it reads again with `upTo:` that sequence.
    public func readLog(_ log: String, from: UInt64 = 0, upTo: UInt64 = .max, limit: Int = .max) throws -> [LogEntry] {
        try validate(log: log)
        let prefix = Keys.logPrefix(log)
        return try engine.read { r in
            let truncated = try r.get(Keys.logMeta(log)).map { Keys.readBE($0) } ?? 0
            let lower = max(from, truncated)
            var out: [LogEntry] = []
            guard limit > 0, lower < upTo else { return out }
            // The first chunk whose last entry is at or after `lower` holds it.
            try r.scan(from: Keys.log(log, lower)) { k, v in
                guard k.count == prefix.count + 8, Keys.hasPrefix(k, prefix) else { return false }
                var more = true
                try LogChunk.forEach(v, last: Keys.sequence(k), log: log, verifyFrom: lower, stopAt: upTo) { seq, payload in
                    guard seq >= lower else { return true }
                    guard out.count < limit else {
                        more = false
                        return false
                    }
                    out.append(LogEntry(sequence: seq, payload: [UInt8](payload)))
                    return true
                }
                return more && Keys.sequence(k) < upTo - 1
            }
            return out
        }
    }

    /// The present extent of `log`.
    public func logBounds(_ log: String) throws -> LogBounds {
        try validate(log: log)
        return try engine.read { r in
            let next = try Self.nextSequence(r, log)
            let truncated = try r.get(Keys.logMeta(log)).map { Keys.readBE($0) } ?? 0
            var first = next
            let prefix = Keys.logPrefix(log)
            try r.scan(from: prefix) { k, v in
                if k.count == prefix.count + 8, Keys.hasPrefix(k, prefix) {
                    first = max(LogChunk.first(v) ?? Keys.sequence(k), truncated)
                }
                return false
            }
            return LogBounds(first: min(first, next), next: next)
        }
    }

    /// Durably deletes the entries of `log` before `sequence`. Sequence numbers are not reused.
    public func truncateLog(_ log: String, before sequence: UInt64) throws {
        var batch = WriteBatch()
        batch.truncate(log: log, before: sequence)
        _ = try commit(batch)
    }

    // MARK: checkpoints

    /// Compresses, checksums and durably stores a checkpoint of `payload` under `name`,
    /// keeping the newest ``StoreOptions/checkpointsKept``. Returns the stored size in bytes.
    ///
    /// Compression and checksumming run on the caller's thread, outside the commit. With
    /// `partSize`, a larger checkpoint is written as parts of that size, each in its own
    /// durable commit, and then a small manifest under the checkpoint's key: the disk takes it
    /// in steps, so other writers' fsyncs never wait behind the whole checkpoint. The parts are
    /// committed by a thread of their own while the caller compresses the next ones, so the
    /// write takes about as long as the longer of compressing and storing, not their sum. The
    /// first part, which holds the header, is committed last, with the manifest. A write cut
    /// short leaves no manifest, so no checkpoint; its parts are deleted with older checkpoints.
    @discardableResult
    public func writeCheckpoint(_ name: String, sequence: UInt64, payload: [UInt8], partSize: Int? = nil) throws -> Int {
        try payload.withUnsafeBytes { try writeCheckpoint(name, sequence: sequence, payload: $0, partSize: partSize) }
    }

    /// Stores raw (encoded, uncompressed) state held in memory the caller keeps valid for the call.
    @discardableResult
    public func writeCheckpoint(_ name: String, sequence: UInt64, payload: UnsafeRawBufferPointer, partSize: Int? = nil) throws -> Int {
        try validate(log: name)
        guard let partSize else {
            let blob = try CheckpointFormat.encode(payload: payload, sequence: sequence, level: options.compressionLevel,
                                                   workers: options.compressionWorkers)
            var batch = WriteBatch()
            batch.operations.append(.checkpoint(name, sequence: sequence, blob: blob))
            _ = try commit(batch)
            return blob.count
        }
        precondition(partSize >= 4096, "checkpoint parts must be at least 4 KiB")
        // Started with the second part: a checkpoint that fits in one part needs no thread.
        var writer: PartWriter?
        defer { writer?.stop() }
        let (first, total) = try CheckpointFormat.encodePieces(
            payload: payload, sequence: sequence, level: options.compressionLevel, workers: options.compressionWorkers,
            pieceSize: partSize
        ) { index, piece in
            var batch = WriteBatch()
            batch.operations.append(.checkpointPart(name, sequence: sequence, part: UInt32(index), bytes: piece))
            if writer == nil { writer = PartWriter(store: self) }
            try writer!.submit(batch)
        }
        try writer?.finish()
        var batch = WriteBatch()
        if total <= partSize {
            batch.operations.append(.checkpoint(name, sequence: sequence, blob: first))
        } else {
            // Every other part is durable now; the first and the manifest that names them all go together.
            let parts = UInt32((total + partSize - 1) / partSize)
            batch.operations.append(.checkpointPart(name, sequence: sequence, part: 0, bytes: first))
            batch.operations.append(.checkpoint(name, sequence: sequence, blob: CheckpointManifest.encode(parts: parts, length: UInt64(total))))
        }
        _ = try commit(batch)
        return total
    }

    /// Encodes `state` with ``BinaryEncoder`` and stores it as a checkpoint. Returns the stored size in bytes.
    @discardableResult
    public func writeCheckpoint<State: Encodable>(_ name: String, sequence: UInt64, state: State) throws -> Int {
        try BinaryEncoder().withEncoded(state) { try writeCheckpoint(name, sequence: sequence, payload: $0) }
    }

    /// The newest checkpoint under `name` that verifies, or nil if there is none at all.
    ///
    /// Checkpoints that fail verification are skipped and listed in ``CheckpointRead/rejected``;
    /// if every stored one fails, throws ``StorageError/Code-swift.enum/noValidCheckpoint``.
    public func newestCheckpoint(_ name: String) throws -> CheckpointRead? {
        try validate(log: name)
        let prefix = Keys.checkpointPrefix(name)
        let sequences: [UInt64] = try engine.read { r in
            var out: [UInt64] = []
            try r.scanBackward(before: Keys.upperBound(prefix)) { k, _ in
                guard k.count == prefix.count + 8, Keys.hasPrefix(k, prefix) else { return false }
                out.append(Keys.sequence(k))
                return true
            }
            return out
        }
        var rejected: [(UInt64, CheckpointError)] = []
        for seq in sequences {
            guard var blob = try engine.read({ try $0.get(Keys.checkpoint(name, seq)) }) else { continue }
            do {
                if let (parts, length) = CheckpointManifest.decode(blob) {
                    blob = try assemble(name, seq, parts: parts, length: length)
                }
                let (stored, payload) = try CheckpointFormat.decode(blob)
                guard stored == seq else {
                    rejected.append((seq, CheckpointError(.lengthMismatch, "stored under sequence \(seq) but its header says \(stored)")))
                    continue
                }
                return CheckpointRead(sequence: seq, payload: payload, rejected: rejected)
            } catch {
                rejected.append((seq, error))
            }
        }
        if rejected.isEmpty { return nil }
        let reasons = rejected.map { "sequence \($0.0): \($0.1)" }.joined(separator: "; ")
        throw StorageError(.noValidCheckpoint, "no checkpoint under \"\(name)\" verifies (\(reasons)); recover from the log alone or restore the directory from a backup")
    }

    /// The newest verified checkpoint under `name`, decoded with ``BinaryDecoder``.
    public func newestCheckpoint<State: Decodable>(_ type: State.Type, _ name: String) throws -> (state: State, read: CheckpointRead)? {
        guard let read = try newestCheckpoint(name) else { return nil }
        return (try BinaryDecoder().decode(State.self, from: read.payload), read)
    }

    /// The checkpoint written in parts, put back together; a missing part or a wrong total is `truncated`.
    private func assemble(_ name: String, _ seq: UInt64, parts: UInt32, length: UInt64) throws(CheckpointError) -> [UInt8] {
        var out: [UInt8] = []
        do {
            out = try engine.read { r in
                var bytes: [UInt8] = []
                bytes.reserveCapacity(Int(min(length, 1 << 34)))
                for p in 0..<parts {
                    guard let part = try r.get(Keys.checkpointPart(name, seq, p)) else {
                        throw CheckpointError(.truncated, "part \(p) of \(parts) is missing")
                    }
                    bytes += part
                }
                return bytes
            }
        } catch let e as CheckpointError {
            throw e
        } catch {
            throw CheckpointError(.truncated, "its parts could not be read: \(error)")
        }
        guard UInt64(out.count) == length else {
            throw CheckpointError(.truncated, "its \(parts) parts hold \(out.count) bytes; the manifest says \(length)")
        }
        return out
    }

    /// Sequence numbers of the checkpoints stored under `name`, oldest first (verified or not).
    public func checkpointSequences(_ name: String) throws -> [UInt64] {
        try validate(log: name)
        let prefix = Keys.checkpointPrefix(name)
        return try engine.read { r in
            var out: [UInt64] = []
            try r.scan(from: prefix) { k, _ in
                guard k.count == prefix.count + 8, Keys.hasPrefix(k, prefix) else { return false }
                out.append(Keys.sequence(k))
                return true
            }
            return out
        }
    }

    // MARK: commits

    /// Durably applies `batch` in one transaction and returns once it is fsync'd.
    public func commit(_ batch: WriteBatch) throws -> CommitResult {
        try validate(batch)
        guard let committer else {
            return try engine.write { w in try Self.apply([batch], w, keep: options.checkpointsKept)[0] }
        }
        return try committer.submitAndWait(batch)
    }

    /// Durably applies `batch`; `completion` runs once it is fsync'd (or failed), on the committer thread
    /// in group-commit mode, so it must not block.
    public func commit(_ batch: WriteBatch, completion: @escaping @Sendable (Result<CommitResult, StorageError>) -> Void) {
        do {
            try validate(batch)
        } catch let error as StorageError {
            completion(.failure(error))
            return
        } catch {
            completion(.failure(StorageError(.io, "\(error)")))
            return
        }
        guard let committer else {
            completion(Result { try engine.write { w in try Self.apply([batch], w, keep: options.checkpointsKept)[0] } }
                .mapError { $0 as? StorageError ?? StorageError(.io, "\($0)") })
            return
        }
        committer.submit(batch, completion)
    }

    /// Durably applies `batch`, suspending until it is fsync'd.
    public func commit(_ batch: WriteBatch) async throws -> CommitResult {
        try await withCheckedThrowingContinuation { continuation in
            commit(batch) { continuation.resume(with: $0) }
        }
    }

    // MARK: inside a transaction

    static func apply(_ batches: [WriteBatch], _ w: any StorageWriter, keep: Int) throws -> [CommitResult] {
        var next: [String: UInt64] = [:]
        var open: [String: LogChunk.Builder] = [:]
        var results: [CommitResult] = []
        results.reserveCapacity(batches.count)
        for batch in batches {
            var firsts: [UInt64] = []
            for op in batch.operations {
                switch op {
                case .put(let key, let value):
                    try w.put(Keys.record(key), value)
                case .delete(let key):
                    try w.delete(Keys.record(key))
                case .append(let log, let payloads):
                    var seq = try next[log] ?? nextSequence(w, log)
                    firsts.append(seq)
                    var chunk = open.removeValue(forKey: log) ?? LogChunk.Builder(first: seq)
                    for payload in payloads {
                        chunk.add(payload, sequence: seq)
                        seq += 1
                        if chunk.size >= LogChunk.targetSize {
                            try chunk.write(w, log)
                            chunk = LogChunk.Builder(first: seq)
                        }
                    }
                    open[log] = chunk
                    next[log] = seq
                case .truncate(let log, let before):
                    if let chunk = open.removeValue(forKey: log) { try chunk.write(w, log) }
                    let current = try next[log] ?? nextSequence(w, log)
                    let cut = min(before, current)
                    // Whole chunks before the cut go; a chunk straddling it stays, and readers skip its early entries.
                    try w.deleteRange(from: Keys.log(log, 0), to: Keys.log(log, cut))
                    let meta = Keys.logMeta(log)
                    let old = try w.get(meta).map { Keys.readBE($0) } ?? 0
                    if cut > old { try w.put(meta, Keys.be(cut)) }
                    next[log] = current
                case .checkpoint(let name, let sequence, let blob):
                    try w.put(Keys.checkpoint(name, sequence), blob)
                    let prefix = Keys.checkpointPrefix(name)
                    var present: [UInt64] = []
                    try w.scan(from: prefix) { k, _ in
                        guard k.count == prefix.count + 8, Keys.hasPrefix(k, prefix) else { return false }
                        present.append(Keys.sequence(k))
                        return true
                    }
                    for old in present.dropLast(keep) { try w.delete(Keys.checkpoint(name, old)) }
                    // The parts of pruned checkpoints, and of any write cut short before them.
                    if let oldestKept = present.suffix(keep).first {
                        let parts = Keys.checkpointPartPrefix(name)
                        try w.deleteRange(from: parts + Keys.be(0), to: parts + Keys.be(oldestKept))
                    }
                case .checkpointPart(let name, let sequence, let part, let bytes):
                    try w.put(Keys.checkpointPart(name, sequence, part), bytes)
                }
            }
            results.append(CommitResult(firstSequences: firsts))
        }
        for (log, chunk) in open { try chunk.write(w, log) }
        return results
    }

    static func nextSequence(_ r: any StorageReader, _ log: String) throws -> UInt64 {
        let prefix = Keys.logPrefix(log)
        var next: UInt64 = 0
        try r.scanBackward(before: Keys.upperBound(prefix)) { k, _ in
            if k.count == prefix.count + 8, Keys.hasPrefix(k, prefix) { next = Keys.sequence(k) + 1 }
            return false
        }
        if let meta = try r.get(Keys.logMeta(log)) { next = max(next, Keys.readBE(meta)) }
        return next
    }

    // MARK: validation

    private func validate(key: [UInt8]) throws {
        guard !key.isEmpty, key.count + 1 <= engine.maxKeySize else {
            throw StorageError(.invalidKey, "record keys must be 1 to \(engine.maxKeySize - 1) bytes; got \(key.count)")
        }
    }

    private func validate(log: String) throws {
        let n = log.utf8.count
        guard n > 0, n <= 256, n + 11 <= engine.maxKeySize else {
            throw StorageError(.invalidName, "log and checkpoint names must be 1 to \(min(256, engine.maxKeySize - 11)) bytes of UTF-8; got \(n)")
        }
    }

    private func validate(_ batch: WriteBatch) throws {
        for op in batch.operations {
            switch op {
            case .put(let key, _), .delete(let key): try validate(key: key)
            case .append(let log, _), .truncate(let log, _), .checkpoint(let log, _, _), .checkpointPart(let log, _, _, _): try validate(log: log)
            }
        }
    }
}

/// Key layout helpers.
enum Keys {
    static func record(_ key: [UInt8]) -> [UInt8] { [0x01] + key }

    static func named(_ ns: UInt8, _ name: String) -> [UInt8] {
        let utf8 = Array(name.utf8)
        var out: [UInt8] = [ns, UInt8(utf8.count >> 8), UInt8(utf8.count & 0xFF)]
        out += utf8
        return out
    }

    static func logPrefix(_ name: String) -> [UInt8] { named(0x02, name) }
    static func log(_ name: String, _ seq: UInt64) -> [UInt8] { logPrefix(name) + be(seq) }
    static func logMeta(_ name: String) -> [UInt8] { [0x03] + Array(name.utf8) }
    static func checkpointPrefix(_ name: String) -> [UInt8] { named(0x04, name) }
    static func checkpoint(_ name: String, _ seq: UInt64) -> [UInt8] { checkpointPrefix(name) + be(seq) }
    static func checkpointPartPrefix(_ name: String) -> [UInt8] { named(0x05, name) }
    static func checkpointPart(_ name: String, _ seq: UInt64, _ part: UInt32) -> [UInt8] {
        checkpointPartPrefix(name) + be(seq) + [UInt8(part >> 24), UInt8((part >> 16) & 0xFF), UInt8((part >> 8) & 0xFF), UInt8(part & 0xFF)]
    }

    /// A key greater than every `prefix · seq64` key.
    static func upperBound(_ prefix: [UInt8]) -> [UInt8] { prefix + [UInt8](repeating: 0xFF, count: 9) }

    static func be(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }

    static func readBE(_ bytes: [UInt8]) -> UInt64 { bytes.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }

    static func sequence(_ key: UnsafeRawBufferPointer) -> UInt64 {
        var v: UInt64 = 0
        for b in key.suffix(8) { v = v << 8 | UInt64(b) }
        return v
    }

    static func hasPrefix(_ key: UnsafeRawBufferPointer, _ prefix: [UInt8]) -> Bool {
        key.count >= prefix.count && prefix.withUnsafeBytes { p in
            p.isEmpty || memcmp(key.baseAddress!, p.baseAddress!, p.count) == 0
        }
    }
}

/// Consecutive log entries stored under one key: `first64 · frame*` (little-endian), where
/// each frame is `length32 · crc32c(seq64 · payload) · payload`. The key names the last
/// entry's sequence number, so the chunk holding entry `s` is the first key at or after `s`.
///
/// The checksum covers the entry's sequence number, so an entry read at the wrong position,
/// or a chunk whose header was changed, fails verification.
public enum LogChunk {
    /// A commit starts a new chunk once its current one reaches this many bytes.
    public static let targetSize = 1 << 20

    struct Builder {
        var bytes: [UInt8]
        var last: UInt64 = 0
        var count = 0
        var size: Int { bytes.count }

        init(first: UInt64) {
            bytes = []
            bytes.reserveCapacity(4096)
            withUnsafeBytes(of: first.littleEndian) { bytes.append(contentsOf: $0) }
        }

        mutating func add(_ payload: [UInt8], sequence: UInt64) {
            var seqBE = sequence.bigEndian
            let seqCRC = withUnsafeBytes(of: &seqBE) { CRC32C.checksum($0) }
            let crc = payload.withUnsafeBytes { CRC32C.update(seqCRC, $0) }
            withUnsafeBytes(of: UInt32(payload.count).littleEndian) { bytes.append(contentsOf: $0) }
            withUnsafeBytes(of: crc.littleEndian) { bytes.append(contentsOf: $0) }
            bytes.append(contentsOf: payload)
            last = sequence
            count += 1
        }

        func write(_ w: any StorageWriter, _ log: String) throws {
            guard count > 0 else { return }
            try w.put(Keys.log(log, last), bytes)
        }
    }

    /// The first sequence number of a stored chunk, or nil if it is too short to say.
    static func first(_ chunk: UnsafeRawBufferPointer) -> UInt64? {
        chunk.count >= 8 ? UInt64(littleEndian: chunk.loadUnaligned(as: UInt64.self)) : nil
    }

    /// Walks the entries of a chunk in order, verifying each entry at or after `verifyFrom`,
    /// until `body` returns false. Throws ``StorageError/Code-swift.enum/corruptRecord`` naming the
    /// first entry that is cut short, fails its checksum, or disagrees with the chunk's key.
    static func forEach(_ chunk: UnsafeRawBufferPointer, last: UInt64, log: String, verifyFrom: UInt64, stopAt: UInt64 = .max,
                        _ body: (UInt64, UnsafeRawBufferPointer) throws -> Bool) throws {
        guard let first = first(chunk) else {
            throw StorageError(.corruptRecord, "the chunk of log \"\(log)\" ending at entry \(last) is \(chunk.count) bytes, shorter than its header (a torn write)", sequence: last)
        }
        guard first <= last else {
            throw StorageError(.corruptRecord, "the chunk of log \"\(log)\" ending at entry \(last) claims to start at \(first)", sequence: last)
        }
        var at = 8
        var seq = first
        while at < chunk.count {
            if seq >= stopAt { return }
            guard chunk.count - at >= 8 else {
                throw StorageError(.corruptRecord, "entry \(seq) of log \"\(log)\" is cut inside its 8-byte frame header (a torn write)", sequence: seq)
            }
            let n = Int(UInt32(littleEndian: chunk.loadUnaligned(fromByteOffset: at, as: UInt32.self)))
            let expected = UInt32(littleEndian: chunk.loadUnaligned(fromByteOffset: at + 4, as: UInt32.self))
            guard n <= chunk.count - at - 8 else {
                throw StorageError(.corruptRecord, "entry \(seq) of log \"\(log)\" declares \(n) payload bytes but only \(chunk.count - at - 8) remain (a torn write)", sequence: seq)
            }
            let payload = UnsafeRawBufferPointer(rebasing: chunk[(at + 8)..<(at + 8 + n)])
            if seq >= verifyFrom {
                var seqBE = seq.bigEndian
                let actual = CRC32C.update(withUnsafeBytes(of: &seqBE) { CRC32C.checksum($0) }, payload)
                guard actual == expected else {
                    throw StorageError(.corruptRecord, "entry \(seq) of log \"\(log)\" fails its CRC-32C (stored 0x\(String(expected, radix: 16)), computed 0x\(String(actual, radix: 16)))", sequence: seq)
                }
            }
            if try !body(seq, payload) { return }
            at += 8 + n
            seq += 1
        }
        guard seq == last + 1 else {
            throw StorageError(.corruptRecord, "the chunk of log \"\(log)\" should end at entry \(last) but holds entries up to \(Int64(bitPattern: seq) - 1) (a torn write)", sequence: seq)
        }
    }
}

/// The record stored under a checkpoint's key when the checkpoint was written in parts:
/// magic `CRNP` · part count (u32 BE) · total length (u64 BE).
enum CheckpointManifest {
    static let magic: [UInt8] = [0x43, 0x52, 0x4E, 0x50]

    static func encode(parts: UInt32, length: UInt64) -> [UInt8] {
        magic + [UInt8(parts >> 24), UInt8((parts >> 16) & 0xFF), UInt8((parts >> 8) & 0xFF), UInt8(parts & 0xFF)] + Keys.be(length)
    }

    static func decode(_ bytes: [UInt8]) -> (parts: UInt32, length: UInt64)? {
        guard bytes.count == 16, Array(bytes[0..<4]) == magic else { return nil }
        let parts = bytes[4..<8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        return (parts, Keys.readBE(Array(bytes[8...])))
    }
}

/// Commits a checkpoint's parts, in order, on a thread of its own, while the thread that
/// compresses them goes on (see ``DurableStore/writeCheckpoint(_:sequence:payload:partSize:)``).
final class PartWriter: @unchecked Sendable {
    private let store: DurableStore
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var queue: [WriteBatch] = []
    private var closing = false
    private var running = true
    private var failure: (any Error)?

    init(store: DurableStore) {
        self.store = store
        startThread(named: "cairn-ckptparts") { [self] in run() }
    }

    /// Queues `batch`; throws the error of an earlier part, if one failed.
    func submit(_ batch: WriteBatch) throws {
        condition.lock()
        defer { condition.unlock() }
        if let failure { throw failure }
        queue.append(batch)
        condition.broadcast()
    }

    /// Waits until every queued part is committed; throws the first failure.
    func finish() throws {
        condition.lock()
        defer { condition.unlock() }
        closing = true
        condition.broadcast()
        while running { condition.wait() }
        if let failure { throw failure }
    }

    /// Drops what is still queued (after a failure elsewhere) and waits for the thread to end.
    func stop() {
        condition.lock()
        defer { condition.unlock() }
        if running && failure == nil && !closing { failure = StorageError(.io, "checkpoint write abandoned") }
        closing = true
        condition.broadcast()
        while running { condition.wait() }
    }

    private func run() {
        condition.lock()
        while true {
            while queue.isEmpty && !closing { condition.wait() }
            if queue.isEmpty || failure != nil { break }
            let batch = queue.removeFirst()
            condition.unlock()
            var error: (any Error)?
            do {
                _ = try store.commit(batch)
            } catch let e {
                error = e
            }
            condition.lock()
            if let error, failure == nil { failure = error }
        }
        queue = []
        running = false
        condition.broadcast()
        condition.unlock()
    }
}
