import CairnCore
import Foundation

/// Gathers concurrent writers' batches into one fsync'd transaction.
///
/// Two threads per store. The committer takes everything queued (up to `maxOperations`)
/// and runs it as one transaction; the syncer then makes that transaction durable and
/// completes each writer with its own result, while the committer already builds the next
/// one. While a commit is in flight new writers queue up behind it, so batch size adapts
/// to the load. A writer is completed only after a sync that began after its commit.
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
    private let sync: () throws -> Void
    /// Committed, not yet durable: guarded by `syncCondition`.
    private let syncCondition = NSCondition()
    private var unsynced: [(Completion, Result<CommitResult, StorageError>)] = []
    private var syncerRunning = true
    private var committerDone = false

    /// - Parameters:
    ///   - execute: runs the batches as one transaction, not necessarily durable yet.
    ///   - sync: makes every transaction committed before the call durable.
    init(maxOperations: Int, execute: @escaping ([WriteBatch]) throws -> [CommitResult], sync: @escaping () throws -> Void) {
        precondition(maxOperations >= 1, "maxOperationsPerCommit must be at least 1")
        self.maxOperations = maxOperations
        self.execute = execute
        self.sync = sync
        startThread(named: "cairn-gcommit") { [self] in run() }
        startThread(named: "cairn-gsync") { [self] in runSyncer() }
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
        try blockingWait { submit(batch, $0) }
    }

    /// Commits what is queued, then stops the thread. Idempotent.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        while running { condition.wait() }
        condition.unlock()
        syncCondition.lock()
        committerDone = true
        syncCondition.broadcast()
        while syncerRunning { syncCondition.wait() }
        syncCondition.unlock()
    }

    private func runSyncer() {
        while true {
            syncCondition.lock()
            while unsynced.isEmpty && !committerDone { syncCondition.wait() }
            if unsynced.isEmpty {
                syncerRunning = false
                syncCondition.broadcast()
                syncCondition.unlock()
                return
            }
            let work = unsynced
            unsynced = []
            syncCondition.unlock()
            do {
                try sync()
                for (completion, result) in work { completion(result) }
            } catch {
                let failure = error as? StorageError ?? StorageError(.io, "\(error)")
                for (completion, _) in work { completion(.failure(failure)) }
            }
        }
    }

    private func hand(_ items: [(Completion, Result<CommitResult, StorageError>)]) {
        syncCondition.lock()
        unsynced.append(contentsOf: items)
        syncCondition.signal()
        syncCondition.unlock()
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
                hand(work.enumerated().map { (i, item) in (item.1, .success(results[i])) })
            } catch {
                // Nothing of a failed transaction was applied: report at once, no sync needed.
                let failure = error as? StorageError ?? StorageError(.io, "\(error)")
                for item in work { item.1(.failure(failure)) }
            }
        }
    }
}

