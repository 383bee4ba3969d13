// A fixed clock for limiter tests: every expectation is exact when the test owns `now`.
#pragma once

#include <chrono>

#include "lim/clock.hpp"
#include "lim/segment.hpp"
#include "support/process.hpp"

namespace lim::test {

// The time base: 100,000 s before the test started (it may be before boot: a negative
// CLOCK_MONOTONIC reading is still a valid `now`). A limiter clamps a `now` more than a few
// milliseconds ahead of the real clock (docs/design.md, "Time"), so a test's times must lie in
// the past: at(x) for any x below 100,000 does.
inline const TimePoint t0 = Clock::now() - std::chrono::seconds{100'000};

// `seconds` after t0, to the nanosecond.
inline TimePoint at(double seconds) {
    return t0 + std::chrono::round<Duration>(std::chrono::duration<double>(seconds));
}

// A small segment for one test's limiters.
inline Segment limiter_segment(const SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 32, .max_processes = 64});
}

}  // namespace lim::test
