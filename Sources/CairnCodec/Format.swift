/// The Cairn binary format, version 1.
///
/// A document is `magic (0xCA) · version (0x01) · value`. A value is a one-byte tag
/// followed by its payload:
///
/// | tag | payload |
/// | --- | --- |
/// | `nil` | none |
/// | `false`, `true` | none |
/// | `int` | zig-zag varint (all signed integer types) |
/// | `uint` | varint (all unsigned integer types) |
/// | `float32`, `float64` | 4 or 8 bytes, little-endian IEEE 754 |
/// | `string` | varint byte count · UTF-8 |
/// | `bytes` | varint byte count · raw bytes (`[UInt8]` and `Data`) |
/// | `array` | varint body length · body = varint element count · elements |
/// | `map` | varint body length · body = varint entry count · (key · value)* |
///
/// A key is a varint byte count and UTF-8: keyed containers keep their field names, so a
/// reader can skip fields it does not know, treat absent optional fields as `nil`, and
/// decode enums with associated values. Every container states its body length, so a
/// reader skips a value it does not want in constant time.
///
/// Versioning: the version byte changes only when the tag set or layout changes; adding
/// or removing optional fields in a type needs no new version.
public enum BinaryFormat {
    /// First byte of every document.
    public static let magic: UInt8 = 0xCA
    /// The version this library writes; it reads this version only.
    public static let version: UInt8 = 1
    /// Deepest container nesting a reader accepts; deeper input is rejected, not recursed.
    public static let defaultMaxDepth = 256
}

/// One-byte type tags of the binary format.
@usableFromInline
enum Tag {
    @usableFromInline static let null: UInt8 = 0x00
    @usableFromInline static let falseValue: UInt8 = 0x01
    @usableFromInline static let trueValue: UInt8 = 0x02
    @usableFromInline static let int: UInt8 = 0x03
    @usableFromInline static let uint: UInt8 = 0x04
    @usableFromInline static let float32: UInt8 = 0x05
    @usableFromInline static let float64: UInt8 = 0x06
    @usableFromInline static let string: UInt8 = 0x07
    @usableFromInline static let bytes: UInt8 = 0x08
    @usableFromInline static let array: UInt8 = 0x09
    @usableFromInline static let map: UInt8 = 0x0A

    static func name(_ tag: UInt8) -> String {
        switch tag {
        case null: return "nil"
        case falseValue, trueValue: return "bool"
        case int: return "int"
        case uint: return "uint"
        case float32: return "float32"
        case float64: return "float64"
        case string: return "string"
        case bytes: return "bytes"
        case array: return "array"
        case map: return "map"
        default: return "unknown tag 0x" + String(tag, radix: 16)
        }
    }
}

/// An error from ``BinaryEncoder`` or ``BinaryDecoder``.
///
/// Decoding never traps on bad input: every malformed, truncated or hostile document ends
/// in one of these, with the byte offset and the coding path where it was found.
public struct CodecError: Error, CustomStringConvertible, Sendable, Equatable {
    /// What went wrong.
    public enum Code: String, Sendable, Equatable {
        /// The input ended in the middle of a value.
        case truncated
        /// The first byte is not the format's magic byte: this is not a Cairn document.
        case badMagic
        /// The document was written by a format version this reader does not know.
        case unsupportedVersion
        /// A tag byte is not one of the format's tags.
        case unknownTag
        /// The value's tag does not match the type being decoded (e.g. a string where an `Int` is expected).
        case typeMismatch
        /// A number does not fit the type being decoded, or a varint is longer than 10 bytes.
        case valueOutOfRange
        /// A string's bytes are not valid UTF-8.
        case invalidUTF8
        /// A keyed container has no entry for a required key.
        case keyNotFound
        /// An unkeyed container has no more elements.
        case endOfContainer
        /// A declared length or count exceeds the bytes that remain, or disagrees with them.
        case lengthMismatch
        /// Containers are nested deeper than the decoder's limit.
        case nestingTooDeep
        /// Bytes remain after the top-level value.
        case trailingBytes
        /// The encoder was used in a way this streaming format cannot represent, such as writing
        /// to a container after a sibling container was opened after it.
        case unsupportedContainerUse
        /// The bytes were well formed, but the type's own `init(from:)` refused them (for example an
        /// enum with no case of that name); ``CodecError/detail`` quotes the type's error.
        case rejectedByType
    }

    /// What went wrong.
    public let code: Code
    /// Byte offset in the document where it was found (0 when encoding).
    public let offset: Int
    /// The coding path, rendered as `a.b[3].c`.
    public let path: String
    /// A sentence saying what was expected and what was found.
    public let detail: String

    public init(_ code: Code, offset: Int, path: String, detail: String) {
        self.code = code
        self.offset = offset
        self.path = path
        self.detail = detail
    }

    public var description: String {
        "CodecError.\(code.rawValue) at byte \(offset)\(path.isEmpty ? "" : " (path \(path))"): \(detail)"
    }
}

func renderPath(_ path: [any CodingKey]) -> String {
    var out = ""
    for key in path {
        if let index = key.intValue, key.stringValue.hasPrefix("Index ") || key.stringValue == String(index) {
            out += "[\(index)]"
        } else {
            if !out.isEmpty { out += "." }
            out += key.stringValue
        }
    }
    return out
}

/// A coding key for array positions and synthesized keys.
struct IndexKey: CodingKey {
    var stringValue: String { "Index \(index)" }
    var intValue: Int? { index }
    let index: Int
    init(_ index: Int) { self.index = index }
    init?(stringValue: String) { return nil }
    init?(intValue: Int) { self.index = intValue }
}

struct NamedKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ name: String) { stringValue = name }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { return nil }
}

/// Keyed containers kept for reuse within one encode or decode call, one per coding-key type.
///
/// `KeyedEncodingContainer` and `KeyedDecodingContainer` wrap the concrete container in a
/// class box that the standard library allocates on every `container(keyedBy:)` call,
/// after two generic-metadata lookups; for a small struct that is about a quarter of its
/// coding time. A container that finds its position through the coder's current frame
/// rather than holding it can be made once per key type and handed out again.
///
/// Both wrappers are a single reference to their box. That is what lets a box be kept as an
/// `AnyObject` and turned back into the wrapper; it is checked once at run time (see
/// `EncoderImpl.reusesContainers`), and where it does not hold nothing is reused.
///
/// The boxes refer back to their coder, so the coder calls ``removeAll()`` when its call ends.
struct FrameContainers {
    private var keys: [ObjectIdentifier] = []
    private var boxes: [AnyObject] = []
    /// Memory the kept containers use (encoded field names), freed with them.
    private var memory: [UnsafeMutableRawPointer] = []
    private var last = 0
    /// Beyond this many key types in one document, containers are made fresh each time.
    static let limit = 64

    @inline(__always) mutating func box(for key: ObjectIdentifier) -> AnyObject? {
        if last < keys.count && keys[last] == key { return boxes[last] }
        for i in keys.indices where keys[i] == key {
            last = i
            return boxes[i]
        }
        return nil
    }

    var isFull: Bool { keys.count >= Self.limit }

    /// Keeps `box` for `key`; `memory`, if any, is deallocated by ``removeAll()``.
    mutating func add(_ key: ObjectIdentifier, _ box: AnyObject, memory: UnsafeMutableRawPointer? = nil) {
        precondition(!isFull, "FrameContainers.add called when full")
        keys.append(key)
        boxes.append(box)
        if let memory { self.memory.append(memory) }
        last = keys.count - 1
    }

    mutating func removeAll() {
        keys = []
        boxes = []
        for m in memory { m.deallocate() }
        memory = []
        last = 0
    }
}

/// A reused container's table of encoded field names, so that each name is produced (encoding)
/// or compared (decoding) from its `stringValue` once per document rather than once per value.
///
/// It applies to key types that are plain values of at most 8 bytes, which includes the enums
/// synthesized for `CodingKeys`. A key's bytes, read as a little-endian integer, index the
/// table; each of the `entries` entries is a count byte (0 while unknown) and the name as it is
/// written (varint length and UTF-8). It assumes what
/// every `CodingKey` in practice does: equal key values have equal names.
enum KeyNames {
    static let entries = 64
    static let entrySize = 32
    static let tableSize = entries * entrySize

    static func applies<Key: CodingKey>(to type: Key.Type) -> Bool {
        _isPOD(Key.self) && MemoryLayout<Key>.size <= 8
    }

    /// A zeroed table; the caller owns it (``FrameContainers`` frees it).
    static func allocate() -> UnsafeMutablePointer<UInt8> {
        let table = UnsafeMutablePointer<UInt8>.allocate(capacity: tableSize)
        table.initialize(repeating: 0, count: tableSize)
        return table
    }

    /// The entry for `key`, or nil if its value is beyond the table.
    @inline(__always) static func entry<Key: CodingKey>(for key: Key, in table: UnsafeMutablePointer<UInt8>) -> UnsafeMutablePointer<UInt8>? {
        // The key's bytes are reinterpreted in place: copying a generic value into memory
        // goes through its type's value witness and an unspecialized library call, which
        // cost more than the rest of this lookup.
        let value: UInt64
        switch MemoryLayout<Key>.size {
        case 0: value = 0
        case 1: value = UInt64(unsafeBitCast(key, to: UInt8.self))
        case 2: value = UInt64(UInt16(littleEndian: unsafeBitCast(key, to: UInt16.self)))
        case 4: value = UInt64(UInt32(littleEndian: unsafeBitCast(key, to: UInt32.self)))
        case 8: value = UInt64(littleEndian: unsafeBitCast(key, to: UInt64.self))
        default: return nil
        }
        guard value < UInt64(entries) else { return nil }
        return table + Int(value) &* entrySize
    }
}
