// lim::parse_retry_after: delta-seconds, the three HTTP-date formats, and the header-list form.
#include <doctest/doctest.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lim/retry_after.hpp"

using namespace std::chrono;
using lim::parse_retry_after;

namespace {
// 1994-11-06 08:49:00 UTC, 37 s before RFC 9110's example date.
const system_clock::time_point kNow = sys_days{year{1994} / November / 6} + hours{8} + minutes{49};

struct Case {
    std::string_view value;
    std::optional<milliseconds> expected;
};
}  // namespace

TEST_CASE("values: delta-seconds, HTTP-dates, past dates, garbage") {
    const Case cases[] = {
        // delta-seconds
        {"0", milliseconds{0}},
        {"5", seconds{5}},
        {"  120 \t", seconds{120}},
        {"007", seconds{7}},
        {"99999999999999999999", seconds{std::int64_t{1} << 31}},  // saturates (RFC 9111)
        // the three date formats of RFC 9110, 37 s after kNow
        {"Sun, 06 Nov 1994 08:49:37 GMT", seconds{37}},
        {"Sunday, 06-Nov-94 08:49:37 GMT", seconds{37}},
        {"Sun Nov  6 08:49:37 1994", seconds{37}},
        {"Sun Nov 06 08:49:37 1994", seconds{37}},
        {"sun, 06 nov 1994 08:49:37 gmt", seconds{37}},  // names in any case
        {"Mon, 07 Nov 1994 08:49:00 GMT", hours{24}},
        {"Mon, 07 Nov 1994 08:49:00 GMT ", hours{24}},
        // dates in the past, or now, give zero
        {"Sun, 06 Nov 1994 08:48:59 GMT", milliseconds{0}},
        {"Sun, 06 Nov 1994 08:49:00 GMT", milliseconds{0}},
        {"Thu, 01 Jan 1970 00:00:00 GMT", milliseconds{0}},
        {"Saturday, 05-Nov-94 08:49:37 GMT", milliseconds{0}},
        // garbage
        {"", std::nullopt},
        {"   ", std::nullopt},
        {"-1", std::nullopt},
        {"1.5", std::nullopt},
        {"5s", std::nullopt},
        {"soon", std::nullopt},
        {"Sun, 06 Nov 1994 08:49:37", std::nullopt},      // no zone
        {"Sun, 06 Nov 1994 08:49:37 UTC", std::nullopt},  // not GMT
        {"Mon, 06 Nov 1994 08:49:37 GMT", std::nullopt},  // wrong day name
        {"Sun, 31 Feb 1994 08:49:37 GMT", std::nullopt},  // no such date
        {"Sun, 06 Nov 1994 24:00:00 GMT", std::nullopt},  // no such time
        {"Sun, 6 Nov 1994 08:49:37 GMT", std::nullopt},   // IMF-fixdate days have two digits
        {"Sun, 06 Nov 1994 08:49:37 GMT trailing", std::nullopt},
        {"Sun Nov  6 08:49:37 94", std::nullopt},
    };
    for (const Case& c : cases) {
        CAPTURE(c.value);
        CHECK(parse_retry_after(c.value, kNow) == c.expected);
    }
}

TEST_CASE("a future date is rounded up to the millisecond") {
    const auto now = kNow + microseconds{1500};  // 1.5 ms past kNow
    CHECK(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now) ==
          milliseconds{36'999});  // 36.9985 s, rounded up
}

TEST_CASE("RFC 850 two-digit years more than 50 years ahead mean the past century") {
    const system_clock::time_point now2030 = sys_days{year{2030} / January / 1};
    // 79 -> 2079 is 49 years ahead: kept.
    CHECK(parse_retry_after("Monday, 02-Jan-79 00:00:00 GMT", now2030).has_value());
    CHECK(parse_retry_after("Monday, 02-Jan-79 00:00:00 GMT", now2030) > hours{24 * 365 * 48});
    // 81 -> 2081 is 51 years ahead: 1981, in the past.
    CHECK(parse_retry_after("Friday, 02-Jan-81 00:00:00 GMT", now2030) == milliseconds{0});
}

TEST_CASE("retry-after-ms values") {
    using lim::parse_retry_after_ms;
    CHECK(parse_retry_after_ms("1500") == milliseconds{1500});
    CHECK(parse_retry_after_ms(" 20 ") == milliseconds{20});
    CHECK(parse_retry_after_ms("1.25") == milliseconds{2});
    CHECK(parse_retry_after_ms("3.000") == milliseconds{3});
    CHECK(parse_retry_after_ms("0") == milliseconds{0});
    CHECK_FALSE(parse_retry_after_ms("-5").has_value());
    CHECK_FALSE(parse_retry_after_ms("").has_value());
    CHECK_FALSE(parse_retry_after_ms("1.").has_value());
    CHECK_FALSE(parse_retry_after_ms(".5").has_value());
    CHECK_FALSE(parse_retry_after_ms("10ms").has_value());
}

TEST_CASE("header lists: retry-after-ms first, names ignore case, values trimmed") {
    using Headers = std::vector<std::pair<std::string, std::string>>;
    CHECK(parse_retry_after(Headers{{"Retry-After", " 3 "}}, kNow) == seconds{3});
    CHECK(parse_retry_after(Headers{{"RETRY-AFTER", "3"}}, kNow) == seconds{3});
    CHECK(parse_retry_after(Headers{{"retry-after", "3"}, {"Retry-After-Ms", "250"}}, kNow) ==
          milliseconds{250});
    // A garbage retry-after-ms falls back to retry-after.
    CHECK(parse_retry_after(Headers{{"retry-after-ms", "soon"}, {"retry-after", "2"}}, kNow) ==
          seconds{2});
    CHECK(parse_retry_after(
              Headers{{"Content-Type", "json"}, {"Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT"}},
              kNow) == seconds{37});
    // The first occurrence counts.
    CHECK(parse_retry_after(Headers{{"Retry-After", "1"}, {"Retry-After", "9"}}, kNow) ==
          seconds{1});
    // Absent or garbage: nullopt, so the caller picks the default.
    CHECK_FALSE(parse_retry_after(Headers{}, kNow).has_value());
    CHECK_FALSE(parse_retry_after(Headers{{"X-Retry-After", "5"}}, kNow).has_value());
    CHECK_FALSE(parse_retry_after(Headers{{"Retry-After", "-5"}}, kNow).has_value());
    CHECK(parse_retry_after(Headers{{"Retry-After", "later"}}, kNow).value_or(seconds{1}) ==
          seconds{1});

    const std::map<std::string, std::string> map{{"retry-after", "4"}};
    CHECK(parse_retry_after(map, kNow) == seconds{4});
    const std::vector<std::pair<std::string_view, const char*>> views{{"Retry-After", "6"}};
    CHECK(parse_retry_after(views, kNow) == seconds{6});
    CHECK(parse_retry_after({{"Retry-After", "7"}}, kNow) == seconds{7});
    CHECK(parse_retry_after({{"retry-after-ms", "70"}, {"Retry-After", "7"}}, kNow) ==
          milliseconds{70});
}

TEST_CASE("dates beyond system_clock's nanosecond range: past ones give zero, far ones saturate") {
    // system_clock counts nanoseconds in int64: 1677..2262. Dates outside are computed in
    // seconds, never wrapped.
    const Case cases[] = {
        {"Sat, 01 Jan 1600 00:00:00 GMT", milliseconds{0}},
        {"Mon, 15 Jun 1676 00:00:00 GMT", milliseconds{0}},
        {"Sat Jan  1 00:00:00 0000", milliseconds{0}},
        {"Sun, 01 Jan 2062 00:00:00 GMT", seconds{2'119'187'460}},  // just under 2^31 s ahead
        {"Thu, 01 Jan 2263 00:00:00 GMT", seconds{std::int64_t{1} << 31}},
        {"Fri, 31 Dec 9999 23:59:59 GMT", seconds{std::int64_t{1} << 31}},
        {"Fri Dec 31 23:59:60 9999", seconds{std::int64_t{1} << 31}},
    };
    for (const Case& c : cases) {
        CAPTURE(c.value);
        CHECK(parse_retry_after(c.value, kNow) == c.expected);
    }
    // And from a `now` at either end of system_clock's range.
    CHECK(parse_retry_after("Sat, 01 Jan 1600 00:00:00 GMT", system_clock::time_point::max()) ==
          milliseconds{0});
    CHECK(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", system_clock::time_point::min()) ==
          seconds{std::int64_t{1} << 31});
}
