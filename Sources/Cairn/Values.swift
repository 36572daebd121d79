import CairnCodec

/// Anything a task can take or return.
public typealias RemoteValue = Codable & Sendable

/// An object's value as a node holds it: the Swift value itself while it stays on the node
/// that made it, its encoding once it has crossed between nodes, or a failure.
enum StoredValue: Sendable {
    case boxed(any RemoteValue)
    case encoded([UInt8])
    /// An `Int`, the most common value to cross between nodes: it holds no reference, so it
    /// crosses as it is, without a heap allocation; its wire form is ``FastCodec``'s bytes.
    case int(Int)
    case failed(RemoteError)

    /// Bytes this value accounts for in a node's store.
    var size: Int {
        switch self {
        case .boxed(let v):
            // Compare type identities first: a dynamic cast on every stored object is costly.
            let type = ObjectIdentifier(Swift.type(of: v))
            if type == SizeProbe.bytes, let bytes = v as? [UInt8] { return bytes.count + 16 }
            if type == SizeProbe.string, let s = v as? String { return s.utf8.count + 16 }
            return 64
        case .encoded(let b): return b.count + 16
        case .int: return 16
        case .failed: return 128
        }
    }

    var failure: RemoteError? {
        if case .failed(let e) = self { return e }
        return nil
    }

    /// The value in a form a wire may carry, if that needs no coding (a boxed `Int` becomes
    /// ``int(_:)``); nil for any other boxed value. Never fails.
    var portableWithoutCoding: StoredValue? {
        switch self {
        case .boxed(let v):
            if ObjectIdentifier(Swift.type(of: v)) == SizeProbe.int, let i = v as? Int { return .int(i) }
            return nil
        case .encoded, .int, .failed: return self
        }
    }

    /// The form that may cross to another node: never a shared Swift reference.
    func portable() throws -> StoredValue {
        switch self {
        case .boxed(let v):
            if ObjectIdentifier(Swift.type(of: v)) == SizeProbe.int, let i = v as? Int {
                return .int(i)
            }
            do {
                return .encoded(try BinaryEncoder().encode(v))
            } catch {
                throw CairnError(.serialization, "cannot encode a \(type(of: v)) to send it to another node: \(error)")
            }
        case .encoded, .int, .failed: return self
        }
    }

    /// The bytes a wire or a log carries for a portable value; nil for a failure.
    func wireBytes() throws -> [UInt8]? {
        switch try portable() {
        case .encoded(let b): return b
        case .int(let i): return FastCodec.encode(i)
        case .failed: return nil
        case .boxed: preconditionFailure("portable() never returns a boxed value")
        }
    }

    /// The value as `T`.
    func value<T: RemoteValue>(as type: T.Type) throws -> T {
        switch self {
        case .boxed(let v):
            guard let t = v as? T else {
                throw CairnError(.typeMismatch, "the object holds a \(Swift.type(of: v)), not a \(T.self)")
            }
            return t
        case .int(let i):
            if let t = i as? T { return t }
            return try StoredValue.encoded(FastCodec.encode(i)).value(as: T.self)
        case .encoded(let bytes):
            if T.self == Int.self, let i = FastCodec.decodeInt(bytes) { return i as! T }
            do {
                return try BinaryDecoder().decode(T.self, from: bytes)
            } catch {
                throw CairnError(.typeMismatch, "the object's bytes do not decode as \(T.self): \(error)")
            }
        case .failed(let e):
            throw e
        }
    }
}

/// The binary format's encoding of a lone `Int`, without the `Codable` machinery: the most
/// common value to cross between nodes. Produces exactly the bytes ``BinaryEncoder`` does.
enum FastCodec {
    static func encode(_ value: Int) -> [UInt8] {
        var out: [UInt8] = [BinaryFormat.magic, BinaryFormat.version, 0x03]
        var z = UInt64(bitPattern: (Int64(value) << 1) ^ (Int64(value) >> 63))
        while z >= 0x80 {
            out.append(UInt8(truncatingIfNeeded: z) | 0x80)
            z >>= 7
        }
        out.append(UInt8(z))
        return out
    }

    /// The `Int` in `bytes`, or nil if they are anything but a well-formed lone int (the general decoder then reports why).
    static func decodeInt(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 4, bytes.count <= 13, bytes[0] == BinaryFormat.magic, bytes[1] == BinaryFormat.version, bytes[2] == 0x03 else { return nil }
        var z: UInt64 = 0
        var shift: UInt64 = 0
        for i in 3..<bytes.count {
            let b = bytes[i]
            guard shift < 64 else { return nil }
            z |= UInt64(b & 0x7F) << shift
            if b < 0x80 { return i == bytes.count - 1 ? Int(Int64(bitPattern: (z >> 1) ^ (0 &- (z & 1)))) : nil }
            shift += 7
        }
        return nil
    }
}

enum SizeProbe {
    static let int = ObjectIdentifier(Int.self)
    static let bytes = ObjectIdentifier([UInt8].self)
    static let string = ObjectIdentifier(String.self)
}
