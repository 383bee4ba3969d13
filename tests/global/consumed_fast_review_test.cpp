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
#include "support/limiter_records.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

std::uint32_t occupied(const Segment& seg) {
    std::uint32_t n = 0;
    const auto& s = *seg.state();
    for (std::uint32_t i = 0; i < s.geometry().max_processes; ++i)
        n += detail::slot_is_occupied(s.slot(i).owner.load());
    return n;
}

// lim-feeder's record (infinite drip, finite target), with `grant` tokens granted and a lease
// deadline an hour away.
Limiter global_record(const Segment& seg, double grant) {
    Limiter lm = open_consumed_limiter(seg, "global",
                                       {.hopper_to_bucket_rate_per_sec = lim::infinite,
                                        .bucket_size = 10,
                                        .initial_bucket_level = 0,
                                        .initial_hopper_level = 0.0});
    lm.set_token_target_level(grant);
    set_lease_deadline(lm, Clock::now() + 1h);
    return lm;
}

}  // namespace

// A take from a thread_local destructor that runs after the thread's slot registry was destroyed
// gets an ephemeral slot (process_table.hpp, Holder::ephemeral), claimed for that one operation:
// a Hold gives it back when it ends. The consumed fast take has no Hold, so it must give the slot
// back itself; otherwise every such take keeps one slot of the process table occupied for the
// life of the mapping, until the table is full (table_full for every new thread of every process).
TEST_CASE("R1: a consumed take from a thread_local destructor gives its ephemeral slot back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-cfrev-tls"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    Limiter lm = global_record(seg, 100);
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
