import Foundation

/// A value shared between threads, every access under one lock (for tests, benchmarks and
/// other code off the hot paths).
public final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value

    public init(_ value: Value) { stored = value }

    /// Changes the value in place, under the lock.
    public func update<R>(_ change: (inout Value) throws -> R) rethrows -> R {
        try lock.withLock { try change(&stored) }
    }

    public var value: Value { lock.withLock { stored } }
}
