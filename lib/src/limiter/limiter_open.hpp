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

// Throws Error(invalid_argument): "<what> '<key>': <field> is <value>; it must be <rule>".
[[noreturn]] void throw_bad_parameter(std::string_view what, std::string_view key,
                                      std::string_view field, double value, std::string_view rule);

}  // namespace lim::detail
