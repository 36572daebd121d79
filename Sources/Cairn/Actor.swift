import CairnCodec
import DequeModule
import Synchronization

/// A stateful actor: its state is the value of the conforming type, changed only by its
/// messages, which run one at a time on the node that hosts it (the lecture's `handleMsg`).
///
/// Messages from one caller run in the order that caller sent them. The state must be
/// `Codable` so that it can be moved to its node and, with durability, checkpointed.
public protocol RemoteActor: RemoteValue {
    associatedtype Message: RemoteValue
    associatedtype Reply: RemoteValue

    /// The name nodes know this type by; defaults to the type's fully qualified name.
    static var actorTypeName: String { get }

    /// Handles one message and returns the reply.
    mutating func receive(_ message: Message) throws -> Reply
}

extension RemoteActor {
    public static var actorTypeName: String { String(reflecting: Self.self) }
}

/// A reference to a running actor. It can be sent to tasks and to other actors.
public struct ActorHandle<A: RemoteActor>: Sendable, Codable, Hashable, CustomStringConvertible {
    /// The actor's ID.
    public let id: ActorID
    /// The actor type's registered name (computed once: the default reflects on the type).
    public let typeName: String

    init(id: ActorID) {
        self.id = id
        self.typeName = A.actorTypeName
    }

    /// Sends `message`; the returned reference resolves to the reply.
    public func send(_ message: A.Message) throws -> ObjectRef<A.Reply> {
        try Submitter.current().sendToActor(id, typeName: typeName, message: .boxed(message))
    }

    /// Sends `message` as message number `sequence` of `caller`, for exactly-once retries to a
    /// durable actor: a caller that got no reply sends again with the same caller and sequence,
    /// and the message is applied once; the retry gets the original reply.
    ///
    /// A caller's sequence numbers must increase. A retry of a message whose reply is no longer
    /// kept (see ``DurabilityOptions/repliesKeptPerCaller``) fails with
    /// ``RemoteError/Kind-swift.enum/staleRetry``. On an actor that is not durable, the caller
    /// and sequence are ignored.
    public func send(_ message: A.Message, caller: CallerID, sequence: UInt64) throws -> ObjectRef<A.Reply> {
        try Submitter.current().sendToActor(id, typeName: typeName, message: .boxed(message), caller: caller.raw, sequence: sequence)
    }

    public var description: String { "ActorHandle<\(A.self)>(\(id))" }
}

/// Type-erased actor state, driven by its hosting node.
class AnyActorBox: @unchecked Sendable {
    func handle(_ message: StoredValue) throws -> any RemoteValue { preconditionFailure("abstract") }
    /// A copy of the state taken now (copy-on-write, so O(1) here) and a way to encode it later, on another thread.
    func snapshot() -> @Sendable () throws -> [UInt8] { preconditionFailure("abstract") }
}

/// Holds one actor's state. Only the hosting node's actor runner touches `state`, one message
/// at a time (``ActorInstance`` guarantees it), so the unchecked `Sendable` is sound.
final class ActorBox<A: RemoteActor>: AnyActorBox, @unchecked Sendable {
    var state: A
    init(state: A) { self.state = state }

    override func handle(_ message: StoredValue) throws -> any RemoteValue {
        try state.receive(try message.value(as: A.Message.self))
    }

    override func snapshot() -> @Sendable () throws -> [UInt8] {
        let copy = state
        return { try BinaryEncoder().encode(copy) }
    }
}

/// One pending call to an actor.
struct ActorCall: Sendable {
    let actor: ActorID
    let typeName: String
    let result: ObjectID
    var message: StoredValue
    /// For exactly-once retries to durable actors: the caller (0 = anonymous) and its sequence number.
    var caller: UInt64 = 0
    var callerSequence: UInt64 = 0
    /// Not a message: a request to checkpoint a durable actor at this point of its mailbox.
    var isCheckpointRequest = false
    /// Where a durable actor's log holds this message, once it is durable.
    var logSequence: UInt64?
    /// The message as a durable actor's log stores it, encoded on the sender's thread.
    var logged: [UInt8]?
}

/// An actor hosted on a node: its state and its mailbox.
///
/// The mailbox is drained by one worker at a time (`scheduled` is true while a worker owns
/// it), which is what makes messages run one at a time and in arrival order.
final class ActorInstance: Sendable {
    let id: ActorID
    let typeName: String
    let box: AnyActorBox
    /// Set for a durable actor: its log stage, exactly-once table and checkpoints.
    let durable: DurableActor?
    struct Mailbox {
        /// A deque: a drained batch comes off the front in O(batch), whatever the backlog.
        var calls = Deque<ActorCall>()
        var scheduled = false
    }
    let mailbox = Mutex(Mailbox())

    init(id: ActorID, typeName: String, box: AnyActorBox, durable: DurableActor? = nil) {
        self.id = id
        self.typeName = typeName
        self.box = box
        self.durable = durable
    }

    /// Adds calls to the mailbox, in order; returns true if the mailbox was idle and must now be scheduled.
    func post(_ calls: [ActorCall]) -> Bool {
        mailbox.withLock { box in
            box.calls.append(contentsOf: calls)
            if box.scheduled { return false }
            box.scheduled = true
            return true
        }
    }

    /// Adds a call to the mailbox; returns true if the mailbox was idle and must now be scheduled.
    func post(_ call: ActorCall) -> Bool {
        mailbox.withLock { box in
            box.calls.append(call)
            if box.scheduled { return false }
            box.scheduled = true
            return true
        }
    }
}
