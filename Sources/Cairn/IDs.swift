import Synchronization

/// Identifies a node of a cluster.
public struct NodeID: Hashable, Sendable, Codable, Comparable, CustomStringConvertible {
    public let raw: Int
    public init(_ raw: Int) { self.raw = raw }
    public static func < (a: NodeID, b: NodeID) -> Bool { a.raw < b.raw }
    public static func == (a: NodeID, b: NodeID) -> Bool { a.raw == b.raw }
    public func hash(into hasher: inout Hasher) { hasher.combine(raw) }
    /// Per-flush tables are keyed by node; node numbers are Cairn's own, so a seeded mix is
    /// enough (see ``ObjectID/_rawHashValue(seed:)``).
    public func _rawHashValue(seed: Int) -> Int { ObjectID(raw: UInt64(bitPattern: Int64(raw)))._rawHashValue(seed: seed) }
    public var description: String { "node-\(raw)" }
}

/// Identifies an immutable object in the cluster: a task's result, an actor call's reply, or a `put`.
///
/// The top 16 bits name the node that created the ID (its owner), the rest count up, so
/// every node mints IDs without coordination. A task is identified by its result's ID.
public struct ObjectID: Hashable, Sendable, Codable, CustomStringConvertible {
    public let raw: UInt64
    public init(raw: UInt64) { self.raw = raw }
    init(owner: NodeID, counter: UInt64) { raw = UInt64(owner.raw) << 48 | (counter & 0xFFFF_FFFF_FFFF) }
    public static func == (a: ObjectID, b: ObjectID) -> Bool { a.raw == b.raw }
    public func hash(into hasher: inout Hasher) { hasher.combine(raw) }

    /// Hashing object IDs is on the path of every task (each node's object table is keyed by
    /// them), and SipHash was a tenth of the time. IDs are minted by Cairn, never chosen by an
    /// adversary, so a seeded multiply-xorshift mix is enough; this is the hook the standard
    /// library's own integer types use to skip `Hasher`.
    ///
    /// Only the ID without its low 3 bits is mixed; those bits are kept as they are. So each
    /// aligned run of 8 IDs (minted one after another by one node) lands on 8 neighbouring
    /// buckets, one cache line of the table's keys, while the runs themselves are scattered.
    /// An owner's table is touched in roughly the order its IDs were minted (submitted,
    /// awaited, stored, freed), so most lookups then find their line already in the cache:
    /// with 200,000 tasks in flight, the lookups fell from ~5% to ~2% of all CPU samples in
    /// `cairn-bench cluster`.
    public func _rawHashValue(seed: Int) -> Int {
        var x = (raw >> 3) ^ UInt64(bitPattern: Int64(seed))
        x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
        x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
        return Int(truncatingIfNeeded: (x ^ (x >> 31)) << 3 | (raw & 7))
    }

    /// The node that created this ID and receives the value when it is computed.
    public var owner: NodeID { NodeID(Int(raw >> 48)) }
    public var description: String { "obj-\(raw >> 48)-\(raw & 0xFFFF_FFFF_FFFF)" }

    /// Parses a ``description`` (`obj-<owner>-<counter>`); nil for anything else.
    public init?(_ description: String) {
        let parts = description.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "obj", let owner = UInt64(parts[1]), owner <= 0xFFFF,
              let counter = UInt64(parts[2]), counter <= 0xFFFF_FFFF_FFFF else { return nil }
        raw = owner << 48 | counter
    }
}

/// Identifies an actor.
public struct ActorID: Hashable, Sendable, Codable, CustomStringConvertible {
    public let raw: UInt64
    public init(raw: UInt64) { self.raw = raw }
    public var description: String {
        isDurable ? "actor-durable-\(String(raw & 0xFFFF_FFFF_FFFF, radix: 16))" : "actor-\(raw >> 48)-\(raw & 0xFFFF_FFFF_FFFF)"
    }

    /// The top 16 bits of a durable actor's ID: no node has this number.
    static let durableTag: UInt64 = 0xFFFF

    /// A durable actor's ID, the same in every life of the actor: derived from its name
    /// (FNV-1a, 48 bits), so a handle stays valid across crashes and restarts.
    static func durable(name: String) -> ActorID {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        return ActorID(raw: durableTag << 48 | (h & 0xFFFF_FFFF_FFFF))
    }

    var isDurable: Bool { raw >> 48 == Self.durableTag }
}

/// Mints IDs for one node.
final class IDMint: Sendable {
    let node: NodeID
    private let counter = Atomic<UInt64>(1)
    init(node: NodeID) { self.node = node }
    func object() -> ObjectID { ObjectID(owner: node, counter: counter.wrappingAdd(1, ordering: .relaxed).oldValue) }
    func actor() -> ActorID { ActorID(raw: object().raw) }
}
