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
        try document(value).withBytes { bytes in
            // One allocation of the exact size and one copy.
            [UInt8](unsafeUninitializedCapacity: bytes.count) { buffer, count in
                if let source = bytes.baseAddress, bytes.count > 0 {
                    buffer.baseAddress!.update(from: source, count: bytes.count)
                }
                count = bytes.count
            }
        }
    }

    /// Appends the document for `value` to `buffer`; on error `buffer` is left as it was.
    public func encode<T: Encodable>(_ value: T, into buffer: inout [UInt8]) throws {
        try document(value).withBytes { buffer.append(contentsOf: $0) }
    }

    /// Encodes `value` and calls `body` with the document's bytes, which are valid only
    /// during the call. This saves the copy into an array, for callers that compress or
    /// store the bytes at once.
    public func withEncoded<T: Encodable, R>(_ value: T, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try document(value).withBytes { try body(UnsafeRawBufferPointer($0)) }
    }

    /// An encoder holding the complete document for `value`.
    private func document<T: Encodable>(_ value: T) throws -> EncoderImpl {
        let impl = EncoderImpl()
        impl.state.pointee.reuse = EncoderImpl.reusesContainers
        // The kept containers refer back to the encoder: let them go once the value is written.
        defer { impl.state.pointee.frames.removeAll() }
        impl.byte(BinaryFormat.magic)
        impl.byte(BinaryFormat.version)
        try impl.encodeValue(value)
        return impl
    }
}

/// An open container: its identity, the offset of its reserved length byte, its element count.
/// (A struct, not a tuple: tuple metadata is looked up in a locked runtime table.)
struct OpenContainer {
    var id: Int
    var lengthAt: Int
    var count: Int
    /// Bytes reserved after the tag for the body length and count: 2, or 20 for the root.
    var reserved: Int
}

/// The encoder's mutable state. It lives behind a pointer rather than in stored class
/// properties: Swift checks exclusive access to a class's stored `var`s at run time on every
/// access, which cost a fifth of the encoding time; a pointee is not checked. The encoder is
/// used by one thread for one `encode` call, so there is nothing for those checks to catch.
///
/// The output is raw memory grown by doubling with `realloc`, not an `[UInt8]`: an array append
/// checks uniqueness and capacity per call, which was a large share of the time per field.
struct EncoderState {
    var out: UnsafeMutablePointer<UInt8>
    var count = 0
    var capacity: Int
    /// Where the document starts in `out`: the root container's header is written last, right
    /// before its body, so the bytes before it move right instead of the body (see ``close(downTo:)``).
    var docStart = 0
    /// Open containers, innermost last: `openCount` of them from `open`.
    var open: UnsafeMutablePointer<OpenContainer>
    var openCount = 0
    var openCapacity: Int
    var nextID = 1
    /// Where the value being encoded by the current `encode(to:)` call starts.
    var valueStart = -1
    /// The depth below which the current value's containers open (the open count when its
    /// `encode(to:)` was called), and the identity and depth of the container it asked for.
    var frameBase = 0
    var frameID = 0
    var frameDepth = -1
    /// Reusable keyed containers of the frame kind, by coding-key type (see ``FrameContainers``),
    /// and whether reuse is on (``EncoderImpl/reusesContainers``, read once per call).
    var frames = FrameContainers()
    var reuse = false
    var codingPath: [any CodingKey] = []
}

final class EncoderImpl: Encoder {
    let state: UnsafeMutablePointer<EncoderState>

    var count: Int {
        get { state.pointee.count }
        set { state.pointee.count = newValue }
    }
    var openCount: Int {
        get { state.pointee.openCount }
        set { state.pointee.openCount = newValue }
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

    init() {
        let capacity = 1024
        guard let out = malloc(capacity) else { fatalError("out of memory: cannot allocate \(capacity) bytes for an encoder") }
        state = .allocate(capacity: 1)
        state.initialize(to: EncoderState(out: out.assumingMemoryBound(to: UInt8.self), capacity: capacity,
                                          open: .allocate(capacity: 16), openCapacity: 16))
    }

    deinit {
        free(state.pointee.out)
        state.pointee.open.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// Calls `body` with the bytes written so far.
    func withBytes<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        try body(UnsafeBufferPointer(start: state.pointee.out + state.pointee.docStart, count: count - state.pointee.docStart))
    }

    func fail(_ detail: String) -> CodecError {
        CodecError(.unsupportedContainerUse, offset: count, path: renderPath(codingPath), detail: detail)
    }

    // MARK: primitives

    /// Makes room for `n` more bytes and returns where they go; the caller advances `count`.
    @inline(__always) func reserve(_ n: Int) -> UnsafeMutablePointer<UInt8> {
        if state.pointee.count &+ n > state.pointee.capacity { grow(n) }
        return state.pointee.out + state.pointee.count
    }

    private func grow(_ n: Int) {
        var capacity = state.pointee.capacity * 2
        while capacity < state.pointee.count + n { capacity *= 2 }
        let old = state.pointee.out
        let bigger: UnsafeMutableRawPointer?
        if state.pointee.capacity >= Self.alwaysMapped {
            // Both blocks are above glibc's largest mmap threshold, so the block is mapped and
            // `realloc` remaps its pages instead of copying them.
            bigger = realloc(old, capacity)
        } else {
            // Copied here rather than by `realloc`: glibc copies a block kept in an arena while
            // holding the arena's lock, which stalls every thread sharing that arena (an actor's
            // worker, while its checkpoint is encoded) for as long as the copy of megabytes takes.
            bigger = malloc(capacity)
            if let bigger {
                bigger.copyMemory(from: old, byteCount: state.pointee.count)
                free(old)
            }
        }
        guard let bigger else { fatalError("out of memory: cannot grow an encoder's buffer to \(capacity) bytes") }
        state.pointee.out = bigger.assumingMemoryBound(to: UInt8.self)
        state.pointee.capacity = capacity
    }

    /// glibc's largest mmap threshold (32 MiB on 64-bit systems): blocks this large are always mapped.
    static let alwaysMapped = 32 << 20

    @inline(__always) func byte(_ b: UInt8) {
        reserve(1).pointee = b
        count &+= 1
    }

    /// Writes `value` as a varint at `p`; returns the number of bytes written (at most 10).
    @inline(__always) static func put(_ value: UInt64, _ p: UnsafeMutablePointer<UInt8>) -> Int {
        var v = value
        var n = 0
        while v >= 0x80 {
            p[n] = UInt8(truncatingIfNeeded: v) | 0x80
            v >>= 7
            n &+= 1
        }
        p[n] = UInt8(truncatingIfNeeded: v)
        return n &+ 1
    }

    @inline(__always) func tagged(_ tag: UInt8, varint v: UInt64) {
        let p = reserve(11)
        p[0] = tag
        count &+= 1 &+ Self.put(v, p + 1)
    }

    @inline(__always) func int(_ v: Int64) {
        tagged(Tag.int, varint: UInt64(bitPattern: (v << 1) ^ (v >> 63)))
    }

    @inline(__always) func uint(_ v: UInt64) { tagged(Tag.uint, varint: v) }

    @inline(__always) func null() { byte(Tag.null) }

    @inline(__always) func bool(_ v: Bool) { byte(v ? Tag.trueValue : Tag.falseValue) }

    @inline(__always) func double(_ v: Double) {
        let p = reserve(9)
        p[0] = Tag.float64
        UnsafeMutableRawPointer(p + 1).storeBytes(of: v.bitPattern.littleEndian, as: UInt64.self)
        count &+= 9
    }

    @inline(__always) func float(_ v: Float) {
        let p = reserve(5)
        p[0] = Tag.float32
        UnsafeMutableRawPointer(p + 1).storeBytes(of: v.bitPattern.littleEndian, as: UInt32.self)
        count &+= 5
    }

    @inline(__always) func string(_ v: String) {
        byte(Tag.string)
        rawString(v)
    }

    /// Writes a varint byte count and the string's UTF-8.
    @inline(__always) func rawString(_ v: String) {
        if v.utf8.withContiguousStorageIfAvailable({ raw(UnsafeRawBufferPointer($0)) }) == nil {
            var s = v
            s.withUTF8 { raw(UnsafeRawBufferPointer($0)) }
        }
    }

    @inline(__always) func raw(_ bytes: UnsafeRawBufferPointer) {
        let n = bytes.count
        let p = reserve(n &+ 10)
        let header = Self.put(UInt64(n), p)
        if n <= 16 {
            // Field names and short strings: a loop beats a call to memmove.
            var i = 0
            while i < n {
                p[header &+ i] = bytes[i]
                i &+= 1
            }
        } else {
            UnsafeMutableRawPointer(p + header).copyMemory(from: bytes.baseAddress!, byteCount: n)
        }
        count &+= header &+ n
    }

    func bytes(_ v: UnsafeRawBufferPointer) {
        byte(Tag.bytes)
        raw(v)
    }

    /// Encodes any value, taking the byte fast paths and closing what it opens.
    func encodeValue<T: Encodable>(_ value: T) throws {
        if T.self == [UInt8].self {
            (value as! [UInt8]).withUnsafeBytes { bytes($0) }
            return
        }
        if T.self == Data.self {
            (value as! Data).withUnsafeBytes { bytes($0) }
            return
        }
        let depth = openCount
        let saved = (state.pointee.valueStart, state.pointee.frameBase, state.pointee.frameID, state.pointee.frameDepth)
        state.pointee.valueStart = count
        state.pointee.frameBase = depth
        try value.encode(to: self)
        if count == valueStart {
            // The value encoded nothing at all: represent it as an empty map, as JSON would `{}`.
            _ = openContainer(Tag.map)
        }
        close(downTo: depth)
        (state.pointee.valueStart, state.pointee.frameBase, state.pointee.frameID, state.pointee.frameDepth) = saved
    }

    // MARK: containers

    /// Whether a `KeyedEncodingContainer` is a single reference to its box, so that boxes can be
    /// kept and reused (see ``FrameContainers``). Checked once: the size, and a container
    /// turned into a reference and back still writes where it should.
    static let reusesContainers: Bool = {
        guard MemoryLayout<KeyedEncodingContainer<NamedKey>>.size == MemoryLayout<AnyObject>.size,
              MemoryLayout<KeyedEncodingContainer<NamedKey>>.alignment == MemoryLayout<AnyObject>.alignment else { return false }
        let impl = EncoderImpl()
        defer { impl.state.pointee.frames.removeAll() }
        let id = impl.openContainer(Tag.map)
        let made = KeyedEncodingContainer(KeyedEncoder<NamedKey>(impl: impl, id: id, depth: 0, storedPath: nil))
        var back = unsafeBitCast(unsafeBitCast(made, to: AnyObject.self), to: KeyedEncodingContainer<NamedKey>.self)
        guard (try? back.encode(true, forKey: NamedKey("k"))) != nil else { return false }
        impl.close(downTo: 0)
        return impl.withBytes { Array($0) } == [Tag.map, 4, 1, 1, UInt8(ascii: "k"), Tag.trueValue]
    }()

    /// Opens a container at the current position and returns its identity.
    func openContainer(_ tag: UInt8) -> Int {
        // Body length and element count, patched on close. The root reserves room for the
        // longest varints; any other container reserves a byte each and, if they turn out
        // longer, its body shifts right on close.
        let reserved = state.pointee.openCount == 0 ? 20 : 2
        let p = reserve(1 + reserved)
        p[0] = tag
        p[1] = 0
        p[2] = 0
        let lengthAt = count &+ 1
        count &+= 1 &+ reserved
        let id = nextID
        nextID &+= 1
        if state.pointee.openCount == state.pointee.openCapacity {
            let capacity = state.pointee.openCapacity * 2
            let bigger = UnsafeMutablePointer<OpenContainer>.allocate(capacity: capacity)
            bigger.moveInitialize(from: state.pointee.open, count: state.pointee.openCount)
            state.pointee.open.deallocate()
            state.pointee.open = bigger
            state.pointee.openCapacity = capacity
        }
        (state.pointee.open + state.pointee.openCount).initialize(to: OpenContainer(id: id, lengthAt: lengthAt, count: 0, reserved: reserved))
        state.pointee.openCount &+= 1
        return id
    }

    /// Closes every container above `depth`, writing its length and count.
    func close(downTo depth: Int) {
        while openCount > depth {
            openCount -= 1
            let c = state.pointee.open[openCount]
            let countBytes = varintSize(UInt64(c.count))
            let bodyStart = c.lengthAt + c.reserved
            let bodyLength = count - bodyStart + countBytes
            let lengthBytes = varintSize(UInt64(bodyLength))
            if c.reserved > 2 {
                // The root: write the header just before the body and move what precedes it
                // (magic, version, tag) up to meet it; the document then starts later in `out`.
                let out = state.pointee.out
                let slack = c.reserved - lengthBytes - countBytes
                let headerAt = out + c.lengthAt + slack
                let n = Self.put(UInt64(bodyLength), headerAt)
                _ = Self.put(UInt64(c.count), headerAt + n)
                let prefix = c.lengthAt - state.pointee.docStart
                memmove(out + state.pointee.docStart + slack, out + state.pointee.docStart, prefix)
                state.pointee.docStart += slack
                continue
            }
            let extra = lengthBytes + countBytes - 2
            if extra > 0 {
                // Make room for the longer varints: shift the body right.
                _ = reserve(extra)
                let out = state.pointee.out
                memmove(out + bodyStart + extra, out + bodyStart, count - bodyStart)
                count += extra
            }
            let at = state.pointee.out + c.lengthAt
            let n = Self.put(UInt64(bodyLength), at)
            _ = Self.put(UInt64(c.count), at + n)
        }
    }

    /// Makes the container `id` at `depth` the innermost open one, closing its finished children,
    /// and counts one more element in it.
    @inline(__always) func prepare(_ id: Int, _ depth: Int) throws {
        let open = state.pointee.open
        let n = state.pointee.openCount
        if n != depth &+ 1 || open[depth].id != id {
            guard depth >= 0, depth < n, open[depth].id == id else {
                throw fail("a container was written to after it was closed (a sibling container was used after it); encode fields one after the other")
            }
            close(downTo: depth + 1)
        }
        open[depth].count &+= 1
    }

    /// The number of elements written so far to container `id` at `depth`, or 0 if it is closed.
    func elementCount(_ id: Int, _ depth: Int) -> Int {
        depth >= 0 && depth < openCount && state.pointee.open[depth].id == id ? state.pointee.open[depth].count : 0
    }

    func requestContainer(_ tag: UInt8) throws -> (id: Int, depth: Int) {
        guard count == valueStart else {
            throw fail("a value asked its encoder for a second container; a value must encode into exactly one container")
        }
        let id = openContainer(tag)
        return (id, openCount - 1)
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        let framed = openCount == state.pointee.frameBase
        guard let (id, depth) = try? requestContainer(Tag.map) else {
            // `container(keyedBy:)` cannot throw; the invalid container reports on first use.
            return KeyedEncodingContainer(KeyedEncoder<Key>(impl: self, id: 0, depth: -1, storedPath: nil))
        }
        guard framed else {
            return KeyedEncodingContainer(KeyedEncoder<Key>(impl: self, id: id, depth: depth, storedPath: nil))
        }
        // The value's own container: its writes find it through the frame, so one container
        // per key type serves every value of that type.
        state.pointee.frameID = id
        state.pointee.frameDepth = depth
        if state.pointee.reuse, let box = state.pointee.frames.box(for: ObjectIdentifier(Key.self)) {
            return unsafeBitCast(box, to: KeyedEncodingContainer<Key>.self)
        }
        return makeFrameContainer(Key.self)
    }

    @inline(never)
    func makeFrameContainer<Key: CodingKey>(_ type: Key.Type) -> KeyedEncodingContainer<Key> {
        guard state.pointee.reuse, !state.pointee.frames.isFull else {
            return KeyedEncodingContainer(KeyedEncoder<Key>(impl: self, id: KeyedEncoder<Key>.frame, depth: 0, storedPath: nil))
        }
        // Keys that are plain values of at most 8 bytes (the enums synthesized for `CodingKeys`)
        // get a table of their encoded names, so each name is looked up once per document.
        var names: UnsafeMutablePointer<UInt8>?
        if KeyNames.applies(to: Key.self) { names = KeyNames.allocate() }
        let made = KeyedEncodingContainer(KeyedEncoder<Key>(impl: self, id: KeyedEncoder<Key>.frame, depth: 0, storedPath: nil, names: names))
        state.pointee.frames.add(ObjectIdentifier(Key.self), unsafeBitCast(made, to: AnyObject.self), memory: names.map { UnsafeMutableRawPointer($0) })
        return made
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
        SingleValueEncoder(impl: self, start: count, storedPath: nil)
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
    /// Encoded names by key value (see ``KeyNames``), for reused containers of plain-value keys.
    /// Assumes what every `CodingKey` in practice does: equal key values have equal names.
    var names: UnsafeMutablePointer<UInt8>? = nil

    init(impl: EncoderImpl, id: Int, depth: Int, storedPath: [any CodingKey]?, names: UnsafeMutablePointer<UInt8>? = nil) {
        self.impl = impl
        self.id = id
        self.depth = depth
        self.storedPath = storedPath
        self.names = names
    }

    /// The `id` of a container that stands for whichever value is being encoded: its identity
    /// and depth are the frame's (see ``EncoderState/frameID``).
    static var frame: Int { -1 }

    /// Counts one more entry in this container, making it the innermost open one.
    @inline(__always) func place() throws {
        if id == Self.frame {
            try impl.prepare(impl.state.pointee.frameID, impl.state.pointee.frameDepth)
        } else {
            guard depth >= 0 else { throw impl.fail("a value asked its encoder for a second container") }
            try impl.prepare(id, depth)
        }
    }

    @inline(__always) func entry(_ key: Key) throws {
        try place()
        guard let names else {
            impl.rawString(key.stringValue)
            return
        }
        guard let entry = KeyNames.entry(for: key, in: names) else {
            impl.rawString(key.stringValue)
            return
        }
        let n = Int(entry[0])
        if n > 0 {
            let p = impl.reserve(n)
            var i = 0
            while i < n {
                p[i] = entry[1 &+ i]
                i &+= 1
            }
            impl.count &+= n
            return
        }
        let start = impl.count
        impl.rawString(key.stringValue)
        let written = impl.count - start
        if written < KeyNames.entrySize {
            (entry + 1).update(from: impl.state.pointee.out + start, count: written)
            entry[0] = UInt8(written)
        }
    }

    mutating func encodeNil(forKey key: Key) throws { try entry(key); impl.null() }
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
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: nestedID, depth: impl.openCount - 1, storedPath: codingPath + [key]))
        } catch {
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: 0, depth: -1, storedPath: codingPath + [key]))
        }
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        do {
            try entry(key)
            let nestedID = impl.openContainer(Tag.array)
            return UnkeyedEncoder(impl: impl, id: nestedID, depth: impl.openCount - 1, storedPath: codingPath + [key])
        } catch {
            return UnkeyedEncoder(impl: impl, id: 0, depth: -1, storedPath: codingPath + [key])
        }
    }

    /// An encoder for the value under the key "super", which the key type need not have (as
    /// with `JSONEncoder`).
    mutating func superEncoder() -> any Encoder {
        do {
            try place()
            impl.rawString("super")
        } catch {
            // `superEncoder()` cannot throw; the value written through it lands nowhere useful,
            // and the next write to this container reports the misuse.
        }
        impl.valueStart = impl.count
        return impl
    }

    mutating func superEncoder(forKey key: Key) -> any Encoder {
        // The returned encoder writes the value at this entry; it must be used before this container is written to again.
        try? entry(key)
        impl.valueStart = impl.count
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
    var count: Int { impl.elementCount(id, depth) }

    @inline(__always) func element() throws {
        guard depth >= 0 else { throw impl.fail("a value asked its encoder for a second container") }
        try impl.prepare(id, depth)
    }

    mutating func encodeNil() throws { try element(); impl.null() }
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
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: nestedID, depth: impl.openCount - 1, storedPath: nil))
        } catch {
            return KeyedEncodingContainer(KeyedEncoder<NestedKey>(impl: impl, id: 0, depth: -1, storedPath: nil))
        }
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        do {
            try element()
            let nestedID = impl.openContainer(Tag.array)
            return UnkeyedEncoder(impl: impl, id: nestedID, depth: impl.openCount - 1, storedPath: nil)
        } catch {
            return UnkeyedEncoder(impl: impl, id: 0, depth: -1, storedPath: nil)
        }
    }

    mutating func superEncoder() -> any Encoder {
        try? element()
        impl.valueStart = impl.count
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
        guard impl.count == start, impl.valueStart == start else {
            throw impl.fail("a single-value container was written twice, or after another container")
        }
    }

    mutating func encodeNil() throws { try once(); impl.null() }
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
