// Slot claiming and freeing racing a reaper: threads that come and go (each claims a slot, locks
// its byte, frees it, unlocks) while another process reaps in a loop. The reaper must never judge
// a live holder dead: nothing is ever returned, and the counts stay exact. With LIM_RACE_WIDEN
// the windows between lock and claim and between free and unlock are widened.
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "lim/lim.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

TEST_CASE(
    "threads claiming and freeing slots while another process reaps: nothing live is reaped") {
    lim::test::SegmentGuard guard(lim::test::unique_name("claim-race"));
    auto seg = Segment::open_or_create(
        guard.name(),
        {.max_limiters = 4, .max_processes = 64, .reap_after = 0s, .reap_on_attach = false});
    auto sem = Semaphore::open(seg, "db", {.capacity = 1000});
    sem.acquire(5);  // held by the test process throughout
    auto* stop = lim::test::shared_array<std::atomic<int>>(1);
    auto* wrong = lim::test::shared_array<std::atomic<int>>(1);
    stop->store(0);
    wrong->store(0);

    const pid_t reaper = lim::test::fork_child([&] {
        while (stop->load() == 0) {
            for (const auto& p : seg.reap().reaped) {
                if (!p.returned.empty()) wrong->fetch_add(1);
            }
        }
        return 0;
    });
    std::vector<pid_t> workers;
    for (int w = 0; w < 3; ++w) {
        workers.push_back(lim::test::fork_child([&] {
            for (int round = 0; round < 40; ++round) {
                std::vector<std::thread> threads;
                for (int t = 0; t < 4; ++t) {
                    threads.emplace_back([&] {
                        sem.acquire(2);
                        if (sem.in_use() < 2) wrong->fetch_add(1);
                        sem.release(2);
                    });
                }
                for (auto& t : threads)
                    t.join();
            }
            return 0;
        }));
    }
    for (const pid_t pid : workers)
        CHECK(lim::test::wait_child(pid) == 0);
    stop->store(1);
    CHECK(lim::test::wait_child(reaper) == 0);
    CHECK(wrong->load() == 0);
    CHECK(sem.in_use() == 5);  // exactly what the live test process holds
    for (const auto& p : seg.reap().reaped)
        CHECK(p.returned.empty());
    CHECK(sem.in_use() == 5);
    sem.release(5);
}
