// Crash recovery of a Dispatch through its KindOps (the reaper itself is not part of this test):
// a process killed while holding permits and while queued at the head of the byte queue stalls
// the queue; freeze + recount with the live ledger sums gives back exactly what it held, cancels
// its ticket, and lets the next request in.
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "dispatch/dispatch_state.hpp"
#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/segment.hpp"
#include "lim/weighted_semaphore.hpp"
#include "primitives/weighted_semaphore_state.hpp"
#include "shm/records.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::eventually;
using namespace std::chrono_literals;

namespace {

// What a reaper does for one record, given the pid it found dead.
detail::LiveHoldings recover(const Segment& seg, const detail::KindOps& ops, std::uint32_t record,
                             pid_t dead) {
    detail::SegmentState& state = *seg.state();
    detail::LiveHoldings live;
    std::vector<std::uint32_t> dead_slots;
    ops.freeze(state, record);
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const auto w = state.slot(i).owner.load();
        const auto st = detail::SlotOwner::state(w);
        if (st != detail::SlotState::live && st != detail::SlotState::retired) continue;
        if (detail::SlotOwner::pid(w) == static_cast<std::uint32_t>(dead)) {
            dead_slots.push_back(i);
            continue;
        }
        // A live slot must not be mid-operation on the record while we recount.
        while (state.slot(i).pending.load() == record + 1)
            std::this_thread::yield();
        for (int k = 0; k < 3; ++k)
            live.held[k] += state.ledger(i, record).held[k].load();
    }
    REQUIRE_FALSE(dead_slots.empty());
    return ops.recount(state, record, live, dead_slots, Clock::now());
}

}  // namespace

TEST_CASE("a dead process's permits and its place at the head of the byte queue are recovered") {
    // Both word layouts: slots and bytes packed in one word, and (concurrency too wide to pack)
    // each layer in its own word.
    std::uint64_t concurrency = 10;
    SUBCASE("packed") {
        concurrency = 10;
    }
    SUBCASE("unpacked") {
        concurrency = 40'000;
    }
    lim::test::SegmentGuard guard(lim::test::unique_name("crash-dispatch"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = concurrency,
                                  .byte_budget = 1000});
    const std::uint32_t record =
        *detail::find_record(*seg.state(), detail::RecordKind::dispatch, "api");
    CHECK(detail::is_packed(*reinterpret_cast<const detail::DispatchConfig*>(
              seg.state()->record(record).config)) == (concurrency == 10));
    Permit mine = d.acquire(100);

    auto* ready = lim::test::shared_array<std::atomic<int>>(1);
    new (ready) std::atomic<int>{0};
    const pid_t child = lim::test::fork_child([&] {
        Permit a = d.acquire(300);
        Permit b = d.acquire(300);
        ready->store(1);
        Permit c = d.acquire(500);  // 300 free: queues at the head, and dies there
        return 9;
    });
    REQUIRE(eventually([&] { return ready->load() == 1 && d.snapshot().bytes_waiters == 1; }));

    // A live request queues behind the doomed head.
    std::atomic<bool> got{false};
    Permit theirs;
    std::thread t([&] {
        theirs = d.acquire(200);
        got = true;
    });
    REQUIRE(eventually([&] { return d.snapshot().bytes_waiters == 2; }));
    ::kill(child, SIGKILL);
    CHECK(lim::test::wait_child(child) == 128 + SIGKILL);
    std::this_thread::sleep_for(50ms);
    CHECK_FALSE(got.load());  // stalled behind a dead head
    DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 5);  // mine, the child's three, the thread's (queued ones hold a slot)
    CHECK(s.bytes_in_flight == 700);

    const detail::LiveHoldings given = recover(seg, detail::kDispatchOps, record, child);
    CHECK(given.held[detail::kDispatchSlotsLayer] == 3);
    CHECK(given.held[detail::kDispatchThrottledLayer] == 0);
    CHECK(given.held[detail::kDispatchBytesLayer] == 600);

    t.join();  // the turn passed over the dead ticket: admitted
    CHECK(got.load());
    s = d.snapshot();
    CHECK(s.in_flight == 2);
    CHECK(s.bytes_in_flight == 300);
    CHECK(s.waiters == 0);
    theirs.release();
    mine.release();
    s = d.snapshot();
    CHECK(s.in_flight == 0);
    CHECK(s.bytes_in_flight == 0);
    // The queue works normally afterwards.
    auto all = d.acquire(1000);
    CHECK(all.bytes() == 1000);
}

TEST_CASE("a dead process queued behind a live head is cancelled and skipped") {
    lim::test::SegmentGuard guard(lim::test::unique_name("crash-ws"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = 10});
    const std::uint32_t record =
        *detail::find_record(*seg.state(), detail::RecordKind::weighted_semaphore, "bytes");
    ws.acquire(10);
    std::atomic<bool> head_got{false};
    std::thread head([&] {
        ws.acquire(6);
        head_got = true;
    });
    REQUIRE(eventually([&] { return ws.waiters() == 1; }));
    const pid_t child = lim::test::fork_child([&] {
        ws.acquire(2);  // queued second; killed there
        return 9;
    });
    REQUIRE(eventually([&] { return ws.waiters() == 2; }));
    std::atomic<bool> last_got{false};
    std::thread last([&] {
        ws.acquire(4);
        last_got = true;
    });
    REQUIRE(eventually([&] { return ws.waiters() == 3; }));
    ::kill(child, SIGKILL);
    CHECK(lim::test::wait_child(child) == 128 + SIGKILL);

    const detail::LiveHoldings given = recover(seg, detail::kWeightedSemaphoreOps, record, child);
    CHECK(given.held[0] == 0);  // it held nothing, it only waited
    CHECK(ws.waiters() == 3);   // its ticket stays until the turn passes over it
    ws.release(10);
    head.join();
    last.join();
    CHECK(head_got.load());
    CHECK(last_got.load());
    CHECK(ws.in_use() == 10);
    CHECK(ws.waiters() == 0);
    ws.release(10);
}

TEST_CASE("reset gives a Dispatch its configured state and clears its backoff") {
    std::uint64_t concurrency = 400;
    SUBCASE("packed") {
        concurrency = 400;
    }
    SUBCASE("unpacked") {
        concurrency = 40'000;
    }
    lim::test::SegmentGuard guard(lim::test::unique_name("reset-dispatch"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = concurrency,
                                  .byte_budget = 1000});
    const std::uint32_t record =
        *detail::find_record(*seg.state(), detail::RecordKind::dispatch, "api");
    const pid_t child = lim::test::fork_child([&] {
        d.set_backoff(1h);
        Permit p = d.acquire(10);  // under backoff: throttled, 200 bytes
        ::kill(::getpid(), SIGKILL);
        return 0;
    });
    CHECK(lim::test::wait_child(child) == 128 + SIGKILL);
    DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 1);
    CHECK(s.throttled_in_flight == 1);
    CHECK(s.bytes_in_flight == 200);
    CHECK(s.backoff_active);
    detail::kDispatchOps.freeze(*seg.state(), record);
    detail::kDispatchOps.reset(*seg.state(), record, Clock::now());
    s = d.snapshot();
    CHECK(s.in_flight == 0);
    CHECK(s.throttled_in_flight == 0);
    CHECK(s.bytes_in_flight == 0);
    CHECK_FALSE(s.backoff_active);
    auto p = d.try_acquire(1000);
    CHECK(p);
    CHECK(detail::kDispatchOps.layers == 3);
}
