// The drip D(t) = floor(elapsed x rate) in units, exactly, for whole and fractional rates, and
// its inverse; and re-anchoring far from the anchor, which keeps the marker word in range
// without creating or losing tokens.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <random>

#include "lim/limiter.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/records.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::detail::DripRate;

namespace {
__extension__ using u128 = unsigned __int128;

// floor(e x R / 10^9) with R = m / 2^shift, computed the slow, obvious way.
std::int64_t reference(const DripRate& r, std::int64_t e) {
    if (e <= 0) return 0;
    const u128 v = (static_cast<u128>(e) * r.m >> r.shift) / 1'000'000'000u;
    return v > static_cast<u128>(detail::kMaxInFlight) ? detail::kMaxInFlight
                                                       : static_cast<std::int64_t>(v);
}
}  // namespace

TEST_CASE("the drip is floor(elapsed x rate) exactly") {
    // Whole numbers of units per second are held exactly; 0.5 token/s is 5000 units/s.
    CHECK(DripRate::from_rate(0.5).m == 5000);
    CHECK(DripRate::from_rate(0.5).shift == 0);
    CHECK(DripRate::from_rate(2.7).m == 27'000);
    CHECK(DripRate::from_rate(1e9).m == 10'000'000'000'000);
    CHECK(DripRate::from_rate(0).units_after(1'000'000'000) == 0);
    CHECK(DripRate::from_rate(1).units_after(1'000'000'000) == 10'000);
    CHECK(DripRate::from_rate(1).units_after(99'999) == 0);
    CHECK(DripRate::from_rate(1).units_after(100'000) == 1);
    CHECK(DripRate::from_rate(1).units_after(-5) == 0);
    std::mt19937_64 rng(42);
    const double rates[] = {1e-6, 1.0 / 3.0, 0.3, 1, 2.5, 7.77, 1234.5678, 1e6 / 7, 1e6, 3e8, 1e9};
    for (double rate : rates) {
        CAPTURE(rate);
        const DripRate r = DripRate::from_rate(rate);
        for (int i = 0; i < 2000; ++i) {
            // Elapsed times from nanoseconds to years.
            const int bits = 1 + static_cast<int>(rng() % 56);
            const auto e = static_cast<std::int64_t>(rng() >> (64 - bits));
            CAPTURE(e);
            REQUIRE(r.units_after(e) == reference(r, e));
            REQUIRE(r.units_after(e) <= r.units_after(e + 1));  // monotone
        }
    }
}

TEST_CASE("elapsed_for is the first nanosecond at which the drip reaches an amount") {
    std::mt19937_64 rng(7);
    for (double rate : {1.0 / 3.0, 0.3, 1.0, 3.0, 2.5, 1e6 / 7, 1e9}) {
        CAPTURE(rate);
        const DripRate r = DripRate::from_rate(rate);
        for (int i = 0; i < 500; ++i) {
            const auto units = static_cast<std::int64_t>(1 + rng() % 100'000'000);
            const auto e = r.elapsed_for(units);
            REQUIRE(e.has_value());
            CHECK(r.units_after(*e) >= units);
            CHECK(r.units_after(*e - 1) < units);
        }
    }
    CHECK_FALSE(DripRate::from_rate(0).elapsed_for(1).has_value());
}

TEST_CASE("far from the anchor, the drip is re-anchored without creating or losing a unit") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-rebase"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    const TimePoint t0 = Clock::now() - std::chrono::seconds(100'000);  // in the past: see "Time"
    // 10^9 tokens/s: after 100 s the drip allowance is 10^15 units, past what the marker word
    // holds; the take must re-anchor first.
    auto l = Limiter::open(seg, "fast",
                           {.hopper_to_bucket_rate_per_sec = 1e9,
                            .bucket_size = 10,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = 30.0},
                           t0);
    const TimePoint t1 = t0 + std::chrono::seconds(100);
    CHECK(l.in_bucket(t1) == 10);
    CHECK(l.in_hopper(t1).value() == 20);
    CHECK(l.try_take(t1, 4) == TryTake::taken);
    CHECK(l.in_bucket(t1) == 6);
    CHECK(l.in_hopper(t1).value() == 20);
    // One token per nanosecond from here, not retroactively.
    CHECK(l.in_bucket(t1 + std::chrono::nanoseconds(3)) == 9);
    l.return_to_hopper(t1 + std::chrono::nanoseconds(3), 4);
    CHECK(l.in_system(t1 + std::chrono::nanoseconds(3)).value() == 30);
    // Many times over: the marker stays in range and every unit is accounted for.
    TimePoint t = t1;
    for (int i = 0; i < 50; ++i) {
        t += std::chrono::seconds(60);
        REQUIRE(l.try_take(t, 10) == TryTake::taken);
        REQUIRE(l.in_bucket(t) == 0);
        l.return_to_hopper(t, 10);
        REQUIRE(l.in_bucket(t + std::chrono::nanoseconds(7)) == 7);
    }
    const auto& body = *reinterpret_cast<const detail::LimiterBody*>(
        seg.state()
            ->record(*detail::find_record(*seg.state(), detail::RecordKind::limiter, "fast"))
            .body);
    const std::int64_t x = detail::BucketWord::x(body.bucket.load());
    CHECK(x < detail::kRebaseHard);
    CHECK(x > -detail::kMaxTokenUnits);
    l.invariant();
}
