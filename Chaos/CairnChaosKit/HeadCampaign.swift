import Cairn
import CairnCore
import CairnWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A session directory of the `cairn` binary, driven from this process: start and stop a head,
/// find the head running now, connect to it as a driver.
public struct HeadSession: Sendable {
    public let cairn: String
    public let directory: String

    public init(cairn: String, directory: String) {
        self.cairn = cairn
        self.directory = directory
    }

    /// Runs `cairn arguments --dir DIRECTORY`; throws with its output if it fails.
    public func run(_ arguments: [String]) throws {
        let child = try ChildProcess(executable: cairn, arguments: arguments + ["--dir", directory], mergeStandardError: true)
        var output: [String] = []
        while let line = child.readLine(timeoutMilliseconds: 60_000) { output.append(line) }
        guard child.wait() == 0 else {
            throw ChildProcessError(detail: "cairn \(arguments.joined(separator: " ")) failed: \(output.joined(separator: "; "))")
        }
    }

    /// The head's address, as it wrote it.
    public func address() throws -> String {
        try String(contentsOfFile: directory + "/head", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The pid of the newest head the session recorded that still runs.
    public func headPID() -> Int32? {
        let text = (try? String(contentsOfFile: directory + "/pids", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").reversed().lazy.compactMap { line -> Int32? in
            let parts = line.split(separator: " ", maxSplits: 2)
            guard parts.count == 3, parts[1] == "head", let pid = Int32(parts[0]), !processHasExited(pid) else { return nil }
            return pid
        }.first
    }

    /// A driver connected to the head.
    public func connect() async throws -> Cluster {
        try await Cluster.connect(to: try address(), tokenFile: directory + "/token", log: { _ in })
    }

    /// A driver connected to the head started in place of `killed`, as soon as it answers
    /// (within `timeout`).
    public func reconnect(replacing killed: Int32, timeout: Duration = .seconds(60)) async throws -> Cluster {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let head = headPID(), head != killed, let cluster = try? await connect() { return cluster }
            guard ContinuousClock.now < deadline else {
                throw ChildProcessError(detail: "no head answered within \(timeout) of the kill of pid \(killed); see \(directory)/head.log")
            }
            try await Task.sleep(for: .milliseconds(2))
        }
    }
}

/// SIGKILL the head of a cluster started with `cairn start --head --replicated-storage` (2
/// node processes, one node joined from outside, a standby scheduler) at seeded moments while a driver in this
/// process sends messages to a durable Bank actor; after each kill the head's supervisor
/// starts it again, the driver connects again, spawns the actor again by name, retries the
/// message that got no reply with the same sequence number, and checks every reply against
/// the model; and the cluster must be back to full strength (its 2 nodes, the joined one, a
/// standby scheduler).
public enum HeadCampaign {
    public struct Configuration: Sendable {
        public var cairn: String
        public var seed: UInt64
        public var kills: Int

        public init(cairn: String, seed: UInt64, kills: Int) {
            self.cairn = cairn
            self.seed = seed
            self.kills = kills
        }
    }

    public struct Report: Sendable {
        public var timeline: [String] = []
        /// Per kill: from the SIGKILL to the actor's first answer through the new head.
        public var killToAnswerMs: [Double] = []
        /// Per kill: from the SIGKILL until the new head lists 3 nodes with CPUs alive and a standby scheduler.
        public var fullStrengthMs: [Double] = []
        public var callsChecked = 0
        public var failures: [String] = []
    }

    static let caller = CallerID(4_242)

    /// What the driver's messages did in one round, up to the kill.
    private struct Round: Sendable {
        var model: Bank
        var sequence: UInt64
        var checked = 0
        /// The message that got no reply (the kill came first): it may or may not have been applied.
        var pending: Bank.Message?
        var mismatch: String?
    }

    public static func run(_ configuration: Configuration) async -> Report {
        var report = Report()
        let files: TemporaryDirectory
        do {
            files = try TemporaryDirectory()
        } catch {
            report.failures.append("cannot make a session directory: \(error)")
            return report
        }
        let session = HeadSession(cairn: configuration.cairn, directory: files.path)
        let restarts = "\(configuration.kills + 5)"
        do {
            try session.run(["start", "--head", "--port", "0", "--nodes", "2", "--replicated-storage", "--restarts", restarts])
            defer { try? session.run(["stop"]) }
            try session.run(["start", "--address", try session.address(), "--cpus", "2", "--restarts", restarts])
            try session.run(["scheduler", "--restarts", restarts])
            try await campaign(configuration, session, &report)
        } catch {
            report.failures.append("\(error)")
        }
        return report
    }

    private static func campaign(_ configuration: Configuration, _ session: HeadSession, _ report: inout Report) async throws {
        var rng = SeededGenerator(seed: configuration.seed)
        var cluster = try await session.connect()
        defer { cluster.shutdown() }
        // Each head kill takes the actor's node down with it, which counts toward maxRestarts
        // (10 by default) like any crash of its host: allow one per kill.
        let durability = DurabilityOptions(maxRestarts: configuration.kills + 10)
        var bank = try await cluster.spawn(Bank(), name: "chaos-head-bank", durability: durability, resources: Resources(cpus: 1))
        var model = Bank()
        var sequence: UInt64 = 0
        let origin = ContinuousClock.now
        func stamp() -> String { String(format: "%8.1f ms", milliseconds(since: origin)) }

        for round in 1...configuration.kills {
            // Messages run while the head is killed at a seeded moment; the one in flight then
            // may or may not have been applied: it is retried below with the same number.
            let messages = (0..<4_000).map { _ in Bank.Message.deposit(account: Int.random(in: 0..<Bank.accounts, using: &rng), amount: Int.random(in: 1...100, using: &rng)) }
            let delayMs = Int.random(in: 20...400, using: &rng)
            let sender = Task { [cluster, bank, model, sequence] in
                var round = Round(model: model, sequence: sequence)
                for message in messages {
                    do {
                        let reply = try await cluster.get(try bank.send(message, caller: caller, sequence: round.sequence + 1), timeout: .seconds(60))
                        let expected = try round.model.receive(message)
                        round.sequence += 1
                        round.checked += 1
                        if reply != expected {
                            round.mismatch = "message \(round.sequence): \(reply), the model says \(expected)"
                            return round
                        }
                    } catch {
                        round.pending = message
                        return round
                    }
                }
                return round
            }
            try await Task.sleep(for: .milliseconds(delayMs))
            guard let head = session.headPID() else { throw ChildProcessError(detail: "no head runs before kill \(round)") }
            let killedAt = ContinuousClock.now
            kill(head, SIGKILL)
            report.timeline.append("\(stamp())  kill \(round): head pid \(head), \(delayMs) ms after the round began")
            let sent = await sender.value
            model = sent.model
            sequence = sent.sequence
            report.callsChecked += sent.checked
            if let mismatch = sent.mismatch { report.failures.append("kill \(round): before the kill, \(mismatch)") }
            cluster.shutdown()

            cluster = try await session.reconnect(replacing: head)
            bank = try await cluster.spawn(Bank(), name: "chaos-head-bank", durability: durability, resources: Resources(cpus: 1))
            // The message that got no reply, again with its number; then an audit.
            for message in [sent.pending, .audit].compactMap({ $0 }) {
                let reply = try await cluster.get(try bank.send(message, caller: caller, sequence: sequence + 1), timeout: .seconds(60))
                let expected = try model.receive(message)
                sequence += 1
                report.callsChecked += 1
                if reply != expected { report.failures.append("kill \(round): message \(sequence) after the restart: \(reply), the model says \(expected)") }
                if report.killToAnswerMs.count < round { report.killToAnswerMs.append(milliseconds(since: killedAt)) }
            }
            let full = try await waitForFullStrength(session)
            report.fullStrengthMs.append(milliseconds(since: killedAt))
            report.timeline.append("\(stamp())  kill \(round): answered \(Int(report.killToAnswerMs.last!)) ms after it, \(sequence) messages applied; "
                                   + (full ? "full strength after \(Int(report.fullStrengthMs.last!)) ms" : "NOT back to full strength"))
            if !full { report.failures.append("kill \(round): the cluster did not come back to 3 nodes with CPUs and a standby scheduler within 60 s") }
        }
    }

    /// Waits until the head lists 3 nodes with CPUs alive (its 2 and the joined one) and a
    /// standby scheduler beside its active one.
    private static func waitForFullStrength(_ session: HeadSession) async throws -> Bool {
        let token = try ClusterToken.read(from: session.directory + "/token")
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if let status = try? await Cluster.status(of: try session.address(), token: token),
               status.nodes.filter({ $0.alive && $0.resources.cpus > 0 }).count >= 3,
               status.schedulers.contains(where: { !$0.active }) { return true }
            try await Task.sleep(for: .milliseconds(5))
        }
        return false
    }

    private static func milliseconds(since instant: ContinuousClock.Instant) -> Double {
        let elapsed = instant.duration(to: .now).components
        return Double(elapsed.seconds) * 1_000 + Double(elapsed.attoseconds) / 1e15
    }
}
