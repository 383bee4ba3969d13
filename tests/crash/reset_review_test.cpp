// Adversarial review of Segment::reset (docs/design.md, "Reset"): each case forces one interleaving
// of a reset with a live neighbour, using real processes, and checks the promise after it: never
// over the limit (what the post-reset holders hold never exceeds the capacity), nothing a
// neighbour does crashes or hangs the caller, and a refused reset changes nothing.
//
//   1. a live holder stopped between its CAS and its ledger store while a forced reset runs
//      (the reset used to give up waiting after its budget and reset anyway: the holder's late
//      ledger store then recorded units the word no longer counted, and their release took units
//      of later holders: over the limit);
//   2. a forced reset forgetting a live process's units, then that process releasing them
//      through a guard (a Semaphore/WeightedSemaphore guard's destructor used to throw
//      over_release, i.e. std::terminate), a Permit, or return_to_hopper: nothing of the
//      post-reset holders is given back;
//   3. a resetter SIGKILLed in its frozen wait, and (3b) at random moments of a real reset, its
//      ledger clearing included (killed after clearing and before its word store, it used to
//      leave units counted that no ledger showed and no reap would ever recount);
//   4. blocked waiters (a Semaphore sleeper, a WeightedSemaphore queued ticket) across a forced
//      reset: each returns admitted, and the counts are exact;
//   5. an unforced reset racing a process that attaches and acquires after its check for other
//      live processes (it used to forget the newcomer's units: over the limit);
//   6. a reset stopped between its clearing and its store, its freeze broken, its retry refused
//      (the cleared ledgers used to stay cleared under the old word: units withheld);
//   7. a reset run by a thread past its slot registry's destruction, killed between its clearing
//      and its store (it used to go unannounced: units withheld).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <thread>

#include "lim/lim.hpp"
#include "primitives/semaphore_state.hpp"
#include "primitives/weighted_semaphore_state.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/crash_segment.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;
using lim::test::child_holding;
using lim::test::Flag;
using lim::test::kill_and_wait;
using lim::test::ledger_sum;
using lim::test::make_flag;

namespace {

std::atomic<std::uint64_t>& semaphore_word(const Segment& seg, std::uint32_t record) {
    return reinterpret_cast<detail::SemaphoreBody*>(seg.state()->record(record).body)->word;
}

// Takes units one at a time until refused: how many this process could get.
std::uint64_t take_all(Semaphore& sem) {
    std::uint64_t n = 0;
    while (sem.try_acquire(1))
        ++n;
    return n;
}

}  // namespace

// 1. A live holder between its CAS and its ledger store (a QuickHold acquire staged step by step,
// as crash.reap's "a reap never recounts under a live thread ..." does) for longer than a forced
// reset's quiescence budget. Before: the reset gave up waiting and reset anyway; the holder's
// ledger store then recorded 2 units the reset word did not count, its release of them took 2 of
// the parent's, and the parent was admitted 5 units of 3. Now the reset refuses the record (busy,
// nothing changed), as a reap defers it.
TEST_CASE("a forced reset never resets under a live holder between its CAS and its ledger store") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-midop"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    const auto record = *detail::find_record(*seg.state(), detail::RecordKind::semaphore, "db");
    auto& word = semaphore_word(seg, record);
    Flag* swapped = make_flag();
    Flag* record_go = make_flag();
    Flag* recorded = make_flag();
    Flag* release_go = make_flag();
    auto* release_threw = lim::test::shared_array<std::atomic<int>>(1);
    new (release_threw) std::atomic<int>{-1};
    const pid_t child = lim::test::fork_child([&] {
        sem.acquire(1);  // the thread's slot in its cache
        sem.release(1);
        detail::QuickHold hold;
        if (!hold.open(*seg.state(), record)) return 20;
        std::uint64_t w = word.load();
        while (!word.compare_exchange_weak(w, w + 2)) {
        }
        swapped->set();
        record_go->wait();  // "stopped" between the CAS and the ledger store
        hold.add(0, 2);
        hold.close();
        recorded->set();
        release_go->wait();
        try {
            sem.release(2);
            release_threw->store(0);
        } catch (const Error& e) {
            release_threw->store(e.code() == Errc::over_release ? 1 : 2);
        }
        return 0;
    });
    swapped->wait();
    bool refused = false;
    try {
        seg.reset({.key = "db", .force = true});
    } catch (const Error& e) {
        CHECK(e.code() == Errc::busy);
        refused = true;
    }
    CHECK(refused);
    CHECK_FALSE(detail::is_frozen(word.load()));
    record_go->set();
    recorded->wait();
    // What the parent can now take, the child's release, and what the parent can take after it:
    // never more than the capacity in all (the child's 2 are either counted or forgotten; they can
    // never make room for the parent beyond 3).
    std::uint64_t parent = take_all(sem);
    release_go->set();
    CHECK(lim::test::wait_child(child) == 0);
    parent += take_all(sem);
    CHECK(parent <= 3);
    CHECK(sem.in_use() == parent);
    if (refused) {
        CHECK(release_threw->load() == 0);  // its 2 were counted, and given back
        CHECK(parent == 3);
    }
    sem.release(parent);
    CHECK(sem.in_use() == 0);
}

// 1b. Once the holder has recorded, the forced reset that was refused succeeds and forgets it.
TEST_CASE("a forced reset refused under a stopped holder succeeds once it is continued") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-cont"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    auto other = Semaphore::open(seg, "other", {.capacity = 3});
    const auto record = *detail::find_record(*seg.state(), detail::RecordKind::semaphore, "db");
    other.acquire(2);
    // Stopped mid-operation on "db" (announced, as crash.reap's deferral tests stage it).
    const pid_t stopped = child_holding([&] { static detail::Hold hold(*seg.state(), record); });
    ::kill(stopped, SIGSTOP);
    sem.acquire(1);
    bool refused = false;
    try {
        seg.reset({.force = true});  // every record: "other" is reset, "db" refused
    } catch (const Error& e) {
        CHECK(e.code() == Errc::busy);
        CHECK(std::string(e.what()).find("'db'") != std::string::npos);
        refused = true;
    }
    CHECK(refused);
    CHECK(other.in_use() == 0);
    CHECK(sem.in_use() == 1);  // unchanged
    ::kill(stopped, SIGCONT);
    kill_and_wait(stopped);
    seg.reset({.key = "db", .force = true});
    CHECK(sem.in_use() == 0);
}

namespace {

// A child takes something with `take` and holds it until `go`, then gives it back with `give`
// (which must neither crash nor hang the child: exit 0). Meanwhile this process force-resets the
// segment and then takes everything with `fill`: after the child's give, what this process holds
// must still be counted in full (`in_use` equal to `filled`) and nothing more be admitted.
template <class Take, class Give, class Fill, class InUse, class More>
void forced_reset_then_give(Segment& seg, Take take, Give give, Fill fill, InUse in_use,
                            More more) {
    Flag* ready = make_flag();
    Flag* go = make_flag();
    const pid_t child = lim::test::fork_child([&] {
        {
            auto held = take();
            ready->set();
            go->wait();
            give(held);
        }
        return 0;
    });
    ready->wait();
    seg.reset({.force = true});
    CHECK(in_use() == 0);
    const std::uint64_t filled = fill();
    go->set();
    CHECK(lim::test::wait_child(child) == 0);  // no crash (a guard's destructor threw before)
    CHECK(in_use() == filled);                 // nothing of this process's given back
    CHECK_FALSE(more());                       // and nothing more admitted
}

}  // namespace

// 2. What a forced reset forgot, given back by the live process that held it.
TEST_CASE("a live holder's release of units a forced reset forgot gives back nobody else's") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-forgot"));
    auto seg = lim::test::own_reaps_segment(guard);

    SUBCASE("SemaphoreGuard") {
        auto sem = Semaphore::open(seg, "db", {.capacity = 3});
        forced_reset_then_give(
            seg, [&] { return std::make_unique<SemaphoreGuard>(sem, 2); },
            [](auto& g) { g.reset(); },
            [&] {
                REQUIRE(sem.try_acquire(3));
                return std::uint64_t{3};
            },
            [&] { return sem.in_use(); }, [&] { return sem.try_acquire(1); });
        // Semaphore::release itself reports the forgotten units.
        const pid_t c = lim::test::fork_child([&] {
            sem.release(3);  // the parent's: another process may not release them
            return 0;
        });
        CHECK(lim::test::wait_child(c) == 3);
        CHECK(sem.in_use() == 3);
    }
    SUBCASE("WeightedSemaphoreGuard") {
        auto ws = WeightedSemaphore::open(seg, "mem", {.capacity = 100});
        forced_reset_then_give(
            seg, [&] { return std::make_unique<WeightedSemaphoreGuard>(ws, 60); },
            [](auto& g) { g.reset(); },
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
        forced_reset_then_give(
            seg,
            [&] {
                auto p = d.try_acquire(600);
                REQUIRE(p);
                return std::move(*p);
            },
            [](Permit& p) { p.release(); },
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
    SUBCASE("Limiter return_to_hopper") {
        // 10 tokens in the system, all in the bucket; no drip (the hopper holds none).
        auto l = Limiter::open(seg, "lim",
                               LimiterConfig{.hopper_to_bucket_rate_per_sec = 1.0,
                                             .bucket_size = 10,
                                             .initial_bucket_level = 10,
                                             .initial_hopper_level = 0.0});
        forced_reset_then_give(
            seg,
            [&] {
                REQUIRE(l.try_take(6) == TryTake::taken);
                return 6;
            },
            [&](int n) {
                try {
                    l.return_to_hopper(n);
                    std::_Exit(10);  // returned tokens it no longer holds
                } catch (const Error& e) {
                    if (e.code() != Errc::over_release) std::_Exit(11);
                }
            },
            [&] {
                REQUIRE(l.try_take(10) == TryTake::taken);
                return std::uint64_t{10};
            },
            [&] { return static_cast<std::uint64_t>(l.in_flight()); },
            [&] { return l.try_take(1) == TryTake::taken; });
    }
}

// 3. A resetter killed in its frozen wait (nothing cleared yet): holders thaw the word (the locks
// dropped) and go on, nothing changed. (Killed at random moments, the clearing included: 3b.)
TEST_CASE("a resetter killed in its frozen wait leaves the record as it was") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-killed"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::semaphore, "db");
    auto& word = semaphore_word(seg, record);
    sem.acquire(2);

    // A live slot in the middle of an operation keeps the real reset's frozen wait going.
    Flag* in_op = make_flag();
    Flag* leave = make_flag();
    const pid_t mid_op = lim::test::fork_child([&] {
        {
            detail::Hold hold(state, record);
            in_op->set();
            leave->wait();
        }
        for (;;)
            ::pause();
        return 0;
    });
    in_op->wait();
    const pid_t resetter = lim::test::fork_child([&] {
        seg.reset({.key = "db", .force = true});
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return detail::is_frozen(word.load()); }));
    kill_and_wait(resetter);
    leave->set();
    // The next holder thaws the word (the recovery lock is free) and finds it unchanged.
    CHECK(sem.try_acquire(1));
    CHECK_FALSE(sem.try_acquire(1));
    CHECK_FALSE(detail::is_frozen(word.load()));
    sem.release(3);  // this process's ledger was not zeroed: all three are its own
    CHECK(sem.in_use() == 0);
    kill_and_wait(mid_op);
}

// 4. Waiters blocked across a forced reset: a Semaphore sleeper (its sleeper count kept by the
// reset) and a WeightedSemaphore queued ticket (the queue dropped: it queues again). Each returns
// admitted, and the counts are exact: the waiter's units only.
TEST_CASE("waiters blocked across a forced reset are admitted and counted exactly") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-waiters"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    auto ws = WeightedSemaphore::open(seg, "mem", {.capacity = 100});
    sem.acquire(3);
    CHECK(ws.try_acquire(100));
    Flag* admitted_sem = make_flag();
    Flag* admitted_ws = make_flag();
    const pid_t waiter = lim::test::fork_child([&] {
        std::thread t([&] {
            sem.acquire(2);
            admitted_sem->set();
        });
        ws.acquire(60);
        admitted_ws->set();
        t.join();
        for (;;)
            ::pause();
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return sem.waiters() == 1 && ws.waiters() == 1; }));
    seg.reset({.force = true});
    // Both return (a waiter that hung fails here after 30 s, the test's watchdog).
    const bool sem_in = lim::test::eventually([&] { return admitted_sem->value.load() != 0; });
    const bool ws_in = lim::test::eventually([&] { return admitted_ws->value.load() != 0; });
    CHECK(sem_in);
    CHECK(ws_in);
    CHECK(sem.in_use() == 2);
    CHECK(ws.in_use() == 60);
    CHECK(sem.waiters() == 0);
    CHECK(ws.waiters() == 0);
    CHECK_FALSE(sem.try_acquire(2));  // 1 free, not 2
    CHECK(ws.try_acquire(40));
    CHECK_FALSE(ws.try_acquire(1));
    kill_and_wait(waiter);
    seg.reap();
    CHECK(sem.in_use() == 0);
    CHECK(ws.in_use() == 40);
}

// 5. An unforced reset racing a process that attaches and acquires after the reset's check for
// other live processes and before its freeze. The window is held open with the config lock (a
// child holds it; the reset takes it after the check, before freezing anything). Before: the
// reset forgot the newcomer's 3 units, and this process was admitted 3 more of a capacity of 3
// while the newcomer, alive, still held its 3. Now the check is made again with the record frozen
// and quiescent: busy, nothing forgotten.
TEST_CASE("an unforced reset never forgets a process that attached after its check") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-late"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    detail::SegmentState& state = *seg.state();
    Flag* locked = make_flag();
    const pid_t writer = child_holding([&] {
        static auto config = detail::FileLock::lock_exclusive(state.fd(), detail::LockByte::config);
        locked->set();
    });
    locked->wait();
    std::atomic<int> outcome{-1};  // 0: reset, 1: busy, 2: other error
    std::thread resetter([&] {
        try {
            seg.reset({.key = "db"});
            outcome = 0;
        } catch (const Error& e) {
            outcome = e.code() == Errc::busy ? 1 : 2;
        }
    });
    // Past its check (the recovery lock held, no dead to reap), now polling for the config lock.
    REQUIRE(lim::test::eventually(
        [&] { return detail::FileLock::is_locked(state.fd(), detail::LockByte::recovery); }));
    std::this_thread::sleep_for(50ms);  // not an assertion: only lets it get to the lock
    const pid_t newcomer = child_holding([&] { sem.acquire(3); });
    const bool window_held = outcome.load() == -1;
    kill_and_wait(writer);  // the config lock drops: the reset goes on
    resetter.join();
    if (!window_held) MESSAGE("the reset ended before the newcomer attached: nothing checked");
    CHECK(outcome.load() != 2);
    // Never over the limit: the newcomer holds 3, so nothing more may be admitted.
    const bool admitted = sem.try_acquire(1);
    CHECK_FALSE(admitted);
    if (admitted) sem.release(1);
    if (window_held) CHECK(outcome.load() == 1);
    kill_and_wait(newcomer);
    seg.reap();
    CHECK(sem.in_use() == 0);
}

namespace {}  // namespace

// 3b. The real reset, SIGKILLed at random moments (a table of 16,384 slots makes its ledger
// clearing a wide window). Whatever the moment, once the next reap has run the word counts what
// the live ledgers hold, and a holder gets on. Before: a reset killed after clearing the ledgers
// and before its word store left the word counting units no ledger showed, and no reap ever
// looked at the record again (no dead slot named it), so they were withheld for good. Now the
// resetter announces the record on its own slot while it clears and stores: its dead slot makes
// the next reap recount the record.
TEST_CASE("a resetter SIGKILLed at any moment leaves counts the next reap makes exact") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-kill"));
    auto seg = Segment::open_or_create(
        guard.name(),
        {.max_limiters = 2, .max_processes = 16384, .reap_after = 0s, .reap_on_attach = false});
    auto sem = Semaphore::open(seg, "db", {.capacity = 1000});
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::semaphore, "db");
    auto& word = semaphore_word(seg, record);
    const auto resetter = [&] {
        return lim::test::fork_child([&] {
            seg.reset({.key = "db", .force = true});
            return 0;
        });
    };
    // How long a reset takes here, fork included: the kills land within it.
    auto t0 = std::chrono::steady_clock::now();
    REQUIRE(lim::test::wait_child(resetter()) == 0);
    const auto span = std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - t0);
    std::uint64_t seed = 88172645463325252ULL;
    int withheld = 0;
    int recounted = 0;  // rounds killed in the window this case is about (a measure, not a check)
    // Until the window has been hit 3 times (at most 60 rounds): each round costs a reset.
    for (int i = 0; i < 60 && recounted < 3; ++i) {
        CAPTURE(i);
        const pid_t holder = child_holding([&] { sem.acquire(5); });
        const pid_t r = resetter();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // From the freeze (seen here by spinning; the clearing follows it at once), a random
        // delay within a quarter of a whole reset; or, when the freeze was not seen, any moment.
        const auto until = std::chrono::steady_clock::now() + span;
        bool froze = false;
        while (!froze && std::chrono::steady_clock::now() < until)
            froze = detail::is_frozen(word.load());
        const auto range = froze ? span.count() / 4 : span.count();
        std::this_thread::sleep_for(std::chrono::microseconds(seed % (range + 1)));
        ::kill(r, SIGKILL);
        const int rc = lim::test::wait_child(r);
        CHECK((rc == 0 || rc == 128 + SIGKILL));  // done, or killed
        for (const auto& p : seg.reap().reaped) {
            // The killed resetter's slot named the record: its recount gave units back.
            if (p.pid == r && !p.returned.empty()) ++recounted;
        }
        const std::int64_t live = ledger_sum(state, record);
        const auto counted = static_cast<std::int64_t>(detail::SemaphoreWord::in_use(word.load()));
        if (counted != live) ++withheld;
        CHECK(counted == live);
        // A holder gets on (thawing a word the kill left frozen) and gives back what it took.
        CHECK(sem.try_acquire(1));
        sem.release(1);
        kill_and_wait(holder);
        seg.reap();  // a clean start for the next round: the holder's 5 given back or forgotten
        REQUIRE(sem.in_use() == 0);
    }
    MESSAGE("reset span " << span.count() << " us; rounds withheld: " << withheld
                          << "; killed between clearing and store, recounted: " << recounted);
}

// 4b. The same for a Limiter sleeper (the bucket empty, nothing dripping: only the reset's
// initial bucket can admit it) and a Dispatch waiter (its one concurrency slot held).
TEST_CASE("limiter and dispatch waiters blocked across a forced reset are admitted exactly") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-waiters2"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto l = Limiter::open(seg, "lim",
                           LimiterConfig{.hopper_to_bucket_rate_per_sec = 1.0,
                                         .bucket_size = 10,
                                         .initial_bucket_level = 10,
                                         .initial_hopper_level = 0.0});
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 1,
                                  .byte_budget = 1000});
    REQUIRE(l.try_take(10) == TryTake::taken);
    std::optional<Permit> mine = d.try_acquire(10);
    REQUIRE(mine);
    Flag* admitted_l = make_flag();
    Flag* admitted_d = make_flag();
    const pid_t waiter = lim::test::fork_child([&] {
        std::thread t([&] {
            l.take(4);
            admitted_l->set();
        });
        Permit p = d.acquire(100);
        admitted_d->set();
        t.join();
        for (;;)
            ::pause();
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return l.waiters() == 1 && d.snapshot().waiters == 1; }));
    seg.reset({.force = true});
    const bool l_in = lim::test::eventually([&] { return admitted_l->value.load() != 0; });
    const bool d_in = lim::test::eventually([&] { return admitted_d->value.load() != 0; });
    CHECK(l_in);
    CHECK(d_in);
    CHECK(l.in_flight() == doctest::Approx(4.0));
    CHECK(d.snapshot().in_flight == 1);
    CHECK(d.snapshot().bytes_in_flight == 100);
    mine.reset();  // forgotten by the reset: releases nothing (reported on stderr)
    CHECK(d.snapshot().in_flight == 1);
    CHECK_FALSE(d.try_acquire(1).has_value());
    CHECK(l.try_take(6) == TryTake::taken);  // the bucket's other 6
    CHECK(l.try_take(1) != TryTake::taken);
    kill_and_wait(waiter);
    seg.reap();
    CHECK(d.snapshot().in_flight == 0);
    CHECK(l.in_flight() == doctest::Approx(6.0));
}

// 6. A reset stopped (past kFrozenBreakTimeout) with its announcement up, after freezing the
// record and clearing (some of) its ledgers: a holder breaks the freeze and acquires, so the
// reset's word store fails and it tries again; meanwhile another holder stays between its CAS and
// its ledger store, so the second try is refused (busy). Before: the ledgers the first try
// cleared stayed cleared under the old word, so the units they showed were counted by the word
// and by no ledger: their holder's release was refused (over_release) and the units withheld for
// good. Now the refused record gets back what its tries cleared: the word counts exactly what the
// live ledgers show, and every holder gives back its own -- the one in the middle of its
// operation at the refusal included (it holds 3 from before the reset): since layout 4 a reset
// clears and restores only the entries' `forgotten` words, which no holder writes, where layout 3
// wrote the holder's own word and so had to leave a slot mid-operation cleared.
TEST_CASE("a reset refused after a try that cleared the ledgers leaves them as the word counts") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-clrref"));
    // A table of 16,384 slots makes the clearing a wide window to stop the resetter in.
    auto seg = Segment::open_or_create(
        guard.name(),
        {.max_limiters = 2, .max_processes = 16384, .reap_after = 0s, .reap_on_attach = false});
    auto sem = Semaphore::open(seg, "db", {.capacity = 100});
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::semaphore, "db");
    auto& word = semaphore_word(seg, record);
    int hits = 0;
    for (int round = 0; round < 40 && hits == 0; ++round) {
        CAPTURE(round);
        // The old holder: 5 units, given back on `give` (1: refused as over_release).
        Flag* held = make_flag();
        Flag* give = make_flag();
        auto* give_threw = lim::test::shared_array<std::atomic<int>>(1);
        new (give_threw) std::atomic<int>{-1};
        const pid_t holder = lim::test::fork_child([&] {
            sem.acquire(5);
            held->set();
            give->wait();
            try {
                sem.release(5);
                give_threw->store(0);
            } catch (const Error& e) {
                give_threw->store(e.code() == Errc::over_release ? 1 : 2);
            }
            return 0;
        });
        held->wait();
        // The staged holder: between its CAS (on a thawed word) and its ledger store on `go`.
        Flag* go = make_flag();
        Flag* swapped = make_flag();
        Flag* record_go = make_flag();
        Flag* recorded = make_flag();
        // 1: the staged holder's release of its 3 from before the reset went through (0: refused,
        // as it must be after a reset that landed, in a round that missed the window).
        auto* kept_released = lim::test::shared_array<std::atomic<int>>(1);
        new (kept_released) std::atomic<int>{-1};
        const pid_t staged = lim::test::fork_child([&] {
            sem.acquire(3);  // held across the reset (and the thread's slot in its cache)
            go->wait();
            detail::QuickHold hold;
            if (!hold.open(state, record)) return 20;
            std::uint64_t w = word.load();
            while (detail::is_frozen(w) || !word.compare_exchange_weak(w, w + 2)) {
                if (detail::is_frozen(w)) w = word.load();
            }
            swapped->set();
            record_go->wait();
            hold.add(0, 2);
            hold.close();
            recorded->set();
            sem.release(2);
            // Its 3 from before the reset: the first try cleared them while this process was in
            // the middle of its operation, and the refusal gave them back (layout 3 could not:
            // a holder mid-operation writes its own entry, so its clearing stayed, the release
            // threw over_release, and a later recount would have forgotten the 3 still held).
            try {
                sem.release(3);
                kept_released->store(1);
            } catch (const Error& e) {
                kept_released->store(e.code() == Errc::over_release ? 0 : 2);
            }
            return 0;
        });
        // The resetter's slot (claimed before the reset, which announces on it), published.
        auto* resetter_slot = lim::test::shared_array<std::atomic<std::uint32_t>>(1);
        new (resetter_slot) std::atomic<std::uint32_t>{~0U};
        const pid_t resetter = lim::test::fork_child([&] {
            sem.acquire(1);
            sem.release(1);
            const detail::Holder* own = detail::find_cached_holder(state);
            if (own == nullptr) return 3;
            resetter_slot->store(state.slot_index_of(*own->slot));
            try {
                seg.reset({.key = "db", .force = true});
                return 0;
            } catch (const Error& e) {
                return e.code() == Errc::busy ? 1 : 2;
            }
        });
        // Stop the resetter while it announces the record (its own slot pending on it) with the
        // word frozen: between its freeze and its word store.
        bool stopped = false;
        const auto until = std::chrono::steady_clock::now() + 5s;
        while (resetter_slot->load() == ~0U && std::chrono::steady_clock::now() < until) {
        }
        if (const std::uint32_t i = resetter_slot->load(); i != ~0U) {
            const auto& slot = state.slot(i);
            // Until announced; or the reset landed (the holder's 5 forgotten): a missed round.
            while (slot.pending.load() != record + 1 &&
                   detail::SemaphoreWord::in_use(word.load()) != 0 &&
                   std::chrono::steady_clock::now() < until) {
            }
            if (slot.pending.load() == record + 1) {
                ::kill(resetter, SIGSTOP);
                stopped = true;
            }
        }
        bool hit = false;
        if (stopped) {
            // Stopped: wait until it really is (and see whether the word is still frozen).
            siginfo_t info{};
            ::waitid(P_PID, static_cast<id_t>(resetter), &info, WSTOPPED | WNOWAIT);
            hit = detail::is_frozen(word.load());
        }
        std::uint64_t mine = 0;
        if (hit) {
            ++hits;
            sem.acquire(1);  // steps aside, then breaks the freeze (kFrozenBreakTimeout)
            mine = 1;
            go->set();
            swapped->wait();
        } else {
            go->set();
        }
        ::kill(resetter, SIGCONT);
        const int rc = lim::test::wait_child(resetter);
        if (hit) CHECK(rc == 1);  // refused: the staged holder stayed mid-operation
        record_go->set();
        recorded->wait();
        CHECK(lim::test::wait_child(staged) == 0);
        CHECK(kept_released->load() != 2);
        if (hit) CHECK(kept_released->load() == 1);  // its 3 were given back by the refusal
        if (hit) {
            // The word counts exactly what the live ledgers show.
            CHECK(static_cast<std::int64_t>(detail::SemaphoreWord::in_use(word.load())) ==
                  ledger_sum(state, record));
        }
        give->set();
        CHECK(lim::test::wait_child(holder) == 0);
        if (hit) CHECK(give_threw->load() == 0);  // its 5 were still its own
        if (mine != 0) sem.release(mine);
        CHECK(static_cast<std::int64_t>(sem.in_use()) == ledger_sum(state, record));
        if (sem.in_use() != 0) seg.reset({.key = "db", .force = true});  // a clean next round
    }
    // The window (the clearing of 16,384 ledger entries) is hit in the first round or two when
    // the machine is idle; a loaded one may miss it in every round, and then this run showed
    // nothing (every round's counts were still checked).
    MESSAGE("rounds stopped in the window: " << hits);
    WARN(hits > 0);
}

// 7. A reset run by a thread past its slot registry's destruction (here from a thread_local's
// destructor that runs after it), SIGKILLed between its ledger clearing and its word store.
// Before: such a thread's slot was ephemeral and the reset gave it back at once, so the record
// went unannounced, and the word kept the holder's 5 units that no ledger showed and no reap
// recounted. Now the reset keeps the ephemeral slot, announced like any other, until it returns.
TEST_CASE("a reset from a thread past its slot registry's destruction is announced too") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rr-ephem"));
    auto seg = Segment::open_or_create(
        guard.name(),
        {.max_limiters = 2, .max_processes = 16384, .reap_after = 0s, .reap_on_attach = false});
    auto sem = Semaphore::open(seg, "db", {.capacity = 1000});
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::semaphore, "db");
    auto& word = semaphore_word(seg, record);
    int hits = 0;
    for (int round = 0; round < 30 && hits == 0; ++round) {
        CAPTURE(round);
        const pid_t holder = child_holding([&] { sem.acquire(5); });
        const pid_t resetter = lim::test::fork_child([&] {
            std::thread t([&] {
                struct Late {
                    Segment* seg;
                    ~Late() {
                        try {
                            seg->reset({.key = "db", .force = true});
                        } catch (...) {
                        }
                    }
                };
                // Constructed before the thread's slot registry, so destroyed after it.
                thread_local Late late{&seg};
                static_cast<void>(late);
                sem.acquire(1);
                sem.release(1);
            });
            t.join();
            return 0;
        });
        // Killed once the holder's 5 are cleared from its ledger while the word is frozen.
        std::uint32_t held_at = 0;  // the holder's slot
        while (detail::SlotOwner::pid(state.slot(held_at).owner.load()) !=
               static_cast<std::uint32_t>(holder))
            ++held_at;
        const auto& entry = state.ledger(held_at, record);
        const auto until = std::chrono::steady_clock::now() + 5s;
        bool cleared = false;
        while (!cleared && std::chrono::steady_clock::now() < until &&
               detail::SemaphoreWord::in_use(word.load()) != 0)
            cleared = detail::is_frozen(word.load()) && detail::holding(entry, 0) == 0;
        ::kill(resetter, SIGKILL);
        lim::test::wait_child(resetter);
        if (cleared && detail::is_frozen(word.load())) ++hits;
        seg.reap();
        CHECK(static_cast<std::int64_t>(detail::SemaphoreWord::in_use(word.load())) ==
              ledger_sum(state, record));
        CHECK(sem.try_acquire(1));  // thaws a word the kill left frozen
        sem.release(1);
        kill_and_wait(holder);
        seg.reap();
        if (sem.in_use() != 0) seg.reset({.key = "db", .force = true});
    }
    MESSAGE("rounds killed between clearing and store: " << hits);
    WARN(hits > 0);
}
