import CairnCore

/// The wire format between Cairn processes: length-prefixed, versioned, checksummed frames.
///
/// ```
/// offset size field
///      0    2 magic 0xCA 0x57
///      2    1 version (1)
///      3    1 kind (see FrameKind)
///      4    4 payload length, little-endian
///      8    4 CRC-32C of bytes 0..<8 followed by the payload, little-endian
///     12      payload
/// ```
///
/// The checksum covers the header, so a flipped length is caught as well as a flipped payload
/// byte. A reader refuses a frame whose declared length exceeds its limit before buffering
/// it, so a hostile peer cannot make it allocate more than the limit.
public enum WireFormat {
    public static let magic: (UInt8, UInt8) = (0xCA, 0x57)
    public static let version: UInt8 = 1
    public static let headerSize = 12
    /// The largest payload a reader accepts unless told otherwise.
    public static let defaultMaxPayload = 64 << 20
}

/// What a frame carries.
public enum FrameKind: UInt8, Sendable, CaseIterable {
    /// Client → server, first: protocol version, epoch, nonce, name.
    case hello = 1
    /// Server → client: the server's nonce.
    case challenge = 2
    /// Client → server: HMAC proving the token.
    case proof = 3
    /// Server → client: accepted; the server's epoch and its own HMAC proving the token.
    case welcome = 4
    /// Either way: the connection is refused or closed, with a reason in UTF-8.
    case refused = 5
    /// Application data, after the handshake.
    case message = 6
    /// Liveness, after the handshake; empty payload.
    case heartbeat = 7
}

/// One frame.
public struct Frame: Sendable, Equatable {
    public var kind: FrameKind
    public var payload: [UInt8]

    public init(_ kind: FrameKind, _ payload: [UInt8] = []) {
        self.kind = kind
        self.payload = payload
    }

    /// The frame's bytes on the wire.
    public var encoded: [UInt8] {
        var out: [UInt8] = []
        Frame.append(kind, payload, to: &out)
        return out
    }

    /// Appends a frame to `out` without building a `Frame`.
    public static func append(_ kind: FrameKind, _ payload: [UInt8], to out: inout [UInt8]) {
        precondition(payload.count <= Int(UInt32.max), "a frame payload is at most 4 GiB")
        out.reserveCapacity(out.count + WireFormat.headerSize + payload.count)
        let start = out.count
        out.append(WireFormat.magic.0)
        out.append(WireFormat.magic.1)
        out.append(WireFormat.version)
        out.append(kind.rawValue)
        appendLE(UInt64(payload.count), size: 4, to: &out)
        let headerCRC = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[start..<(start + 8)])) }
        let crc = payload.withUnsafeBytes { CRC32C.update(headerCRC, $0) }
        appendLE(UInt64(crc), size: 4, to: &out)
        out += payload
    }
}

/// Why a connection's bytes were refused; the connection is then closed with this reason.
public struct WireError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// The first two bytes of a frame are not the magic: not a Cairn peer, or a desynchronized stream.
        case badMagic
        /// A frame of a wire version this process does not speak.
        case unsupportedVersion
        /// A frame kind this process does not know.
        case unknownKind
        /// A frame declares a payload larger than the reader's limit.
        case tooLarge
        /// A frame's CRC-32C does not match its bytes.
        case checksumMismatch
        /// A handshake payload does not have the layout its kind requires.
        case malformedPayload
        /// A frame arrived that the protocol does not allow at this point (such as a message before the handshake ended).
        case protocolViolation
        /// The peer did not prove the cluster token, or refused ours.
        case authenticationFailed
        /// The peer's epoch is older than one already seen from it: a replaced incarnation.
        case staleEpoch
    }

    public let code: Code
    public let detail: String

    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "WireError.\(code.rawValue): \(detail)" }
}

/// Cuts a byte stream into frames: feed it what the socket delivers, in pieces of any size,
/// and take frames out. After an error it stays failed, returning that error, because the
/// stream can no longer be trusted; the connection must be closed.
public struct FrameDecoder: Sendable {
    public let maxPayload: Int
    private var buffer: [UInt8] = []
    private var start = 0
    private var failure: WireError?

    public init(maxPayload: Int = WireFormat.defaultMaxPayload) {
        precondition(maxPayload >= 0, "maxPayload must not be negative")
        self.maxPayload = maxPayload
    }

    /// Bytes received and not yet returned as frames.
    public var buffered: Int { buffer.count - start }

    public mutating func feed<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        if start > 0 && start >= buffer.count / 2 {
            buffer.removeFirst(start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, nil if more bytes are needed, or the error that ends the stream.
    public mutating func next() throws(WireError) -> Frame? {
        if let failure { throw failure }
        do {
            return try parse()
        } catch {
            failure = error
            throw error
        }
    }

    private mutating func parse() throws(WireError) -> Frame? {
        let available = buffer.count - start
        // Check what has arrived as early as possible, so garbage is refused without waiting for more.
        if available >= 1, buffer[start] != WireFormat.magic.0 { throw badMagic() }
        if available >= 2, buffer[start + 1] != WireFormat.magic.1 { throw badMagic() }
        if available >= 3, buffer[start + 2] != WireFormat.version {
            throw WireError(.unsupportedVersion, "frame of wire version \(buffer[start + 2]); this process speaks version \(WireFormat.version)")
        }
        if available >= 4, FrameKind(rawValue: buffer[start + 3]) == nil {
            throw WireError(.unknownKind, "frame kind \(buffer[start + 3]) is not one this process knows")
        }
        guard available >= WireFormat.headerSize else { return nil }
        let length = Int(readLE(buffer, start + 4, size: 4))
        guard length <= maxPayload else {
            throw WireError(.tooLarge, "frame declares \(length) payload bytes; the limit is \(maxPayload)")
        }
        guard available >= WireFormat.headerSize + length else { return nil }
        let expected = UInt32(readLE(buffer, start + 8, size: 4))
        let payloadStart = start + WireFormat.headerSize
        let actual = buffer.withUnsafeBytes { raw in
            CRC32C.update(CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[start..<(start + 8)])),
                          UnsafeRawBufferPointer(rebasing: raw[payloadStart..<(payloadStart + length)]))
        }
        guard actual == expected else {
            throw WireError(.checksumMismatch, "frame CRC-32C is 0x\(String(actual, radix: 16)), header says 0x\(String(expected, radix: 16))")
        }
        let frame = Frame(FrameKind(rawValue: buffer[start + 3])!, Array(buffer[payloadStart..<(payloadStart + length)]))
        start = payloadStart + length
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: buffer.capacity <= 1 << 20)
            start = 0
        }
        return frame
    }

    private func badMagic() -> WireError {
        WireError(.badMagic, "bytes 0x\(String(buffer[start], radix: 16))… do not start a Cairn frame (not a Cairn peer, or a desynchronized stream)")
    }
}
