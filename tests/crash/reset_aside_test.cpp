// A release that steps aside across a forced reset (docs/design.md, "Reset", "a release waiting
// aside across a reset"): a live process releases units it holds, finds the record's word frozen
// and waits aside (its announcement withdrawn, so the reset's quiescence does not wait for it),
// and a forced reset then forgets those units and re-initialises the word. When the word thaws,
// the release must not go on with the check it made before the reset: the units are no longer
// its to give back, and giving them back would take units of whoever acquired after the reset
// (over the limit). Each case stages the interleaving with real processes: the word frozen by
// hand (as a reaper freezes it), the releaser stopped with SIGSTOP while aside, the reset run,
// this process filling the limit, the releaser continued.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <thread>

#include "lim/lim.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;
using lim::test::Flag;
using lim::test::make_flag;

namespace {

Segment make_segment(const lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 8,
                                                  .max_processes = 32,
                                                  .reap_after = 0s,  // no reaps but ours
                                                  .reap_on_attach = false});
}

// Whether the slot of process `pid` in this segment has an operation announced.
bool announced(const Segment& seg, pid_t pid) {
    const detail::SegmentState& state = *seg.state();
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const detail::SlotHeader& slot = state.slot(i);
        const std::uint64_t owner = slot.owner.load();
        if (detail::SlotOwner::state(owner) == detail::SlotState::free ||
            detail::SlotOwner::pid(owner) != static_cast<std::uint32_t>(pid))
            continue;
        if (slot.pending.load() != 0) return true;
    }
    return false;
}

// Exit codes of the releasing child.
constexpr int kReleased = 10;  // its release went through
constexpr int kRefused = 11;   // refused with over_release (or nothing given back: a Permit)

// A child takes something with `take`, holds it until `go`, then gives it back with `give`
// (returning kReleased or kRefused). This process freezes `record` as a reaper would, lets the
// child start its release (which waits aside on the frozen word), stops the child there,
// force-resets the record (the child's units forgotten), takes everything with `fill`, and
// continues the child. What this process holds must still be counted in full (`in_use` equal to
// `filled`) and nothing more be admitted: the child's release, made before the reset, gave back
// nothing of the post-reset holders.
template <class Take, class Give, class Fill, class InUse, class More>
void release_aside_across_reset(Segment& seg, detail::RecordKind kind, const char* key, Take take,
                                Give give, Fill fill, InUse in_use, More more) {
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, kind, key);
    const detail::KindOps* ops = detail::kind_ops(kind);
    REQUIRE(ops != nullptr);
    Flag* ready = make_flag();
    Flag* go = make_flag();
    Flag* releasing = make_flag();
    const pid_t child = lim::test::fork_child([&] {
        auto held = take();
        ready->set();
        go->wait();
        releasing->set();
        return give(held);
    });
    ready->wait();
    ops->freeze(state, record);
    go->set();
    releasing->wait();
    // The release cannot finish on a frozen word: after a moment the child waits aside (its
    // announcement withdrawn) or has not yet announced; stop it where it is. Stopped while
    // announced (between its announcement and its first look at the word), it is continued and
    // stopped again a moment later.
    bool stopped_aside = false;
    for (int i = 0; i < 50 && !stopped_aside; ++i) {
        std::this_thread::sleep_for(20ms);
        ::kill(child, SIGSTOP);
        REQUIRE(lim::test::eventually([&] {
            int st = 0;
            return ::waitpid(child, &st, WUNTRACED | WNOHANG) == child && WIFSTOPPED(st);
        }));
        stopped_aside = !announced(seg, child);
        if (!stopped_aside) ::kill(child, SIGCONT);
    }
    REQUIRE(stopped_aside);
    seg.reset({.key = key, .force = true});  // thaws the word it reset
    CHECK(in_use() == 0);
    const std::uint64_t filled = fill();
    ::kill(child, SIGCONT);
    const int status = lim::test::wait_child(child);
    CHECK(status == kRefused);
    CHECK(in_use() == filled);  // nothing of this process's given back
    CHECK_FALSE(more());        // and nothing more admitted
}

// Runs `release` and maps its outcome to the child's exit code.
template <class F>
int refused_or_released(F release) {
    try {
        release();
        return kReleased;
    } catch (const Error& e) {
        return e.code() == Errc::over_release ? kRefused : 12;
    }
}

}  // namespace

TEST_CASE("a release waiting aside across a forced reset gives back nobody else's units") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ra"));
    auto seg = make_segment(guard);

    SUBCASE("Semaphore::release") {
        auto sem = Semaphore::open(seg, "db", {.capacity = 1});
        release_aside_across_reset(
            seg, detail::RecordKind::semaphore, "db",
            [&] {
                sem.acquire(1);
                return 1;
            },
            [&](int n) { return refused_or_released([&] { sem.release(n); }); },
            [&] {
                REQUIRE(sem.try_acquire(1));
                return std::uint64_t{1};
            },
            [&] { return sem.in_use(); }, [&] { return sem.try_acquire(1); });
    }
    SUBCASE("Semaphore::release of units another thread of the process acquired") {
        // The release passes on the process-wide sum, not the thread's own entry.
        auto sem = Semaphore::open(seg, "db", {.capacity = 1});
        release_aside_across_reset(
            seg, detail::RecordKind::semaphore, "db",
            [&] {
                std::thread([&] { sem.acquire(1); }).join();
                return 1;
            },
            [&](int n) { return refused_or_released([&] { sem.release(n); }); },
            [&] {
                REQUIRE(sem.try_acquire(1));
                return std::uint64_t{1};
            },
            [&] { return sem.in_use(); }, [&] { return sem.try_acquire(1); });
    }
    SUBCASE("WeightedSemaphore::release") {
        auto ws = WeightedSemaphore::open(seg, "mem", {.capacity = 100});
        release_aside_across_reset(
            seg, detail::RecordKind::weighted_semaphore, "mem",
            [&] {
                ws.acquire(60);
                return 60;
            },
            [&](int n) { return refused_or_released([&] { ws.release(n); }); },
            [&] {
                REQUIRE(ws.try_acquire(100));
                return std::uint64_t{100};
            },
            [&] { return ws.in_use(); }, [&] { return ws.try_acquire(1); });
    }
    SUBCASE("Dispatch Permit") {
        auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                      .key = "api",
                                      .concurrency = 2,
                                      .byte_budget = 1000});
        std::optional<Permit> mine[2];
        release_aside_across_reset(
            seg, detail::RecordKind::dispatch, "api",
            [&] {
                auto p = d.try_acquire(600);
                REQUIRE(p);
                return std::move(*p);
            },
            [&](Permit& p) {
                // A Permit's release is noexcept: a refused one gives back nothing.
                p.release();
                return kRefused;
            },
            [&] {
                mine[0] = d.try_acquire(500);
                mine[1] = d.try_acquire(500);
                REQUIRE(mine[0]);
                REQUIRE(mine[1]);
                return std::uint64_t{1000};
            },
            [&] { return d.snapshot().bytes_in_flight; },
            [&] {
                auto p = d.try_acquire(1);
                return p.has_value();
            });
        CHECK(d.snapshot().in_flight == 2);
    }
    SUBCASE("Limiter::return_to_hopper") {
        auto l = Limiter::open(seg, "lim",
                               LimiterConfig{.hopper_to_bucket_rate_per_sec = 1.0,
                                             .bucket_size = 10,
                                             .initial_bucket_level = 10,
                                             .initial_hopper_level = 0.0});
        release_aside_across_reset(
            seg, detail::RecordKind::limiter, "lim",
            [&] {
                REQUIRE(l.try_take(6) == TryTake::taken);
                return 6;
            },
            [&](int n) { return refused_or_released([&] { l.return_to_hopper(n); }); },
            [&] {
                REQUIRE(l.try_take(10) == TryTake::taken);
                return std::uint64_t{10};
            },
            [&] { return static_cast<std::uint64_t>(l.in_flight()); },
            [&] { return l.try_take(1) == TryTake::taken; });
    }
    SUBCASE("Limiter::return_to_hopper of tokens another thread of the process took") {
        auto l = Limiter::open(seg, "lim",
                               LimiterConfig{.hopper_to_bucket_rate_per_sec = 1.0,
                                             .bucket_size = 10,
                                             .initial_bucket_level = 10,
                                             .initial_hopper_level = 0.0});
        release_aside_across_reset(
            seg, detail::RecordKind::limiter, "lim",
            [&] {
                std::thread([&] { REQUIRE(l.try_take(6) == TryTake::taken); }).join();
                return 6;
            },
            [&](int n) { return refused_or_released([&] { l.return_to_hopper(n); }); },
            [&] {
                REQUIRE(l.try_take(10) == TryTake::taken);
                return std::uint64_t{10};
            },
            [&] { return static_cast<std::uint64_t>(l.in_flight()); },
            [&] { return l.try_take(1) == TryTake::taken; });
    }
    SUBCASE("Throttle::finish_job") {
        auto t = Throttle::open(seg, "jobs", {.max_concurrent_jobs = 2});
        release_aside_across_reset(
            seg, detail::RecordKind::limiter, "jobs",
            [&] {
                REQUIRE(t.try_start_job() == StartJob::start());
                return 1;
            },
            [&](int) { return refused_or_released([&] { t.finish_job(); }); },
            [&] {
                REQUIRE(t.try_start_job() == StartJob::start());
                REQUIRE(t.try_start_job() == StartJob::start());
                return std::uint64_t{2};
            },
            [&] { return static_cast<std::uint64_t>(t.in_flight()); },
            [&] { return t.try_start_job() == StartJob::start(); });
    }
}

// A Dispatch acquire that holds its concurrency slot while it waits for bytes keeps waiting across
// a forced reset (which forgets the slot and wakes it) and then takes the bytes: its Permit holds a
// slot no ledger shows any more and bytes the new word counts. Its release gives back what the
// process still holds, layer by layer. Before: the release was refused as a whole (the slot not
// held), and the bytes stayed counted for as long as the process lived.
TEST_CASE(
    "a Dispatch permit whose slot a forced reset forgot while it waited for bytes gives its "
    "bytes back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ra-bytes"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 2,
                                  .byte_budget = 1000});
    Flag* acquired = make_flag();
    Flag* release_go = make_flag();
    auto holder = d.try_acquire(1000);  // every byte: the child waits for bytes, holding a slot
    REQUIRE(holder);
    const pid_t child = lim::test::fork_child([&] {
        Permit p = d.acquire(600);
        acquired->set();
        release_go->wait();
        p.release();
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return d.snapshot().bytes_waiters == 1; }));
    CHECK(d.snapshot().in_flight == 2);  // the child's slot is taken
    seg.reset({.key = "api", .force = true});
    acquired->wait();
    {
        const DispatchSnapshot s = d.snapshot();
        CHECK(s.in_flight == 0);  // the child's slot was forgotten
        CHECK(s.bytes_in_flight == 600);
    }
    release_go->set();
    CHECK(lim::test::wait_child(child) == 0);
    const DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 0);
    CHECK(s.bytes_in_flight == 0);   // its bytes given back
    auto all = d.try_acquire(1000);  // every byte again
    CHECK(all.has_value());
    // (`holder`, forgotten by this process's own reset, is not released here: per-process
    // ledgers cannot tell its units from `all`'s, docs/design.md "Reset".)
    all.reset();
    CHECK(d.snapshot().bytes_in_flight == 0);
    holder.reset();  // nothing of this process's is left to give back: releases nothing
    CHECK(d.snapshot().bytes_in_flight == 0);
    CHECK(d.snapshot().in_flight == 0);
}
