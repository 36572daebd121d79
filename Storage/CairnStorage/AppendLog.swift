import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Append-only logs in segment files, made durable by one write and one fdatasync per group
/// of appends: half the fsyncs of an LMDB commit, which needs two ordered ones (data pages,
/// then the meta page that points to them).
///
/// Layout: a directory of segment files `<index, 16 hex digits>.wal`, each zero-filled to its
/// full size before it is used, so that writing a record and fdatasyncing it changes no file
/// metadata (a preparer thread zero-fills the next one once the active one is half full). A
/// segment is a sequence of records, then zeros:
///
///     length32 · crc32c32(body) · body      body = kind8 · nameLength16 · name · sequence64 · payload
///
/// all little-endian; kind 1 is a log entry, kind 2 truncates `name` before `sequence`. A
/// zero length ends the records of a segment.
///
/// One committer thread takes everything queued, assigns each log's next sequence numbers,
/// writes the records with one `pwrite` per segment touched, fdatasyncs, and only then
/// completes the appenders: an append returns only once it is durable. Segments whose every
/// entry has been truncated are deleted, oldest first.
///
/// Opening scans every segment. The last write before a crash may be torn: its records fail
/// their checksum and are cut (and the bytes zeroed), since they were never acknowledged. A
/// record that fails its checksum with valid records after it is corruption: the entries it
/// hid are reported by ``readLog(_:from:upTo:limit:)`` as ``StorageError/Code-swift.enum/corruptRecord``.
///
/// Thread safety (why `@unchecked Sendable` is sound): the index, the segment table and the
/// queue are guarded by `condition`; the active segment's write position is touched only by
/// the committer thread.
public final class AppendLog: @unchecked Sendable {
    /// What opening found at the end of the newest segment.
    public struct Recovery: Sendable, Equatable {
        /// Bytes of a torn last write that were cut.
        public var tornBytes: Int
        /// Segments read.
        public var segments: Int
    }

    public static let defaultSegmentSize = 32 << 20

    public let directory: String
    public let segmentSize: Int
    /// What opening found.
    public let recovery: Recovery

    private struct Index {
        /// Sequence number of `locations[0]`.
        var base: UInt64 = 0
        /// Where each entry from `base` is: segment index << 32 | offset; -1 if it is missing (corrupt).
        var locations: [Int64] = []
        /// Entries before this are truncated.
        var first: UInt64 = 0
        var next: UInt64 = 0
        /// The first entry found missing when the segments were read back.
        var corruptAt: UInt64?
    }

    private final class Segment {
        let index: UInt64
        let fd: Int32
        let map: UnsafeMutableRawPointer
        /// Bytes mapped: the file's own size, which may differ from today's segment size.
        let size: Int
        /// The newest entry of each log in this segment (to know when the segment is dead).
        var newest: [String: UInt64] = [:]
        init(index: UInt64, fd: Int32, map: UnsafeMutableRawPointer, size: Int) {
            self.index = index
            self.fd = fd
            self.map = map
            self.size = size
        }
    }

    private enum Request {
        case append(String, [[UInt8]], @Sendable (Result<UInt64, StorageError>) -> Void)
        case truncate(String, UInt64, @Sendable (Result<UInt64, StorageError>) -> Void)
    }

    /// Guards the state below. The committer (and `close`) waits on ``committerWake``, the
    /// preparer on ``preparerWake``: an append wakes the committer alone.
    let condition = ConditionLock(conditions: 2)
    private static let committerWake = 0
    private static let preparerWake = 1
    private var logs: [String: Index] = [:]
    private var segments: [UInt64: Segment] = [:]
    private var queue: [Request] = []
    private var spare: Segment?
    private var wantSpare = false
    /// The index of a segment being created right now (by the preparer or the committer), so
    /// that the two never create the same one.
    private var preparing: UInt64?
    /// Dead segments waiting for the preparer thread to unmap and unlink them.
    private var toDelete: [Segment] = []
    private var failure: StorageError?
    private var stopping = false
    private var threadsRunning = 2
    // Committer thread only.
    private var active: Segment
    private var writeOffset: Int

    /// Opens (creating if needed) the logs in `directory`, cutting a torn last write.
    public init(directory: String, segmentSize: Int = AppendLog.defaultSegmentSize) throws {
        precondition(segmentSize >= 1 << 16 && segmentSize <= 1 << 31, "segment size must be 64 KiB to 2 GiB")
        self.directory = directory
        self.segmentSize = segmentSize
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw StorageError(.cannotOpen, "cannot create the log directory \(directory): \(error)")
        }
        var found: [UInt64] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
            if name.hasSuffix(".wal.tmp") {
                unlink(directory + "/" + name)  // a spare whose preparation was cut short
            } else if name.hasSuffix(".wal"), let i = UInt64(name.dropLast(4), radix: 16) {
                found.append(i)
            }
        }
        found.sort()
        var opened: [UInt64: Segment] = [:]
        var indexes: [String: Index] = [:]
        var torn = 0
        var lastOffset = 0
        for i in found {
            let segment = try Self.openSegment(directory: directory, index: i, size: segmentSize)
            opened[i] = segment
            let (end, cut) = Self.scan(segment, into: &indexes)
            torn += cut
            lastOffset = end
        }
        if found.isEmpty {
            let first = try Self.createSegment(directory: directory, index: 0, size: segmentSize)
            opened[0] = first
            found = [0]
            lastOffset = 0
        }
        segments = opened
        logs = indexes
        active = opened[found.last!]!
        writeOffset = lastOffset
        recovery = Recovery(tornBytes: torn, segments: found.count)
        // The next segment is prepared once the active one is half full.
        wantSpare = lastOffset > segmentSize / 2
        startThread(named: "cairn-logcommit") { [self] in runCommitter() }
        startThread(named: "cairn-log-prep") { [self] in runPreparer() }
    }

    /// Finishes queued appends, then closes every segment. Later calls fail with ``StorageError/Code-swift.enum/closed``.
    public func close() {
        condition.lock()
        stopping = true
        condition.broadcast(Self.committerWake)
        condition.broadcast(Self.preparerWake)
        while threadsRunning > 0 { condition.wait(Self.committerWake) }
        for s in toDelete {
            Self.closeSegment(s)
            unlink(Self.path(directory, s.index))
        }
        toDelete = []
        for s in segments.values { Self.closeSegment(s) }
        segments = [:]
        if let spare { Self.closeSegment(spare) }
        spare = nil
        condition.unlock()
    }

    // MARK: the API

    /// Appends `payloads` to `log`; `completion` gets the first one's sequence number once
    /// they are durable. Runs on the committer thread: it must not block.
    public func append(to log: String, _ payloads: [[UInt8]], completion: @escaping @Sendable (Result<UInt64, StorageError>) -> Void) {
        if let error = validate(log, payloads) {
            completion(.failure(error))
            return
        }
        enqueue(.append(log, payloads, completion))
    }

    /// Durably appends `payloads` to `log`; returns the sequence number of the first.
    @discardableResult
    public func append(to log: String, _ payloads: [[UInt8]]) throws -> UInt64 {
        try blockingWait { done in append(to: log, payloads, completion: done) }
    }

    /// Durably deletes the entries of `log` before `sequence`. Sequence numbers are not reused.
    public func truncateLog(_ log: String, before sequence: UInt64) throws {
        if let error = validate(log, []) { throw error }
        _ = try blockingWait { done in enqueue(.truncate(log, sequence, done)) }
    }

    /// The present extent of `log`.
    public func logBounds(_ log: String) -> LogBounds {
        condition.lock()
        defer { condition.unlock() }
        guard let i = logs[log] else { return LogBounds(first: 0, next: 0) }
        return LogBounds(first: min(i.first, i.next), next: i.next)
    }

    /// Makes the next sequence number of `log` at least `next`, treating every entry before it
    /// as consumed. A caller that keeps its position elsewhere (a durable actor's checkpoint)
    /// calls this after a restart: once every entry is truncated and its segments deleted,
    /// the log itself no longer knows where it stood.
    public func reserve(_ log: String, next: UInt64) {
        condition.lock()
        var i = logs[log] ?? Index()
        if next > i.next {
            i.locations = []
            i.base = next
            i.first = next
            i.next = next
            i.corruptAt = nil
        }
        logs[log] = i
        condition.unlock()
    }

    /// Entries of `log` with `from <= sequence < upTo`, in order, at most `limit`. Each is
    /// verified against its checksum; a missing or corrupt one throws
    /// ``StorageError/Code-swift.enum/corruptRecord`` with its ``StorageError/sequence``.
    public func readLog(_ log: String, from: UInt64 = 0, upTo: UInt64 = .max, limit: Int = .max) throws -> [LogEntry] {
        condition.lock()
        defer { condition.unlock() }
        if stopping { throw StorageError(.closed, "the log was closed") }
        guard let i = logs[log] else { return [] }
        var out: [LogEntry] = []
        var seq = max(from, i.first, i.base)
        // Entries being committed have numbers but no location yet: they are not readable.
        let end = min(upTo, i.base + UInt64(i.locations.count))
        out.reserveCapacity(Int(min(UInt64(limit), end > seq ? end - seq : 0)))
        let name = Array(log.utf8)
        var segment: Segment?
        while seq < end && out.count < limit {
            let packed = i.locations[Int(seq - i.base)]
            if packed >= 0 && segment?.index != UInt64(packed) >> 32 { segment = segments[UInt64(packed) >> 32] }
            guard packed >= 0, let segment else {
                throw StorageError(.corruptRecord, "entry \(seq) of log \"\(log)\" is missing: the record holding it failed its checksum", sequence: seq)
            }
            guard let payload = Self.entry(in: segment.map, at: Int(packed & 0xFFFF_FFFF), size: segment.size, name: name, sequence: seq) else {
                throw StorageError(.corruptRecord, "entry \(seq) of log \"\(log)\" fails its checksum", sequence: seq)
            }
            out.append(LogEntry(sequence: seq, payload: payload))
            seq += 1
        }
        return out
    }

    // MARK: committer

    private func enqueue(_ r: Request) {
        condition.lock()
        if stopping || failure != nil {
            let error = failure ?? StorageError(.closed, "the log was closed before this write was committed")
            condition.unlock()
            switch r {
            case .append(_, _, let done), .truncate(_, _, let done): done(.failure(error))
            }
            return
        }
        queue.append(r)
        if queue.count == 1 { condition.broadcast(Self.committerWake) }
        condition.unlock()
    }

    private func validate(_ log: String, _ payloads: [[UInt8]]) -> StorageError? {
        let n = log.utf8.count
        guard n > 0, n <= 256 else {
            return StorageError(.invalidName, "log names must be 1 to 256 bytes of UTF-8; got \(n)")
        }
        for p in payloads where Self.headerSize + n + p.count > segmentSize {
            return StorageError(.invalidKey, "a log entry of \(p.count) bytes does not fit in a \(segmentSize)-byte segment")
        }
        return nil
    }

    private struct Placed {
        var log: String
        var first: UInt64
        var count: Int
        var done: @Sendable (Result<UInt64, StorageError>) -> Void
        var truncate: UInt64?
    }

    private func runCommitter() {
        while true {
            condition.lock()
            while queue.isEmpty && !stopping { condition.wait(Self.committerWake) }
            if queue.isEmpty {
                threadsRunning -= 1
                condition.broadcast(Self.committerWake)
                condition.unlock()
                return
            }
            let taken = queue
            queue = []
            // Sequence numbers are assigned here, in queue order.
            var placed: [Placed] = []
            for r in taken {
                switch r {
                case .append(let log, let payloads, let done):
                    // In place: a copy of the index would copy its location array on every append.
                    Self.update(&logs, log) { i in
                        if i.locations.isEmpty { i.base = i.next }
                        placed.append(Placed(log: log, first: i.next, count: payloads.count, done: done))
                        i.next += UInt64(payloads.count)
                    }
                case .truncate(let log, let before, let done):
                    placed.append(Placed(log: log, first: before, count: 0, done: done, truncate: before))
                }
            }
            condition.unlock()

            var locations: [[Int64]] = []
            var error: StorageError?
            do {
                locations = try write(taken, placed)
            } catch let e as StorageError {
                error = e
            } catch {
                fatalError("unexpected error \(error)")
            }

            condition.lock()
            if writeOffset > segmentSize / 2 && spare == nil && preparing == nil && !wantSpare {
                wantSpare = true
                condition.signal(Self.preparerWake)
            }
            var dead: [Segment] = []
            if let error {
                failure = error
            } else {
                for (p, locs) in zip(placed, locations) {
                    Self.update(&logs, p.log) { i in
                        if let before = p.truncate {
                            guard before > i.first else { return }
                            i.first = min(before, i.next)
                            let drop = Int(min(UInt64(i.locations.count), i.first > i.base ? i.first - i.base : 0))
                            i.locations.removeFirst(drop)
                            i.base += UInt64(drop)
                        } else {
                            // Entries of one log are written in sequence order, so they land in order.
                            if i.locations.isEmpty { i.base = p.first }
                            i.locations.append(contentsOf: locs)
                        }
                    }
                    // The newest entry of this log in each segment: the last of each run.
                    var lastSegment: UInt64?
                    for (k, packed) in locs.enumerated().reversed() where UInt64(packed) >> 32 != lastSegment {
                        lastSegment = UInt64(packed) >> 32
                        if let s = segments[lastSegment!], (s.newest[p.log] ?? 0) < p.first + UInt64(k) { s.newest[p.log] = p.first + UInt64(k) }
                    }
                }
                dead = collectDeadSegmentsLocked()
            }
            if !dead.isEmpty {
                // Unlinking a large file takes milliseconds: the preparer does it, not the committer.
                toDelete.append(contentsOf: dead)
                condition.signal(Self.preparerWake)
            }
            condition.unlock()
            for p in placed {
                if let error { p.done(.failure(error)) } else { p.done(.success(p.first)) }
            }
        }
    }

    /// Writes the records of one group: one pwrite per segment touched, then fdatasync each.
    /// Returns, per request, the packed location of each entry.
    private func write(_ taken: [Request], _ placed: [Placed]) throws -> [[Int64]] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(64 << 10)
        var bufferStart = writeOffset
        var touched: [Segment] = []
        var out: [[Int64]] = []
        out.reserveCapacity(placed.count)

        func flush() throws {
            guard !buffer.isEmpty else { return }
            let n = buffer.withUnsafeBytes { pwrite(active.fd, $0.baseAddress, $0.count, off_t(bufferStart)) }
            guard n == buffer.count else {
                throw StorageError(.io, "writing \(buffer.count) bytes to log segment \(Self.path(directory, active.index)) failed: errno \(errno)")
            }
            if !touched.contains(where: { $0 === active }) { touched.append(active) }
            buffer.removeAll(keepingCapacity: true)
        }

        func add(kind: UInt8, log: String, sequence: UInt64, payload: [UInt8]) throws -> Int64 {
            let size = Self.headerSize + log.utf8.count + payload.count
            if writeOffset + size > segmentSize {
                try flush()
                active = try takeSpare()
                writeOffset = 0
                bufferStart = 0
            }
            let at = writeOffset
            Self.encode(kind: kind, log: log, sequence: sequence, payload: payload, into: &buffer)
            writeOffset += size
            return Int64(active.index << 32) | Int64(at)
        }

        for (r, p) in zip(taken, placed) {
            switch r {
            case .append(let log, let payloads, _):
                var locs: [Int64] = []
                locs.reserveCapacity(payloads.count)
                for (k, payload) in payloads.enumerated() {
                    locs.append(try add(kind: 1, log: log, sequence: p.first + UInt64(k), payload: payload))
                }
                out.append(locs)
            case .truncate(let log, let before, _):
                _ = try add(kind: 2, log: log, sequence: before, payload: [])
                out.append([])
            }
        }
        try flush()
        for s in touched where fdatasync(s.fd) != 0 {
            throw StorageError(.io, "fdatasync of log segment \(Self.path(directory, s.index)) failed: errno \(errno)")
        }
        return out
    }

    /// The prepared next segment, or one made now if the preparer has not started on it.
    private func takeSpare() throws -> Segment {
        let index = active.index + 1
        condition.lock()
        while spare == nil && preparing == index { condition.wait(Self.committerWake) }
        var next = spare?.index == index ? spare : nil
        spare = nil
        let makeHere = next == nil
        if makeHere { preparing = index }
        condition.unlock()
        if makeHere {
            do {
                next = try Self.createSegment(directory: directory, index: index, size: segmentSize)
            } catch {
                condition.lock()
                preparing = nil
                condition.signal(Self.preparerWake)
                condition.unlock()
                throw error
            }
        }
        condition.lock()
        if makeHere { preparing = nil }
        segments[index] = next!
        // The preparer may have been waiting for this segment to be made before making the next.
        condition.signal(Self.preparerWake)
        condition.unlock()
        return next!
    }

    private func runPreparer() {
        condition.lock()
        while true {
            while !(wantSpare && spare == nil && preparing == nil) && toDelete.isEmpty && !stopping { condition.wait(Self.preparerWake) }
            if !toDelete.isEmpty {
                let dead = toDelete
                toDelete = []
                condition.unlock()
                for s in dead {
                    Self.closeSegment(s)
                    unlink(Self.path(directory, s.index))
                }
                condition.lock()
                continue
            }
            if stopping { break }
            guard wantSpare && spare == nil && preparing == nil else { continue }
            wantSpare = false
            let index = (segments.keys.max() ?? 0) + 1
            preparing = index
            condition.unlock()
            let made = try? Self.createSegment(directory: directory, index: index, size: segmentSize)
            condition.lock()
            preparing = nil
            if let made {
                if stopping || segments[index] != nil {
                    Self.closeSegment(made)
                } else {
                    spare = made
                }
            }
            // The committer may be waiting in takeSpare for this segment.
            condition.broadcast(Self.committerWake)
        }
        threadsRunning -= 1
        condition.broadcast(Self.committerWake)
        condition.unlock()
    }

    /// The oldest segments, before the active one, all of whose entries are truncated. Only a
    /// prefix is taken: a segment's truncation records must outlive every older entry they cut.
    private func collectDeadSegmentsLocked() -> [Segment] {
        var dead: [Segment] = []
        for index in segments.keys.sorted() where index < active.index {
            let s = segments[index]!
            guard s.newest.allSatisfy({ log, newest in newest < (logs[log]?.first ?? 0) }) else { break }
            dead.append(s)
        }
        for s in dead { segments.removeValue(forKey: s.index) }
        return dead
    }

    // MARK: records and segments

    static let headerSize = 8 + 1 + 2 + 8

    static func path(_ directory: String, _ index: UInt64) -> String {
        let hex = String(index, radix: 16)
        return directory + "/" + String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".wal"
    }

    static func encode(kind: UInt8, log: String, sequence: UInt64, payload: [UInt8], into buffer: inout [UInt8]) {
        let name = Array(log.utf8)
        let bodyLength = 1 + 2 + name.count + 8 + payload.count
        let start = buffer.count
        buffer.append(contentsOf: repeatElement(0, count: 8 + bodyLength))
        buffer.withUnsafeMutableBytes { p in
            let r = UnsafeMutableRawBufferPointer(rebasing: p[start...])
            r.storeBytes(of: UInt32(bodyLength).littleEndian, toByteOffset: 0, as: UInt32.self)
            r[8] = kind
            r.storeBytes(of: UInt16(name.count).littleEndian, toByteOffset: 9, as: UInt16.self)
            name.withUnsafeBytes { r.baseAddress!.advanced(by: 11).copyMemory(from: $0.baseAddress!, byteCount: name.count) }
            r.storeBytes(of: sequence.littleEndian, toByteOffset: 11 + name.count, as: UInt64.self)
            if !payload.isEmpty {
                payload.withUnsafeBytes { r.baseAddress!.advanced(by: 19 + name.count).copyMemory(from: $0.baseAddress!, byteCount: payload.count) }
            }
            let crc = CRC32C.update(0, UnsafeRawBufferPointer(rebasing: r[8..<(8 + bodyLength)]))
            r.storeBytes(of: crc.littleEndian, toByteOffset: 4, as: UInt32.self)
        }
    }

    struct Record {
        var kind: UInt8
        var name: String
        var sequence: UInt64
        var payload: [UInt8]
        var size: Int
    }

    enum Parsed {
        case record(Record)
        /// A zero length: no more records in this segment.
        case end
        /// A record that does not verify; `length` is its declared length if plausible.
        case bad(length: Int?)
    }

    static func parse(_ base: UnsafeRawPointer, at offset: Int, size: Int) -> Parsed {
        guard offset + 8 <= size else { return .end }
        let length = Int(UInt32(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)))
        if length == 0 { return .end }
        guard length >= 11, offset + 8 + length <= size else { return .bad(length: nil) }
        let body = UnsafeRawBufferPointer(start: base + offset + 8, count: length)
        let crc = UInt32(littleEndian: base.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self))
        guard CRC32C.update(0, body) == crc else { return .bad(length: length) }
        let nameLength = Int(UInt16(littleEndian: body.loadUnaligned(fromByteOffset: 1, as: UInt16.self)))
        guard 11 + nameLength <= length else { return .bad(length: length) }
        let name = String(decoding: body[3..<(3 + nameLength)], as: UTF8.self)
        let sequence = UInt64(littleEndian: body.loadUnaligned(fromByteOffset: 3 + nameLength, as: UInt64.self))
        let payload = [UInt8](body[(11 + nameLength)...])
        return .record(Record(kind: body[0], name: name, sequence: sequence, payload: payload, size: 8 + length))
    }

    /// The payload of the entry at `offset` if it verifies and is entry `sequence` of the log
    /// named `name`: the read path, with no string or record built.
    static func entry(in map: UnsafeMutableRawPointer, at offset: Int, size: Int, name: [UInt8], sequence: UInt64) -> [UInt8]? {
        let base = UnsafeRawPointer(map)
        guard offset + 8 <= size else { return nil }
        let length = Int(UInt32(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)))
        guard length >= 11 + name.count, offset + 8 + length <= size else { return nil }
        let body = UnsafeRawBufferPointer(start: base + offset + 8, count: length)
        guard CRC32C.update(0, body) == UInt32(littleEndian: base.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self)),
              body[0] == 1,
              Int(UInt16(littleEndian: body.loadUnaligned(fromByteOffset: 1, as: UInt16.self))) == name.count,
              name.withUnsafeBytes({ memcmp($0.baseAddress!, body.baseAddress! + 3, name.count) == 0 }),
              UInt64(littleEndian: body.loadUnaligned(fromByteOffset: 3 + name.count, as: UInt64.self)) == sequence else { return nil }
        return [UInt8](body[(11 + name.count)...])
    }

    /// Reads a segment's records into the index. Returns the offset after the last good record
    /// and how many bytes of a torn last write were cut (and zeroed).
    private static func scan(_ segment: Segment, into logs: inout [String: Index]) -> (end: Int, cut: Int) {
        let base = UnsafeRawPointer(segment.map)
        let size = segment.size
        var offset = 0
        var goodEnd = 0
        while true {
            switch parse(base, at: offset, size: size) {
            case .end:
                return (goodEnd, 0)
            case .record(let r):
                apply(r, segment: segment, offset: offset, into: &logs)
                offset += r.size
                goodEnd = offset
            case .bad(let length):
                // Corruption with good records after it is skipped and reported per entry;
                // anything else at the end of the newest segment is a torn write.
                if let length, case .record = parse(base, at: offset + 8 + length, size: size) {
                    offset += 8 + length
                    continue
                }
                // What the torn write left: count it up to the first all-zero 4 KiB block, then
                // zero the whole rest of the segment, so that no complete but never acknowledged
                // record beyond a lost page can surface after later writes.
                var end = offset
                while end < size {
                    let block = min(4096, size - end)
                    if UnsafeRawBufferPointer(start: base + end, count: block).allSatisfy({ $0 == 0 }) { break }
                    end += block
                }
                let zeros = [UInt8](repeating: 0, count: 1 << 20)
                var at = offset
                while at < size {
                    let n = zeros.withUnsafeBytes { pwrite(segment.fd, $0.baseAddress, min($0.count, size - at), off_t(at)) }
                    if n <= 0 { break }
                    at += n
                }
                _ = fdatasync(segment.fd)
                return (offset, end - offset)
            }
        }
    }

    /// Adds one record read back from a segment to the index. A log's entries appear in
    /// increasing sequence order; a number skipped marks entries lost to corruption.
    private static func apply(_ r: Record, segment: Segment, offset: Int, into logs: inout [String: Index]) {
        update(&logs, r.name) { i in
        switch r.kind {
        case 1:
            let s = r.sequence
            if s < i.first {
                break  // truncated
            } else if i.locations.isEmpty {
                // The first entry still present (older segments may have been deleted).
                i.base = s
                i.first = s
            } else {
                let expected = i.base + UInt64(i.locations.count)
                if s < expected { break }  // a duplicate
                if s > expected {
                    i.corruptAt = i.corruptAt ?? expected
                    i.locations.append(contentsOf: repeatElement(-1, count: Int(s - expected)))
                }
            }
            i.locations.append(Int64(segment.index << 32) | Int64(offset))
            i.next = max(i.next, s + 1)
            segment.newest[r.name] = s
        case 2:
            let x = r.sequence
            if x > i.first {
                i.first = x
                let drop = Int(min(UInt64(i.locations.count), x > i.base ? x - i.base : 0))
                i.locations.removeFirst(drop)
                i.base += UInt64(drop)
                if i.locations.isEmpty { i.base = x }
                if let c = i.corruptAt, c < x { i.corruptAt = nil }
                i.next = max(i.next, x)
            }
        default:
            break
        }
        }
    }

    /// Changes a log's index in place (a copy would duplicate its location array).
    private static func update(_ logs: inout [String: Index], _ name: String, _ body: (inout Index) -> Void) {
        body(&logs[name, default: Index()])
    }

    private static func openSegment(directory: String, index: UInt64, size: Int) throws -> Segment {
        let p = path(directory, index)
        let fd = open(p, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw StorageError(.cannotOpen, "cannot open log segment \(p): errno \(errno)") }
        var st = stat()
        fstat(fd, &st)
        // A segment keeps its own size: one written with a larger segment size is read whole.
        var mapped = Int(st.st_size)
        if mapped < size {
            // Cut short (or made with a smaller size): extend with zeros.
            _ = ftruncate(fd, off_t(size))
            mapped = size
        }
        guard let map = mmap(nil, mapped, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else {
            Glibc.close(fd)
            throw StorageError(.cannotOpen, "cannot map log segment \(p): errno \(errno)")
        }
        return Segment(index: index, fd: fd, map: map, size: mapped)
    }

    /// Creates a zero-filled segment under a temporary name, syncs it, then renames it into place.
    private static func createSegment(directory: String, index: UInt64, size: Int) throws -> Segment {
        let final = path(directory, index)
        let temporary = final + ".tmp"
        let fd = open(temporary, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StorageError(.cannotOpen, "cannot create log segment \(temporary): errno \(errno)") }
        // In steps, each made durable before the next, so that the log's own fdatasyncs never
        // queue behind more than one step of zeros.
        let step = 256 << 10
        let zeros = [UInt8](repeating: 0, count: step)
        var written = 0
        while written < size {
            let n = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, min($0.count, size - written), off_t(written)) }
            guard n > 0, fdatasync(fd) == 0 else {
                Glibc.close(fd)
                unlink(temporary)
                throw StorageError(.io, "cannot zero-fill log segment \(temporary): errno \(errno)")
            }
            written += n
        }
        guard fsync(fd) == 0, rename(temporary, final) == 0 else {
            Glibc.close(fd)
            unlink(temporary)
            throw StorageError(.io, "cannot make log segment \(final) durable: errno \(errno)")
        }
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            _ = fsync(dir)
            Glibc.close(dir)
        }
        Glibc.close(fd)
        return try openSegment(directory: directory, index: index, size: size)
    }

    private static func closeSegment(_ s: Segment) {
        munmap(s.map, s.size)
        Glibc.close(s.fd)
    }
}


extension AppendLog {
    /// The segment file and offset of entry `sequence` of `log` (for tests that damage segments).
    func locationForTest(_ log: String, _ sequence: UInt64) -> (path: String, offset: Int)? {
        condition.lock()
        defer { condition.unlock() }
        guard let i = logs[log], sequence >= i.base, sequence < i.base + UInt64(i.locations.count) else { return nil }
        let packed = i.locations[Int(sequence - i.base)]
        return (Self.path(directory, UInt64(packed) >> 32), Int(packed & 0xFFFF_FFFF))
    }

    /// One record's bytes, as the committer writes them (for tests that damage segments).
    static func encodedForTest(kind: UInt8, log: String, sequence: UInt64, payload: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        encode(kind: kind, log: log, sequence: sequence, payload: payload, into: &out)
        return out
    }
}
