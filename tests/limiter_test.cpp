// lim::Limiter against the seed (shared/seeds/janestreet-limiter.txt), point by point, with an
// explicit clock: every expectation below is what Jane Street's Limiter computes for the same
// calls.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <string>

#include "lim/limiter.hpp"
#include "lim/segment.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "lim/token_bucket.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::at;
using lim::test::t0;
using namespace std::chrono_literals;

namespace {

double finite(InfiniteOrFinite<double> v) {
    REQUIRE(v.is_finite());
    return v.value();
}

// The seed's invariant, and the hopper/bucket/flight accounting, at `now`.
void check_accounts(const Limiter& l, TimePoint now) {
    l.invariant();
    const double b = l.in_bucket(now);
    const double f = l.in_flight(now);
    const auto h = l.in_hopper(now);
    CHECK(b >= 0);
    CHECK(b <= l.bucket_size());
    if (h.is_finite()) {
        CHECK(h.value() >= 0);
        CHECK(finite(l.in_limiter(now)) == doctest::Approx(h.value() + b));
        CHECK(finite(l.in_system(now)) == doctest::Approx(h.value() + b + f));
    } else {
        CHECK(l.in_limiter(now).is_infinite());
        CHECK(l.in_system(now).is_infinite());
    }
}

}  // namespace

TEST_CASE("tokens drip at the rate, capped at the bucket size, the rest staying in the hopper") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-fill"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "fill",
                           {.hopper_to_bucket_rate_per_sec = 2.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = 15.0},
                           t0);
    CHECK(l.bucket_size() == 10);
    CHECK(finite(l.hopper_to_bucket_rate_per_sec()) == 2.0);
    CHECK(finite(l.token_target_level()) == 15);
    CHECK(l.in_bucket(t0) == 0);
    CHECK(finite(l.in_hopper(t0)) == 15);
    CHECK(finite(l.in_system(t0)) == 15);
    CHECK(l.in_bucket(at(1)) == 2);
    CHECK(finite(l.in_hopper(at(1))) == 13);
    CHECK(l.in_bucket(at(2.5)) == 5);
    CHECK(finite(l.in_hopper(at(2.5))) == 10);
    // Capped at the bucket size; what cannot fit stays in the hopper.
    CHECK(l.in_bucket(at(100)) == 10);
    CHECK(finite(l.in_hopper(at(100))) == 5);
    CHECK(finite(l.in_limiter(at(100))) == 15);
    check_accounts(l, at(100));

    CHECK(l.try_take(at(100), 10) == TryTake::taken);
    CHECK(l.in_bucket(at(100)) == 0);
    CHECK(l.in_flight(at(100)) == 10);
    CHECK(finite(l.in_hopper(at(100))) == 5);
    CHECK(finite(l.in_system(at(100))) == 15);
    // The drip resumes from the take, not from when the bucket filled.
    CHECK(l.in_bucket(at(101)) == 2);
    CHECK(finite(l.in_hopper(at(101))) == 3);
    // The hopper runs dry: only 5 more can drip, and the drip allowance meanwhile is lost...
    CHECK(l.in_bucket(at(103)) == 5);
    CHECK(finite(l.in_hopper(at(103))) == 0);
    CHECK(l.in_bucket(at(200)) == 5);
    // ...so tokens returned at 200 drip from 200, not retroactively.
    l.return_to_hopper(at(200), 10);
    CHECK(l.in_flight(at(200)) == 0);
    CHECK(l.in_bucket(at(200)) == 5);
    CHECK(finite(l.in_hopper(at(200))) == 10);
    CHECK(l.in_bucket(at(201)) == 7);
    CHECK(finite(l.in_hopper(at(201))) == 8);
    check_accounts(l, at(201));
}

TEST_CASE("drip that finds the bucket full is lost") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-full"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "full",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 5,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = infinite},
                           t0);
    CHECK(l.in_bucket(at(10)) == 5);
    CHECK(l.in_hopper(at(10)).is_infinite());
    CHECK(l.try_take(at(10), 5) == TryTake::taken);
    CHECK(l.in_bucket(at(10)) == 0);
    CHECK(l.in_bucket(at(11)) == 1);  // not 5: the 5 s spent full dripped nothing
    CHECK(l.in_bucket(at(13.5)) == 3.5);
    CHECK(l.in_flight(at(13.5)) == 5);  // a token bucket's tokens stay in flight
    check_accounts(l, at(13.5));
}

TEST_CASE("fractional tokens are rounded up to 1/10,000") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-frac"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "frac",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = infinite},
                           t0);
    // One unit (1/10,000 token) drips every 100 us; the drip is floor(elapsed x rate).
    CHECK(l.in_bucket(at(0.00005)) == 0);
    CHECK(l.in_bucket(at(0.0001)) == doctest::Approx(0.0001).epsilon(1e-12));
    CHECK(l.in_bucket(at(0.00019)) == doctest::Approx(0.0001).epsilon(1e-12));
    // An amount is rounded up: 0.00005 takes one whole unit.
    CHECK(l.try_take(at(0.0001), 0.00005) == TryTake::taken);
    CHECK(l.in_bucket(at(0.0001)) == 0);
    CHECK(l.in_flight(at(0.0001)) == doctest::Approx(0.0001).epsilon(1e-12));
    CHECK(l.try_take(at(0.0001), 0.00001) == TryTake::unable);
    // 0.99991 rounds up to 1.0: taken from exactly one token, leaving nothing.
    CHECK(l.in_bucket(at(1.0001)) == 1.0);
    CHECK(l.try_take(at(1.0001), 0.99991) == TryTake::taken);
    CHECK(l.in_bucket(at(1.0001)) == 0);
    // A decimal amount is the amount it says (1.1 is 11,000 units, not 11,001).
    CHECK(l.in_bucket(at(2.1001)) == doctest::Approx(1.1).epsilon(1e-12));
    CHECK(l.try_take(at(2.1001), 1.1) == TryTake::taken);
    CHECK(l.in_bucket(at(2.1001)) == 0);
    CHECK(l.in_flight(at(2.1001)) == doctest::Approx(2.1001).epsilon(1e-12));

    // A rate that is not a whole number of units per second still drips floor(elapsed x rate).
    auto third = Limiter::open(
        seg, "third",
        {.hopper_to_bucket_rate_per_sec = 0.3, .bucket_size = 10, .initial_hopper_level = infinite},
        t0);
    CHECK(third.in_bucket(at(1)) == doctest::Approx(0.3).epsilon(1e-12));
    CHECK(third.in_bucket(at(0.5)) == doctest::Approx(0.3).epsilon(1e-12));  // time moved up
    auto slow = Limiter::open(seg, "slow",
                              {.hopper_to_bucket_rate_per_sec = 1.0 / 3.0,
                               .bucket_size = 10,
                               .initial_hopper_level = infinite},
                              t0);
    // 1/3 token/s is 3333.33... units/s: after 1 s, 3333 units; after 3 s, 10,000 (within a
    // unit of rounding of the double 1/3).
    CHECK(slow.in_bucket(at(1)) == doctest::Approx(0.3333).epsilon(1e-12));
    CHECK(slow.in_bucket(at(3)) == doctest::Approx(1.0).epsilon(1.01e-4));
}

TEST_CASE("a now earlier than the limiter's time is moved up to it") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-past"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "past",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = infinite},
                           t0);
    CHECK(l.in_bucket(at(5)) == 5);
    CHECK(l.in_bucket(at(2)) == 5);                 // not 2: time never runs backwards
    CHECK(l.try_take(at(1), 5) == TryTake::taken);  // taken at 5 s
    CHECK(l.in_bucket(at(5)) == 0);
    CHECK(l.in_bucket(at(0)) == 0);
    CHECK(l.in_bucket(at(6)) == 1);
    // Availability of what is there is "now", i.e. the limiter's time.
    const Availability a = l.tokens_may_be_available_when(at(3), 1);
    REQUIRE(a.kind() == Availability::Kind::at);
    CHECK(a.time() == at(6));
    // A time before the creation time is the creation time.
    auto later = Limiter::open(seg, "later",
                               {.hopper_to_bucket_rate_per_sec = 1.0,
                                .bucket_size = 10,
                                .initial_bucket_level = 2,
                                .initial_hopper_level = infinite},
                               at(100));
    CHECK(later.in_bucket(t0) == 2);
    CHECK(later.in_bucket(at(101)) == 3);
}

TEST_CASE("raising and lowering the token target level") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-target"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "target",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 4,
                            .initial_hopper_level = 6.0},
                           t0);
    CHECK(finite(l.in_system(t0)) == 10);
    // Lowering removes tokens from the hopper first...
    l.set_token_target_level(t0, 7.0);
    CHECK(finite(l.in_hopper(t0)) == 3);
    CHECK(l.in_bucket(t0) == 4);
    CHECK(finite(l.in_system(t0)) == 7);
    // ...then from the bucket.
    l.set_token_target_level(t0, 3.0);
    CHECK(finite(l.in_hopper(t0)) == 0);
    CHECK(l.in_bucket(t0) == 3);
    CHECK(finite(l.token_target_level()) == 3);
    check_accounts(l, t0);
    // Raising adds to the hopper; the bucket fills from it at the rate.
    l.set_token_target_level(t0, 8.0);
    CHECK(finite(l.in_hopper(t0)) == 5);
    CHECK(l.in_bucket(t0) == 3);
    CHECK(l.in_bucket(at(2)) == 5);
    CHECK(finite(l.in_hopper(at(2))) == 3);

    // Below what is in flight: hopper and bucket empty, returns dropped until the system holds
    // the target.
    CHECK(l.try_take(at(2), 5) == TryTake::taken);
    CHECK(l.in_flight(at(2)) == 5);
    l.set_token_target_level(at(2), 2.0);
    CHECK(l.in_bucket(at(2)) == 0);
    CHECK(finite(l.in_hopper(at(2))) == 0);
    CHECK(finite(l.in_limiter(at(2))) == 0);
    CHECK(finite(l.in_system(at(2))) == 5);  // in flight alone exceeds the target
    check_accounts(l, at(2));
    l.return_to_hopper(at(3), 2);  // dropped
    CHECK(finite(l.in_system(at(3))) == 3);
    CHECK(finite(l.in_limiter(at(3))) == 0);
    l.return_to_hopper(at(3), 1);  // dropped: now the system holds the target
    CHECK(finite(l.in_system(at(3))) == 2);
    CHECK(finite(l.in_limiter(at(3))) == 0);
    l.return_to_hopper(at(3), 1.5);  // kept
    CHECK(finite(l.in_system(at(3))) == 2);
    CHECK(finite(l.in_hopper(at(3))) == 1.5);
    CHECK(l.in_flight(at(3)) == 0.5);
    CHECK(l.in_bucket(at(3)) == 0);  // drips from the return on
    CHECK(l.in_bucket(at(4)) == 1);
    check_accounts(l, at(4));

    // Infinite: an infinite hopper. Back to finite: the hopper holds what the target leaves.
    l.set_token_target_level(at(4), infinite);
    CHECK(l.token_target_level().is_infinite());
    CHECK(l.in_hopper(at(4)).is_infinite());
    CHECK(l.in_system(at(4)).is_infinite());
    CHECK(l.in_bucket(at(6)) == 3);
    l.set_token_target_level(at(6), 4.0);
    CHECK(l.in_bucket(at(6)) == 3);
    CHECK(finite(l.in_hopper(at(6))) == 0.5);
    CHECK(finite(l.in_system(at(6))) == 4);
    check_accounts(l, at(6));
}

TEST_CASE("changing the bucket size") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-size"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "size",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 8,
                            .initial_hopper_level = 2.0},
                           t0);
    // Smaller: the bucket's excess goes back to the hopper.
    l.set_bucket_size(t0, 5);
    CHECK(l.bucket_size() == 5);
    CHECK(l.in_bucket(t0) == 5);
    CHECK(finite(l.in_hopper(t0)) == 5);
    check_accounts(l, t0);
    // Larger: the bucket fills from the hopper at the rate, from the change on.
    l.set_bucket_size(t0, 20);
    CHECK(l.in_bucket(t0) == 5);
    CHECK(l.in_bucket(at(3)) == 8);
    CHECK(finite(l.in_hopper(at(3))) == 2);
    CHECK(l.in_bucket(at(100)) == 10);  // all the system holds
    CHECK(finite(l.in_hopper(at(100))) == 0);
    // A bucket that was full keeps only what it holds when it grows: no drip while full.
    auto tb = Limiter::open(
        seg, "size-tb",
        {.hopper_to_bucket_rate_per_sec = 1.0, .bucket_size = 5, .initial_hopper_level = infinite},
        t0);
    CHECK(tb.in_bucket(at(50)) == 5);
    tb.set_bucket_size(at(50), 10);
    CHECK(tb.in_bucket(at(50)) == 5);
    CHECK(tb.in_bucket(at(52)) == 7);
    tb.set_bucket_size(at(52), 3);
    CHECK(tb.in_bucket(at(52)) == 3);
    CHECK(tb.in_hopper(at(52)).is_infinite());
    check_accounts(tb, at(52));
}

TEST_CASE("changing the rate") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-rate"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "rate",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 100,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = infinite},
                           t0);
    CHECK(l.in_bucket(at(10)) == 10);
    l.set_hopper_to_bucket_rate_per_sec(at(10), 5.0);
    CHECK(finite(l.hopper_to_bucket_rate_per_sec()) == 5.0);
    CHECK(l.in_bucket(at(10)) == 10);
    CHECK(l.in_bucket(at(12)) == 20);
    l.set_hopper_to_bucket_rate_per_sec(at(12), 0.0);
    CHECK(l.in_bucket(at(1000)) == 20);
    // Infinite: the bucket fills from the hopper at once.
    l.set_hopper_to_bucket_rate_per_sec(at(1000), infinite);
    CHECK(l.hopper_to_bucket_rate_per_sec().is_infinite());
    CHECK(l.in_bucket(at(1000)) == 100);
    CHECK(l.try_take(at(1000), 60) == TryTake::taken);
    CHECK(l.in_bucket(at(1000)) == 100);  // refilled from the infinite hopper at once
    check_accounts(l, at(1000));

    // From infinite to finite: returned tokens drip at the new rate.
    auto th = Limiter::open(seg, "rate-th",
                            {.hopper_to_bucket_rate_per_sec = infinite,
                             .bucket_size = 5,
                             .initial_bucket_level = 5,
                             .initial_hopper_level = 0.0},
                            t0);
    CHECK(th.try_take(t0, 5) == TryTake::taken);
    CHECK(th.try_take(t0, 1) == TryTake::unable);
    th.return_to_hopper(t0, 2);
    CHECK(th.in_bucket(t0) == 2);  // infinite rate: straight through the hopper
    th.set_hopper_to_bucket_rate_per_sec(at(1), 1.0);
    CHECK(th.in_bucket(at(1)) == 2);
    th.return_to_hopper(at(1), 3);
    CHECK(th.in_bucket(at(1)) == 2);
    CHECK(finite(th.in_hopper(at(1))) == 3);
    CHECK(th.in_bucket(at(3)) == 4);
    CHECK(th.in_bucket(at(9)) == 5);
    check_accounts(th, at(9));
}

TEST_CASE("try_take: taken, unable, asked for more than the bucket size") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-take"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "take",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 4,
                            .initial_bucket_level = 3,
                            .initial_hopper_level = 1.0},
                           t0);
    CHECK(l.try_take(t0, 4.0001) == TryTake::asked_for_more_than_bucket_size);
    CHECK(l.try_take(t0, 3.5) == TryTake::unable);
    CHECK(l.try_take(t0, 0) == TryTake::taken);
    CHECK(l.in_flight(t0) == 0);
    CHECK(l.try_take(t0, 3) == TryTake::taken);
    CHECK(l.try_take(t0, 0.5) == TryTake::unable);
    CHECK(l.in_flight(t0) == 3);
    CHECK(l.try_take(at(0.5), 0.5) == TryTake::taken);
    CHECK(l.try_take(at(10), 1) == TryTake::unable);  // the hopper held only 1
    check_accounts(l, at(10));
}

TEST_CASE("tokens_may_be_available_when, for reachable and unreachable amounts") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-when"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "when",
                           {.hopper_to_bucket_rate_per_sec = 2.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 1,
                            .initial_hopper_level = 4.0},
                           t0);
    using K = Availability::Kind;
    CHECK(l.tokens_may_be_available_when(t0, 11).kind() ==
          K::never_because_greater_than_bucket_size);
    CHECK(l.tokens_may_be_available_when(t0, 1) == Availability::at(t0));
    CHECK(l.tokens_may_be_available_when(t0, 2) == Availability::at(at(0.5)));
    CHECK(l.tokens_may_be_available_when(t0, 5) == Availability::at(at(2)));
    // More than bucket + hopper: only returns can bring them.
    CHECK(l.tokens_may_be_available_when(t0, 5.0001).kind() == K::when_return_to_hopper_is_called);
    CHECK(l.tokens_may_be_available_when(at(1), 2) == Availability::at(at(1)));
    // The time is a lower bound on the drip, exact to the nanosecond: 3 tokens/s brings one
    // token after 333,333,333.3 ns, so at the 333,333,334th.
    auto three = Limiter::open(
        seg, "when3",
        {.hopper_to_bucket_rate_per_sec = 3.0, .bucket_size = 10, .initial_hopper_level = infinite},
        t0);
    const Availability a = three.tokens_may_be_available_when(t0, 1);
    REQUIRE(a.kind() == K::at);
    CHECK(a.time() == t0 + 333'333'334ns);
    CHECK(three.in_bucket(a.time() - 1ns) < 1);
    CHECK(three.in_bucket(a.time()) == 1);
    // An infinite rate and an empty bucket: only a return helps.
    auto th = Limiter::open(seg, "when-th",
                            {.hopper_to_bucket_rate_per_sec = infinite,
                             .bucket_size = 2,
                             .initial_bucket_level = 2,
                             .initial_hopper_level = 0.0},
                            t0);
    CHECK(th.try_take(t0, 2) == TryTake::taken);
    CHECK(th.tokens_may_be_available_when(t0, 1).kind() == K::when_return_to_hopper_is_called);
    // A zero rate never drips: available "at" the end of time if the hopper has them.
    auto still = Limiter::open(
        seg, "when-0",
        {.hopper_to_bucket_rate_per_sec = 0.0, .bucket_size = 2, .initial_hopper_level = infinite},
        t0);
    CHECK(still.tokens_may_be_available_when(t0, 1) == Availability::at(TimePoint::max()));
    CHECK_THROWS_AS(Availability::when_return_to_hopper_is_called().time(), Error);
}

TEST_CASE("returns: over_release and bad amounts change nothing") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-ret"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "ret",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 4,
                            .initial_bucket_level = 4,
                            .initial_hopper_level = 0.0},
                           t0);
    CHECK(l.try_take(t0, 2) == TryTake::taken);
    try {
        l.return_to_hopper(t0, 2.0001);
        FAIL("over-release must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::over_release);
        CHECK(std::string(e.what()).find("'ret'") != std::string::npos);
    }
    for (double bad : {-1.0, std::nan(""), HUGE_VAL}) {
        CHECK_THROWS_AS(l.return_to_hopper(t0, bad), Error);
        CHECK_THROWS_AS(l.try_take(t0, bad), Error);
        CHECK_THROWS_AS(l.tokens_may_be_available_when(t0, bad), Error);
    }
    CHECK(l.in_flight(t0) == 2);
    CHECK(l.in_bucket(t0) == 2);
    l.return_to_hopper(t0, 0);
    l.return_to_hopper(t0, 2);
    CHECK(l.in_flight(t0) == 0);
    CHECK(finite(l.in_hopper(t0)) == 2);
    check_accounts(l, t0);
}

TEST_CASE("bad reconfigurations are refused and change nothing") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-badcfg"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "badcfg",
                           {.hopper_to_bucket_rate_per_sec = 1.0,
                            .bucket_size = 4,
                            .initial_bucket_level = 4,
                            .initial_hopper_level = 0.0},
                           t0);
    const auto before = lim::test::segment_file_bytes(guard.name());
    for (double bad : {0.0, -1.0, std::nan(""), HUGE_VAL, 2e9}) {
        CAPTURE(bad);
        CHECK_THROWS_AS(l.set_bucket_size(t0, bad), Error);
        if (bad != 0.0) CHECK_THROWS_AS(l.set_token_target_level(t0, bad), Error);
        if (bad != 0.0) CHECK_THROWS_AS(l.set_hopper_to_bucket_rate_per_sec(t0, bad), Error);
    }
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
}

TEST_CASE("opening an existing key attaches; another configuration is config_mismatch") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-open"));
    auto seg = lim::test::limiter_segment(guard);
    const LimiterConfig config{.hopper_to_bucket_rate_per_sec = 2.0,
                               .bucket_size = 10,
                               .initial_bucket_level = 10,
                               .initial_hopper_level = infinite};
    auto a = Limiter::open(seg, "shared", config, t0);
    auto b = Limiter::open(seg, "shared", config, at(50));  // attaches; `now` is unused
    CHECK(a.try_take(t0, 4) == TryTake::taken);
    CHECK(b.in_bucket(t0) == 6);
    CHECK(b.in_flight(t0) == 4);
    LimiterConfig other = config;
    other.bucket_size = 11;
    try {
        Limiter::open(seg, "shared", other, t0);
        FAIL("expected config_mismatch");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::config_mismatch);
        CHECK(std::string(e.what()).find("bucket_size 10") != std::string::npos);
    }
    auto adopted = Limiter::open(seg, "shared", other, adopt_existing, t0);
    CHECK(adopted.bucket_size() == 10);
    CHECK(adopted.in_flight(t0) == 4);
}

TEST_CASE("the SPEC's examples compile and behave") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-spec"));
    auto seg = lim::test::limiter_segment(guard);
    auto ex = lim::Limiter::open(seg, "raw",
                                 lim::LimiterConfig{.hopper_to_bucket_rate_per_sec = 2.0,
                                                    .bucket_size = 10,
                                                    .initial_bucket_level = 0,
                                                    .initial_hopper_level = lim::infinite});
    auto tb = lim::TokenBucket::open(
        seg, "emails", {.burst_size = 10, .sustained_rate_per_sec = 2, .initial_bucket_level = 0});
    auto th = lim::Throttle::open(seg, "db", {.max_concurrent_jobs = 8});
    auto trl = lim::ThrottledRateLimiter::open(
        seg, "api", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3});
    CHECK(ex.bucket_size() == 10);
    CHECK(tb.burst_size() == 10);
    CHECK(th.max_concurrent_jobs() == 8);
    CHECK(trl.max_concurrent_jobs() == 3);
    CHECK(th.try_start_job() == StartJob::start());
    th.finish_job();
    CHECK(trl.try_start_job().kind() == StartJob::Kind::start);
    trl.finish_job();
}
