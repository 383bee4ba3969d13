// lim::Semaphore in one process: counts, bounds, blocking with deadlines, configuration checks.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "lim/lim.hpp"
#include "lim/semaphore.hpp"
#include "primitives/semaphore_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {
Segment make_segment(lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
}

// The semaphore `key`'s record and its algorithm, for tests that drive the steps themselves.
struct SemaphoreInternals {
    detail::SegmentState& state;
    std::uint32_t record;
    detail::SemaphoreCore core;

    SemaphoreInternals(const Segment& seg, std::string_view key, std::uint64_t capacity)
        : state(*seg.state()),
          record(*detail::find_record(state, detail::RecordKind::semaphore, key)),
          core{reinterpret_cast<detail::SemaphoreBody*>(state.record(record).body)->word, capacity,
               0} {}
};

struct Thrown : std::runtime_error {
    Thrown() : std::runtime_error("injected") {}
};
}  // namespace

TEST_CASE("try_acquire takes up to capacity and release gives back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    CHECK(sem.capacity() == 3);
    CHECK(sem.try_acquire());
    CHECK(sem.try_acquire(2));
    CHECK(sem.in_use() == 3);
    CHECK_FALSE(sem.try_acquire());
    sem.release(2);
    CHECK(sem.in_use() == 1);
    CHECK(sem.try_acquire(2));
    CHECK_FALSE(sem.try_acquire(1));
    sem.release(3);
    CHECK(sem.in_use() == 0);
    CHECK(sem.try_acquire(0));  // nothing asked, nothing taken
    CHECK(sem.in_use() == 0);
}

TEST_CASE("misuse is refused with clear errors and no change") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-misuse"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 2});
    sem.acquire();
    try {
        sem.release(2);
        FAIL("over-release must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::over_release);
    }
    CHECK(sem.in_use() == 1);
    try {
        sem.try_acquire(3);
        FAIL("more than capacity must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::invalid_argument);
    }
    for (std::uint64_t bad : {std::uint64_t{0}, (std::uint64_t{1} << 31) + 1}) {
        try {
            Semaphore::open(seg, "bad", {.capacity = bad});
            FAIL("bad capacity must throw");
        } catch (const Error& e) {
            CHECK(e.code() == Errc::invalid_argument);
        }
    }
    sem.release();
}

TEST_CASE("a key opened with another capacity is config_mismatch, or adopted on request") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-config"));
    auto seg = make_segment(guard);
    auto first = Semaphore::open(seg, "db", {.capacity = 8});
    try {
        Semaphore::open(seg, "db", {.capacity = 4});
        FAIL("expected config_mismatch");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::config_mismatch);
        CHECK(std::string(e.what()).find("capacity 8") != std::string::npos);
    }
    auto adopted = Semaphore::open(seg, "db", {.capacity = 4}, adopt_existing);
    CHECK(adopted.capacity() == 8);
    CHECK(adopted.try_acquire(8));
    CHECK(first.in_use() == 8);  // the same semaphore
    adopted.release(8);
}

TEST_CASE("acquire_until times out when nothing is released, and holds nothing then") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-timeout"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    sem.acquire();
    const TimePoint deadline = Clock::now() + 30ms;
    CHECK_FALSE(sem.acquire_until(1, deadline));
    CHECK(Clock::now() >= deadline);
    CHECK(sem.in_use() == 1);
    CHECK(sem.waiters() == 0);
    sem.release();
}

TEST_CASE("a sleeping acquire is woken by a release from another thread") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-wake"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 2});
    sem.acquire(2);
    std::atomic<bool> got{false};
    std::thread t([&] {
        sem.acquire(2);  // sleeps until both units are back
        got = true;
        sem.release(2);
    });
    while (sem.waiters() == 0)
        std::this_thread::yield();
    CHECK_FALSE(got.load());
    sem.release(1);
    sem.release(1);
    t.join();
    CHECK(got.load());
    CHECK(sem.in_use() == 0);
    CHECK(sem.waiters() == 0);
}

TEST_CASE("threads never exceed the capacity") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-threads"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 3});
    std::atomic<int> inside{0}, peak{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 2000; ++i) {
                SemaphoreGuard g(sem);
                const int now = inside.fetch_add(1) + 1;
                int p = peak.load();
                while (now > p && !peak.compare_exchange_weak(p, now)) {
                }
                inside.fetch_sub(1);
            }
        });
    }
    for (auto& t : threads)
        t.join();
    CHECK(peak.load() <= 3);
    CHECK(peak.load() >= 1);
    CHECK(sem.in_use() == 0);
    CHECK(sem.waiters() == 0);
}

TEST_CASE("a sleeper that registers while a recount runs is counted once (issue 9 item 6)") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-recount"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    REQUIRE(sem.try_acquire());
    SemaphoreInternals in(seg, "db", 1);

    // As a reaper would: hold the recovery lock (so the sleeper cannot take the word for an
    // abandoned recount and thaw it itself) and freeze the word.
    auto recovery = detail::FileLock::try_lock_fresh(in.state.fd(), detail::LockByte::recovery);
    REQUIRE(recovery.has_value());
    detail::kSemaphoreOps.freeze(in.state, in.record);

    // A sleeper starts registering: it announces itself, then finds the word frozen and steps
    // aside (its slot's `pending` drops to 0 while it is still inside register_sleeper).
    std::atomic<int> in_hold{0};
    std::atomic<std::uint32_t> slot_index{0};
    std::atomic<bool> registered{false};
    std::thread sleeper([&] {
        detail::Hold hold(in.state, in.record);
        slot_index = hold.slot_index();
        in_hold = 1;
        registered = in.core.register_sleeper(hold, in.state, 1);
    });
    REQUIRE(lim::test::eventually(
        [&] { return in_hold.load() == 1 && in.state.slot(slot_index).pending.load() == 0; }));

    // The recount: the live ledgers hold 1 unit; the stepped-aside sleeper must not be counted
    // yet, because its registering CAS has not landed.
    detail::recount_semaphore_word(in.state, in.record, 0, in.core.word, 1);
    detail::kSemaphoreOps.thaw(in.state, in.record);
    recovery.reset();
    sleeper.join();
    REQUIRE(registered.load());
    CHECK(sem.waiters() == 1);  // counted twice before the fix
    CHECK(sem.in_use() == 1);

    // Leaving brings the count back to exactly zero.
    {
        detail::Hold hold(in.state, in.record);
        in.core.deregister_sleeper(hold, in.state, 1);
    }
    CHECK(sem.waiters() == 0);
    sem.release();
    CHECK(sem.in_use() == 0);
}

TEST_CASE("a recount counts a registered sleeper exactly once, and it leaves at zero") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-recount2"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    REQUIRE(sem.try_acquire());
    SemaphoreInternals in(seg, "db", 1);
    std::atomic<bool> got{false};
    std::thread sleeper([&] {
        sem.acquire();
        got = true;
    });
    REQUIRE(lim::test::eventually([&] { return sem.waiters() == 1; }));
    // A reap-style recount while it sleeps keeps it counted once. As a reaper does: hold the
    // recovery lock, freeze, and wait until no slot is in the middle of an operation on the
    // record before counting. The word shows the sleeper as soon as its registering CAS lands,
    // a moment before its slot names the registration (both under one Hold): a recount that did
    // not wait would miss it, and its deregistering CAS would then underflow the count.
    auto recovery = detail::FileLock::try_lock_fresh(in.state.fd(), detail::LockByte::recovery);
    REQUIRE(recovery.has_value());
    detail::kSemaphoreOps.freeze(in.state, in.record);
    REQUIRE(lim::test::eventually([&] {
        for (std::uint32_t i = 0; i < in.state.geometry().max_processes; ++i)
            if (in.state.slot(i).pending.load() == in.record + 1) return false;
        return true;
    }));
    detail::recount_semaphore_word(in.state, in.record, 0, in.core.word, 1);
    detail::kSemaphoreOps.thaw(in.state, in.record);
    recovery.reset();
    CHECK(sem.waiters() == 1);
    sem.release();
    sleeper.join();
    CHECK(got.load());
    CHECK(sem.waiters() == 0);
    CHECK(sem.in_use() == 1);
    sem.release();
}

TEST_CASE("a blocked acquire whose clock or sleep throws holds nothing (issue 9 item 7)") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-throw"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 2});
    REQUIRE(sem.try_acquire(2));
    SemaphoreInternals in(seg, "db", 2);
    for (const bool clock_throws : {false, true}) {
        CAPTURE(clock_throws);
        bool armed = false;
        int sleeps = 0;
        const std::function<TimePoint()> clock = [&] {
            if (armed) throw Thrown();
            return Clock::now();
        };
        const std::function<void(Duration)> sleep = [&](Duration) {
            ++sleeps;
            if (!clock_throws) throw Thrown();
            armed = true;  // the next clock read throws
        };
        const detail::Pacing pacing{.clock = &clock, .sleep = &sleep};
        for (const std::uint64_t n : {std::uint64_t{1}, std::uint64_t{2}}) {
            CAPTURE(n);
            armed = false;
            sleeps = 0;
            CHECK_THROWS_AS(in.core.acquire_until(in.state, in.record, n, std::nullopt, pacing),
                            Thrown);
            CHECK(sleeps == 1);         // it did block (registered) before the throw
            CHECK(sem.waiters() == 0);  // the registration was withdrawn
            CHECK(sem.in_use() == 2);   // and nothing was taken
        }
    }
    sem.release(2);
    CHECK(sem.try_acquire(2));
    sem.release(2);
}

TEST_CASE("a recount that lands just after a sleeper registers (in its spin) counts it once") {
    // Issue 11: a registered sleeper re-reads the word for a short while before its futex wait.
    // Freeze the word the moment the sleeper's registration shows, so the freeze lands while it
    // makes its second try or spins (or, rarely, already sleeps): each way it must step aside,
    // be counted by the recount exactly once, and be woken afterwards.
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-spin-recount"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    SemaphoreInternals in(seg, "db", 1);
    for (int round = 0; round < 100; ++round) {
        CAPTURE(round);
        REQUIRE(sem.try_acquire());
        // As a reaper would, hold the recovery lock (so the sleeper cannot take the frozen word
        // for an abandoned recount and thaw it itself); taken first, so the freeze below follows
        // the registration within a few loads.
        auto recovery = detail::FileLock::try_lock_fresh(in.state.fd(), detail::LockByte::recovery);
        REQUIRE(recovery.has_value());
        std::atomic<std::uint32_t> slot{UINT32_MAX};
        std::atomic<bool> got{false};
        std::thread sleeper([&] {
            {
                detail::Hold hold(in.state, in.record);
                slot = hold.slot_index();
            }
            sem.acquire();
            got = true;
        });
        while (sem.waiters() == 0) {
        }
        // A different delay each round (0 to 4.9 µs): the freeze lands at the sleeper's second
        // try, during its spin, or once it sleeps. Which one a round hits does not matter; every
        // round checks the same invariants.
        const auto until = std::chrono::steady_clock::now() + (round % 50) * 100ns;
        while (std::chrono::steady_clock::now() < until) {
        }
        detail::kSemaphoreOps.freeze(in.state, in.record);
        // As the reaper: wait until the sleeper is not in the middle of an operation on the
        // record (it steps aside from the frozen word, or is outside any Hold).
        while (in.state.slot(slot.load()).pending.load() == in.record + 1) {
        }
        detail::recount_semaphore_word(in.state, in.record, 0, in.core.word, 1);
        detail::kSemaphoreOps.thaw(in.state, in.record);
        recovery.reset();
        CHECK(sem.waiters() == 1);
        CHECK(sem.in_use() == 1);
        CHECK_FALSE(got.load());
        sem.release();
        sleeper.join();
        CHECK(got.load());
        CHECK(sem.waiters() == 0);
        CHECK(sem.in_use() == 1);
        sem.release();  // the sleeper's unit (same process)
        CHECK(sem.in_use() == 0);
    }
}

TEST_CASE(
    "the uncontended path hands a frozen word and another thread's units to the general one") {
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-quick"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    REQUIRE(sem.try_acquire(2));
    SemaphoreInternals in(seg, "db", 4);

    // A frozen word (a reaper at work; we hold its recovery lock, so nobody thaws it early): an
    // acquire and a release started now change nothing until the thaw, and hold no announcement
    // while they wait (a reaper's quiesce step would otherwise wait for them).
    auto recovery = detail::FileLock::try_lock_fresh(in.state.fd(), detail::LockByte::recovery);
    REQUIRE(recovery.has_value());
    detail::kSemaphoreOps.freeze(in.state, in.record);
    const auto frozen_at = std::chrono::steady_clock::now();
    std::atomic<int> done{0};
    std::atomic<std::uint32_t> slot_index{~0u};
    std::thread other([&] {
        slot_index = detail::holder(in.state).slot_index;
        sem.acquire(1);  // this thread's own unit
        done = 1;
        sem.release(1);
        done = 2;
    });
    REQUIRE(lim::test::eventually([&] { return slot_index.load() != ~0u; }));
    std::this_thread::sleep_for(20ms);
    // Read while the freeze is younger than kFrozenBreakTimeout (measured after the reads): past
    // it the other thread thaws the word itself (the reaper is presumed stopped) and goes on,
    // which only a badly loaded machine that descheduled this thread that long lets happen.
    const int done_frozen = done.load();
    const std::uint32_t pending_frozen = in.state.slot(slot_index).pending.load();
    const std::uint64_t word_frozen = in.core.word.load();
    if (std::chrono::steady_clock::now() - frozen_at < detail::kFrozenBreakTimeout) {
        CHECK(done_frozen == 0);
        CHECK(pending_frozen == 0);  // stepped aside: not announced
        CHECK(detail::SemaphoreWord::in_use(word_frozen) == 2);
    } else {
        MESSAGE("this thread stalled past the break timeout: the frozen-window checks skipped");
    }
    detail::kSemaphoreOps.thaw(in.state, in.record);
    recovery.reset();
    other.join();
    CHECK(done.load() == 2);
    CHECK(sem.in_use() == 2);

    // Units this thread acquired, released by another thread of the process: that thread's own
    // ledger entry holds none (the uncontended release declines), and the general path finds
    // them in the process's slots. The two entries then sum to what the process holds.
    std::thread releaser([&] { sem.release(2); });
    releaser.join();
    CHECK(sem.in_use() == 0);
    CHECK(detail::process_holding(in.state, in.record, 0) == 0);

    // An over-release is still refused, with nothing changed.
    try {
        sem.release(1);
        FAIL("over-release must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::over_release);
    }
    CHECK(sem.in_use() == 0);
}

TEST_CASE(
    "units released by another thread are not released again by their acquirer, even while "
    "another process holds units") {
    // Thread A acquires a unit and thread B of the same process releases it (allowed: the
    // process holds it). A's own ledger entry still says 1 and B's says -1. A release by A now is
    // an over-release of the process (it holds nothing), even though A's own entry covers it and
    // the word counts another process's unit, which it must not take.
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-xthread"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 2});
    lim::test::Flag* child_holds = lim::test::make_flag();
    lim::test::Flag* child_may_go = lim::test::make_flag();
    const pid_t child = lim::test::fork_child([&] {
        if (!sem.try_acquire(1)) return 10;
        child_holds->set();
        child_may_go->wait();
        sem.release(1);
        return 0;
    });
    child_holds->wait();
    REQUIRE(sem.try_acquire(1));  // thread A (this one)
    CHECK(sem.in_use() == 2);
    std::thread b([&] { sem.release(1); });  // thread B releases A's unit
    b.join();
    CHECK(sem.in_use() == 1);  // the child's unit
    SemaphoreInternals in(seg, "db", 2);
    CHECK(detail::process_holding(in.state, in.record, 0) == 0);

    // Through the uncontended path, then through the general one (which the first refusal takes).
    for (int i = 0; i < 2; ++i) {
        Errc code = Errc::invalid_argument;
        try {
            sem.release(1);
        } catch (const Error& e) {
            code = e.code();
        }
        CHECK(code == Errc::over_release);
        CHECK(sem.in_use() == 1);                   // the child's unit is still counted
        if (sem.in_use() != 1) sem.try_acquire(1);  // (failed) put the stolen unit back
    }
    const bool over = sem.try_acquire(2);  // never over the limit
    CHECK_FALSE(over);
    if (over) sem.release(2);
    child_may_go->set();
    CHECK(lim::test::wait_child(child) == 0);
    CHECK(sem.in_use() == 0);
}

TEST_CASE("two mappings of one segment in one thread keep their own slots and ledgers") {
    // The thread's slot cache is keyed by the mapping's process-unique uid: a second mapping of
    // the same segment (or another segment) is a different slot, on the uncontended path too.
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-2maps"));
    auto seg_a = make_segment(guard);
    auto seg_b = Segment::open(guard.name());
    auto a = Semaphore::open(seg_a, "db", {.capacity = 4});
    auto b = Semaphore::open(seg_b, "db", {.capacity = 4});
    for (int round = 0; round < 2; ++round) {  // the second round with both slots cached
        a.acquire(1);
        REQUIRE(b.try_acquire(2));
        CHECK(a.in_use() == 3);
        SemaphoreInternals in_a(seg_a, "db", 4);
        SemaphoreInternals in_b(seg_b, "db", 4);
        CHECK(detail::holder(in_a.state).slot_index != detail::holder(in_b.state).slot_index);
        CHECK(detail::process_holding(in_a.state, in_a.record, 0) == 1);
        CHECK(detail::process_holding(in_b.state, in_b.record, 0) == 2);
        Errc code = Errc::invalid_argument;
        try {
            a.release(2);  // b's units: not held through this mapping
        } catch (const Error& e) {
            code = e.code();
        }
        CHECK(code == Errc::over_release);
        CHECK(a.in_use() == 3);
        b.release(2);
        a.release(1);
        CHECK(a.in_use() == 0);
    }
}

TEST_CASE("a fork while another thread is between its QuickHold CAS and its record") {
    // The child has only the forking thread, whose cache the fork hook emptied: it claims its own
    // slot, never writes the mid-operation thread's, and holds none of the parent's units.
    lim::test::SegmentGuard guard(lim::test::unique_name("sem-quick-fork"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "db", {.capacity = 8});
    SemaphoreInternals in(seg, "db", 8);
    sem.acquire(1);  // the forking thread's own unit and cached slot
    const std::uint32_t main_slot = detail::holder(in.state).slot_index;
    std::atomic<int> phase{0};
    std::atomic<std::uint32_t> t_slot{~0u};
    std::thread t([&] {
        sem.acquire(1);
        sem.release(1);  // the thread's slot in its cache
        detail::QuickHold hold;
        if (!hold.open(in.state, in.record)) {
            phase = -1;
            return;
        }
        t_slot = detail::holder(in.state).slot_index;
        std::uint64_t w = in.core.word.load();
        while (!in.core.word.compare_exchange_weak(w, w + 2)) {
        }
        phase = 1;
        while (phase.load() != 2)
            std::this_thread::yield();
        hold.add(0, 2);
        hold.close();
    });
    REQUIRE(lim::test::eventually([&] { return phase.load() == 1; }));
    const std::uint32_t ts = t_slot.load();
    const pid_t child = lim::test::fork_child([&] {
        for (const detail::HolderCacheEntry& e : detail::tl_holder_cache) {
            if (e.uid != 0) return 9;
        }
        if (detail::process_holding(in.state, in.record, 0) != 0) return 10;
        if (!sem.try_acquire(1)) return 11;
        const std::uint32_t mine = detail::holder(in.state).slot_index;
        if (mine == main_slot || mine == ts) return 12;
        if (in.state.ledger(ts, in.record).held[0].load() != 0) return 13;  // not recorded yet
        sem.release(1);
        try {
            sem.release(1);  // the parent's unit is not the child's
            return 14;
        } catch (const Error& e) {
            if (e.code() != Errc::over_release) return 15;
        }
        return 0;
    });
    CHECK(lim::test::wait_child(child) == 0);
    phase = 2;
    t.join();
    CHECK(sem.in_use() == 3);  // the main thread's 1 and t's 2
    CHECK(detail::process_holding(in.state, in.record, 0) == 3);
    const ReapReport report = seg.reap();  // the child's slot (it exited without freeing it)
    for (const auto& r : report.reaped) {
        CHECK(r.pid == child);
        CHECK(r.returned.empty());
    }
    CHECK(sem.in_use() == 3);
    std::thread([&] { sem.release(2); }).join();
    sem.release(1);
    CHECK(sem.in_use() == 0);
}
