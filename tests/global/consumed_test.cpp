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
