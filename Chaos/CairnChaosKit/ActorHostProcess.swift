import Cairn
import Foundation

/// The host side of the durable-actor crash protocol: an embedded cluster hosting the durable
/// ``Bank`` actor, driven over stdin by a parent that SIGKILLs it at random moments. Used by
/// `cairn-chaos actor-host` and by `cairn-bench recovery`.
///
/// Input lines: `S <seq> <kind> <a> <b> <c>` (see ``Bank/line(_:_:)``), sent as message `seq`
/// of caller 1. Output lines: `R <restarts> <replayed> <rejected> <discarded>` once the actor
/// is up; `A <seq> <applied> <digest> <total>` for each reply; `E <seq> <kind>` for a failed
/// message; `X <code> <detail>` if the actor cannot be spawned (then exit status 2). At end of
/// input it waits for every reply and stops cleanly.
public enum ActorHostProcess {
    public static func run(directory: String, checkpointEvery: Int, maxRestarts: Int, nodes: Int) async throws {
        let options = ClusterOptions(nodes: Array(repeating: NodeConfiguration(resources: Resources(cpus: 1)), count: nodes),
                                     storage: ActorStorageOptions(location: .directory(directory)))
        let cluster = try await Cluster.local(options)
        let policy: CheckpointPolicy = checkpointEvery == 0 ? .never : .every(messages: checkpointEvery)
        let bank: ActorHandle<Bank>
        do {
            bank = try await cluster.spawn(Bank(), name: "bank", durability: DurabilityOptions(checkpoint: policy, maxRestarts: maxRestarts))
        } catch let error as CairnError {
            writeStandardOutputLine("X \(error.code.rawValue) \(error.detail)")
            Foundation.exit(2)
        }
        let status = try await cluster.status(of: bank)
        let m = cluster.metrics
        writeStandardOutputLine("R \(status.restarts) \(m.messagesReplayed) \(m.checkpointsRejected) \(m.logRecordsDiscarded)")

        // Messages are sent from one thread, in input order; replies are awaited concurrently.
        let (replies, continuation) = AsyncStream<(UInt64, ObjectRef<Bank.Reply>)>.makeStream()
        let reader = Thread {
            while let line = Swift.readLine() {
                guard let (seq, message) = Bank.parse(Substring(line)) else {
                    FileHandle.standardError.write(Data("actor-host: bad input line: \(line)\n".utf8))
                    Foundation.exit(3)
                }
                do {
                    continuation.yield((seq, try bank.send(message, caller: CallerID(1), sequence: seq)))
                } catch {
                    FileHandle.standardError.write(Data("actor-host: send failed: \(error)\n".utf8))
                    Foundation.exit(3)
                }
            }
            continuation.finish()
        }
        reader.start()
        await withTaskGroup(of: Void.self) { group in
            for await (seq, ref) in replies {
                group.addTask {
                    do {
                        let reply = try await cluster.get(ref)
                        writeStandardOutputLine("A \(seq) \(reply)")
                    } catch let error as RemoteError {
                        writeStandardOutputLine("E \(seq) \(error.kind.rawValue)")
                    } catch {
                        writeStandardOutputLine("E \(seq) \(error)")
                    }
                }
            }
        }
        cluster.shutdown()
    }
}
