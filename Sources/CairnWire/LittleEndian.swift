/// Little-endian integers in frames and handshake payloads.
func le(_ v: UInt64, size: Int = 8) -> [UInt8] {
    (0..<size).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
}

func readLE(_ bytes: [UInt8], _ at: Int, size: Int = 8) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<size { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
    return v
}
