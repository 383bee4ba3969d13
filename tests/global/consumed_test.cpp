// lim::open_consumed_limiter: the local record of a global rate. Its takes are spent, so crash
// recovery must not give a dead taker's tokens back (an ordinary Limiter must: the contrast).
#include <doctest/doctest.h>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "support/process.hpp"

TEST_CASE("consumed limiter: a dead taker's tokens stay spent; an ordinary limiter's come back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("consumed"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    const lim::LimiterConfig config{.hopper_to_bucket_rate_per_sec = lim::infinite,
                                    .bucket_size = 10,
                                    .initial_bucket_level = 0,
                                    .initial_hopper_level = 0.0};
    for (const bool consumed : {true, false}) {
        CAPTURE(consumed);
        const std::string key = consumed ? "global" : "ordinary";
        lim::Limiter l = consumed ? lim::open_consumed_limiter(seg, key, config)
                                  : lim::Limiter::open(seg, key, config);
        CHECK(lim::is_consumed(l) == consumed);
        l.set_token_target_level(10.0);  // as lim-feeder adds a grant
        CHECK(l.in_bucket() == 10);
        // A worker takes 4 through a TokenBucket handle, as workers do, and dies.
        const pid_t pid = lim::test::fork_child([&] {
            auto tb = lim::TokenBucket::open(
                seg, key, {.burst_size = 10, .sustained_rate_per_sec = 1}, lim::adopt_existing);
            for (int i = 0; i < 4; ++i) {
                if (tb.try_take(1) != lim::TryTake::taken) return 1;
            }
            return 0;
        });
        REQUIRE(lim::test::wait_child(pid) == 0);
        CHECK(l.in_flight() == 4);
        CHECK(l.in_bucket() == 6);
        const lim::ReapReport report = seg.reap();
        CHECK(report.reaped.size() >= 1);
        if (consumed) {
            CHECK(l.in_flight() == 4);  // spent: nothing comes back
            CHECK(l.in_bucket() == 6);
        } else {
            CHECK(l.in_flight() == 0);  // an ordinary limiter gets them back
            CHECK(l.in_bucket() == 10);
        }
        l.invariant();
        // Lowering the target to what is in flight leaves nothing to take (the lease deadline).
        l.set_token_target_level(l.in_flight());
        CHECK(l.try_take(1) == lim::TryTake::unable);
    }
}

TEST_CASE("consumed limiter: the takers enforce the lease deadline themselves") {
    using namespace std::chrono_literals;
    lim::test::SegmentGuard guard(lim::test::unique_name("lease"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    const lim::LimiterConfig config{.hopper_to_bucket_rate_per_sec = lim::infinite,
                                    .bucket_size = 10,
                                    .initial_bucket_level = 0,
                                    .initial_hopper_level = 0.0};
    lim::Limiter l = lim::open_consumed_limiter(seg, "global", config);
    CHECK_FALSE(lim::lease_deadline(l).has_value());  // a new record has none
    l.set_token_target_level(10.0);                   // as lim-feeder adds a grant
    auto tb = lim::TokenBucket::open(seg, "global", {.burst_size = 10, .sustained_rate_per_sec = 1},
                                     lim::adopt_existing);

    // A live lease: takes are admitted.
    lim::set_lease_deadline(l, lim::Clock::now() + 1h);
    REQUIRE(lim::lease_deadline(l).has_value());
    CHECK(tb.try_take(1) == lim::TryTake::taken);
    CHECK(l.in_flight() == 1);

    // Past the deadline nothing is admitted, although the target still leaves 9 (the feeder is
    // stopped and has not lowered it). First a stale explicit `now` before the deadline (as a
    // taker stopped between reading the clock and its CAS): it passes the first test and takes,
    // but the clock read after the CAS is past the deadline: not admitted, and what it took
    // stays in flight (consumed, never given back). Nothing has raised the limiter's time past
    // the deadline yet, so these reach the CAS.
    const lim::TimePoint deadline = lim::Clock::now();
    lim::set_lease_deadline(l, deadline);
    CHECK(l.try_take(deadline - 1s, 1) == lim::TryTake::unable);
    CHECK(tb.try_take(deadline - 10ms, 1) == lim::TryTake::unable);
    CHECK(l.in_flight() == 3);
    // A take at the current time is refused before it takes: nothing more consumed.
    CHECK(tb.try_take(1) == lim::TryTake::unable);
    CHECK(l.try_take(1) == lim::TryTake::unable);
    CHECK(l.try_take(deadline - 1s, 1) == lim::TryTake::unable);
    CHECK(l.in_flight() == 3);
    CHECK(l.in_bucket() == 7);  // still in the bucket: only the deadline stops them
    // take_until waits (woken or not) and gives up at its own deadline.
    CHECK_FALSE(tb.take_until(1, lim::Clock::now() + 50ms));
    // In other processes too, a past deadline admits nothing.
    const pid_t child = lim::test::fork_child([&] {
        auto t = lim::TokenBucket::open(
            seg, "global", {.burst_size = 10, .sustained_rate_per_sec = 1}, lim::adopt_existing);
        for (int i = 0; i < 100; ++i) {
            if (t.try_take(1) == lim::TryTake::taken) return 1;
        }
        return 0;
    });
    CHECK(lim::test::wait_child(child) == 0);

    // A blocked take past the deadline sleeps; a new deadline wakes it and it takes.
    const pid_t sleeper = lim::test::fork_child([&] {
        auto t = lim::TokenBucket::open(
            seg, "global", {.burst_size = 10, .sustained_rate_per_sec = 1}, lim::adopt_existing);
        return t.take_until(1, lim::Clock::now() + 120s) ? 0 : 1;
    });
    CHECK(lim::test::eventually([&] { return l.waiters() >= 1; }, 60s));
    CHECK(l.in_flight() == 3);  // it is sleeping, not spinning through the bucket
    lim::set_lease_deadline(l, lim::Clock::now() + 1h);
    CHECK(lim::test::wait_child(sleeper) == 0);
    CHECK(l.in_flight() == 4);

    // No deadline: the target alone bounds takes (on_redis_down = "open").
    lim::set_lease_deadline(l, std::nullopt);
    CHECK_FALSE(lim::lease_deadline(l).has_value());
    CHECK(l.try_take(6) == lim::TryTake::taken);
    CHECK(l.try_take(1) == lim::TryTake::unable);

    // Only a consumed record has a lease deadline.
    lim::Limiter ordinary = lim::Limiter::open(seg, "ordinary", config);
    CHECK_THROWS_AS(lim::set_lease_deadline(ordinary, lim::Clock::now()), lim::Error);
    CHECK_FALSE(lim::lease_deadline(ordinary).has_value());
    l.invariant();
}
