import CairnChaosKit
import CairnStorage
import Foundation

/// The two engines every storage protocol test runs against.
enum Backend: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case lmdb
    case memory

    var testDescription: String { rawValue }

    /// A fresh store; for LMDB in a new temporary directory.
    func makeStore(_ options: StoreOptions = StoreOptions(), initialMapSize: Int = 1 << 20) throws -> (DurableStore, TemporaryDirectory?) {
        switch self {
        case .lmdb:
            let dir = try TemporaryDirectory()
            return (try DurableStore.lmdb(directory: dir.path, options: options, initialMapSize: initialMapSize), dir)
        case .memory:
            return (DurableStore.inMemory(options: options), nil)
        }
    }
}

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

import Testing
