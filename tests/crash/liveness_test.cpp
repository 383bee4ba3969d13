// Liveness from kernel locks (docs/design.md, "Liveness"): a process is alive while it holds its
// slots' lock bytes, whatever its threads do and whatever the checker can or cannot open; the
// dead are found even when they fill the whole table; fork() never leaves a lock with a child.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <thread>
#include <vector>

#include "lim/lim.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/limiter_records.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

using lim::test::Flag;
using lim::test::make_flag;
using lim::test::occupied;

using lim::test::kill_and_wait;

SegmentOptions options(std::uint32_t max_processes = 32) {
    return {.max_limiters = 8,
            .max_processes = max_processes,
            .reap_after = 1s,
            .reap_on_attach = false};
}

// Forks a child that holds `n` units of `sem` and then sleeps until killed.
pid_t child_holding(Semaphore& sem, std::uint64_t n) {
    Flag* ready = make_flag();
    const pid_t pid = lim::test::fork_child([&] {
        sem.acquire(n);
        ready->set();
        for (;;)
            ::pause();
        return 0;
    });
    ready->wait();
    return pid;
}

// The state letter of /proc/<pid>/stat (the test may read /proc; lim does not).
char proc_state(pid_t pid) {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
    FILE* f = std::fopen(path, "r");
    if (f == nullptr) return '?';
    char buf[512] = {};
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    const std::string_view text(buf, n);
    const auto close = text.rfind(')');
    return close == std::string_view::npos || close + 2 >= text.size() ? '?' : text[close + 2];
}

}  // namespace

TEST_CASE(
    "a process whose main thread called pthread_exit while another thread holds units is alive") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-pthread-exit"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    Flag* ready = make_flag();
    // A raw fork, and the thread-exit system call rather than pthread_exit: the test framework's
    // catch (...) around this test case would swallow pthread_exit's forced unwind. For the
    // kernel (and for /proc) the two are the same: the thread-group leader is gone.
    std::fflush(nullptr);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        std::thread([&] {
            sem.acquire(1);
            ready->set();
            for (;;)
                ::pause();
        }).detach();
        ready->wait();
        ::syscall(SYS_exit, 0);  // the main thread leaves; the holder thread runs on
    }
    ready->wait();
    // The main thread is gone: /proc shows the thread-group leader as a zombie.
    REQUIRE(lim::test::eventually([&] { return proc_state(child) == 'Z'; }));
    CHECK(seg.reap().reaped.empty());
    CHECK(sem.in_use() == 1);
    CHECK_FALSE(sem.try_acquire(1));  // never admitted beyond capacity
    CHECK(seg.info().processes == 2);
    kill_and_wait(child);
    REQUIRE(seg.reap().reaped.size() == 1);
    CHECK(sem.in_use() == 0);
}

TEST_CASE("a reaper out of file descriptors reclaims nothing from live processes") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-emfile"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    sem.acquire(1);
    const pid_t holder = child_holding(sem, 2);
    const pid_t reaper = lim::test::fork_child([&] {
        // Exhaust the descriptor table, then try everything that judges liveness.
        rlimit lim{};
        ::getrlimit(RLIMIT_NOFILE, &lim);
        lim.rlim_cur = 64;
        ::setrlimit(RLIMIT_NOFILE, &lim);
        while (::open("/dev/null", O_RDONLY) >= 0) {
        }
        if (errno != EMFILE) return 10;
        std::size_t dead = 0;
        for (const auto& j : detail::judge_slots(*seg.state()))
            dead += j.dead;
        if (dead != 0) return 11;
#if defined(__SANITIZE_ADDRESS__)
        // UBSan's vptr check (on the Error the reap throws) probes memory through a pipe(),
        // which fails with EMFILE and turns into a false report: give the sanitizer room.
        for (int fd = 3; fd < 6; ++fd)
            ::close(static_cast<int>(lim.rlim_cur) - fd);
#endif
        try {
            if (!seg.reap().reaped.empty()) return 12;
        } catch (const Error&) {
            // Refusing is fine (it cannot take the recovery lock); reclaiming is not.
        }
        if (sem.in_use() != 3) return 13;
        return 0;
    });
    CHECK(lim::test::wait_child(reaper) == 0);
    CHECK(sem.in_use() == 3);
    CHECK(seg.reap().reaped.empty());
    kill_and_wait(holder);
    REQUIRE(seg.reap().reaped.size() == 1);
    CHECK(sem.in_use() == 1);
    sem.release(1);
}

TEST_CASE("a forked child's copy of the parent's lock description does not keep the parent alive") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-fork"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    Flag* ready = make_flag();
    Flag* grandchild_forked = make_flag();
    pid_t* grandchild = lim::test::shared_array<pid_t>(1);
    const pid_t parent = lim::test::fork_child([&] {
        sem.acquire(2);
        const pid_t g = ::fork();  // inherits every descriptor, the slot locks' included
        if (g == 0) {
            // fork() has returned here, so the fork hook has closed this process's copies of
            // the private descriptions; until then the parent would rightly count as alive.
            grandchild_forked->set();
            for (;;)
                ::pause();
        }
        *grandchild = g;
        grandchild_forked->wait();
        ready->set();
        for (;;)
            ::pause();
        return 0;
    });
    ready->wait();
    kill_and_wait(parent);
    // The grandchild lives on with copies of the parent's descriptors, but not of its private
    // lock description: the parent is dead and its units come back.
    REQUIRE(*grandchild > 0);
    // Killed however the checks below end: it holds ctest's output pipe open.
    struct KillOnExit {
        pid_t pid;
        ~KillOnExit() {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
        }
    } reap_grandchild{*grandchild};
    CHECK(::kill(*grandchild, 0) == 0);
    const ReapReport report = seg.reap();
    REQUIRE(report.reaped.size() == 1);
    CHECK(report.reaped[0].pid == parent);
    CHECK(sem.in_use() == 0);
}

TEST_CASE("a child forked while another thread holds a segment lock does not hold it") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-fork-lock"));
    auto seg = Segment::open_or_create(guard.name(), options());
    const int fd = seg.state()->fd();
    for (const auto byte : {detail::LockByte::config, detail::LockByte::records}) {
        std::optional<detail::FileLock> held = detail::FileLock::lock_exclusive(fd, byte);
        pid_t sleeper = 0;
        std::thread([&] {
            sleeper = lim::test::fork_child([] {
                for (;;)
                    ::pause();
                return 0;
            });
        }).join();
        held.reset();  // the parent releases; the child sleeps on
        const pid_t third = lim::test::fork_child(
            [&] { return detail::FileLock::try_lock_fresh(fd, byte).has_value() ? 0 : 1; });
        CHECK(lim::test::wait_child(third) == 0);  // at once, not after the sleeper exits
        kill_and_wait(sleeper);
    }
}

TEST_CASE("a table full of dead processes does not block attach, reap or forced reset") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-full"));
    constexpr std::uint32_t kSlots = 4;
    {
        auto seg = Segment::open_or_create(guard.name(), options(kSlots));
        Semaphore::open(seg, "db", {.capacity = 10});
    }  // the creator's slot is freed on close
    // Every slot taken by a process of its own, each holding one unit, then all killed.
    std::vector<pid_t> dead;
    for (std::uint32_t i = 0; i < kSlots; ++i) {
        Flag* ready = make_flag();
        dead.push_back(lim::test::fork_child([&] {
            auto seg = Segment::open(guard.name(), options(kSlots));
            auto sem = Semaphore::open(seg, "db", {.capacity = 10});
            sem.acquire(1);
            ready->set();
            for (;;)
                ::pause();
            return 0;
        }));
        ready->wait();
    }
    for (const pid_t pid : dead)
        kill_and_wait(pid);
    const pid_t opener = lim::test::fork_child([&] {
        auto seg = Segment::open(guard.name(), options(kSlots));  // the table is full of the dead
        auto sem = Semaphore::open(seg, "db", {.capacity = 10});
        return sem.in_use() == 0 && seg.info().processes == 1 ? 0 : 1;
    });
    CHECK(lim::test::wait_child(opener) == 0);

    // Reap and forced reset on a full table: this process holds one slot, the dead the rest.
    auto seg = Segment::open(guard.name(), options(kSlots));
    auto sem = Semaphore::open(seg, "db", {.capacity = 10});
    for (int round = 0; round < 2; ++round) {
        std::vector<pid_t> killed;
        for (std::uint32_t i = 0; i < kSlots - 1; ++i)
            killed.push_back(child_holding(sem, 2));
        for (const pid_t pid : killed)
            kill_and_wait(pid);
        CHECK(occupied(seg) == kSlots);
        CHECK(sem.in_use() == 6);
        if (round == 0) {
            CHECK(seg.reap().reaped.size() == kSlots - 1);
        } else {
            seg.reset({.force = true});
        }
        CHECK(sem.in_use() == 0);
        CHECK(occupied(seg) == 1);
    }
}

TEST_CASE("a slot with an unknown state byte is judged by its lock like any other") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-unknown"));
    auto seg = Segment::open_or_create(guard.name(), options(8));
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    const pid_t holder = child_holding(sem, 1);
    auto& s = *seg.state();
    std::optional<std::uint32_t> theirs, spare;
    for (std::uint32_t i = 0; i < 8; ++i) {
        const std::uint64_t w = s.slot(i).owner.load();
        if (detail::SlotOwner::pid(w) == static_cast<std::uint32_t>(holder)) theirs = i;
        if (!detail::slot_is_occupied(w) && !spare) spare = i;
    }
    REQUIRE(theirs);
    REQUIRE(spare);
    // A state byte no lim writes, on a slot whose lock a live process holds: left alone.
    const std::uint64_t w = s.slot(*theirs).owner.load();
    s.slot(*theirs).owner.store((w & ~0xFFULL) | 0x7F);
    // The same on a slot nobody locks: dead, reclaimed.
    s.slot(*spare).owner.store(detail::SlotOwner::make(999'999, 5, detail::SlotState{0x42}));
    const ReapReport report = seg.reap();
    REQUIRE(report.reaped.size() == 1);
    CHECK(report.reaped[0].pid == 999'999);
    CHECK_FALSE(detail::slot_is_occupied(s.slot(*spare).owner.load()));
    CHECK(s.slot(*theirs).owner.load() == ((w & ~0xFFULL) | 0x7F));
    CHECK(sem.in_use() == 1);
    kill_and_wait(holder);
    REQUIRE(seg.reap().reaped.size() == 1);
    CHECK(sem.in_use() == 0);
}

TEST_CASE("a release from a thread_local destructor after the thread's slot was given back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-tls-dtor"));
    auto seg = Segment::open_or_create(guard.name(), options(8));
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    const std::uint32_t before = occupied(seg);
    struct LateRelease {
        Semaphore* sem = nullptr;
        ~LateRelease() {
            if (sem != nullptr) sem->release(1);
        }
    };
    std::thread([&] {
        // Constructed before the thread's slot registry, so destroyed after it: the release
        // runs once the slot is already retired.
        thread_local LateRelease late;
        sem.acquire(1);
        late.sem = &sem;
    }).join();
    CHECK(sem.in_use() == 0);
    CHECK(occupied(seg) == before);  // the retired slot was adopted, emptied and freed
    CHECK(seg.reap().reaped.empty());
}

TEST_CASE(
    "units acquired by one process cannot be released by another; by another thread they can") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-release-elsewhere"));
    auto seg = Segment::open_or_create(guard.name(), options(8));
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    auto bytes = WeightedSemaphore::open(seg, "bytes", {.capacity = 100});
    sem.acquire(2);
    bytes.acquire(60);
    const pid_t worker = lim::test::fork_child([&] {
        int refused = 0;
        try {
            sem.release(2);
        } catch (const Error& e) {
            refused += e.code() == Errc::over_release;
        }
        try {
            bytes.release(60);
        } catch (const Error& e) {
            refused += e.code() == Errc::over_release;
        }
        return refused == 2 && sem.in_use() == 2 && bytes.in_use() == 60 ? 0 : 1;
    });
    CHECK(lim::test::wait_child(worker) == 0);
    // The worker exited (without closing its handles: its slot is reaped) and a reap finds
    // nothing to give back: the acquirer's units stay.
    for (const auto& p : seg.reap().reaped)
        CHECK(p.returned.empty());
    CHECK(sem.in_use() == 2);
    CHECK(bytes.in_use() == 60);
    // Another thread of the acquiring process may release them (the process holds them).
    std::thread([&] {
        sem.release(2);
        bytes.release(60);
    }).join();
    CHECK(sem.in_use() == 0);
    CHECK(bytes.in_use() == 0);
    CHECK(seg.reap().reaped.empty());
    CHECK(sem.try_acquire(4));
    sem.release(4);
}

TEST_CASE("reap_after = Duration::max() never reaps automatically (no overflow into the past)") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-reap-max"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8,
                                                      .max_processes = 8,
                                                      .reap_after = Duration::max(),
                                                      .reap_on_attach = false});
    auto sem = Semaphore::open(seg, "db", {.capacity = 1});
    const pid_t dead = child_holding(sem, 1);
    kill_and_wait(dead);
    // A blocking acquire may not reap (its reap_after never passes): it times out, and the dead
    // holder's unit stays until an explicit reap.
    CHECK_FALSE(sem.acquire_until(1, Clock::now() + 100ms));
    CHECK(sem.in_use() == 1);
    REQUIRE(seg.reap().reaped.size() == 1);
    CHECK(sem.try_acquire(1));
    sem.release(1);
}

namespace {
bool byte_locked(const Segment& seg, std::uint32_t slot) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(detail::kSlotLockBase + slot);
    fl.l_len = 1;
    REQUIRE(::fcntl(seg.state()->fd(), F_OFD_GETLK, &fl) == 0);
    return fl.l_type != F_UNLCK;
}
}  // namespace

TEST_CASE(
    "a thread that exits unlocks its freed slot's byte; a retired slot stays locked and alive") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-thread-exit"));
    auto seg = Segment::open_or_create(guard.name(), options(8));
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    std::uint32_t freed = 0, retired = 0;
    std::thread([&] {
        sem.acquire(1);
        sem.release(1);
        freed = detail::holder(*seg.state()).slot_index;
        CHECK(byte_locked(seg, freed));
    }).join();
    CHECK_FALSE(detail::slot_is_occupied(seg.state()->slot(freed).owner.load()));
    CHECK_FALSE(byte_locked(seg, freed));

    std::thread([&] {
        sem.acquire(2);  // kept: the slot is retired at exit, still this process's
        retired = detail::holder(*seg.state()).slot_index;
    }).join();
    CHECK(detail::SlotOwner::state(seg.state()->slot(retired).owner.load()) ==
          detail::SlotState::retired);
    CHECK(byte_locked(seg, retired));
    // Another process's reap must not take the units of a retired slot of a live process.
    const pid_t reaper = lim::test::fork_child([&] {
        auto other = Segment::open(guard.name(), options(8));
        return other.reap().reaped.empty() ? 0 : 1;
    });
    CHECK(lim::test::wait_child(reaper) == 0);
    CHECK(sem.in_use() == 2);
    sem.release(2);  // this thread adopts nothing; the process holds the units, so it may
    CHECK(sem.in_use() == 0);
}

TEST_CASE("a holding handed off to another process is that process's to release, exactly once") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-hand-off"));
    auto seg = Segment::open_or_create(guard.name(), options(8));
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    const auto record = *detail::find_record(*seg.state(), detail::RecordKind::semaphore, "db");
    auto* ticket = lim::test::shared_array<detail::HandOff>(1);
    sem.acquire(3);
    *ticket = detail::hand_off_holding(*seg.state(), record, 0, 2);
    CHECK(detail::process_holding(*seg.state(), record, 0) == 1);
    CHECK(seg.reap().reaped.empty());
    CHECK(sem.in_use() == 3);  // nothing changes hands in the shared word

    // The worker takes it (once), and then it may release it; a second receive finds nothing.
    const pid_t worker = lim::test::fork_child([&] {
        if (!detail::receive_holding(*seg.state(), *ticket)) return 1;
        if (detail::receive_holding(*seg.state(), *ticket)) return 2;
        sem.release(2);
        return sem.in_use() == 1 ? 0 : 3;
    });
    CHECK(lim::test::wait_child(worker) == 0);
    CHECK(sem.in_use() == 1);
    for (const auto& p : seg.reap().reaped)
        CHECK(p.returned.empty());  // the worker's slot held nothing when it exited
    CHECK(sem.in_use() == 1);

    // A giver that dies before the receiver takes the parcel: the reap returns the units, and
    // the receiver gets nothing.
    Flag* offered = make_flag();
    const pid_t giver = lim::test::fork_child([&] {
        sem.acquire(2);
        *ticket = detail::hand_off_holding(*seg.state(), record, 0, 2);
        offered->set();
        for (;;)
            ::pause();
        return 0;
    });
    offered->wait();
    CHECK(sem.in_use() == 3);
    kill_and_wait(giver);
    CHECK_FALSE(detail::receive_holding(*seg.state(), *ticket));
    REQUIRE(seg.reap().reaped.size() == 1);
    CHECK(sem.in_use() == 1);

    // A receiver that dies holding a received parcel is reaped like any holder.
    *ticket = detail::hand_off_holding(*seg.state(), record, 0, 1);
    const pid_t receiver = lim::test::fork_child([&] {
        if (!detail::receive_holding(*seg.state(), *ticket)) return 1;
        offered->value.store(2);
        for (;;)
            ::pause();
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return offered->value.load() == 2; }));
    CHECK(detail::process_holding(*seg.state(), record, 0) == 0);
    kill_and_wait(receiver);
    REQUIRE(seg.reap().reaped.size() == 1);
    CHECK(sem.in_use() == 0);
}

TEST_CASE("a job started by one process cannot be finished by another; by another thread it can") {
    lim::test::SegmentGuard guard(lim::test::unique_name("live-finish-elsewhere"));
    auto seg = Segment::open_or_create(guard.name(), options(8));
    auto th = Throttle::open(seg, "jobs", {.max_concurrent_jobs = 2});
    auto trl = ThrottledRateLimiter::open(
        seg, "paced", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 2});
    th.start_job();
    trl.start_job();
    const pid_t worker = lim::test::fork_child([&] {
        int refused = 0;
        try {
            th.finish_job();
        } catch (const Error& e) {
            refused += e.code() == Errc::over_release;
        }
        try {
            trl.finish_job();
        } catch (const Error& e) {
            refused += e.code() == Errc::over_release;
        }
        try {
            th.limiter().return_to_hopper(1.0);
        } catch (const Error& e) {
            refused += e.code() == Errc::over_release;
        }
        return refused == 3 && th.limiter().in_flight() == 1 && trl.limiter().in_flight() == 1 ? 0
                                                                                               : 1;
    });
    CHECK(lim::test::wait_child(worker) == 0);
    for (const auto& p : seg.reap().reaped)
        CHECK(p.returned.empty());
    CHECK(th.limiter().in_flight() == 1);
    CHECK(trl.limiter().in_flight() == 1);
    // Another thread of the process that started the jobs may finish them.
    std::thread([&] {
        th.finish_job();
        trl.finish_job();
    }).join();
    CHECK(th.limiter().in_flight() == 0);
    CHECK(trl.limiter().in_flight() == 0);
    CHECK(seg.reap().reaped.empty());
    // With nothing in flight the process-wide check refuses too, and nothing changes.
    CHECK_THROWS_AS(th.finish_job(), Error);
    CHECK(th.limiter().in_flight() == 0);
}
