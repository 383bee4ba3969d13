// The limiters the chaos test hammers, behind one small interface: acquire some amount (in the
// unit the limiter's counter uses), release it, read the counter, check invariants.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lim/lim.hpp"

namespace lim::test::chaos {

inline constexpr int kMaxResources = 8;

struct Resource {
    std::string name;
    int slot = 0;  // which Cell::held counter the workers publish into
    virtual ~Resource() = default;
    // Takes some amount, or returns 0 if `deadline` passed first.
    virtual std::int64_t acquire(std::mt19937& rng, TimePoint deadline) = 0;
    virtual void release(std::int64_t amount) = 0;
    // The shared counter the reaper recounts, in the unit acquire returns.
    virtual std::int64_t in_use() const = 0;
    virtual void check_invariants() const {}
};

struct SemaphoreResource : Resource {
    Semaphore sem;
    explicit SemaphoreResource(const Segment& seg)
        : sem(Semaphore::open(seg, "chaos-sem", {.capacity = 4})) {
        name = "semaphore";
    }
    std::int64_t acquire(std::mt19937& rng, TimePoint deadline) override {
        const std::uint64_t n = 1 + rng() % 2;
        return sem.acquire_until(n, deadline) ? static_cast<std::int64_t>(n) : 0;
    }
    void release(std::int64_t amount) override { sem.release(static_cast<std::uint64_t>(amount)); }
    std::int64_t in_use() const override { return static_cast<std::int64_t>(sem.in_use()); }
    void check_invariants() const override { CHECK(sem.in_use() <= sem.capacity()); }
};

inline std::vector<std::unique_ptr<Resource>> make_resources(const Segment& seg) {
    std::vector<std::unique_ptr<Resource>> r;
    r.push_back(std::make_unique<SemaphoreResource>(seg));
    for (std::size_t i = 0; i < r.size(); ++i)
        r[i]->slot = static_cast<int>(i);
    return r;
}

}  // namespace lim::test::chaos
