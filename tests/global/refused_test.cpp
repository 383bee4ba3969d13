// lim::take_refused_demand: a consumed record counts the units of the takes it refuses (too few
// tokens, or past its lease deadline), so that lim-feeder sees demand that spends nothing (a
// worker polling try_take(n) while the host holds fewer than n: global_review R9). Exact counts,
// from this process and from forked ones; admitted takes, oversized takes and ordinary records
// are not counted.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "support/process.hpp"

namespace {

using namespace std::chrono_literals;

const lim::LimiterConfig kConfig{.hopper_to_bucket_rate_per_sec = lim::infinite,
                                 .bucket_size = 10,
                                 .initial_bucket_level = 0,
                                 .initial_hopper_level = 0.0};

lim::TokenBucket worker_handle(const lim::Segment& seg, const char* key) {
    return lim::TokenBucket::open(seg, key, {.burst_size = 10, .sustained_rate_per_sec = 1},
                                  lim::adopt_existing);
}

}  // namespace

TEST_CASE("refused demand: refused takes are counted exactly, admitted ones not") {
    lim::test::SegmentGuard guard(lim::test::unique_name("refused"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    lim::Limiter l = lim::open_consumed_limiter(seg, "global", kConfig);
    REQUIRE(lim::is_consumed(l));
    CHECK(lim::take_refused_demand(l) == 0);  // a new record: nothing refused yet
    l.set_token_target_level(3.0);            // the host holds 3 tokens, as a feeder's grant
    lim::set_lease_deadline(l, lim::Clock::now() + 1h);
    auto tb = worker_handle(seg, "global");

    // Too few tokens: every call's n is counted, by any handle, with or without a `now`.
    CHECK(tb.try_take(5) == lim::TryTake::unable);
    CHECK(l.try_take(4) == lim::TryTake::unable);
    CHECK(l.try_take(lim::Clock::now(), 3.5) == lim::TryTake::unable);
    // Admitted: not counted.
    CHECK(tb.try_take(2) == lim::TryTake::taken);
    // More than the bucket could ever hold: not demand a lease can serve, not counted.
    CHECK(l.try_take(11) == lim::TryTake::asked_for_more_than_bucket_size);
    CHECK(lim::take_refused_demand(l) == doctest::Approx(12.5).epsilon(1e-12));
    CHECK(lim::take_refused_demand(l) == 0);  // read and reset
    CHECK(l.in_flight() == 2);                // the refusals took nothing

    // Forked workers polling try_take(2) on the 1 token left: 3 x 200 refusals, then each one
    // admitted take of 1 (only one of them can have it; the others are refused once more).
    auto* admitted = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>(0);
    std::vector<pid_t> pids;
    for (int p = 0; p < 3; ++p) {
        pids.push_back(lim::test::fork_child([&seg, admitted] {
            auto t = worker_handle(seg, "global");
            for (int i = 0; i < 200; ++i) {
                if (t.try_take(2) != lim::TryTake::unable) return 1;
            }
            if (t.try_take(1) == lim::TryTake::taken) admitted->fetch_add(1);
            return 0;
        }));
    }
    for (const pid_t pid : pids)
        CHECK(lim::test::wait_child(pid) == 0);
    CHECK(admitted->load() == 1);
    CHECK(l.in_flight() == 3);
    // 600 refused takes of 2, and 2 refused takes of 1.
    CHECK(lim::take_refused_demand(l) == 1202);

    // Past the lease deadline: refused, and counted, although the target leaves tokens.
    l.set_token_target_level(l.in_flight() + 5);
    lim::set_lease_deadline(l, lim::Clock::now() - 1s);
    CHECK(tb.try_take(1) == lim::TryTake::unable);
    CHECK(l.try_take(2) == lim::TryTake::unable);
    CHECK(lim::take_refused_demand(l) == 3);
    // A blocking take counts its n once per call, however often it re-checks while it sleeps.
    CHECK_FALSE(tb.take_until(4, lim::Clock::now() + 150ms));
    CHECK(lim::take_refused_demand(l) == 4);
    CHECK(l.in_flight() == 3);

    // A blocking take that sleeps, then is served: its first refusal counted once; the taken
    // units are spent (in flight), not refused.
    const pid_t sleeper = lim::test::fork_child([&seg] {
        auto t = worker_handle(seg, "global");
        return t.take_until(2, lim::Clock::now() + 120s) ? 0 : 1;
    });
    CHECK(lim::test::eventually([&] { return l.waiters() >= 1; }, 60s));
    lim::set_lease_deadline(l, lim::Clock::now() + 1h);  // wakes it
    CHECK(lim::test::wait_child(sleeper) == 0);
    CHECK(l.in_flight() == 5);
    CHECK(lim::take_refused_demand(l) == 2);
    l.invariant();
}

TEST_CASE("refused demand: a finite-rate consumed record counts too; an ordinary one never") {
    lim::test::SegmentGuard guard(lim::test::unique_name("refusedf"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    // A slow drip (one token in 1,000 s): the bucket is empty, its takes refused for the drip.
    lim::Limiter finite = lim::open_consumed_limiter(seg, "finite",
                                                     {.hopper_to_bucket_rate_per_sec = 0.001,
                                                      .bucket_size = 10,
                                                      .initial_bucket_level = 0,
                                                      .initial_hopper_level = 0.0});
    finite.set_token_target_level(10.0);
    CHECK(finite.try_take(1) == lim::TryTake::unable);
    CHECK(finite.try_take(lim::Clock::now(), 3) == lim::TryTake::unable);
    CHECK(lim::take_refused_demand(finite) == 4);

    // An ordinary Limiter (not consumed): refusals are never counted, and nothing is reported.
    lim::Limiter ordinary = lim::Limiter::open(seg, "ordinary", kConfig);
    ordinary.set_token_target_level(1.0);
    CHECK(ordinary.try_take(2) == lim::TryTake::unable);
    CHECK(ordinary.try_take(1) == lim::TryTake::taken);
    CHECK(ordinary.try_take(1) == lim::TryTake::unable);
    CHECK(lim::take_refused_demand(ordinary) == 0);
    ordinary.return_to_hopper(1);
}
