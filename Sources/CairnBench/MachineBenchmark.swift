import Foundation
import Synchronization

/// `cairn-bench machine`: how long the machine itself stops running this process, with no Cairn
/// code involved. A thread that never blocks reads the clock in a loop; the longest gap between
/// two reads is time in which it was not running. Measured with the machine otherwise idle, with
/// every other CPU busy computing, and with one thread doing fdatasync'd 4 KiB writes (1,000 a
/// second, paced by sleeping; or one after the other) with and without the other CPUs busy.
///
/// A pause figure elsewhere (`checkpoint.pause_max_us`) cannot be lower than what the machine
/// imposes under the same load: on a virtual machine whose host counts its disk emulation against
/// the guest's CPU allowance, the whole guest stops for milliseconds at a time.
struct MachineBenchmark {
    let directory: String
    var seconds = 2.0

    func run(_ report: Report) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let cpus = max(1, ProcessInfo.processInfo.activeProcessorCount)
        report.add("machine.stall_max_us_idle", try stall(busy: 0, fsyncsPerSecond: 0), "us")
        report.add("machine.stall_max_us_cpus_busy", try stall(busy: cpus - 1, fsyncsPerSecond: 0), "us")
        report.add("machine.stall_max_us_fsync_1000_per_s", try stall(busy: 0, fsyncsPerSecond: 1000), "us")
        report.add("machine.stall_max_us_fsync_1000_per_s_cpus_busy", try stall(busy: cpus - 1, fsyncsPerSecond: 1000), "us")
        report.add("machine.stall_max_us_fsync_unpaced_cpus_busy", try stall(busy: cpus - 1, fsyncsPerSecond: .max), "us")
    }

    /// The longest gap, in microseconds, between two clock reads of a spinning thread, while `busy`
    /// other threads spin and one thread (if `fsyncsPerSecond` > 0) writes and syncs at that pace
    /// (`.max`: one after the other, as a busy group committer does).
    func stall(busy: Int, fsyncsPerSecond: Int) throws -> Double {
        let stop = Atomic<Bool>(false)
        let started = Atomic<Int>(0)
        let finished = Atomic<Int>(0)
        var threads: [Thread] = []
        for _ in 0..<busy {
            threads.append(Thread {
                started.add(1, ordering: .relaxed)
                var x: UInt64 = 1
                while !stop.load(ordering: .relaxed) { x = x &* 6364136223846793005 &+ 1 }
                withExtendedLifetime(x) {}
                finished.add(1, ordering: .relaxed)
            })
        }
        var fd: Int32 = -1
        if fsyncsPerSecond > 0 {
            let path = directory + "/stall-\(UUID().uuidString)"
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            guard fd >= 0 else { throw BenchError("cannot create \(path): errno \(errno)") }
            unlink(path)
            let file = fd
            threads.append(Thread {
                started.add(1, ordering: .relaxed)
                let block = [UInt8](repeating: 0x5A, count: 4096)
                let t0 = now()
                var n = 0
                while !stop.load(ordering: .relaxed) {
                    if fsyncsPerSecond < .max {
                        let wait = t0 + Double(n) / Double(fsyncsPerSecond) - now()
                        if wait > 0 { usleep(UInt32(wait * 1e6)) }
                    }
                    _ = block.withUnsafeBytes { pwrite(file, $0.baseAddress, 4096, off_t((n % 256) * 4096)) }
                    fdatasync(file)
                    n += 1
                }
                finished.add(1, ordering: .relaxed)
            })
        }
        threads.forEach { $0.start() }
        while started.load(ordering: .relaxed) < threads.count { usleep(100) }
        defer {
            stop.store(true, ordering: .relaxed)
            // The file is closed only once its writer is out of its last fdatasync.
            while finished.load(ordering: .relaxed) < threads.count { usleep(1_000) }
            if fd >= 0 { close(fd) }
        }
        let start = now()
        var last = start
        var worst = 0.0
        while last - start < seconds {
            let t = now()
            worst = max(worst, t - last)
            last = t
        }
        return worst * 1e6
    }
}
