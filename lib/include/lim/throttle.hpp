// lim/throttle.hpp: at most `max_concurrent_jobs` jobs at once, across every process attached to
// a segment.
//
// Jane Street's Throttle: a Limiter with an infinite rate holding `max_concurrent_jobs` tokens.
// A job calls try_start_job (`start` or `max_concurrent_jobs_running`) or start_job before it
// begins and finish_job exactly once when it is done (lim::JobLimiterFacade); a job that never
// finishes keeps its token, and the process's death gives it back at the next reap.
//
// Starting and finishing a job are each one compare-and-swap on the segment (a counting
// semaphore's cost); finish_job makes a system call only when someone sleeps in start_job.
#pragma once

#include <cstdint>
#include <string_view>

#include "lim/limiter.hpp"

namespace lim {

struct ThrottleOptions {
    // Jobs that may run at once: 1..1e9.
    std::int64_t max_concurrent_jobs = 1;
};

class Throttle : public JobLimiterFacade {
  public:
    // Opens the throttle `key` in `segment`, creating it if it does not exist. Throws Error:
    // invalid_argument (max_concurrent_jobs < 1; nothing is created), invalid_name,
    // config_mismatch (the key exists with another maximum, or is another kind of limiter),
    // table_full, permission_denied.
    static Throttle open(const Segment& segment, std::string_view key,
                         const ThrottleOptions& options, TimePoint now = Clock::now());
    // As above, but attaches to an existing key as it is.
    static Throttle open(const Segment& segment, std::string_view key,
                         const ThrottleOptions& options, AdoptExisting,
                         TimePoint now = Clock::now());

  private:
    explicit Throttle(Limiter limiter) : JobLimiterFacade(std::move(limiter)) {}
};

}  // namespace lim
