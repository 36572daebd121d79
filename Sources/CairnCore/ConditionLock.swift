#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A mutex with one condition variable, as `NSCondition`, that can also be tried: an event
/// loop thread that must never wait takes it with ``tryLock()`` and leaves the work to a
/// thread that may wait when it is held.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        precondition(pthread_mutex_init(mutex, nil) == 0, "pthread_mutex_init failed")
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        precondition(pthread_cond_init(condition, nil) == 0, "pthread_cond_init failed")
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
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

    /// Releases the lock until signalled, then takes it again (spurious wake-ups happen: wait in a loop).
    public func wait() {
        pthread_cond_wait(condition, mutex)
    }

    public func signal() {
        pthread_cond_signal(condition)
    }

    public func broadcast() {
        pthread_cond_broadcast(condition)
    }
}
