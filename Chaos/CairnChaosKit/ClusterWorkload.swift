import Cairn
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Tasks for tests and benchmarks of a cluster of processes. Every process of such a cluster
/// must know them: node processes call ``register()`` through
/// `Cluster.runNodeIfLaunched(prepare:)`.
public enum ClusterWorkload {
    /// `x * x`.
    public static let square = RemoteFunction<Int, Int>("workload.square") { $0 * $0 }

    /// `x * x`, after sleeping `x % 7` milliseconds: slow enough to be running when a node is killed.
    public static let slowSquare = RemoteFunction<Int, Int>("workload.slowSquare") { x in
        usleep(UInt32(x % 7) * 1_000)
        return x * x
    }

    /// The pid of the process that ran it (and `x`, so that each call is distinct).
    public static let whereAmI = RemoteFunction<Int, [Int]>("workload.whereAmI") { x in
        usleep(2_000)
        return [Int(getpid()), x]
    }

    /// Sum of `square(i)` for `i` in `0..<n`, as nested tasks.
    public static let sumOfSquares = RemoteFunction<Int, Int>("workload.sumOfSquares") { n in
        let refs = try (0..<n).map { try square.remote($0) }
        var total = 0
        for r in refs { total += try r.get() }
        return total
    }

    /// A reference to the result of a nested task, which the node running this one owns, and
    /// the pid of that node's process.
    public static let ownedElsewhere = RemoteFunction<Int, OwnedRef>("workload.ownedElsewhere") { x in
        let ref = try square.remote(x)
        _ = try ref.get()
        return OwnedRef(ref: ref, pid: Int(getpid()))
    }

    public struct OwnedRef: Codable, Sendable {
        public let ref: ObjectRef<Int>
        public let pid: Int
    }

    /// 256 KiB of bytes derived from `x`: a result large enough to stay on the node that made it.
    public static let block = RemoteFunction<Int, [UInt8]>("workload.block") { x in
        (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ x) }
    }

    /// Sleeps `x` milliseconds, then returns `x`.
    public static let sleep = RemoteFunction<Int, Int>("workload.sleep") { x in
        usleep(UInt32(x) * 1_000)
        return x
    }

    /// Sleeps `x` milliseconds, counting the tasks of this function running in this process
    /// meanwhile: returns the pid, the most that ran at once while this one did, and 1 if it
    /// ran on a lane's thread (0 on a worker).
    public static let overlap = RemoteFunction<Int, [Int]>("workload.overlap") { x in
        let first = Overlap.shared.enter()
        usleep(UInt32(x) * 1_000)
        let most = max(first, Overlap.shared.leave())
        return [Int(getpid()), most, onLaneThread() ? 1 : 0]
    }

    /// Whether the calling thread is a lane's (by its name), not a worker.
    static func onLaneThread() -> Bool {
        ((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "").hasPrefix("cairn-lane")
    }

    /// The count behind ``overlap``.
    final class Overlap: @unchecked Sendable {
        static let shared = Overlap()
        private let lock = NSLock()
        private var running = 0
        private var most = 0

        /// One more running; returns how many run now.
        func enter() -> Int {
            lock.lock()
            defer { lock.unlock() }
            running += 1
            most = max(most, running)
            return running
        }

        /// One fewer; returns the most that ran at once since the last time nothing ran.
        func leave() -> Int {
            lock.lock()
            defer { lock.unlock() }
            running -= 1
            let seen = most
            if running == 0 { most = 0 }
            return seen
        }
    }

    /// Submits `sleep(x)` on its own node and waits for it; returns 1 if this ran on a lane's
    /// thread (0 on a worker).
    public static let waitForSleep = RemoteFunction<Int, Int>("workload.waitForSleep") { x in
        _ = try sleep.remote(x).get()
        return onLaneThread() ? 1 : 0
    }

    /// `x` itself: the smallest task.
    public static let identity = RemoteFunction<Int, Int>("workload.identity") { $0 }

    /// `n` identity tasks submitted from the node running this one (so owned there), and the
    /// sum of their results: load generated inside the cluster.
    public static let fanOut = RemoteFunction<Int, Int>("workload.fanOut") { n in
        let refs = try (0..<n).map { try identity.remote($0) }
        var total = 0
        for r in refs { total &+= try r.get() }
        return total
    }

    /// A counter actor.
    public struct Counter: RemoteActor {
        public var total = 0
        public init() {}
        public mutating func receive(_ n: Int) throws -> Int {
            total &+= n
            return total
        }
    }

    /// Creates every function and registers every actor type, so that a node process knows them by name.
    public static func register() {
        _ = (square, slowSquare, whereAmI, sumOfSquares, ownedElsewhere, identity, fanOut, block, sleep, overlap, waitForSleep)
        FunctionRegistry.process.register(Counter.self)
        FunctionRegistry.process.register(Bank.self)
    }
}
