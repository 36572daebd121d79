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
///
/// It also measures the floor under every round trip between threads and processes: a TCP round
/// trip on loopback between two threads blocked in `read` (each message wakes a thread), the same
/// with both threads spinning on non-blocking sockets (no wake-up), and a wake-up alone (two
/// threads handing a token back and forth through a condition variable). And the longest gap
/// between replies in a pipeline of two threads that sleep when idle, alone and beside a thread
/// that computes at nice 10, with the threads placed by the kernel and pinned (the pipeline to
/// one CPU, the computing thread to another; see ``pipelineGap(background:pinning:)``).
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
        report.add("machine.loopback_rtt_p50_us", try loopbackRoundTrip(spinning: false), "us")
        report.add("machine.loopback_rtt_spinning_p50_us", try loopbackRoundTrip(spinning: true), "us")
        report.add("machine.thread_wake_p50_us", wakeUp(), "us")
        report.add("machine.pipeline_gap_max_us", pipelineGap(background: false)!, "us")
        report.add("machine.pipeline_gap_max_us_background_nice10", pipelineGap(background: true)!, "us")
        // The same pipelines pinned to CPUs 0 and 1, if this machine lets threads be pinned there.
        if cpus >= 2, let pin = ThreadAffinity.shared,
           let alone = pipelineGap(background: false, pinning: pin), let beside = pipelineGap(background: true, pinning: pin) {
            report.add("machine.pipeline_gap_max_us_one_cpu", alone, "us")
            report.add("machine.pipeline_gap_max_us_one_cpu_background_nice10_other_cpu", beside, "us")
        } else {
            FileHandle.standardError.write(Data("machine: threads cannot be pinned to CPUs 0 and 1 here; the pinned pipeline figures are left out\n".utf8))
        }
    }

    /// Keeps a CPU busy computing until `stop` is set.
    static func spin(until stop: borrowing Atomic<Bool>) {
        var x: UInt64 = 1
        while !stop.load(ordering: .relaxed) { x = x &* 6364136223846793005 &+ 1 }
        withExtendedLifetime(x) {}
    }

    /// The longest gap, in microseconds, between two replies in a pipeline of two threads with
    /// 16 requests outstanding: a caller hands requests to a server through a queue and a
    /// condition variable, the server answers each after 300 multiply-adds, and both sleep when
    /// their queue is empty (as a driver and an actor's worker do). With `background`, a third
    /// thread at nice 10 computes all the while, as a checkpoint writer does: what
    /// `checkpoint.pause_max_us` meets on this machine with no Cairn code, for a driver and a
    /// worker the kernel places freely.
    ///
    /// With `pinning`, the caller and the server may run only on CPU 0 and the background thread
    /// only on CPU 1: every hand-off in the pipeline is then a switch on one CPU, never a wake-up
    /// of another, and the background thread never shares their CPU. Nil if a thread could not
    /// be pinned.
    func pipelineGap(background: Bool, pinning: ThreadAffinity? = nil) -> Double? {
        final class Queue: @unchecked Sendable {
            let condition = NSCondition()
            var items = 0
            var closed = false
            func put(_ n: Int) {
                condition.lock()
                items += n
                condition.signal()
                condition.unlock()
            }
            /// Everything queued (waiting for something), or 0 once closed.
            func takeAll() -> Int {
                condition.lock()
                defer { condition.unlock() }
                while items == 0 && !closed { condition.wait() }
                let n = items
                items = 0
                return n
            }
            func close() {
                condition.lock()
                closed = true
                condition.broadcast()
                condition.unlock()
            }
        }
        let requests = Queue()
        let replies = Queue()
        let stop = Atomic<Bool>(false)
        let unpinned = Atomic<Bool>(false)
        let done = DispatchSemaphore(value: 0)
        Thread {
            if let pinning, !pinning.pinCurrentThread(to: 0) { unpinned.store(true, ordering: .relaxed) }
            while true {
                let n = requests.takeAll()
                if n == 0 { break }
                var x: UInt64 = 1
                for _ in 0..<(n * 300) { x = x &* 6364136223846793005 &+ 1 }
                withExtendedLifetime(x) {}
                replies.put(n)
            }
            done.signal()
        }.start()
        if background {
            Thread {
                // On Linux the nice value is per thread, and `who == 0` means the calling thread.
                _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
                if let pinning, !pinning.pinCurrentThread(to: 1) { unpinned.store(true, ordering: .relaxed) }
                Self.spin(until: stop)
                done.signal()
            }.start()
        }
        // The caller, on a thread of its own (this one may not be pinned).
        let seconds = self.seconds
        let worst = Atomic<UInt64>(0)
        Thread {
            if let pinning, !pinning.pinCurrentThread(to: 0) { unpinned.store(true, ordering: .relaxed) }
            requests.put(16)
            // Timed after a tenth of a second of warming up.
            let start = now()
            var last = start
            var longest = 0.0
            while last - start < seconds + 0.1 {
                let n = replies.takeAll()
                let t = now()
                if t - start > 0.1 { longest = max(longest, t - last) }
                last = t
                requests.put(n)
            }
            worst.store(UInt64(longest * 1e9), ordering: .relaxed)
            stop.store(true, ordering: .relaxed)
            requests.close()
            done.signal()
        }.start()
        done.wait()
        done.wait()
        if background { done.wait() }
        if unpinned.load(ordering: .relaxed) { return nil }
        return Double(worst.load(ordering: .relaxed)) / 1e3
    }

    /// The median round trip of a 64-byte message over a loopback TCP connection (no delay)
    /// between this thread and an echoing thread, 20,000 times after 1,000 to warm up. Blocking
    /// sockets, or non-blocking ones both ends poll without sleeping.
    func loopbackRoundTrip(spinning: Bool) throws -> Double {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard listener >= 0 else { throw BenchError("socket: errno \(errno)") }
        defer { close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) == 0 && listen(listener, 1) == 0 && getsockname(listener, $0, &length) == 0 }
        }
        guard bound else { throw BenchError("cannot listen on loopback: errno \(errno)") }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(client) }
        let connected = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, length) == 0 }
        }
        let server = accept(listener, nil, nil)
        guard connected, server >= 0 else { throw BenchError("cannot connect on loopback: errno \(errno)") }
        defer { close(server) }
        var one: Int32 = 1
        for fd in [client, server] {
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            if spinning { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        }
        let size = 64
        /// Reads exactly `size` bytes (false at end of stream).
        @Sendable func receive(_ fd: Int32, _ buffer: UnsafeMutableRawPointer) -> Bool {
            var got = 0
            while got < size {
                let n = read(fd, buffer + got, size - got)
                if n > 0 { got += n } else if n == 0 || (errno != EAGAIN && errno != EINTR) { return false }
            }
            return true
        }
        let echoEnded = DispatchSemaphore(value: 0)
        let echo = Thread {
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            defer { buffer.deallocate() }
            while receive(server, buffer) { _ = write(server, buffer, size) }
            echoEnded.signal()
        }
        echo.start()
        // The echo thread sees the end of the stream and is gone before the sockets close.
        defer {
            shutdown(client, Int32(SHUT_WR))
            echoEnded.wait()
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        var samples: [Double] = []
        for i in 0..<21_000 {
            let t0 = now()
            guard write(client, buffer, size) == size, receive(client, buffer) else { throw BenchError("loopback echo failed: errno \(errno)") }
            if i >= 1_000 { samples.append((now() - t0) * 1e6) }
        }
        return median(samples)
    }

    /// Half the median time for a token to go from this thread to another and back through a
    /// condition variable: one wake-up of a sleeping thread.
    func wakeUp() -> Double {
        let condition = NSCondition()
        nonisolated(unsafe) var turn = 0
        let rounds = 20_000
        let other = Thread {
            for i in 0..<rounds {
                condition.lock()
                while turn != 2 * i + 1 { condition.wait() }
                turn += 1
                condition.signal()
                condition.unlock()
            }
        }
        other.start()
        var samples: [Double] = []
        for i in 0..<rounds {
            let t0 = now()
            condition.lock()
            turn += 1
            condition.signal()
            while turn != 2 * i + 2 { condition.wait() }
            condition.unlock()
            if i >= 1_000 { samples.append((now() - t0) * 1e6 / 2) }
        }
        return median(samples)
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
                Self.spin(until: stop)
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

/// glibc's `sched_setaffinity`, which the Swift module does not import: looked up once by name.
struct ThreadAffinity: Sendable {
    typealias SetAffinity = @convention(c) (Int32, Int, UnsafeRawPointer) -> Int32
    let setAffinity: SetAffinity

    static let shared: ThreadAffinity? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "sched_setaffinity") else { return nil }
        return ThreadAffinity(setAffinity: unsafeBitCast(symbol, to: SetAffinity.self))
    }()

    /// Lets the calling thread run only on `cpu` (below 64); false if the kernel refused.
    func pinCurrentThread(to cpu: Int) -> Bool {
        // A `cpu_set_t` is 1,024 bits; pid 0 is the calling thread.
        var mask = [UInt64](repeating: 0, count: 16)
        mask[0] = 1 << UInt64(cpu)
        return mask.withUnsafeBytes { setAffinity(0, $0.count, $0.baseAddress!) } == 0
    }
}
