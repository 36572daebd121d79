import ArgumentParser
import Cairn
import CairnChaosKit
import CairnCore
import CairnStorage
import Foundation

@main
enum Main {
    static func main() async {
        // A cluster of processes started from this binary (the tests use it) runs its nodes here.
        Cluster.runNodeIfLaunched(prepare: ClusterWorkload.register)
        await CairnChaos.main()
    }
}

struct CairnChaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn-chaos",
        abstract: "Cairn's fault-injection harness.",
        subcommands: [ActorCrash.self, ActorHost.self, ClusterChaos.self, GCSSim.self, HeadChaos.self, StorageWriter.self])
}

/// The child of the storage crash test: appends and checkpoints until it is killed,
/// printing one line per acknowledged (fsync'd) write.
///
/// Lines: `L <seq> <writer> <n>` for a log record, `C <seq>` for a checkpoint.
struct StorageWriter: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "storage-writer",
        abstract: "Append and checkpoint in a loop, acknowledging each durable write on stdout (the parent kills it).")

    @Option(help: "Storage directory (LMDB).") var directory: String
    @Option(help: "Sync mode: each (fsync per commit) or group (group commit).") var mode: String = "each"
    @Option(help: "Concurrent writer threads (group mode).") var writers: Int = 4
    @Option(help: "Initial LMDB map size in bytes (small values exercise map growth).") var mapSize: Int = 1 << 20

    func validate() throws {
        guard mode == "each" || mode == "group" else { throw ValidationError("--mode must be each or group, not \(mode)") }
        guard writers >= 1 && writers <= 64 else { throw ValidationError("--writers must be 1 to 64") }
    }

    func run() throws {
        let options = StoreOptions(syncMode: mode == "each" ? .eachCommit : .group, checkpointsKept: 2)
        let store = try DurableStore.lmdb(directory: directory, options: options, initialMapSize: mapSize)
        let firstCheckpoint = (try store.checkpointSequences(StorageWorkload.checkpoint).last).map { $0 + 1 } ?? 0
        let started = UInt64(Date().timeIntervalSince1970 * 1e6)
        let threadCount = mode == "each" ? 1 : writers
        let group = DispatchGroup()
        for writer in 0..<threadCount {
            let thread = Thread {
                // Each run's writers use fresh record numbers: the start time keeps them unique across restarts.
                var n: UInt64 = started
                var checkpoint = firstCheckpoint
                while true {
                    let payload = StorageWorkload.record(writer: writer, n: n)
                    do {
                        let seq = try store.append(to: StorageWorkload.log, [payload])
                        writeStandardOutputLine("L \(seq) \(writer) \(n)")
                        n += 1
                        if writer == 0 && n % 8 == 0 {
                            try store.writeCheckpoint(StorageWorkload.checkpoint, sequence: checkpoint, payload: StorageWorkload.state(sequence: checkpoint))
                            writeStandardOutputLine("C \(checkpoint)")
                            checkpoint += 1
                        }
                    } catch {
                        FileHandle.standardError.write(Data("storage-writer: \(error)\n".utf8))
                        Foundation.exit(3)
                    }
                }
            }
            group.enter()
            thread.start()
        }
        group.wait()
    }
}
