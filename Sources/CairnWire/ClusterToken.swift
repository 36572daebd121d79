#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The methods below are named `read` and `write`, which hide the C functions of those names.
private func systemWrite(_ fd: Int32, _ buffer: UnsafeRawPointer?, _ count: Int) -> Int { write(fd, buffer, count) }
private func systemRead(_ fd: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int) -> Int { read(fd, buffer, count) }

/// The secret every connection into a cluster proves it knows before any message is accepted.
///
/// 32 random bytes, written as 64 lowercase hex digits. `cairn start --head` generates one and
/// writes it to a file only its owner can read (mode 0600); joining processes read the file or
/// are given the token. The token itself never crosses the wire: the handshake proves it with
/// HMAC-SHA256 over fresh nonces (see ``Handshake``).
public struct ClusterToken: Sendable, Equatable, CustomStringConvertible {
    public static let byteCount = 32
    public let bytes: [UInt8]

    /// A new random token.
    public static func generate() -> ClusterToken {
        var rng = SystemRandomNumberGenerator()
        return ClusterToken(unchecked: (0..<byteCount).map { _ in UInt8.random(in: 0...255, using: &rng) })
    }

    private init(unchecked bytes: [UInt8]) { self.bytes = bytes }

    /// Parses the 64-hex-digit form (surrounding whitespace, such as a file's final newline, is ignored).
    public init(hex: String) throws(TokenError) {
        let trimmed = hex.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed()
        let digits = Array(String(trimmed).utf8)
        guard digits.count == 2 * Self.byteCount else {
            throw TokenError(.malformed, "a cluster token is \(2 * Self.byteCount) hex digits; got \(digits.count) characters")
        }
        var out: [UInt8] = []
        out.reserveCapacity(Self.byteCount)
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let hi = Self.nibble(digits[i]), let lo = Self.nibble(digits[i + 1]) else {
                throw TokenError(.malformed, "a cluster token is hex digits only; found a non-hex character at position \(i)")
            }
            out.append(hi << 4 | lo)
        }
        bytes = out
    }

    /// The token as 64 lowercase hex digits.
    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Never the secret itself: a short fingerprint, safe to log.
    public var description: String {
        "ClusterToken(fingerprint \(SHA256.hash(bytes).prefix(4).map { String($0, radix: 16) }.joined()))"
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

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

/// Why a cluster token could not be made, read or written.
public struct TokenError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// Not 64 hex digits.
        case malformed
        /// The token file is readable or writable by users other than its owner.
        case insecureFile
        /// The file could not be created, opened, read or written.
        case io
    }

    public let code: Code
    public let detail: String

    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "TokenError.\(code.rawValue): \(detail)" }
}
