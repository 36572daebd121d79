import CairnCore

/// Kills the process hosting a durable actor again and again, and checks exactly-once state.
///
/// The parent (this code) drives `cairn-chaos actor-host`, which hosts the durable ``Bank``
/// actor in an embedded cluster, with up to `window` messages outstanding. At a seeded moment
/// it SIGKILLs the child, restarts it on the same storage directory with a seeded checkpoint
/// interval, resends every message it got no reply to (same caller, same sequence numbers)
/// and carries on. Every reply must equal the model's reply for that message, which holds
/// the count and an order-sensitive digest of all messages applied: one message applied
/// twice, lost or reordered is caught at the next reply. The last round ends cleanly with an
/// audit that must match the model.
public struct ActorCrashCampaign {
    public struct Options: Sendable {
        public var executable: String
        public var directory: String
        public var seed: UInt64
        public var kills: Int
        public var window = 16
        /// Checkpoint intervals to pick from per life (0 = never).
        public var checkpointIntervals = [1, 10, 100, 1000, 0]

        public init(executable: String, directory: String, seed: UInt64, kills: Int) {
            self.executable = executable
            self.directory = directory
            self.seed = seed
            self.kills = kills
        }
    }

    public struct Report: Sendable {
        public var kills = 0
        public var messages = 0
        public var retried = 0
        public var replayed = 0
        public var failures: [String] = []
        public var timeline: [String] = []
    }

    public static func run(_ o: Options) -> Report {
        var report = Report()
        var rng = SeededGenerator(seed: o.seed)
        var model = Bank()
        var messages: [UInt64: Bank.Message] = [:]
        var expected: [UInt64: String] = [:]
        var unacked = Set<UInt64>()
        var nextSeq: UInt64 = 1

        func fail(_ s: String) { report.failures.append("seed \(o.seed): \(s)") }

        func newMessage(_ m: Bank.Message) -> UInt64 {
            let seq = nextSeq
            nextSeq += 1
            messages[seq] = m
            do {
                expected[seq] = "A \(seq) \(try model.receive(m))"
            } catch {
                expected[seq] = "E \(seq) threw"
            }
            unacked.insert(seq)
            return seq
        }

        /// Checks one reply line; returns whether it acknowledged a message.
        func process(_ line: String) -> Bool {
            let parts = line.split(separator: " ", maxSplits: 2)
            guard parts.count >= 2, parts[0] == "A" || parts[0] == "E", let seq = UInt64(parts[1]) else {
                fail("unexpected line from the host: \(line)")
                return false
            }
            if line != expected[seq] { fail("reply to message \(seq) is \"\(line)\", the model says \"\(expected[seq] ?? "nothing")\"") }
            if unacked.remove(seq) == nil { fail("message \(seq) was acknowledged twice") }
            return true
        }

        for round in 0...o.kills {
            let interval = o.checkpointIntervals.randomElement(using: &rng)!
            let child: ChildProcess
            do {
                child = try ChildProcess(executable: o.executable, arguments: [
                    "actor-host", "--directory", o.directory, "--checkpoint-every", "\(interval)",
                ], input: true)
            } catch {
                fail("round \(round): \(error)")
                return report
            }
            guard let ready = child.readLine(timeoutMilliseconds: 60_000), ready.hasPrefix("R ") else {
                fail("round \(round): the host did not come up")
                return report
            }
            let r = ready.split(separator: " ").compactMap { Int($0) }
            if r.count == 4 {
                if r[0] != round { fail("round \(round): the actor reports \(r[0]) restarts, expected \(round)") }
                report.replayed += r[1]
            }
            report.timeline.append("life \(round): checkpoint every \(interval == 0 ? "never" : String(interval)), restarts \(r.first ?? -1), replayed \(r.count > 1 ? r[1] : -1), resending \(unacked.count)")
            // Resend what got no reply, in order, with the same sequence numbers.
            for seq in unacked.sorted() { child.writeLine(Bank.line(seq, messages[seq]!)) }
            report.retried += unacked.count
            var outstanding = unacked.count

            if round == o.kills {
                let audit = newMessage(.audit)
                child.writeLine(Bank.line(audit, .audit))
                child.closeInput()
                while let line = child.readLine(timeoutMilliseconds: 60_000) { _ = process(line) }
                let status = child.wait()
                if status != 0 { fail("final round: the host exited with \(status)") }
                if !unacked.isEmpty { fail("final round: \(unacked.count) messages never got a reply: \(unacked.sorted().prefix(10))") }
                break
            }

            let acksBeforeKill = Int.random(in: 1...300, using: &rng)
            var received = 0
            while received < acksBeforeKill {
                while outstanding < o.window {
                    let m = Bank.randomMessage(using: &rng)
                    child.writeLine(Bank.line(newMessage(m), m))
                    outstanding += 1
                }
                guard let line = child.readLine(timeoutMilliseconds: 60_000) else {
                    fail("round \(round): the host stopped replying")
                    return report
                }
                if process(line) {
                    received += 1
                    outstanding -= 1
                }
            }
            sleepMicroseconds(Int.random(in: 0...3_000, using: &rng))
            child.kill()
            // Replies written before the kill were acknowledged too.
            while let line = child.readLine(timeoutMilliseconds: 10_000) { _ = process(line) }
            let status = child.wait()
            if status != -9 { fail("round \(round): the host should die of SIGKILL, exited with \(status)") }
            report.kills += 1
            if !report.failures.isEmpty { break }
        }
        report.messages = Int(nextSeq - 1)
        return report
    }
}
