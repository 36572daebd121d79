import CairnChaosKit
import CairnCore
import CairnStorage
import Foundation
import Testing

/// Durability proved with real processes: a child appends and checkpoints with fsync'd commits
/// and acknowledges each durable write on a pipe; the parent SIGKILLs it at a seeded moment,
/// reopens the store and checks that every acknowledged write is there and the newest
/// checkpoint verifies. The child restarts on the same directory, so kills accumulate.
@Suite("Crash: SIGKILL during fsync'd writes loses nothing acknowledged", .serialized)
struct CrashTests {
    struct Acknowledged {
        /// sequence → (writer, record number)
        var records: [UInt64: (Int, UInt64)] = [:]
        var newestCheckpoint: UInt64?
    }

    @Test("12 kills per sync mode; every acknowledged entry is present, in order, and the newest checkpoint verifies",
          arguments: ["each", "group"])
    func killAndVerify(mode: String) throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_CRASH_SEED")
        print("crash test (\(mode)) seed: \(seed) (replay the schedule with CAIRN_CRASH_SEED=\(seed))")
        var rng = SeededGenerator(seed: seed)
        let executable = executableDirectory() + "/cairn-chaos"
        try #require(FileManager.default.isExecutableFile(atPath: executable), "build cairn-chaos first: \(executable) is missing")
        let dir = try TemporaryDirectory()
        var acked = Acknowledged()

        for kill in 0..<12 {
            let child = try ChildProcess(executable: executable, arguments: [
                "storage-writer", "--directory", dir.path, "--mode", mode, "--writers", "4", "--map-size", "\(1 << 20)",
            ])
            let acksBeforeKill = Int.random(in: 1...150, using: &rng)
            let extraDelayMicroseconds = Int.random(in: 0...4_000, using: &rng)
            var seen = 0
            while seen < acksBeforeKill, let line = child.readLine() {
                record(line, into: &acked)
                seen += 1
            }
            sleepMicroseconds(extraDelayMicroseconds)
            child.kill()
            // Lines already written before the kill were acknowledged too.
            while let line = child.readLine() { record(line, into: &acked) }
            let status = child.wait()
            #expect(status == -9, "kill \(kill): the child should die of SIGKILL, exited with \(status)")
            try verify(dir.path, acked, context: "seed \(seed) mode \(mode) kill \(kill)")
        }
        #expect(acked.records.count > 12)
    }

    func record(_ line: String, into acked: inout Acknowledged) {
        let parts = line.split(separator: " ")
        if parts.first == "L", parts.count == 4, let seq = UInt64(parts[1]), let writer = Int(parts[2]), let n = UInt64(parts[3]) {
            acked.records[seq] = (writer, n)
        } else if parts.first == "C", parts.count == 2, let seq = UInt64(parts[1]) {
            acked.newestCheckpoint = max(acked.newestCheckpoint ?? 0, seq)
        } else {
            Issue.record("unexpected line from the child: \(line)")
        }
    }

    func verify(_ directory: String, _ acked: Acknowledged, context: String) throws {
        let store = try DurableStore.lmdb(directory: directory)
        defer { store.close() }
        let entries = try store.readLog(StorageWorkload.log)
        // In order, with no gaps.
        for (i, entry) in entries.enumerated() {
            #expect(entry.sequence == UInt64(i), "\(context): log has a gap or is out of order at index \(i)")
        }
        let bySequence = Dictionary(uniqueKeysWithValues: entries.map { ($0.sequence, $0.payload) })
        for (seq, (writer, n)) in acked.records {
            let payload = bySequence[seq]
            #expect(payload == StorageWorkload.record(writer: writer, n: n), "\(context): acknowledged entry \(seq) is missing or wrong")
        }
        if let newest = acked.newestCheckpoint {
            let read = try #require(try store.newestCheckpoint(StorageWorkload.checkpoint), "\(context): acknowledged checkpoint \(newest) is missing")
            #expect(read.rejected.isEmpty, "\(context): a stored checkpoint failed verification")
            #expect(read.sequence >= newest, "\(context): newest checkpoint \(read.sequence) is older than acknowledged \(newest)")
            #expect(read.payload == StorageWorkload.state(sequence: read.sequence), "\(context): checkpoint content is wrong")
        }
    }
}
