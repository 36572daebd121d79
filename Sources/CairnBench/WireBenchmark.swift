import CairnChaosKit
import CairnCore
import CairnNet
import CairnWire
import Foundation

/// `cairn-bench wire`: the wire protocol over TCP on loopback, one connection, both ends in
/// this process (each on its own event loop thread), the handshake done.
struct WireBenchmark {
    func run(_ report: Report) async throws {
        let token = ClusterToken.generate()
        let echo = WireHandlers(message: { c, m in try? c.send(m) }, log: { FileHandle.standardError.write(Data(($0 + "\n").utf8)) })
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: echo)
        defer { Task { try? await listener.close() } }

        // Round trips, one message outstanding.
        let replies = DispatchSemaphore(value: 0)
        let received = Locked(0)
        let client = WireHandlers(message: { _, _ in
            received.update { $0 += 1 }
            replies.signal()
        })
        let connection = try await Wire.connect(host: "127.0.0.1", port: listener.port, token: token, name: "bench", epoch: 1, handlers: client)
        let message = [UInt8](repeating: 0x42, count: 64)
        var samples: [Double] = []
        for i in 0..<21_000 {
            let t0 = now()
            try connection.send(message)
            replies.wait()
            if i >= 1_000 { samples.append((now() - t0) * 1e6) }
        }
        report.add("wire.rtt_p50_us", median(samples), "us", goal: "<= 60 (cluster.task_rtt_p50_us)")
        report.add("wire.rtt_p99_us", percentile(samples, 0.99), "us")

        // Throughput: 1,000,000 messages of 64 bytes one way, counted as they arrive; sending
        // waits when the pending-bytes limit pushes back.
        let counted = Locked(0)
        let counter = WireHandlers(message: { _, _ in counted.update { $0 += 1 } })
        let sink = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: counter)
        let stream = try await Wire.connect(host: "127.0.0.1", port: sink.port, token: token, name: "bench", epoch: 1,
                                            handlers: WireHandlers(message: { _, _ in }))
        let total = 1_000_000
        let t0 = now()
        var sent = 0
        while sent < total {
            do {
                try stream.send(message)
                sent += 1
            } catch WireSendError.backpressure {
                usleep(50)
            }
        }
        while counted.value < total { usleep(100) }
        report.add("wire.messages_per_s", Double(total) / (now() - t0), "messages/s")
        stream.close()
        try await sink.close()

        try await killDetection(report, token: token)
        connection.close()
    }

    /// A peer process connected over the wire is SIGKILLed; time until this side reports the
    /// connection lost. The kernel closes a killed process's sockets, so this is the detection
    /// a node's death gets on one machine (the silence timeout covers a peer that stops
    /// answering without its sockets closing).
    func killDetection(_ report: Report, token: ClusterToken) async throws {
        let lost = Locked<Double?>(nil)
        let established = Locked(0)
        let handlers = WireHandlers(established: { _ in established.update { $0 += 1 } },
                                    message: { _, _ in },
                                    closed: { _, reason in
                                        if case .connectionLost = reason { lost.update { $0 = $0 ?? now() } }
                                    })
        let listener = try await Wire.listen(host: "127.0.0.1", port: 0, token: token, epoch: 1, handlers: handlers)
        defer { Task { try? await listener.close() } }
        setenv("CAIRN_BENCH_TOKEN", token.hex, 1)
        let exe = executableDirectory() + "/cairn-bench"
        var samples: [Double] = []
        for round in 0..<10 {
            lost.update { $0 = nil }
            let child = try ChildProcess(executable: exe, arguments: ["--wire-peer", String(listener.port)])
            guard child.readLine(timeoutMilliseconds: 10_000) == "ready" else {
                child.kill()
                throw BenchError("the wire peer process did not connect")
            }
            while established.value <= round { usleep(100) }
            let t0 = now()
            child.kill()
            while lost.value == nil { usleep(50) }
            samples.append((lost.value! - t0) * 1000)
            _ = child.wait()
        }
        report.add("wire.kill_detect_ms", median(samples), "ms", goal: "<= 300 (recovery.detect_ms)")
        report.add("wire.kill_detect_max_ms", samples.max()!, "ms")
    }

    /// The peer process for ``killDetection(_:token:)``: connects, says "ready", then idles
    /// (its event loop sends heartbeats) until it is killed.
    static func peer(port: Int) async throws {
        guard let hex = getenv("CAIRN_BENCH_TOKEN"), let token = try? ClusterToken(hex: String(cString: hex)) else {
            throw BenchError("--wire-peer needs CAIRN_BENCH_TOKEN")
        }
        _ = try await Wire.connect(host: "127.0.0.1", port: port, token: token, name: "peer", epoch: 1,
                                   handlers: WireHandlers(message: { _, _ in }))
        writeStandardOutputLine("ready")
        while true { try await Task.sleep(for: .seconds(60)) }
    }
}

