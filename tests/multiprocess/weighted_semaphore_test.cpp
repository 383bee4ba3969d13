// A WeightedSemaphore shared by forked processes: FIFO admission across processes, a large
// request not starved by streams of small ones, and the budget never exceeded.
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "lim/segment.hpp"
#include "lim/weighted_semaphore.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::eventually;
using namespace std::chrono_literals;

namespace {
void raise(std::atomic<long>& peak, long v) {
    long p = peak.load();
    while (v > p && !peak.compare_exchange_weak(p, v)) {
    }
}
}  // namespace

TEST_CASE("processes queued one after another are admitted in that order") {
    constexpr int kProcs = 6;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-ws-order"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = 10});
    auto* order = lim::test::shared_array<std::atomic<int>>(kProcs + 1);
    for (int i = 0; i <= kProcs; ++i)
        new (&order[i]) std::atomic<int>{-1};
    auto* next = &order[kProcs];
    next->store(0);
    ws.acquire(10);
    std::vector<pid_t> kids;
    for (int i = 0; i < kProcs; ++i) {
        // Large and small alternate; no two fit at once, so recording order is admission order.
        const std::uint64_t amount = i % 2 == 0 ? 7 : 4;
        kids.push_back(lim::test::fork_child([&, i, amount] {
            ws.acquire(amount);
            order[i] = next->fetch_add(1);
            ws.release(amount);
            return 0;
        }));
        REQUIRE(eventually([&] { return ws.waiters() == static_cast<std::uint32_t>(i + 1); }));
    }
    ws.release(10);
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    for (int i = 0; i < kProcs; ++i)
        CHECK(order[i].load() == i);
    CHECK(ws.in_use() == 0);
    CHECK(ws.waiters() == 0);
}

TEST_CASE("a large request is not starved by streams of small ones from other processes") {
    constexpr int kStreams = 4;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-ws-starve"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = 10});
    struct Shared {
        std::atomic<long> in_use;
        std::atomic<long> peak;
        std::atomic<long> small_total;
        std::atomic<int> stop;
    };
    auto* s = lim::test::shared_array<Shared>(1);
    new (s) Shared{};
    std::vector<pid_t> kids;
    for (int k = 0; k < kStreams; ++k) {
        kids.push_back(lim::test::fork_child([&] {
            // Each stream keeps 3 of the 10 units busy almost all the time.
            while (s->stop.load() == 0) {
                ws.acquire(3);
                raise(s->peak, s->in_use.fetch_add(3) + 3);
                s->small_total.fetch_add(1);
                std::this_thread::sleep_for(50us);
                s->in_use.fetch_sub(3);
                ws.release(3);
            }
            return 0;
        }));
    }
    REQUIRE(eventually([&] { return s->small_total.load() > 200; }));
    const bool got = ws.acquire_until(10, Clock::now() + 60s);  // far: a loaded machine is slow
    if (got) {
        raise(s->peak, s->in_use.fetch_add(10) + 10);
        s->in_use.fetch_sub(10);
        ws.release(10);
    }
    s->stop = 1;
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    CHECK(got);
    CHECK(s->peak.load() <= 10);
    CHECK(ws.in_use() == 0);
    CHECK(ws.waiters() == 0);
}

TEST_CASE("8 processes with random amounts never exceed the budget") {
    constexpr int kProcs = 8;
    constexpr int kIters = 5000;
    constexpr std::uint64_t kCapacity = 1000;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-ws-budget"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = kCapacity});
    struct Shared {
        std::atomic<long> in_use;
        std::atomic<long> peak;
        std::atomic<long> total;
    };
    auto* s = lim::test::shared_array<Shared>(1);
    new (s) Shared{};
    std::vector<pid_t> kids;
    for (int p = 0; p < kProcs; ++p) {
        kids.push_back(lim::test::fork_child([&, p] {
            for (int i = 0; i < kIters; ++i) {
                const std::uint64_t n = 1 + static_cast<std::uint64_t>((i * 131 + p * 977) % 700);
                if (i % 3 == 0 && !ws.acquire_until(n, Clock::now() + 1ms)) continue;
                if (i % 3 != 0) ws.acquire(n);
                raise(s->peak, s->in_use.fetch_add(static_cast<long>(n)) + static_cast<long>(n));
                s->in_use.fetch_sub(static_cast<long>(n));
                s->total.fetch_add(1);
                ws.release(n);
            }
            return 0;
        }));
    }
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    CHECK(s->peak.load() <= static_cast<long>(kCapacity));
    CHECK(s->total.load() > kProcs * kIters / 2);
    CHECK(ws.in_use() == 0);
    CHECK(ws.waiters() == 0);
}
