// lim::rebase_consumed: a consumed record's takes stay in flight forever, so lim-feeder lowers the
// target and in_flight by the same amount before the target reaches its limit (10^9 tokens).
// What may still be taken (target - in_flight) never grows, under takers in other processes, a
// reaper's frozen word, and a rebaser killed between its two steps.
#include <signal.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <thread>
#include <vector>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/consumed_rebase.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/consumed_records.hpp"
#include "support/limiter_records.hpp"
#include "support/process.hpp"

using lim::test::feeder_config;
using namespace std::chrono_literals;

namespace {

double target_of(const lim::Limiter& l) {
    return l.token_target_level().value();
}

}  // namespace

TEST_CASE("rebase: many rebases under forked takers; admitted <= granted exactly, past 10^9") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rebase"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    constexpr double kGrant = 1e6;  // tokens per grant, and the bucket (burst)
    constexpr double kTotal = 3e9;  // granted over the run: three times the old lifetime cap
    lim::Limiter l = lim::open_consumed_limiter(seg, "global", feeder_config(kGrant));

    constexpr int kTakers = 4;
    auto* admitted = lim::test::shared_array<std::atomic<std::int64_t>>(kTakers);  // tokens
    auto* stop = lim::test::make_flag();
    std::vector<pid_t> pids;
    for (int i = 0; i < kTakers; ++i) {
        pids.push_back(lim::test::fork_child([&, i] {
            // Workers take as a TokenBucket adopting the record (the general take on a Limiter
            // record), in whole tokens of several sizes: 1 up to the whole bucket.
            auto tb = lim::TokenBucket::open(seg, "global",
                                             {.burst_size = kGrant, .sustained_rate_per_sec = 1},
                                             lim::adopt_existing);
            const double sizes[] = {1, 977, 100'000, 250'000, kGrant};
            for (std::uint64_t k = 0; stop->value.load() == 0; ++k) {
                const double n = sizes[(k + static_cast<std::uint64_t>(i)) % 5];
                if (tb.try_take(n) == lim::TryTake::taken) {
                    admitted[i].fetch_add(static_cast<std::int64_t>(n));
                }
            }
            return 0;
        }));
    }

    double granted = 0, target_lowered = 0, in_flight_lowered = 0, max_target = 0;
    int rebases = 0;
    for (int k = 0; granted < kTotal; ++k) {
        // As lim-feeder tops the lease up: when the takers have nearly emptied it.
        REQUIRE(
            lim::test::eventually([&] { return target_of(l) - l.in_flight() < kGrant / 2; }, 60s));
        l.set_token_target_level(target_of(l) + kGrant);  // add a grant
        granted += kGrant;
        max_target = std::max(max_target, target_of(l));
        if (k % 4 == 3) {
            const lim::ConsumedRebase r = lim::rebase_consumed(l);
            CHECK(r.in_flight_lowered <= r.target_lowered);
            target_lowered += r.target_lowered;
            in_flight_lowered += r.in_flight_lowered;
            ++rebases;
        }
    }
    // Let the takers spend what is left down to less than a token's worth of their smallest take.
    CHECK(lim::test::eventually([&] { return target_of(l) - l.in_flight() < 1; }, 60s));
    stop->set();
    for (const pid_t pid : pids)
        REQUIRE(lim::test::wait_child(pid) == 0);

    double total = 0;
    for (int i = 0; i < kTakers; ++i)
        total += static_cast<double>(admitted[i].load());
    const double left = target_of(l) - l.in_flight();
    const double gap = target_lowered - in_flight_lowered;
    const double clamped = l.in_flight() + in_flight_lowered - total;
    MESSAGE("granted ", granted, " tokens, admitted ", total, " in ", rebases,
            " rebases; the target never above ", max_target, "; under-use: ", gap,
            " (in_flight below a rebase's target cut), ", clamped, " (roll-backs clamped)");
    // Accounting, in whole tokens (exact in doubles). Every granted token is in the target or was
    // rebased away; every admitted one is in flight or was rebased away, and in_flight may hold
    // more (a take's tentative increment counted in a rebase, then rolled back, clamps at 0).
    CHECK(granted == target_of(l) + target_lowered);
    CHECK(clamped >= 0);
    CHECK(gap >= 0);
    CHECK(total <= granted);  // never over-admitted
    // What was granted and not admitted is exactly what is left, the rebases' under-use, and
    // the clamped roll-backs (all under-use, none over).
    CHECK(granted - total == left + gap + clamped);
    CHECK(left < 1);
    // And the takers kept admitting to the end, past 10^9. (Under-use per rebase is at most the
    // tentative takes its switch makes roll back: 0.0001% here, 0.3-0.5% with race widening, and
    // 8.6% once in the ASan build with race widening under ctest -j6 on 2 cores, where takers
    // preempted between their tentative increment and their CAS on S meet many more rebases.
    // Under-use is the safe side; this bound only says the takers were not starved.)
    CHECK(total > 0.8 * granted);
    CHECK(rebases >= 500);
    CHECK(max_target < 1e9);  // never near the target's limit
    l.invariant();
}

TEST_CASE("rebase: a rebaser killed between its steps leaves the record under-used, never over") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rebase-kill"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    lim::Limiter l = lim::open_consumed_limiter(seg, "global", feeder_config(1000));
    l.set_token_target_level(1000.0);
    for (int i = 0; i < 9; ++i)
        REQUIRE(l.try_take(100) == lim::TryTake::taken);
    REQUIRE(l.in_flight() == 900);
    const double left_before = target_of(l) - l.in_flight();  // 100 may still be taken
    const pid_t pid = lim::test::fork_child([&] {
        // The kill point lim::rebase_consumed passes through: target lowered, F not yet.
        lim::detail::rebase_consumed_units(
            l, [](void*) { ::raise(SIGKILL); }, nullptr);
        return 0;
    });
    REQUIRE(lim::test::wait_child(pid) == 128 + SIGKILL);
    CHECK(target_of(l) == 100);  // lowered by min(target, in_flight) = 900
    CHECK(l.in_flight() == 900);
    CHECK(target_of(l) - l.in_flight() < left_before);  // less may be taken, never more
    CHECK(l.try_take(1) == lim::TryTake::unable);
    seg.reap();  // the dead rebaser's slot: a consumed record's in_flight is left as it is
    CHECK(l.in_flight() == 900);
    CHECK(l.try_take(1) == lim::TryTake::unable);

    // What a restarted lim-feeder does: a target below in_flight is raised to it (nothing to
    // take), a rebase brings both down, and a grant is then exactly what can be taken.
    l.set_token_target_level(l.in_flight());
    CHECK(l.try_take(1) == lim::TryTake::unable);
    const lim::ConsumedRebase r = lim::rebase_consumed(l);
    CHECK(r.target_lowered == 900);
    CHECK(r.in_flight_lowered == 900);
    CHECK(l.in_flight() == 0);
    CHECK(target_of(l) == 0);
    l.set_token_target_level(target_of(l) + 50);
    int taken = 0;
    while (l.try_take(1) == lim::TryTake::taken)
        ++taken;
    CHECK(taken == 50);
    l.invariant();
}

TEST_CASE("rebase: in_flight is lowered only once a reaper's recount has thawed the word") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rebase-frozen"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    lim::Limiter l = lim::open_consumed_limiter(seg, "global", feeder_config(100));
    l.set_token_target_level(100.0);
    REQUIRE(l.try_take(60) == lim::TryTake::taken);
    const std::uint32_t rec = lim::test::record_of(seg, "global");
    // As a reaper does: the recovery lock held (so nobody thaws the word behind its back), the
    // record's in-flight word frozen.
    std::optional<lim::detail::FileLock> reaping =
        lim::detail::FileLock::lock_exclusive(seg.state()->fd(), lim::detail::LockByte::recovery);
    lim::detail::kLimiterOps.freeze(*seg.state(), rec);
    const auto frozen_at = std::chrono::steady_clock::now();
    std::atomic<bool> done{false};
    std::optional<lim::ConsumedRebase> result;
    std::thread rebaser([&] {
        result = lim::rebase_consumed(l);
        done = true;
    });
    // The target is lowered (a switch does not wait for a recount); in_flight waits aside.
    REQUIRE(lim::test::eventually([&] { return target_of(l) == 40; }));
    std::this_thread::sleep_for(30ms);
    // Read while the freeze is younger than kFrozenBreakTimeout (measured after the reads): past
    // it the rebaser thaws the word itself (the reaper is presumed stopped) and goes on, which
    // only a badly loaded machine that descheduled this thread that long lets happen.
    const bool done_frozen = done.load();
    const double in_flight_frozen = l.in_flight();
    if (std::chrono::steady_clock::now() - frozen_at < lim::detail::kFrozenBreakTimeout) {
        CHECK_FALSE(done_frozen);
        CHECK(in_flight_frozen == 60);  // 40 - 60: nothing may be taken meanwhile (under-use)
    } else {
        MESSAGE("this thread stalled past the break timeout: the frozen-window checks skipped");
    }
    lim::detail::LiveHoldings live;
    lim::detail::kLimiterOps.recount(*seg.state(), rec, live, {}, lim::Clock::now());
    reaping.reset();
    rebaser.join();
    REQUIRE(result.has_value());
    CHECK(result->target_lowered == 60);
    CHECK(result->in_flight_lowered == 60);
    CHECK(l.in_flight() == 0);
    CHECK(target_of(l) == 40);
    int taken = 0;
    while (l.try_take(1) == lim::TryTake::taken)
        ++taken;
    CHECK(taken == 40);  // what was left before the rebase, exactly
    l.invariant();
}

TEST_CASE("rebase: refused on a record that is not consumed, or has an infinite target") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rebase-refused"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    lim::Limiter ordinary = lim::Limiter::open(seg, "ordinary", feeder_config(10));
    CHECK_THROWS_AS(lim::rebase_consumed(ordinary), lim::Error);
    lim::Limiter consumed = lim::open_consumed_limiter(seg, "global", feeder_config(10));
    consumed.set_token_target_level(lim::infinite);
    CHECK_THROWS_AS(lim::rebase_consumed(consumed), lim::Error);
    consumed.set_token_target_level(0.0);
    const lim::ConsumedRebase r = lim::rebase_consumed(consumed);  // nothing in flight: no-op
    CHECK(r.target_lowered == 0);
    CHECK(r.in_flight_lowered == 0);
}
