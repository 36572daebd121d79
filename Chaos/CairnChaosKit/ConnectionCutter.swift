import Cairn
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Destroys TCP connections between processes of this machine with `ss -K` (the kernel's
/// SOCK_DESTROY): the socket is aborted and the peer reset, as after a network fault, while
/// both processes live on.
public enum ConnectionCutter {
    static let ss = ["/usr/bin/ss", "/bin/ss", "/usr/sbin/ss", "/sbin/ss"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// Why connections cannot be cut here, or nil if they can: tried on a loopback connection
    /// of this process.
    public static func unavailable() -> String? {
        guard ss != nil else { return "no ss executable (iproute2)" }
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer {
            close(listener)
            close(client)
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { a in
                bind(listener, a, length) == 0 && listen(listener, 1) == 0 && getsockname(listener, a, &length) == 0
                    && connect(client, a, length) == 0
            }
        }
        guard bound else { return "cannot make a loopback connection to try ss -K on" }
        let accepted = accept(listener, nil, nil)
        defer { close(accepted) }
        let port = Int(UInt16(bigEndian: address.sin_port))
        guard (try? run(["-K", "-t", "-n", "dport", "=", ":\(port)"])) != nil else { return "ss -K failed" }
        var byte: UInt8 = 0
        let received = recv(client, &byte, 1, Int32(MSG_DONTWAIT))
        guard received < 0 && errno == ECONNABORTED else { return "ss -K did not destroy a socket (a kernel without CONFIG_INET_DIAG_DESTROY?)" }
        return nil
    }

    /// Cuts every connection from one of `pids` to a port another of them listens on; returns
    /// how many.
    public static func cutConnections(among pids: Set<Int>) -> Int {
        guard let listening = try? run(["-t", "-l", "-n", "-p", "-H"]), let established = try? run(["-t", "-n", "-p", "-H"]) else { return 0 }
        // State, queues, local address, peer address (`*` for a listener's port), the process.
        func rows(_ text: String) -> [(local: Int, peer: Int?, pid: Int)] {
            text.split(separator: "\n").compactMap { line in
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                guard fields.count >= 6, let pidField = line.range(of: "pid="),
                      let pid = Int(line[pidField.upperBound...].prefix { $0.isNumber }),
                      let local = fields[3].split(separator: ":").last.flatMap({ Int($0) }) else { return nil }
                return (local, fields[4].split(separator: ":").last.flatMap { Int($0) }, pid)
            }
        }
        let ports = Set(rows(listening).filter { pids.contains($0.pid) }.map(\.local))
        let pairs = rows(established).compactMap { row -> (Int, Int)? in
            guard pids.contains(row.pid), let peer = row.peer, ports.contains(peer) else { return nil }
            return (row.local, peer)
        }
        guard !pairs.isEmpty else { return 0 }
        // One `ss` for all of them: `( sport = :a and dport = :b ) or ( … )`.
        var filter: [String] = []
        for (i, (local, peer)) in pairs.enumerated() {
            if i > 0 { filter.append("or") }
            filter += ["(", "sport", "=", ":\(local)", "and", "dport", "=", ":\(peer)", ")"]
        }
        return (try? run(["-K", "-t", "-n"] + filter)) != nil ? pairs.count : 0
    }

    /// `ss` with `arguments`; its standard output.
    @discardableResult
    static func run(_ arguments: [String]) throws -> String {
        try runTool(ss ?? "ss", arguments)
    }
}

/// Runs `executable` with `arguments` and waits for it; its standard output. Throws
/// ``CairnError`` if it cannot start or exits with a status other than 0.
@discardableResult
public func runTool(_ executable: String, _ arguments: [String]) throws -> String {
    let command = ([executable] + arguments).joined(separator: " ")
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let output = Pipe()
    process.standardOutput = output
    process.standardError = FileHandle.nullDevice
    do {
        try process.run()
    } catch {
        throw CairnError(.invalidArgument, "\(command): \(error)")
    }
    let data = output.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw CairnError(.invalidArgument, "\(command) exited with status \(process.terminationStatus)") }
    return String(decoding: data, as: UTF8.self)
}
