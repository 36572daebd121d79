/// When a supervisor starts a process again after it died: at most `limit` times within any
/// `windowSeconds`, at once if the process had run for a second or more, after a second if it
/// died sooner (so a process that cannot start does not spin). A pure value: the supervisor
/// gives it each death with the clock's reading.
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

    /// A process that lived less than this is started again only after this long.
    public static let minimumLifeSeconds = 1.0

    public init(limit: Int, windowSeconds: Double) {
        precondition(limit >= 0 && windowSeconds > 0, "a restart budget needs limit >= 0 and a positive window")
        self.limit = limit
        self.windowSeconds = windowSeconds
    }

    /// The process died at `now` after running `livedSeconds`: start it again, or give up.
    public mutating func died(at now: Double, livedSeconds: Double) -> Decision {
        restarts.removeAll { now - $0 >= windowSeconds }
        guard restarts.count < limit else {
            return .giveUp(limit == 0 ? "restarts are off"
                           : "it died \(limit + 1) times within \(Self.format(windowSeconds)) s (at most \(limit) restarts within \(Self.format(windowSeconds)) s)")
        }
        let delay = livedSeconds >= Self.minimumLifeSeconds ? 0 : Self.minimumLifeSeconds
        restarts.append(now + delay)
        return .restart(afterSeconds: delay)
    }

    private static func format(_ seconds: Double) -> String {
        seconds == seconds.rounded() ? String(Int(seconds)) : String(seconds)
    }
}
