import CairnCore

/// The secret every connection into a cluster proves it knows before any message is accepted.
///
/// 32 random bytes, written as 64 lowercase hex digits, kept in a file only its owner can read
/// (`write(to:)` and `read(from:)`, in `CairnNet`). The token itself never crosses the wire:
/// the handshake proves it with HMAC-SHA256 over fresh nonces (see ``Handshake``).
public struct ClusterToken: Sendable, Equatable, CustomStringConvertible {
    public static let byteCount = 32
    public let bytes: [UInt8]

    /// A new random token, from the system's generator: a secret must not come from a seed.
    /// (The handshake cores take their nonces as arguments.)
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
        do {
            bytes = try Hex.decode(String(decoding: digits, as: UTF8.self))
        } catch {
            throw TokenError(.malformed, "a cluster token is hex digits only; found a non-hex character at position \(error.position)")
        }
    }

    /// The token as 64 lowercase hex digits.
    public var hex: String { Hex.encode(bytes) }

    /// Never the secret itself: a short fingerprint, safe to log.
    public var description: String {
        "ClusterToken(fingerprint \(SHA256.hash(bytes).prefix(4).map { String($0, radix: 16) }.joined()))"
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
