// lim::WaitCheck: a blocking acquire calls the thread's check while it waits, keeps its place
// meanwhile, and leaves exactly once (WaitStopped) when the check says stop.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/error.hpp"
#include "lim/segment.hpp"
#include "lim/semaphore.hpp"
#include "lim/throttle.hpp"
#include "lim/wait_check.hpp"
#include "lim/weighted_semaphore.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::eventually;
using namespace std::chrono_literals;

namespace {

Segment make_segment(lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
}

// A check that counts its calls, records the fewest waiters it saw, and stops on demand.
struct Probe {
    const WeightedSemaphore* ws = nullptr;
    std::atomic<int> calls{0};
    std::atomic<std::uint32_t> min_waiters{~0u};
    std::atomic<bool> stop{false};
    int stop_at = 0;  // stop on this call (0: when `stop` is set)

    static bool check(void* p) {
        auto& self = *static_cast<Probe*>(p);
        const int n = ++self.calls;
        if (self.ws != nullptr) {
            const std::uint32_t w = self.ws->waiters();
            if (w < self.min_waiters.load()) self.min_waiters = w;
        }
        return self.stop.load() || (self.stop_at != 0 && n >= self.stop_at);
    }
};

}  // namespace

TEST_CASE(
    "a stopped waiter keeps its place until the stop, then leaves once; the one behind it "
    "moves up") {
    lim::test::SegmentGuard guard(lim::test::unique_name("wc-fifo"));
    auto seg = make_segment(guard);
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = 10});
    REQUIRE(ws.try_acquire(10));

    Probe probe;
    probe.ws = &ws;
    std::atomic<int> outcome{0};  // 1 stopped, 2 acquired, 3 timed out
    std::thread first([&] {
        WaitCheck check(&Probe::check, &probe, 1ms);
        try {
            outcome = ws.acquire_until(4, Clock::now() + 60s) ? 2 : 3;
        } catch (const WaitStopped&) {
            outcome = 1;
        }
    });
    // The first request is queued once its check has run (checks run only from the wait's
    // pause, after the ticket is drawn), not once the queued count reads 1: joining counts the
    // request in the word before it draws its ticket from the tail (docs/design.md, "The FIFO
    // queue"). A second request started in between drew the earlier ticket and was the head,
    // and the stopped first stayed counted, cancelled behind it, until that head's admission.
    REQUIRE(eventually([&] { return probe.calls.load() >= 1; }));
    REQUIRE(ws.waiters() == 1);
    std::atomic<bool> second_in{false};
    std::thread second([&] {
        if (ws.acquire_until(1, Clock::now() + 60s)) second_in = true;
    });
    REQUIRE(eventually([&] { return ws.waiters() == 2; }));
    // Many checks, each 1 ms apart: the first request never left the queue meanwhile.
    REQUIRE(eventually([&] { return probe.calls.load() >= 20; }));
    CHECK(probe.min_waiters.load() >= 1);
    CHECK_FALSE(second_in.load());
    probe.stop = true;
    first.join();
    CHECK(outcome.load() == 1);
    CHECK(ws.waiters() == 1);  // the second is queued still, now at the head
    CHECK(ws.in_use() == 10);
    ws.release(10);
    second.join();
    CHECK(second_in.load());
    CHECK(ws.in_use() == 1);
    ws.release(1);
    CHECK(ws.waiters() == 0);
    // Nothing the stopped request left behind still counts as queued: free units go at once.
    CHECK(ws.try_acquire(10));
    ws.release(10);
}

TEST_CASE("installs nest: the innermost check is consulted, the outer one comes back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("wc-nest"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "sem", {.capacity = 1});
    REQUIRE(sem.try_acquire(1));
    CHECK(WaitCheck::current() == nullptr);
    Probe outer;
    WaitCheck outer_check(&Probe::check, &outer, 1ms);
    {
        Probe inner;
        inner.stop_at = 3;
        WaitCheck inner_check(&Probe::check, &inner, 1ms);
        CHECK(WaitCheck::current() == &inner_check);
        CHECK_THROWS_AS(sem.acquire(1), WaitStopped);
        CHECK(inner.calls.load() == 3);
        CHECK(outer.calls.load() == 0);
        CHECK(sem.waiters() == 0);  // the sleeper registration was withdrawn
    }
    CHECK(WaitCheck::current() == &outer_check);
    // The outer one never says stop: the deadline ends the wait, after at least one check.
    CHECK_FALSE(sem.acquire_until(1, Clock::now() + 20ms));
    CHECK(outer.calls.load() >= 1);
    CHECK(sem.waiters() == 0);
    CHECK(sem.in_use() == 1);
    // Units free at once: no check at all.
    sem.release(1);
    const int before = outer.calls.load();
    sem.acquire(1);
    CHECK(outer.calls.load() == before);
    sem.release(1);
}

TEST_CASE("a stopped Dispatch request gives back the slot it took while queued for bytes") {
    lim::test::SegmentGuard guard(lim::test::unique_name("wc-disp"));
    auto seg = make_segment(guard);
    auto window = BackoffWindow::for_key(seg, "w");
    auto d =
        Dispatch::open(seg, {.limiter = window, .key = "d", .concurrency = 4, .byte_budget = 100});
    auto holder = d.try_acquire(100);
    REQUIRE(holder.has_value());
    Probe probe;
    probe.stop_at = 5;
    {
        WaitCheck check(&Probe::check, &probe, 1ms);
        CHECK_THROWS_AS(d.acquire(50), WaitStopped);
    }
    CHECK(probe.calls.load() == 5);
    const DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 1);
    CHECK(s.bytes_in_flight == 100);
    CHECK(s.waiters == 0);
    holder->release();
    CHECK(d.snapshot().in_flight == 0);
}

TEST_CASE("a WaitCheck installed before a fork() does not stop the child's waits") {
    // A server that installs its check once (for a cancellation flag, say) and then forks its
    // workers: only a fork made by the check itself, during a wait, ends that wait. The child's
    // own later waits must time out or succeed as usual, not throw WaitStopped at once.
    lim::test::SegmentGuard guard(lim::test::unique_name("wc-prefork"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "sem", {.capacity = 1});
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = 10});
    REQUIRE(sem.try_acquire(1));
    REQUIRE(ws.try_acquire(10));
    Probe probe;  // never says stop
    WaitCheck check(&Probe::check, &probe, 1ms);
    const pid_t pid = lim::test::fork_child([&] {
        try {
            if (sem.acquire_until(1, Clock::now() + 20ms)) return 10;  // nobody released
            if (ws.acquire_until(4, Clock::now() + 20ms)) return 11;
            if (probe.calls.load() < 2) return 12;  // the child's waits did consult the check
            if (sem.waiters() != 0 || ws.waiters() != 0) return 13;
            return 0;
        } catch (const WaitStopped&) {
            return 20;
        }
    });
    CHECK(lim::test::wait_child(pid) == 0);
    CHECK(sem.in_use() == 1);
    CHECK(ws.in_use() == 10);
    CHECK(ws.waiters() == 0);
    sem.release(1);
    ws.release(10);
}

TEST_CASE("an interval of Duration::max() checks once, not on every pass (no overflow)") {
    lim::test::SegmentGuard guard(lim::test::unique_name("wc-maxint"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "sem", {.capacity = 1});
    REQUIRE(sem.try_acquire(1));
    Probe probe;
    {
        WaitCheck check(&Probe::check, &probe, Duration::max());
        // Due once before the first sleep, then never again (no signal comes): now + max would
        // wrap into the past and call the check before every sleep after the first (a
        // semaphore's sleeps last up to 100 ms each: several before this deadline).
        CHECK_FALSE(sem.acquire_until(1, Clock::now() + 400ms));
    }
    CHECK(probe.calls.load() == 1);
    CHECK(sem.waiters() == 0);
    sem.release(1);
}

namespace {

// A check that makes a blocking acquire itself (forbidden by the contract, but a C caller may):
// the thread's slot names one wait at a time, the outer one, and a nested wait that registered
// there would clear it on leaving (a recount would then count the outer wait dead). So a nested
// acquire that would have to wait throws Error(invalid_argument) before it registers, and never
// calls the same check again; one whose units are free at once just takes them.
struct Reentrant {
    Semaphore* other = nullptr;
    WeightedSemaphore* other_ws = nullptr;
    Throttle* other_th = nullptr;
    const Semaphore* outer = nullptr;
    int depth = 0;
    int max_depth = 0;
    int calls = 0;
    int refused = 0;
    int outer_seen = 0;  // calls that saw the outer wait registered
    static bool check(void* p) {
        auto& self = *static_cast<Reentrant*>(p);
        ++self.calls;
        self.max_depth = std::max(self.max_depth, ++self.depth);
        if (self.outer != nullptr && self.outer->waiters() == 1) ++self.outer_seen;
        bool stop = false;
        try {
            if (self.other != nullptr) (void)self.other->acquire_until(1, Clock::now() + 5ms);
            if (self.other_ws != nullptr) {
                (void)self.other_ws->acquire_until(1, Clock::now() + 5ms);
            }
            if (self.other_th != nullptr) (void)self.other_th->start_job_until(Clock::now() + 5ms);
        } catch (const WaitStopped&) {
            stop = true;
        } catch (const Error& e) {
            if (e.code() == Errc::invalid_argument) ++self.refused;
        }
        --self.depth;
        return stop || self.calls >= 3;
    }
};

}  // namespace

TEST_CASE("a check that blocks in lim is refused, not re-entered, and the outer wait stays put") {
    lim::test::SegmentGuard guard(lim::test::unique_name("wc-reent"));
    auto seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "sem", {.capacity = 1});
    auto other = Semaphore::open(seg, "other", {.capacity = 1});
    auto other_ws = WeightedSemaphore::open(seg, "other-ws", {.capacity = 1});
    REQUIRE(sem.try_acquire(1));
    REQUIRE(other.try_acquire(1));
    REQUIRE(other_ws.try_acquire(1));
    auto other_th = Throttle::open(seg, "other-th", {.max_concurrent_jobs = 1});
    REQUIRE(other_th.try_start_job().kind() == StartJob::Kind::start);
    for (int kind = 0; kind < 3; ++kind) {
        CAPTURE(kind);
        Reentrant r;
        r.outer = &sem;
        if (kind == 0) r.other = &other;
        if (kind == 1) r.other_ws = &other_ws;
        if (kind == 2) r.other_th = &other_th;  // a Limiter-family take_until registers too
        {
            WaitCheck check(&Reentrant::check, &r, 1ms);
            CHECK_THROWS_AS(sem.acquire(1), WaitStopped);
        }
        CHECK(r.max_depth == 1);
        CHECK(r.calls == 3);
        CHECK(r.refused == 3);
        CHECK(r.outer_seen == 3);
        CHECK(sem.waiters() == 0);
        CHECK(other.waiters() == 0);
        CHECK(other_ws.waiters() == 0);
        CHECK(other_th.waiters() == 0);
        CHECK(sem.in_use() == 1);
        CHECK(other.in_use() == 1);
        CHECK(other_ws.in_use() == 1);
    }
    // Free units inside a check: taken at once, no refusal (nothing registers).
    other.release(1);
    Reentrant r;
    r.other = &other;
    {
        WaitCheck check(&Reentrant::check, &r, 1ms);
        CHECK_THROWS_AS(sem.acquire(1), WaitStopped);
    }
    CHECK(r.refused == 2);  // the 1st call took the unit; the 2nd and 3rd had to wait
    CHECK(other.in_use() == 1);
    sem.release(1);
    other.release(1);
    other_ws.release(1);
    other_th.finish_job();
}
