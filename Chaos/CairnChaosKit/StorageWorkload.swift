import CairnCore

/// The deterministic content the storage crash workload writes, so a checker can recompute it.
public enum StorageWorkload {
    /// The log the writer appends to.
    public static let log = "crash-log"
    /// The checkpoint name the writer uses.
    public static let checkpoint = "crash-state"

    /// Payload of the `n`-th record of writer `writer`: a header naming both, then 16 to 1,039 seeded bytes.
    public static func record(writer: Int, n: UInt64) -> [UInt8] {
        var rng = SeededGenerator(seed: UInt64(writer) << 48 ^ n)
        let header = Array("w\(writer):\(n);".utf8)
        return header + rng.bytes(16 + Int(rng.next() % 1024))
    }

    /// Checkpoint state for checkpoint number `sequence`: 64 KiB, semi-compressible.
    public static func state(sequence: UInt64) -> [UInt8] {
        var rng = SeededGenerator(seed: sequence &* 0x9E37_79B9)
        return (0..<65_536).map { i in i % 64 < 32 ? UInt8(truncatingIfNeeded: rng.next() & 0x0F) : UInt8(truncatingIfNeeded: i) }
    }
}
