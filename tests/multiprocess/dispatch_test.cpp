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
