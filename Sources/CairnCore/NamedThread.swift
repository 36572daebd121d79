import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Starts a thread whose name the operating system shows (in `top -H`, `perf`, `/proc/*/task/*/comm`).
///
/// Foundation's `Thread.name` does not reach the kernel on Linux, so every thread of a process
/// showed the process's name. The kernel keeps at most 15 bytes; a longer name is cut there.
@discardableResult
public func startThread(named name: String, stackSize: Int? = nil, _ body: @escaping @Sendable () -> Void) -> Thread {
    let thread = Thread {
        nameCurrentThread(name)
        takeProcessPriority()
        body()
    }
    thread.name = name
    if let stackSize { thread.stackSize = stackSize }
    thread.start()
    return thread
}

/// Gives the calling thread `name` (cut to 15 bytes) as the operating system shows it.
public func nameCurrentThread(_ name: String) {
    #if os(Linux)
    // `pthread_setname_np` does not import into Swift; the kernel takes the name here too.
    var bytes = Array(name.utf8.prefix(15))
    // A cut must not split a character.
    while !bytes.isEmpty, String(bytes: bytes, encoding: .utf8) == nil { bytes.removeLast() }
    let fd = open("/proc/thread-self/comm", O_WRONLY)
    guard fd >= 0 else { return }
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
    #endif
}

/// The nice value of thread `tid` (0: the calling thread); nil if it cannot be read.
private func niceValue(ofThread tid: id_t) -> Int32? {
    #if os(Linux)
    errno = 0
    let value = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid)
    return errno == 0 ? value : nil
    #else
    return nil
    #endif
}

/// The process's scheduling priority: its main thread's nice value.
public func processNiceValue() -> Int32 { niceValue(ofThread: id_t(getpid())) ?? 0 }

/// The calling thread's nice value.
public func threadNiceValue() -> Int32 { niceValue(ofThread: 0) ?? 0 }

/// The nice value of each thread of process `pid` whose name (as the kernel shows it) starts
/// with `prefix`, or of every thread; empty where `/proc` cannot be read.
public func threadNiceValues(of pid: Int32, namedWith prefix: String? = nil) -> [Int32] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.compactMap { task -> Int32? in
        guard let tid = id_t(task) else { return nil }
        if let prefix {
            guard let name = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8), name.hasPrefix(prefix) else { return nil }
        }
        return niceValue(ofThread: tid)
    }
}

/// Gives the calling thread the process's priority (``processNiceValue()``), and returns the
/// nice value it had.
///
/// On Linux a thread starts with the nice value of the thread that started it (and a process
/// with that of the thread that spawned it), and Swift's tasks and dispatch queues below the
/// default priority run at nice 2 (utility) to 10 (background) there. Every thread Cairn
/// starts takes the process's priority, so that a cluster started from a background task does
/// not run its schedulers, event loops and GCS at nice 10. Raising a thread's priority needs
/// the privilege to (root, or `RLIMIT_NICE`); without it the thread keeps what it inherited.
@discardableResult
public func takeProcessPriority() -> Int32 {
    let own = threadNiceValue()
    #if os(Linux)
    let base = processNiceValue()
    if own != base { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, base) }
    #endif
    return own
}

/// Gives the calling thread back a nice value ``takeProcessPriority()`` returned.
public func restoreThreadPriority(_ nice: Int32) {
    #if os(Linux)
    if threadNiceValue() != nice { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, nice) }
    #endif
}
