import Foundation

/// An in-memory storage engine, for tests and for memory-only actors.
///
/// Same contract as ``LMDBEngine`` except durability: everything is lost with the process.
/// Keys are kept sorted; a write transaction applies in place and is undone if its body throws.
///
/// Thread safety (why `@unchecked Sendable` is sound): every access to `keys` and `values`
/// happens with `lock` held, for the whole of a read or write transaction.
public final class MemoryEngine: StorageEngine, @unchecked Sendable {
    private let lock = NSLock()
    private var keys: [[UInt8]] = []
    private var values: [[UInt8]] = []
    private var closed = false
    public let maxKeySize: Int

    /// Creates an empty engine. `maxKeySize` defaults to LMDB's limit so that tests catch the same bad keys.
    public init(maxKeySize: Int = 511) {
        self.maxKeySize = maxKeySize
    }

    public func close() {
        lock.lock()
        closed = true
        keys = []
        values = []
        lock.unlock()
    }

    public func read<T>(_ body: (any StorageReader) throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        guard !closed else { throw StorageError(.closed, "the in-memory store was closed") }
        return try body(Transaction(engine: self))
    }

    public func write<T>(_ body: (any StorageWriter) throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        guard !closed else { throw StorageError(.closed, "the in-memory store was closed") }
        let txn = Transaction(engine: self)
        do {
            return try body(txn)
        } catch {
            for entry in txn.undo.entries.reversed() {
                let (found, index) = search(entry.key)
                switch (entry.previous, found) {
                case (nil, true):
                    keys.remove(at: index)
                    values.remove(at: index)
                case (let old?, true):
                    values[index] = old
                case (let old?, false):
                    keys.insert(entry.key, at: index)
                    values.insert(old, at: index)
                case (nil, false):
                    break
                }
            }
            throw error
        }
    }

    public func writeUnsynced<T>(_ body: (any StorageWriter) throws -> T) throws -> T { try write(body) }

    /// Every key and value, in key order, as of now: O(1), the arrays being copied on write.
    func snapshot() -> (keys: [[UInt8]], values: [[UInt8]]) {
        lock.lock()
        defer { lock.unlock() }
        return (keys, values)
    }

    /// Nothing to flush: memory has no durability to give.
    public func sync() throws {}

    /// Binary search: (found, index of the key or of where it would be inserted).
    fileprivate func search(_ key: [UInt8]) -> (Bool, Int) {
        key.withUnsafeBytes { k in search(k) }
    }

    fileprivate func search(_ key: UnsafeRawBufferPointer) -> (Bool, Int) {
        var lo = 0
        var hi = keys.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let c = keys[mid].withUnsafeBytes { compareBytes($0, key) }
            if c == 0 { return (true, mid) }
            if c < 0 { lo = mid + 1 } else { hi = mid }
        }
        return (false, lo)
    }

    final class UndoLog {
        var entries: [(key: [UInt8], previous: [UInt8]?)] = []
    }

    struct Transaction: StorageWriter {
        let engine: MemoryEngine
        let undo = UndoLog()

        func get(_ key: [UInt8]) throws -> [UInt8]? {
            let (found, i) = engine.search(key)
            return found ? engine.values[i] : nil
        }

        func scan(from start: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
            var i = engine.search(start).1
            while i < engine.keys.count {
                let more = try engine.keys[i].withUnsafeBytes { k in
                    try engine.values[i].withUnsafeBytes { v in try body(k, v) }
                }
                if !more { return }
                i += 1
            }
        }

        func scanBackward(before end: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
            var i = engine.search(end).1 - 1
            while i >= 0 {
                let more = try engine.keys[i].withUnsafeBytes { k in
                    try engine.values[i].withUnsafeBytes { v in try body(k, v) }
                }
                if !more { return }
                i -= 1
            }
        }

        func put(_ key: [UInt8], _ value: UnsafeRawBufferPointer) throws {
            let (found, i) = engine.search(key)
            if found {
                undo.entries.append((key, engine.values[i]))
                engine.values[i] = [UInt8](value)
            } else {
                undo.entries.append((key, nil))
                engine.keys.insert(key, at: i)
                engine.values.insert([UInt8](value), at: i)
            }
        }

        @discardableResult func delete(_ key: [UInt8]) throws -> Bool {
            let (found, i) = engine.search(key)
            guard found else { return false }
            undo.entries.append((key, engine.values[i]))
            engine.keys.remove(at: i)
            engine.values.remove(at: i)
            return true
        }

        @discardableResult func deleteRange(from start: [UInt8], to end: [UInt8]) throws -> Int {
            let lo = engine.search(start).1
            let hi = max(lo, engine.search(end).1)
            for i in lo..<hi { undo.entries.append((engine.keys[i], engine.values[i])) }
            engine.keys.removeSubrange(lo..<hi)
            engine.values.removeSubrange(lo..<hi)
            return hi - lo
        }
    }
}
