// lim::TokenBucket: Jane Street's Token_bucket, with an explicit clock where time matters.
#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include "lim/limiter.hpp"
#include "lim/segment.hpp"
#include "lim/throttle.hpp"
#include "lim/token_bucket.hpp"
#include "limiter/limiter_state.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::at;
using lim::test::t0;
using namespace std::chrono_literals;

TEST_CASE("a token bucket refills at the sustained rate up to the burst size") {
    lim::test::SegmentGuard guard(lim::test::unique_name("tb"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(seg, "emails", {.burst_size = 10, .sustained_rate_per_sec = 2}, t0);
    CHECK(tb.burst_size() == 10);
    CHECK(tb.bucket_size() == 10);
    CHECK(tb.sustained_rate_per_sec() == 2);
    CHECK(tb.in_hopper(t0).is_infinite());
    CHECK(tb.in_system(t0).is_infinite());
    CHECK(tb.try_take(t0, 1) == TryTake::unable);  // initial_bucket_level defaults to 0
    CHECK(tb.tokens_may_be_available_when(t0, 1) == Availability::at(at(0.5)));
    CHECK(tb.try_take(at(0.5), 1) == TryTake::taken);
    CHECK(tb.try_take(at(0.5), 0.0001) == TryTake::unable);
    CHECK(tb.in_bucket(at(100)) == 10);
    CHECK(tb.try_take(at(100), 10.0001) == TryTake::asked_for_more_than_bucket_size);
    CHECK(tb.try_take(at(100), 7) == TryTake::taken);
    CHECK(tb.in_bucket(at(100)) == 3);
    // Taken tokens are consumed: they stay in flight, as in the seed.
    CHECK(tb.in_flight(at(100)) == 8);
    tb.invariant();

    auto full = TokenBucket::open(
        seg, "full", {.burst_size = 5, .sustained_rate_per_sec = 1, .initial_bucket_level = 5}, t0);
    CHECK(full.in_bucket(t0) == 5);
    CHECK(full.try_take(t0, 5) == TryTake::taken);
    CHECK(full.in_bucket(at(2)) == 2);
}

TEST_CASE("take_until gives up at its deadline holding nothing; take waits for the refill") {
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-block"));
    auto seg = lim::test::limiter_segment(guard);
    auto slow = TokenBucket::open(seg, "slow", {.burst_size = 1, .sustained_rate_per_sec = 0.001});
    const TimePoint deadline = Clock::now() + 30ms;
    CHECK_FALSE(slow.take_until(1, deadline));
    CHECK(Clock::now() >= deadline);
    CHECK(slow.in_flight() == 0);

    auto fast = TokenBucket::open(seg, "fast", {.burst_size = 1, .sustained_rate_per_sec = 200});
    fast.take(1);  // the bucket starts empty: waits ~5 ms for the drip
    const Availability next = fast.tokens_may_be_available_when(1);
    REQUIRE(next.kind() == Availability::Kind::at);
    fast.take(1);
    // It cannot have succeeded before the drip could bring the token.
    CHECK(Clock::now() >= next.time());
    CHECK(fast.in_flight() == 2);
    CHECK_THROWS_AS(fast.take(1.5), Error);  // more than the burst: could never succeed
    CHECK_THROWS_AS(fast.take_until(2, Clock::now() + 1s), Error);
}

TEST_CASE("token bucket configuration: mismatch, adoption, another facade on the key") {
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-config"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(seg, "api", {.burst_size = 10, .sustained_rate_per_sec = 2});
    try {
        TokenBucket::open(seg, "api", {.burst_size = 10, .sustained_rate_per_sec = 3});
        FAIL("expected config_mismatch");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::config_mismatch);
        const std::string what = e.what();
        CHECK(what.find("a token bucket (burst_size 10, sustained_rate_per_sec 2") !=
              std::string::npos);
        CHECK(what.find("sustained_rate_per_sec 3") != std::string::npos);
    }
    try {
        Throttle::open(seg, "api", {.max_concurrent_jobs = 10});
        FAIL("expected config_mismatch");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::config_mismatch);
        CHECK(std::string(e.what()).find("a throttle") != std::string::npos);
    }
    auto adopted = TokenBucket::open(seg, "api", {.burst_size = 1}, adopt_existing);
    CHECK(adopted.burst_size() == 10);
    CHECK(adopted.sustained_rate_per_sec() == 2);
    // The Limiter underneath, for the seed's Expert operations.
    auto& expert = adopted.limiter();
    expert.set_hopper_to_bucket_rate_per_sec(100.0);
    CHECK(tb.sustained_rate_per_sec() == 100);
}

TEST_CASE("a token bucket's own takes count in flight across processes; a reap drops the dead's") {
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-ledger"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(
        seg, "b", {.burst_size = 10, .sustained_rate_per_sec = 0, .initial_bucket_level = 10}, t0);
    CHECK(tb.try_take(t0, 2) == TryTake::taken);
    const pid_t child = lim::test::fork_child(
        [&] { return tb.try_take(t0, 3) == TryTake::taken && tb.in_flight(t0) == 5 ? 0 : 1; });
    CHECK(lim::test::wait_child(child) == 0);
    CHECK(tb.in_flight(t0) == 5);
    CHECK(tb.in_bucket(t0) == 5);
    const ReapReport report = seg.reap();
    REQUIRE(report.reaped.size() == 1);
    CHECK(tb.in_flight(t0) == 2);  // the dead's tokens are no longer in flight...
    CHECK(tb.in_bucket(t0) == 5);  // ...and were consumed: the bucket does not get them back
    tb.invariant();
}

TEST_CASE("a TokenBucket adopting a general Limiter record takes through the general path") {
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-adopt"));
    auto seg = lim::test::limiter_segment(guard);
    // As lim-feeder creates a global rate's local record: infinite rate, a finite hopper that
    // the feeder fills from the global budget.
    auto fed = Limiter::open(seg, "global",
                             {.hopper_to_bucket_rate_per_sec = infinite,
                              .bucket_size = 100,
                              .initial_bucket_level = 5,
                              .initial_hopper_level = 0.0},
                             t0);
    auto tb = TokenBucket::open(seg, "global", {.burst_size = 1, .sustained_rate_per_sec = 1},
                                lim::adopt_existing, t0);
    CHECK(tb.burst_size() == 100);
    CHECK(tb.try_take(t0, 3) == TryTake::taken);
    CHECK(tb.in_flight(t0) == 3);
    CHECK(fed.in_flight(t0) == 3);  // the general record's F sees the take
    CHECK(tb.in_bucket(t0) == 2);
    CHECK(tb.try_take(t0, 3) == TryTake::unable);
    CHECK(tb.tokens_may_be_available_when(t0, 3) ==
          Availability::when_return_to_hopper_is_called());
    fed.set_token_target_level(t0, 10.0);  // the feeder adds to the hopper
    CHECK(tb.try_take(at(1), 3) == TryTake::taken);
    tb.take(1);
    CHECK(tb.take_until(1, Clock::now() + 10ms));
    CHECK(fed.in_flight(at(1)) == 8);
    fed.return_to_hopper(at(1), 8);  // the feeder's returns are exact: every take is in F
    CHECK(fed.in_flight(at(1)) == 0);
    tb.invariant();
}

TEST_CASE("a token bucket cannot be given a finite target: its takes are consumed outside one") {
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-reconf"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(
        seg, "b", {.burst_size = 10, .sustained_rate_per_sec = 1, .initial_bucket_level = 10}, t0);
    auto l = Limiter::open(seg, "b", {.bucket_size = 1}, lim::adopt_existing, t0);
    CHECK(tb.try_take(t0, 1) == TryTake::taken);
    // A finite target would not count the consumed token: refused, nothing changed.
    CHECK_THROWS_AS(l.set_token_target_level(t0, 4.0), lim::Error);
    CHECK(l.token_target_level().is_infinite());
    CHECK(tb.try_take(t0, 9) == TryTake::taken);
    CHECK(tb.try_take(t0, 1) == TryTake::unable);
    CHECK(l.in_flight(t0) == 10);
    l.set_token_target_level(t0, lim::infinite);  // an infinite one is what it has: accepted
    tb.invariant();
}

TEST_CASE("a token bucket re-anchors its drip at most every 6 minutes, and above 5,124/s never") {
    // Re-anchoring keeps the take's drip arithmetic short, but each re-anchor is a configuration
    // switch and the generation has 16 bits: at most one per 6 minutes keeps a wrap 273 days of
    // one taker's stop away (docs/design.md, "TokenBucket's take"). Explicit times over hours.
    REQUIRE(lim::detail::short_drip_max_rate.load() == lim::detail::kShortDripMaxRate);
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-window"));
    auto seg = lim::test::limiter_segment(guard);
    const auto generation = [&](const char* key) {
        return lim::test::generation(lim::test::body_of(seg, key));
    };
    const TimePoint start = lim::test::t0;
    auto slow =
        TokenBucket::open(seg, "slow", {.burst_size = 10, .sustained_rate_per_sec = 5'000}, start);
    auto fast =
        TokenBucket::open(seg, "fast", {.burst_size = 10, .sustained_rate_per_sec = 1e7}, start);
    const std::uint32_t slow0 = generation("slow");
    const std::uint32_t fast0 = generation("fast");
    // One take a second for 2 hours: the 5,000/s bucket's window is 2^64 / (5 x 10^7) ns = 369 s.
    std::int64_t taken = 0;
    for (int s = 1; s <= 7'200; ++s) {
        const TimePoint t = start + std::chrono::seconds(s);
        taken += slow.try_take(t, 1) == TryTake::taken;
        // (The first 300 s only: past 2^45 units of drip, 351 s at 10^7/s, any record rebases.)
        if (s <= 300) taken += fast.try_take(t, 1) == TryTake::taken;
    }
    CHECK(taken == 7'200 + 300);
    const std::uint32_t slow_switches = (generation("slow") - slow0) & 0xFFFF;
    MESSAGE("5,000/s: " << slow_switches << " re-anchors in 2 h");
    CHECK(slow_switches >= 15);          // 7,200 s / 369 s, less the first window's remainder
    CHECK(slow_switches <= 20);          // never more than one per 6 minutes
    CHECK(generation("fast") == fast0);  // 10^7/s: the long form, never re-anchored (the short
                                         // form's window there is 0.18 s)
}
