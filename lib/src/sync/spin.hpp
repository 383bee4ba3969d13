// A bounded busy-wait for a blocking acquire that expects the units back within a hold time.
//
// Sleeping on a futex costs a context switch on each side (the sleeper's, and the waker's system
// call), several microseconds, and on a machine whose cores are all busy the woken process then
// waits for a CPU. When a unit is held for a few hundred nanoseconds by a process that is running,
// re-reading the word for about as long is cheaper. The spin is bounded in time, reads only (no
// store to the shared line, so the holder's release is not slowed), and is the caller's to skip
// when spinning cannot pay (others already asleep ahead of it: it would only barge past them).
#pragma once

#include <atomic>
#include <cstdint>

#include "lim/clock.hpp"

namespace lim::detail {

// One relaxation of a spin loop: x86 `pause`, aarch64 `yield`, else nothing.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield" ::: "memory");
#endif
}

// How long a registered sleeper re-reads the word before it sleeps on the futex.
inline constexpr Duration kSpinLimit = std::chrono::microseconds{2};

// Re-reads `word` (relaxed loads; the caller's CAS orders what it then does) until `done(w)`
// returns true for the value read, or `limit` has passed. Returns the last value read, which the
// caller re-checks with `done` (the clock is read every 16 relaxations only).
template <class Done>
std::uint64_t spin_while_not(const std::atomic<std::uint64_t>& word, Duration limit,
                             Done&& done) noexcept {
    const TimePoint end = Clock::now() + limit;
    for (unsigned i = 1;; ++i) {
        cpu_relax();
        const std::uint64_t w = word.load(std::memory_order_relaxed);
        if (done(w)) return w;
        if ((i & 15U) == 0 && Clock::now() >= end) return w;
    }
}

}  // namespace lim::detail
