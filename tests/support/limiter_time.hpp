// A fixed clock for limiter tests: every expectation is exact when the test owns `now`.
#pragma once

#include <chrono>

#include "lim/clock.hpp"
#include "lim/segment.hpp"
#include "support/process.hpp"

namespace lim::test {

// The time base: 1,000 s after boot, so that times before it are still valid.
inline const TimePoint t0 = from_nanos(1'000'000'000'000);

// `seconds` after t0, to the nanosecond.
inline TimePoint at(double seconds) {
    return t0 + std::chrono::round<Duration>(std::chrono::duration<double>(seconds));
}

// A small segment for one test's limiters.
inline Segment limiter_segment(const SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 32, .max_processes = 64});
}

}  // namespace lim::test
