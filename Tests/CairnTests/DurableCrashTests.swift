import CairnChaosKit
import CairnCore
import Foundation
import Testing

/// Exactly-once state proved with real processes: `cairn-chaos actor-host` hosts the durable
/// Bank actor in an embedded cluster; the parent SIGKILLs it at seeded moments, restarts it on
/// the same directory, resends what got no reply, and checks every reply against the model.
@Suite("Crash: SIGKILL of the process hosting a durable actor", .serialized)
struct DurableCrashTests {
    var executable: String { executableDirectory() + "/cairn-chaos" }

    @Test("24 kills: every reply and the final state equal the model of each acknowledged message applied once, in order")
    func killAndVerify() throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_ACTOR_CRASH_SEED")
        print("durable actor crash test seed: \(seed) (replay with CAIRN_ACTOR_CRASH_SEED=\(seed) or `cairn-chaos actor-crash --kills 24 --seed \(seed)`)")
        try #require(FileManager.default.isExecutableFile(atPath: executable), "build cairn-chaos first: \(executable) is missing")
        let dir = try TemporaryDirectory()
        let report = ActorCrashCampaign.run(.init(executable: executable, directory: dir.path, seed: seed, kills: 24))
        for failure in report.failures { Issue.record("\(failure)") }
        #expect(report.kills == 24)
        #expect(report.messages > 24 * 16)
        #expect(report.replayed > 0, "restores replayed logged messages")
        print("kills \(report.kills), messages \(report.messages), resent \(report.retried), replayed \(report.replayed)")
    }

    @Test("maxRestarts 2: after a third SIGKILL the actor is declared dead and the host reports the terminal error")
    func maxRestartsWithRealKills() throws {
        try #require(FileManager.default.isExecutableFile(atPath: executable), "build cairn-chaos first: \(executable) is missing")
        let dir = try TemporaryDirectory()
        for life in 0..<3 {
            let child = try ChildProcess(executable: executable, arguments: [
                "actor-host", "--directory", dir.path, "--max-restarts", "2", "--checkpoint-every", "5",
            ], input: true)
            let ready = try #require(child.readLine(timeoutMilliseconds: 60_000))
            #expect(ready.hasPrefix("R \(life) "), "life \(life): \(ready)")
            child.writeLine("S \(life + 1) d 0 10 0")
            #expect(child.readLine(timeoutMilliseconds: 60_000)?.hasPrefix("A \(life + 1) \(life + 1) ") == true)
            child.kill()
            #expect(child.wait() == -9)
        }
        let child = try ChildProcess(executable: executable, arguments: [
            "actor-host", "--directory", dir.path, "--max-restarts", "2",
        ], input: true)
        let line = try #require(child.readLine(timeoutMilliseconds: 60_000))
        #expect(line.hasPrefix("X actorDead "), "\(line)")
        #expect(line.contains("more than maxRestarts (2)"), "\(line)")
        #expect(child.wait() == 2)
    }
}
