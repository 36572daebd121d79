import CZstd

/// zstd compression of checkpoint payloads.
enum Zstd {
    /// Compresses `input` at `level` (1 is fastest; 3 is zstd's default).
    static func compress(_ input: UnsafeRawBufferPointer, level: Int32) throws -> [UInt8] {
        let bound = ZSTD_compressBound(input.count)
        var failure: String?
        let out = [UInt8](unsafeUninitializedCapacity: bound) { buffer, initialized in
            let n = ZSTD_compress(buffer.baseAddress, bound, input.baseAddress, input.count, level)
            if ZSTD_isError(n) != 0 {
                failure = String(cString: ZSTD_getErrorName(n))
                initialized = 0
            } else {
                initialized = n
            }
        }
        if let failure {
            throw StorageError(.io, "zstd compression of \(input.count) bytes failed: \(failure)")
        }
        return out
    }

    /// Decompresses one frame that must expand to exactly `rawLength` bytes.
    /// Returns nil and a reason when the frame is malformed or has another size.
    static func decompress(_ input: UnsafeRawBufferPointer, rawLength: Int) -> (bytes: [UInt8]?, reason: String) {
        let declared = ZSTD_getFrameContentSize(input.baseAddress, input.count)
        if declared == ZSTD_CONTENTSIZE_ERROR {
            return (nil, "not a zstd frame")
        }
        if declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != UInt64(rawLength) {
            return (nil, "frame declares \(declared) bytes, header says \(rawLength)")
        }
        var failure = ""
        let out = [UInt8](unsafeUninitializedCapacity: rawLength) { buffer, initialized in
            initialized = 0
            let n = ZSTD_decompress(buffer.baseAddress, rawLength, input.baseAddress, input.count)
            if ZSTD_isError(n) != 0 {
                failure = String(cString: ZSTD_getErrorName(n))
            } else if n != rawLength {
                failure = "expanded to \(n) bytes, header says \(rawLength)"
            } else {
                initialized = n
            }
        }
        return failure.isEmpty ? (out, "") : (nil, failure)
    }
}
