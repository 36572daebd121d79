import Synchronization

/// How a node runs a function it knows by name. A class, so that task specs carry one pointer.
final class ErasedFunction: Sendable {
    let name: String
    let arity: Int
    /// Runs the function on resolved arguments (every one a `.value`).
    let invoke: @Sendable ([TaskArg]) throws -> any RemoteValue

    init(name: String, arity: Int, invoke: @escaping @Sendable ([TaskArg]) throws -> any RemoteValue) {
        self.name = name
        self.arity = arity
        self.invoke = invoke
    }
}

extension TaskArg {
    /// The argument's value as `T`; the scheduler resolves references before a task runs.
    @inline(__always) func value<T: RemoteValue>(as type: T.Type) throws -> T {
        guard case .value(let v) = self else {
            throw CairnError(.invalidArgument, "an argument was still a reference when the task ran")
        }
        return try v.value(as: T.self)
    }
}

/// How a node creates and drives an actor type it knows by name.
struct ErasedActorType: Sendable {
    let name: String
    let make: @Sendable (StoredValue) throws -> AnyActorBox
}

/// The functions and actor types this process can run, by name.
///
/// Every process of a cluster runs the same binary, so a name means the same code on every
/// node. Functions register themselves when their ``RemoteFunction`` is created; actor types
/// when first spawned, or explicitly with ``register(_:)``. A node may be started with an
/// allow-list (``NodeConfiguration/functions``) to model a node that lacks some code; it
/// refuses any other name with ``RemoteError/Kind-swift.enum/unknownFunction``.
public final class FunctionRegistry: Sendable {
    /// The process-wide registry.
    public static let process = FunctionRegistry()

    private let functions = Mutex<[String: ErasedFunction]>([:])
    private let actors = Mutex<[String: ErasedActorType]>([:])

    func add(_ f: ErasedFunction) {
        functions.withLock { table in
            if let existing = table[f.name], existing.arity != f.arity {
                preconditionFailure("two remote functions are registered as \"\(f.name)\"; names must be unique")
            }
            table[f.name] = f
        }
    }

    func function(_ name: String) -> ErasedFunction? { functions.withLock { $0[name] } }

    /// Registers an actor type so that nodes can host it (spawning does this too).
    public func register<A: RemoteActor>(_ type: A.Type) {
        let name = A.actorTypeName
        actors.withLock { table in
            guard table[name] == nil else { return }
            table[name] = ErasedActorType(name: name) { initial in ActorBox<A>(state: try initial.value(as: A.self)) }
        }
    }

    func actorType(_ name: String) -> ErasedActorType? { actors.withLock { $0[name] } }
}

/// A function that runs as a remote task: `f.remote(x)` returns an ``ObjectRef`` at once and
/// the function runs on some node of the cluster.
///
/// The body runs on a worker thread of the node that runs the task. It may submit tasks
/// itself (`g.remote(…)`) and block on their results with ``ObjectRef/get(timeout:)``;
/// a worker blocked that way gives its slot back, so nested tasks cannot deadlock the pool.
/// Tasks must be deterministic so that lost results can be recomputed from lineage.
public struct RemoteFunction<A: RemoteValue, R: RemoteValue>: Sendable {
    /// The name every node knows this function by.
    public let name: String
    /// What one invocation needs from the node that runs it.
    public let resources: Resources
    /// The registered code, kept so that submitting does not look it up.
    let code: ErasedFunction

    /// Defines and registers the function `name`.
    public init(_ name: String, resources: Resources = .default, _ body: @escaping @Sendable (A) throws -> R) {
        self.name = name
        self.resources = resources
        code = ErasedFunction(name: name, arity: 1) { args in try body(try args[0].value(as: A.self)) }
        FunctionRegistry.process.add(code)
    }

    private init(name: String, resources: Resources, code: ErasedFunction) {
        self.name = name
        self.resources = resources
        self.code = code
    }

    /// The same function with other resource requirements.
    public func options(resources: Resources) -> RemoteFunction {
        RemoteFunction(name: name, resources: resources, code: code)
    }

    /// Submits a task on `argument` and returns a reference to its future result.
    public func remote(_ argument: A) throws -> ObjectRef<R> {
        try Submitter.current().submit(code, args: [.value(.boxed(argument))], resources: resources)
    }

    /// Submits a task that runs once `argument` exists, on its value.
    public func remote(_ argument: ObjectRef<A>) throws -> ObjectRef<R> {
        try Submitter.current().submit(code, args: [.ref(argument.id, argument.token)], resources: resources)
    }
}

/// A two-argument ``RemoteFunction``; each argument may be a value or an ``ObjectRef``.
public struct RemoteFunction2<A: RemoteValue, B: RemoteValue, R: RemoteValue>: Sendable {
    public let name: String
    public let resources: Resources
    let code: ErasedFunction

    public init(_ name: String, resources: Resources = .default, _ body: @escaping @Sendable (A, B) throws -> R) {
        self.name = name
        self.resources = resources
        code = ErasedFunction(name: name, arity: 2) { args in
            try body(try args[0].value(as: A.self), try args[1].value(as: B.self))
        }
        FunctionRegistry.process.add(code)
    }

    public func remote(_ a: A, _ b: B) throws -> ObjectRef<R> { try submit(.value(.boxed(a)), .value(.boxed(b))) }
    public func remote(_ a: ObjectRef<A>, _ b: B) throws -> ObjectRef<R> { try submit(.ref(a.id, a.token), .value(.boxed(b))) }
    public func remote(_ a: A, _ b: ObjectRef<B>) throws -> ObjectRef<R> { try submit(.value(.boxed(a)), .ref(b.id, b.token)) }
    public func remote(_ a: ObjectRef<A>, _ b: ObjectRef<B>) throws -> ObjectRef<R> { try submit(.ref(a.id, a.token), .ref(b.id, b.token)) }

    private func submit(_ a: TaskArg, _ b: TaskArg) throws -> ObjectRef<R> {
        try Submitter.current().submit(code, args: [a, b], resources: resources)
    }
}

/// Resources a task or actor needs, or a node offers: CPUs and named custom resources.
public struct Resources: Sendable, Codable, Hashable, CustomStringConvertible {
    /// CPUs (worker slots).
    public var cpus: Double
    /// Named resources such as `"gpu"`, with amounts.
    public var custom: [String: Double]

    public init(cpus: Double = 1, custom: [String: Double] = [:]) {
        self.cpus = cpus
        self.custom = custom
    }

    /// One CPU, nothing else.
    public static let `default` = Resources(cpus: 1)

    /// `n` CPUs.
    public static func cpus(_ n: Double) -> Resources { Resources(cpus: n) }

    /// Whether a node offering `self` could ever run work that needs `need`.
    public func satisfies(_ need: Resources) -> Bool {
        guard cpus >= need.cpus else { return false }
        for (name, amount) in need.custom where (custom[name] ?? 0) < amount { return false }
        return true
    }

    public var description: String {
        ([String(format: "cpus=%g", cpus)] + custom.sorted { $0.key < $1.key }.map { String(format: "%@=%g", $0.key, $0.value) }).joined(separator: ",")
    }
}

import Foundation
