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
        connection.close()
    }
}
