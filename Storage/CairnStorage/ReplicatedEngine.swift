import CairnCore
import Foundation

/// A remote, replicated key-value map: where a ``ReplicatedEngine`` keeps its journal. In
/// Cairn this is the GCS, whose chains replicate every write before acknowledging it, reached
/// directly or through the control store. Keys are relative to the map's namespace.
public protocol ReplicatedMap: Sendable {
    /// Takes the namespace over for this writer: once this returns, every write an earlier
    /// writer had in flight has settled, and writes from anyone else are refused. Blocks.
    func claim() throws
    /// The values of `keys`, nil where absent, reflecting every write acknowledged before the
    /// call. Blocks.
    func get(_ keys: [String]) throws -> [[UInt8]?]
    /// Writes every entry (a nil value deletes the key), in any order, and returns once all of
    /// them are durable. Blocks.
    func put(_ entries: [(key: String, value: [UInt8]?)]) throws
    /// The largest value the map takes, in bytes.
    var maxValueBytes: Int { get }
    /// Where the map lives, for messages.
    var description: String { get }
}

/// A storage engine whose contents live in memory and whose every write transaction is
/// journalled, before it returns, to a ``ReplicatedMap``: the replicated backend, for storage
/// that must outlive the machine it was written on. Opening the engine on any machine claims
/// the map and rebuilds the contents from it.
///
/// Layout in the map (transactions numbered from 1):
/// - `m` → the manifest: the base's generation, its parts, the last transaction it holds
/// - `g/b<i>` → part `i` of generation `g`'s base snapshot
/// - `t<n>` → transaction `n` (header, then its first piece); `t<n>/<i>` → its further pieces,
///   written before `t<n>`, so the head piece's presence commits the transaction
///
/// Transactions are written one at a time, so the journal has no gaps: opening reads the base,
/// then from the base's last transaction on until the first absent one. When the journal since
/// the base outgrows the base (or ``Options/compactAfterTransactions``), a background thread
/// writes the contents as of that transaction as a new generation's base, switches the
/// manifest to it in one write, and then deletes the old base and the transactions it covers.
/// Writes go on meanwhile; a compaction that fails leaves the old manifest, whose transactions
/// are all still there, and is tried again later.
///
/// A write the map does not acknowledge may still have been applied, so after one the engine
/// refuses further writes (``StorageError/Code-swift.enum/remote``): open it again, which
/// reads back whatever landed.
///
/// Thread safety (why `@unchecked Sendable` is sound): the journal's position fields are
/// touched only with `writeLock` held; the contents are the ``MemoryEngine``'s, under its lock.
public final class ReplicatedEngine: StorageEngine, @unchecked Sendable {
    public struct Options: Sendable {
        /// Compact when the transactions since the base hold more bytes than this and than
        /// the base itself. Default 1 MiB.
        public var compactAfterBytes: Int
        /// Compact after this many transactions since the base, whatever their size, so that
        /// opening reads a bounded number of keys. Default 1,024.
        public var compactAfterTransactions: Int
        /// Keys read per request while opening. Default 64.
        public var readBatch: Int

        public init(compactAfterBytes: Int = 1 << 20, compactAfterTransactions: Int = 1_024, readBatch: Int = 64) {
            precondition(compactAfterBytes >= 0 && compactAfterTransactions >= 1 && readBatch >= 1,
                         "compaction thresholds and the read batch must be positive")
            self.compactAfterBytes = compactAfterBytes
            self.compactAfterTransactions = compactAfterTransactions
            self.readBatch = readBatch
        }
    }

    /// What opening read back.
    public struct Recovery: Sendable, Equatable {
        public var generation: UInt64
        public var baseBytes: Int
        public var transactions: Int
        public var transactionBytes: Int
    }

    private let memory: MemoryEngine
    private let map: any ReplicatedMap
    private let options: Options
    private let pieceBytes: Int
    private let writeLock = NSLock()
    // Under writeLock:
    private var generation: UInt64 = 0
    private var baseParts: Int = 0
    private var baseTransaction: UInt64 = 0
    private var nextTransaction: UInt64 = 1
    private var baseBytes = 0
    private var journalBytes = 0
    private var failure: StorageError?
    /// The transactions since the base, with their keys and sizes: what a compaction deletes.
    private var journaled: [(n: UInt64, keys: [String], bytes: Int)] = []
    /// The generation the next compaction writes (past any whose manifest write failed).
    private var nextGeneration: UInt64 = 1
    private var compacting = false
    private let compactions = DispatchGroup()
    /// What opening read back.
    public private(set) var recovery = Recovery(generation: 0, baseBytes: 0, transactions: 0, transactionBytes: 0)

    public var maxKeySize: Int { memory.maxKeySize }

    /// Claims `map` and rebuilds its contents. Throws ``StorageError/Code-swift.enum/remote``
    /// when the map cannot be reached, ``StorageError/Code-swift.enum/corruptRecord`` when what
    /// it holds fails a check.
    public init(map: any ReplicatedMap, options: Options = Options()) throws {
        self.map = map
        self.options = options
        memory = MemoryEngine()
        pieceBytes = map.maxValueBytes - Journal.headerBytes
        precondition(pieceBytes >= 4_096, "the map must take values of at least 4 KiB")
        do {
            try map.claim()
        } catch {
            throw Self.remote("cannot claim \(map.description)", error)
        }
        if let bytes = try Self.fetch(map, ["m"])[0] {
            let manifest = try Journal.Manifest.decode(bytes, where: map.description)
            generation = manifest.generation
            nextGeneration = generation + 1
            baseParts = Int(manifest.parts)
            baseTransaction = manifest.baseTransaction
            var base: [UInt8] = []
            base.reserveCapacity(Int(manifest.length))
            let keys = (0..<baseParts).map { Journal.basePart(generation, $0) }
            for (key, part) in zip(keys, try Self.fetch(map, keys)) {
                guard let part else {
                    throw StorageError(.corruptRecord, "\(map.description): the base snapshot's part \(key) is missing; the replicated store is damaged")
                }
                base += part
            }
            guard base.count == manifest.length, CRC32C.checksum(base) == manifest.crc else {
                throw StorageError(.corruptRecord, "\(map.description): the base snapshot of generation \(generation) fails its length or checksum check; the replicated store is damaged")
            }
            try Self.apply(base, to: memory, where: map.description)
            baseBytes = base.count
            recovery.generation = generation
            recovery.baseBytes = base.count
        }
        nextTransaction = baseTransaction + 1
        reading: while true {
            let numbers = (0..<UInt64(options.readBatch)).map { nextTransaction + $0 }
            let heads = try Self.fetch(map, numbers.map { Journal.transaction($0) })
            for (n, head) in zip(numbers, heads) {
                guard let head else { break reading }
                let (body, keys) = try readTransaction(n, head: head)
                try Self.apply(body, to: memory, where: map.description)
                journaled.append((n, keys, body.count))
                journalBytes += body.count
                recovery.transactions += 1
                recovery.transactionBytes += body.count
                nextTransaction = n + 1
            }
        }
    }

    public func read<T>(_ body: (any StorageReader) throws -> T) throws -> T {
        try memory.read(body)
    }

    public func write<T>(_ body: (any StorageWriter) throws -> T) throws -> T {
        writeLock.lock()
        defer { writeLock.unlock() }
        if let failure { throw failure }
        let result = try memory.write { txn -> T in
            let recorder = Recorder(txn)
            let result = try body(recorder)
            if !recorder.operations.isEmpty {
                // Journalled inside the memory transaction: if the map does not take it, the
                // transaction is undone.
                try journal(recorder.operations)
            }
            return result
        }
        if !compacting && (journaled.count >= options.compactAfterTransactions
                           || (journalBytes > options.compactAfterBytes && journalBytes > baseBytes)) {
            // The contents as of the last transaction, copied in O(1) (copy on write).
            let snapshot = memory.snapshot()
            let upTo = nextTransaction - 1
            let g = nextGeneration
            nextGeneration += 1
            compacting = true
            compactions.enter()
            Thread.detachNewThread { [self] in
                defer { compactions.leave() }
                compact(snapshot, upTo: upTo, generation: g)
            }
        }
        return result
    }

    /// Every write is durable when it returns.
    public func writeUnsynced<T>(_ body: (any StorageWriter) throws -> T) throws -> T { try write(body) }

    public func sync() throws {}

    /// Waits for a compaction in progress, then closes.
    public func close() {
        writeLock.withLock { failure = StorageError(.closed, "the replicated store \(map.description) was closed") }
        compactions.wait()
        memory.close()
    }

    /// Returns once no compaction is running.
    func waitForCompactions() { compactions.wait() }

    /// Generation and journal position, for tests and status.
    public var position: (generation: UInt64, baseTransaction: UInt64, nextTransaction: UInt64) {
        writeLock.withLock { (generation, baseTransaction, nextTransaction) }
    }

    // MARK: - Journal

    private func journal(_ operations: [Journal.Operation]) throws {
        let body = Journal.encode(operations)
        let n = nextTransaction
        let pieces = split(body)
        let head = Journal.header(pieces: UInt32(max(1, pieces.count)), body: body) + (pieces.first ?? [])
        let entries: [(key: String, value: [UInt8]?)] = pieces.enumerated().dropFirst().map { (Journal.piece(n, $0.offset), $0.element) }
        do {
            if !entries.isEmpty { try map.put(entries) }
            try map.put([(Journal.transaction(n), head)])
        } catch {
            failure = Self.remote("\(map.description) did not take transaction \(n), so the store stops writing; open it again", error)
            throw failure!
        }
        nextTransaction = n + 1
        journalBytes += body.count
        journaled.append((n, entries.map(\.key) + [Journal.transaction(n)], body.count))
    }

    /// `bytes` in pieces that each fit a map value (with a transaction's header before the first).
    private func split(_ bytes: [UInt8]) -> [[UInt8]] {
        stride(from: 0, to: bytes.count, by: pieceBytes).map { Array(bytes[$0..<min(bytes.count, $0 + pieceBytes)]) }
    }

    /// The transaction's body, and the keys it is stored under.
    private func readTransaction(_ n: UInt64, head: [UInt8]) throws -> ([UInt8], [String]) {
        let (pieces, length, crc) = try Journal.readHeader(head, transaction: n, where: map.description)
        var body = Array(head.dropFirst(Journal.headerBytes))
        var stored = [Journal.transaction(n)]
        if pieces > 1 {
            let keys = (1..<Int(pieces)).map { Journal.piece(n, $0) }
            stored += keys
            for (key, piece) in zip(keys, try Self.fetch(map, keys)) {
                guard let piece else {
                    throw StorageError(.corruptRecord, "\(map.description): transaction \(n) lacks its piece \(key); the replicated store is damaged", sequence: n)
                }
                body += piece
            }
        }
        guard body.count == length, CRC32C.checksum(body) == crc else {
            throw StorageError(.corruptRecord, "\(map.description): transaction \(n) fails its length or checksum check; the replicated store is damaged", sequence: n)
        }
        return (body, stored)
    }

    /// On a thread of its own: writes `snapshot` (the contents as of transaction `upTo`) as
    /// generation `g`'s base, switches the manifest to it, then deletes the previous base and
    /// the transactions up to `upTo`. If the map does not take the base or the manifest, the
    /// previous manifest and every transaction after it are still there: nothing is deleted,
    /// and a later write tries again.
    private func compact(_ snapshot: (keys: [[UInt8]], values: [[UInt8]]), upTo: UInt64, generation g: UInt64) {
        let base = Journal.encode(zip(snapshot.keys, snapshot.values).map { .put($0, $1) })
        let parts: [(key: String, value: [UInt8]?)] = split(base).enumerated().map { (Journal.basePart(g, $0.offset), $0.element) }
        let manifest = Journal.Manifest(generation: g, parts: UInt32(parts.count), baseTransaction: upTo,
                                        length: UInt64(base.count), crc: CRC32C.checksum(base))
        do {
            try map.put(parts)
            try map.put([("m", manifest.encoded)])
        } catch {
            writeLock.withLock { compacting = false }
            return
        }
        let garbage: [String] = writeLock.withLock {
            let covered = journaled.prefix { $0.n <= upTo }
            journaled.removeFirst(covered.count)
            journalBytes -= covered.reduce(0) { $0 + $1.bytes }
            let old = (0..<baseParts).map { Journal.basePart(generation, $0) }
            generation = g
            baseParts = parts.count
            baseTransaction = upTo
            baseBytes = base.count
            compacting = false
            return old + covered.flatMap(\.keys)
        }
        // Keys a failed delete leaves behind are never read again.
        try? map.put(garbage.map { ($0, nil) })
    }

    private static func fetch(_ map: any ReplicatedMap, _ keys: [String]) throws -> [[UInt8]?] {
        do {
            let values = try map.get(keys)
            precondition(values.count == keys.count, "a replicated map answered \(values.count) values for \(keys.count) keys")
            return values
        } catch let e as StorageError where e.code == .corruptRecord {
            throw e
        } catch {
            throw remote("cannot read \(map.description)", error)
        }
    }

    private static func remote(_ what: String, _ error: any Error) -> StorageError {
        if let e = error as? StorageError, e.code == .remote { return StorageError(.remote, "\(what): \(e.detail)") }
        return StorageError(.remote, "\(what): \(error)")
    }

    private static func apply(_ body: [UInt8], to memory: MemoryEngine, where place: String) throws {
        let operations = try Journal.decode(body, where: place)
        try memory.write { w in
            for op in operations {
                switch op {
                case .put(let k, let v): try w.put(k, v)
                case .delete(let k): try w.delete(k)
                case .deleteRange(let s, let e): try w.deleteRange(from: s, to: e)
                }
            }
        }
    }

    /// Forwards to the memory transaction and records what changed.
    private final class Recorder: StorageWriter {
        let txn: any StorageWriter
        var operations: [Journal.Operation] = []
        init(_ txn: any StorageWriter) { self.txn = txn }

        func get(_ key: [UInt8]) throws -> [UInt8]? { try txn.get(key) }
        func scan(from start: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
            try txn.scan(from: start, body)
        }
        func scanBackward(before end: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
            try txn.scanBackward(before: end, body)
        }
        func put(_ key: [UInt8], _ value: UnsafeRawBufferPointer) throws {
            try txn.put(key, value)
            operations.append(.put(key, [UInt8](value)))
        }
        @discardableResult func delete(_ key: [UInt8]) throws -> Bool {
            let existed = try txn.delete(key)
            if existed { operations.append(.delete(key)) }
            return existed
        }
        @discardableResult func deleteRange(from start: [UInt8], to end: [UInt8]) throws -> Int {
            let n = try txn.deleteRange(from: start, to: end)
            if n > 0 { operations.append(.deleteRange(start, end)) }
            return n
        }
    }
}

/// The byte formats of a ``ReplicatedEngine``'s journal. Little-endian throughout.
enum Journal {
    enum Operation: Equatable {
        case put([UInt8], [UInt8])
        case delete([UInt8])
        case deleteRange([UInt8], [UInt8])
    }

    static func transaction(_ n: UInt64) -> String { "t\(n)" }
    static func piece(_ n: UInt64, _ i: Int) -> String { "t\(n)/\(i)" }
    static func basePart(_ g: UInt64, _ i: Int) -> String { "\(g)/b\(i)" }

    static let transactionMagic: UInt32 = 0x3154_4A43 // "CJT1"
    static let manifestMagic: UInt32 = 0x314D_4A43 // "CJM1"
    /// magic, pieces, length, crc
    static let headerBytes = 4 + 4 + 8 + 4

    static func header(pieces: UInt32, body: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(headerBytes)
        put(&out, transactionMagic)
        put(&out, pieces)
        put(&out, UInt64(body.count))
        put(&out, CRC32C.checksum(body))
        return out
    }

    static func readHeader(_ head: [UInt8], transaction n: UInt64, where place: String) throws -> (pieces: UInt32, length: UInt64, crc: UInt32) {
        var r = Reader(bytes: head)
        guard let magic: UInt32 = r.read(), magic == transactionMagic, let pieces: UInt32 = r.read(), pieces >= 1,
              let length: UInt64 = r.read(), let crc: UInt32 = r.read() else {
            throw StorageError(.corruptRecord, "\(place): transaction \(n) has no valid header; the replicated store is damaged", sequence: n)
        }
        return (pieces, length, crc)
    }

    struct Manifest: Equatable {
        var generation: UInt64
        var parts: UInt32
        var baseTransaction: UInt64
        var length: UInt64
        var crc: UInt32

        var encoded: [UInt8] {
            var out: [UInt8] = []
            put(&out, manifestMagic)
            put(&out, generation)
            put(&out, parts)
            put(&out, baseTransaction)
            put(&out, length)
            put(&out, crc)
            put(&out, CRC32C.checksum(out))
            return out
        }

        static func decode(_ bytes: [UInt8], where place: String) throws -> Manifest {
            var r = Reader(bytes: bytes)
            guard bytes.count == 40, let magic: UInt32 = r.read(), magic == manifestMagic,
                  let g: UInt64 = r.read(), let parts: UInt32 = r.read(), let base: UInt64 = r.read(),
                  let length: UInt64 = r.read(), let crc: UInt32 = r.read(), let check: UInt32 = r.read(),
                  check == CRC32C.checksum(Array(bytes.prefix(36))) else {
                throw StorageError(.corruptRecord, "\(place): the manifest fails its checks; the replicated store is damaged")
            }
            return Manifest(generation: g, parts: parts, baseTransaction: base, length: length, crc: crc)
        }
    }

    static func encode(_ operations: [Operation]) -> [UInt8] {
        var out: [UInt8] = []
        var size = 4
        for op in operations {
            switch op {
            case .put(let k, let v): size += 9 + k.count + v.count
            case .delete(let k): size += 5 + k.count
            case .deleteRange(let s, let e): size += 9 + s.count + e.count
            }
        }
        out.reserveCapacity(size)
        put(&out, UInt32(operations.count))
        for op in operations {
            switch op {
            case .put(let k, let v):
                out.append(1)
                put(&out, UInt32(k.count)); out += k
                put(&out, UInt32(v.count)); out += v
            case .delete(let k):
                out.append(2)
                put(&out, UInt32(k.count)); out += k
            case .deleteRange(let s, let e):
                out.append(3)
                put(&out, UInt32(s.count)); out += s
                put(&out, UInt32(e.count)); out += e
            }
        }
        return out
    }

    static func decode(_ body: [UInt8], where place: String) throws -> [Operation] {
        var r = Reader(bytes: body)
        let bad = StorageError(.corruptRecord, "\(place): a journalled transaction does not decode; the replicated store is damaged")
        guard let count: UInt32 = r.read(), Int(count) <= body.count else { throw bad }
        var operations: [Operation] = []
        operations.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let tag = r.bytes(1)?.first, let a = r.field() else { throw bad }
            switch tag {
            case 1:
                guard let v = r.field() else { throw bad }
                operations.append(.put(a, v))
            case 2:
                operations.append(.delete(a))
            case 3:
                guard let e = r.field() else { throw bad }
                operations.append(.deleteRange(a, e))
            default:
                throw bad
            }
        }
        guard r.offset == body.count else { throw bad }
        return operations
    }

    static func put<T: FixedWidthInteger>(_ out: inout [UInt8], _ v: T) {
        withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
    }

    struct Reader {
        let bytes: [UInt8]
        var offset = 0

        mutating func bytes(_ n: Int) -> ArraySlice<UInt8>? {
            guard n >= 0, bytes.count - offset >= n else { return nil }
            defer { offset += n }
            return bytes[offset..<offset + n]
        }

        mutating func read<T: FixedWidthInteger>() -> T? {
            guard let s = bytes(MemoryLayout<T>.size) else { return nil }
            return s.reversed().reduce(T(0)) { $0 << 8 | T($1) }
        }

        /// A length-prefixed field.
        mutating func field() -> [UInt8]? {
            guard let n: UInt32 = read(), let s = bytes(Int(n)) else { return nil }
            return Array(s)
        }
    }
}
