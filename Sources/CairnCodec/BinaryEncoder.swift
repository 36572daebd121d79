#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Encodes `Encodable` values into the Cairn binary format (see ``BinaryFormat``).
///
/// The encoder streams into one byte buffer. Containers are written in the order they
/// are used; a container is closed (its length written) when its parent is written to
/// again or the value that opened it returns. Interleaving writes between two sibling
/// containers, which synthesized `Codable` code never does, throws
/// ``CodecError/Code-swift.enum/unsupportedContainerUse``.
public struct BinaryEncoder: Sendable {
    public init() {}

    /// Encodes `value` as a complete document.
    public func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        var out: [UInt8] = []
        try encode(value, into: &out)
        return out
    }

    /// Appends the document for `value` to `buffer`; on error `buffer` is left as it was.
    public func encode<T: Encodable>(_ value: T, into buffer: inout [UInt8]) throws {
        let impl = EncoderImpl(buffer: buffer)
        buffer = []
        let start = impl.buf.count
        impl.buf.append(BinaryFormat.magic)
        impl.buf.append(BinaryFormat.version)
        do {
            try impl.encodeValue(value)
        } catch {
            impl.buf.removeSubrange(start...)
            buffer = impl.buf
            throw error
        }
        buffer = impl.buf
    }
}

/// The encoder's mutable state. It lives behind a pointer rather than in stored class
/// properties: Swift checks exclusive access to a class's stored `var`s at run time on every
/// access, which cost a fifth of the encoding time; a pointee is not checked. The encoder is
/// used by one thread for one `encode` call, so there is nothing for those checks to catch.
/// An open container: its identity, the offset of its reserved length byte, its element count.
/// (A struct, not a tuple: tuple metadata is looked up in a locked runtime table.)
struct OpenContainer {
    var id: Int
    var lengthAt: Int
    var count: Int
}

struct EncoderState {
    var buf: [UInt8]
    /// Open containers, innermost last: (identity, offset of the reserved length byte, element count).
    var open: [OpenContainer] = []
    var nextID = 1
    /// Where the value being encoded by the current `encode(to:)` call starts.
    var valueStart = -1
    var codingPath: [any CodingKey] = []
}

final class EncoderImpl: Encoder {
    let state: UnsafeMutablePointer<EncoderState>

    var buf: [UInt8] {
        _read { yield state.pointee.buf }
        _modify { yield &state.pointee.buf }
    }
    var open: [OpenContainer] {
        _read { yield state.pointee.open }
        _modify { yield &state.pointee.open }
    }
    var nextID: Int {
        get { state.pointee.nextID }
        set { state.pointee.nextID = newValue }
    }
    var valueStart: Int {
        get { state.pointee.valueStart }
        set { state.pointee.valueStart = newValue }
    }
    var codingPath: [any CodingKey] {
        _read { yield state.pointee.codingPath }
        _modify { yield &state.pointee.codingPath }
    }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    init(buffer: [UInt8]) {
        state = .allocate(capacity: 1)
        state.initialize(to: EncoderState(buf: buffer))
        state.pointee.buf.reserveCapacity(Swift.max(256, buffer.count + 256))
    }

    deinit {
        state.deinitialize(count: 1)
        state.deallocate()
    }

    func fail(_ detail: String) -> CodecError {
        CodecError(.unsupportedContainerUse, offset: buf.count, path: renderPath(codingPath), detail: detail)
    }

    // MARK: primitives

    @inline(__always) func varint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            buf.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        buf.append(UInt8(v))
    }

    @inline(__always) func int(_ v: Int64) {
        buf.append(Tag.int)
        varint(UInt64(bitPattern: (v << 1) ^ (v >> 63)))
    }

    @inline(__always) func uint(_ v: UInt64) {
        buf.append(Tag.uint)
        varint(v)
    }

    @inline(__always) func bool(_ v: Bool) { buf.append(v ? Tag.trueValue : Tag.falseValue) }

    @inline(__always) func double(_ v: Double) {
        buf.append(Tag.float64)
        withUnsafeBytes(of: v.bitPattern.littleEndian) { buf.append(contentsOf: $0) }
    }

    @inline(__always) func float(_ v: Float) {
        buf.append(Tag.float32)
        withUnsafeBytes(of: v.bitPattern.littleEndian) { buf.append(contentsOf: $0) }
    }

    @inline(__always) func string(_ v: String) {
        buf.append(Tag.string)
        rawString(v)
    }

    @inline(__always) func rawString(_ v: String) {
        var s = v
        s.withUTF8 { utf8 in
            varint(UInt64(utf8.count))
            buf.append(contentsOf: utf8)
        }
    }

    func bytes(_ v: UnsafeRawBufferPointer) {
        buf.append(Tag.bytes)
        varint(UInt64(v.count))
        buf.append(contentsOf: v)
    }

    /// Encodes any value, taking the byte fast paths and closing what it opens.
    func encodeValue<T: Encodable>(_ value: T) throws {
        let type = ObjectIdentifier(T.self)
        if type == FastPath.bytes {
            (value as! [UInt8]).withUnsafeBytes { bytes($0) }
            return
        }
        if type == FastPath.data {
            (value as! Data).withUnsafeBytes { bytes($0) }
            return
        }
        let depth = open.count
        let savedStart = valueStart
        valueStart = buf.count
        try value.encode(to: self)
        if buf.count == valueStart {
            // The value encoded nothing at all: represent it as an empty map, as JSON would `{}`.
            _ = openContainer(Tag.map)
        }
        try close(downTo: depth)
        valueStart = savedStart
    }

    // MARK: containers

    /// Opens a container at the current position and returns its identity.
    func openContainer(_ tag: UInt8) -> Int {
        buf.append(tag)
        let lengthAt = buf.count
        buf.append(0)  // body length, patched on close
        buf.append(0)  // element count, patched on close
        let id = nextID
        nextID &+= 1
        open.append(OpenContainer(id: id, lengthAt: lengthAt, count: 0))
        return id
    }

    /// Closes every container above `depth`, writing its length and count.
    func close(downTo depth: Int) throws {
        while open.count > depth {
            let c = open.removeLast()
            let countBytes = varintSize(UInt64(c.count))
            let bodyLength = buf.count - (c.lengthAt + 2) + countBytes
            let lengthBytes = varintSize(UInt64(bodyLength))
            let extra = lengthBytes + countBytes - 2
            if extra > 0 {
                buf.insert(contentsOf: repeatElement(0, count: extra), at: c.lengthAt + 2)
            }
            var at = c.lengthAt
            writeVarint(UInt64(bodyLength), at: &at)
            writeVarint(UInt64(c.count), at: &at)
        }
    }

    private func writeVarint(_ value: UInt64, at index: inout Int) {
        var v = value
        while v >= 0x80 {
            buf[index] = UInt8(truncatingIfNeeded: v) | 0x80
            v >>= 7
            index += 1
        }
        buf[index] = UInt8(v)
        index += 1
    }

    /// Makes the container `id` at `depth` the innermost open one, closing its finished children,
    /// and counts one more element in it.
    @inline(__always) func prepare(_ id: Int, _ depth: Int) throws {
        if open.count != depth + 1 || open[depth].id != id {
            guard depth < open.count, open[depth].id == id else {
                throw fail("a container was written to after it was closed (a sibling container was used after it); encode fields one after the other")
            }
            try close(downTo: depth + 1)
        }
        open[depth].count += 1
    }

    func requestContainer(_ tag: UInt8) throws -> (id: Int, depth: Int) {
        guard buf.count == valueStart else {
            throw fail("a value asked its encoder for a second container; a value must encode into exactly one container")
        }
        let id = openContainer(tag)
        return (id, open.count - 1)
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        do {
            let (id, depth) = try requestContainer(Tag.map)
            return KeyedEncodingContainer(KeyedEncoder<Key>(impl: self, id: id, depth: depth, storedPath: nil))
        } catch {
            // `container(keyedBy:)` cannot throw; the invalid container reports on first use.
            return KeyedEncodingContainer(KeyedEncoder<Key>(impl: self, id: 0, depth: -1, storedPath: nil))
        }
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        do {
            let (id, depth) = try requestContainer(Tag.array)
            return UnkeyedEncoder(impl: self, id: id, depth: depth, storedPath: nil)
        } catch {
            return UnkeyedEncoder(impl: self, id: 0, depth: -1, storedPath: nil)
        }
    }

    func singleValueContainer() -> any SingleValueEncodingContainer {
        SingleValueEncoder(impl: self, start: buf.count, storedPath: nil)
    }
}

@inline(__always) func varintSize(_ value: UInt64) -> Int {
    var v = value
    var n = 1
    while v >= 0x80 {
        v >>= 7
        n += 1
    }
    return n
}

struct KeyedEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let impl: EncoderImpl
    let id: Int
    let depth: Int
    /// Set only for containers whose path differs from the coder's current one (nested by key).
    /// Others read the coder's path, so that no container holds a copy of it and extending
    /// the path never copies the array.
    let storedPath: [any CodingKey]?
    var codingPath: [any CodingKey] { storedPath ?? impl.codingPath }

    @inline(__always) func entry(_ key: Key) throws {
        guard depth >= 0 else { throw impl.fail("a value asked its encoder for a second container") }
        try impl.prepare(id, depth)
        impl.rawString(key.stringValue)
    }

    mutating func encodeNil(forKey key: Key) throws { try entry(key); impl.buf.append(Tag.null) }
    mutating func encode(_ value: Bool, forKey key: Key) throws { try entry(key); impl.bool(value) }
    mutating func encode(_ value: String, forKey key: Key) throws { try entry(key); impl.string(value) }
    mutating func encode(_ value: Double, forKey key: Key) throws { try entry(key); impl.double(value) }
    mutating func encode(_ value: Float, forKey key: Key) throws { try entry(key); impl.float(value) }
    mutating func encode(_ value: Int, forKey key: Key) throws { try entry(key); impl.int(Int64(value)) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { try entry(key); impl.int(Int64(value)) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { try entry(key); impl.int(Int64(value)) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { try entry(key); impl.int(Int64(value)) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { try entry(key); impl.int(value) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { try entry(key); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { try entry(key); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { try entry(key); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { try entry(key); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { try entry(key); impl.uint(value) }

    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try entry(key)
        impl.codingPath.append(key)
        defer { impl.codingPath.removeLast() }
        try impl.encodeValue(value)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        do {
            try entry(key)
            let nestedID = impl.openContainer(Tag.map)
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: nestedID, depth: impl.open.count - 1, storedPath: codingPath + [key]))
        } catch {
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: 0, depth: -1, storedPath: codingPath + [key]))
        }
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        do {
            try entry(key)
            let nestedID = impl.openContainer(Tag.array)
            return UnkeyedEncoder(impl: impl, id: nestedID, depth: impl.open.count - 1, storedPath: codingPath + [key])
        } catch {
            return UnkeyedEncoder(impl: impl, id: 0, depth: -1, storedPath: codingPath + [key])
        }
    }

    mutating func superEncoder() -> any Encoder { superEncoder(forKey: Key(stringValue: "super")!) }

    mutating func superEncoder(forKey key: Key) -> any Encoder {
        // The returned encoder writes the value at this entry; it must be used before this container is written to again.
        try? entry(key)
        impl.valueStart = impl.buf.count
        return impl
    }
}

struct UnkeyedEncoder: UnkeyedEncodingContainer {
    let impl: EncoderImpl
    let id: Int
    let depth: Int
    /// Set only for containers whose path differs from the coder's current one (nested by key).
    /// Others read the coder's path, so that no container holds a copy of it and extending
    /// the path never copies the array.
    let storedPath: [any CodingKey]?
    var codingPath: [any CodingKey] { storedPath ?? impl.codingPath }
    var count: Int {
        depth >= 0 && depth < impl.open.count && impl.open[depth].id == id ? impl.open[depth].count : 0
    }

    @inline(__always) func element() throws {
        guard depth >= 0 else { throw impl.fail("a value asked its encoder for a second container") }
        try impl.prepare(id, depth)
    }

    mutating func encodeNil() throws { try element(); impl.buf.append(Tag.null) }
    mutating func encode(_ value: Bool) throws { try element(); impl.bool(value) }
    mutating func encode(_ value: String) throws { try element(); impl.string(value) }
    mutating func encode(_ value: Double) throws { try element(); impl.double(value) }
    mutating func encode(_ value: Float) throws { try element(); impl.float(value) }
    mutating func encode(_ value: Int) throws { try element(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int8) throws { try element(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int16) throws { try element(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int32) throws { try element(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int64) throws { try element(); impl.int(value) }
    mutating func encode(_ value: UInt) throws { try element(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { try element(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt16) throws { try element(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { try element(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { try element(); impl.uint(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try element()
        try impl.encodeValue(value)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        do {
            try element()
            let nestedID = impl.openContainer(Tag.map)
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: nestedID, depth: impl.open.count - 1, storedPath: nil))
        } catch {
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: 0, depth: -1, storedPath: nil))
        }
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        do {
            try element()
            let nestedID = impl.openContainer(Tag.array)
            return UnkeyedEncoder(impl: impl, id: nestedID, depth: impl.open.count - 1, storedPath: nil)
        } catch {
            return UnkeyedEncoder(impl: impl, id: 0, depth: -1, storedPath: nil)
        }
    }

    mutating func superEncoder() -> any Encoder {
        try? element()
        impl.valueStart = impl.buf.count
        return impl
    }
}

struct SingleValueEncoder: SingleValueEncodingContainer {
    let impl: EncoderImpl
    let start: Int
    /// Set only for containers whose path differs from the coder's current one (nested by key).
    /// Others read the coder's path, so that no container holds a copy of it and extending
    /// the path never copies the array.
    let storedPath: [any CodingKey]?
    var codingPath: [any CodingKey] { storedPath ?? impl.codingPath }

    @inline(__always) func once() throws {
        guard impl.buf.count == start, impl.valueStart == start else {
            throw impl.fail("a single-value container was written twice, or after another container")
        }
    }

    mutating func encodeNil() throws { try once(); impl.buf.append(Tag.null) }
    mutating func encode(_ value: Bool) throws { try once(); impl.bool(value) }
    mutating func encode(_ value: String) throws { try once(); impl.string(value) }
    mutating func encode(_ value: Double) throws { try once(); impl.double(value) }
    mutating func encode(_ value: Float) throws { try once(); impl.float(value) }
    mutating func encode(_ value: Int) throws { try once(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int8) throws { try once(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int16) throws { try once(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int32) throws { try once(); impl.int(Int64(value)) }
    mutating func encode(_ value: Int64) throws { try once(); impl.int(value) }
    mutating func encode(_ value: UInt) throws { try once(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { try once(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt16) throws { try once(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { try once(); impl.uint(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { try once(); impl.uint(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try once()
        try impl.encodeValue(value)
    }
}

/// Type identities of the values with a fast path, looked up once instead of on every value.
enum FastPath {
    static let bytes = ObjectIdentifier([UInt8].self)
    static let data = ObjectIdentifier(Data.self)
    static let string = ObjectIdentifier(String.self)
    static let int = ObjectIdentifier(Int.self)
    static let double = ObjectIdentifier(Double.self)
    static let bool = ObjectIdentifier(Bool.self)
}
