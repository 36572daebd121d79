import Synchronization

/// A flag set once (a latch), read from any thread.
public final class Latch: Sendable {
    private let value = Atomic<Bool>(false)

    public init() {}

    public var isSet: Bool { value.load(ordering: .acquiring) }

    /// Sets it; true if it was not set before.
    @discardableResult
    public func set() -> Bool { !value.exchange(true, ordering: .acquiringAndReleasing) }
}
