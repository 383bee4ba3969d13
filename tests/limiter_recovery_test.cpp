// Crash recovery for limiter records, through kLimiterOps (what the reaper calls): a dead
// process's tokens in flight come back to the hopper exactly as a return at `now` would bring
// them; a dead sleeper's registration is dropped; reset restores the configured state.
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <span>
#include <string>
#include <thread>

#include "lim/limiter.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::at;
using lim::test::t0;
using namespace std::chrono_literals;
using lim::detail::kLimiterOps;

using lim::test::my_holding;
using lim::test::record_of;

TEST_CASE("kLimiterOps describes two layers of tokens: in F, and a token bucket's own takes") {
    CHECK(kLimiterOps.layers == 2);
    CHECK(std::string(kLimiterOps.layer_names[0]) == "tokens");
    CHECK(std::string(kLimiterOps.layer_names[1]) == "tokens");
}

TEST_CASE("a dead process's tokens come back to the hopper as a return at now") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-reap"));
    auto seg = lim::test::limiter_segment(guard);
    auto trl = ThrottledRateLimiter::open(
        seg, "api", {.burst_size = 5, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 5}, t0);
    const std::uint32_t rec = record_of(seg, "api");
    REQUIRE(trl.try_start_job(t0) == StartJob::start());
    CHECK(my_holding(seg, rec) == 10'000);
    auto* child_slot = lim::test::shared_array<std::uint32_t>(1);
    const pid_t child = lim::test::fork_child([&] {
        // The inherited handle registers the child's own slot; the jobs are the child's.
        if (trl.try_start_job(t0).kind() != StartJob::Kind::start) return 10;
        if (trl.try_start_job(t0).kind() != StartJob::Kind::start) return 11;
        *child_slot = detail::holder(*seg.state()).slot_index;
        if (my_holding(seg, rec) != 20'000) return 12;
        return 0;  // exits holding two jobs
    });
    REQUIRE(lim::test::wait_child(child) == 0);
    CHECK(my_holding(seg, rec) == 10'000);  // the child's jobs are not the parent's
    CHECK(trl.in_flight(t0) == 3);
    CHECK(trl.in_bucket(at(10)) == 2);  // the hopper is empty: no drip

    detail::SegmentState& state = *seg.state();
    kLimiterOps.freeze(state, rec);
    detail::LiveHoldings live;
    live.held[0] = my_holding(seg, rec);
    const std::uint32_t dead[] = {*child_slot};
    const detail::LiveHoldings given =
        kLimiterOps.recount(state, rec, live, std::span<const std::uint32_t>(dead), at(10));
    CHECK(given.held[0] == 20'000);
    CHECK(trl.in_flight(at(10)) == 1);
    CHECK(trl.in_bucket(at(10)) == 2);
    CHECK(trl.in_hopper(at(10)).value() == 2);  // back in the hopper, dripping from now
    CHECK(trl.in_bucket(at(11)) == 3);
    CHECK(trl.in_bucket(at(12)) == 4);
    CHECK(trl.in_system(at(12)).value() == 5);
    trl.invariant();
    trl.finish_job(at(12));
    CHECK(trl.in_flight(at(12)) == 0);
    CHECK(my_holding(seg, rec) == 0);
}

TEST_CASE("a frozen limiter holds takes until it is thawed") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-frozen"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 2});
    const std::uint32_t rec = record_of(seg, "db");
    // As a reaper does: hold the recovery lock while the record is frozen (a holder that finds
    // a word frozen with the lock free thaws it, taking the reaper for dead).
    std::optional<lim::detail::FileLock> reaping =
        lim::detail::FileLock::lock_exclusive(seg.state()->fd(), lim::detail::LockByte::recovery);
    kLimiterOps.freeze(*seg.state(), rec);
    const auto frozen_at = std::chrono::steady_clock::now();
    std::atomic<bool> done{false};
    std::thread t([&] {
        CHECK(th.try_start_job() == StartJob::start());
        done = true;
    });
    std::this_thread::sleep_for(20ms);
    // Read while the freeze is younger than kFrozenBreakTimeout (measured after the reads): past
    // it the taker thaws the word itself (the reaper is presumed stopped) and takes, which only
    // a badly loaded machine that descheduled this thread that long lets happen.
    const bool done_frozen = done.load();
    const auto in_flight_frozen = th.in_flight();
    if (std::chrono::steady_clock::now() - frozen_at < detail::kFrozenBreakTimeout) {
        CHECK_FALSE(done_frozen);  // no acquisition lands on a frozen word
        CHECK(in_flight_frozen == 0);
    } else {
        MESSAGE("this thread stalled past the break timeout: the frozen-window checks skipped");
    }
    kLimiterOps.thaw(*seg.state(), rec);
    reaping.reset();
    t.join();
    CHECK(done.load());
    CHECK(th.in_flight() == 1);
    th.finish_job();
}

TEST_CASE("recount drops a dead sleeper's registration") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-sleeper"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "db", {.max_concurrent_jobs = 1});
    const std::uint32_t rec = record_of(seg, "db");
    th.start_job();
    auto* child_slot = lim::test::shared_array<std::uint32_t>(1);
    const pid_t child = lim::test::fork_child([&] {
        *child_slot = detail::holder(*seg.state()).slot_index;
        th.start_job();  // sleeps until killed
        return 0;
    });
    while (th.waiters() == 0)
        std::this_thread::sleep_for(1ms);
    ::kill(child, SIGKILL);
    CHECK(lim::test::wait_child(child) == 128 + SIGKILL);
    CHECK(th.waiters() == 1);  // the dead sleeper is still counted
    kLimiterOps.freeze(*seg.state(), rec);
    detail::LiveHoldings live;
    live.held[0] = my_holding(seg, rec);
    const std::uint32_t dead[] = {*child_slot};
    const detail::LiveHoldings given =
        kLimiterOps.recount(*seg.state(), rec, live, std::span<const std::uint32_t>(dead), t0);
    CHECK(given.held[0] == 0);
    CHECK(th.waiters() == 0);
    CHECK(th.in_flight() == 1);
    th.finish_job();
}

TEST_CASE("reset restores the configured state, discarding reconfigurations") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-reset"));
    auto seg = lim::test::limiter_segment(guard);
    auto l = Limiter::open(seg, "raw",
                           {.hopper_to_bucket_rate_per_sec = 2.0,
                            .bucket_size = 10,
                            .initial_bucket_level = 3,
                            .initial_hopper_level = 4.0},
                           t0);
    const std::uint32_t rec = record_of(seg, "raw");
    REQUIRE(l.try_take(t0, 3) == TryTake::taken);
    l.set_bucket_size(at(1), 2);
    l.set_token_target_level(at(1), 1.0);
    l.set_hopper_to_bucket_rate_per_sec(at(1), infinite);
    kLimiterOps.freeze(*seg.state(), rec);
    kLimiterOps.reset(*seg.state(), rec, at(20));
    CHECK(l.bucket_size() == 10);
    CHECK(l.hopper_to_bucket_rate_per_sec().value() == 2.0);
    CHECK(l.token_target_level().value() == 7);
    CHECK(l.in_flight(at(20)) == 0);
    CHECK(l.in_bucket(at(20)) == 3);
    CHECK(l.in_hopper(at(20)).value() == 4);
    CHECK(l.in_bucket(at(21)) == 5);  // the drip counts from the reset
    l.invariant();
    CHECK(l.try_take(at(21), 5) == TryTake::taken);  // thawed
}
