import CairnCodec
import Foundation

/// `cairn-bench codec`: encode and decode throughput of the binary format.
struct CodecBenchmark {
    /// Also measure Foundation's JSON coders on the same value, for comparison.
    var compareJSON = true

    struct Row: Codable, Equatable {
        var id: Int
        var timestamp: Int64
        var name: String
        var score: Double
        var active: Bool
    }

    struct Table: Codable, Equatable {
        var rows: [Row]
    }

    func run(_ report: Report) throws {
        let table = Table(rows: (0..<100_000).map {
            Row(id: $0, timestamp: 1_700_000_000_000 + Int64($0) * 37, name: "user-\($0 % 9973)", score: Double($0) * 0.731, active: $0 % 3 == 0)
        })
        let encoder = BinaryEncoder()
        let decoder = BinaryDecoder()
        var bytes = try encoder.encode(table)
        var encodeRates: [Double] = []
        var decodeRates: [Double] = []
        for _ in 0..<7 {
            let t0 = now()
            bytes = try encoder.encode(table)
            let t1 = now()
            let back = try decoder.decode(Table.self, from: bytes)
            let t2 = now()
            precondition(back.rows.count == table.rows.count && back.rows[99_999] == table.rows[99_999], "codec round trip failed")
            encodeRates.append(Double(bytes.count) / 1_048_576 / (t1 - t0))
            decodeRates.append(Double(bytes.count) / 1_048_576 / (t2 - t1))
        }
        report.add("codec.encode_mb_per_s", median(encodeRates), "MB/s", goal: ">= 150")
        report.add("codec.decode_mb_per_s", median(decodeRates), "MB/s", goal: ">= 100")
        report.add("codec.bytes_per_row", Double(bytes.count) / 100_000, "bytes")

        guard compareJSON else { return }
        // The same value through Foundation's JSON coders, for comparison (MB of JSON per second).
        let t0 = now()
        let json = try JSONEncoder().encode(table)
        let t1 = now()
        _ = try JSONDecoder().decode(Table.self, from: json)
        let t2 = now()
        report.add("codec.json_encode_mb_per_s", Double(json.count) / 1_048_576 / (t1 - t0), "MB/s")
        report.add("codec.json_decode_mb_per_s", Double(json.count) / 1_048_576 / (t2 - t1), "MB/s")
    }
}
