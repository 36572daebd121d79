import CairnCodec
import CairnCore
import CairnStorage
import Foundation

/// `cairn-bench storage`: checkpoint write and read throughput, grouped and synced log appends.
struct StorageBenchmark {
    let directory: String

    /// The checkpointed state: a large semi-compressible blob and some bookkeeping fields.
    struct State: Codable {
        var applied: UInt64
        var owner: String
        var blob: [UInt8]
    }

    /// Semi-compressible state, shaped like encoded records: every 64-byte block is 32 bytes
    /// copied from one of 1,024 seeded 32-byte templates (the repeated structure: field names,
    /// tags, common values) followed by 32 random bytes (the data). zstd level 1 halves it.
    static func semiCompressible(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SeededGenerator(seed: seed)
        let templates = rng.bytes(1024 * 32)
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBufferPointer { o in
            templates.withUnsafeBufferPointer { t in
                var i = 0
                while i < count {
                    let which = Int(rng.next() % 1024) * 32
                    for k in 0..<min(32, count - i) { o[i + k] = t[which + k] }
                    i += 32
                    var k = 0
                    while k < 32 && i + k < count {
                        var w = rng.next()
                        for _ in 0..<8 where i + k < count {
                            o[i + k] = UInt8(truncatingIfNeeded: w)
                            w >>= 8
                            k += 1
                        }
                    }
                    i += 32
                }
            }
        }
        return out
    }

    func run(_ report: Report) throws {
        FileHandle.standardError.write(Data("storage benchmark directory: \(directory)\n".utf8))
        try checkpoints(report)
        try checkpointWithWorkers(report)
        try groupedAppends(report)
        try syncedAppends(report)
    }

    /// The part size durable actors write checkpoints in.
    static let partSize = 256 << 10

    func checkpoints(_ report: Report) throws {
        let store = try DurableStore.lmdb(directory: directory + "/checkpoints", options: StoreOptions(syncMode: .eachCommit), initialMapSize: 512 << 20)
        defer { store.close() }
        let size = 64 << 20
        let state = State(applied: 1, owner: "bench", blob: Self.semiCompressible(size, seed: 42))
        var writeRates: [Double] = []
        var singleRates: [Double] = []
        var readRates: [Double] = []
        var stored = 0
        for round in 0..<5 {
            // As a durable actor's checkpoint is written: encoded, then compressed into 256 KiB
            // parts, each an fsync'd commit, committed while the next ones are compressed.
            let t0 = now()
            stored = try BinaryEncoder().withEncoded(state) {
                try store.writeCheckpoint("bench-actor", sequence: UInt64(2 * round), payload: $0, partSize: Self.partSize)
            }
            let t1 = now()
            guard let back = try store.newestCheckpoint(State.self, "bench-actor") else { fatalError("checkpoint vanished") }
            let t2 = now()
            precondition(back.state.blob.count == size && back.read.sequence == UInt64(2 * round), "checkpoint read back wrong")
            // The same in one commit.
            let t3 = now()
            try store.writeCheckpoint("bench-actor", sequence: UInt64(2 * round + 1), state: state)
            let t4 = now()
            writeRates.append(Double(size) / 1_048_576 / (t1 - t0))
            readRates.append(Double(size) / 1_048_576 / (t2 - t1))
            singleRates.append(Double(size) / 1_048_576 / (t4 - t3))
        }
        report.add("storage.checkpoint_write_mb_per_s", median(writeRates), "MB/s", goal: ">= 150")
        report.add("storage.checkpoint_write_single_commit_mb_per_s", median(singleRates), "MB/s")
        // Where a checkpoint write's time goes: encode, compress + checksum, durable commit.
        var encodeMs: [Double] = []
        var formatMs: [Double] = []
        var commitMs: [Double] = []
        for round in 0..<3 {
            // As `writeCheckpoint(_:sequence:state:)` does: encode into the encoder's buffer, then
            // compress and store from there.
            let t0 = now()
            let (t1, t2, t3) = try BinaryEncoder().withEncoded(state) { raw in
                let t1 = now()
                _ = try CheckpointFormat.encode(payload: raw, sequence: 0)
                let t2 = now()
                try store.writeCheckpoint("breakdown", sequence: UInt64(round), payload: raw)
                return (t1, t2, now())
            }
            encodeMs.append((t1 - t0) * 1000)
            formatMs.append((t2 - t1) * 1000)
            commitMs.append(((t3 - t2) - (t2 - t1)) * 1000)
        }
        report.add("storage.checkpoint_encode_ms", median(encodeMs), "ms")
        report.add("storage.checkpoint_compress_checksum_ms", median(formatMs), "ms")
        report.add("storage.checkpoint_commit_ms", median(commitMs), "ms")
        report.add("storage.checkpoint_read_mb_per_s", median(readRates), "MB/s")
        report.add("storage.checkpoint_compression_ratio", Double(size) / Double(stored), "x")
    }

    /// The same 64 MiB checkpoint with zstd compressing on two threads of its own
    /// (`StoreOptions.compressionWorkers = 2`).
    func checkpointWithWorkers(_ report: Report) throws {
        let store = try DurableStore.lmdb(directory: directory + "/checkpoints-workers",
                                          options: StoreOptions(syncMode: .eachCommit, compressionWorkers: 2), initialMapSize: 512 << 20)
        defer { store.close() }
        let size = 64 << 20
        let state = State(applied: 1, owner: "bench", blob: Self.semiCompressible(size, seed: 42))
        var rates: [Double] = []
        for round in 0..<5 {
            let t0 = now()
            try store.writeCheckpoint("bench-actor", sequence: UInt64(round), state: state)
            rates.append(Double(size) / 1_048_576 / (now() - t0))
        }
        report.add("storage.checkpoint_write_2_workers_mb_per_s", median(rates), "MB/s")
    }

    /// 1 KiB appends from 8 writers with 4,096 outstanding each, group commit, every transaction
    /// fsync'd. Measured twice: into a fresh file, where every fdatasync also commits the file
    /// system's allocation of the new blocks, and again after the logs were truncated, as a log
    /// is after each checkpoint, so that LMDB reuses the freed pages.
    func groupedAppends(_ report: Report) throws {
        let store = try DurableStore.lmdb(directory: directory + "/grouped", options: StoreOptions(syncMode: .group), initialMapSize: 1 << 30)
        defer { store.close() }
        let writers = 8
        let window = 4096
        let perWriter = 50_000
        let record = [UInt8](repeating: 0x5A, count: 1024)
        func pass() -> Double {
            let t0 = now()
            DispatchQueue.concurrentPerform(iterations: writers) { w in
                let outstanding = DispatchSemaphore(value: window)
                let done = DispatchGroup()
                let log = "writer-\(w % 2)"
                for _ in 0..<perWriter {
                    outstanding.wait()
                    done.enter()
                    var batch = WriteBatch()
                    batch.append(to: log, [record])
                    store.commit(batch) { result in
                        if case .failure(let e) = result { fatalError("append failed: \(e)") }
                        outstanding.signal()
                        done.leave()
                    }
                }
                done.wait()
            }
            return Double(writers * perWriter) / (now() - t0)
        }
        report.add("storage.log_append_grouped_per_s", pass(), "records/s", goal: ">= 200000")
        // Each log now holds writers / 2 * perWriter entries; truncate them all.
        for w in 0..<2 { try store.truncateLog("writer-\(w)", before: UInt64(writers / 2 * perWriter)) }
        report.add("storage.log_append_grouped_reused_pages_per_s", pass(), "records/s", goal: ">= 200000")
    }

    func syncedAppends(_ report: Report) throws {
        let store = try DurableStore.lmdb(directory: directory + "/synced", options: StoreOptions(syncMode: .eachCommit))
        defer { store.close() }
        let record = [UInt8](repeating: 0x33, count: 1024)
        var samples: [Double] = []
        for i in 0..<3_000 {
            let t0 = now()
            try store.append(to: "synced", [record])
            if i >= 100 { samples.append((now() - t0) * 1e6) }
        }
        report.add("storage.log_append_synced_p50_us", median(samples), "us")
        report.add("storage.log_append_synced_p99_us", percentile(samples, 0.99), "us")
    }
}
