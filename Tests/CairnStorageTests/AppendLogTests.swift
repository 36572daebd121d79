import CairnChaosKit
import CairnCore
@testable import CairnStorage
import Foundation
import Testing

@Suite("Append log: segment files, one fdatasync per group")
struct AppendLogTests {
    func payload(_ i: Int, size: Int = 24) -> [UInt8] {
        var rng = SeededGenerator(seed: UInt64(i) + 1)
        return (0..<size).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    }

    /// Bytes one entry takes in a segment.
    func recordSize(_ log: String, _ payloadSize: Int) -> Int { AppendLog.headerSize + log.utf8.count + payloadSize }

    @Test("append, read from a position, bounds and truncate; everything is there after reopening")
    func basics() throws {
        let dir = try TemporaryDirectory()
        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
            defer { log.close() }
            #expect(try log.append(to: "a", (0..<10).map { payload($0) }) == 0)
            #expect(try log.append(to: "b", [payload(100)]) == 0)
            #expect(try log.append(to: "a", [payload(10)]) == 10)
            #expect(log.logBounds("a") == LogBounds(first: 0, next: 11))
            #expect(try log.readLog("a", from: 4, limit: 3).map(\.sequence) == [4, 5, 6])
            #expect(try log.readLog("a", from: 9).map(\.payload) == [payload(9), payload(10)])
            try log.truncateLog("a", before: 5)
            #expect(log.logBounds("a") == LogBounds(first: 5, next: 11))
            #expect(try log.readLog("a").first?.sequence == 5)
        }
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        #expect(log.recovery.tornBytes == 0)
        #expect(log.logBounds("a") == LogBounds(first: 5, next: 11))
        #expect(try log.readLog("a").map(\.payload) == (5...10).map { payload($0) })
        #expect(try log.readLog("b").map(\.payload) == [payload(100)])
        #expect(try log.append(to: "a", [payload(11)]) == 11, "sequence numbers continue after a reopen")
    }

    @Test("concurrent appenders get distinct, gap-free sequence numbers, each batch contiguous")
    func concurrent() throws {
        let dir = try TemporaryDirectory()
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        let firsts = ConcurrentResults()
        DispatchQueue.concurrentPerform(iterations: 8) { writer in
            for n in 0..<100 {
                let first = try! log.append(to: "shared", [payload(writer * 1000 + n), payload(writer * 1000 + n + 500)])
                firsts.add(first, writer * 1000 + n)
            }
        }
        let entries = try log.readLog("shared")
        #expect(entries.map(\.sequence) == Array(0..<1600))
        for (first, n) in firsts.all {
            #expect(entries[Int(first)].payload == payload(n))
            #expect(entries[Int(first) + 1].payload == payload(n + 500), "a batch's entries are contiguous")
        }
    }

    @Test("segments roll over, and segments whose entries are all truncated are deleted")
    func rolloverAndDeletion() throws {
        let dir = try TemporaryDirectory()
        let segmentFiles = { (try FileManager.default.contentsOfDirectory(atPath: dir.path)).filter { $0.hasSuffix(".wal") }.count }
        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
            defer { log.close() }
            for batch in 0..<40 {
                try log.append(to: "big", (0..<10).map { payload(batch * 10 + $0, size: 500) })
            }
            #expect(try segmentFiles() >= 4, "400 entries of ~530 bytes fill four 64 KiB segments")
            try log.truncateLog("big", before: 380)
            // One more commit lets the committer collect the dead segments (the preparer thread
            // deletes them; closing waits for that).
            try log.append(to: "big", [payload(400, size: 500)])
            #expect(try log.readLog("big").map(\.sequence) == Array(380...400))
        }
        #expect(try segmentFiles() <= 3, "the segments holding only truncated entries are deleted")
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        #expect(log.logBounds("big") == LogBounds(first: 380, next: 401))
        #expect(try log.readLog("big").map(\.payload) == (380...400).map { payload($0, size: 500) })
    }

    @Test("a torn last write is cut and zeroed on open; the entries before it and later appends survive")
    func tornTail() throws {
        let dir = try TemporaryDirectory()
        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
            try log.append(to: "t", (0..<5).map { payload($0) })
            log.close()
        }
        // A record cut short after its header: what a crash inside the write leaves.
        let end = 5 * recordSize("t", 24)
        let file = AppendLog.path(dir.path, 0)
        let handle = try #require(FileHandle(forUpdatingAtPath: file))
        var torn = AppendLog.encodedForTest(kind: 1, log: "t", sequence: 5, payload: payload(5))
        torn.removeLast(10)
        try handle.seek(toOffset: UInt64(end))
        try handle.write(contentsOf: torn)
        try handle.close()

        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
            #expect(log.recovery.tornBytes > 0)
            #expect(log.logBounds("t") == LogBounds(first: 0, next: 5))
            #expect(try log.append(to: "t", [payload(50)]) == 5)
            log.close()
        }
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        #expect(log.recovery.tornBytes == 0, "the torn bytes were zeroed, so nothing is cut twice")
        #expect(try log.readLog("t").map(\.payload) == (0..<5).map { payload($0) } + [payload(50)])
    }

    @Test("a corrupt record with good ones after it is reported by sequence number; the entries before it read")
    func corruptionInTheMiddle() throws {
        let dir = try TemporaryDirectory()
        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
            try log.append(to: "c", (0..<6).map { payload($0) })
            log.close()
        }
        // Flip a payload byte of entry 2.
        let file = AppendLog.path(dir.path, 0)
        var bytes = try #require(FileManager.default.contents(atPath: file))
        bytes[2 * recordSize("c", 24) + recordSize("c", 24) - 3] ^= 0x10
        try bytes.write(to: URL(fileURLWithPath: file))

        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        #expect(log.recovery.tornBytes == 0, "good records follow it: this is corruption, not a torn write")
        do {
            _ = try log.readLog("c")
            Issue.record("reading across the corrupt entry must fail")
        } catch let e as StorageError {
            #expect(e.code == .corruptRecord && e.sequence == 2)
        }
        #expect(try log.readLog("c", upTo: 2).map(\.payload) == [payload(0), payload(1)])
        #expect(try log.readLog("c", from: 3).map(\.sequence) == [3, 4, 5])
    }

    @Test("reserve: a log whose entries and segments are all gone continues from the number its owner kept")
    func reserve() throws {
        let dir = try TemporaryDirectory()
        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
            for batch in 0..<30 { try log.append(to: "r", (0..<10).map { payload(batch * 10 + $0, size: 500) }) }
            try log.truncateLog("r", before: 300)
            try log.append(to: "other", [payload(1)])
            log.close()
        }
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        log.reserve("r", next: 300)
        #expect(log.logBounds("r").next == 300)
        #expect(try log.append(to: "r", [payload(300)]) == 300)
        #expect(try log.readLog("r").map(\.sequence) == [300])
    }

    @Test("reopening with a smaller segment size still reads every entry of the larger segments")
    func segmentSizeChange() throws {
        let dir = try TemporaryDirectory()
        do {
            let log = try AppendLog(directory: dir.path, segmentSize: 1 << 20)
            try log.append(to: "s", (0..<400).map { payload($0, size: 500) })
            log.close()
        }
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        defer { log.close() }
        #expect(try log.readLog("s").map(\.payload) == (0..<400).map { payload($0, size: 500) })
        #expect(try log.append(to: "s", [payload(400, size: 500)]) == 400)
    }

    @Test("bad input and a closed log get typed errors")
    func badInput() throws {
        let dir = try TemporaryDirectory()
        let log = try AppendLog(directory: dir.path, segmentSize: 1 << 16)
        #expect(throws: StorageError.self) { try log.append(to: "", [[1]]) }
        #expect(throws: StorageError.self) { try log.append(to: "x", [[UInt8](repeating: 0, count: 1 << 16)]) }
        log.close()
        do {
            try log.append(to: "x", [[1]])
            Issue.record("a closed log must refuse appends")
        } catch let e as StorageError {
            #expect(e.code == .closed)
        }
    }
}

final class ConcurrentResults: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [(UInt64, Int)] = []
    func add(_ first: UInt64, _ n: Int) {
        lock.lock()
        results.append((first, n))
        lock.unlock()
    }
    var all: [(UInt64, Int)] {
        lock.lock()
        defer { lock.unlock() }
        return results
    }
}
