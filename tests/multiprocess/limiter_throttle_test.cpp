// A Throttle shared by 8 forked processes, 10^6 starts and finishes in all: the number of jobs
// running, counted independently in shared memory, never exceeds max_concurrent_jobs, and the
// system total is conserved throughout.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "lim/throttle.hpp"
#include "support/admissions.hpp"
#include "support/process.hpp"

using namespace lim;

TEST_CASE("8 processes x 70,000 jobs: concurrency never exceeds max_concurrent_jobs") {
    constexpr int kProcs = 8;
    constexpr int kJobs = 70'000;
    constexpr int kMax = 3;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-th"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = kMax});
    struct Counters {
        lim::test::PeakCounter running;
        std::atomic<long> ops{0};
        std::atomic<int> done{0};
    };
    auto* c = new (lim::test::shared_array<Counters>(1)) Counters{};
    std::vector<pid_t> kids;
    for (int p = 0; p < kProcs; ++p) {
        kids.push_back(lim::test::fork_child([&, p] {
            long ops = 0;
            for (int i = 0; i < kJobs; ++i) {
                if ((i + p) % 3 == 0) {
                    ++ops;
                    if (th.try_start_job().kind() != StartJob::Kind::start) continue;
                } else {
                    th.start_job();
                    ++ops;
                }
                c->running.enter(1);
                // Now and then hold the job across a yield, so that the jobs overlap (and the
                // bound is tested) even when start and finish are a few ns apart.
                if (i % 16 == 0) std::this_thread::yield();
                c->running.leave(1);
                th.finish_job();
                ++ops;
            }
            c->ops.fetch_add(ops);
            c->done.fetch_add(1);
            return 0;
        }));
    }
    // Meanwhile: the system total is the target, and never more is in flight.
    long samples = 0;
    while (c->done.load() < kProcs) {
        CHECK(th.in_system().value() == kMax);
        CHECK(th.in_flight() <= kMax);
        ++samples;
    }
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    MESSAGE(c->ops.load() << " operations, peak " << c->running.peak.load() << ", " << samples
                          << " samples");
    CHECK(c->ops.load() >= 1'000'000);
    CHECK(c->running.peak.load() <= kMax);
    CHECK(c->running.peak.load() >= 2);  // there was contention to bound
    CHECK(th.in_flight() == 0);
    CHECK(th.in_bucket() == kMax);
    CHECK(th.in_system().value() == kMax);
    CHECK(th.waiters() == 0);
    th.invariant();
}
