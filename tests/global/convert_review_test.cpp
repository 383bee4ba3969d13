// Adversarial review of lim::convert_to_consumed (docs/design.md, "Converting a token bucket into a
// consumed record"). Each case is a finding: a state the conversion leaves, reached by real
// processes, that admits more than the lease grants.
//
// R1: a general take (a TokenBucket's take(), or a Limiter handle's try_take, on the worker's token
// bucket) adds its n to in_flight (F) tentatively, then CASes the bucket word expecting the
// generation it read. Caught between the two (preempted, SIGSTOPped) while the conversion switches
// the record, its bucket CAS fails on the generation and it rolls its n back out of F: the
// configuration it read was not consumed. But by then F may be counted by the feeder ("target <-
// F + a") and spent up to the target: the roll-back lowers F under the target, n tokens
// spendable with no lease. The design's "a roll-back that lands after step 2 clamps F at 0: F
// only ends higher than the truth" holds only while nothing was granted.
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/consumed_rebase.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/records.hpp"
#include "support/consumed_records.hpp"
#include "support/limiter_records.hpp"
#include "support/process.hpp"

using namespace std::chrono_literals;

namespace {

// F - X, in units: each general take on a finite-rate record adds n to F (tentatively) and then n
// to the bucket marker X (no fold: the bucket is never near full, see below). Between the two
// CASes, F - X is n above its resting value.
std::int64_t f_minus_x(lim::detail::LimiterBody& b) {
    const auto f = static_cast<std::int64_t>(b.in_flight.load() & ~lim::detail::kFrozen);
    return f - lim::detail::BucketWord::x(b.bucket.load());
}

// A worker process that takes 1 token at a time by the general take (a Limiter handle on the
// token bucket it opens) until refused, counting what it was admitted.
pid_t general_taker(const lim::Segment& seg, std::atomic<long>* count, lim::test::Flag* ready) {
    return lim::test::fork_child([&seg, count, ready] {
        auto tb = lim::test::worker_bucket(seg, "api", 1e9, 1e-3, 1e9 - 1);
        lim::Limiter& l = tb.limiter();
        ready->set();
        for (;;) {
            if (l.try_take(1) != lim::TryTake::taken) return 0;
            count->fetch_add(1);
        }
    });
}

// Stops `child` (SIGSTOP) at random points until F - X is `want` above `rest`: one token above, it
// is stopped between its take's CAS on F and its CAS on the bucket word; 0 above, it is not
// inside a take's two CASes. Returns whether it was caught; the child stays stopped if so,
// running otherwise.
bool stop_when(pid_t child, lim::detail::LimiterBody& b, std::int64_t rest, std::int64_t want) {
    for (int i = 0; i < 200000; ++i) {
        REQUIRE(kill(child, SIGSTOP) == 0);
        int st = 0;
        REQUIRE(waitpid(child, &st, WUNTRACED) == child);
        REQUIRE(WIFSTOPPED(st));
        const std::int64_t d = f_minus_x(b) - rest;
        REQUIRE((d == 0 || d == lim::kTokenResolution));
        if (d == want) return true;
        REQUIRE(kill(child, SIGCONT) == 0);
        sched_yield();  // let it run a little (not a timing assertion)
    }
    return false;
}

// The worker's bucket "api", created: huge and one token short of full, a rate so low that no take
// folds the drip (X moves by exactly n per take). Returns its body.
lim::detail::LimiterBody& worker_body(const lim::Segment& seg) {
    (void)lim::test::worker_bucket(seg, "api", 1e9, 1e-3, 1e9 - 1);
    return lim::test::body_of(seg, "api");
}

// R1's setup: a segment with worker_body, F - X at rest, and general_taker running on it.
struct Taker {
    explicit Taker(const char* stem)
        : guard(lim::test::unique_name(stem)),
          seg(lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{})),
          b(worker_body(seg)),
          rest(f_minus_x(b)),
          count(lim::test::shared_array<std::atomic<long>>(1)),
          ready(lim::test::make_flag()),
          child(general_taker(seg, count, ready)) {
        ready->wait();
    }

    // Stops the child between its take's two CASes (REQUIRE: caught; killed if not).
    void catch_mid_take() {
        const bool caught = stop_when(child, b, rest, lim::kTokenResolution);
        if (!caught) kill(child, SIGKILL);
        REQUIRE(caught);
    }

    // Lets the (stopped) child run to its end; returns what it was admitted meanwhile.
    long resume_and_count() {
        const long before = count->load();
        REQUIRE(kill(child, SIGCONT) == 0);
        CHECK(lim::test::wait_child(child) == 0);
        return count->load() - before;
    }

    lim::test::SegmentGuard guard;
    lim::Segment seg;
    lim::detail::LimiterBody& b;
    std::int64_t rest;
    std::atomic<long>* count;
    lim::test::Flag* ready;
    pid_t child;
};

// As lim-feeder grants 5 with a live lease (30 s); the host spends them: returns how many it was
// admitted.
int grant_5_and_take_all(lim::Limiter& l) {
    lim::test::grant(l, 5, 30s);
    return lim::test::take_all(l);
}

}  // namespace

TEST_CASE(
    "R1: a general take caught between its two CASes by the conversion, then granted, rolls "
    "its tentative n out of a consumed F: n spendable with no lease") {
    // The worker's bucket (worker_body), its child caught between its take's two CASes.
    Taker t("convrev1");
    t.catch_mid_take();

    // lim-feeder starts: converts, grants 5 with a live lease; the host spends them.
    lim::Limiter l = lim::open_consumed_limiter(t.seg, "api", lim::test::feeder_config(10));
    REQUIRE(lim::convert_to_consumed(l, 10).converted);
    const int admitted = grant_5_and_take_all(l);
    CHECK(admitted == 5);

    // The stopped take resumes: its bucket CAS fails on the switch's generation. Nothing more
    // may be admitted by it or after it: the lease was 5.
    const long child_admitted = t.resume_and_count();
    CHECK(admitted + child_admitted <= 5);
    CHECK(l.try_take(1) == lim::TryTake::unable);
    CHECK(l.in_flight() >= l.token_target_level().value_or(0));
}

namespace {
struct Hunt {
    pid_t child;
    lim::detail::LimiterBody* b;
    std::int64_t rest;
    bool caught = false;
};
}  // namespace

TEST_CASE(
    "R1b: the same take caught after step 2 (F cleared) and before the switch: the feeder "
    "counts its tentative n in F, the roll-back gives it back as spendable") {
    Taker t("convrev1b");
    const pid_t child = t.child;

    lim::Limiter l = lim::open_consumed_limiter(t.seg, "api", lim::test::feeder_config(10));
    Hunt hunt{child, &t.b, t.rest};
    lim::detail::convert_to_consumed_units(
        l, 10,
        [](int step, void* ctx) {
            auto& h = *static_cast<Hunt*>(ctx);
            if (step == 1) {
                // Stop the child outside its take's two CASes, so that F - X rests while step 2
                // changes F alone.
                h.caught = stop_when(h.child, *h.b, h.rest, 0);
                REQUIRE(h.caught);
                h.caught = false;
            }
            if (step == 2) {
                // F was cleared: F - X rests at -X now; catch the child's next take between its
                // CASes (its F CAS lands on the cleared F, under the token bucket's
                // configuration: the switch is step 4).
                REQUIRE(h.b->in_flight.load() == 0);
                h.rest = -lim::detail::BucketWord::x(h.b->bucket.load());
                REQUIRE(kill(h.child, SIGCONT) == 0);
                h.caught = stop_when(h.child, *h.b, h.rest, lim::kTokenResolution);
            }
        },
        &hunt);
    if (!hunt.caught) kill(child, SIGKILL);
    REQUIRE(hunt.caught);
    // The child's tentative n is in F (with its takes since step 2, taken before the switch);
    // the feeder counts them all: target <- F + 5.
    CHECK(l.in_flight() >= 1);
    const int admitted = grant_5_and_take_all(l);
    CHECK(admitted == 5);
    const long child_admitted = t.resume_and_count();
    CHECK(admitted + child_admitted <= 5);
    CHECK(l.try_take(1) == lim::TryTake::unable);
}

TEST_CASE(
    "R1c: a conversion that catches a take in the middle reports it unsettled; it settles when "
    "the take ends, or when its process dies") {
    // What closes what R1's fix leaves open (a take stopped after deciding to roll back, before
    // its roll-back): the conversion waits for every take in progress on the record to end, and
    // the feeder grants nothing until they have. Caught between its two CASes, the child's slot
    // announces its take (its Hold) until it resumes.
    for (const bool kill_it : {false, true}) {
        CAPTURE(kill_it);
        Taker t("convrev1c");
        const pid_t child = t.child;
        t.catch_mid_take();

        lim::Limiter l = lim::open_consumed_limiter(t.seg, "api", lim::test::feeder_config(10));
        const lim::ConsumedConversion c = lim::convert_to_consumed(l, 10);
        CHECK(c.converted);
        CHECK_FALSE(c.settled);  // the stopped take read the token bucket's configuration
        CHECK_FALSE(lim::settle_conversion(l, 20ms));
        if (kill_it) {
            REQUIRE(kill(child, SIGKILL) == 0);
            lim::test::wait_child(child);
            // Its slot still announces the take; its lock is gone, so it is skipped.
            CHECK(lim::settle_conversion(l, 5s));
        } else {
            REQUIRE(kill(child, SIGCONT) == 0);
            CHECK(lim::test::wait_child(child) == 0);
            CHECK(lim::settle_conversion(l, lim::Duration::zero()));
        }
        // Settled: a grant now is exact.
        const int admitted = grant_5_and_take_all(l);
        CHECK(admitted == 5);
        CHECK(l.in_flight() >= l.token_target_level().value_or(0));
    }
}
