/// A small, fast, seedable random number generator (SplitMix64).
///
/// Every random choice in Cairn's tests, chaos runs and simulations comes from one of
/// these, created from a seed that the run prints, so any run can be replayed exactly.
/// It is not cryptographically secure.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64

    /// The seed this generator started from.
    public let seed: UInt64

    public init(seed: UInt64) {
        self.seed = seed
        self.state = seed
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A generator for a sub-stream, so that adding draws in one place does not shift another's.
    public func fork(_ stream: UInt64) -> SeededGenerator {
        var g = SeededGenerator(seed: seed ^ (stream &* 0xD6E8_FEB8_6659_FD93))
        _ = g.next()
        return SeededGenerator(seed: g.next())
    }

    /// `count` random bytes.
    public mutating func bytes(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var i = 0
        while i < count {
            var word = next()
            for _ in 0..<8 where i < count {
                out[i] = UInt8(truncatingIfNeeded: word)
                word >>= 8
                i += 1
            }
        }
        return out
    }

    /// A seed from the environment variable `name` if set, else from the system's generator.
    /// Callers print it so that a run can be repeated with `name=<seed>`.
    public static func seed(fromEnvironment name: String) -> UInt64 {
        if let raw = getenvString(name), let value = UInt64(raw) { return value }
        return UInt64.random(in: 0...UInt64.max)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func getenvString(_ name: String) -> String? {
    guard let p = getenv(name) else { return nil }
    return String(cString: p)
}
