/// An error from the Cairn runtime.
///
/// Each code is a situation a caller reacts to differently; ``detail`` says what failed and
/// what to do. A task's own failure arrives as ``RemoteError`` instead.
public struct CairnError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable, Equatable {
        /// A `get` or `wait` timed out before the objects were ready.
        case timeout
        /// No node in the cluster has the resources the task or actor asks for, so it can never run.
        case infeasible
        /// No node has the function or actor type registered under this name.
        case unknownFunction
        /// An argument is invalid (duplicate refs passed to `wait`, a count out of range, …).
        case invalidArgument
        /// The object's value has a different type than the one asked for.
        case typeMismatch
        /// The object no longer exists: it was freed, or lost with no lineage to rebuild it.
        case objectLost
        /// The cluster was shut down.
        case shutDown
        /// The actor does not exist or has died.
        case actorUnavailable
        /// A value could not be encoded or decoded to cross between nodes.
        case serialization
        /// Durable storage could not be opened, read or written; the detail names the store and why.
        case storage
        /// A durable actor was restored more than its `maxRestarts` allows and is declared dead.
        case actorDead
    }

    public let code: Code
    public let detail: String

    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "CairnError.\(code.rawValue): \(detail)" }
}

/// A task or actor call failed remotely. `get` of its result, or of any result computed from
/// it, throws this.
public struct RemoteError: Error, CustomStringConvertible, Sendable, Equatable, Codable {
    public enum Kind: String, Sendable, Codable, Equatable {
        /// The function or actor handler threw.
        case threw
        /// An input of the task failed; ``RemoteError/cause`` holds the upstream failure.
        case upstreamFailed
        /// The task was cancelled before it ran.
        case cancelled
        /// The node refused the work: the function or actor type is not registered there.
        case unknownFunction
        /// The task asked for resources no node has.
        case infeasible
        /// A value could not be encoded or decoded.
        case serialization
        /// The actor is not available (it failed to start, or was never created).
        case actorUnavailable
        /// A retried message to a durable actor was applied before and its reply is no longer
        /// kept; raise ``DurabilityOptions/repliesKeptPerCaller`` or retry sooner.
        case staleRetry
        /// The message could not be written to the durable actor's log, so it was not run.
        case storageFailed
        /// The request does not apply to its target (a checkpoint asked of an actor that is not durable).
        case invalidRequest
        /// The node running the task died more times than the cluster's `maxTaskRetries`, or
        /// the node hosting the actor died with the call in flight.
        case nodeDied
        /// The object's owner died, and its value and lineage with it (a `put`, or a result
        /// owned by a task that ran on that node).
        case objectLost
    }

    public let kind: Kind
    /// The failed task's result ID.
    public let task: ObjectID
    /// The function or actor method that failed (`Type.receive` for actors).
    public let function: String
    /// Where it failed.
    public let node: NodeID
    /// The underlying error's description, as thrown on the node.
    public let message: String
    /// For ``Kind-swift.enum/upstreamFailed``: the first failure upstream.
    public var cause: RemoteErrorBox?

    public init(kind: Kind, task: ObjectID, function: String, node: NodeID, message: String, cause: RemoteError? = nil) {
        self.kind = kind
        self.task = task
        self.function = function
        self.node = node
        self.message = message
        self.cause = cause.map(RemoteErrorBox.init)
    }

    /// The original failure at the root of a chain of upstream failures.
    public var root: RemoteError { cause?.error.root ?? self }

    public var description: String {
        switch kind {
        case .upstreamFailed:
            return "task \(task) (\(function)) on \(node) did not run because an input failed: \(cause.map { $0.error.description } ?? message)"
        default:
            return "task \(task) (\(function)) on \(node) failed [\(kind.rawValue)]: \(message)"
        }
    }
}

/// Boxes a ``RemoteError`` so that errors can nest.
public final class RemoteErrorBox: Sendable, Codable, Equatable {
    public let error: RemoteError
    init(_ error: RemoteError) { self.error = error }
    public static func == (a: RemoteErrorBox, b: RemoteErrorBox) -> Bool { a.error == b.error }
}
