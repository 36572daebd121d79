import CairnCore
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Starts a thread named `name` and returns the name the kernel gives it, as the thread reads it.
private func kernelName(ofThreadNamed name: String) -> String {
    let seen = Locked("")
    let done = DispatchSemaphore(value: 0)
    startThread(named: name) {
        let comm = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "(unreadable)"
        seen.update { $0 = comm.trimmingCharacters(in: .newlines) }
        done.signal()
    }
    done.wait()
    return seen.value
}

@Suite struct ThreadNameTests {
    @Test func aStartedThreadCarriesItsNameToTheKernel() throws {
        try #require(FileManager.default.fileExists(atPath: "/proc/thread-self/comm"), "no /proc/thread-self on this system")
        #expect(kernelName(ofThreadNamed: "cairn-worker") == "cairn-worker")
    }

    @Test func aLongNameIsCutToTheKernelsFifteenBytesWithoutSplittingACharacter() throws {
        try #require(FileManager.default.fileExists(atPath: "/proc/thread-self/comm"), "no /proc/thread-self on this system")
        #expect(kernelName(ofThreadNamed: "cairn-checkpoint-writer") == "cairn-checkpoin")
        // "é" is two bytes: after 13 bytes it fits exactly; after 14 the cut would split it, so it goes.
        #expect(kernelName(ofThreadNamed: "cairn-inbox-né") == "cairn-inbox-né")
        #expect(kernelName(ofThreadNamed: "cairn-inbox-noé") == "cairn-inbox-no")
    }

    @Test("a thread started from a background task runs at the process's priority, not the task's",
          .enabled(if: geteuid() == 0, "raising a thread's priority back needs root (or RLIMIT_NICE)"))
    func aStartedThreadTakesTheProcessPriority() async throws {
        let base = processNiceValue()
        let (starter, started) = await Task.detached(priority: .background) { () -> (Int32, Int32) in
            let seen = Locked<Int32>(Int32.min)
            let done = DispatchSemaphore(value: 0)
            startThread(named: "cairn-nice") {
                seen.update { $0 = threadNiceValue() }
                done.signal()
            }
            done.wait()
            return (threadNiceValue(), seen.value)
        }.value
        // Linux's libdispatch runs background work at nice 10: the premise of the test.
        try #require(starter > base, "a background task runs at nice \(starter), the process at \(base)")
        #expect(started == base)
    }
}
