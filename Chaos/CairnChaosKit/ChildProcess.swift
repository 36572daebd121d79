#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A child process started by the chaos harness, with its standard output on a pipe.
///
/// Only processes started here are ever signalled, and only by their own pid.
public final class ChildProcess {
    /// The child's process id.
    public let pid: pid_t
    private let stdoutFD: Int32
    private var pending: [UInt8] = []
    private var reaped = false
    private var eof = false

    /// Starts `executable` with `arguments`; its stdout is readable with ``readLine()``, its stderr is inherited.
    public init(executable: String, arguments: [String]) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw ChildProcessError(detail: "pipe() failed: errno \(errno)") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        posix_spawn_file_actions_addclose(&actions, fds[1])
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, nil, argv, environ)
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            throw ChildProcessError(detail: "cannot start \(executable): posix_spawn error \(rc)")
        }
        pid = child
        stdoutFD = fds[0]
    }

    deinit {
        if !reaped {
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        close(stdoutFD)
    }

    /// The next complete line of the child's stdout, without its newline; nil at end of output.
    public func readLine() -> String? {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[..<nl], as: UTF8.self)
                pending.removeSubrange(...nl)
                return line
            }
            if eof { return nil }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = chunk.withUnsafeMutableBytes { read(stdoutFD, $0.baseAddress, 4096) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                eof = true
                continue
            }
            pending += chunk[..<n]
        }
    }

    /// Sends SIGKILL to the child (and only to it).
    public func kill() {
        if !reaped { _ = Glibc.kill(pid, SIGKILL) }
    }

    /// Waits for the child to exit; returns its exit status, or the negated signal number that killed it.
    @discardableResult
    public func wait() -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = true
        if status & 0x7F == 0 { return (status >> 8) & 0xFF }
        return -(status & 0x7F)
    }
}

/// A child process could not be started.
public struct ChildProcessError: Error, CustomStringConvertible {
    public let detail: String
    public var description: String { detail }
}

/// Sleeps for `microseconds`.
public func sleepMicroseconds(_ microseconds: Int) {
    var request = timespec(tv_sec: microseconds / 1_000_000, tv_nsec: (microseconds % 1_000_000) * 1000)
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// The directory holding the running executable (so a test can find `cairn-chaos` beside it).
public func executableDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, 4095)
    guard n > 0 else { return "." }
    let path = String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}
