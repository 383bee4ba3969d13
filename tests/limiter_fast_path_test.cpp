// The Limiter family's fast paths (issue 11): the infinite-rate take and return (a Throttle's
// start_job/finish_job) under forced interleavings — a configuration switch or a reaper's freeze
// between the load of F and S and the CAS — a crash between a fast take and its finish, and the
// lazy clock of the overloads without `now` (an infinite-rate take reads no clock; a consumed
// record's late take is still refused by the post-CAS clock read).
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <thread>

#include "lim/consumed_limiter.hpp"
#include "lim/limiter.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "lim/token_bucket.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::detail::kLimiterOps;
using lim::test::my_holding;
using lim::test::record_of;
using namespace std::chrono_literals;

// Counts the calling thread's CLOCK_MONOTONIC readings while `counting` is set (lim::Clock::now
// calls ::clock_gettime; this definition in the executable interposes it for liblim too).
namespace {
thread_local bool counting = false;
thread_local int clock_reads = 0;
}  // namespace

extern "C" int clock_gettime(clockid_t id, struct timespec* ts) noexcept {
    if (counting && id == CLOCK_MONOTONIC) ++clock_reads;
    return static_cast<int>(syscall(SYS_clock_gettime, id, ts));
}

namespace {

std::uint64_t admitted(const Segment& seg, std::uint32_t record) {
    return detail::holder(*seg.state()).entry(record).admitted.load();
}

detail::LimiterBody& body_of(const Segment& seg, std::uint32_t record) {
    return *reinterpret_cast<detail::LimiterBody*>(seg.state()->record(record).body);
}

// How many times `f` reads the clock on this thread.
template <class F>
int clock_reads_of(F&& f) {
    clock_reads = 0;
    counting = true;
    f();
    counting = false;
    return clock_reads;
}

constexpr std::int64_t kJob = 10'000;  // one job, in units

// A Throttle "jobs" of `max_jobs` in a segment of its own, and what its fast path works on: the
// record, the record's body and a LimiterCore over it.
struct Jobs {
    explicit Jobs(std::int64_t max_jobs)
        : seg(lim::test::limiter_segment(guard)),
          th(Throttle::open(seg, "jobs", {.max_concurrent_jobs = max_jobs})),
          rec(record_of(seg, "jobs")),
          body(body_of(seg, rec)),
          core(*seg.state(), rec) {}

    lim::test::SegmentGuard guard{lim::test::unique_name("lim-fast")};
    Segment seg;
    Throttle th;
    std::uint32_t rec;
    detail::LimiterBody& body;
    detail::LimiterCore core;
};

}  // namespace

TEST_CASE("clock_gettime is interposed: a finite-rate take without now reads the clock") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-fast"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(seg, "tb", {.burst_size = 5, .sustained_rate_per_sec = 1});
    CHECK(clock_reads_of([&] { static_cast<void>(tb.try_take(1)); }) >= 1);
}

TEST_CASE("a switch between the fast take's load and its CAS rolls the take back") {
    Jobs j(2);
    REQUIRE(j.th.try_start_job() == StartJob::start());  // one job running: F = 1 job
    const std::uint64_t admitted_before = admitted(j.seg, j.rec);
    {
        detail::Hold hold(*j.seg.state(), j.rec);
        // The fast path loads F and S ...
        const std::uint64_t fw = j.body.in_flight.load();
        const std::uint64_t s = j.body.bucket.load();
        // ... a Limiter handle lowers the target to one job (a switch: S's generation moves) ...
        j.th.limiter().set_token_target_level(1.0);
        // ... and the CAS, decided under the old target (2 jobs, room for one more), lands: the
        // check of the generation after it must roll it back.
        CHECK(j.core.try_take_infinite_from(hold, fw, s, kJob) == detail::FastOutcome::general);
        CHECK(j.body.in_flight.load() == static_cast<std::uint64_t>(kJob));
        CHECK(hold.held(0) == kJob);  // nothing recorded for the rolled-back take
    }
    CHECK(admitted(j.seg, j.rec) == admitted_before);
    // The general path decides under the new target: no room.
    CHECK(j.th.try_start_job() == StartJob::max_concurrent_jobs_running());
    CHECK(j.th.in_flight() == 1);
    j.th.invariant();
    j.th.finish_job();
    CHECK(j.th.in_flight() == 0);
    CHECK(my_holding(j.seg, j.rec) == 0);
}

TEST_CASE("a switch to a finite rate between the fast take's load and its CAS rolls it back") {
    Jobs j(3);
    {
        detail::Hold hold(*j.seg.state(), j.rec);
        const std::uint64_t fw = j.body.in_flight.load();
        const std::uint64_t s = j.body.bucket.load();
        j.th.limiter().set_hopper_to_bucket_rate_per_sec(0.0);
        CHECK(j.core.try_take_infinite_from(hold, fw, s, kJob) == detail::FastOutcome::general);
        CHECK(j.body.in_flight.load() == 0);
        CHECK(hold.held(0) == 0);
        // With the finite rate the fast path declines at once, changing nothing.
        CHECK(j.core.try_take_infinite(hold, kJob) == detail::FastOutcome::general);
        CHECK(j.body.in_flight.load() == 0);
    }
    // The general take: the bucket started the finite drip full (3), the rate is 0.
    for (int i = 0; i < 3; ++i)
        REQUIRE(j.th.try_start_job().kind() == StartJob::Kind::start);
    CHECK(j.th.try_start_job().kind() != StartJob::Kind::start);
    for (int i = 0; i < 3; ++i)
        j.th.finish_job();
    CHECK(my_holding(j.seg, j.rec) == 0);
    j.th.invariant();
}

TEST_CASE(
    "a reaper's freeze between the fast path's load and its CAS sends it to the general path") {
    Jobs j(2);
    REQUIRE(j.th.try_start_job() == StartJob::start());
    std::optional<detail::FileLock> reaping =
        detail::FileLock::lock_exclusive(j.seg.state()->fd(), detail::LockByte::recovery);
    {
        detail::Hold hold(*j.seg.state(), j.rec);
        const std::uint64_t fw = j.body.in_flight.load();
        const std::uint64_t s = j.body.bucket.load();
        kLimiterOps.freeze(*j.seg.state(), j.rec);
        // Take: the CAS expects the unfrozen word, fails, and finds it frozen.
        CHECK(j.core.try_take_infinite_from(hold, fw, s, kJob) == detail::FastOutcome::general);
        // Return: the same.
        CHECK(j.core.return_infinite_from(hold, fw, s, kJob) == detail::FastOutcome::general);
        // Loaded after the freeze: declined at once.
        CHECK(j.core.try_take_infinite(hold, kJob) == detail::FastOutcome::general);
        CHECK(j.core.return_infinite(hold, kJob) == detail::FastOutcome::general);
        CHECK(j.body.in_flight.load() == (detail::kFrozen | static_cast<std::uint64_t>(kJob)));
        CHECK(hold.held(0) == kJob);
    }
    kLimiterOps.thaw(*j.seg.state(), j.rec);
    reaping.reset();
    CHECK(j.th.in_flight() == 1);
    j.th.finish_job();
    CHECK(j.th.in_flight() == 0);
    CHECK(my_holding(j.seg, j.rec) == 0);
}

TEST_CASE("a switch between the fast return's load and its CAS sends it to the general path") {
    Jobs j(2);
    REQUIRE(j.th.try_start_job() == StartJob::start());
    {
        detail::Hold hold(*j.seg.state(), j.rec);
        const std::uint64_t fw = j.body.in_flight.load();
        const std::uint64_t s = j.body.bucket.load();
        j.th.limiter().set_bucket_size(1.0);
        CHECK(j.core.return_infinite_from(hold, fw, s, kJob) == detail::FastOutcome::general);
        CHECK(j.body.in_flight.load() == static_cast<std::uint64_t>(kJob));
        CHECK(hold.held(0) == kJob);
    }
    j.th.finish_job();  // the general return (or the fast one, on the new generation)
    CHECK(j.th.in_flight() == 0);
    CHECK(my_holding(j.seg, j.rec) == 0);
    j.th.invariant();
}

TEST_CASE("the fast return declines a return this thread's ledger does not cover") {
    Jobs j(2);
    // A job started by another thread of this process: this thread's own entry holds nothing.
    std::thread([&] { REQUIRE(j.th.try_start_job() == StartJob::start()); }).join();
    {
        detail::Hold hold(*j.seg.state(), j.rec);
        CHECK(j.core.return_infinite(hold, kJob) == detail::FastOutcome::general);
        CHECK(j.body.in_flight.load() == static_cast<std::uint64_t>(kJob));
    }
    j.th.finish_job();  // the general return checks the whole process: allowed
    CHECK(j.th.in_flight() == 0);
    // Nothing in flight: over_release, from the general return.
    CHECK_THROWS_AS(j.th.finish_job(), Error);
}

TEST_CASE("a process killed holding jobs it took by the fast path gets them back by a reap") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-fast"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "jobs", {.max_concurrent_jobs = 4});
    const std::uint32_t rec = record_of(seg, "jobs");
    REQUIRE(th.try_start_job() == StartJob::start());
    auto* ready = lim::test::make_flag();
    const pid_t child = lim::test::fork_child([&] {
        for (int i = 0; i < 3; ++i) {
            if (th.try_start_job() != StartJob::start()) return 10 + i;
        }
        if (th.try_start_job() != StartJob::max_concurrent_jobs_running()) return 20;
        ready->set();
        for (;;)
            pause();  // killed holding three jobs
    });
    ready->wait();
    CHECK(th.in_flight() == 4);
    kill(child, SIGKILL);
    lim::test::wait_child(child);
    const ReapReport report = seg.reap();
    CHECK(report.reaped.size() == 1);
    CHECK(th.in_flight() == 1);
    CHECK(my_holding(seg, rec) == kJob);
    for (int i = 0; i < 3; ++i)
        CHECK(th.try_start_job() == StartJob::start());
    for (int i = 0; i < 4; ++i)
        th.finish_job();
    CHECK(th.in_flight() == 0);
    th.invariant();
}

TEST_CASE("the lazy clock: an infinite-rate take and return without now read no clock") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-fast"));
    auto seg = lim::test::limiter_segment(guard);
    auto th = Throttle::open(seg, "jobs", {.max_concurrent_jobs = 1});
    auto lm = Limiter::open(seg, "lm", {.bucket_size = 2, .initial_bucket_level = 2});
    CHECK(clock_reads_of([&] { CHECK(th.try_start_job() == StartJob::start()); }) == 0);
    CHECK(clock_reads_of([&] { th.finish_job(); }) == 0);
    CHECK(clock_reads_of([&] { CHECK(lm.try_take(1) == TryTake::taken); }) == 0);
    CHECK(clock_reads_of([&] { lm.return_to_hopper(1); }) == 0);
    // A refusal on an infinite-rate record needs no time either (nothing drips).
    REQUIRE(th.try_start_job() == StartJob::start());
    CHECK(clock_reads_of([&] {
              CHECK(th.try_start_job() == StartJob::max_concurrent_jobs_running());
          }) <= 2);  // none for the take: only the answer's "until when" reads it
    th.finish_job();
    // A finite rate needs the clock, once.
    auto trl = ThrottledRateLimiter::open(
        seg, "trl", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 2});
    CHECK(clock_reads_of([&] { CHECK(trl.try_start_job() == StartJob::start()); }) == 1);
    CHECK(clock_reads_of([&] { trl.finish_job(); }) == 1);
    CHECK(th.in_flight() == 0);
    CHECK(lm.in_flight() == 0);
}

TEST_CASE("the lazy clock keeps a finite-rate take exact: the drip is read at the clock") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-fast"));
    auto seg = lim::test::limiter_segment(guard);
    // 1 token per 1,000 s: none drips during the test.
    auto lm = Limiter::open(seg, "lm",
                            {.hopper_to_bucket_rate_per_sec = 0.001,
                             .bucket_size = 2,
                             .initial_bucket_level = 2,
                             .initial_hopper_level = lim::infinite});
    CHECK(lm.try_take(1) == TryTake::taken);
    CHECK(lm.try_take(1) == TryTake::taken);
    CHECK(lm.try_take(1) == TryTake::unable);
    CHECK(lm.try_take(3) == TryTake::asked_for_more_than_bucket_size);
    lm.return_to_hopper(2);
    CHECK(lm.in_flight() == 0);
    lm.invariant();
}

TEST_CASE(
    "a consumed infinite-rate take without now past its lease deadline is refused by the "
    "post-CAS clock read") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-fast"));
    auto seg = lim::test::limiter_segment(guard);
    Limiter lm = open_consumed_limiter(
        seg, "global",
        {.bucket_size = 10, .initial_bucket_level = 10, .initial_hopper_level = lim::infinite});
    REQUIRE(is_consumed(lm));
    // A deadline in the future: taken; the take reads the clock once, after its CAS.
    set_lease_deadline(lm, Clock::now() + 1h);
    CHECK(clock_reads_of([&] { CHECK(lm.try_take(1) == TryTake::taken); }) == 1);
    // A deadline that has passed: the pre-CAS check, with no time given, compares only the
    // limiter's time (behind the deadline here); the post-CAS clock read refuses the take,
    // whose token stays consumed (in flight, never admitted).
    const TimePoint deadline = Clock::now() + 2ms;  // after the limiter's time (its creation)
    set_lease_deadline(lm, deadline);
    while (Clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
    CHECK(lm.try_take(1) == TryTake::unable);
    CHECK(lm.in_flight() == 2);
    // With an explicit time past the deadline the pre-CAS check refuses without taking.
    CHECK(lm.try_take(Clock::now(), 1) == TryTake::unable);
    CHECK(lm.in_flight() == 2);
    // No deadline: taken, without reading the clock at all.
    set_lease_deadline(lm, std::nullopt);
    CHECK(clock_reads_of([&] { CHECK(lm.try_take(1) == TryTake::taken); }) == 0);
    CHECK(lm.in_flight() == 3);
}
