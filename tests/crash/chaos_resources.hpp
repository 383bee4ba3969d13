// The limiters the chaos test hammers, behind one small interface: acquire something, release it,
// and read the shared counters the reaper recounts. Each worker process holds at most one thing
// at a time, so a resource keeps what its process holds (a Dispatch Permit) in itself: every
// forked worker has its own copy of the object.
#pragma once

#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "lim/lim.hpp"

namespace lim::test::chaos {

inline constexpr int kMaxResources = 8;
inline constexpr int kCounters = 3;  // per resource: e.g. a Dispatch's slots, throttled, bytes
using Amounts = std::array<std::int64_t, kCounters>;

struct Resource {
    std::string name;
    int slot = 0;  // which Cell::held row the workers publish into
    virtual ~Resource() = default;
    // Takes something, or returns nullopt if `deadline` passed first.
    virtual std::optional<Amounts> acquire(std::mt19937& rng, TimePoint deadline) = 0;
    virtual void release(const Amounts& amounts) = 0;
    // The shared counters the reaper recounts, in the units acquire reports.
    virtual Amounts in_use() const = 0;
    virtual void check_invariants() const {}
    // Called now and then by the test's own process: flip whatever mode the resource has.
    virtual void churn(std::mt19937&) {}
};

struct SemaphoreResource : Resource {
    Semaphore sem;
    explicit SemaphoreResource(const Segment& seg)
        : sem(Semaphore::open(seg, "chaos-sem", {.capacity = 4})) {
        name = "semaphore";
    }
    std::optional<Amounts> acquire(std::mt19937& rng, TimePoint deadline) override {
        const std::uint64_t n = 1 + rng() % 2;
        if (!sem.acquire_until(n, deadline)) return std::nullopt;
        return Amounts{static_cast<std::int64_t>(n), 0, 0};
    }
    void release(const Amounts& a) override { sem.release(static_cast<std::uint64_t>(a[0])); }
    Amounts in_use() const override { return {static_cast<std::int64_t>(sem.in_use()), 0, 0}; }
    void check_invariants() const override { CHECK(sem.in_use() <= sem.capacity()); }
};

struct WeightedResource : Resource {
    WeightedSemaphore ws;
    explicit WeightedResource(const Segment& seg)
        : ws(WeightedSemaphore::open(seg, "chaos-bytes", {.capacity = 1000})) {
        name = "weighted_semaphore";
    }
    std::optional<Amounts> acquire(std::mt19937& rng, TimePoint deadline) override {
        const std::uint64_t n = 1 + rng() % 600;
        if (!ws.acquire_until(n, deadline)) return std::nullopt;
        return Amounts{static_cast<std::int64_t>(n), 0, 0};
    }
    void release(const Amounts& a) override { ws.release(static_cast<std::uint64_t>(a[0])); }
    Amounts in_use() const override { return {static_cast<std::int64_t>(ws.in_use()), 0, 0}; }
    void check_invariants() const override { CHECK(ws.in_use() <= ws.capacity()); }
};

struct DispatchResource : Resource {
    Dispatch d;
    std::optional<Permit> permit;  // this process's
    explicit DispatchResource(const Segment& seg)
        : d(Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "chaos-api"),
                                 .key = "chaos-api",
                                 .concurrency = 4,
                                 .throttled_concurrency = 2,
                                 .byte_budget = 1000,
                                 .backoff_window = std::chrono::milliseconds{2},
                                 .byte_penalty_multiplier = 3})) {
        name = "dispatch";
    }
    std::optional<Amounts> acquire(std::mt19937& rng, TimePoint deadline) override {
        permit = d.acquire_until(1 + rng() % 300, deadline);
        if (!permit) return std::nullopt;
        return Amounts{1, permit->throttled() ? 1 : 0, static_cast<std::int64_t>(permit->bytes())};
    }
    void release(const Amounts&) override { permit.reset(); }
    Amounts in_use() const override {
        const DispatchSnapshot s = d.snapshot();
        return {static_cast<std::int64_t>(s.in_flight),
                static_cast<std::int64_t>(s.throttled_in_flight),
                static_cast<std::int64_t>(s.bytes_in_flight)};
    }
    void check_invariants() const override {
        const DispatchSnapshot s = d.snapshot();
        CHECK(s.in_flight <= s.concurrency);
        CHECK(s.throttled_in_flight <= s.throttled_concurrency);
        CHECK(s.bytes_in_flight <= s.byte_budget);
    }
    void churn(std::mt19937& rng) override {
        if (rng() % 4 == 0) d.set_backoff(std::chrono::milliseconds{1 + rng() % 5});
    }
};

// Jane Street's ThrottledRateLimiter: jobs are tokens in flight; what the system holds (bucket +
// hopper + in flight) must stay exactly max_concurrent_jobs however many holders die.
struct LimiterResource : Resource {
    ThrottledRateLimiter trl;
    explicit LimiterResource(const Segment& seg)
        : trl(ThrottledRateLimiter::open(
              seg, "chaos-jobs",
              {.burst_size = 3, .sustained_rate_per_sec = 5000, .max_concurrent_jobs = 4})) {
        name = "throttled_rate_limiter";
    }
    std::optional<Amounts> acquire(std::mt19937&, TimePoint deadline) override {
        if (!trl.start_job_until(deadline)) return std::nullopt;
        return Amounts{kTokenResolution, 0, 0};  // one token, in units
    }
    void release(const Amounts&) override { trl.finish_job(); }
    Amounts in_use() const override {
        return {static_cast<std::int64_t>(trl.in_flight() * kTokenResolution + 0.5), 0, 0};
    }
    void check_invariants() const override {
        CHECK(trl.in_flight() <= 4.0);
        CHECK(trl.in_system().value() == doctest::Approx(4.0));
    }
};

inline std::vector<std::unique_ptr<Resource>> make_resources(const Segment& seg) {
    std::vector<std::unique_ptr<Resource>> r;
    r.push_back(std::make_unique<SemaphoreResource>(seg));
    r.push_back(std::make_unique<WeightedResource>(seg));
    r.push_back(std::make_unique<DispatchResource>(seg));
    r.push_back(std::make_unique<LimiterResource>(seg));
    for (std::size_t i = 0; i < r.size(); ++i)
        r[i]->slot = static_cast<int>(i);
    return r;
}

}  // namespace lim::test::chaos
