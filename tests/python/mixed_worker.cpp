// tests/python/mixed_worker.cpp: the C++ side of the mixed-language test (test_mixed.py).
// Uses only the public C++ API, with the same options as the Python workers, and logs what it
// held with CLOCK_MONOTONIC times so that the test can check every limit across both languages.
//
//   mixed_worker dispatch <segment> <key> <concurrency> <throttled> <budget> <iterations>
//                <bytes> <hold_us> <log>      one line per permit: "<start_ns> <end_ns> <bytes>"
//   mixed_worker bucket <segment> <key> <burst> <rate> <duration_ns> <log>
//                                             "<taken> <last_ns>": tokens taken for duration_ns
//
// With LIM_TEST_BARRIER=<dir> set, a worker that has opened its handles says so (creates
// <dir>/ready.<pid>) and starts only once the test creates <dir>/go: all workers, of both
// languages, then run at once however late a loaded machine started each (workers.py, barrier).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include <unistd.h>

#include <lim/lim.hpp>

namespace {

std::int64_t now_ns() {
    return lim::to_nanos(lim::Clock::now());
}

void barrier() {
    const char* dir = std::getenv("LIM_TEST_BARRIER");
    if (dir == nullptr) return;
    const std::string ready = std::string(dir) + "/ready." + std::to_string(::getpid());
    if (std::FILE* f = std::fopen(ready.c_str(), "w")) std::fclose(f);
    const std::string go = std::string(dir) + "/go";
    while (::access(go.c_str(), F_OK) != 0)
        std::this_thread::sleep_for(std::chrono::milliseconds{1});
}

int run_dispatch(char** argv) {
    auto seg = lim::Segment::open(argv[2]);
    const std::string key = argv[3];
    auto window = lim::BackoffWindow::for_key(seg, key);
    auto d = lim::Dispatch::open(seg, {.limiter = window,
                                       .key = key,
                                       .concurrency = std::strtoull(argv[4], nullptr, 10),
                                       .throttled_concurrency = std::strtoull(argv[5], nullptr, 10),
                                       .byte_budget = std::strtoull(argv[6], nullptr, 10)});
    const long iterations = std::strtol(argv[7], nullptr, 10);
    const std::uint64_t bytes = std::strtoull(argv[8], nullptr, 10);
    const long hold_us = std::strtol(argv[9], nullptr, 10);
    std::FILE* log = std::fopen(argv[10], "w");
    if (log == nullptr) return 2;
    barrier();
    for (long i = 0; i < iterations; ++i) {
        lim::Permit p = d.acquire(bytes);
        const std::int64_t start = now_ns();
        std::this_thread::sleep_for(std::chrono::microseconds{hold_us});
        const std::int64_t end = now_ns();
        std::fprintf(log, "%lld %lld %llu\n", static_cast<long long>(start),
                     static_cast<long long>(end), static_cast<unsigned long long>(p.bytes()));
    }
    return std::fclose(log) == 0 ? 0 : 2;
}

int run_bucket(char** argv) {
    auto seg = lim::Segment::open(argv[2]);
    auto tb = lim::TokenBucket::open(seg, argv[3],
                                     {.burst_size = std::strtod(argv[4], nullptr),
                                      .sustained_rate_per_sec = std::strtod(argv[5], nullptr)},
                                     lim::adopt_existing);
    const std::int64_t duration = std::strtoll(argv[6], nullptr, 10);
    barrier();
    const std::int64_t end = now_ns() + duration;
    long taken = 0;
    std::int64_t last = now_ns();
    while (last < end) {
        if (tb.try_take(1.0) == lim::TryTake::taken) ++taken;
        last = now_ns();
    }
    std::FILE* log = std::fopen(argv[7], "w");
    if (log == nullptr) return 2;
    std::fprintf(log, "%ld %lld\n", taken, static_cast<long long>(last));
    return std::fclose(log) == 0 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "dispatch" && argc == 11) return run_dispatch(argv);
    if (mode == "bucket" && argc == 8) return run_bucket(argv);
    std::fprintf(stderr, "usage: see tests/python/mixed_worker.cpp\n");
    return 2;
} catch (const std::exception& e) {
    std::fprintf(stderr, "mixed_worker: %s\n", e.what());
    return 1;
}
