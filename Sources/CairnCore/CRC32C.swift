import CCairnCRC

/// CRC-32C (Castagnoli), the checksum on every checkpoint and log record.
///
/// On x86-64 CPUs with SSE4.2 the CRC32 instruction does the work (see `Storage/CCairnCRC`);
/// elsewhere a software slice-by-8 loop does, with eight 256-entry tables consuming 8 bytes
/// per step. Both give identical results (tested).
/// CRC-32C detects every burst error up to 32 bits and all odd numbers of flipped bits,
/// which is what a torn or bit-rotted record looks like.
public enum CRC32C {
    private static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        let polynomial: UInt32 = 0x82F6_3B78  // reversed Castagnoli polynomial
        for i in 0..<256 {
            var crc = UInt32(i)
            for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ polynomial : crc >> 1 }
            t[i] = crc
        }
        for i in 0..<256 {
            for k in 1..<8 { t[k * 256 + i] = (t[(k - 1) * 256 + i] >> 8) ^ t[Int(t[(k - 1) * 256 + i] & 0xFF)] }
        }
        return t
    }()

    /// Whether the hardware instruction is used.
    public static let hardwareAccelerated = cairn_crc32c_hw_available() == 1

    /// Extends `crc` (0 to start) with `bytes`.
    @inline(__always)
    public static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        if hardwareAccelerated {
            guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
            return cairn_crc32c_hw(crc, base, bytes.count)
        }
        return softwareUpdate(crc, bytes)
    }

    /// The portable implementation, used when the CPU lacks the CRC32 instruction.
    public static func softwareUpdate(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = ~crc
        guard var p = bytes.baseAddress, bytes.count > 0 else { return crc }
        var n = bytes.count
        tables.withUnsafeBufferPointer { t in
            let t = t.baseAddress!
            while n >= 8 {
                let word = UInt64(littleEndian: p.loadUnaligned(as: UInt64.self)) ^ UInt64(c)
                c = t[7 * 256 + Int(word & 0xFF)] ^ t[6 * 256 + Int((word >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((word >> 16) & 0xFF)] ^ t[4 * 256 + Int((word >> 24) & 0xFF)]
                    ^ t[3 * 256 + Int((word >> 32) & 0xFF)] ^ t[2 * 256 + Int((word >> 40) & 0xFF)]
                    ^ t[1 * 256 + Int((word >> 48) & 0xFF)] ^ t[Int(word >> 56)]
                p += 8
                n -= 8
            }
            while n > 0 {
                c = t[Int((c ^ UInt32(p.load(as: UInt8.self))) & 0xFF)] ^ (c >> 8)
                p += 1
                n -= 1
            }
        }
        return ~c
    }

    /// The checksum of `bytes`.
    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 { update(0, bytes) }

    /// The checksum of `bytes`.
    public static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { update(0, $0) } }
}
