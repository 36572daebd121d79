#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An object per thread: each thread sees what it stored last, or nil. The slot holds a
/// strong reference, released when the thread stores another or ends.
public final class ThreadSlot<Value: AnyObject>: @unchecked Sendable {
    // A pthread key, written only here, in `init`; the values are per thread.
    private var key = pthread_key_t()

    public init() {
        pthread_key_create(&key) { pointer in
            if let pointer { Unmanaged<AnyObject>.fromOpaque(pointer).release() }
        }
    }

    /// What the calling thread stored last, or nil.
    public var value: Value? {
        guard let p = pthread_getspecific(key) else { return nil }
        return Unmanaged<Value>.fromOpaque(p).takeUnretainedValue()
    }

    /// Stores `value` for the calling thread, releasing what it held before.
    public func set(_ value: Value?) {
        let old = pthread_getspecific(key)
        pthread_setspecific(key, value.map { UnsafeRawPointer(Unmanaged.passRetained($0).toOpaque()) })
        if let old { Unmanaged<Value>.fromOpaque(old).release() }
    }
}
