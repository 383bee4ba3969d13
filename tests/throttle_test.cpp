// lim::Throttle: Jane Street's Throttle (an infinite-rate limiter of max_concurrent_jobs tokens).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "lim/throttle.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

TEST_CASE("a throttle starts at most max_concurrent_jobs jobs") {
    lim::test::SegmentGuard guard(lim::test::unique_name("th"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 3});
    CHECK(th.max_concurrent_jobs() == 3);
    CHECK(th.hopper_to_bucket_rate_per_sec().is_infinite());
    CHECK(th.bucket_size() == 3);
    CHECK(th.in_bucket() == 3);
    for (int i = 0; i < 3; ++i)
        CHECK(th.try_start_job() == StartJob::start());
    CHECK(th.try_start_job() == StartJob::max_concurrent_jobs_running());
    CHECK(th.in_flight() == 3);
    CHECK(th.in_bucket() == 0);
    CHECK(th.in_system().value() == 3);
    th.finish_job();
    CHECK(th.in_bucket() == 1);  // infinite rate: straight back into the bucket
    CHECK(th.try_start_job() == StartJob::start());
    for (int i = 0; i < 3; ++i)
        th.finish_job();
    try {
        th.finish_job();
        FAIL("finishing a job that is not running must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::over_release);
    }
    CHECK(th.in_flight() == 0);
    CHECK(th.in_system().value() == 3);
    th.invariant();
}

TEST_CASE("start_job sleeps until a job finishes; start_job_until gives up at its deadline") {
    lim::test::SegmentGuard guard(lim::test::unique_name("th-block"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 1});
    th.start_job();
    const TimePoint deadline = Clock::now() + 30ms;
    CHECK_FALSE(th.start_job_until(deadline));
    CHECK(Clock::now() >= deadline);
    CHECK(th.in_flight() == 1);

    std::atomic<bool> started{false};
    std::thread t([&] {
        th.start_job();  // sleeps on the futex until the finish below
        started = true;
        th.finish_job();
    });
    while (th.waiters() == 0)
        std::this_thread::yield();
    CHECK_FALSE(started.load());  // cannot start while the only job runs
    th.finish_job();
    t.join();
    CHECK(started.load());
    CHECK(th.in_flight() == 0);
    CHECK(th.waiters() == 0);
}

TEST_CASE("threads never run more than max_concurrent_jobs jobs") {
    lim::test::SegmentGuard guard(lim::test::unique_name("th-threads"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 3});
    std::atomic<int> inside{0}, peak{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 2000; ++i) {
                if ((i + t) % 3 == 0) {
                    if (th.try_start_job().kind() != StartJob::Kind::start) continue;
                } else {
                    th.start_job();
                }
                const int now = inside.fetch_add(1) + 1;
                int p = peak.load();
                while (now > p && !peak.compare_exchange_weak(p, now)) {
                }
                inside.fetch_sub(1);
                th.finish_job();
            }
        });
    }
    for (auto& t : threads)
        t.join();
    CHECK(peak.load() <= 3);
    CHECK(peak.load() >= 1);
    CHECK(th.in_flight() == 0);
    CHECK(th.in_system().value() == 3);
}

TEST_CASE("lowering a throttle's target below the running jobs drops finishes until it matches") {
    lim::test::SegmentGuard guard(lim::test::unique_name("th-lower"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 4});
    for (int i = 0; i < 4; ++i)
        REQUIRE(th.try_start_job() == StartJob::start());
    th.limiter().set_token_target_level(2.0);
    CHECK(th.max_concurrent_jobs() == 2);
    th.finish_job();
    th.finish_job();  // both dropped: the system now holds 2, both in flight
    CHECK(th.try_start_job() == StartJob::max_concurrent_jobs_running());
    th.finish_job();
    CHECK(th.try_start_job() == StartJob::start());
    CHECK(th.try_start_job() == StartJob::max_concurrent_jobs_running());
    th.invariant();
}

TEST_CASE(
    "a job finished by another thread is not finished again by its starter while another "
    "process runs one") {
    // As semaphore_test's cross-thread case, through the Limiter family's return (the fast
    // infinite-rate return and the general one): the starter's own ledger entry still shows the
    // job another thread finished, but the process runs none, and the child's job is not its.
    lim::test::SegmentGuard guard(lim::test::unique_name("th-xthread"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 2});
    lim::test::Flag* child_runs = lim::test::make_flag();
    lim::test::Flag* child_may_go = lim::test::make_flag();
    const pid_t child = lim::test::fork_child([&] {
        if (th.try_start_job() != StartJob::start()) return 10;
        child_runs->set();
        child_may_go->wait();
        th.finish_job();
        return 0;
    });
    child_runs->wait();
    REQUIRE(th.try_start_job() == StartJob::start());
    std::thread([&] { th.finish_job(); }).join();  // another thread finishes this one's job
    CHECK(th.in_flight() == 1);                    // the child's
    for (int i = 0; i < 2; ++i) {
        Errc code = Errc::invalid_argument;
        try {
            th.finish_job();
        } catch (const Error& e) {
            code = e.code();
        }
        CHECK(code == Errc::over_release);
        CHECK(th.in_flight() == 1);
    }
    child_may_go->set();
    CHECK(lim::test::wait_child(child) == 0);
    CHECK(th.in_flight() == 0);
}
