// The multi-process harness of lim_suite: shared memory, a latency histogram that forked workers
// fill in shared memory, and a runner that forks N workers, starts them together, stops them
// after a duration and sums what they did.
//
// Latencies are recorded in a log-linear histogram (16 sub-buckets per power of two, so a
// percentile is exact to within 1/16 of its value) rather than as raw samples: a 32-process run
// of a few seconds does tens of millions of operations, and the histogram keeps every sampled one
// in 8 KiB per worker.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lim_bench {

// Anonymous MAP_SHARED memory, zeroed, inherited by forked children. Aborts if mmap fails.
void* shared_memory(std::size_t bytes);

inline std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// Busy-waits for about `ns` nanoseconds (the "work" done while holding a unit).
void spin_for(std::int64_t ns) noexcept;

struct Histogram {
    static constexpr int kBuckets = 1024;
    std::uint64_t counts[kBuckets];

    static int bucket(std::uint64_t ns) noexcept;
    static std::uint64_t bucket_value(int b) noexcept;  // the bucket's midpoint, in ns
    void add(std::uint64_t ns) noexcept { ++counts[bucket(ns)]; }
    void merge(const Histogram& other) noexcept;
    std::uint64_t total() const noexcept;
    // Samples in buckets whose values are all at least `ns` (so within 1/16 of `ns`).
    std::uint64_t count_at_least(std::uint64_t ns) const noexcept;
    // The latency below which a fraction `q` (0..1) of the samples lie; 0 if there are none.
    std::uint64_t percentile(double q) const noexcept;
};

// What one worker reports.
struct WorkerStats {
    std::uint64_t ops = 0;     // operations completed
    std::uint64_t ok = 0;      // of which succeeded (a try that found no room is an op too)
    std::uint64_t csw = 0;     // voluntary context switches (times the worker blocked)
    std::uint64_t failed = 0;  // nonzero if the worker could not run (an exception, ...)
    Histogram latency;         // sampled per-operation latency, ns
};

struct RunOptions {
    int processes = 1;
    std::chrono::milliseconds duration{300};
    int sample_every = 8;  // time one operation in this many (1: every one)
    // Called by the parent while the workers run, with their pids; returns when the run should
    // end (the default sleeps for `duration`). The SIGSTOP scenario stops workers from here.
    std::function<void(const std::vector<pid_t>&)> driver{};
};

struct RunResult {
    int processes = 0;
    double seconds = 0;
    std::uint64_t ops = 0;
    std::uint64_t ok = 0;
    std::uint64_t csw = 0;
    Histogram* latency = nullptr;  // merged; owned by the runner (valid until the next run)
    double mops() const noexcept {
        return seconds > 0 ? static_cast<double>(ops) / seconds / 1e6 : 0;
    }
    double csw_per_op() const noexcept {
        return ops ? static_cast<double>(csw) / static_cast<double>(ops) : 0;
    }
    std::uint64_t p(double q) const noexcept { return latency ? latency->percentile(q) : 0; }
};

// An operation as a worker sees it: returns whether it succeeded.
using Op = std::function<bool()>;
// Makes the operation inside the worker process (after fork: a Redis client connects there).
using OpFactory = std::function<Op()>;

// Shared counters, one per worker: a driver increments worker i's just before it stops it with
// SIGSTOP, so that the worker leaves the operation it was stopped in out of its histogram (that
// sample measures the stop, not the primitive).
std::atomic<std::uint64_t>* stop_marks();

// Forks `options.processes` workers that each build their op from `factory`, wait until all are
// ready, run it in a loop for the duration, and report. Throws std::runtime_error if a worker
// failed to run (its op threw, or it died).
RunResult run(const OpFactory& factory, const RunOptions& options);

// Uncontended cost in ns of one op, in this process: the fastest of `rounds` batches, timed by
// the thread's CPU clock (so time the core spent on other work does not count).
double ns_per_op(const Op& op, int rounds, std::chrono::milliseconds batch);

// CPU model, cores and kernel, as one line; and the date, UTC.
std::string machine_line();
std::string date_line();

}  // namespace lim_bench
