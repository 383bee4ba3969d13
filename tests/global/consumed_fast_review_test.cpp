// Adversarial review of the consumed fast take (docs/design.md ("The Limiter family"), "The
// consumed fast take"): cases where its missing Hold, or its keeping of a raced take's n in F,
// could change what is admitted or what the process holds in the segment.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/process_table.hpp"
#include "support/consumed_records.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::occupied;
using namespace std::chrono_literals;

// A take from a thread_local destructor that runs after the thread's slot registry was destroyed
// gets an ephemeral slot (process_table.hpp, Holder::ephemeral), claimed for that one operation:
// a Hold gives it back when it ends. The consumed fast take has no Hold, so it must give the slot
// back itself; otherwise every such take keeps one slot of the process table occupied for the
// life of the mapping, until the table is full (table_full for every new thread of every process).
TEST_CASE("R1: a consumed take from a thread_local destructor gives its ephemeral slot back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-cfrev-tls"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    Limiter lm = lim::test::feeder_record(seg, 100);
    const std::uint32_t before = occupied(seg);
    struct LateTake {
        Limiter* lm = nullptr;
        TryTake took = TryTake::unable;
        ~LateTake() {
            if (lm != nullptr) took = lm->try_take(1);
        }
    };
    for (int k = 0; k < 3; ++k) {
        std::thread([&] {
            // Constructed before the thread's slot registry (the take below creates it), so
            // destroyed after it: its take runs with an ephemeral slot.
            thread_local LateTake late;
            CHECK(lm.try_take(1) == TryTake::taken);  // claims the thread's slot (registry)
            late.lm = &lm;
        }).join();
    }
    // Every take was admitted (3 from the threads' bodies, 3 from their destructors) ...
    CHECK(lm.in_flight() == 6);
    // ... and the table holds what it held before: no slot kept by a finished thread.
    CHECK(occupied(seg) == before);
    CHECK(seg.reap().reaped.empty());
}

// The same for a TokenBucket's own take (also without a Hold). Its take is recorded in the
// ledger (layer kBucketTakenLayer), so the slot it gives back is retired rather than freed, and
// this process's next claim adopts it again: however many such takes, at most one slot stays.
TEST_CASE("R1: a TokenBucket take from a thread_local destructor gives its ephemeral slot back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-cfrev-tbtls"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    auto tb = TokenBucket::open(seg, "tb", {.burst_size = 100, .initial_bucket_level = 100});
    const std::uint32_t before = occupied(seg);
    struct LateTake {
        TokenBucket* tb = nullptr;
        ~LateTake() {
            if (tb != nullptr) CHECK(tb->try_take(1) == TryTake::taken);
        }
    };
    for (int k = 0; k < 5; ++k) {
        std::thread([&] {
            thread_local LateTake late;
            CHECK(tb.try_take(1) == TryTake::taken);
            late.tb = &tb;
        }).join();
    }
    CHECK(tb.in_bucket() == 90);
    CHECK(occupied(seg) <= before + 1);
    CHECK(seg.reap().reaped.empty());
}

namespace {

// A feeder's record and what the fast take works on, as tests/global/consumed_fast_test.cpp has.
struct Fixture : lim::test::FeederRecord {
    explicit Fixture(double grant) : FeederRecord(grant, "lim-cfrev") {}
};

constexpr std::int64_t kUnit = kTokenResolution;

}  // namespace

// Interleavings tried against the missing Hold that hold (regression cases): the fast take neither
// admits against a configuration a reset, a rebase or a reaper changed under it, nor admits more
// than the target leaves.

TEST_CASE("R2: a forced reset between the fast take's loads and its CAS: not admitted") {
    Fixture g(5);
    // The reset forgets what is in flight (F = 0) and starts a new generation; a fast take that
    // loaded F = 0 before it finds its CAS landing (0 -> n) and must still not be admitted.
    const std::uint64_t admitted = g.entry.admitted.load();
    const std::uint64_t fw = g.body.in_flight.load();
    const std::uint64_t s = g.body.bucket.load();
    REQUIRE(fw == 0);
    detail::kLimiterOps.freeze(*g.seg.state(), g.rec);
    detail::kLimiterOps.reset(*g.seg.state(), g.rec, Clock::now());
    CHECK(g.core.try_take_consumed_from(g.entry, fw, s, g.now_ns(), kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.entry.admitted.load() == admitted);
    CHECK(g.lm.in_flight() == 1);  // spent, not admitted (the reset's own target is 0)
    CHECK(g.lm.try_take(1) == TryTake::unable);
    g.lm.invariant();
}

TEST_CASE(
    "R3: rebase_consumed between the fast take's loads and its CAS: what is left never grows") {
    Fixture g(5);
    CHECK(g.lm.try_take(3) == TryTake::taken);
    const double left_before = g.left();  // 2
    const std::uint64_t admitted = g.entry.admitted.load();
    const std::uint64_t fw = g.body.in_flight.load();
    const std::uint64_t s = g.body.bucket.load();
    // Both steps: the target and F fall by 3; the take's CAS then expects the old F, reloads the
    // lowered one, and finds room under the old target (5 - 0): only the generation check stops
    // it.
    const ConsumedRebase r = rebase_consumed(g.lm);
    CHECK(r.target_lowered == 3);
    CHECK(r.in_flight_lowered == 3);
    CHECK(g.core.try_take_consumed_from(g.entry, fw, s, g.now_ns(), 2 * kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.entry.admitted.load() == admitted);
    CHECK(g.left() <= left_before);
    CHECK(g.lm.in_flight() == 2);  // the raced take's n, spent
    g.lm.invariant();
}

TEST_CASE("R4: a reaper that died mid-recount: the fast take declines, the general take thaws") {
    Fixture g(2);
    // Frozen with nobody holding the recovery lock: a reaper killed between its freeze and its
    // recount. The fast take declines (it never writes a frozen word); the general take waits
    // aside, then proves no reaper is at work and thaws the word (its value unchanged).
    detail::kLimiterOps.freeze(*g.seg.state(), g.rec);
    CHECK(g.core.try_take_consumed(g.entry, g.now_ns(), kUnit) == detail::ConsumedOutcome::general);
    CHECK(g.lm.try_take(1) == TryTake::taken);
    CHECK_FALSE(detail::is_frozen(g.body.in_flight.load()));
    CHECK(g.lm.in_flight() == 1);
}

TEST_CASE("R5: garbage in L or the lease deadline never admits past the deadline") {
    Fixture g(100);
    // L far in the future (a corrupt word): every take is at or past the deadline; nothing taken.
    g.body.time_ns.store(std::numeric_limits<std::int64_t>::max());
    CHECK(g.core.try_take_consumed(g.entry, detail::kClockUnread, kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.lm.try_take(1) == TryTake::unable);
    CHECK(g.lm.in_flight() == 0);
    // L at the bottom, and a deadline already past: the check before the CAS passes (L and no
    // time), the one after it refuses; the n stays in F, not admitted.
    g.body.time_ns.store(std::numeric_limits<std::int64_t>::min());
    g.body.lease_deadline_ns.store(g.now_ns() - 1);
    CHECK(g.core.try_take_consumed(g.entry, detail::kClockUnread, kUnit) ==
          detail::ConsumedOutcome::late);
    CHECK(g.lm.try_take(1) == TryTake::unable);
    // A negative deadline (never stored by set_lease_deadline, which stores at least 1): past.
    g.body.lease_deadline_ns.store(std::numeric_limits<std::int64_t>::min());
    CHECK(g.core.try_take_consumed(g.entry, detail::kClockUnread, kUnit) ==
          detail::ConsumedOutcome::general);
    CHECK(g.lm.try_take(1) == TryTake::unable);
    CHECK(g.lm.in_flight() <= 2);
    CHECK(g.entry.admitted.load() == 0);
}
