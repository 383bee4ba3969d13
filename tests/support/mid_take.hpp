// A worker stopped in the middle of a take, for the tests of lim::convert_to_consumed: a forked
// process takes 1 token at a time by the general take on a token bucket a worker made, and the
// test stops it (SIGSTOP) exactly between its take's CAS on in_flight and its CAS on the bucket
// word, where a conversion's switch makes it decide whether to roll its tentative token back.
#pragma once

#include <sched.h>
#include <signal.h>
#include <sys/wait.h>

#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>

#include "lim/lim.hpp"
#include "limiter/limiter_state.hpp"
#include "support/consumed_records.hpp"
#include "support/limiter_records.hpp"
#include "support/process.hpp"

namespace lim::test {

// F - X, in units: each general take on a finite-rate record adds n to F (tentatively) and then n
// to the bucket marker X (no fold: the bucket is never near full, see below). Between the two
// CASes, F - X is n above its resting value.
inline std::int64_t f_minus_x(detail::LimiterBody& b) {
    const auto f = static_cast<std::int64_t>(b.in_flight.load() & ~detail::kFrozen);
    return f - detail::BucketWord::x(b.bucket.load());
}

// A worker process that takes 1 token at a time by the general take (a Limiter handle on the
// token bucket it opens) until refused, counting what it was admitted.
inline pid_t general_taker(const lim::Segment& seg, std::atomic<long>* count, Flag* ready) {
    return fork_child([&seg, count, ready] {
        auto tb = worker_bucket(seg, "api", 1e9, 1e-3, 1e9 - 1);
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
inline bool stop_when(pid_t child, detail::LimiterBody& b, std::int64_t rest, std::int64_t want) {
    for (int i = 0; i < 200000; ++i) {
        REQUIRE(kill(child, SIGSTOP) == 0);
        int st = 0;
        REQUIRE(waitpid(child, &st, WUNTRACED) == child);
        REQUIRE(WIFSTOPPED(st));
        const std::int64_t d = f_minus_x(b) - rest;
        REQUIRE((d == 0 || d == kTokenResolution));
        if (d == want) return true;
        REQUIRE(kill(child, SIGCONT) == 0);
        sched_yield();  // let it run a little (not a timing assertion)
    }
    return false;
}

// The worker's bucket "api", created: huge and one token short of full, a rate so low that no take
// folds the drip (X moves by exactly n per take). Returns its body.
inline detail::LimiterBody& worker_body(const lim::Segment& seg) {
    (void)worker_bucket(seg, "api", 1e9, 1e-3, 1e9 - 1);
    return body_of(seg, "api");
}

// R1's setup: a segment with worker_body, F - X at rest, and general_taker running on it.
struct Taker {
    explicit Taker(const char* stem)
        : guard(unique_name(stem)),
          seg(lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{})),
          b(worker_body(seg)),
          rest(f_minus_x(b)),
          count(shared_array<std::atomic<long>>(1)),
          ready(make_flag()),
          child(general_taker(seg, count, ready)) {
        ready->wait();
    }

    // Stops the child between its take's two CASes (REQUIRE: caught; killed if not).
    void catch_mid_take() {
        const bool caught = stop_when(child, b, rest, kTokenResolution);
        if (!caught) kill(child, SIGKILL);
        REQUIRE(caught);
    }

    // Lets the (stopped) child run to its end; returns what it was admitted meanwhile.
    long resume_and_count() {
        const long before = count->load();
        REQUIRE(kill(child, SIGCONT) == 0);
        CHECK(wait_child(child) == 0);
        return count->load() - before;
    }

    SegmentGuard guard;
    lim::Segment seg;
    detail::LimiterBody& b;
    std::int64_t rest;
    std::atomic<long>* count;
    Flag* ready;
    pid_t child;
};

}  // namespace lim::test
