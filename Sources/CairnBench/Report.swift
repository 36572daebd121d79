import Foundation

/// Collects benchmark figures: prints each as a JSON line when measured, and a table at the end.
final class Report {
    struct Row {
        let metric: String
        let value: Double
        let unit: String
        let goal: String
    }

    private(set) var rows: [Row] = []

    /// Records and prints one figure as `{"metric":…,"value":…,"unit":…}`.
    func add(_ metric: String, _ value: Double, _ unit: String, goal: String = "") {
        rows.append(Row(metric: metric, value: value, unit: unit, goal: goal))
        let rendered = value.isFinite ? String(format: value >= 100 ? "%.0f" : "%.2f", value) : "null"
        print("{\"metric\":\"\(metric)\",\"value\":\(rendered),\"unit\":\"\(unit)\"}")
        fflush(nil)
    }

    /// Prints the human-readable table.
    func printTable() {
        guard !rows.isEmpty else { return }
        let w0 = max(6, rows.map(\.metric.count).max()!)
        let w2 = max(4, rows.map(\.unit.count).max()!)
        print("")
        print("metric".padding(toLength: w0, withPad: " ", startingAt: 0) + "  " + "value".leftPad(12) + "  " + "unit".padding(toLength: w2, withPad: " ", startingAt: 0) + "  goal")
        print(String(repeating: "-", count: w0 + w2 + 30))
        for r in rows {
            let v = r.value >= 100 ? String(format: "%.0f", r.value) : String(format: "%.2f", r.value)
            print(r.metric.padding(toLength: w0, withPad: " ", startingAt: 0) + "  " + v.leftPad(12) + "  " + r.unit.padding(toLength: w2, withPad: " ", startingAt: 0) + "  " + r.goal)
        }
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}

/// Monotonic time in seconds.
func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func percentile(_ samples: [Double], _ p: Double) -> Double {
    guard !samples.isEmpty else { return .nan }
    let sorted = samples.sorted()
    return sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * p + 0.5))]
}

func median(_ samples: [Double]) -> Double { percentile(samples, 0.5) }

/// CPU seconds this machine has spent busy (user, nice, system, irq, softirq; every process
/// and the kernel), from `/proc/stat`: the difference across a phase is what the phase cost,
/// a steadier figure than its rate when the machine's speed varies between runs. Nil where
/// `/proc/stat` cannot be read.
func machineBusyCPUSeconds() -> Double? {
    guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8),
          let line = text.split(separator: "\n").first, line.hasPrefix("cpu ") else { return nil }
    let fields = line.split(separator: " ").dropFirst().compactMap { Double($0) }
    guard fields.count >= 7 else { return nil }
    let ticks = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
}
