/// A linearizability checker for histories of reads and writes on registers, in the manner of
/// Knossos and Porcupine: the search of Wing and Gong with Lowe's memoization, run per key
/// (linearizability is compositional, so each key's history is checked on its own).
///
/// A history lists each operation with the times it was called and returned. An operation
/// that never returned (its client crashed or gave up) may have taken effect at any time after
/// its call, or never: a pending write is allowed to appear in later reads, and a pending read
/// says nothing. The checker answers whether some order of the operations, each placed at a
/// point between its call and its return, explains every read.
public enum Linearizability {
    /// One operation on a register.
    public enum Operation: Sendable, Equatable, CustomStringConvertible {
        /// Wrote a value.
        case write(UInt64)
        /// Read a value; nil if the register had never been written.
        case read(UInt64?)

        public var description: String {
            switch self {
            case .write(let v): return "write(\(v))"
            case .read(let v): return "read -> \(v.map(String.init) ?? "nil")"
            }
        }
    }

    /// One operation of a history.
    public struct Entry: Sendable, Equatable {
        public var client: Int
        public var key: String
        public var operation: Operation
        /// When it was called.
        public var call: UInt64
        /// When it returned; nil if it never did.
        public var returned: UInt64?

        public init(client: Int, key: String, operation: Operation, call: UInt64, returned: UInt64?) {
            precondition(returned.map { $0 >= call } ?? true, "an operation cannot return before it is called")
            self.client = client
            self.key = key
            self.operation = operation
            self.call = call
            self.returned = returned
        }
    }

    /// The verdict on a history.
    public struct Verdict: Sendable, Equatable {
        /// Whether every key's history is linearizable.
        public var linearizable: Bool
        /// The first key (in key order) whose history is not.
        public var failingKey: String?
    }

    /// Checks every key's history.
    public static func check(_ history: [Entry]) -> Verdict {
        let byKey = Dictionary(grouping: history, by: \.key)
        for key in byKey.keys.sorted() where !checkRegister(byKey[key]!) {
            return Verdict(linearizable: false, failingKey: key)
        }
        return Verdict(linearizable: true, failingKey: nil)
    }

    /// Whether one register's history is linearizable.
    public static func checkRegister(_ history: [Entry]) -> Bool {
        // A pending read constrains nothing: drop it.
        let ops = history.filter { e in
            if case .read = e.operation, e.returned == nil { return false }
            return true
        }
        let n = ops.count
        if n == 0 { return true }

        // Events: a call and a return per operation, in time order (calls first on ties, so
        // operations that touch at an instant count as concurrent); a pending one returns at infinity.
        struct Event {
            var op: Int
            var isCall: Bool
            var time: UInt64
        }
        var events: [Event] = []
        events.reserveCapacity(2 * n)
        for (i, e) in ops.enumerated() {
            events.append(Event(op: i, isCall: true, time: e.call))
            events.append(Event(op: i, isCall: false, time: e.returned ?? .max))
        }
        events.sort { a, b in a.time != b.time ? a.time < b.time : (a.isCall && !b.isCall) }

        // A doubly linked list over the events, with a head sentinel at index `count`.
        let count = events.count
        let head = count
        var next = [Int](repeating: -1, count: count + 1)
        var prev = [Int](repeating: -1, count: count + 1)
        var order = head
        for i in 0..<count {
            next[order] = i
            prev[i] = order
            order = i
        }
        next[order] = -1
        var returnOf = [Int](repeating: 0, count: n)
        for (i, e) in events.enumerated() where !e.isCall { returnOf[e.op] = i }

        func unlink(_ i: Int) {
            next[prev[i]] = next[i]
            if next[i] >= 0 { prev[next[i]] = prev[i] }
        }
        /// Undoes `unlink`; lifted pairs are put back in the reverse order (dancing links).
        func relink(_ i: Int) {
            next[prev[i]] = i
            if next[i] >= 0 { prev[next[i]] = i }
        }

        // The register's state: nil until written.
        func step(_ state: UInt64?, _ op: Operation) -> (ok: Bool, state: UInt64?) {
            switch op {
            case .write(let v): return (true, v)
            case .read(let v): return (v == state, state)
            }
        }

        struct Seen: Hashable {
            var linearized: [UInt64]
            var state: UInt64?
        }
        var linearized = [UInt64](repeating: 0, count: (n + 63) / 64)
        var seen = Set<Seen>()
        var stack: [(event: Int, state: UInt64?)] = []
        var state: UInt64? = nil
        var entry = next[head]
        while next[head] >= 0 {
            guard entry >= 0 else {
                // Ran off the end without a return blocking: cannot happen (every call has a later return).
                return false
            }
            let e = events[entry]
            if e.isCall {
                let (ok, newState) = step(state, ops[e.op].operation)
                if ok {
                    linearized[e.op / 64] |= 1 << UInt64(e.op % 64)
                    if seen.insert(Seen(linearized: linearized, state: newState)).inserted {
                        stack.append((entry, state))
                        state = newState
                        unlink(entry)
                        unlink(returnOf[e.op])
                        entry = next[head]
                        continue
                    }
                    linearized[e.op / 64] &= ~(1 << UInt64(e.op % 64))
                }
                entry = next[entry]
            } else {
                // An operation returned before it could be placed: undo the last choice.
                guard let (call, previous) = stack.popLast() else { return false }
                let op = events[call].op
                state = previous
                linearized[op / 64] &= ~(1 << UInt64(op % 64))
                relink(returnOf[op])
                relink(call)
                entry = next[call]
            }
        }
        return true
    }
}
