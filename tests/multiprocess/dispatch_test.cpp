// One Dispatch hammered by forked workers while another process switches backoff on and off.
// Counters kept independently of lim, in MAP_SHARED memory, show that no layer is ever exceeded
// and that every permit comes back.
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/segment.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

struct Counters {
    std::atomic<long> in_flight;
    std::atomic<long> throttled;  // permits taken while backoff was active, in flight now
    std::atomic<long> bytes;      // as charged
    std::atomic<long> peak_in_flight;
    std::atomic<long> peak_throttled;
    std::atomic<long> peak_bytes;
    std::atomic<long> permits;
    std::atomic<long> throttled_permits;
    std::atomic<int> workers_done;
};

void raise(std::atomic<long>& peak, long v) {
    long p = peak.load();
    while (v > p && !peak.compare_exchange_weak(p, v)) {
    }
}

}  // namespace

TEST_CASE("8 workers x 12,500 permits with backoff toggling: no layer is ever exceeded") {
    constexpr int kWorkers = 8;
    constexpr int kPermitsEach = 12'500;  // 100,000 in all
    constexpr std::uint64_t kConcurrency = 6;
    constexpr std::uint64_t kThrottled = 2;
    constexpr std::uint64_t kBudget = 20'000;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-dispatch"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
    auto window = BackoffWindow::for_key(seg, "api");
    auto d = Dispatch::open(seg, {.limiter = window,
                                  .key = "api",
                                  .concurrency = kConcurrency,
                                  .throttled_concurrency = kThrottled,
                                  .byte_budget = kBudget,
                                  .backoff_window = 300us,
                                  .byte_penalty_multiplier = 4});
    auto* c = lim::test::shared_array<Counters>(1);
    new (c) Counters{};

    std::vector<pid_t> kids;
    for (int w = 0; w < kWorkers; ++w) {
        kids.push_back(lim::test::fork_child([&, w] {
            std::mt19937 rng(static_cast<unsigned>(w * 7919 + 1));
            std::uniform_int_distribution<std::uint64_t> size(0, 3000);
            long done = 0;
            const auto hold = [&](const Permit& p) {
                const auto b = static_cast<long>(p.bytes());
                raise(c->peak_in_flight, c->in_flight.fetch_add(1) + 1);
                raise(c->peak_bytes, c->bytes.fetch_add(b) + b);
                if (p.throttled()) {
                    raise(c->peak_throttled, c->throttled.fetch_add(1) + 1);
                    c->throttled_permits.fetch_add(1);
                }
                if (done % 64 == 0) std::this_thread::yield();  // let others overlap
                if (p.throttled()) c->throttled.fetch_sub(1);
                c->bytes.fetch_sub(b);
                c->in_flight.fetch_sub(1);
                c->permits.fetch_add(1);
                ++done;
            };
            while (done < kPermitsEach) {
                const std::uint64_t n = size(rng);
                switch (done % 4) {
                    case 0:
                        if (auto p = d.try_acquire(n)) {
                            hold(*p);
                        } else {
                            std::this_thread::yield();
                        }
                        break;
                    case 1:
                        if (auto p = d.acquire_until(n, Clock::now() + 2ms)) hold(*p);
                        break;
                    case 2:
                        if (auto p = d.acquire_until(n, Clock::now() + 1s)) hold(*p);
                        break;
                    default:
                        hold(d.acquire(n));
                        break;
                }
            }
            c->workers_done.fetch_add(1);
            return 0;
        }));
    }
    // The toggler: backoff on for a moment, then off, until the workers finish.
    const pid_t toggler = lim::test::fork_child([&] {
        std::mt19937 rng(12345);
        std::uniform_int_distribution<int> us(100, 2000);
        while (c->workers_done.load() < kWorkers) {
            d.set_backoff(std::chrono::microseconds{us(rng)});
            std::this_thread::sleep_for(std::chrono::microseconds{us(rng)});
            window.clear();
            std::this_thread::sleep_for(std::chrono::microseconds{us(rng)});
        }
        return 0;
    });
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    CHECK(lim::test::wait_child(toggler) == 0);

    CHECK(c->permits.load() >= kWorkers * kPermitsEach);
    CHECK(c->peak_in_flight.load() <= static_cast<long>(kConcurrency));
    CHECK(c->peak_throttled.load() <= static_cast<long>(kThrottled));
    CHECK(c->peak_bytes.load() <= static_cast<long>(kBudget));
    // Both regimes happened, so both bounds were exercised.
    CHECK(c->throttled_permits.load() > 0);
    CHECK(c->throttled_permits.load() < c->permits.load());
    CHECK(c->peak_in_flight.load() >= 2);
    // Every counter is back to zero, in lim and outside it.
    CHECK(c->in_flight.load() == 0);
    CHECK(c->throttled.load() == 0);
    CHECK(c->bytes.load() == 0);
    const DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 0);
    CHECK(s.throttled_in_flight == 0);
    CHECK(s.bytes_in_flight == 0);
    CHECK(s.waiters == 0);
    MESSAGE("permits: " << c->permits.load() << ", under backoff: " << c->throttled_permits.load()
                        << ", peaks: " << c->peak_in_flight.load() << " in flight, "
                        << c->peak_throttled.load() << " throttled, " << c->peak_bytes.load()
                        << " bytes");
}

// The one-CAS permit's CAS starts from this thread's last value of the word (a guess, not a
// load: docs/design.md, "The uncontended path"). Another process changes the word between two of
// this thread's permits: a guess that says "room" must not admit into a full Dispatch, and one
// that says "full" must not refuse when there is room.
TEST_CASE("a stale first guess of the packed word neither over-admits nor refuses spuriously") {
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-dispatch-guess"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 16});
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 2,
                                  .byte_budget = 1'000});
    auto* took = lim::test::make_flag();
    auto* release = lim::test::make_flag();
    auto* released = lim::test::make_flag();

    // Guess "0 in flight" (this thread's last give), word full (a child holds both slots).
    REQUIRE(d.try_acquire(10).has_value());  // taken and given back: the guess is the empty word
    pid_t child = lim::test::fork_child([&] {
        auto a = d.try_acquire(10);
        auto b = d.try_acquire(10);
        if (!a || !b) return 1;
        took->set();
        release->wait();
        return 0;
    });
    took->wait();
    CHECK_FALSE(d.try_acquire(10).has_value());
    CHECK(d.snapshot().in_flight == 2);
    release->set();
    CHECK(lim::test::wait_child(child) == 0);
    CHECK(d.snapshot().in_flight == 0);

    // Guess "2 in flight" (this thread's own take filled the Dispatch), then the child gives its
    // slot back: there is room again, and the guess says there is none.
    took->value.store(0);
    release->value.store(0);
    child = lim::test::fork_child([&] {
        auto a = d.try_acquire(10);
        if (!a) return 1;
        took->set();
        release->wait();
        a.reset();
        released->set();
        for (;;)
            pause();  // keeps the process (and its slot) alive until killed
    });
    took->wait();
    auto mine = d.try_acquire(10);  // the guess is now "2 in flight, 20 bytes"
    REQUIRE(mine.has_value());
    release->set();
    released->wait();
    auto again = d.try_acquire(10);
    CHECK(again.has_value());
    CHECK(d.snapshot().in_flight == 2);
    CHECK(d.snapshot().bytes_in_flight == 20);
    again.reset();
    mine.reset();
    CHECK(d.snapshot().in_flight == 0);
    lim::test::kill_and_wait(child);
}
