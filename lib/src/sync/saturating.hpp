// Saturating arithmetic on 64-bit counts and nanosecond times: a value read from the segment or
// from options (a deadline, a huge backoff_window, an injected clock) must never wrap a sum.
#pragma once

#include <cstdint>
#include <limits>

namespace lim::detail {

// a + b, held at the ends of int64 instead of wrapping.
constexpr std::int64_t saturating_add(std::int64_t a, std::int64_t b) noexcept {
    std::int64_t r = 0;
    if (!__builtin_add_overflow(a, b, &r)) return r;
    return b > 0 ? std::numeric_limits<std::int64_t>::max()
                 : std::numeric_limits<std::int64_t>::min();
}

// a - b, held at the ends of int64 instead of wrapping.
constexpr std::int64_t saturating_sub(std::int64_t a, std::int64_t b) noexcept {
    std::int64_t r = 0;
    if (!__builtin_sub_overflow(a, b, &r)) return r;
    return b < 0 ? std::numeric_limits<std::int64_t>::max()
                 : std::numeric_limits<std::int64_t>::min();
}

}  // namespace lim::detail
