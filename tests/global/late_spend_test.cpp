// docs/global.md, "The bound, and its proof", step 2 (the refill of the interval between two
// calls): a host that holds part of the budget unspent while the global bucket is full, and spends
// it late in the interval before its feeder's next call, must not be granted at that call the
// refill of the whole interval: during it, the bucket plus that host's unspent lease was already
// the burst, so a token bucket would have refilled nothing until the spend. (Before the refill was
// capped by the leases that stood during the interval, the next grant carried it all: a host
// holding 10-15 tokens spent them and then 20 more within a few ms, 8-13 tokens over burst + rate x
// T. In the suite it showed as global.host_death's rare 1.86-token excess: there the survivor
// spends each grant as soon as it lands, and a grant applied a few ms late is the same case in
// small.)
//
// End to end: one host (its lim-feeder, one forked worker), a real redis-server. The worker asks
// for the whole burst at once (refused while the host holds less: demand the feeder sees, nothing
// spent) while the lease grows by the refill; once the host holds at least 10 tokens, its feeder
// is stopped (SIGSTOP: a feeder descheduled or slow), the host sits on them for ~250 ms (within
// its lease deadline, which the takers enforce), the worker spends them all at once, the feeder is
// continued and asks at once, and the worker spends whatever comes. Over every window, the tokens
// admitted must stay within burst + rate x T.
#include <doctest/doctest.h>

#if LIM_TEST_HIREDIS
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "global/feeder_harness.hpp"
#include "global/redis_fixture.hpp"
#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "support/admissions.hpp"
#include "support/consumed_records.hpp"
#include "support/process.hpp"

namespace {

using namespace std::chrono_literals;
using namespace lim::test::multihost;
using lim::test::Admission;

// The worker's modes (set by the test): 0 idle, 1 ask for the burst (try_take(burst) every 1 ms),
// 2 spend (try_take(1) with no pause, refused or not), 3 quit. Every admission is logged, its
// count stored after it.
int late_worker(const std::string& segment, const std::atomic<int>* mode, Admission* log,
                std::int64_t* count) {
    std::optional<lim::Segment> seg;
    std::optional<lim::TokenBucket> global = adopt_global_rate(segment, seg);
    if (!global) return 3;
    lim::TokenBucket& tb = *global;
    std::int64_t n = 0;
    for (int m = mode->load(); m != 3 && n < static_cast<std::int64_t>(kPerWorker);
         m = mode->load()) {
        if (m == 0) {
            std::this_thread::sleep_for(1ms);
            continue;
        }
        const double want = m == 1 ? kBurst : 1.0;
        const std::int64_t before = now_ns();
        const bool taken = tb.try_take(want) == lim::TryTake::taken;
        const std::int64_t after = now_ns();
        if (taken) {
            log[n++] = Admission{before, after, static_cast<std::int64_t>(want * 10'000)};
            *count = n;
        }
        if (m == 1) std::this_thread::sleep_for(1ms);
    }
    *count = n;
    return 0;
}

}  // namespace

TEST_CASE("a lease spent late in a refresh does not earn the refill of the time it was held") {
    std::string dir;
    const auto redis = start_redis("latespend", dir);
    if (!redis) return;
    std::vector<std::unique_ptr<lim::test::SegmentGuard>> guards;
    const std::vector<std::unique_ptr<Host>> hosts =
        start_hosts(1, "late", dir, redis->port(), guards, kBurst, kRate);
    Host& host = *hosts[0];

    lim::test::AdmissionLog log(1, kPerWorker);
    auto* count = lim::test::shared_array<std::int64_t>(1);
    auto* mode = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>(0);
    const std::string segment = host.segment;
    Admission* part = log.part(0);
    const pid_t pid = lim::test::fork_child(
        [segment, mode, part, count] { return late_worker(segment, mode, part, count); });

    // The record as the feeder made it, read from here: what the host holds unspent.
    std::optional<lim::Segment> seg;
    REQUIRE(lim::test::eventually(
        [&] {
            try {
                seg.emplace(lim::Segment::open(segment));
                return seg->info().limiters >= 4;
            } catch (const lim::Error&) {
                return false;
            }
        },
        10s));
    lim::Limiter record =
        lim::Limiter::open(*seg, kKey, lim::test::feeder_config(kBurst), lim::adopt_existing);
    const auto held = [&] {
        return record.token_target_level().value_or(0) - record.in_flight(lim::Clock::now());
    };

    // The host asks for the burst; the lease grows by the refill (5 tokens a refresh after the
    // fence). Stop the feeder once the host holds 10 or more (before it holds the 20 the worker
    // would take at once; if it did, ask again).
    double held_at_stop = 0;
    for (int attempt = 0; attempt < 5 && held_at_stop < 8; ++attempt) {
        mode->store(1);
        REQUIRE(lim::test::eventually([&] { return held() >= 10; }, 10s));
        host.feeder.signal(SIGSTOP);
        mode->store(0);
        std::this_thread::sleep_for(5ms);  // a take of the burst in progress lands or not
        held_at_stop = held();
        if (held_at_stop < 8) host.feeder.signal(SIGCONT);
    }
    REQUIRE(held_at_stop >= 8);
    const std::int64_t stopped = now_ns();
    const std::optional<lim::TimePoint> deadline = lim::lease_deadline(record);
    REQUIRE(deadline.has_value());
    // Sit on it for up to 250 ms, spending nothing, well within the lease deadline.
    std::this_thread::sleep_until(std::min(lim::Clock::now() + 250ms, *deadline - 150ms));
    const std::int64_t before_spend = *count;
    mode->store(2);
    const bool drained = lim::test::eventually([&] { return held() < 1; }, 2s);
    const std::int64_t spent_held = *count - before_spend;
    const std::int64_t resumed = now_ns();
    host.feeder.signal(SIGCONT);
    // The feeder asks at once (its refresh is overdue); the worker spends whatever comes.
    std::this_thread::sleep_for(300ms);
    mode->store(3);
    CHECK(lim::test::wait_child(pid) == 0);
    {
        const int status = host.feeder.stop(SIGTERM);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
    redis->kill();

    const std::vector<Admission> all(part, part + *count);
    const lim::test::BucketCheck check =
        lim::test::check_bucket(all, kBurst * 10'000, kRate * 10'000, 10'000, all.size());
    std::int64_t after_resume = 0;
    for (const Admission& a : all)
        after_resume += a.before_ns >= resumed ? a.units : 0;
    const auto ms = [](std::int64_t ns) { return static_cast<double>(ns) / 1e6; };
    MESSAGE("held " << held_at_stop << " tokens when its feeder was stopped; spent " << spent_held
                    << " of them " << ms(resumed - stopped) << " ms later; "
                    << static_cast<double>(after_resume) / 10'000.0
                    << " tokens admitted in the 300 ms after the feeder was continued; worst "
                       "window excess "
                    << check.worst_excess_units / 10'000.0 << " tokens, from "
                    << ms(check.worst_lo_ns - resumed) << " to " << ms(check.worst_hi_ns - resumed)
                    << " ms after (<= 0 conforms, 1 token of rounding allowed)");
    // The scenario happened: the host spent what it held, late, then asked.
    CHECK(drained);
    CHECK(spent_held >= 8);
    // The bound, in every window.
    CHECK(check.worst_excess_units <= 0);
    // And the host was fed again after it (the refill from then on is its own).
    CHECK(after_resume >= 5 * 10'000);
    if (check.worst_excess_units > 0) MESSAGE(lim::test::read_file(host.log));
    std::remove(("/dev/shm/lim-feeder." + host.segment + ".lock").c_str());
    std::remove((dir + "/redis.log").c_str());
}

#endif  // LIM_TEST_HIREDIS
