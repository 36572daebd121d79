import CairnCodec

/// Anything a task can take or return.
public typealias RemoteValue = Codable & Sendable

/// An object's value as a node holds it: the Swift value itself while it stays on the node
/// that made it, its encoding once it has crossed between nodes, or a failure.
enum StoredValue: Sendable {
    case boxed(any RemoteValue)
    case encoded([UInt8])
    case failed(RemoteError)

    /// Bytes this value accounts for in a node's store.
    var size: Int {
        switch self {
        case .boxed(let v):
            if let bytes = v as? [UInt8] { return bytes.count + 16 }
            if let s = v as? String { return s.utf8.count + 16 }
            return 64
        case .encoded(let b): return b.count + 16
        case .failed: return 128
        }
    }

    var failure: RemoteError? {
        if case .failed(let e) = self { return e }
        return nil
    }

    /// The form that may cross to another node: never a shared Swift reference.
    func portable() throws -> StoredValue {
        switch self {
        case .boxed(let v):
            do {
                return .encoded(try BinaryEncoder().encode(v))
            } catch {
                throw CairnError(.serialization, "cannot encode a \(type(of: v)) to send it to another node: \(error)")
            }
        case .encoded, .failed: return self
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
        case .encoded(let bytes):
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
