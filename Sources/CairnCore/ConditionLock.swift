#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A mutex with condition variables, as `NSCondition`, that can also be tried: an event
/// loop thread that must never wait takes it with ``tryLock()`` and leaves the work to a
/// thread that may wait when it is held.
///
/// With more than one condition (`conditions:`), threads waiting for different things under
/// the same mutex wait on different conditions, so that waking one kind never wakes the other.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let conditions: UnsafeMutablePointer<pthread_cond_t>
    private let count: Int

    public init(conditions: Int = 1) {
        precondition(conditions >= 1, "a ConditionLock needs at least one condition")
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        precondition(pthread_mutex_init(mutex, nil) == 0, "pthread_mutex_init failed")
        count = conditions
        self.conditions = .allocate(capacity: conditions)
        for i in 0..<conditions {
            (self.conditions + i).initialize(to: pthread_cond_t())
            precondition(pthread_cond_init(self.conditions + i, nil) == 0, "pthread_cond_init failed")
        }
    }

    deinit {
        for i in 0..<count { pthread_cond_destroy(conditions + i) }
        pthread_mutex_destroy(mutex)
        conditions.deallocate()
        mutex.deallocate()
    }

    @inline(__always) public func lock() {
        pthread_mutex_lock(mutex)
    }

    /// Takes the lock if no thread holds it, without waiting; true if taken.
    @inline(__always) public func tryLock() -> Bool {
        pthread_mutex_trylock(mutex) == 0
    }

    @inline(__always) public func unlock() {
        pthread_mutex_unlock(mutex)
    }

    /// Releases the lock until condition `which` is signalled, then takes it again (spurious
    /// wake-ups happen: wait in a loop).
    public func wait(_ which: Int = 0) {
        pthread_cond_wait(conditions + checked(which), mutex)
    }

    /// Wakes one thread waiting on condition `which`.
    public func signal(_ which: Int = 0) {
        pthread_cond_signal(conditions + checked(which))
    }

    /// Wakes every thread waiting on condition `which`.
    public func broadcast(_ which: Int = 0) {
        pthread_cond_broadcast(conditions + checked(which))
    }

    @inline(__always) private func checked(_ which: Int) -> Int {
        precondition(which >= 0 && which < count, "condition \(which) of a ConditionLock with \(count)")
        return which
    }
}
