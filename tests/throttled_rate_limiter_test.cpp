// lim::ThrottledRateLimiter: Jane Street's Throttled_rate_limiter, with an explicit clock.
#include <doctest/doctest.h>

#include <chrono>

#include "lim/throttled_rate_limiter.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::at;
using lim::test::t0;
using namespace std::chrono_literals;

TEST_CASE("jobs start at the rate, at most max_concurrent_jobs at once") {
    lim::test::SegmentGuard guard(lim::test::unique_name("trl"));
    auto seg = lim::test::limiter_segment(guard);
    auto trl = ThrottledRateLimiter::open(
        seg, "api", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3}, t0);
    CHECK(trl.burst_size() == 2);
    CHECK(trl.sustained_rate_per_sec() == 1);
    CHECK(trl.max_concurrent_jobs() == 3);
    // min(burst, jobs) in the bucket, the rest in the hopper.
    CHECK(trl.in_bucket(t0) == 2);
    CHECK(trl.in_hopper(t0).value() == 1);
    CHECK(trl.try_start_job(t0) == StartJob::start());
    CHECK(trl.try_start_job(t0) == StartJob::start());
    // The hopper holds the third token: it drips in after 1 s.
    CHECK(trl.try_start_job(t0) == StartJob::unable_until_at_least(at(1)));
    CHECK(trl.try_start_job(at(1)) == StartJob::start());
    // Three running: only a finish helps.
    CHECK(trl.try_start_job(at(5)) == StartJob::max_concurrent_jobs_running());
    trl.finish_job(at(5));
    CHECK(trl.in_hopper(at(5)).value() == 1);
    CHECK(trl.try_start_job(at(5)) == StartJob::unable_until_at_least(at(6)));
    CHECK(trl.try_start_job(at(6)) == StartJob::start());
    CHECK(trl.in_system(at(6)).value() == 3);
    trl.invariant();
}

TEST_CASE("a burst larger than the jobs allowed starts the jobs allowed") {
    lim::test::SegmentGuard guard(lim::test::unique_name("trl-burst"));
    auto seg = lim::test::limiter_segment(guard);
    auto trl = ThrottledRateLimiter::open(
        seg, "api", {.burst_size = 5, .sustained_rate_per_sec = 10, .max_concurrent_jobs = 2}, t0);
    CHECK(trl.in_bucket(t0) == 2);
    CHECK(trl.in_hopper(t0).value() == 0);
    CHECK(trl.try_start_job(t0) == StartJob::start());
    CHECK(trl.try_start_job(t0) == StartJob::start());
    CHECK(trl.try_start_job(at(10)) == StartJob::max_concurrent_jobs_running());
    trl.finish_job(at(10));
    // The finished job's token drips back at the rate, from the finish on.
    CHECK(trl.try_start_job(at(10)) == StartJob::unable_until_at_least(at(10.1)));
    CHECK(trl.try_start_job(at(10.1)) == StartJob::start());
}

TEST_CASE("start_job_until gives up at its deadline") {
    lim::test::SegmentGuard guard(lim::test::unique_name("trl-block"));
    auto seg = lim::test::limiter_segment(guard);
    auto trl = ThrottledRateLimiter::open(
        seg, "api", {.burst_size = 1, .sustained_rate_per_sec = 0.01, .max_concurrent_jobs = 5});
    trl.start_job();
    const TimePoint deadline = Clock::now() + 30ms;
    CHECK_FALSE(trl.start_job_until(deadline));
    CHECK(Clock::now() >= deadline);
    CHECK(trl.in_flight() == 1);
    trl.finish_job();
    CHECK(trl.in_flight() == 0);
}
