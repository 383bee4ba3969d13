#include "suite/harness.hpp"

#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <time.h>
#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <new>
#include <stdexcept>
#include <thread>

namespace lim_bench {

namespace {
constexpr int kMaxWorkers = 64;
}

void* shared_memory(std::size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("mmap");
        std::abort();
    }
    return p;
}

void spin_for(std::int64_t ns) noexcept {
    const std::int64_t until = now_ns() + ns;
    while (now_ns() < until) {
    }
}

int Histogram::bucket(std::uint64_t ns) noexcept {
    if (ns < 16) return static_cast<int>(ns);
    const int e = static_cast<int>(std::bit_width(ns)) - 1;  // 4..63
    const int sub = static_cast<int>((ns >> (e - 4)) & 15);
    return std::min(kBuckets - 1, (e - 3) * 16 + sub);
}

std::uint64_t Histogram::bucket_value(int b) noexcept {
    if (b < 16) return static_cast<std::uint64_t>(b);
    const int e = b / 16 + 3;
    const std::uint64_t sub = static_cast<std::uint64_t>(b % 16);
    const std::uint64_t low = (16 + sub) << (e - 4);
    return low + (std::uint64_t{1} << (e - 4)) / 2;
}

void Histogram::merge(const Histogram& other) noexcept {
    for (int i = 0; i < kBuckets; ++i)
        counts[i] += other.counts[i];
}

std::uint64_t Histogram::total() const noexcept {
    std::uint64_t t = 0;
    for (auto c : counts)
        t += c;
    return t;
}

std::uint64_t Histogram::count_at_least(std::uint64_t ns) const noexcept {
    std::uint64_t n = 0;
    for (int i = bucket(ns) + 1; i < kBuckets; ++i)
        n += counts[i];
    return n;
}

std::uint64_t Histogram::percentile(double q) const noexcept {
    const std::uint64_t n = total();
    if (n == 0) return 0;
    const auto rank = static_cast<std::uint64_t>(q * static_cast<double>(n - 1)) + 1;
    std::uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
        seen += counts[i];
        if (seen >= rank) return bucket_value(i);
    }
    return bucket_value(kBuckets - 1);
}

namespace {

struct Control {
    std::atomic<int> ready;
    std::atomic<int> go;
    std::atomic<int> stop;
    alignas(64) std::atomic<std::uint64_t> marks[kMaxWorkers];
    WorkerStats workers[kMaxWorkers];
    Histogram merged;
};

Control* control() {
    static Control* c = static_cast<Control*>(shared_memory(sizeof(Control)));
    return c;
}

std::uint64_t voluntary_switches() {
    rusage u{};
    ::getrusage(RUSAGE_SELF, &u);
    return static_cast<std::uint64_t>(u.ru_nvcsw);
}

// LIM_SUITE_PIN=1: worker i runs on the (i mod n)-th of the n CPUs it may use, so that on a
// machine shared with other work the scheduler cannot stack two contenders on one CPU (which
// measures time slicing, not contention) for part of a run. For A/B runs; unset by bench.sh.
void pin_if_asked(int index) {
    const char* e = std::getenv("LIM_SUITE_PIN");
    if (e == nullptr || std::strcmp(e, "1") != 0) return;
    cpu_set_t allowed;
    if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    const int n = CPU_COUNT(&allowed);
    if (n <= 0) return;
    int want = index % n;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &allowed) || want-- != 0) continue;
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        ::sched_setaffinity(0, sizeof one, &one);
        return;
    }
}

[[noreturn]] void worker(int index, const OpFactory& factory, const RunOptions& options) {
    pin_if_asked(index);
    Control& c = *control();
    WorkerStats& me = c.workers[index];
    try {
        Op op = factory();
        c.ready.fetch_add(1);
        while (c.go.load(std::memory_order_acquire) == 0)
            ::sched_yield();
        const std::uint64_t csw0 = voluntary_switches();
        std::uint64_t seen_mark = c.marks[index].load(std::memory_order_relaxed);
        std::uint64_t ops = 0, ok = 0;
        const int every = std::max(1, options.sample_every);
        while (c.stop.load(std::memory_order_relaxed) == 0) {
            for (int k = 0; k < every; ++k) {
                if (k == 0) {
                    const std::int64_t t0 = now_ns();
                    ok += op() ? 1 : 0;
                    const std::int64_t lat = now_ns() - t0;
                    // An operation that spans a SIGSTOP of this worker measured the stop.
                    const std::uint64_t mark = c.marks[index].load(std::memory_order_relaxed);
                    if (mark != seen_mark)
                        seen_mark = mark;
                    else
                        me.latency.add(static_cast<std::uint64_t>(lat));
                } else {
                    ok += op() ? 1 : 0;
                }
            }
            ops += static_cast<std::uint64_t>(every);
        }
        me.ops = ops;
        me.ok = ok;
        me.csw = voluntary_switches() - csw0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "worker %d: %s\n", index, e.what());
        me.failed = 1;
        c.ready.fetch_add(1);
    }
    ::_exit(0);
}

}  // namespace

std::atomic<std::uint64_t>* stop_marks() {
    return control()->marks;
}

RunResult run(const OpFactory& factory, const RunOptions& options) {
    if (options.processes < 1 || options.processes > kMaxWorkers)
        throw std::runtime_error("run: processes out of range");
    Control& c = *control();
    std::memset(static_cast<void*>(&c), 0, sizeof(Control));
    std::vector<pid_t> pids;
    for (int i = 0; i < options.processes; ++i) {
        std::fflush(nullptr);
        const pid_t pid = ::fork();
        if (pid < 0) throw std::runtime_error("fork failed");
        if (pid == 0) worker(i, factory, options);
        pids.push_back(pid);
    }
    // A worker that died before it was ready (a crash in its set-up) must not hang the run.
    const std::int64_t ready_by = now_ns() + 60'000'000'000;
    while (c.ready.load() < options.processes) {
        if (now_ns() > ready_by) {
            for (pid_t pid : pids) {
                ::kill(pid, SIGKILL);
                ::waitpid(pid, nullptr, 0);
            }
            throw std::runtime_error("workers did not start within 60 s");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds{1});
    }
    const std::int64_t t0 = now_ns();
    c.go.store(1, std::memory_order_release);
    if (options.driver)
        options.driver(pids);
    else
        std::this_thread::sleep_for(options.duration);
    c.stop.store(1);
    const std::int64_t t1 = now_ns();
    bool failed = false;
    for (pid_t pid : pids) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = true;
    }
    RunResult r;
    r.processes = options.processes;
    r.seconds = static_cast<double>(t1 - t0) / 1e9;
    for (int i = 0; i < options.processes; ++i) {
        const WorkerStats& w = c.workers[i];
        if (w.failed) failed = true;
        r.ops += w.ops;
        r.ok += w.ok;
        r.csw += w.csw;
        c.merged.merge(w.latency);
    }
    if (failed) throw std::runtime_error("a worker failed");
    r.latency = &c.merged;
    return r;
}

namespace {
// CPU time of the calling thread: what the op costs while it runs, not the time other work on a
// shared machine takes the core away (wall time counts both).
std::int64_t thread_cpu_ns() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}
}  // namespace

double ns_per_op(const Op& op, int rounds, std::chrono::milliseconds batch) {
    // Calibrate a batch size that takes about `batch`, then time `rounds` batches.
    std::uint64_t n = 1000;
    for (;;) {
        const std::int64_t t0 = thread_cpu_ns();
        for (std::uint64_t i = 0; i < n; ++i)
            op();
        const std::int64_t dt = thread_cpu_ns() - t0;
        if (dt >= batch.count() * 1'000'000 / 4 || n > (1ULL << 32)) {
            n = std::max<std::uint64_t>(
                1, static_cast<std::uint64_t>(static_cast<double>(n) *
                                              static_cast<double>(batch.count()) * 1e6 /
                                              static_cast<double>(std::max<std::int64_t>(dt, 1))));
            break;
        }
        n *= 4;
    }
    std::vector<double> per;
    for (int r = 0; r < rounds; ++r) {
        const std::int64_t t0 = thread_cpu_ns();
        for (std::uint64_t i = 0; i < n; ++i)
            op();
        per.push_back(static_cast<double>(thread_cpu_ns() - t0) / static_cast<double>(n));
    }
    // The fastest batch: on a shared machine noise only ever adds time, so the minimum is the
    // steadiest estimate of what the operation itself costs.
    return *std::min_element(per.begin(), per.end());
}

std::string machine_line() {
    std::string model = "unknown CPU";
    std::ifstream cpuinfo("/proc/cpuinfo");
    for (std::string line; std::getline(cpuinfo, line);) {
        if (line.rfind("model name", 0) == 0) {
            model = line.substr(line.find(':') + 2);
            break;
        }
    }
    utsname u{};
    ::uname(&u);
    return model + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores, Linux " +
           u.release;
}

std::string date_line() {
    const std::time_t t = std::time(nullptr);
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&t));
    return buf;
}

}  // namespace lim_bench
