/// A reference to an immutable object that exists now or will once a task finishes: Ray's
/// future. It can be passed as an argument to other tasks (the task then runs once the
/// object exists), stored, and resolved with `cluster.get` or, inside a task, ``get(timeout:)``.
///
/// While any copy of a reference made by `remote`, `send` or `put` is alive in this process,
/// the object is kept; when the last one goes, the cluster frees it. A reference decoded from
/// bytes (nested inside another value) does not keep the object alive by itself.
public struct ObjectRef<T: RemoteValue>: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The object's ID.
    public let id: ObjectID
    let token: RefToken?

    init(id: ObjectID, token: RefToken?) {
        self.id = id
        self.token = token
    }

    public static func == (a: ObjectRef, b: ObjectRef) -> Bool { a.id == b.id }
    public func hash(into hasher: inout Hasher) { hasher.combine(id) }

    public init(from decoder: any Decoder) throws {
        id = try ObjectID(raw: decoder.singleValueContainer().decode(UInt64.self))
        token = nil
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(id.raw)
    }

    public var description: String { "ObjectRef<\(T.self)>(\(id))" }

    /// Blocks the calling thread until the value exists and returns it.
    ///
    /// Meant for task and actor bodies, which run on worker threads: the worker gives its slot
    /// back while it waits. From async code use `cluster.get(_:)` instead.
    public func get(timeout: Duration? = nil) throws -> T {
        try Submitter.current().blockingGet(id, timeout: timeout).value(as: T.self)
    }
}

/// Keeps an object alive while any ``ObjectRef`` holding it exists.
final class RefToken: Sendable {
    let id: ObjectID
    let release: @Sendable (ObjectID) -> Void

    init(id: ObjectID, release: @escaping @Sendable (ObjectID) -> Void) {
        self.id = id
        self.release = release
    }

    deinit { release(id) }
}

/// One argument of a task: a value, or a reference to an object that must exist first.
enum TaskArg: Sendable {
    case value(StoredValue)
    case ref(ObjectID, RefToken?)
}
