import Foundation

/// Gathers concurrent writers' batches into one fsync'd transaction.
///
/// One committer thread per store: writers append to `queue` and either wait or give a
/// completion; the thread takes everything queued (up to `maxOperations`), runs it as one
/// transaction, and completes each writer with its own result. While a commit is being
/// fsync'd, new writers queue up behind it, so the batch size adapts to the load.
///
/// Thread safety (why `@unchecked Sendable` is sound): `queue` and `stopping` are only
/// touched with `condition` locked; `execute` runs on the committer thread only.
final class GroupCommitter: @unchecked Sendable {
    typealias Completion = @Sendable (Result<CommitResult, StorageError>) -> Void

    private let condition = NSCondition()
    private var queue: [(WriteBatch, Completion)] = []
    private var stopping = false
    private var running = true
    private let maxOperations: Int
    private let execute: ([WriteBatch]) throws -> [CommitResult]

    init(maxOperations: Int, execute: @escaping ([WriteBatch]) throws -> [CommitResult]) {
        precondition(maxOperations >= 1, "maxOperationsPerCommit must be at least 1")
        self.maxOperations = maxOperations
        self.execute = execute
        let thread = Thread { [self] in run() }
        thread.name = "cairn-group-commit"
        thread.start()
    }

    func submit(_ batch: WriteBatch, _ completion: @escaping Completion) {
        condition.lock()
        if stopping {
            condition.unlock()
            completion(.failure(StorageError(.closed, "the store was closed before this write was committed")))
            return
        }
        queue.append((batch, completion))
        if queue.count == 1 { condition.signal() }
        condition.unlock()
    }

    func submitAndWait(_ batch: WriteBatch) throws -> CommitResult {
        let done = DispatchSemaphore(value: 0)
        let box = ResultBox()
        submit(batch) { result in
            box.result = result
            done.signal()
        }
        done.wait()
        return try box.result!.get()
    }

    /// Commits what is queued, then stops the thread. Idempotent.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        while running { condition.wait() }
        condition.unlock()
    }

    private func run() {
        while true {
            condition.lock()
            while queue.isEmpty && !stopping { condition.wait() }
            if queue.isEmpty {
                running = false
                condition.broadcast()
                condition.unlock()
                return
            }
            var taken = 0
            var weight = 0
            while taken < queue.count && (taken == 0 || weight + queue[taken].0.weight <= maxOperations) {
                weight += queue[taken].0.weight
                taken += 1
            }
            let work = Array(queue[..<taken])
            queue.removeFirst(taken)
            condition.unlock()

            do {
                let results = try execute(work.map(\.0))
                for (i, item) in work.enumerated() { item.1(.success(results[i])) }
            } catch {
                let failure = error as? StorageError ?? StorageError(.io, "\(error)")
                for item in work { item.1(.failure(failure)) }
            }
        }
    }
}

/// Carries a result from the committer thread to a waiting writer; the semaphore orders the accesses.
private final class ResultBox: @unchecked Sendable {
    var result: Result<CommitResult, StorageError>?
}
