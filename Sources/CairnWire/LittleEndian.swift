/// Little-endian integers in frames and handshake payloads.
/// Appends `v`'s low `size` bytes to `out` (in place: frames are built on the send path).
func appendLE(_ v: UInt64, size: Int = 8, to out: inout [UInt8]) {
    for i in 0..<size { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
}

func readLE(_ bytes: [UInt8], _ at: Int, size: Int = 8) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<size { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
    return v
}
