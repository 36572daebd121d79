/// An ordered byte-key store with transactions: what a backend must provide.
///
/// ``DurableStore`` builds records, logs, checkpoints, framing, checksums and group commit
/// on top of this, once, so every backend behaves the same. An engine only stores bytes.
///
/// Contract:
/// - `read` runs `body` against a consistent snapshot; nothing it sees changes during it.
/// - `write` runs `body` in one atomic transaction: when `write` returns, every change is
///   durable (the LMDB engine has fsync'd it); when it throws, none is applied. The engine
///   may run `body` more than once (for example after growing its map), so `body` must not
///   change anything outside the transaction.
/// - Buffers passed to `body` callbacks are valid only during the callback.
public protocol StorageEngine: AnyObject, Sendable {
    /// Runs `body` against a read-only snapshot.
    func read<T>(_ body: (any StorageReader) throws -> T) throws -> T
    /// Runs `body` in one durable, atomic write transaction.
    func write<T>(_ body: (any StorageWriter) throws -> T) throws -> T
    /// Runs `body` in one atomic write transaction that is not yet durable: it becomes durable
    /// at the next ``sync()`` that starts after this returns. Used by group commit to overlap
    /// one commit's final flush with the next commit's work.
    func writeUnsynced<T>(_ body: (any StorageWriter) throws -> T) throws -> T
    /// Makes every transaction committed before this call durable.
    func sync() throws
    /// Largest key the engine accepts, in bytes.
    var maxKeySize: Int { get }
    /// Releases the engine's resources; later calls throw ``StorageError/Code-swift.enum/closed``.
    func close()
}

/// Read access inside a transaction.
public protocol StorageReader {
    /// The value stored under `key`, copied out.
    func get(_ key: [UInt8]) throws -> [UInt8]?
    /// Visits entries with `key >= start` in ascending key order until `body` returns false.
    func scan(from start: [UInt8], _ body: (_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) throws -> Bool) throws
    /// Visits entries with `key < end` in descending key order until `body` returns false.
    func scanBackward(before end: [UInt8], _ body: (_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) throws -> Bool) throws
}

/// Write access inside a transaction.
public protocol StorageWriter: StorageReader {
    /// Stores `value` under `key`, replacing any previous value.
    func put(_ key: [UInt8], _ value: UnsafeRawBufferPointer) throws
    /// Removes `key`; returns whether it existed.
    @discardableResult func delete(_ key: [UInt8]) throws -> Bool
    /// Removes every key in `start ..< end`; returns how many were removed.
    @discardableResult func deleteRange(from start: [UInt8], to end: [UInt8]) throws -> Int
}

extension StorageWriter {
    /// Stores `value` under `key`.
    public func put(_ key: [UInt8], _ value: [UInt8]) throws {
        try value.withUnsafeBytes { try put(key, $0) }
    }
}

@inline(__always) func lexicographicallyLess(_ a: UnsafeRawBufferPointer, _ b: [UInt8]) -> Bool {
    b.withUnsafeBytes { b in compareBytes(a, b) < 0 }
}

@inline(__always) func compareBytes(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int {
    let n = min(a.count, b.count)
    if n > 0 {
        let c = memcmp(a.baseAddress!, b.baseAddress!, n)
        if c != 0 { return Int(c) }
    }
    return a.count - b.count
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
