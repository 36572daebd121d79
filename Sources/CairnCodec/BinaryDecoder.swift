#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Decodes `Decodable` values from the Cairn binary format (see ``BinaryFormat``).
///
/// Hostile input is safe: every length is checked against the bytes that remain before
/// anything is allocated, nesting is limited to ``maxDepth``, and every failure is a
/// ``CodecError`` naming the offset and coding path.
public struct BinaryDecoder: Sendable {
    /// Deepest container nesting accepted.
    public var maxDepth: Int

    public init(maxDepth: Int = BinaryFormat.defaultMaxDepth) {
        self.maxDepth = maxDepth
    }

    /// Decodes a complete document; bytes after the value are an error.
    public func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        try bytes.withUnsafeBytes { try decode(type, from: $0) }
    }

    /// Decodes a complete document from raw memory that stays valid for the duration of the call.
    public func decode<T: Decodable>(_ type: T.Type, from bytes: UnsafeRawBufferPointer) throws -> T {
        let impl = DecoderImpl(bytes: bytes, maxDepth: maxDepth)
        impl.state.pointee.reuse = DecoderImpl.reusesContainers
        defer { impl.state.pointee.frames.removeAll() }
        guard bytes.count >= 2 else {
            throw impl.error(.truncated, at: 0, "a document is at least 2 bytes (magic and version); got \(bytes.count)")
        }
        guard bytes[0] == BinaryFormat.magic else {
            throw impl.error(.badMagic, at: 0, "expected magic byte 0xCA, found 0x\(String(bytes[0], radix: 16)): not a Cairn binary document")
        }
        guard bytes[1] == BinaryFormat.version else {
            throw impl.error(.unsupportedVersion, at: 1, "format version \(bytes[1]) is not supported; this reader knows version \(BinaryFormat.version)")
        }
        var end = 2
        let value = try impl.decodeValue(T.self, at: &end)
        guard end == bytes.count else {
            throw impl.error(.trailingBytes, at: end, "\(bytes.count - end) bytes remain after the top-level value")
        }
        return value
    }
}

/// A keyed container's sequential-read position: its identity and next entry offset.
struct Cursor {
    var id: Int
    var at: Int
}

/// An array position in the coding path: the element `index`, entered when the path had
/// `position` keys.
struct IndexMark {
    var position: Int
    var index: Int
}

/// An open keyed container: identity, cursor slot, first entry, end, entry count.
struct KeyedFrame {
    var id = 0
    var slot = 0
    var first = 0
    var end = 0
    var count = 0
}

struct DecoderState {
    var pos = 0
    var depth = 0
    /// The coding path's keys; array positions are kept apart in `marks` (see ``DecoderImpl/codingPath``).
    var keys: [any CodingKey] = []
    var marks: [IndexMark] = []
    /// Sequential-read cursors of open keyed containers, by depth: `cursorCapacity` of them.
    var cursors: UnsafeMutablePointer<Cursor>
    var cursorCapacity: Int
    var nextID = 1
    /// The keyed container of the value being decoded by the current `init(from:)`, which
    /// reused containers read (see ``FrameContainers``), and whether reuse is on.
    var frame = KeyedFrame()
    var frames = FrameContainers()
    var reuse = false
}

final class DecoderImpl: Decoder {
    let base: UnsafeRawBufferPointer
    let end: Int
    let maxDepth: Int
    /// Mutable state behind a pointer, for the reason given at ``EncoderState``.
    let state: UnsafeMutablePointer<DecoderState>

    /// Start of the value the current `init(from:)` is decoding.
    var pos: Int {
        get { state.pointee.pos }
        set { state.pointee.pos = newValue }
    }
    var depth: Int {
        get { state.pointee.depth }
        set { state.pointee.depth = newValue }
    }
    /// The keys on the way to the value being decoded, with array positions put back where they
    /// were entered. Positions are kept as plain numbers beside the keys, not as keys in the path,
    /// so that decoding an array element costs no existential in an array; the path is only
    /// assembled when something asks for it (an error, mostly).
    var codingPath: [any CodingKey] {
        let keys = state.pointee.keys
        let marks = state.pointee.marks
        if marks.isEmpty { return keys }
        var path: [any CodingKey] = []
        path.reserveCapacity(keys.count + marks.count)
        var m = 0
        for i in 0...keys.count {
            while m < marks.count && marks[m].position == i {
                path.append(IndexKey(marks[m].index))
                m += 1
            }
            if i < keys.count { path.append(keys[i]) }
        }
        return path
    }
    /// The sequential-read cursor of the keyed container at `slot` (its depth), if it has one.
    @inline(__always) func cursor(_ slot: Int, _ id: Int) -> Int? {
        guard slot < state.pointee.cursorCapacity, state.pointee.cursors[slot].id == id else { return nil }
        return state.pointee.cursors[slot].at
    }

    @inline(__always) func setCursor(_ slot: Int, _ id: Int, _ at: Int) {
        guard slot < state.pointee.cursorCapacity, state.pointee.cursors[slot].id == id else { return }
        state.pointee.cursors[slot].at = at
    }
    var nextID: Int {
        get { state.pointee.nextID }
        set { state.pointee.nextID = newValue }
    }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    init(bytes: UnsafeRawBufferPointer, maxDepth: Int) {
        base = bytes
        end = bytes.count
        self.maxDepth = maxDepth
        state = .allocate(capacity: 1)
        let cursors = UnsafeMutablePointer<Cursor>.allocate(capacity: 16)
        cursors.initialize(repeating: Cursor(id: 0, at: 0), count: 16)
        state.initialize(to: DecoderState(cursors: cursors, cursorCapacity: 16))
    }

    deinit {
        state.pointee.cursors.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    func error(_ code: CodecError.Code, at offset: Int, _ detail: String, path: [any CodingKey]? = nil) -> CodecError {
        CodecError(code, offset: offset, path: renderPath(path ?? codingPath), detail: detail)
    }

    // MARK: reading primitives

    @inline(__always) func byte(_ at: Int) throws -> UInt8 {
        guard at < end else { throw error(.truncated, at: at, "input ended where a value was expected") }
        return base[at]
    }

    @inline(__always) func varint(_ at: inout Int) throws -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard at < end else { throw error(.truncated, at: at, "input ended inside a varint") }
            let b = base[at]
            at += 1
            if shift == 63 && b > 1 {
                throw error(.valueOutOfRange, at: at - 1, "varint does not fit in 64 bits")
            }
            result |= UInt64(b & 0x7F) << shift
            if b < 0x80 { return result }
            shift += 7
            if shift > 63 { throw error(.valueOutOfRange, at: at - 1, "varint is longer than 10 bytes") }
        }
    }

    /// Reads a length and checks that that many bytes remain.
    @inline(__always) func length(_ at: inout Int) throws -> Int {
        let start = at
        let n = try varint(&at)
        guard n <= UInt64(end - at) else {
            throw error(.lengthMismatch, at: start, "declared length \(n) exceeds the \(end - at) bytes that remain")
        }
        return Int(n)
    }

    @inline(__always) func expect(_ tag: UInt8, _ want: UInt8, _ at: Int, _ type: String) throws {
        guard tag == want else { throw mismatch(tag, at, type) }
    }

    func mismatch(_ tag: UInt8, _ at: Int, _ type: String) -> CodecError {
        if tag > Tag.map {
            return error(.unknownTag, at: at, "byte 0x\(String(tag, radix: 16)) is not a value tag")
        }
        return error(.typeMismatch, at: at, "expected \(type), found \(Tag.name(tag))")
    }

    func readSigned(_ at: inout Int, _ type: Any.Type) throws -> Int64 {
        let start = at
        let tag = try byte(at)
        at += 1
        if tag == Tag.int {
            let z = try varint(&at)
            return Int64(bitPattern: (z >> 1) ^ (0 &- (z & 1)))
        }
        if tag == Tag.uint {
            let u = try varint(&at)
            guard u <= UInt64(Int64.max) else { throw error(.valueOutOfRange, at: start, "\(u) does not fit in \(type)") }
            return Int64(u)
        }
        throw mismatch(tag, start, "\(type)")
    }

    func readUnsigned(_ at: inout Int, _ type: Any.Type) throws -> UInt64 {
        let start = at
        let tag = try byte(at)
        at += 1
        if tag == Tag.uint { return try varint(&at) }
        if tag == Tag.int {
            let z = try varint(&at)
            let v = Int64(bitPattern: (z >> 1) ^ (0 &- (z & 1)))
            guard v >= 0 else { throw error(.valueOutOfRange, at: start, "\(v) does not fit in \(type)") }
            return UInt64(v)
        }
        throw mismatch(tag, start, "\(type)")
    }

    func readInt<I: FixedWidthInteger>(_ at: inout Int, _ type: I.Type) throws -> I {
        let start = at
        if I.isSigned {
            let v = try readSigned(&at, I.self)
            guard let r = I(exactly: v) else { throw error(.valueOutOfRange, at: start, "\(v) does not fit in \(I.self)") }
            return r
        } else {
            let v = try readUnsigned(&at, I.self)
            guard let r = I(exactly: v) else { throw error(.valueOutOfRange, at: start, "\(v) does not fit in \(I.self)") }
            return r
        }
    }

    @inline(__always) func fixed64(_ at: inout Int) throws -> UInt64 {
        guard end - at >= 8 else { throw error(.truncated, at: at, "input ended inside an 8-byte number") }
        let v = base.loadUnaligned(fromByteOffset: at, as: UInt64.self)
        at += 8
        return UInt64(littleEndian: v)
    }

    @inline(__always) func fixed32(_ at: inout Int) throws -> UInt32 {
        guard end - at >= 4 else { throw error(.truncated, at: at, "input ended inside a 4-byte number") }
        let v = base.loadUnaligned(fromByteOffset: at, as: UInt32.self)
        at += 4
        return UInt32(littleEndian: v)
    }

    func readDouble(_ at: inout Int) throws -> Double {
        let start = at
        let tag = try byte(at)
        at += 1
        if tag == Tag.float64 { return Double(bitPattern: try fixed64(&at)) }
        if tag == Tag.float32 { return Double(Float(bitPattern: try fixed32(&at))) }
        throw mismatch(tag, start, "Double")
    }

    func readFloat(_ at: inout Int) throws -> Float {
        let start = at
        let tag = try byte(at)
        at += 1
        if tag == Tag.float32 { return Float(bitPattern: try fixed32(&at)) }
        if tag == Tag.float64 { return Float(Double(bitPattern: try fixed64(&at))) }
        throw mismatch(tag, start, "Float")
    }

    func readBool(_ at: inout Int) throws -> Bool {
        let tag = try byte(at)
        if tag == Tag.trueValue { at += 1; return true }
        if tag == Tag.falseValue { at += 1; return false }
        throw mismatch(tag, at, "Bool")
    }

    func readString(_ at: inout Int) throws -> String {
        let start = at
        let tag = try byte(at)
        guard tag == Tag.string else { throw mismatch(tag, start, "String") }
        at += 1
        let n = try length(&at)
        let bytes = UnsafeRawBufferPointer(rebasing: base[at..<(at + n)])
        var ascii = true
        for b in bytes where b >= 0x80 {
            ascii = false
            break
        }
        let s: String
        if ascii {
            // ASCII is valid UTF-8; the generic validating initializer costs more than the copy.
            s = String(decoding: bytes, as: UTF8.self)
        } else {
            guard let valid = String(validating: bytes.bindMemory(to: UInt8.self), as: UTF8.self) else {
                throw error(.invalidUTF8, at: at, "string of \(n) bytes is not valid UTF-8")
            }
            s = valid
        }
        at += n
        return s
    }

    func readBytes(_ at: inout Int) throws -> UnsafeRawBufferPointer {
        let start = at
        let tag = try byte(at)
        guard tag == Tag.bytes else { throw mismatch(tag, start, "bytes") }
        at += 1
        let n = try length(&at)
        let slice = UnsafeRawBufferPointer(rebasing: base[at..<(at + n)])
        at += n
        return slice
    }

    /// Returns the offset just past the value at `at`, without decoding it.
    func skip(_ at: Int) throws -> Int {
        var p = at
        let tag = try byte(p)
        p += 1
        switch tag {
        case Tag.null, Tag.falseValue, Tag.trueValue: return p
        case Tag.int, Tag.uint: _ = try varint(&p); return p
        case Tag.float32: guard end - p >= 4 else { throw error(.truncated, at: p, "input ended inside a float") }; return p + 4
        case Tag.float64: guard end - p >= 8 else { throw error(.truncated, at: p, "input ended inside a double") }; return p + 8
        case Tag.string, Tag.bytes, Tag.array, Tag.map:
            let n = try length(&p)
            return p + n
        default:
            throw error(.unknownTag, at: at, "byte 0x\(String(tag, radix: 16)) is not a value tag")
        }
    }

    /// Opens the container at `at`: returns (first entry offset, end offset, count).
    func openContainer(_ tag: UInt8, at: Int, _ what: String) throws -> (first: Int, end: Int, count: Int) {
        var p = at
        let t = try byte(p)
        guard t == tag else { throw mismatch(t, at, what) }
        p += 1
        let bodyLength = try length(&p)
        let bodyEnd = p + bodyLength
        let countAt = p
        let count = try varint(&p)
        guard p <= bodyEnd, count <= UInt64(bodyEnd - p) else {
            throw error(.lengthMismatch, at: countAt, "container declares \(count) entries in \(bodyLength) bytes")
        }
        return (p, bodyEnd, Int(count))
    }

    // MARK: values

    /// Decodes the value at `p` and moves `p` just past it. (The offset is passed in and out
    /// rather than returned with the value: a `(T, Int)` result needs generic tuple metadata,
    /// looked up in a locked runtime table on every call.)
    func decodeValue<T: Decodable>(_ type: T.Type, at p: inout Int) throws -> T {
        if T.self == [UInt8].self { return [UInt8](try readBytes(&p)) as! T }
        if T.self == Data.self { return Data(try readBytes(&p)) as! T }
        if T.self == String.self { return try readString(&p) as! T }
        if T.self == Int.self { return try readInt(&p, Int.self) as! T }
        if T.self == Double.self { return try readDouble(&p) as! T }
        if T.self == Bool.self { return try readBool(&p) as! T }
        let at = p
        guard depth < maxDepth else {
            throw error(.nestingTooDeep, at: at, "containers nest deeper than the limit of \(maxDepth)")
        }
        depth += 1
        defer { depth -= 1 }
        if at < end, base[at] == Tag.array, let arrayType = T.self as? any DecodableArray.Type {
            // An array, decoded here rather than by the standard library's `init(from:)`,
            // which looks up the array's generic metadata again for every element it appends.
            let (first, bodyEnd, count) = try openContainer(Tag.array, at: at, "an unkeyed container (array)")
            var elements = UnkeyedDecoder(impl: self, cursor: first, end: bodyEnd, count: count, storedPath: nil)
            let value = try arrayType.decodeElements(&elements) as! T
            p = bodyEnd
            return value
        }
        // The value's extent is known before it is decoded, so that the value can be built
        // straight into the caller's memory.
        p = try skip(at)
        let savedPos = pos
        let savedFrame = state.pointee.frame
        pos = at
        // Restored also when the value throws: a type may catch its field's error and go on.
        defer {
            pos = savedPos
            state.pointee.frame = savedFrame
        }
        do {
            return try T(from: self)
        } catch let error as CodecError {
            throw error
        } catch {
            throw self.error(.rejectedByType, at: at, "\(T.self) refused the value: \(error)")
        }
    }

    /// The keyed container of the value being decoded (only the value's own `init(from:)` calls
    /// this; nested and super containers go through ``keyedContainer(_:path:)``). It becomes the
    /// frame, and the container handed out reads its position from there, so one container
    /// per key type serves every value of that type.
    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        state.pointee.frame = try openKeyed()
        if state.pointee.reuse, let box = state.pointee.frames.box(for: ObjectIdentifier(Key.self)) {
            return unsafeBitCast(box, to: KeyedDecodingContainer<Key>.self)
        }
        return makeFrameContainer(Key.self)
    }

    @inline(never)
    func makeFrameContainer<Key: CodingKey>(_ type: Key.Type) -> KeyedDecodingContainer<Key> {
        guard state.pointee.reuse, !state.pointee.frames.isFull else {
            return KeyedDecodingContainer(KeyedDecoder<Key>(impl: self, frame: nil, storedPath: nil))
        }
        let names = KeyNames.applies(to: Key.self) ? KeyNames.allocate() : nil
        let made = KeyedDecodingContainer(KeyedDecoder<Key>(impl: self, frame: nil, storedPath: nil, names: names))
        state.pointee.frames.add(ObjectIdentifier(Key.self), unsafeBitCast(made, to: AnyObject.self), memory: names.map { UnsafeMutableRawPointer($0) })
        return made
    }

    /// A keyed container over the map at `pos` that holds its own position.
    func keyedContainer<Key: CodingKey>(_ type: Key.Type, path: [any CodingKey]?) throws -> KeyedDecodingContainer<Key> {
        KeyedDecodingContainer(KeyedDecoder<Key>(impl: self, frame: try openKeyed(), storedPath: path))
    }

    /// Opens the map at `pos` and starts its sequential-read cursor.
    func openKeyed() throws -> KeyedFrame {
        let (first, bodyEnd, count) = try openContainer(Tag.map, at: pos, "a keyed container (struct, class or enum)")
        let id = nextID
        nextID &+= 1
        let slot = depth
        if slot >= state.pointee.cursorCapacity {
            let capacity = Swift.max(slot + 1, state.pointee.cursorCapacity * 2)
            let bigger = UnsafeMutablePointer<Cursor>.allocate(capacity: capacity)
            bigger.initialize(repeating: Cursor(id: 0, at: 0), count: capacity)
            bigger.update(from: state.pointee.cursors, count: state.pointee.cursorCapacity)
            state.pointee.cursors.deallocate()
            state.pointee.cursors = bigger
            state.pointee.cursorCapacity = capacity
        }
        state.pointee.cursors[slot] = Cursor(id: id, at: first)
        return KeyedFrame(id: id, slot: slot, first: first, end: bodyEnd, count: count)
    }

    /// Whether `KeyedDecodingContainer` is a single reference to its box (see ``FrameContainers``).
    static let reusesContainers: Bool = {
        guard MemoryLayout<KeyedDecodingContainer<NamedKey>>.size == MemoryLayout<AnyObject>.size,
              MemoryLayout<KeyedDecodingContainer<NamedKey>>.alignment == MemoryLayout<AnyObject>.alignment else { return false }
        let document: [UInt8] = [Tag.map, 4, 1, 1, UInt8(ascii: "k"), Tag.trueValue]
        return document.withUnsafeBytes { bytes in
            let impl = DecoderImpl(bytes: bytes, maxDepth: 2)
            guard let made = try? impl.keyedContainer(NamedKey.self, path: nil) else { return false }
            let back = unsafeBitCast(unsafeBitCast(made, to: AnyObject.self), to: KeyedDecodingContainer<NamedKey>.self)
            return (try? back.decode(Bool.self, forKey: NamedKey("k"))) == true
        }
    }()

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let (first, bodyEnd, count) = try openContainer(Tag.array, at: pos, "an unkeyed container (array)")
        return UnkeyedDecoder(impl: self, cursor: first, end: bodyEnd, count: count, storedPath: nil)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        SingleValueDecoder(impl: self, at: pos, storedPath: nil)
    }
}

/// What a keyed container that is not the coder's current frame holds: its own position and,
/// when it differs from the coder's, its coding path.
final class OwnPosition {
    let frame: KeyedFrame
    /// Set only for containers nested by key. Others read the coder's path, so that no
    /// container holds a copy of it and extending the path never copies the array.
    let path: [any CodingKey]?

    init(frame: KeyedFrame, path: [any CodingKey]?) {
        self.frame = frame
        self.path = path
    }
}

struct KeyedDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let impl: DecoderImpl
    /// The container's own position, or nil for a reused container, which reads the coder's
    /// frame. One optional reference rather than the fields themselves: the standard library's
    /// box copies the container for every value decoded through it, so it is kept small.
    let own: OwnPosition?
    /// Encoded names by key value (see ``KeyNames``), for reused containers of plain-value keys.
    let names: UnsafeMutablePointer<UInt8>?

    @inline(__always) var frame: KeyedFrame { own?.frame ?? impl.state.pointee.frame }
    var id: Int { frame.id }
    var slot: Int { frame.slot }
    var first: Int { frame.first }
    var end: Int { frame.end }
    var count: Int { frame.count }
    var codingPath: [any CodingKey] { own?.path ?? impl.codingPath }

    init(impl: DecoderImpl, frame: KeyedFrame?, storedPath: [any CodingKey]?, names: UnsafeMutablePointer<UInt8>? = nil) {
        self.impl = impl
        self.own = frame.map { OwnPosition(frame: $0, path: storedPath) }
        self.names = names
    }

    /// Reads the key at `at`; returns its byte range and the offset of its value.
    @inline(__always) func keyAt(_ at: Int) throws -> (start: Int, count: Int, value: Int) {
        var p = at
        let n = try impl.length(&p)
        guard p + n <= end else { throw impl.error(.lengthMismatch, at: at, "key runs past the end of its container", path: codingPath) }
        return (p, n, p + n)
    }

    @inline(__always) func matches(_ key: Key, _ start: Int, _ n: Int) -> Bool {
        matches(name: key.stringValue, start, n)
    }

    @inline(__always) func matches(name: String, _ start: Int, _ n: Int) -> Bool {
        var name = name
        return name.withUTF8 { utf8 in
            utf8.count == n && (n == 0 || memcmp(utf8.baseAddress!, impl.base.baseAddress! + start, n) == 0)
        }
    }

    /// The key's name as written (varint length and UTF-8), from the name table, if it has one.
    @inline(__always) func writtenName(_ key: Key) -> UnsafeMutablePointer<UInt8>? {
        guard let names, let entry = KeyNames.entry(for: key, in: names) else { return nil }
        if entry[0] == 0 {
            var name = key.stringValue
            name.withUTF8 { utf8 in
                let header = varintSize(UInt64(utf8.count))
                guard header + utf8.count < KeyNames.entrySize else { return }
                var v = UInt64(utf8.count)
                var i = 1
                while v >= 0x80 {
                    entry[i] = UInt8(truncatingIfNeeded: v) | 0x80
                    v >>= 7
                    i += 1
                }
                entry[i] = UInt8(v)
                (entry + i + 1).update(from: utf8.baseAddress!, count: utf8.count)
                entry[0] = UInt8(header + utf8.count)
            }
        }
        return entry[0] == 0 ? nil : entry
    }

    /// Finds the value offset for `key`: first at the sequential cursor, then by scanning.
    func find(_ key: Key) throws -> Int? {
        let f = frame
        if let at = impl.cursor(f.slot, f.id) {
            if at < f.end {
                if let name = writtenName(key) {
                    // Compare the written name, length included, with the bytes at the cursor.
                    let n = Int(name[0])
                    if n <= f.end - at {
                        var i = 0
                        while i < n && impl.base[at &+ i] == name[1 &+ i] { i &+= 1 }
                        if i == n { return at + n }
                    }
                } else {
                    let k = try keyAt(at)
                    if matches(key, k.start, k.count) { return k.value }
                }
            }
        }
        var p = f.first
        for _ in 0..<f.count {
            guard p < f.end else { break }
            let k = try keyAt(p)
            if matches(key, k.start, k.count) { return k.value }
            p = try impl.skip(k.value)
        }
        return nil
    }

    func require(_ key: Key) throws -> Int {
        guard let at = try find(key) else {
            throw impl.error(.keyNotFound, at: first, "no entry for key \"\(key.stringValue)\"", path: codingPath + [key])
        }
        return at
    }

    @inline(__always) func advance(_ next: Int) {
        let f = frame
        impl.setCursor(f.slot, f.id, next)
    }

    var allKeys: [Key] {
        var keys: [Key] = []
        var p = first
        for _ in 0..<count {
            guard p < end, let k = try? keyAt(p) else { break }
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: impl.base[k.start..<(k.start + k.count)]), as: UTF8.self)
            if let key = Key(stringValue: name) { keys.append(key) }
            guard let next = try? impl.skip(k.value) else { break }
            p = next
        }
        return keys
    }

    func contains(_ key: Key) -> Bool { (try? find(key)) != nil }

    func decodeNil(forKey key: Key) throws -> Bool {
        let at = try require(key)
        return try impl.byte(at) == Tag.null
    }

    @inline(__always) func primitive<T>(_ key: Key, _ read: (inout Int) throws -> T) throws -> T {
        var p = try require(key)
        do {
            let v = try read(&p)
            advance(p)
            return v
        } catch let e as CodecError {
            throw CodecError(e.code, offset: e.offset, path: renderPath(codingPath + [key]), detail: e.detail)
        }
    }

    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try primitive(key) { try impl.readBool(&$0) } }
    func decode(_ type: String.Type, forKey key: Key) throws -> String { try primitive(key) { try impl.readString(&$0) } }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try primitive(key) { try impl.readDouble(&$0) } }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { try primitive(key) { try impl.readFloat(&$0) } }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try primitive(key) { try impl.readInt(&$0, Int.self) } }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try primitive(key) { try impl.readInt(&$0, Int8.self) } }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try primitive(key) { try impl.readInt(&$0, Int16.self) } }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try primitive(key) { try impl.readInt(&$0, Int32.self) } }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try primitive(key) { try impl.readInt(&$0, Int64.self) } }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try primitive(key) { try impl.readInt(&$0, UInt.self) } }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try primitive(key) { try impl.readInt(&$0, UInt8.self) } }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try primitive(key) { try impl.readInt(&$0, UInt16.self) } }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try primitive(key) { try impl.readInt(&$0, UInt32.self) } }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try primitive(key) { try impl.readInt(&$0, UInt64.self) } }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        var next = try require(key)
        impl.state.pointee.keys.append(key)
        defer { impl.state.pointee.keys.removeLast() }
        let value = try impl.decodeValue(T.self, at: &next)
        advance(next)
        return value
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        let at = try require(key)
        advance(try impl.skip(at))
        let saved = impl.pos
        impl.pos = at
        defer { impl.pos = saved }
        impl.depth += 1
        defer { impl.depth -= 1 }
        guard impl.depth < impl.maxDepth else { throw impl.error(.nestingTooDeep, at: at, "containers nest deeper than the limit of \(impl.maxDepth)") }
        return try impl.keyedContainer(NestedKey.self, path: codingPath + [key])
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        let at = try require(key)
        advance(try impl.skip(at))
        let (firstAt, bodyEnd, n) = try impl.openContainer(Tag.array, at: at, "an unkeyed container (array)")
        return UnkeyedDecoder(impl: impl, cursor: firstAt, end: bodyEnd, count: n, storedPath: codingPath + [key])
    }

    /// The value under the key "super", which the key type need not have (as with `JSONDecoder`).
    func superDecoder() throws -> any Decoder {
        let f = frame
        var p = f.first
        for _ in 0..<f.count {
            guard p < f.end else { break }
            let k = try keyAt(p)
            if matches(name: "super", k.start, k.count) {
                advance(try impl.skip(k.value))
                return ValueDecoder(impl: impl, at: k.value, storedPath: codingPath + [NamedKey("super")])
            }
            p = try impl.skip(k.value)
        }
        throw impl.error(.keyNotFound, at: f.first, "no entry for key \"super\"", path: codingPath + [NamedKey("super")])
    }

    func superDecoder(forKey key: Key) throws -> any Decoder {
        let at = try require(key)
        advance(try impl.skip(at))
        return ValueDecoder(impl: impl, at: at, storedPath: codingPath + [key])
    }
}

/// Arrays the decoder fills itself (see ``DecoderImpl/decodeValue(_:at:)``).
protocol DecodableArray {
    static func decodeElements(_ elements: inout UnkeyedDecoder) throws -> Self
}

extension Array: DecodableArray where Element: Decodable {
    /// Decodes every element, as the standard library's `init(from:)` does.
    static func decodeElements(_ elements: inout UnkeyedDecoder) throws -> [Element] {
        var array: [Element] = []
        // Room for every element, but never more memory than the input that remains.
        let stride = Swift.max(1, MemoryLayout<Element>.stride)
        array.reserveCapacity(Swift.min(elements.total, (elements.end - elements.cursor) / stride))
        while !elements.isAtEnd {
            array.append(try elements.decode(Element.self))
        }
        return array
    }
}

struct UnkeyedDecoder: UnkeyedDecodingContainer {
    let impl: DecoderImpl
    var cursor: Int
    let end: Int
    let total: Int
    /// Set only for containers whose path differs from the coder's current one (nested by key).
    /// Others read the coder's path, so that no container holds a copy of it and extending
    /// the path never copies the array.
    let storedPath: [any CodingKey]?
    var codingPath: [any CodingKey] { storedPath ?? impl.codingPath }
    var currentIndex = 0
    var count: Int? { total }
    var isAtEnd: Bool { currentIndex >= total }

    init(impl: DecoderImpl, cursor: Int, end: Int, count: Int, storedPath: [any CodingKey]?) {
        self.impl = impl
        self.cursor = cursor
        self.end = end
        self.total = count
        self.storedPath = storedPath
    }

    @inline(__always) func check() throws {
        guard currentIndex < total else {
            throw impl.error(.endOfContainer, at: cursor, "array has \(total) elements; element \(currentIndex) was requested", path: codingPath)
        }
    }

    @inline(__always) mutating func primitive<T>(_ read: (inout Int) throws -> T) throws -> T {
        try check()
        var p = cursor
        let v = try read(&p)
        guard p <= end else { throw impl.error(.lengthMismatch, at: cursor, "element runs past the end of its array", path: codingPath) }
        cursor = p
        currentIndex += 1
        return v
    }

    mutating func decodeNil() throws -> Bool {
        try check()
        if try impl.byte(cursor) == Tag.null {
            cursor += 1
            currentIndex += 1
            return true
        }
        return false
    }

    mutating func decode(_ type: Bool.Type) throws -> Bool { try primitive { [impl] in try impl.readBool(&$0) } }
    mutating func decode(_ type: String.Type) throws -> String { try primitive { [impl] in try impl.readString(&$0) } }
    mutating func decode(_ type: Double.Type) throws -> Double { try primitive { [impl] in try impl.readDouble(&$0) } }
    mutating func decode(_ type: Float.Type) throws -> Float { try primitive { [impl] in try impl.readFloat(&$0) } }
    mutating func decode(_ type: Int.Type) throws -> Int { try primitive { [impl] in try impl.readInt(&$0, Int.self) } }
    mutating func decode(_ type: Int8.Type) throws -> Int8 { try primitive { [impl] in try impl.readInt(&$0, Int8.self) } }
    mutating func decode(_ type: Int16.Type) throws -> Int16 { try primitive { [impl] in try impl.readInt(&$0, Int16.self) } }
    mutating func decode(_ type: Int32.Type) throws -> Int32 { try primitive { [impl] in try impl.readInt(&$0, Int32.self) } }
    mutating func decode(_ type: Int64.Type) throws -> Int64 { try primitive { [impl] in try impl.readInt(&$0, Int64.self) } }
    mutating func decode(_ type: UInt.Type) throws -> UInt { try primitive { [impl] in try impl.readInt(&$0, UInt.self) } }
    mutating func decode(_ type: UInt8.Type) throws -> UInt8 { try primitive { [impl] in try impl.readInt(&$0, UInt8.self) } }
    mutating func decode(_ type: UInt16.Type) throws -> UInt16 { try primitive { [impl] in try impl.readInt(&$0, UInt16.self) } }
    mutating func decode(_ type: UInt32.Type) throws -> UInt32 { try primitive { [impl] in try impl.readInt(&$0, UInt32.self) } }
    mutating func decode(_ type: UInt64.Type) throws -> UInt64 { try primitive { [impl] in try impl.readInt(&$0, UInt64.self) } }

    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try check()
        impl.state.pointee.marks.append(IndexMark(position: impl.state.pointee.keys.count, index: currentIndex))
        defer { impl.state.pointee.marks.removeLast() }
        var next = cursor
        let value = try impl.decodeValue(T.self, at: &next)
        guard next <= end else { throw impl.error(.lengthMismatch, at: cursor, "element runs past the end of its array", path: codingPath) }
        cursor = next
        currentIndex += 1
        return value
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        try check()
        let at = cursor
        cursor = try impl.skip(at)
        currentIndex += 1
        let saved = impl.pos
        impl.pos = at
        defer { impl.pos = saved }
        impl.depth += 1
        defer { impl.depth -= 1 }
        guard impl.depth < impl.maxDepth else { throw impl.error(.nestingTooDeep, at: at, "containers nest deeper than the limit of \(impl.maxDepth)") }
        return try impl.keyedContainer(NestedKey.self, path: codingPath + [IndexKey(currentIndex - 1)])
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        try check()
        let at = cursor
        cursor = try impl.skip(at)
        currentIndex += 1
        let (firstAt, bodyEnd, n) = try impl.openContainer(Tag.array, at: at, "an unkeyed container (array)")
        return UnkeyedDecoder(impl: impl, cursor: firstAt, end: bodyEnd, count: n, storedPath: codingPath + [IndexKey(currentIndex - 1)])
    }

    mutating func superDecoder() throws -> any Decoder {
        try check()
        let at = cursor
        cursor = try impl.skip(at)
        currentIndex += 1
        return ValueDecoder(impl: impl, at: at, storedPath: nil)
    }
}

struct SingleValueDecoder: SingleValueDecodingContainer {
    let impl: DecoderImpl
    let at: Int
    /// Set only for containers whose path differs from the coder's current one (nested by key).
    /// Others read the coder's path, so that no container holds a copy of it and extending
    /// the path never copies the array.
    let storedPath: [any CodingKey]?
    var codingPath: [any CodingKey] { storedPath ?? impl.codingPath }

    @inline(__always) func read<T>(_ body: (inout Int) throws -> T) throws -> T {
        var p = at
        return try body(&p)
    }

    func decodeNil() -> Bool { (try? impl.byte(at)) == Tag.null }
    func decode(_ type: Bool.Type) throws -> Bool { try read { try impl.readBool(&$0) } }
    func decode(_ type: String.Type) throws -> String { try read { try impl.readString(&$0) } }
    func decode(_ type: Double.Type) throws -> Double { try read { try impl.readDouble(&$0) } }
    func decode(_ type: Float.Type) throws -> Float { try read { try impl.readFloat(&$0) } }
    func decode(_ type: Int.Type) throws -> Int { try read { try impl.readInt(&$0, Int.self) } }
    func decode(_ type: Int8.Type) throws -> Int8 { try read { try impl.readInt(&$0, Int8.self) } }
    func decode(_ type: Int16.Type) throws -> Int16 { try read { try impl.readInt(&$0, Int16.self) } }
    func decode(_ type: Int32.Type) throws -> Int32 { try read { try impl.readInt(&$0, Int32.self) } }
    func decode(_ type: Int64.Type) throws -> Int64 { try read { try impl.readInt(&$0, Int64.self) } }
    func decode(_ type: UInt.Type) throws -> UInt { try read { try impl.readInt(&$0, UInt.self) } }
    func decode(_ type: UInt8.Type) throws -> UInt8 { try read { try impl.readInt(&$0, UInt8.self) } }
    func decode(_ type: UInt16.Type) throws -> UInt16 { try read { try impl.readInt(&$0, UInt16.self) } }
    func decode(_ type: UInt32.Type) throws -> UInt32 { try read { try impl.readInt(&$0, UInt32.self) } }
    func decode(_ type: UInt64.Type) throws -> UInt64 { try read { try impl.readInt(&$0, UInt64.self) } }

    func decode<T: Decodable>(_ type: T.Type) throws -> T {
        var p = at
        return try impl.decodeValue(T.self, at: &p)
    }
}

/// A `Decoder` positioned at one value, for `superDecoder()`.
struct ValueDecoder: Decoder {
    let impl: DecoderImpl
    let at: Int
    /// Set only for containers whose path differs from the coder's current one (nested by key).
    /// Others read the coder's path, so that no container holds a copy of it and extending
    /// the path never copies the array.
    let storedPath: [any CodingKey]?
    var codingPath: [any CodingKey] { storedPath ?? impl.codingPath }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        let saved = impl.pos
        impl.pos = at
        defer { impl.pos = saved }
        return try impl.keyedContainer(Key.self, path: storedPath)
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let (first, bodyEnd, n) = try impl.openContainer(Tag.array, at: at, "an unkeyed container (array)")
        return UnkeyedDecoder(impl: impl, cursor: first, end: bodyEnd, count: n, storedPath: nil)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        SingleValueDecoder(impl: impl, at: at, storedPath: nil)
    }
}
