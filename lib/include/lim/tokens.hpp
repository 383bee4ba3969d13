// lim/tokens.hpp: fixed-point tokens, and quantities that may be infinite.
//
// Tokens are divisible into 10,000 pieces (Jane Street's Limiter does the same). In the segment a
// token amount is a signed 64-bit count of pieces ("units"), so shared counters stay integers,
// atomics stay exact, and no process can disagree with another about rounding. The API takes
// and returns `double` tokens; amounts passed in are rounded *up* to the next piece, so a caller
// never takes less than it asked for.
#pragma once

#include <compare>
#include <cstdint>
#include <limits>

namespace lim {

// Pieces per token.
inline constexpr std::int64_t kTokenResolution = 10'000;

// A token amount in fixed point. Plain value type; arithmetic is on the integer units.
class Tokens {
  public:
    constexpr Tokens() noexcept = default;

    // The exact amount `units / kTokenResolution`.
    static constexpr Tokens from_units(std::int64_t units) noexcept { return Tokens{units}; }

    // `amount` rounded up to a whole piece, exactly: the smallest whole number of pieces whose
    // decimal value, as the nearest double, is not below `amount`. So a decimal literal means
    // what it says (1.1, the double 1.1000000000000000888, is 11,000 pieces: the amount 1.1000
    // is that same double), and an amount between two pieces always goes to the upper one
    // (100000.00005 is 1,000,000,001 pieces, never 1,000,000,000): a caller is never charged
    // less than it asked for. No tolerance is involved. Beyond 2^53 pieces (9e11 tokens), where
    // doubles are a piece apart or more, the exact binary value is rounded up.
    // Throws Error(invalid_argument) for NaN, infinities, and amounts beyond +-4.6e14 tokens
    // (half the range of 64-bit units).
    static Tokens round_up(double amount);

    constexpr std::int64_t units() const noexcept { return units_; }
    constexpr double to_double() const noexcept {
        return static_cast<double>(units_) / static_cast<double>(kTokenResolution);
    }

    friend constexpr bool operator==(Tokens, Tokens) noexcept = default;
    friend constexpr auto operator<=>(Tokens, Tokens) noexcept = default;
    friend constexpr Tokens operator+(Tokens a, Tokens b) noexcept {
        return Tokens{a.units_ + b.units_};
    }
    friend constexpr Tokens operator-(Tokens a, Tokens b) noexcept {
        return Tokens{a.units_ - b.units_};
    }

  private:
    constexpr explicit Tokens(std::int64_t units) noexcept : units_(units) {}
    std::int64_t units_ = 0;
};

// The tag for an unbounded quantity: an infinite hopper, an infinite fill rate.
struct Infinite {
    friend constexpr bool operator==(Infinite, Infinite) noexcept { return true; }
};
inline constexpr Infinite infinite{};

// A value that is either finite (a `T`) or `lim::infinite`, as Jane Street's
// `Infinite_or_finite.t`. Implicitly constructible from both, so option structs read naturally:
// `.initial_hopper_level = lim::infinite` or `.initial_hopper_level = 5.0`.
template <class T>
class InfiniteOrFinite {
  public:
    constexpr InfiniteOrFinite(Infinite) noexcept : infinite_(true) {}
    constexpr InfiniteOrFinite(T value) noexcept : value_(value) {}

    constexpr bool is_infinite() const noexcept { return infinite_; }
    constexpr bool is_finite() const noexcept { return !infinite_; }

    // The finite value. Throws Error(invalid_argument) when infinite.
    T value() const;

    // The finite value, or `fallback` when infinite.
    constexpr T value_or(T fallback) const noexcept { return infinite_ ? fallback : value_; }

    friend constexpr bool operator==(const InfiniteOrFinite& a,
                                     const InfiniteOrFinite& b) noexcept {
        return a.infinite_ == b.infinite_ && (a.infinite_ || a.value_ == b.value_);
    }

  private:
    T value_{};
    bool infinite_ = false;
};

namespace detail {
[[noreturn]] void throw_infinite_has_no_value();
}

template <class T>
T InfiniteOrFinite<T>::value() const {
    if (infinite_) detail::throw_infinite_has_no_value();
    return value_;
}

}  // namespace lim
