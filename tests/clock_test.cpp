// lim::Clock is CLOCK_MONOTONIC: never backwards, and the same in every process of the host.
#include <time.h>

#include <doctest/doctest.h>

#include <atomic>

#include "lim/clock.hpp"
#include "support/process.hpp"

using namespace lim;

TEST_CASE("Clock::now never goes backwards and agrees with CLOCK_MONOTONIC") {
    TimePoint prev = Clock::now();
    for (int i = 0; i < 100'000; ++i) {
        const TimePoint t = Clock::now();
        REQUIRE(t >= prev);
        prev = t;
    }
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    const std::int64_t mono = std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
    const std::int64_t ours = to_nanos(Clock::now());
    CHECK(ours >= mono);
    CHECK(ours - mono < 1'000'000'000);
}

TEST_CASE("a time read in a child falls between two reads in the parent") {
    auto* t = lim::test::shared_array<std::atomic<std::int64_t>>(1);
    new (t) std::atomic<std::int64_t>{0};
    const std::int64_t before = to_nanos(Clock::now());
    const pid_t child = lim::test::fork_child([&] {
        t->store(to_nanos(Clock::now()));
        return 0;
    });
    REQUIRE(lim::test::wait_child(child) == 0);
    const std::int64_t after = to_nanos(Clock::now());
    CHECK(t->load() >= before);
    CHECK(t->load() <= after);
}

TEST_CASE("to_nanos and from_nanos round-trip") {
    const TimePoint t = Clock::now();
    CHECK(from_nanos(to_nanos(t)) == t);
}
