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
#include "support/mid_take.hpp"
#include "support/process.hpp"

using namespace std::chrono_literals;
using lim::test::f_minus_x;
using lim::test::stop_when;
using lim::test::Taker;

namespace {

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
