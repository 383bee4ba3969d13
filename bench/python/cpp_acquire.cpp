// bench/python/cpp_acquire.cpp: the C++ side of bench_acquire.py: ns per uncontended
// acquire+release (CPU ns) through the C++ API, on the segment and keys the Python side uses.
//   cpp_acquire <segment> <iterations>   prints "semaphore <ns>" and "dispatch <ns>"
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <lim/lim.hpp>

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    const long n = std::strtol(argv[2], nullptr, 10);
    auto seg = lim::Segment::open(argv[1]);
    auto sem = lim::Semaphore::open(seg, "bench-sem", {.capacity = 8});
    auto d = lim::Dispatch::open(seg, {.limiter = lim::BackoffWindow::for_key(seg, "bench-api"),
                                       .key = "bench-api",
                                       .concurrency = 8});
    // CPU time of this process, not wall time: the machine may be shared and loaded.
    struct C {
        static std::chrono::nanoseconds now() {
            timespec ts{};
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
            return std::chrono::seconds{ts.tv_sec} + std::chrono::nanoseconds{ts.tv_nsec};
        }
    };
    for (int pass = 0; pass < 2; ++pass) {  // the first pass warms up
        auto t0 = C::now();
        for (long i = 0; i < n; ++i) {
            if (!sem.try_acquire(1)) return 1;
            sem.release(1);
        }
        auto t1 = C::now();
        for (long i = 0; i < n; ++i) {
            auto p = d.try_acquire(100);
            if (!p) return 1;
        }
        auto t2 = C::now();
        if (pass == 1) {
            std::printf("semaphore %.1f\ndispatch %.1f\n",
                        std::chrono::duration<double, std::nano>(t1 - t0).count() / n,
                        std::chrono::duration<double, std::nano>(t2 - t1).count() / n);
        }
    }
    return 0;
}
