#include "sync/pacing.hpp"

#include <algorithm>
#include <cmath>

#include "shm/process_identity.hpp"
#include "sync/futex.hpp"

namespace lim::detail {
namespace {

// splitmix64: a per-thread generator for jitter. Quality matters little; independence between
// threads and processes does, hence the seed from thread id and time.
std::uint64_t next_random() noexcept {
    thread_local std::uint64_t state = 0;
    if (state == 0) {
        state = static_cast<std::uint64_t>(to_nanos(Clock::now())) ^
                (static_cast<std::uint64_t>(this_thread_id()) << 32) ^ 0x9E3779B97F4A7C15ULL;
    }
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double unit_random() noexcept {
    return static_cast<double>(next_random() >> 11) * 0x1.0p-53;  // [0, 1)
}

}  // namespace

Duration Pacing::interval(int attempt) const noexcept {
    const auto cap = static_cast<double>(max.count());
    double d = static_cast<double>(base.count()) * std::ldexp(1.0, std::min(attempt, 62));
    d = std::min(d, cap);
    if (jitter > 0) d *= 1.0 - jitter + unit_random() * jitter;
    d = std::clamp(d, 0.0, cap);
    return Duration{static_cast<Duration::rep>(d)};
}

void Pacing::pause(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                   std::optional<TimePoint> deadline, int attempt, std::uint32_t bitset) const {
    Duration d = interval(attempt);
    if (deadline) {
        const Duration left = *deadline - now();
        if (left <= Duration::zero()) return;
        d = std::min(d, left);
    }
    if (sleep && *sleep) {
        (*sleep)(d);
        return;
    }
    // The futex takes an absolute CLOCK_MONOTONIC deadline; the pacing's own clock may be
    // injected, so only the length of the wait carries over.
    futex_wait(word, expected, Clock::now() + d, bitset);
}

}  // namespace lim::detail
