// A generic Limiter taken from and returned to by 7 forked processes while an 8th keeps
// reconfiguring it (target level, bucket size, rate finite and infinite): the tokens held,
// counted independently, never exceed the largest target, every reconfiguration leaves a
// consistent state, and once all is returned the system holds the final target.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "lim/limiter.hpp"
#include "support/admissions.hpp"
#include "support/process.hpp"

using namespace lim;

TEST_CASE("7 takers and a reconfiguring process: never more than the target in flight") {
    constexpr int kTakers = 7;
    constexpr int kIterations = 175'000;
    lim::test::SegmentGuard guard(lim::test::unique_name("mp-reconf"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto l = Limiter::open(seg, "raw",
                           {.hopper_to_bucket_rate_per_sec = 50'000.0,
                            .bucket_size = 4,
                            .initial_bucket_level = 4,
                            .initial_hopper_level = 4.0});
    struct Counters {
        lim::test::PeakCounter held;  // units held by the takers, counted by the takers
        std::atomic<long> ops{0};
        std::atomic<long> switches{0};
        std::atomic<int> done{0};
    };
    auto* c = new (lim::test::shared_array<Counters>(1)) Counters{};
    std::vector<pid_t> kids;
    for (int p = 0; p < kTakers; ++p) {
        kids.push_back(lim::test::fork_child([&, p] {
            const double amounts[] = {0.5, 1.0, 2.0};
            long ops = 0;
            for (int i = 0; i < kIterations; ++i) {
                const double n = amounts[(i + p) % 3];
                ++ops;
                if (l.try_take(n) != TryTake::taken) continue;
                const long units = static_cast<long>(n * 10'000);
                c->held.enter(units);
                // Now and then hold the tokens a while, so that what is in flight approaches
                // the target.
                if (i % 16 == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
                c->held.leave(units);
                l.return_to_hopper(n);
                ++ops;
            }
            c->ops.fetch_add(ops);
            c->done.fetch_add(1);
            return 0;
        }));
    }
    kids.push_back(lim::test::fork_child([&] {
        // Targets at most 8; sizes and rates from a fixed cycle.
        const double targets[] = {4, 8, 6, 2, 8};
        const double sizes[] = {2, 4, 6, 3};
        const InfiniteOrFinite<double> rates[] = {50'000.0, infinite, 20'000.0, 1e6};
        long i = 0;
        while (c->done.load() < kTakers) {
            l.set_token_target_level(targets[i % 5]);
            l.set_bucket_size(sizes[i % 4]);
            l.set_hopper_to_bucket_rate_per_sec(rates[i % 4]);
            l.invariant();
            ++i;
        }
        l.set_token_target_level(8.0);
        c->switches.store(3 * i);
        return 0;
    }));
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    MESSAGE(c->ops.load() << " operations, " << c->switches.load()
                          << " reconfigurations, peak held " << c->held.peak.load() << " units");
    CHECK(c->ops.load() >= 1'000'000);
    CHECK(c->switches.load() >= 30);  // reconfigured throughout, not once
    CHECK(c->held.peak.load() <= 8 * 10'000);
    CHECK(c->held.peak.load() >= 4 * 10'000);
    CHECK(l.in_flight() == 0);
    CHECK(l.in_system().value() == 8);
    CHECK(l.token_target_level().value() == 8);
    l.invariant();
}
