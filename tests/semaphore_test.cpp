// lim::Semaphore in one process: counts, bounds, blocking with deadlines, configuration checks.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "lim/lim.hpp"
#include "lim/semaphore.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {
Segment make_segment(lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
}
}  // namespace

TEST_CASE("try_acquire takes up to capacity and release gives back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    CHECK(sem.capacity() == 3);
    CHECK(sem.try_acquire());
    CHECK(sem.try_acquire(2));
    CHECK(sem.in_use() == 3);
    CHECK_FALSE(sem.try_acquire());
    sem.release(2);
    CHECK(sem.in_use() == 1);
    CHECK(sem.try_acquire(2));
    CHECK_FALSE(sem.try_acquire(1));
    sem.release(3);
    CHECK(sem.in_use() == 0);
    CHECK(sem.try_acquire(0));  // nothing asked, nothing taken
    CHECK(sem.in_use() == 0);
}

TEST_CASE("misuse is refused with clear errors and no change") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-misuse"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 2});
    sem.acquire();
    try {
        sem.release(2);
        FAIL("over-release must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::over_release);
    }
    CHECK(sem.in_use() == 1);
    try {
        sem.try_acquire(3);
        FAIL("more than capacity must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::invalid_argument);
    }
    for (std::uint64_t bad : {std::uint64_t{0}, (std::uint64_t{1} << 31) + 1}) {
        try {
            Semaphore::open(seg, "bad", {.capacity = bad});
            FAIL("bad capacity must throw");
        } catch (const Error& e) {
            CHECK(e.code() == Errc::invalid_argument);
        }
    }
    sem.release();
}

TEST_CASE("a key opened with another capacity is config_mismatch, or adopted on request") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-config"));
    auto seg = make_segment(guard);
    auto first = Semaphore::open(seg, "db", {.capacity = 8});
    try {
        Semaphore::open(seg, "db", {.capacity = 4});
        FAIL("expected config_mismatch");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::config_mismatch);
        CHECK(std::string(e.what()).find("capacity 8") != std::string::npos);
    }
    auto adopted = Semaphore::open(seg, "db", {.capacity = 4}, adopt_existing);
    CHECK(adopted.capacity() == 8);
    CHECK(adopted.try_acquire(8));
    CHECK(first.in_use() == 8);  // the same semaphore
    adopted.release(8);
}

TEST_CASE("acquire_until times out when nothing is released, and holds nothing then") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-timeout"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    sem.acquire();
    const TimePoint deadline = Clock::now() + 30ms;
    CHECK_FALSE(sem.acquire_until(1, deadline));
    CHECK(Clock::now() >= deadline);
    CHECK(sem.in_use() == 1);
    CHECK(sem.waiters() == 0);
    sem.release();
}

TEST_CASE("a sleeping acquire is woken by a release from another thread") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-wake"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 2});
    sem.acquire(2);
    std::atomic<bool> got{false};
    std::thread t([&] {
        sem.acquire(2);  // sleeps until both units are back
        got = true;
        sem.release(2);
    });
    while (sem.waiters() == 0)
        std::this_thread::yield();
    CHECK_FALSE(got.load());
    sem.release(1);
    sem.release(1);
    t.join();
    CHECK(got.load());
    CHECK(sem.in_use() == 0);
    CHECK(sem.waiters() == 0);
}

TEST_CASE("threads never exceed the capacity") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-threads"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    std::atomic<int> inside{0}, peak{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 2000; ++i) {
                SemaphoreGuard g(sem);
                const int now = inside.fetch_add(1) + 1;
                int p = peak.load();
                while (now > p && !peak.compare_exchange_weak(p, now)) {
                }
                inside.fetch_sub(1);
            }
        });
    }
    for (auto& t : threads)
        t.join();
    CHECK(peak.load() <= 3);
    CHECK(peak.load() >= 1);
    CHECK(sem.in_use() == 0);
    CHECK(sem.waiters() == 0);
}
