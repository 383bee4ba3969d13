// What the facades (TokenBucket, Throttle, ThrottledRateLimiter) need from the Limiter they are
// built on: opening a record of their flavor.
#pragma once

#include <string_view>

#include "lim/limiter.hpp"
#include "limiter/limiter_state.hpp"

namespace lim::detail {

struct LimiterAccess {
    static Limiter make(RecordRef ref) { return Limiter(std::move(ref)); }
    static const RecordRef& ref(const Limiter& limiter) noexcept { return limiter.ref_; }
};

// Opens the limiter record `key` of `flavor`, creating it with `config` at `now` if absent.
// `what` names the family in messages ("token bucket"). Validates `config` first (nothing is
// created when it is refused).
// `extra_flags` (kConsumed) is added to the record's configuration when it is created.
Limiter open_limiter(const Segment& segment, std::string_view what, std::string_view key,
                     const LimiterConfig& config, LimiterFlavor flavor, bool adopt, TimePoint now,
                     std::uint32_t extra_flags = 0);

// The take and the return behind the public overloads, on `units` (> 0) already checked:
// `now_ns` bounded (bounded_now_ns), or kClockUnread for the overloads without a time (the
// operation reads the clock only if its outcome depends on it). The infinite-rate fast paths
// first (LimiterCore::try_take_infinite, return_infinite), then the general operation.
// return_units throws Error(over_release) naming `n` as try_take's callers do.
// `how`: whether a re-anchor of the drip that cannot be skipped may wait for the config lock
// (LimiterCore::rebase_hard); try_* calls pass the default (never: Error(busy)).
TryTake take_units(const RecordRef& ref, std::int64_t now_ns, std::int64_t units,
                   const RebaseWait& how = {});
// The same for a blocking take's re-checks: a consumed record's refusal is not counted again
// (LimiterBody::refused: the take's first attempt, by take_units, counted it once).
TryTake retake_units(const RecordRef& ref, std::int64_t now_ns, std::int64_t units,
                     const RebaseWait& how);
void return_units(const RecordRef& ref, std::int64_t now_ns, double n, std::int64_t units);

// A token amount that is not a whole number of tokens, or is out of range: checked (throws
// Error(invalid_argument) naming the limiter and `op`) and rounded up exactly.
[[gnu::noinline, gnu::cold]] std::int64_t amount_units_slow(const RecordRef& ref,
                                                            std::string_view op, double n);

// A token amount passed to an operation, in units (rounded up).
inline std::int64_t amount_units(const RecordRef& ref, std::string_view op, double n) {
    // Most amounts are whole tokens: no rounding to do. (The comparison is false for NaN, so the
    // conversion below only sees numbers in range.) Anything else is rounded up exactly by
    // Tokens::round_up (a product n x 10^4 that happens to round to a whole number is no proof
    // that n is a whole number of units).
    if (n >= 0 && n <= kMaxTokens) {
        const auto whole = static_cast<std::int64_t>(n);
        if (static_cast<double>(whole) == n) return whole * kTokenResolution;
    }
    return amount_units_slow(ref, op, n);
}

// Throws Error(invalid_argument): "<what> '<key>': <field> is <value>; it must be <rule>".
[[noreturn]] void throw_bad_parameter(std::string_view what, std::string_view key,
                                      std::string_view field, double value, std::string_view rule);

}  // namespace lim::detail
