import Cairn
import CairnChaosKit
import CairnStorage
import Foundation

/// The two engines every storage protocol test runs against.
enum Backend: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case lmdb
    case memory
    /// A ``ReplicatedEngine`` journalling to a real embedded GCS (three replicas per chain, each in LMDB).
    case replicated

    var testDescription: String { rawValue }

    /// A fresh store, and what must stay alive while it is used: for LMDB a new temporary
    /// directory; for the replicated engine the GCS it writes to (shut down when released).
    func makeStore(_ options: StoreOptions = StoreOptions(), initialMapSize: Int = 1 << 20) throws -> (DurableStore, AnyObject?) {
        switch self {
        case .lmdb:
            let dir = try TemporaryDirectory()
            return (try DurableStore.lmdb(directory: dir.path, options: options, initialMapSize: initialMapSize), dir)
        case .memory:
            return (DurableStore.inMemory(options: options), nil)
        case .replicated:
            let gcs = try RunningGCS()
            let engine = try ReplicatedEngine(map: gcs.gcs.replicatedMap(namespace: "test"))
            return (DurableStore(engine: engine, options: options), gcs)
        }
    }
}

/// An embedded GCS for a test, shut down when released.
final class RunningGCS: Sendable {
    let gcs: EmbeddedGCS
    init(shards: Int = 2) throws {
        gcs = try EmbeddedGCS.start(EmbeddedGCS.Options(shards: shards))
    }
    deinit { gcs.shutdown() }
}

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

import Testing
