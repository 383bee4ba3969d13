// A ThrottledRateLimiter shared by 8 forked processes, 10^6 operations in all: jobs running
// never exceed max_concurrent_jobs (counted independently), starts over every interval stay
// within burst + rate x interval, and the system total is conserved.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "lim/throttled_rate_limiter.hpp"
#include "support/admissions.hpp"
#include "support/process.hpp"

using namespace lim;

TEST_CASE("8 processes x 125,000 try_start_jobs: both the rate and the concurrency hold") {
    constexpr int kProcs = 8;
    constexpr int kAttempts = 125'000;
    constexpr double kBurst = 4;
    constexpr double kRate = 20'000;
    constexpr int kMax = 3;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-trl"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto trl = ThrottledRateLimiter::open(
        seg, "api",
        {.burst_size = kBurst, .sustained_rate_per_sec = kRate, .max_concurrent_jobs = kMax});
    struct Counters {
        lim::test::PeakCounter running;
        std::atomic<long> ops{0};
        std::atomic<int> done{0};
    };
    auto* c = new (lim::test::shared_array<Counters>(1)) Counters{};
    const lim::test::AdmissionLog log(kProcs, kAttempts);
    std::vector<pid_t> kids;
    for (int p = 0; p < kProcs; ++p) {
        kids.push_back(lim::test::fork_child([&, p] {
            lim::test::Admission* mine = log.part(p);
            std::int64_t k = 0;
            long ops = 0;
            for (int i = 0; i < kAttempts; ++i) {
                const TimePoint before = Clock::now();
                ++ops;
                if (trl.try_start_job(before).kind() != StartJob::Kind::start) continue;
                mine[k++] = {to_nanos(before), to_nanos(Clock::now()), 10'000};
                c->running.enter(1);
                // Jobs last about as long as three starts at the rate, so that the concurrency
                // limit binds as well as the rate.
                std::this_thread::sleep_for(std::chrono::microseconds(100));
                c->running.leave(1);
                trl.finish_job();
                ++ops;
            }
            log.set_count(p, k);
            c->ops.fetch_add(ops);
            c->done.fetch_add(1);
            return 0;
        }));
    }
    while (c->done.load() < kProcs) {
        CHECK(trl.in_system().value() == kMax);
        CHECK(trl.in_flight() <= kMax);
    }
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);

    const std::vector<lim::test::Admission> all = log.all();
    REQUIRE(all.size() > 100);
    const auto check = lim::test::check_bucket(all, kBurst * 10'000, kRate * 10'000, 10'000, 256);
    MESSAGE(c->ops.load() << " operations, " << all.size() << " starts, peak "
                          << c->running.peak.load() << ", worst excess " << check.worst_excess_units
                          << " units");
    CHECK(c->ops.load() >= 1'000'000);
    CHECK(check.worst_excess_units <= 0);
    CHECK(c->running.peak.load() <= kMax);
    CHECK(c->running.peak.load() >= 2);  // the concurrency limit was approached
    CHECK(trl.in_flight() == 0);
    CHECK(trl.in_system().value() == kMax);
    trl.invariant();
}
