import CZstd
/// The on-disk format of a checkpoint: a fixed 36-byte header and a payload.
///
/// ```
/// offset size field
///      0    4 magic "CRNC"
///      4    2 format version (1), little-endian
///      6    1 codec: 0 = stored, 1 = zstd
///      7    1 reserved, 0
///      8    8 sequence number (the last message the state includes)
///     16    8 raw (uncompressed) length
///     24    8 stored (payload) length
///     32    4 CRC-32C of bytes 0..<32 followed by the payload
///     36      payload
/// ```
///
/// All integers are little-endian. The checksum covers the header too, so a flipped bit
/// in a length or the sequence number is caught before anything is trusted.
public enum CheckpointFormat {
    /// "CRNC".
    public static let magic: [UInt8] = [0x43, 0x52, 0x4E, 0x43]
    /// The format version this library writes and reads.
    public static let version: UInt16 = 1
    /// Size of the header in bytes.
    public static let headerSize = 36

    /// How a payload is stored.
    public enum Codec: UInt8, Sendable {
        /// Stored as is.
        case stored = 0
        /// zstd-compressed.
        case zstd = 1
    }

    /// Builds a checkpoint from the raw (encoded, uncompressed) state. The payload is compressed
    /// straight into the checkpoint's buffer, after room left for the header. `workers` is the
    /// number of zstd threads for large payloads (0: compress on the calling thread).
    public static func encode(payload raw: UnsafeRawBufferPointer, sequence: UInt64, codec: Codec = .zstd, level: Int32 = 1, workers: Int32 = 0) throws -> [UInt8] {
        let capacity = headerSize + (codec == .zstd ? ZSTD_compressBound(raw.count) : raw.count)
        var failure: (any Error)?
        let out = [UInt8](unsafeUninitializedCapacity: capacity) { buffer, initialized in
            initialized = 0
            let whole = UnsafeMutableRawBufferPointer(buffer)
            let payload = UnsafeMutableRawBufferPointer(rebasing: whole[headerSize...])
            let storedCount: Int
            switch codec {
            case .zstd:
                do {
                    storedCount = try Zstd.compress(raw, into: payload, level: level, workers: workers)
                } catch {
                    failure = error
                    return
                }
            case .stored:
                if raw.count > 0 { payload.baseAddress!.copyMemory(from: raw.baseAddress!, byteCount: raw.count) }
                storedCount = raw.count
            }
            for i in 0..<4 { whole[i] = magic[i] }
            storeLE(whole, 4, UInt64(version), 2)
            whole[6] = codec.rawValue
            whole[7] = 0
            storeLE(whole, 8, sequence, 8)
            storeLE(whole, 16, UInt64(raw.count), 8)
            storeLE(whole, 24, UInt64(storedCount), 8)
            let headerCRC = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: whole[0..<32]))
            let crc = CRC32C.update(headerCRC, UnsafeRawBufferPointer(rebasing: payload[0..<storedCount]))
            storeLE(whole, 32, UInt64(crc), 4)
            initialized = headerSize + storedCount
        }
        if let failure { throw failure }
        return out
    }

    /// Builds the checkpoint ``encode(payload:sequence:codec:level:workers:)`` builds (zstd),
    /// compressed as a stream and cut into pieces of `pieceSize` bytes as they fill, so that a
    /// caller can store each piece while the next is being compressed.
    ///
    /// Every piece but the first goes to `emit` as soon as it is full, in order (index 1, 2, …;
    /// the last may be shorter). The first piece starts with the header, whose lengths and
    /// checksum are known only at the end: it is returned, with the checkpoint's total size,
    /// once the whole payload is compressed. Put back together in order, the pieces are one
    /// checkpoint in this format.
    public static func encodePieces(payload raw: UnsafeRawBufferPointer, sequence: UInt64, level: Int32 = 1, workers: Int32 = 0,
                                    pieceSize: Int, emit: (_ index: Int, _ piece: [UInt8]) throws -> Void) throws -> (first: [UInt8], total: Int) {
        precondition(pieceSize > headerSize, "checkpoint pieces must be larger than the \(headerSize)-byte header")
        guard let context = ZSTD_createCCtx() else {
            throw StorageError(.io, "zstd could not allocate a compression context")
        }
        defer { ZSTD_freeCCtx(context) }
        _ = ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level)
        // A libzstd built without threads refuses this; then it compresses on this thread.
        if workers > 0 { _ = ZSTD_CCtx_setParameter(context, ZSTD_c_nbWorkers, workers) }
        // The frame then states its content size, as a one-shot compression's does.
        _ = ZSTD_CCtx_setPledgedSrcSize(context, UInt64(raw.count))

        var input = ZSTD_inBuffer(src: raw.baseAddress, size: raw.count, pos: 0)
        var first: [UInt8] = []
        // The later pieces, kept for the checksum, which covers the header first.
        var later: [[UInt8]] = []
        var piece = [UInt8](repeating: 0, count: pieceSize)
        var filled = headerSize
        var stored = 0
        while true {
            var remaining = 0
            var produced = 0
            piece.withUnsafeMutableBytes { buffer in
                var output = ZSTD_outBuffer(dst: buffer.baseAddress! + filled, size: pieceSize - filled, pos: 0)
                remaining = ZSTD_compressStream2(context, &output, &input, ZSTD_e_end)
                produced = output.pos
            }
            if ZSTD_isError(remaining) != 0 {
                throw StorageError(.io, "zstd compression of \(raw.count) bytes failed: \(String(cString: ZSTD_getErrorName(remaining)))")
            }
            filled += produced
            let done = remaining == 0
            guard filled == pieceSize || done else { continue }
            if first.isEmpty {
                stored += filled - headerSize
                first = filled == pieceSize ? piece : Array(piece[0..<filled])
            } else if filled > 0 {
                stored += filled
                let out = filled == pieceSize ? piece : Array(piece[0..<filled])
                later.append(out)
                try emit(later.count, out)
            }
            if done { break }
            piece = [UInt8](repeating: 0, count: pieceSize)
            filled = 0
        }
        first.withUnsafeMutableBytes { whole in
            for i in 0..<4 { whole[i] = magic[i] }
            storeLE(whole, 4, UInt64(version), 2)
            whole[6] = Codec.zstd.rawValue
            whole[7] = 0
            storeLE(whole, 8, sequence, 8)
            storeLE(whole, 16, UInt64(raw.count), 8)
            storeLE(whole, 24, UInt64(stored), 8)
            var crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: whole[0..<32]))
            crc = CRC32C.update(crc, UnsafeRawBufferPointer(rebasing: whole[headerSize...]))
            for p in later { crc = p.withUnsafeBytes { CRC32C.update(crc, $0) } }
            storeLE(whole, 32, UInt64(crc), 4)
        }
        return (first, headerSize + stored)
    }

    /// Builds a checkpoint from raw bytes.
    public static func encode(payload raw: [UInt8], sequence: UInt64, codec: Codec = .zstd, level: Int32 = 1, workers: Int32 = 0) throws -> [UInt8] {
        try raw.withUnsafeBytes { try encode(payload: $0, sequence: sequence, codec: codec, level: level, workers: workers) }
    }

    /// Verifies and opens a checkpoint, returning its sequence number and raw payload.
    ///
    /// The checks run in order (length, magic, version, codec, stored length, checksum,
    /// decompression, raw length) and the first that fails is thrown.
    public static func decode(_ bytes: UnsafeRawBufferPointer, maxRawLength: Int = 1 << 40) throws(CheckpointError) -> (sequence: UInt64, payload: [UInt8]) {
        guard bytes.count >= headerSize else {
            throw CheckpointError(.truncated, "checkpoint is \(bytes.count) bytes, shorter than its \(headerSize)-byte header")
        }
        guard bytes[0] == magic[0], bytes[1] == magic[1], bytes[2] == magic[2], bytes[3] == magic[3] else {
            throw CheckpointError(.badMagic, "first bytes are not \"CRNC\": not a Cairn checkpoint")
        }
        let version = UInt16(readLE(bytes, 4, 2))
        guard version == Self.version else {
            throw CheckpointError(.unknownVersion, "format version \(version); this reader knows version \(Self.version)")
        }
        guard let codec = Codec(rawValue: bytes[6]) else {
            throw CheckpointError(.unknownCodec, "codec byte \(bytes[6]) is not 0 (stored) or 1 (zstd)")
        }
        let sequence = readLE(bytes, 8, 8)
        let rawLength = readLE(bytes, 16, 8)
        let storedLength = readLE(bytes, 24, 8)
        let available = UInt64(bytes.count - headerSize)
        guard storedLength <= available else {
            throw CheckpointError(.truncated, "header declares \(storedLength) payload bytes, only \(available) present")
        }
        guard storedLength == available else {
            throw CheckpointError(.lengthMismatch, "header declares \(storedLength) payload bytes, \(available) present")
        }
        let expected = UInt32(readLE(bytes, 32, 4))
        let headerCRC = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<32]))
        let payload = UnsafeRawBufferPointer(rebasing: bytes[headerSize...])
        let actual = CRC32C.update(headerCRC, payload)
        guard actual == expected else {
            throw CheckpointError(.checksumMismatch, "CRC-32C is 0x\(String(actual, radix: 16)), header says 0x\(String(expected, radix: 16))")
        }
        guard rawLength <= UInt64(maxRawLength) else {
            throw CheckpointError(.lengthMismatch, "raw length \(rawLength) exceeds the limit of \(maxRawLength) bytes")
        }
        switch codec {
        case .stored:
            guard rawLength == storedLength else {
                throw CheckpointError(.lengthMismatch, "stored payload is \(storedLength) bytes, raw length says \(rawLength)")
            }
            return (sequence, [UInt8](payload))
        case .zstd:
            let (out, reason) = Zstd.decompress(payload, rawLength: Int(rawLength))
            guard let out else { throw CheckpointError(.decompressionFailed, "zstd: \(reason)") }
            return (sequence, out)
        }
    }

    /// Verifies and opens a checkpoint held in an array.
    public static func decode(_ bytes: [UInt8], maxRawLength: Int = 1 << 40) throws(CheckpointError) -> (sequence: UInt64, payload: [UInt8]) {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(CheckpointError) in try decode(raw, maxRawLength: maxRawLength) }
        }
        return try result.get()
    }

    static func storeLE(_ out: UnsafeMutableRawBufferPointer, _ at: Int, _ value: UInt64, _ size: Int) {
        for i in 0..<size { out[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }

    static func readLE(_ bytes: UnsafeRawBufferPointer, _ at: Int, _ size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<size { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
        return v
    }
}

/// Why a stored checkpoint was rejected.
public struct CheckpointError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The check that failed.
    public enum Code: String, Sendable, Equatable {
        /// Fewer bytes than the header, or than the header declares: a torn or cut write.
        case truncated
        /// The first four bytes are not "CRNC".
        case badMagic
        /// Written by a format version this reader does not know.
        case unknownVersion
        /// The codec byte names no known codec.
        case unknownCodec
        /// The CRC-32C over header and payload does not match: bytes changed after writing.
        case checksumMismatch
        /// The payload passed its checksum but zstd could not expand it.
        case decompressionFailed
        /// A length disagrees with the bytes present or with the expanded payload.
        case lengthMismatch
    }

    /// The check that failed.
    public let code: Code
    /// What was found.
    public let detail: String

    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "checkpoint \(code.rawValue): \(detail)" }
}
