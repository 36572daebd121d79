import ArgumentParser
import Cairn
import CairnChaosKit
import Foundation

/// The child of the durable-actor crash test: an embedded cluster hosting the durable `Bank`
/// actor, driven over stdin by the parent, which SIGKILLs it at random moments.
///
/// Input lines: `S <seq> <kind> <a> <b> <c>` (see ``Bank/line(_:_:)``), sent as message `seq`
/// of caller 1. Output lines: `R <restarts> <replayed> <rejected> <discarded>` once the actor
/// is up; `A <seq> <applied> <digest> <total>` for each reply; `E <seq> <kind>` for a failed
/// message; `X <code> <detail>` if the actor cannot be spawned (then exit status 2).
struct ActorHost: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "actor-host",
        abstract: "Host the durable Bank actor and apply messages read from stdin, acknowledging each reply on stdout.")

    @Option(help: "Storage directory (LMDB).") var directory: String
    @Option(help: "Checkpoint every N messages; 0 means never.") var checkpointEvery: Int = 100
    @Option(help: "The actor's maxRestarts.") var maxRestarts: Int = 1000
    @Option(help: "Nodes of the embedded cluster.") var nodes: Int = 2

    func validate() throws {
        guard checkpointEvery >= 0 else { throw ValidationError("--checkpoint-every must be 0 (never) or more") }
        guard nodes >= 1 && nodes <= 16 else { throw ValidationError("--nodes must be 1 to 16") }
    }

    func run() async throws {
        let options = ClusterOptions(nodes: Array(repeating: NodeConfiguration(resources: Resources(cpus: 1)), count: nodes),
                                     storage: ActorStorageOptions(location: .directory(directory)))
        let cluster = try await Cluster.local(options)
        let policy: CheckpointPolicy = checkpointEvery == 0 ? .never : .every(messages: checkpointEvery)
        let bank: ActorHandle<Bank>
        do {
            bank = try await cluster.spawn(Bank(), name: "bank", durability: DurabilityOptions(checkpoint: policy, maxRestarts: maxRestarts))
        } catch let error as CairnError {
            ack("X \(error.code.rawValue) \(error.detail)\n")
            Foundation.exit(2)
        }
        let status = try await cluster.status(of: bank)
        let m = cluster.metrics
        ack("R \(status.restarts) \(m.messagesReplayed) \(m.checkpointsRejected) \(m.logRecordsDiscarded)\n")

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
                        ack("A \(seq) \(reply)\n")
                    } catch let error as RemoteError {
                        ack("E \(seq) \(error.kind.rawValue)\n")
                    } catch {
                        ack("E \(seq) \(error)\n")
                    }
                }
            }
        }
        cluster.shutdown()
    }
}
