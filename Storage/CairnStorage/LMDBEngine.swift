import CLMDB
import Foundation

/// The default storage engine: one LMDB environment in a directory.
///
/// - Every write transaction is durable when ``write(_:)`` returns. The environment runs with
///   `MDB_NOMETASYNC`: LMDB's commit fsyncs the data pages and then writes the meta page, and
///   ``sync()`` fsyncs that. ``write(_:)`` does both; group commit calls ``writeUnsynced(_:)``
///   and runs ``sync()`` on another thread while the next transaction is built. Either way the
///   data pages are on disk before a meta page that points at them, so a power loss can lose
///   only unacknowledged transactions, never corrupt the file.
/// - The memory map grows instead of failing: when a transaction hits `MDB_MAP_FULL` it
///   is aborted, the map is doubled (up to `maxMapSize`) and the transaction runs again.
///   A map grown by another process is picked up (`MDB_MAP_RESIZED`).
/// - Several processes may open the same directory; LMDB's lock file serializes writers.
///
/// Thread safety (why `@unchecked Sendable` is sound): the environment handle is opened
/// with `MDB_NOTLS`, so read transactions are not tied to threads; every transaction runs
/// synchronously inside one call, never across an `await`; and `resizeLock` is held shared
/// by every transaction and exclusively by a map resize, which LMDB requires to happen
/// with no transaction active in the process.
public final class LMDBEngine: StorageEngine, @unchecked Sendable {
    /// The directory holding `data.mdb` and `lock.mdb`.
    public let directory: String
    /// The largest the map may grow to, in bytes.
    public let maxMapSize: Int
    public let maxKeySize: Int

    private var env: OpaquePointer?
    private var dbi: MDB_dbi = 0
    private let resizeLock: UnsafeMutablePointer<pthread_rwlock_t>
    private let closeLock = NSLock()

    /// Opens (creating if needed) the environment in `directory`.
    ///
    /// - Parameters:
    ///   - initialMapSize: the map size to start with, in bytes; it grows on demand.
    ///   - maxMapSize: the map never grows past this; writes beyond it throw ``StorageError/Code-swift.enum/full``.
    public init(directory: String, initialMapSize: Int = 64 << 20, maxMapSize: Int = 1 << 40) throws {
        self.directory = directory
        self.maxMapSize = maxMapSize
        resizeLock = .allocate(capacity: 1)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        #if os(Linux)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        #endif
        pthread_rwlock_init(resizeLock, &attr)
        pthread_rwlockattr_destroy(&attr)

        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw StorageError(.cannotOpen, "cannot create storage directory \(directory): \(error.localizedDescription)")
        }
        var e: OpaquePointer?
        try Self.check(mdb_env_create(&e), "creating an LMDB environment")
        env = e
        mdb_env_set_maxreaders(e, 512)
        mdb_env_set_mapsize(e, max(initialMapSize, 1 << 20))
        let rc = mdb_env_open(e, directory, UInt32(MDB_NOTLS | MDB_NOMETASYNC), 0o644)
        guard rc == 0 else {
            mdb_env_close(e)
            env = nil
            throw StorageError(.cannotOpen, "cannot open LMDB environment in \(directory): \(String(cString: mdb_strerror(rc))) (check that it is a writable directory)")
        }
        maxKeySize = Int(mdb_env_get_maxkeysize(e))
        var txn: OpaquePointer?
        try Self.check(mdb_txn_begin(e, nil, 0, &txn), "opening the main database")
        var d: MDB_dbi = 0
        let openRC = mdb_dbi_open(txn, nil, 0, &d)
        guard openRC == 0 else {
            mdb_txn_abort(txn)
            throw StorageError(.cannotOpen, "cannot open the main LMDB database: \(String(cString: mdb_strerror(openRC)))")
        }
        try Self.check(mdb_txn_commit(txn), "opening the main database")
        dbi = d
    }

    deinit {
        close()
        pthread_rwlock_destroy(resizeLock)
        resizeLock.deallocate()
    }

    public func close() {
        closeLock.lock()
        defer { closeLock.unlock() }
        pthread_rwlock_wrlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        if let e = env {
            mdb_env_close(e)
            env = nil
        }
    }

    /// The current map size in bytes.
    public var mapSize: Int {
        pthread_rwlock_rdlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        guard let env else { return 0 }
        var info = MDB_envinfo()
        mdb_env_info(env, &info)
        return info.me_mapsize
    }

    static func check(_ rc: Int32, _ what: String) throws {
        guard rc == 0 else { throw StorageError(.io, "LMDB failed \(what): \(String(cString: mdb_strerror(rc))) (code \(rc))") }
    }

    private struct MapFull: Error {}
    private struct MapResized: Error {}

    public func read<T>(_ body: (any StorageReader) throws -> T) throws -> T {
        while true {
            pthread_rwlock_rdlock(resizeLock)
            guard let env else {
                pthread_rwlock_unlock(resizeLock)
                throw StorageError(.closed, "the LMDB store in \(directory) was closed")
            }
            var txn: OpaquePointer?
            let rc = mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn)
            if rc == MDB_MAP_RESIZED {
                pthread_rwlock_unlock(resizeLock)
                try adoptResizedMap()
                continue
            }
            defer { pthread_rwlock_unlock(resizeLock) }
            try Self.check(rc, "beginning a read transaction")
            defer { mdb_txn_abort(txn) }
            return try body(Transaction(txn: txn!, dbi: dbi))
        }
    }

    public func write<T>(_ body: (any StorageWriter) throws -> T) throws -> T {
        let result = try writeUnsynced(body)
        try sync()
        return result
    }

    public func sync() throws {
        pthread_rwlock_rdlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        guard let env else { throw StorageError(.closed, "the LMDB store in \(directory) was closed") }
        try Self.check(mdb_env_sync(env, 1), "flushing to disk")
    }

    public func writeUnsynced<T>(_ body: (any StorageWriter) throws -> T) throws -> T {
        for _ in 0..<64 {
            pthread_rwlock_rdlock(resizeLock)
            guard let env else {
                pthread_rwlock_unlock(resizeLock)
                throw StorageError(.closed, "the LMDB store in \(directory) was closed")
            }
            var txn: OpaquePointer?
            let rc = mdb_txn_begin(env, nil, 0, &txn)
            if rc == MDB_MAP_RESIZED {
                pthread_rwlock_unlock(resizeLock)
                try adoptResizedMap()
                continue
            }
            guard rc == 0 else {
                pthread_rwlock_unlock(resizeLock)
                try Self.check(rc, "beginning a write transaction")
                continue
            }
            let result: T
            do {
                result = try body(Transaction(txn: txn!, dbi: dbi))
            } catch is MapFull {
                mdb_txn_abort(txn)
                pthread_rwlock_unlock(resizeLock)
                try growMap()
                continue
            } catch {
                mdb_txn_abort(txn)
                pthread_rwlock_unlock(resizeLock)
                throw error
            }
            // mdb_txn_commit frees the transaction whether or not it succeeds: never abort it afterwards.
            let commitRC = mdb_txn_commit(txn)
            pthread_rwlock_unlock(resizeLock)
            if commitRC == MDB_MAP_FULL {
                try growMap()
                continue
            }
            try Self.check(commitRC, "committing a write transaction")
            return result
        }
        throw StorageError(.full, "a write transaction in \(directory) did not fit after growing the map 64 times")
    }

    /// Doubles the map, up to `maxMapSize`. Takes the resize lock exclusively: no transaction of this process is active.
    private func growMap() throws {
        pthread_rwlock_wrlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        guard let env else { throw StorageError(.closed, "the LMDB store in \(directory) was closed") }
        var info = MDB_envinfo()
        mdb_env_info(env, &info)
        let current = info.me_mapsize
        guard current < maxMapSize else {
            throw StorageError(.full, "the database in \(directory) reached its maximum size of \(maxMapSize) bytes; raise maxMapSize or free space (truncate logs, drop old checkpoints)")
        }
        let next = min(current * 2, maxMapSize)
        try Self.check(mdb_env_set_mapsize(env, next), "growing the map to \(next) bytes")
    }

    /// Another process grew the map: adopt its size.
    private func adoptResizedMap() throws {
        pthread_rwlock_wrlock(resizeLock)
        defer { pthread_rwlock_unlock(resizeLock) }
        guard let env else { throw StorageError(.closed, "the LMDB store in \(directory) was closed") }
        try Self.check(mdb_env_set_mapsize(env, 0), "adopting a map grown by another process")
    }

    struct Transaction: StorageWriter {
        let txn: OpaquePointer
        let dbi: MDB_dbi

        func get(_ key: [UInt8]) throws -> [UInt8]? {
            try key.withUnsafeBytes { k in
                var kv = MDB_val(mv_size: k.count, mv_data: UnsafeMutableRawPointer(mutating: k.baseAddress))
                var dv = MDB_val()
                let rc = mdb_get(txn, dbi, &kv, &dv)
                if rc == MDB_NOTFOUND { return nil }
                try LMDBEngine.check(rc, "reading a key")
                return [UInt8](UnsafeRawBufferPointer(start: dv.mv_data, count: dv.mv_size))
            }
        }

        private func withCursor<T>(_ body: (OpaquePointer) throws -> T) throws -> T {
            var cursor: OpaquePointer?
            try LMDBEngine.check(mdb_cursor_open(txn, dbi, &cursor), "opening a cursor")
            defer { mdb_cursor_close(cursor) }
            return try body(cursor!)
        }

        func scan(from start: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
            try withCursor { cursor in
                var kv = MDB_val()
                var dv = MDB_val()
                var rc: Int32 = try start.withUnsafeBytes { s in
                    if s.isEmpty { return mdb_cursor_get(cursor, &kv, &dv, MDB_FIRST) }
                    kv = MDB_val(mv_size: s.count, mv_data: UnsafeMutableRawPointer(mutating: s.baseAddress))
                    let rc = mdb_cursor_get(cursor, &kv, &dv, MDB_SET_RANGE)
                    if rc != 0 && rc != MDB_NOTFOUND { try LMDBEngine.check(rc, "positioning a cursor") }
                    return rc
                }
                while rc == 0 {
                    let more = try body(UnsafeRawBufferPointer(start: kv.mv_data, count: kv.mv_size),
                                        UnsafeRawBufferPointer(start: dv.mv_data, count: dv.mv_size))
                    if !more { return }
                    rc = mdb_cursor_get(cursor, &kv, &dv, MDB_NEXT)
                }
                if rc != MDB_NOTFOUND { try LMDBEngine.check(rc, "scanning") }
            }
        }

        func scanBackward(before end: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
            try withCursor { cursor in
                var kv = MDB_val()
                var dv = MDB_val()
                var rc: Int32 = end.withUnsafeBytes { e in
                    kv = MDB_val(mv_size: e.count, mv_data: UnsafeMutableRawPointer(mutating: e.baseAddress))
                    return mdb_cursor_get(cursor, &kv, &dv, MDB_SET_RANGE)
                }
                if rc == 0 {
                    rc = mdb_cursor_get(cursor, &kv, &dv, MDB_PREV)
                } else if rc == MDB_NOTFOUND {
                    rc = mdb_cursor_get(cursor, &kv, &dv, MDB_LAST)
                }
                while rc == 0 {
                    let more = try body(UnsafeRawBufferPointer(start: kv.mv_data, count: kv.mv_size),
                                        UnsafeRawBufferPointer(start: dv.mv_data, count: dv.mv_size))
                    if !more { return }
                    rc = mdb_cursor_get(cursor, &kv, &dv, MDB_PREV)
                }
                if rc != MDB_NOTFOUND { try LMDBEngine.check(rc, "scanning backward") }
            }
        }

        func put(_ key: [UInt8], _ value: UnsafeRawBufferPointer) throws {
            let rc: Int32 = key.withUnsafeBytes { k in
                var kv = MDB_val(mv_size: k.count, mv_data: UnsafeMutableRawPointer(mutating: k.baseAddress))
                var dv = MDB_val(mv_size: value.count, mv_data: UnsafeMutableRawPointer(mutating: value.baseAddress))
                return mdb_put(txn, dbi, &kv, &dv, 0)
            }
            if rc == MDB_MAP_FULL { throw MapFull() }
            try LMDBEngine.check(rc, "writing a key")
        }

        @discardableResult func delete(_ key: [UInt8]) throws -> Bool {
            let rc: Int32 = key.withUnsafeBytes { k in
                var kv = MDB_val(mv_size: k.count, mv_data: UnsafeMutableRawPointer(mutating: k.baseAddress))
                return mdb_del(txn, dbi, &kv, nil)
            }
            if rc == MDB_NOTFOUND { return false }
            if rc == MDB_MAP_FULL { throw MapFull() }
            try LMDBEngine.check(rc, "deleting a key")
            return true
        }

        @discardableResult func deleteRange(from start: [UInt8], to end: [UInt8]) throws -> Int {
            try withCursor { cursor in
                var removed = 0
                while true {
                    var kv = MDB_val()
                    var dv = MDB_val()
                    let rc: Int32 = start.withUnsafeBytes { s in
                        kv = MDB_val(mv_size: s.count, mv_data: UnsafeMutableRawPointer(mutating: s.baseAddress))
                        return mdb_cursor_get(cursor, &kv, &dv, MDB_SET_RANGE)
                    }
                    if rc == MDB_NOTFOUND { return removed }
                    try LMDBEngine.check(rc, "positioning a cursor")
                    if !lexicographicallyLess(UnsafeRawBufferPointer(start: kv.mv_data, count: kv.mv_size), end) { return removed }
                    let del = mdb_cursor_del(cursor, 0)
                    if del == MDB_MAP_FULL { throw MapFull() }
                    try LMDBEngine.check(del, "deleting a range")
                    removed += 1
                }
            }
        }
    }
}
