/// An error from the storage layer.
///
/// Each code names one condition a caller reacts to differently; ``detail`` says what
/// was being done and what to do about it.
public struct StorageError: Error, CustomStringConvertible, Sendable, Equatable {
    /// What went wrong.
    public enum Code: String, Sendable, Equatable {
        /// The storage directory could not be created or opened (permissions, missing parent, not a directory).
        case cannotOpen
        /// The storage engine reported an I/O or internal error; the operation was not applied.
        case io
        /// A key is empty or longer than the engine accepts (LMDB: 511 bytes including Cairn's prefix).
        case invalidKey
        /// A log or checkpoint name is empty, longer than 256 bytes, or not valid.
        case invalidName
        /// The database reached its configured maximum size and cannot grow further.
        case full
        /// A stored log record failed its length or checksum check; ``StorageError/sequence`` names it.
        case corruptRecord
        /// Every stored checkpoint for a name failed verification; the detail lists why each was rejected.
        case noValidCheckpoint
        /// The store was closed; open a new one.
        case closed
        /// A replicated store's remote side (the GCS) could not be reached, or did not take a
        /// write (which may still have been applied); the store stops writing: open it again.
        case remote
    }

    /// What went wrong.
    public let code: Code
    /// A sentence saying what failed and what to do.
    public let detail: String
    /// The log sequence number concerned, for ``Code-swift.enum/corruptRecord``.
    public let sequence: UInt64?

    public init(_ code: Code, _ detail: String, sequence: UInt64? = nil) {
        self.code = code
        self.detail = detail
        self.sequence = sequence
    }

    public var description: String { "StorageError.\(code.rawValue): \(detail)" }
}
