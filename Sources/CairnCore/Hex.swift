/// Bytes as lowercase hex digits, and back.
public enum Hex {
    /// Two lowercase hex digits per byte.
    public static func encode(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(2 * bytes.count)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The bytes of an even number of hex digits (either case). Throws ``Malformed`` with the
    /// position of the first character that is not a hex digit, or of a lone last digit.
    public static func decode(_ text: String) throws(Malformed) -> [UInt8] {
        let digits = Array(text.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var i = 0
        while i < digits.count {
            guard let hi = nibble(digits[i]) else { throw Malformed(position: i) }
            guard i + 1 < digits.count, let lo = nibble(digits[i + 1]) else { throw Malformed(position: i + 1) }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    /// Where a hex string stopped being hex.
    public struct Malformed: Error, Sendable, Equatable {
        public let position: Int
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// The path of the running executable (from `/proc/self/exe`; the first argument where that
/// cannot be read).
public func currentExecutablePath() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, 4095)
    guard n > 0 else { return CommandLine.arguments[0] }
    return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Whether process `pid` has exited: gone, or a zombie waiting for its parent's `wait`
/// (from `/proc/<pid>/stat`).
public func processHasExited(_ pid: Int32) -> Bool {
    let fd = open("/proc/\(pid)/stat", O_RDONLY)
    guard fd >= 0 else { return true }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 512)
    let n = read(fd, &buffer, buffer.count)
    guard n > 0, let close = buffer[..<n].lastIndex(of: UInt8(ascii: ")")), close + 2 < n else { return true }
    return buffer[close + 2] == UInt8(ascii: "Z")
}
