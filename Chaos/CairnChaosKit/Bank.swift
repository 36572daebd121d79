import Cairn

/// The counter-and-bank actor of the durable-actor crash tests, and its own model.
///
/// Every reply carries the number of messages applied and a digest of all of them in order,
/// so a message applied twice, lost or reordered shows in the very next reply.
public struct Bank: RemoteActor, Equatable {
    public static let accounts = 8

    public enum Message: Codable, Sendable, Equatable {
        case deposit(account: Int, amount: Int)
        case withdraw(account: Int, amount: Int)
        case transfer(from: Int, to: Int, amount: Int)
        case audit
    }

    public struct Reply: Codable, Sendable, Equatable, CustomStringConvertible {
        public var applied: Int
        public var digest: UInt64
        public var total: Int
        public var description: String { "\(applied) \(digest) \(total)" }
    }

    public struct InsufficientFunds: Error, CustomStringConvertible {
        public let account: Int
        public let balance: Int
        public let amount: Int
        public var description: String { "account \(account) holds \(balance), cannot withdraw \(amount)" }
    }

    public var balances = [Int](repeating: 0, count: Bank.accounts)
    public var applied = 0
    public var digest: UInt64 = 0xCBF2_9CE4_8422_2325

    public init() {}

    public mutating func receive(_ message: Message) throws -> Reply {
        applied += 1
        mix(UInt64(applied))
        switch message {
        case .deposit(let a, let n):
            mix(1); mix(UInt64(a)); mix(UInt64(n))
            balances[a] += n
        case .withdraw(let a, let n):
            mix(2); mix(UInt64(a)); mix(UInt64(n))
            guard balances[a] >= n else { throw InsufficientFunds(account: a, balance: balances[a], amount: n) }
            balances[a] -= n
        case .transfer(let from, let to, let n):
            mix(3); mix(UInt64(from)); mix(UInt64(to)); mix(UInt64(n))
            guard balances[from] >= n else { throw InsufficientFunds(account: from, balance: balances[from], amount: n) }
            balances[from] -= n
            balances[to] += n
        case .audit:
            mix(4)
        }
        return Reply(applied: applied, digest: digest, total: balances.reduce(0, +))
    }

    private mutating func mix(_ x: UInt64) {
        digest = (digest ^ x) &* 0x0000_0100_0000_01B3
    }

    /// A random message (accounts and amounts small enough that some withdrawals fail).
    public static func randomMessage(using rng: inout some RandomNumberGenerator) -> Message {
        switch Int.random(in: 0..<10, using: &rng) {
        case 0..<5: return .deposit(account: Int.random(in: 0..<accounts, using: &rng), amount: Int.random(in: 1...100, using: &rng))
        case 5..<8: return .withdraw(account: Int.random(in: 0..<accounts, using: &rng), amount: Int.random(in: 1...150, using: &rng))
        case 8: return .transfer(from: Int.random(in: 0..<accounts, using: &rng), to: Int.random(in: 0..<accounts, using: &rng), amount: Int.random(in: 1...100, using: &rng))
        default: return .audit
        }
    }

    /// The message as one line of the host protocol: `S <seq> <kind> <a> <b> <c>`.
    public static func line(_ seq: UInt64, _ m: Message) -> String {
        switch m {
        case .deposit(let a, let n): return "S \(seq) d \(a) \(n) 0"
        case .withdraw(let a, let n): return "S \(seq) w \(a) \(n) 0"
        case .transfer(let f, let t, let n): return "S \(seq) t \(f) \(t) \(n)"
        case .audit: return "S \(seq) a 0 0 0"
        }
    }

    /// Parses a line made by ``line(_:_:)``.
    public static func parse(_ line: Substring) -> (UInt64, Message)? {
        let p = line.split(separator: " ")
        guard p.count == 6, p[0] == "S", let seq = UInt64(p[1]), let a = Int(p[3]), let b = Int(p[4]), let c = Int(p[5]),
              (0..<accounts).contains(a) else { return nil }
        switch p[2] {
        case "d": return (seq, .deposit(account: a, amount: b))
        case "w": return (seq, .withdraw(account: a, amount: b))
        case "t":
            guard (0..<accounts).contains(b) else { return nil }
            return (seq, .transfer(from: a, to: b, amount: c))
        case "a": return (seq, .audit)
        default: return nil
        }
    }
}
