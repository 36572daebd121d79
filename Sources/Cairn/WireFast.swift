import CairnCodec
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The messages on the task and actor-call paths, written straight to bytes and read straight
/// back, without `Codable`: tasks handed up and placed, results, placements, held objects,
/// actor calls, fetches and frees, and the load reports and node tables that flow every few
/// milliseconds. Through the coder's containers these had been a third of a
/// cluster's CPU (an existential container allocated per value, a keyed container per ID).
///
/// A message starts with ``marker``, which no ``BinaryEncoder`` document starts with, then the
/// endpoint and the kind's tag and fields: unsigned varints, zig-zag varints for signed
/// numbers, little-endian IEEE doubles, and byte strings with a varint length. Every length
/// and count is checked against the bytes that remain before anything is allocated.
enum WireFast {
    /// First byte of a message in this form.
    static let marker: UInt8 = 0xCB

    /// The message in this form, or nil if its kind is not one of the hot ones.
    static func encode(_ message: Message, to endpoint: Endpoint) throws -> [UInt8]? {
        var w = WireWriter()
        w.byte(marker)
        switch endpoint {
        case .node(let n):
            w.byte(0)
            w.int(n.raw)
        case .scheduler: w.byte(1)
        case .controlStore: w.byte(2)
        }
        switch message {
        case .runTasks(let specs):
            w.byte(1)
            try w.tasks(specs)
        case .schedule(let specs, let from, let avoid):
            w.byte(2)
            try w.tasks(specs)
            w.int(from.raw)
            w.count(avoid.count)
            for n in avoid { w.int(n.raw) }
        case .runTasksEncoded(let batch):
            w.byte(1)
            w.encodedBatch(batch)
        case .scheduleEncoded(let tasks, let from, let avoid):
            w.byte(2)
            w.encodedTasks(tasks)
            w.int(from.raw)
            w.count(avoid.count)
            for n in avoid { w.int(n.raw) }
        case .objects(let objects):
            w.byte(3)
            w.count(objects.count)
            for (id, value) in objects {
                w.uint(id.raw)
                try w.value(value)
            }
        case .placed(let placements):
            w.byte(4)
            w.count(placements.count)
            for (task, node) in placements {
                w.uint(task.raw)
                w.int(node.raw)
            }
        case .objectsHeld(let held):
            w.byte(5)
            w.count(held.count)
            for (object, node, size) in held {
                w.uint(object.raw)
                w.int(node.raw)
                w.int(size)
            }
        case .actorCalls(let calls):
            w.byte(6)
            w.count(calls.count)
            for call in calls { try w.call(call) }
        case .fetch(let objects, let replyTo):
            w.byte(7)
            w.count(objects.count)
            for o in objects { w.uint(o.raw) }
            w.int(replyTo.raw)
        case .free(let objects):
            w.byte(8)
            w.count(objects.count)
            for o in objects { w.uint(o.raw) }
        case .nodeTable(let table):
            w.byte(9)
            w.count(table.count)
            for record in table { w.node(record) }
        case .runDirect(let specs):
            w.byte(11)
            try w.tasks(specs)
        case .control(.reportLoad(let node, let queued)):
            w.byte(10)
            w.int(node.raw)
            w.int(queued)
        default:
            return nil
        }
        return w.bytes
    }

    /// Reads a message written by ``encode(_:to:)``.
    static func decode(_ bytes: [UInt8]) throws -> (Endpoint, Message) {
        var r = WireReader(bytes)
        guard try r.byte() == marker else { throw r.fail("the first byte is not the hand-coded form's marker") }
        let endpoint: Endpoint
        switch try r.byte() {
        case 0: endpoint = .node(NodeID(try r.int()))
        case 1: endpoint = .scheduler
        case 2: endpoint = .controlStore
        case let tag: throw r.fail("endpoint tag \(tag) is not 0, 1 or 2")
        }
        let message: Message
        switch try r.byte() {
        case 1: message = .runTasks(try r.tasks())
        case 2:
            // Only a scheduler reads these, and it forwards the tasks as they came.
            let tasks = try r.encodedTasks()
            let from = NodeID(try r.int())
            var avoid: [NodeID] = []
            for _ in 0..<(try r.count()) { avoid.append(NodeID(try r.int())) }
            message = .scheduleEncoded(tasks, from: from, avoid: avoid)
        case 3:
            var objects: [(ObjectID, StoredValue)] = []
            for _ in 0..<(try r.count()) { objects.append((ObjectID(raw: try r.uint()), try r.value())) }
            message = .objects(objects)
        case 4:
            var placements: [(ObjectID, NodeID)] = []
            for _ in 0..<(try r.count()) { placements.append((ObjectID(raw: try r.uint()), NodeID(try r.int()))) }
            message = .placed(placements)
        case 5:
            var held: [(ObjectID, NodeID, size: Int)] = []
            for _ in 0..<(try r.count()) { held.append((ObjectID(raw: try r.uint()), NodeID(try r.int()), size: try r.int())) }
            message = .objectsHeld(held)
        case 6:
            var calls: [ActorCall] = []
            for _ in 0..<(try r.count()) { calls.append(try r.call()) }
            message = .actorCalls(calls)
        case 7:
            var objects: [ObjectID] = []
            for _ in 0..<(try r.count()) { objects.append(ObjectID(raw: try r.uint())) }
            message = .fetch(objects, replyTo: NodeID(try r.int()))
        case 8:
            var objects: [ObjectID] = []
            for _ in 0..<(try r.count()) { objects.append(ObjectID(raw: try r.uint())) }
            message = .free(objects)
        case 9:
            var table: [NodeRecord] = []
            for _ in 0..<(try r.count()) { table.append(try r.node()) }
            message = .nodeTable(table)
        case 10:
            let node = NodeID(try r.int())
            message = .control(.reportLoad(node, queued: try r.int()))
        case 11: message = .runDirect(try r.tasks())
        case let tag: throw r.fail("message tag \(tag) is not one of 1 to 11")
        }
        guard r.atEnd else { throw r.fail("\(r.remaining) bytes follow the message") }
        return (endpoint, message)
    }
}

/// Appends the hand-coded form's fields (see ``WireFast``).
struct WireWriter {
    private(set) var bytes: [UInt8] = []

    init() { bytes.reserveCapacity(256) }

    mutating func byte(_ b: UInt8) { bytes.append(b) }

    mutating func uint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    mutating func int(_ value: Int) {
        let v = Int64(value)
        uint(UInt64(bitPattern: (v << 1) ^ (v >> 63)))
    }

    mutating func count(_ n: Int) { uint(UInt64(n)) }

    mutating func double(_ d: Double) {
        let v = d.bitPattern
        for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
    }

    mutating func blob(_ b: [UInt8]) {
        count(b.count)
        bytes.append(contentsOf: b)
    }

    mutating func string(_ s: String) {
        var s = s
        s.withUTF8 { utf8 in
            count(utf8.count)
            bytes.append(contentsOf: utf8)
        }
    }

    mutating func value(_ v: StoredValue) throws {
        switch v {
        case .encoded(let b):
            byte(0)
            blob(b)
        case .int(let i):
            byte(1)
            int(i)
        case .failed(let e):
            byte(2)
            blob(try BinaryEncoder().encode(e))
        case .boxed(let b):
            // A boxed Int needs no coding (a spec sent as it stands, ``TaskSpec/encodableAsIs``).
            guard let plain = v.portableWithoutCoding else {
                preconditionFailure("a \(type(of: b)) would cross between processes as a shared reference; encode it first")
            }
            try value(plain)
        }
    }

    mutating func tasks(_ specs: [TaskSpec]) throws {
        count(specs.count)
        // A task with one small argument takes about 32 bytes: grow once, not per field.
        bytes.reserveCapacity(bytes.count + 32 * specs.count)
        // No check per spec: `value(_:)` traps on any value that would need coding, the one
        // thing a spec not made portable could get wrong here (a reference's token is not written).
        for spec in specs {
            uint(spec.id.raw)
            string(spec.function)
            count(spec.args.count)
            for arg in spec.args {
                switch arg {
                case .value(let v):
                    byte(0)
                    try value(v)
                case .ref(let id, _):
                    byte(1)
                    uint(id.raw)
                }
            }
            resources(spec.resources)
        }
    }

    /// Tasks as they were read (``WireReader/encodedTasks()``): the same bytes
    /// ``tasks(_:)`` would write for them, copied.
    mutating func encodedTasks(_ tasks: [EncodedTask]) {
        count(tasks.count)
        bytes.reserveCapacity(bytes.count + tasks.reduce(0) { $0 + $1.range.count })
        for t in tasks { bytes.append(contentsOf: t.message[t.range]) }
    }

    /// A batch as ``tasks(_:)`` would write its tasks.
    mutating func encodedBatch(_ batch: EncodedBatch) {
        count(batch.count)
        bytes.append(contentsOf: batch.bytes)
    }

    mutating func resources(_ r: Resources) {
        double(r.cpus)
        count(r.custom.count)
        if r.custom.isEmpty { return }
        for (name, amount) in r.custom.sorted(by: { $0.key < $1.key }) {
            string(name)
            double(amount)
        }
    }

    mutating func node(_ record: NodeRecord) {
        int(record.id.raw)
        resources(record.resources)
        optional(record.functions) { w, functions in
            w.count(functions.count)
            for f in functions.sorted() { w.string(f) }
        }
        int(record.queued)
        byte(record.alive ? 1 : 0)
        optional(record.address) { $0.string($1) }
        optional(record.lane) { $0.int($1) }
    }

    /// A presence byte, then the value if there is one.
    mutating func optional<T>(_ value: T?, _ write: (inout WireWriter, T) -> Void) {
        guard let value else {
            byte(0)
            return
        }
        byte(1)
        write(&self, value)
    }

    mutating func call(_ c: ActorCall) throws {
        uint(c.actor.raw)
        string(c.typeName)
        uint(c.result.raw)
        try value(c.message)
        uint(c.caller)
        uint(c.callerSequence)
        byte(c.isCheckpointRequest ? 1 : 0)
        optional(c.logSequence) { $0.uint($1) }
        optional(c.logged) { $0.blob($1) }
    }
}

/// Reads the hand-coded form's fields (see ``WireFast``); every failure is a ``CairnError``
/// naming the byte where it was found.
struct WireReader {
    private let bytes: [UInt8]
    private var at = 0
    /// The last function or type name read: a batch of tasks or calls mostly repeats one, and
    /// reusing the string saves validating and allocating it again.
    private var lastName = ""

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var atEnd: Bool { at == bytes.count }
    var remaining: Int { bytes.count - at }

    func fail(_ what: String) -> CairnError {
        CairnError(.serialization, "a message from another process does not decode: \(what) (at byte \(at) of \(bytes.count))")
    }

    mutating func byte() throws -> UInt8 {
        guard at < bytes.count else { throw fail("the message ends where a field was expected") }
        defer { at += 1 }
        return bytes[at]
    }

    mutating func uint() throws -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            let b = try byte()
            if shift == 63 && b > 1 { throw fail("a number does not fit in 64 bits") }
            result |= UInt64(b & 0x7F) << shift
            if b < 0x80 { return result }
            shift += 7
            if shift > 63 { throw fail("a number is longer than 10 bytes") }
        }
    }

    mutating func int() throws -> Int {
        let z = try uint()
        return Int(Int64(bitPattern: (z >> 1) ^ (0 &- (z & 1))))
    }

    /// A count of entries that follow, each at least one byte long.
    mutating func count() throws -> Int {
        let n = try uint()
        guard n <= UInt64(remaining) else { throw fail("a count of \(n) exceeds the \(remaining) bytes that remain") }
        return Int(n)
    }

    mutating func double() throws -> Double {
        guard remaining >= 8 else { throw fail("the message ends inside a number") }
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
        at += 8
        return Double(bitPattern: v)
    }

    mutating func blob() throws -> [UInt8] {
        let n = try count()
        defer { at += n }
        return Array(bytes[at..<(at + n)])
    }

    /// A function or type name: the previous one again if the bytes are the same.
    mutating func name() throws -> String {
        let start = at
        let n = try count()
        let from = at
        let same = lastName.withUTF8 { utf8 in
            utf8.count == n && (n == 0 || bytes.withUnsafeBufferPointer { memcmp(utf8.baseAddress!, $0.baseAddress! + from, n) == 0 })
        }
        if same {
            at += n
            return lastName
        }
        at = start
        lastName = try string()
        return lastName
    }

    mutating func string() throws -> String {
        let n = try count()
        let s = bytes[at..<(at + n)].withUnsafeBufferPointer { String(validating: $0, as: UTF8.self) }
        guard let s else { throw fail("a string of \(n) bytes is not valid UTF-8") }
        at += n
        return s
    }

    mutating func value() throws -> StoredValue {
        switch try byte() {
        case 0: return .encoded(try blob())
        case 1: return .int(try int())
        case 2:
            let bytes = try blob()
            do {
                return .failed(try BinaryDecoder().decode(RemoteError.self, from: bytes))
            } catch {
                throw fail("an error value does not decode: \(error)")
            }
        case let tag: throw fail("value tag \(tag) is not 0, 1 or 2")
        }
    }

    mutating func tasks() throws -> [TaskSpec] {
        let n = try count()
        var specs: [TaskSpec] = []
        specs.reserveCapacity(n)
        for _ in 0..<n {
            let id = ObjectID(raw: try uint())
            let function = try name()
            let argc = try count()
            var args: [TaskArg] = []
            args.reserveCapacity(argc)
            for _ in 0..<argc {
                switch try byte() {
                case 0: args.append(.value(try value()))
                case 1: args.append(.ref(ObjectID(raw: try uint()), nil))
                case let tag: throw fail("argument tag \(tag) is not 0 or 1")
                }
            }
            specs.append(TaskSpec.received(id: id, function: function, args: args, resources: try resources()))
        }
        return specs
    }

    /// What ``tasks()`` reads, with each task left in its bytes: its ID, function, resources
    /// and the owners of its reference arguments read out, its values skipped (an error value
    /// is decoded, so that a task that passes here decodes wherever it goes).
    mutating func encodedTasks() throws -> [EncodedTask] {
        let n = try count()
        var tasks: [EncodedTask] = []
        tasks.reserveCapacity(n)
        for _ in 0..<n {
            let start = at
            let id = ObjectID(raw: try uint())
            let function = try name()
            var owners: [NodeID] = []
            for _ in 0..<(try count()) {
                switch try byte() {
                case 0:
                    switch try byte() {
                    case 0: at += try count()
                    case 1: _ = try uint()
                    case 2:
                        at -= 1
                        _ = try value()
                    case let tag: throw fail("value tag \(tag) is not 0, 1 or 2")
                    }
                case 1: owners.append(ObjectID(raw: try uint()).owner)
                case let tag: throw fail("argument tag \(tag) is not 0 or 1")
                }
            }
            let resources = try resources()
            tasks.append(EncodedTask(id: id, function: function, resources: resources, inputOwners: owners, message: bytes, range: start..<at))
        }
        return tasks
    }

    mutating func resources() throws -> Resources {
        let cpus = try double()
        var custom: [String: Double] = [:]
        for _ in 0..<(try count()) {
            let name = try string()
            custom[name] = try double()
        }
        return Resources(cpus: cpus, custom: custom)
    }

    mutating func node() throws -> NodeRecord {
        let id = NodeID(try int())
        let resources = try resources()
        var functions: Set<String>?
        if try flag() {
            var names: Set<String> = []
            for _ in 0..<(try count()) { names.insert(try string()) }
            functions = names
        }
        let queued = try int()
        let alive = try flag()
        let address = try flag() ? try string() : nil
        let lane = try flag() ? try int() : nil
        return NodeRecord(id: id, resources: resources, functions: functions, queued: queued, alive: alive, address: address, lane: lane)
    }

    mutating func call() throws -> ActorCall {
        let actor = ActorID(raw: try uint())
        let typeName = try name()
        let result = ObjectID(raw: try uint())
        let message = try value()
        let caller = try uint()
        let callerSequence = try uint()
        let isCheckpointRequest: Bool
        switch try byte() {
        case 0: isCheckpointRequest = false
        case 1: isCheckpointRequest = true
        case let b: throw fail("a flag byte is \(b), not 0 or 1")
        }
        let logSequence: UInt64? = try flag() ? try uint() : nil
        let logged: [UInt8]? = try flag() ? try blob() : nil
        return ActorCall(actor: actor, typeName: typeName, result: result, message: message, caller: caller,
                         callerSequence: callerSequence, isCheckpointRequest: isCheckpointRequest, logSequence: logSequence, logged: logged)
    }

    private mutating func flag() throws -> Bool {
        switch try byte() {
        case 0: return false
        case 1: return true
        case let b: throw fail("a presence byte is \(b), not 0 or 1")
        }
    }
}

extension EncodedTask {
    /// The tasks decoded, as ``WireReader/tasks()`` reads them.
    static func decode(_ tasks: [EncodedTask]) throws -> [TaskSpec] {
        var w = WireWriter()
        w.encodedTasks(tasks)
        var r = WireReader(w.bytes)
        return try r.tasks()
    }
}

extension EncodedBatch {
    /// The tasks decoded, as ``WireReader/tasks()`` reads them.
    func decode() throws -> [TaskSpec] {
        var w = WireWriter()
        w.encodedBatch(self)
        var r = WireReader(w.bytes)
        return try r.tasks()
    }
}
