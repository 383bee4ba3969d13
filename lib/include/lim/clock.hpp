// lim/clock.hpp: the one clock every process on a host agrees on.
//
// lim measures time with CLOCK_MONOTONIC: it never jumps with the wall clock, and every process
// on a host reads the same value at the same instant, so a time written into the segment by one
// process means the same to all others. (The TSC is not used: it is not guaranteed to agree
// across cores, and the wall clock can step backwards.)
//
// Every limiter call whose outcome depends on time has an overload taking `TimePoint now`, so
// tests and simulations own the clock; the overload without it reads `Clock::now()`.
#pragma once

#include <chrono>
#include <cstdint>

namespace lim {

struct Clock {
    using rep = std::int64_t;
    using period = std::nano;
    using duration = std::chrono::nanoseconds;
    using time_point = std::chrono::time_point<Clock, duration>;
    static constexpr bool is_steady = true;

    // Reads CLOCK_MONOTONIC. Never fails on Linux; a vDSO call, not a system call.
    static time_point now() noexcept;
};

using TimePoint = Clock::time_point;
using Duration = Clock::duration;

// Nanoseconds since the clock's epoch (boot, for CLOCK_MONOTONIC): the form times take in the
// segment, where only integers live.
constexpr std::int64_t to_nanos(TimePoint t) noexcept {
    return t.time_since_epoch().count();
}
constexpr TimePoint from_nanos(std::int64_t ns) noexcept {
    return TimePoint{Duration{ns}};
}

}  // namespace lim
