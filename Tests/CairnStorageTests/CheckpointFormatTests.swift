@testable import CairnStorage
import CairnCore
import Testing

@Suite("Checkpoint format")
struct CheckpointFormatTests {
    let payload = Array("the actor's encoded state, repeated: ".utf8) + [UInt8](repeating: 42, count: 4000)

    func code(_ bytes: [UInt8]) -> CheckpointError.Code? {
        do {
            _ = try CheckpointFormat.decode(bytes)
            return nil
        } catch {
            return error.code
        }
    }

    /// Rewrites the checksum so that a deliberate change gets past the CRC check.
    func resealed(_ bytes: [UInt8]) -> [UInt8] {
        var b = bytes
        var crc = b.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<32])) }
        crc = b.withUnsafeBytes { CRC32C.update(crc, UnsafeRawBufferPointer(rebasing: $0[36...])) }
        for i in 0..<4 { b[32 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        return b
    }

    @Test("CRC-32C matches the standard check value")
    func crcCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([]) == 0)
        let long = [UInt8](repeating: 0xA5, count: 1001)
        let split = long.withUnsafeBytes { CRC32C.update(CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[..<13])), UnsafeRawBufferPointer(rebasing: $0[13...])) }
        #expect(split == CRC32C.checksum(long))
    }

    @Test("the hardware and software CRC-32C agree on every length and alignment")
    func crcImplementationsAgree() {
        var rng = SeededGenerator(seed: 99)
        let data = rng.bytes(4096)
        data.withUnsafeBytes { all in
            for start in 0..<9 {
                for length in [0, 1, 7, 8, 9, 63, 64, 1000, 4000] where start + length <= all.count {
                    let slice = UnsafeRawBufferPointer(rebasing: all[start..<(start + length)])
                    #expect(CRC32C.update(0x1234, slice) == CRC32C.softwareUpdate(0x1234, slice))
                }
            }
        }
    }

    @Test("round trip, compressed and stored")
    func roundTrip() throws {
        for codec in [CheckpointFormat.Codec.zstd, .stored] {
            let blob = try CheckpointFormat.encode(payload: payload, sequence: 77, codec: codec)
            let (seq, back) = try CheckpointFormat.decode(blob)
            #expect(seq == 77)
            #expect(back == payload)
        }
        let empty = try CheckpointFormat.encode(payload: [], sequence: 0)
        #expect(try CheckpointFormat.decode(empty).payload == [])
    }

    @Test("pieces: compressed as a stream, handed out in order as they fill, put back together they verify",
          arguments: [0, 1, 5_000, 100_000, 300_000])
    func pieces(size: Int) throws {
        var rng = SeededGenerator(seed: UInt64(7 + size))
        // Half random bytes, half runs: some of it compresses and some does not.
        let raw = (0..<size).map { i in i % 2 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : UInt8(i / 1000 % 256) }
        let pieceSize = 4096
        var emitted: [(Int, [UInt8])] = []
        let (first, total) = try raw.withUnsafeBytes {
            try CheckpointFormat.encodePieces(payload: $0, sequence: 9, workers: 0, pieceSize: pieceSize) { emitted.append(($0, $1)) }
        }
        #expect(emitted.map(\.0) == Array(emitted.indices.map { $0 + 1 }), "indices 1, 2, … in order")
        let pieces = [first] + emitted.map(\.1)
        #expect(pieces.dropLast().allSatisfy { $0.count == pieceSize }, "every piece but the last is full")
        #expect(pieces.last.map { $0.count > 0 && $0.count <= pieceSize } == true)
        let whole = Array(pieces.joined())
        #expect(whole.count == total)
        let (sequence, back) = try CheckpointFormat.decode(whole)
        #expect(sequence == 9)
        #expect(back == raw)
        // A flipped byte anywhere in a later piece fails the checksum.
        if whole.count > pieceSize + 10 {
            var damaged = whole
            damaged[pieceSize + 10] ^= 0x40
            #expect(code(damaged) != nil)
        }
    }

    @Test("each failed check is named: truncated, bad magic, unknown version and codec, checksum, decompression, length")
    func namedChecks() throws {
        let good = try CheckpointFormat.encode(payload: payload, sequence: 3)
        #expect(code(Array(good.prefix(20))) == .truncated)
        #expect(code(Array(good.dropLast(5))) == .truncated)
        #expect(code(good + [0]) == .lengthMismatch)
        var magic = good
        magic[0] = 0x58
        #expect(code(magic) == .badMagic)
        var version = good
        version[4] = 9
        #expect(code(version) == .unknownVersion)
        var codec = good
        codec[6] = 7
        #expect(code(codec) == .unknownCodec)
        var flipped = good
        flipped[good.count / 2] ^= 0x10
        #expect(code(flipped) == .checksumMismatch)
        var header = good
        header[9] ^= 0x01  // the sequence number: covered by the checksum too
        #expect(code(header) == .checksumMismatch)
        var garbled = good
        for i in 40..<min(60, garbled.count) { garbled[i] = 0xEE }
        #expect(code(resealed(garbled)) == .decompressionFailed)
        var wrongRaw = good
        wrongRaw[16] &+= 1
        #expect(code(resealed(wrongRaw)) == .decompressionFailed)  // zstd's frame size disagrees
        let stored = try CheckpointFormat.encode(payload: payload, sequence: 3, codec: .stored)
        var storedRaw = stored
        storedRaw[16] &+= 1
        #expect(code(resealed(storedRaw)) == .lengthMismatch)
    }

    /// 100,000 seeded inputs: mutated checkpoints (half resealed so they pass the checksum and
    /// reach the decompressor) and noise. Each is either accepted or rejected with a
    /// CheckpointError (the reader's throws clause is typed); an unresealed change is never accepted.
    @Test("fuzz: 100,000 mutated and random checkpoints never crash and never pass a changed byte")
    func fuzz() throws {
        let seed = SeededGenerator.seed(fromEnvironment: "CAIRN_FUZZ_SEED")
        print("checkpoint fuzz seed: \(seed) (replay with CAIRN_FUZZ_SEED=\(seed))")
        var rng = SeededGenerator(seed: seed)
        let originals = try (0..<4).map { i in
            try CheckpointFormat.encode(payload: rng.bytes(64 + 100 * i) + [UInt8](repeating: UInt8(i), count: 300), sequence: UInt64(i), codec: i == 3 ? .stored : .zstd)
        }
        var rejected = 0
        for round in 0..<100_000 {
            let original = originals[round % originals.count]
            var input: [UInt8]
            if round % 20 == 19 {
                input = rng.bytes(Int.random(in: 0..<200, using: &rng))
            } else {
                input = original
                for _ in 0..<Int.random(in: 1...3, using: &rng) {
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: input[Int.random(in: 0..<input.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                    case 1: input.removeLast(Int.random(in: 1...min(input.count, 50), using: &rng))
                    default: input.insert(UInt8.random(in: 0...255, using: &rng), at: Int.random(in: 0...input.count, using: &rng))
                    }
                    if input.count < 40 { break }
                }
                if round % 2 == 0 && input.count >= 36 { input = resealed(input) }
            }
            do {
                let (_, out) = try CheckpointFormat.decode(input, maxRawLength: 1 << 20)
                if round % 2 == 1 && round % 20 != 19 {
                    // Not resealed: only an unchanged checkpoint may pass.
                    #expect(input == original, "seed \(seed) round \(round): a changed checkpoint passed verification")
                }
                _ = out
            } catch {
                rejected += 1
            }
        }
        #expect(rejected > 90_000)
    }
}
