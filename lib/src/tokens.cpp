#include "lim/tokens.hpp"

#include <fmt/format.h>

#include <cmath>

#include "lim/error.hpp"

namespace lim {
namespace {

constexpr double kResolution = static_cast<double>(kTokenResolution);
// Below 2^53 every whole number of units is an exact double, and k / 10^4 (an IEEE division, so
// correctly rounded) is the double nearest to the decimal amount of k units.
constexpr double kExactUnits = 0x1p53;

// The double nearest to k units' decimal value (`k` below 2^53 in magnitude).
double decimal_of(std::int64_t k) noexcept {
    return static_cast<double>(k) / kResolution;
}

}  // namespace

Tokens Tokens::round_up(double amount) {
    // 2^63 units is ~9.22e14 tokens; stay clear of it so that sums of two amounts cannot wrap.
    constexpr double kMaxTokens = 4.6e14;
    if (!std::isfinite(amount) || std::abs(amount) > kMaxTokens) {
        throw Error(Errc::invalid_argument,
                    fmt::format("token amount {} is not a finite number within +-{:g}", amount,
                                kMaxTokens));
    }
    // A first guess from the rounded product; it is off by at most one unit either way.
    const double scaled = amount * kResolution;
    auto k = static_cast<std::int64_t>(std::ceil(scaled));
    if (std::abs(scaled) < kExactUnits) {
        // The answer is the smallest k whose decimal value k / 10^4, as a double, is not below
        // `amount`. So 1.1 (the double 1.100000000000000088...) is 11,000 units: the amount
        // 1.1000 is that same double. And 100000.00005 (not a double of any whole number of
        // units) rounds up to 1,000,000,001 units, never down. Exact: no tolerance involved.
        while (decimal_of(k) < amount)
            ++k;
        while (decimal_of(k - 1) >= amount)
            --k;
        return Tokens::from_units(k);
    }
    // Beyond 2^53 units doubles are whole numbers of units apart or more: round the exact
    // binary product up (the rounding error of `scaled`, computed exactly by fma, says which
    // side of it the amount lies).
    // `scaled` is then a whole number, and scaled + error the exact product.
    const double error = std::fma(amount, kResolution, -scaled);
    return Tokens::from_units(k + static_cast<std::int64_t>(std::ceil(error)));
}

namespace detail {
void throw_infinite_has_no_value() {
    throw Error(Errc::invalid_argument, "value() called on an infinite quantity");
}
}  // namespace detail

}  // namespace lim
