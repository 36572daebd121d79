import CairnCodec
import CairnStorage
import Foundation

// `cairn-example ledger [directory]`: a durable ledger in a few lines: every event is appended to a log before it is applied,
// the state is checkpointed (encoded, zstd-compressed, checksummed) every 1,000 events, and
// on start the state is rebuilt from the newest valid checkpoint plus the log after it.
// Run it twice: the second run continues where the first stopped.

func runLedger(directory: String) throws {
    let store = try DurableStore.lmdb(directory: directory)
    defer { store.close() }
    try ledgerDemo(store, directory: directory)
}

struct Ledger: Codable {
    var balances: [String: Int] = [:]
    var applied: UInt64 = 0  // sequence number of the next event to apply
}

struct Transfer: Codable {
    var from: String
    var to: String
    var amount: Int
}

func ledgerDemo(_ store: DurableStore, directory: String) throws {
// Recover: newest valid checkpoint, then replay the log after it.
let started = Date()
var ledger = Ledger()
if let (state, read) = try store.newestCheckpoint(Ledger.self, "ledger") {
    ledger = state
    for bad in read.rejected { print("skipped a corrupt checkpoint at \(bad.sequence): \(bad.error)") }
}
let replay = try store.readLog("ledger-log", from: ledger.applied)
let decoder = BinaryDecoder()
for entry in replay {
    let t = try decoder.decode(Transfer.self, from: entry.payload)
    ledger.balances[t.from, default: 0] -= t.amount
    ledger.balances[t.to, default: 0] += t.amount
    ledger.applied = entry.sequence + 1
}
print("recovered \(ledger.applied) events (\(replay.count) replayed from the log) in \(String(format: "%.1f", Date().timeIntervalSince(started) * 1000)) ms")

// Apply 5,000 new transfers: log first (durably, in batches), then apply.
let accounts = ["alice", "bob", "carol", "dave"]
let encoder = BinaryEncoder()
for batchStart in stride(from: 0, to: 5_000, by: 250) {
    let transfers = (batchStart..<batchStart + 250).map { i in
        Transfer(from: accounts[i % 4], to: accounts[(i / 4 + 1) % 4], amount: i % 17 + 1)
    }
    let first = try store.append(to: "ledger-log", transfers.map { try encoder.encode($0) })
    for (offset, t) in transfers.enumerated() {
        ledger.balances[t.from, default: 0] -= t.amount
        ledger.balances[t.to, default: 0] += t.amount
        ledger.applied = first + UInt64(offset) + 1
    }
    if ledger.applied % 1_000 < 250 {
        let bytes = try store.writeCheckpoint("ledger", sequence: ledger.applied, state: ledger)
        // Everything before the checkpoint is in it: the log before it can go.
        try store.truncateLog("ledger-log", before: ledger.applied)
        print("checkpoint at event \(ledger.applied): \(bytes) bytes")
    }
}

let total = ledger.balances.values.reduce(0, +)
print("balances: \(ledger.balances.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")) (sum \(total), always 0)")
print("state is in ./\(directory); run again to recover it and continue")
}
