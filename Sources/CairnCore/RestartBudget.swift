/// When a supervisor starts a process again after it died: at most `limit` times within any
/// `windowSeconds`; at once if it was killed by a signal or had run for a second or more, and
/// after a second if it exited by itself sooner (a process that cannot start, say because its
/// port is taken, is tried again a second apart, not `limit` times at once). A pure value: the
/// supervisor gives it each death with the clock's reading.
public struct RestartBudget: Sendable, Equatable {
    public enum Decision: Sendable, Equatable {
        /// Start it again after this many seconds.
        case restart(afterSeconds: Double)
        /// Do not: the budget is spent; why, in words.
        case giveUp(String)
    }

    public let limit: Int
    public let windowSeconds: Double
    /// When the restarts still inside the window happened.
    public private(set) var restarts: [Double] = []

    /// A process that exited by itself sooner than this is started again only after this long.
    public static let minimumLifeSeconds = 1.0

    public init(limit: Int, windowSeconds: Double) {
        precondition(limit >= 0 && windowSeconds > 0, "a restart budget needs limit >= 0 and a positive window")
        self.limit = limit
        self.windowSeconds = windowSeconds
    }

    /// The process died at `now` after running `livedSeconds`, `killed` by a signal or not:
    /// start it again, or give up.
    public mutating func died(at now: Double, livedSeconds: Double, killed: Bool) -> Decision {
        restarts.removeAll { now - $0 >= windowSeconds }
        guard restarts.count < limit else {
            return .giveUp(limit == 0 ? "restarts are off"
                           : "it died \(limit + 1) times within \(Self.format(windowSeconds)) s (at most \(limit) restarts within \(Self.format(windowSeconds)) s)")
        }
        let delay = killed || livedSeconds >= Self.minimumLifeSeconds ? 0 : Self.minimumLifeSeconds
        restarts.append(now + delay)
        return .restart(afterSeconds: delay)
    }

    private static func format(_ seconds: Double) -> String {
        seconds == seconds.rounded() ? String(Int(seconds)) : String(seconds)
    }
}
