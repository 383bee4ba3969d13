#include "lim/tokens.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "lim/error.hpp"

namespace lim {

Tokens Tokens::round_up(double amount) {
    // 2^63 units is ~9.22e14 tokens; stay clear of it so that sums of two amounts cannot wrap.
    constexpr double kMaxTokens = 4.6e14;
    if (!std::isfinite(amount) || std::abs(amount) > kMaxTokens) {
        throw Error(Errc::invalid_argument,
                    fmt::format("token amount {} is not a finite number within +-{:g}", amount,
                                kMaxTokens));
    }
    const double scaled = amount * static_cast<double>(kTokenResolution);
    const double nearest = std::nearbyint(scaled);
    // Decimal amounts such as 1.1 do not scale to an exact integer in binary floating point; a
    // value within a few ulps of a whole piece is that piece, not the next one up.
    const double tolerance = 1e-9 * std::max(1.0, std::abs(scaled));
    const double units = std::abs(scaled - nearest) <= tolerance ? nearest : std::ceil(scaled);
    return Tokens::from_units(static_cast<std::int64_t>(units));
}

namespace detail {
void throw_infinite_has_no_value() {
    throw Error(Errc::invalid_argument, "value() called on an infinite quantity");
}
}  // namespace detail

}  // namespace lim
