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
