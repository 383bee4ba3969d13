// lim/throttled_rate_limiter.hpp: a token bucket and a throttle at once, across every process
// attached to a segment.
//
// Jane Street's Throttled_rate_limiter: jobs start at most at `sustained_rate_per_sec` (with
// bursts of `burst_size`), and at most `max_concurrent_jobs` run at once. A Limiter whose
// bucket of `burst_size` refills at the rate, with `max_concurrent_jobs` tokens in the system,
// starting with min(burst_size, max_concurrent_jobs) in the bucket and the rest in the hopper.
// Each job takes one token (lim::JobLimiterFacade); finish_job returns it to the hopper, from
// which it drips back into the bucket at the rate. Each started job must be finished once.
//
// Starting a job is two compare-and-swaps on one cache line of the segment, finishing it at
// most two; no lock, and a system call only when someone sleeps in start_job.
#pragma once

#include <cstdint>
#include <string_view>

#include "lim/limiter.hpp"

namespace lim {

struct ThrottledRateLimiterOptions {
    // The most jobs that may start at once after a quiet period: 1..1e9.
    double burst_size = 1;
    // Jobs per second in the long run: 0..1e9.
    double sustained_rate_per_sec = 0;
    // Jobs that may run at once: 1..1e9.
    std::int64_t max_concurrent_jobs = 1;
};

class ThrottledRateLimiter : public JobLimiterFacade {
  public:
    // Opens `key` in `segment`, creating it at `now` (from which the refill is counted) if it
    // does not exist. Throws Error: invalid_argument (burst_size < 1, a negative or NaN rate,
    // max_concurrent_jobs < 1; nothing is created), invalid_name, config_mismatch, table_full,
    // permission_denied.
    static ThrottledRateLimiter open(const Segment& segment, std::string_view key,
                                     const ThrottledRateLimiterOptions& options,
                                     TimePoint now = Clock::now());
    // As above, but attaches to an existing key as it is.
    static ThrottledRateLimiter open(const Segment& segment, std::string_view key,
                                     const ThrottledRateLimiterOptions& options, AdoptExisting,
                                     TimePoint now = Clock::now());

    double burst_size() const noexcept { return limiter_.bucket_size(); }
    double sustained_rate_per_sec() const noexcept {
        return limiter_.hopper_to_bucket_rate_per_sec().value_or(0.0);
    }

  private:
    explicit ThrottledRateLimiter(Limiter limiter) : JobLimiterFacade(std::move(limiter)) {}
};

}  // namespace lim
