#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CairnCore

/// A child process started by the chaos harness, with its standard output (and optionally its
/// standard input) on a pipe.
///
/// Only processes started here are ever signalled, and only by their own pid.
public final class ChildProcess {
    /// The child's process id.
    public let pid: pid_t
    private let stdoutFD: Int32
    private var stdinFD: Int32 = -1
    private var pending: [UInt8] = []
    private var reaped = false
    private var eof = false

    /// Starts `executable` with `arguments`; its stdout is readable with ``readLine(timeoutMilliseconds:)``,
    /// its stderr is inherited (or, with `mergeStandardError`, read with its stdout). With `input`, its
    /// stdin is a pipe written by ``writeLine(_:)`` (and SIGPIPE is ignored in this process, so writing
    /// to a killed child fails instead of killing us).
    public init(executable: String, arguments: [String], input: Bool = false, mergeStandardError: Bool = false) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw ChildProcessError(detail: "pipe() failed: errno \(errno)") }
        var inFDs: [Int32] = [-1, -1]
        if input {
            signal(SIGPIPE, SIG_IGN)
            guard pipe(&inFDs) == 0 else { throw ChildProcessError(detail: "pipe() failed: errno \(errno)") }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        if mergeStandardError { posix_spawn_file_actions_adddup2(&actions, fds[1], 2) }
        posix_spawn_file_actions_addclose(&actions, fds[0])
        posix_spawn_file_actions_addclose(&actions, fds[1])
        if input {
            posix_spawn_file_actions_adddup2(&actions, inFDs[0], 0)
            posix_spawn_file_actions_addclose(&actions, inFDs[0])
            posix_spawn_file_actions_addclose(&actions, inFDs[1])
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, nil, argv, environ)
        close(fds[1])
        if input { close(inFDs[0]) }
        guard rc == 0 else {
            close(fds[0])
            if input { close(inFDs[1]) }
            throw ChildProcessError(detail: "cannot start \(executable): posix_spawn error \(rc)")
        }
        pid = child
        stdoutFD = fds[0]
        stdinFD = inFDs[1]
    }

    /// Writes `line` and a newline to the child's stdin with one write(2). Returns false if the
    /// child is gone (or its stdin is not a pipe).
    @discardableResult
    public func writeLine(_ line: String) -> Bool {
        guard stdinFD >= 0 else { return false }
        var bytes = Array((line + "\n").utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { write(stdinFD, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }

    deinit {
        if !reaped {
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        close(stdoutFD)
        if stdinFD >= 0 { close(stdinFD) }
    }

    /// The next complete line of the child's stdout, without its newline; nil at end of output,
    /// or if no line came within `timeoutMilliseconds`.
    public func readLine(timeoutMilliseconds: Int? = nil) -> String? {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[..<nl], as: UTF8.self)
                pending.removeSubrange(...nl)
                return line
            }
            if eof { return nil }
            if let timeoutMilliseconds {
                var p = pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)
                let r = poll(&p, 1, Int32(timeoutMilliseconds))
                if r < 0 && errno == EINTR { continue }
                if r == 0 { return nil }
            }
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

    /// Closes the child's stdin, so it reads end of input.
    public func closeInput() {
        if stdinFD >= 0 {
            close(stdinFD)
            stdinFD = -1
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

/// Writes `line` and a newline to standard output with one write(2), so that lines written by
/// concurrent threads never interleave (how chaos children acknowledge to their parent).
public func writeStandardOutputLine(_ line: String) {
    var bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { write(1, $0.baseAddress, $0.count) }
}

/// Sleeps for `microseconds`.
public func sleepMicroseconds(_ microseconds: Int) {
    var request = timespec(tv_sec: microseconds / 1_000_000, tv_nsec: (microseconds % 1_000_000) * 1000)
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// The directory holding the running executable (so a test can find `cairn-chaos` beside it).
public func executableDirectory() -> String {
    let path = currentExecutablePath()
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}
