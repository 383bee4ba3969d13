// A release that steps aside across a forced reset (docs/design.md, "Reset", "a release waiting
// aside across a reset"): a live process releases units it holds, finds the record's word frozen
// and waits aside (its announcement withdrawn, so the reset's quiescence does not wait for it),
// and a forced reset then forgets those units and re-initialises the word. When the word thaws,
// the release must not go on with the check it made before the reset: the units are no longer
// its to give back, and giving them back would take units of whoever acquired after the reset
// (over the limit). Each case stages the interleaving with real processes: the word frozen by
// hand (as a reaper freezes it), the releaser stopped with SIGSTOP while aside, the reset run,
// this process filling the limit, the releaser continued.
//
// The last two cases (fourth review) stop a real resetter in its ledger clearing (a 16,384-slot
// table makes it wide) and have a holder break its freeze, so that its retry is refused and it
// gives back what it cleared: a release that found its units cleared meanwhile must wait for that
// and give them back (not give up: withheld), and a Dispatch reset that had already reset its
// concurrency word must not give its slots back to the ledgers (over the limit).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <thread>

#include "dispatch/dispatch_state.hpp"
#include "lim/lim.hpp"
#include "primitives/semaphore_state.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/crash_segment.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;
using lim::test::Flag;
using lim::test::ledger_sum;
using lim::test::make_flag;

namespace {

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

// The recovery lock, held by this process as a reaper holds it while its words are frozen: a holder
// waiting aside on a word frozen by hand then thaws it only after kFrozenBreakTimeout (200 ms), not
// after 20 ms through the free lock (Hold::step_aside), which would let the release finish before
// this process has stopped it aside.
std::optional<detail::FileLock> hold_recovery_lock(const Segment& seg) {
    auto lock = detail::FileLock::lock_until(seg.state()->fd(), detail::LockByte::recovery,
                                             Clock::now() + 3s);
    REQUIRE(lock);
    return lock;
}

// Stops `child`, which is releasing on a frozen word, while it waits aside. The release cannot
// finish on a frozen word: after a moment the child waits aside (its announcement withdrawn) or
// has not yet announced; it is stopped where it is. Stopped while announced (between its
// announcement and its first look at the word), it is continued and stopped again a moment
// later. False if it was never caught aside.
bool stop_aside(const Segment& seg, pid_t child) {
    for (int i = 0; i < 50; ++i) {
        std::this_thread::sleep_for(20ms);
        ::kill(child, SIGSTOP);
        const bool stopped = lim::test::eventually([&] {
            int st = 0;
            return ::waitpid(child, &st, WUNTRACED | WNOHANG) == child && WIFSTOPPED(st);
        });
        if (stopped && !announced(seg, child)) return true;
        ::kill(child, SIGCONT);
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
    auto recovery = hold_recovery_lock(seg);
    ops->freeze(state, record);
    go->set();
    releasing->wait();
    REQUIRE(stop_aside(seg, child));
    recovery.reset();                        // the reset takes it
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
    auto seg = lim::test::own_reaps_segment(guard);

    // Units acquired by this thread, or by another thread of the process (the release then
    // passes on the process-wide sum, not the thread's own entry).
    const auto semaphore_release = [&](bool acquired_by_another_thread) {
        auto sem = Semaphore::open(seg, "db", {.capacity = 1});
        release_aside_across_reset(
            seg, detail::RecordKind::semaphore, "db",
            [&] {
                if (acquired_by_another_thread)
                    std::thread([&] { sem.acquire(1); }).join();
                else
                    sem.acquire(1);
                return 1;
            },
            [&](int n) { return refused_or_released([&] { sem.release(n); }); },
            [&] {
                REQUIRE(sem.try_acquire(1));
                return std::uint64_t{1};
            },
            [&] { return sem.in_use(); }, [&] { return sem.try_acquire(1); });
    };
    SUBCASE("Semaphore::release") {
        semaphore_release(false);
    }
    SUBCASE("Semaphore::release of units another thread of the process acquired") {
        semaphore_release(true);
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
    auto seg = lim::test::own_reaps_segment(guard);
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

namespace {

// A table of 16,384 slots makes a reset's ledger clearing a wide window to stop the resetter in
// (as crash.reset_review's "a reset refused after a try that cleared the ledgers ..." does).
Segment make_wide_segment(const lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(
        guard.name(),
        {.max_limiters = 4, .max_processes = 16384, .reap_after = 0s, .reap_on_attach = false});
}

// The slot of process `pid` (the first one it holds), or nullptr.
const detail::SlotHeader* slot_of(const Segment& seg, pid_t pid) {
    const detail::SegmentState& state = *seg.state();
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const std::uint64_t owner = state.slot(i).owner.load();
        if (detail::SlotOwner::state(owner) == detail::SlotState::live &&
            detail::SlotOwner::pid(owner) == static_cast<std::uint32_t>(pid))
            return &state.slot(i);
    }
    return nullptr;
}

// Takes a permit and releases it: the calling thread's slot is then in its cache.
void warm_up(Dispatch& d) {
    Permit p = d.acquire(0);
    p.release();
}

// A child that force-resets `key` on `go` (after `warm`, which gives its thread a slot: the reset
// announces on it). stop_in_clearing() lets it go and stops it while it is announced on `record`
// and `frozen()` still holds: in its ledger clearing, before its word store. The child exits 0 if
// its reset landed, 1 if it was refused (busy).
struct Resetter {
    pid_t pid = -1;
    std::atomic<std::uint32_t>* slot_index = nullptr;
    Flag* go = nullptr;
    Flag* done = nullptr;
    bool stopped = false;  // in the window (false: a missed round, the child left running)
};
template <class Warm>
Resetter fork_resetter(Segment& seg, const char* key, Warm warm) {
    detail::SegmentState& state = *seg.state();
    Resetter r;
    r.slot_index = lim::test::shared_array<std::atomic<std::uint32_t>>(1);
    new (r.slot_index) std::atomic<std::uint32_t>{~0U};
    r.go = make_flag();
    r.done = make_flag();
    r.pid = lim::test::fork_child([&] {
        warm();
        const detail::Holder* own = detail::find_cached_holder(state);
        if (own == nullptr) return 3;
        r.slot_index->store(state.slot_index_of(*own->slot));
        r.go->wait();
        int rc = 2;
        try {
            seg.reset({.key = key, .force = true});
            rc = 0;
        } catch (const Error& e) {
            if (e.code() == Errc::busy) rc = 1;
        }
        r.done->set();
        return rc;
    });
    REQUIRE(lim::test::eventually([&] { return r.slot_index->load() != ~0U; }));
    return r;
}
template <class Frozen, class Ready>
void stop_in_clearing(Resetter& r, const Segment& seg, std::uint32_t record, Frozen frozen,
                      Ready ready) {
    const detail::SlotHeader& slot = seg.state()->slot(r.slot_index->load());
    r.go->set();
    // Announced, and past what `ready` waits for (an entry it cleared), or done.
    while ((slot.pending.load() != record + 1 || !ready()) && r.done->value.load() == 0) {
    }
    if (slot.pending.load() != record + 1) return;
    ::kill(r.pid, SIGSTOP);
    siginfo_t info{};
    ::waitid(P_PID, static_cast<id_t>(r.pid), &info, WSTOPPED | WNOWAIT);
    if (slot.pending.load() == record + 1 && frozen()) {
        r.stopped = true;
    } else {
        ::kill(r.pid, SIGCONT);  // past its word store: a missed round
    }
}

}  // namespace

// A release that stepped aside, and then found its units gone from the ledgers because a forced
// reset had cleared them, while the reset had not (yet) stored the word: the resetter stopped
// between its clearing and its store for longer than kFrozenBreakTimeout (the releaser breaks the
// freeze), and its retry then refused (a live slot stayed mid-operation on the record), which gives
// the cleared entries back (docs/design.md, "Reset": a reset refused after a try that cleared the
// ledgers). Before: the release (its check before each CAS) gave up at once (over_release), and
// the restore then put its 5 units back in its ledger under a word that still counted them:
// withheld for as long as the releaser lived, though its owner had released them. Now the release
// waits for the reset to end (the recovery lock), with its announcement withdrawn, and checks
// again: the units are its own again, and it gives them back.
TEST_CASE(
    "a release that finds its units cleared by a reset that is then refused gives them back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ra-clr"));
    auto seg = make_wide_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 100});
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::semaphore, "db");
    auto& word = reinterpret_cast<detail::SemaphoreBody*>(state.record(record).body)->word;
    const detail::KindOps* ops = detail::kind_ops(detail::RecordKind::semaphore);
    int hits = 0;
    for (int round = 0; round < 60 && hits == 0; ++round) {
        CAPTURE(round);
        Flag* ready = make_flag();
        Flag* go = make_flag();
        Flag* releasing = make_flag();
        Flag* exit_go = make_flag();
        auto* result = lim::test::shared_array<std::atomic<int>>(1);
        new (result) std::atomic<int>{-1};
        const pid_t releaser = lim::test::fork_child([&] {
            sem.acquire(5);
            ready->set();
            go->wait();
            releasing->set();
            result->store(refused_or_released([&] { sem.release(5); }));
            exit_go->wait();  // alive: what its ledger shows stays counted
            return 0;
        });
        ready->wait();
        // A live slot mid-operation on the record (announced), on announce(): the reset's retry
        // then refuses the record. Its slot (and the resetter's) taken before anything is frozen.
        lim::test::AnnouncingChild staged(state, record, [&] {
            sem.acquire(1);  // the thread's slot in its cache
            sem.release(1);
        });
        Resetter r = fork_resetter(seg, "db", [&] {
            sem.acquire(1);
            sem.release(1);
        });
        // The release waits aside on a word frozen as a reaper freezes it; stopped there.
        auto recovery = hold_recovery_lock(seg);
        ops->freeze(state, record);
        go->set();
        releasing->wait();
        REQUIRE(stop_aside(seg, releaser));
        recovery.reset();  // the resetter takes it
        const detail::SlotHeader* releaser_slot = slot_of(seg, releaser);
        REQUIRE(releaser_slot != nullptr);
        const auto& entry = state.ledger(state.slot_index_of(*releaser_slot), record);
        stop_in_clearing(
            r, seg, record, [&] { return detail::is_frozen(word.load()); },
            [&] { return detail::holding(entry, 0) == 0; });
        const bool hit = r.stopped && detail::holding(entry, 0) == 0;
        if (!hit)
            MESSAGE("missed: stopped " << r.stopped << ", entry " << detail::holding(entry, 0));
        if (hit) {
            ++hits;
            staged.announce();
            // The releaser, continued, breaks the freeze (frozen past kFrozenBreakTimeout) and
            // finds its entry cleared under a word that still counts its units.
            ::kill(releaser, SIGCONT);
            REQUIRE(lim::test::eventually([&] { return !detail::is_frozen(word.load()); }));
            std::this_thread::sleep_for(100ms);  // before: its release refused by now
            ::kill(r.pid, SIGCONT);
            CHECK(lim::test::wait_child(r.pid) == 1);  // refused: the staged slot is announced
            CHECK(staged.finish() == 0);
            REQUIRE(lim::test::eventually([&] { return result->load() != -1; }));
            CHECK(result->load() == kReleased);  // before: kRefused (over_release)
            CHECK(sem.in_use() == 0);            // before: 5, withheld
            CHECK(ledger_sum(state, record, 0) == 0);
        } else {
            if (r.stopped) ::kill(r.pid, SIGCONT);
            ::kill(releaser, SIGCONT);
            lim::test::wait_child(r.pid);
            staged.finish();
            REQUIRE(lim::test::eventually([&] { return result->load() != -1; }));
        }
        exit_go->set();
        CHECK(lim::test::wait_child(releaser) == 0);
        CHECK(static_cast<std::int64_t>(sem.in_use()) == ledger_sum(state, record, 0));
        if (sem.in_use() != 0 || detail::is_frozen(word.load()))
            seg.reset({.key = "db", .force = true});  // a clean next round
    }
    // The window (the clearing of 16,384 ledger entries) is hit in the first round or two when the
    // machine is idle; a loaded one may miss it in every round, and then this run showed nothing
    // (as crash.reset_review's "a reset refused after a try that cleared the ledgers ...").
    MESSAGE("rounds stopped in the window: " << hits);
    WARN(hits > 0);
}

// A forced reset of an unpacked Dispatch (three words) stopped between its clearing and its word
// stores; a holder breaks the freeze of the byte word only (it waited aside there past
// kFrozenBreakTimeout, as a Permit's release, which gives back its bytes first, does). Continued,
// the reset stores its concurrency word (every slot forgotten) and finds the byte word thawed; its
// retry is refused (a live slot stays mid-operation). Before: the refusal gave the ledgers back
// everything its tries had cleared, the concurrency slots included, though the concurrency word no
// longer counted them: the holder's slot was shown again by its ledger, and its release took one
// of the slots admitted after the reset (3 slots in use of 2). Now a try that resets some of a
// record's words forgets what it cleared from their layers, and restores only the others'.
TEST_CASE("a reset refused after it reset some of a Dispatch's words restores only the others") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ra-part"));
    auto seg = make_wide_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 2,
                                  .byte_budget = std::uint64_t{1} << 33});  // not packed
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::dispatch, "api");
    auto& body = *reinterpret_cast<detail::DispatchBody*>(state.record(record).body);
    int hits = 0;
    for (int round = 0; round < 60 && hits == 0; ++round) {
        CAPTURE(round);
        Flag* ready = make_flag();
        Flag* release_go = make_flag();
        Flag* released = make_flag();
        Flag* exit_go = make_flag();
        const pid_t holder = lim::test::fork_child([&] {
            auto p = d.try_acquire(100);
            if (!p) return 20;
            ready->set();
            release_go->wait();
            p->release();
            released->set();
            exit_go->wait();
            return 0;
        });
        ready->wait();
        lim::test::AnnouncingChild staged(state, record,
                                          [&] { warm_up(d); });  // the thread's slot in its cache
        const auto all_frozen = [&] {
            return detail::is_frozen(body.concurrency.load()) &&
                   detail::is_frozen(body.bytes.word.load());
        };
        Resetter r = fork_resetter(seg, "api", [&] { warm_up(d); });
        stop_in_clearing(r, seg, record, all_frozen, [] { return true; });
        std::vector<Permit> mine;
        if (r.stopped) {
            ++hits;
            {
                // A holder waiting aside on the byte word breaks its freeze (Hold::step_aside).
                detail::Hold hold(state, record);
                hold.wait_while_frozen(body.bytes.word, state);
            }
            CHECK_FALSE(detail::is_frozen(body.bytes.word.load()));
            CHECK(detail::is_frozen(body.concurrency.load()));
            staged.announce();
            ::kill(r.pid, SIGCONT);
            CHECK(lim::test::wait_child(r.pid) == 1);  // refused: the staged slot is announced
            CHECK(staged.finish() == 0);
            // The concurrency word was reset: this process takes both slots.
            while (auto p = d.try_acquire(0))
                mine.push_back(std::move(*p));
            CHECK(mine.size() == 2);
            // The holder's release must give back none of them (its slot was forgotten).
            release_go->set();
            released->wait();
            while (auto p = d.try_acquire(0))
                mine.push_back(std::move(*p));
            CHECK(mine.size() == 2);  // before: 3 of 2
            CHECK(d.snapshot().in_flight == mine.size());
            CHECK(ledger_sum(state, record, detail::kDispatchSlotsLayer) ==
                  static_cast<std::int64_t>(mine.size()));
            CHECK(d.snapshot().bytes_in_flight == 0);  // the holder's bytes given back
        } else {
            lim::test::wait_child(r.pid);
            staged.finish();
            release_go->set();
            released->wait();
        }
        exit_go->set();
        CHECK(lim::test::wait_child(holder) == 0);
        mine.clear();
        seg.reset({.key = "api", .force = true});  // a clean next round
    }
    // The window (the clearing of 16,384 ledger entries) is hit in the first round or two when the
    // machine is idle; a loaded one may miss it in every round, and then this run showed nothing
    // (as crash.reset_review's "a reset refused after a try that cleared the ledgers ...").
    MESSAGE("rounds stopped in the window: " << hits);
    WARN(hits > 0);
}
