// lim-global-worker: the demo's workers and its checker (docs/global.md, "Try it").
//   lim-global-worker run SEGMENT KEY BURST RATE SECONDS PROCESSES OUT
//     forks PROCESSES workers that take one token at a time (every millisecond) from the global
//     rate KEY for SECONDS, and writes each admission as "before_ns after_ns" (CLOCK_MONOTONIC)
//     to OUT.<n>; prints how many were admitted.
//   lim-global-worker check BURST RATE FILE...
//     reads every admission from FILEs (of all hosts) and checks that in every window T the
//     total is at most BURST + RATE x T (+ 1 token of rounding); exit 0 if so, 1 if not.
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "lim/lim.hpp"

namespace {

int run(int argc, char** argv) {
    if (argc != 9) return 2;
    const std::string segment = argv[2];
    const std::string key = argv[3];
    const double burst = std::atof(argv[4]);
    const double rate = std::atof(argv[5]);
    const double seconds = std::atof(argv[6]);
    const int procs = std::atoi(argv[7]);
    const std::string out = argv[8];
    const lim::TimePoint until = lim::Clock::now() + std::chrono::duration_cast<lim::Duration>(
                                                         std::chrono::duration<double>(seconds));
    std::vector<pid_t> pids;
    for (int p = 0; p < procs; ++p) {
        const pid_t pid = ::fork();
        if (pid == 0) {
            auto seg = lim::Segment::open(segment);
            auto tb = lim::TokenBucket::open(seg, key,
                                             {.burst_size = burst, .sustained_rate_per_sec = rate},
                                             lim::adopt_existing);
            std::ofstream f(fmt::format("{}.{}", out, p));
            long n = 0;
            while (lim::Clock::now() < until) {
                const auto before = lim::to_nanos(lim::Clock::now());
                const bool taken = tb.try_take(1) == lim::TryTake::taken;
                const auto after = lim::to_nanos(lim::Clock::now());
                if (taken) {
                    f << before << ' ' << after << '\n';
                    ++n;
                }
                std::this_thread::sleep_for(std::chrono::milliseconds{1});
            }
            f.close();  // _exit does not flush
            ::_exit(n > 0 ? 0 : 3);
        }
        pids.push_back(pid);
    }
    int failed = 0;
    for (const pid_t pid : pids) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        failed += (WIFEXITED(status) && WEXITSTATUS(status) == 0) ? 0 : 1;
    }
    fmt::print("{} workers on segment {} ran {:g} s; {} admitted nothing or failed\n", procs,
               segment, seconds, failed);
    return 0;
}

int check(int argc, char** argv) {
    if (argc < 5) return 2;
    const double burst = std::atof(argv[2]);
    const double rate = std::atof(argv[3]);
    std::vector<std::pair<long long, long long>> a;  // (after, before)
    for (int i = 4; i < argc; ++i) {
        std::ifstream f(argv[i]);
        long long before = 0;
        long long after = 0;
        while (f >> before >> after)
            a.emplace_back(after, before);
    }
    std::sort(a.begin(), a.end());
    // Every run of consecutive admissions (by `after`) happened within [min before, last after].
    double worst = a.empty() ? 0 : -1e300;
    for (std::size_t i = 0; i < a.size(); ++i) {
        long long lo = a[i].second;
        for (std::size_t j = i; j < a.size(); ++j) {
            lo = std::min(lo, a[j].second);
            const double allowed = burst + rate * static_cast<double>(a[j].first - lo) / 1e9 + 1;
            worst = std::max(worst, static_cast<double>(j - i + 1) - allowed);
            if (static_cast<double>(a[j].first - lo) / 1e9 * rate > 4 * (burst + 1)) break;
        }
    }
    const double span =
        a.empty() ? 0 : static_cast<double>(a.back().first - a.front().second) / 1e9;
    fmt::print(
        "{} admissions over all hosts in {:.2f} s ({:.1f}/s; the limit {:g}/s, burst {:g}); "
        "worst window: {:+.2f} tokens against the bound: {}\n",
        a.size(), span, span > 0 ? static_cast<double>(a.size()) / span : 0.0, rate, burst, worst,
        worst <= 0 ? "respected" : "EXCEEDED");
    return worst <= 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    int rc = 2;
    try {
        if (cmd == "run") rc = run(argc, argv);
        if (cmd == "check") rc = check(argc, argv);
    } catch (const std::exception& e) {
        fmt::print(stderr, "lim-global-worker: {}\n", e.what());
        return 1;
    }
    if (rc == 2) {
        fmt::print(stderr,
                   "usage: lim-global-worker run SEGMENT KEY BURST RATE SECONDS PROCESSES OUT\n"
                   "       lim-global-worker check BURST RATE FILE...\n");
    }
    return rc;
}
