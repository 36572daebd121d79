#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CairnWire

// The methods below are named `read` and `write`, which hide the C functions of those names.
private func systemWrite(_ fd: Int32, _ buffer: UnsafeRawPointer?, _ count: Int) -> Int { write(fd, buffer, count) }
private func systemRead(_ fd: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int) -> Int { read(fd, buffer, count) }

/// Token files: the file I/O lives here, in the shell, so that `CairnWire` stays pure.
extension ClusterToken {
    /// Writes the token to a new file at `path` with mode 0600. An existing file is not
    /// overwritten: that would lock out the processes that read it.
    public func write(to path: String) throws(TokenError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            throw TokenError(.io, "cannot create token file \(path): \(reason) (an existing token file is never overwritten; remove it to start a new cluster)")
        }
        defer { close(fd) }
        // The mode given to open() is masked by the umask; set it exactly.
        guard fchmod(fd, 0o600) == 0 else {
            throw TokenError(.io, "cannot set mode 0600 on token file \(path): \(String(cString: strerror(errno)))")
        }
        let text = Array((hex + "\n").utf8)
        let written = text.withUnsafeBytes { systemWrite(fd, $0.baseAddress, $0.count) }
        guard written == text.count, fsync(fd) == 0 else {
            throw TokenError(.io, "cannot write token file \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// Reads a token file. A file that others can read or write is refused: anyone who can
    /// read it can join the cluster.
    public static func read(from path: String) throws(TokenError) -> ClusterToken {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw TokenError(.io, "cannot open token file \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw TokenError(.io, "cannot stat token file \(path): \(String(cString: strerror(errno)))")
        }
        let mode = info.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            throw TokenError(.insecureFile, "token file \(path) has mode 0\(String(mode, radix: 8)), so others can read or change it; run chmod 600 \(path)")
        }
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = buffer.withUnsafeMutableBytes { systemRead(fd, $0.baseAddress, $0.count) }
        guard n >= 0 else {
            throw TokenError(.io, "cannot read token file \(path): \(String(cString: strerror(errno)))")
        }
        do {
            return try ClusterToken(hex: String(decoding: buffer[0..<n], as: UTF8.self))
        } catch {
            throw TokenError(.malformed, "token file \(path): \(error.detail)")
        }
    }
}
