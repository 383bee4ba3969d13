// lim/retry_after.hpp: how long a server asked us to wait, from its Retry-After header.
//
// RFC 9110 §10.2.3: Retry-After is either delta-seconds (a non-negative integer) or an
// HTTP-date. Three date formats are understood, as RFC 9110 §5.6.7 requires of recipients:
//
//     Sun, 06 Nov 1994 08:49:37 GMT    IMF-fixdate (what servers send today)
//     Sunday, 06-Nov-94 08:49:37 GMT   obsolete RFC 850 format (two-digit year)
//     Sun Nov  6 08:49:37 1994         ANSI C asctime() format
//
// Several APIs also send `retry-after-ms` (milliseconds, sometimes with a fraction); the
// header-list overload prefers it, as Foundation's parse_retry_after does.
//
// The results feed Dispatch::set_backoff / BackoffWindow::set:
//
//     d.set_backoff(lim::parse_retry_after(response.headers).value_or(1s));
#pragma once

#include <chrono>
#include <initializer_list>
#include <optional>
#include <ranges>
#include <string_view>
#include <tuple>
#include <utility>

namespace lim {

// Parses one Retry-After value (surrounding whitespace ignored). Returns the time to wait:
// delta-seconds as given (values beyond 2^31 s saturate there, as RFC 9111 §1.2.2 says of
// delta-seconds), an HTTP-date as its distance from `now` rounded up to a millisecond (saturating
// at 2^31 s likewise, for dates up to year 9999), and zero for a date in the past (any year).
// Returns nullopt for an empty value, a negative or fractional number, a date that does not exist
// (30 Feb, 25:00) or whose day name does not match it, and any other garbage. Never throws.
std::optional<std::chrono::milliseconds> parse_retry_after(
    std::string_view value,
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) noexcept;

// Parses a retry-after-ms value: a non-negative decimal number of milliseconds, a fraction
// rounded up. nullopt for garbage or a negative number. Never throws.
std::optional<std::chrono::milliseconds> parse_retry_after_ms(std::string_view value) noexcept;

namespace detail {

// Whether header name `name` (surrounding whitespace ignored) equals `lower`, ignoring ASCII case.
bool header_name_is(std::string_view name, std::string_view lower) noexcept;

std::optional<std::chrono::milliseconds> parse_retry_after_fields(
    std::optional<std::string_view> ms_value, std::optional<std::string_view> value,
    std::chrono::system_clock::time_point now) noexcept;

template <class H>
concept HeaderPair = requires(const H& h) {
    std::string_view(std::get<0>(h));
    std::string_view(std::get<1>(h));
};

}  // namespace detail

// Looks through a range of (name, value) header pairs — a vector of pairs, a map, anything whose
// elements std::get<0> and std::get<1> turn into string views — for `retry-after-ms` and
// `retry-after` (names compared ignoring case; the first occurrence of each counts). A valid
// `retry-after-ms` wins; otherwise `retry-after` is parsed as above. nullopt when neither is
// present or valid: callers choose their default (`.value_or(1s)`). Never throws.
template <std::ranges::input_range Headers>
requires detail::HeaderPair<std::ranges::range_value_t<Headers>>
    std::optional<std::chrono::milliseconds> parse_retry_after(
        const Headers& headers,
        std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) {
    std::optional<std::string_view> ms_value;
    std::optional<std::string_view> value;
    for (const auto& h : headers) {
        const std::string_view name(std::get<0>(h));
        if (!ms_value && detail::header_name_is(name, "retry-after-ms")) {
            ms_value = std::string_view(std::get<1>(h));
        } else if (!value && detail::header_name_is(name, "retry-after")) {
            value = std::string_view(std::get<1>(h));
        }
    }
    return detail::parse_retry_after_fields(ms_value, value, now);
}

// The same over a braced list: parse_retry_after({{"Retry-After", "5"}}).
inline std::optional<std::chrono::milliseconds> parse_retry_after(
    std::initializer_list<std::pair<std::string_view, std::string_view>> headers,
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) {
    return parse_retry_after<std::initializer_list<std::pair<std::string_view, std::string_view>>>(
        headers, now);
}

}  // namespace lim
