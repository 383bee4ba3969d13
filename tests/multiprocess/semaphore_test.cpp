// A Semaphore shared by forked processes: the number inside, counted independently, never
// exceeds the capacity, and every unit comes back.
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "lim/lim.hpp"
#include "lim/semaphore.hpp"
#include "support/process.hpp"

using namespace lim;

TEST_CASE("8 processes x 20000 acquisitions: concurrency never exceeds capacity") {
    constexpr int kProcs = 8;
    constexpr int kIters = 20'000;
    constexpr std::uint64_t kCapacity = 3;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-sem"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto sem = Semaphore::open(seg, "db", {.capacity = kCapacity});
    struct Counters {
        std::atomic<int> inside;
        std::atomic<int> peak;
        std::atomic<long> total;
    };
    auto* c = lim::test::shared_array<Counters>(1);
    new (c) Counters{};
    std::vector<pid_t> kids;
    for (int p = 0; p < kProcs; ++p) {
        kids.push_back(lim::test::fork_child([&] {
            for (int i = 0; i < kIters; ++i) {
                if (i % 3 == 0) {
                    if (!sem.try_acquire()) continue;
                } else {
                    sem.acquire();
                }
                const int now = c->inside.fetch_add(1) + 1;
                int peak = c->peak.load();
                while (now > peak && !c->peak.compare_exchange_weak(peak, now)) {
                }
                c->total.fetch_add(1);
                // Now and then give the core away while holding a unit, so that holders overlap
                // even when the processes share few cores (a loaded CI machine).
                if (i % 64 == 0) std::this_thread::yield();
                c->inside.fetch_sub(1);
                sem.release();
            }
            return 0;
        }));
    }
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    CHECK(c->peak.load() <= static_cast<int>(kCapacity));
    CHECK(c->peak.load() >= 2);  // there was contention to bound
    CHECK(c->total.load() > kProcs * kIters / 2);
    CHECK(sem.in_use() == 0);
    CHECK(sem.waiters() == 0);
}
