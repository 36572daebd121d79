import CZstd

/// zstd compression of checkpoint payloads.
enum Zstd {
    /// Compresses `input` at `level` into `output` (at least `ZSTD_compressBound(input.count)`
    /// bytes) and returns the compressed size. With `workers` above 0, zstd splits large inputs
    /// into jobs compressed by that many threads of its own; the frame is the same format.
    static func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, level: Int32, workers: Int32) throws -> Int {
        guard let context = ZSTD_createCCtx() else {
            throw StorageError(.io, "zstd could not allocate a compression context")
        }
        defer { ZSTD_freeCCtx(context) }
        var status = ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level)
        if ZSTD_isError(status) == 0, workers > 0 {
            // A libzstd built without threads refuses this; then it compresses on this thread.
            _ = ZSTD_CCtx_setParameter(context, ZSTD_c_nbWorkers, workers)
        }
        status = ZSTD_compress2(context, output.baseAddress, output.count, input.baseAddress, input.count)
        if ZSTD_isError(status) != 0 {
            throw StorageError(.io, "zstd compression of \(input.count) bytes failed: \(String(cString: ZSTD_getErrorName(status)))")
        }
        return status
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
