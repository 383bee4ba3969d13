// The consumed fast take (lim-feeder's global rate: docs/design.md ("The Limiter family"), "The
// consumed fast take"): one CAS on F without a Hold, under forced interleavings — a configuration
// switch, a reaper's freeze, a lease deadline passing between the deadline's load and the CAS —
// and a multi-process check that a consumed record's F never goes down, whatever path a take
// runs, while the configuration switches under it (the feeder counts F as spent).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/process_table.hpp"
#include "support/consumed_records.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

constexpr std::int64_t kUnit = kTokenResolution;  // one token, in units
constexpr auto kUnitWord = static_cast<std::uint64_t>(kTokenResolution);

// A consumed record as lim-feeder makes it (infinite drip, the burst as bucket, target 0), with
// `grant` tokens granted and a lease deadline an hour away; and what the fast take works on.
struct Global : lim::test::FeederRecord {
    explicit Global(double grant) : FeederRecord(grant, "lim-cfast") {}
};

}  // namespace

TEST_CASE("the consumed fast take: one CAS on F, counted as admitted, in no ledger") {
    Global g(3);
    const std::uint64_t admitted_before = g.admitted();
    CHECK(g.core.try_take_consumed(g.entry, g.now_ns(), kUnit) == detail::ConsumedOutcome::taken);
    CHECK(g.core.try_take_consumed(g.entry, detail::kClockUnread, 2 * kUnit) ==
          detail::ConsumedOutcome::taken);
    CHECK(g.body.in_flight.load() == 3 * kUnitWord);
    CHECK(g.admitted() == admitted_before + 2);
    CHECK(g.entry.held[0].load() == 0);  // consumed: nothing for a reap to give back
    // Empty: the fast take declines, changing nothing; the general take refuses and counts the
    // refusal as demand (once).
    CHECK(g.core.try_take_consumed(g.entry, g.now_ns(), kUnit) == detail::ConsumedOutcome::general);
    CHECK(g.body.in_flight.load() == 3 * kUnitWord);
    CHECK(g.lm.try_take(1) == TryTake::unable);
    CHECK(take_refused_demand(g.lm) == 1);
    // More than the bucket: declined, then asked_for_more (not demand).
    g.lm.set_token_target_level(30.0);
    CHECK(g.core.try_take_consumed(g.entry, g.now_ns(), 11 * kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.lm.try_take(11) == TryTake::asked_for_more_than_bucket_size);
    CHECK(take_refused_demand(g.lm) == 0);
    // Through the public handles (Limiter and TokenBucket with adopt_existing): the fast take.
    auto tb = TokenBucket::open(g.seg, "global", {.burst_size = 10, .sustained_rate_per_sec = 1},
                                adopt_existing);
    CHECK(g.lm.try_take(4) == TryTake::taken);
    CHECK(tb.try_take(5) == TryTake::taken);
    CHECK(g.lm.in_flight() == 12);
    CHECK(g.admitted() == admitted_before + 4);
    g.lm.invariant();
}

TEST_CASE("a switch between the consumed fast take's load and its CAS: not admitted, n spent") {
    Global g(2);
    const std::uint64_t admitted_before = g.admitted();
    // The fast take loads F and S ...
    const std::uint64_t fw = g.body.in_flight.load();
    const std::uint64_t s = g.body.bucket.load();
    // ... the feeder ends the lease as it does: target <- F (read now, before the take's CAS)
    // ...
    g.lm.set_token_target_level(g.lm.in_flight());
    // ... and the CAS, decided under the old target, lands. The generation check after it sends
    // the take to the general path without taking the n back out of F: the feeder may have read
    // F with it (and counted it as spent), so a rollback would leave n more to spend than Redis
    // counts. Not admitted.
    CHECK(g.core.try_take_consumed_from(g.entry, fw, s, g.now_ns(), kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.body.in_flight.load() == kUnitWord);
    CHECK(g.admitted() == admitted_before);
    // The general take decides under the new target (0): nothing to take.
    CHECK(g.lm.try_take(1) == TryTake::unable);
    // What may still be spent never exceeds target - F (here: less, by the stray n).
    CHECK(g.lm.in_bucket() == 0);
    g.lm.invariant();
}

TEST_CASE("a reaper's freeze before the consumed fast take's CAS sends it to the general path") {
    Global g(2);
    std::optional<detail::FileLock> reaping =
        detail::FileLock::lock_exclusive(g.seg.state()->fd(), detail::LockByte::recovery);
    const std::uint64_t fw = g.body.in_flight.load();
    const std::uint64_t s = g.body.bucket.load();
    detail::kLimiterOps.freeze(*g.seg.state(), g.rec);
    // Loaded before the freeze: the CAS expects the unfrozen word, fails, and finds it frozen.
    CHECK(g.core.try_take_consumed_from(g.entry, fw, s, g.now_ns(), kUnit) ==
          detail::ConsumedOutcome::general);
    // Loaded after it: declined at once.
    CHECK(g.core.try_take_consumed(g.entry, g.now_ns(), kUnit) == detail::ConsumedOutcome::general);
    CHECK(g.body.in_flight.load() == detail::kFrozen);
    detail::kLimiterOps.thaw(*g.seg.state(), g.rec);
    reaping.reset();
    CHECK(g.lm.try_take(1) == TryTake::taken);
    CHECK(g.lm.in_flight() == 1);
}

TEST_CASE("the consumed fast take enforces the lease deadline before and after its CAS") {
    Global g(5);
    const std::uint64_t admitted_before = g.admitted();
    const TimePoint deadline = Clock::now() + 2ms;
    set_lease_deadline(g.lm, deadline);
    while (Clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
    // A stale time (taken before the deadline, as by a taker stopped since): it passes the check
    // before the CAS (the limiter's time L is behind the deadline too), and the clock read after
    // the CAS refuses it; its n stays in F, consumed and not admitted (what a taker killed
    // between the two leaves).
    CHECK(g.core.try_take_consumed(g.entry, to_nanos(deadline) - 1'000'000, kUnit) ==
          detail::ConsumedOutcome::late);
    CHECK(g.body.in_flight.load() == kUnitWord);
    CHECK(g.admitted() == admitted_before);
    // No time (the lazy clock: the check before the CAS compares L alone): the same, through the
    // public call.
    CHECK(g.lm.try_take(1) == TryTake::unable);
    CHECK(g.lm.in_flight() == 2);
    CHECK(take_refused_demand(g.lm) == 0);  // late takes are spent, not refused demand
    // A time at or past the deadline: declined before the CAS (the general take refuses it,
    // counts it as demand, and raises L to it), nothing taken.
    CHECK(g.core.try_take_consumed(g.entry, g.now_ns(), kUnit) == detail::ConsumedOutcome::general);
    CHECK(g.lm.try_take(Clock::now(), 1) == TryTake::unable);
    CHECK(take_refused_demand(g.lm) == 1);
    // From now on L is past the deadline, so even a stale time is refused before the CAS.
    CHECK(g.core.try_take_consumed(g.entry, to_nanos(deadline) - 1'000'000, kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.lm.in_flight() == 2);
    // A new deadline lets takes through again.
    set_lease_deadline(g.lm, Clock::now() + 1h);
    CHECK(g.lm.try_take(1) == TryTake::taken);
    CHECK(g.admitted() == admitted_before + 1);
}

TEST_CASE("a consumed record's F never goes down while takes race the feeder's switches") {
    // Forked takers (two blocking, whose re-checks run the general take, and one polling with
    // the fast take) against a parent that switches the target as the feeder does, back to back:
    // raise it by a grant, or lower it to F (read first) + what it keeps. A forked monitor reads
    // F in a loop: no read may be below the one before, since a take that raced a switch leaves
    // its n in F (spent) instead of rolling it back. Built with LIM_RACE_WIDEN, the race points
    // between each CAS and its generation check make those races common.
    Global g(0);
    auto* stop = lim::test::shared_array<std::atomic<int>>(1);
    auto* admitted = lim::test::shared_array<std::atomic<std::int64_t>>(3);
    auto* went_down = lim::test::shared_array<std::atomic<std::int64_t>>(1);
    std::vector<pid_t> children;
    for (int k = 0; k < 3; ++k) {
        children.push_back(lim::test::fork_child([&, k] {
            auto tb = TokenBucket::open(
                g.seg, "global", {.burst_size = 10, .sustained_rate_per_sec = 1}, adopt_existing);
            while (stop->load() == 0) {
                const bool took = k < 2 ? g.lm.take_until(1, Clock::now() + 2ms)
                                        : tb.try_take(1) == TryTake::taken;
                if (took) admitted[k].fetch_add(1);
            }
            return 0;
        }));
    }
    children.push_back(lim::test::fork_child([&] {
        std::uint64_t last = 0;
        while (stop->load() == 0) {
            const std::uint64_t f = g.body.in_flight.load() & ~detail::kFrozen;
            if (f < last) went_down->fetch_add(1);
            last = f;
        }
        return 0;
    }));
    double target = 0;
    std::int64_t switches = 0;
    // 800 ms, and on until something was admitted (children that a loaded machine starts late
    // may not have run at all by then), for at most 30 s more.
    const TimePoint end = Clock::now() + 800ms;
    const auto none_admitted = [&] {
        return admitted[0].load() + admitted[1].load() + admitted[2].load() == 0;
    };
    while (Clock::now() < end || (none_admitted() && Clock::now() < end + 30s)) {
        // Alternately a grant of 2 and a lease end keeping 1 (the feeder's two operations).
        target = (switches % 2 == 0) ? target + 2 : g.lm.in_flight() + 1;
        g.lm.set_token_target_level(target);
        ++switches;
    }
    stop->store(1);
    g.lm.set_token_target_level(g.lm.in_flight() + 10);  // wake and serve the blocked takers
    for (const pid_t p : children)
        CHECK(lim::test::wait_child(p) == 0);
    CHECK(went_down->load() == 0);
    const std::int64_t total = admitted[0].load() + admitted[1].load() + admitted[2].load();
    MESSAGE("switches: " << switches << ", admitted: " << total << " (blocking "
                         << admitted[0].load() + admitted[1].load()
                         << "), in flight: " << g.lm.in_flight());
    CHECK(total > 0);
    // Every admitted token is in F (F also holds the n of takes that raced a switch or landed
    // late: spent, not admitted), and F never passed the target.
    CHECK(static_cast<double>(total) <= g.lm.in_flight());
    g.lm.invariant();
}
