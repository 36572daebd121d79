import Foundation

/// Runs a call that reports through a completion handler and waits for its result: the
/// synchronous form of group-committed writes (``DurableStore``, ``AppendLog``).
func blockingWait<T: Sendable>(_ start: (@escaping @Sendable (Result<T, StorageError>) -> Void) -> Void) throws -> T {
    let done = DispatchSemaphore(value: 0)
    let box = ResultBox<T>()
    start { result in
        box.result = result
        done.signal()
    }
    done.wait()
    return try box.result!.get()
}

/// Carries a result from the completing thread to the waiting one; the semaphore orders the accesses.
private final class ResultBox<T: Sendable>: @unchecked Sendable {
    var result: Result<T, StorageError>?
}
