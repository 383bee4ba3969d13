#include "lim/retry_after.hpp"

#include <array>
#include <cstdint>

namespace lim {
namespace {

using std::chrono::milliseconds;

// RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31 seconds.
constexpr std::int64_t kMaxDeltaSeconds = std::int64_t{1} << 31;

constexpr bool is_space(char c) noexcept {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

constexpr char lower(char c) noexcept {
    return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

constexpr bool is_digit(char c) noexcept {
    return c >= '0' && c <= '9';
}

std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && is_space(s.front()))
        s.remove_prefix(1);
    while (!s.empty() && is_space(s.back()))
        s.remove_suffix(1);
    return s;
}

bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (lower(a[i]) != lower(b[i])) return false;
    }
    return true;
}

constexpr std::array<std::string_view, 7> kDays = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};
constexpr std::array<std::string_view, 7> kLongDays = {"sunday",   "monday", "tuesday", "wednesday",
                                                       "thursday", "friday", "saturday"};
constexpr std::array<std::string_view, 12> kMonths = {"jan", "feb", "mar", "apr", "may", "jun",
                                                      "jul", "aug", "sep", "oct", "nov", "dec"};

// A cursor over an HTTP-date; every reader consumes exactly what it matches or fails.
class Cursor {
  public:
    explicit Cursor(std::string_view s) noexcept : s_(s) {}

    bool done() const noexcept { return i_ == s_.size(); }

    bool literal(std::string_view lit) noexcept {
        if (s_.size() - i_ < lit.size() || !iequals(s_.substr(i_, lit.size()), lit)) return false;
        i_ += lit.size();
        return true;
    }

    // Exactly `n` digits.
    std::optional<int> digits(int n) noexcept {
        int v = 0;
        for (int k = 0; k < n; ++k) {
            if (i_ >= s_.size() || !is_digit(s_[i_])) return std::nullopt;
            v = v * 10 + (s_[i_++] - '0');
        }
        return v;
    }

    // The index of the name in `names` that the text continues with, case ignored. Names of
    // one table never prefix one another, so the first match is the only one.
    template <std::size_t N>
    std::optional<unsigned> name(const std::array<std::string_view, N>& names) noexcept {
        for (unsigned k = 0; k < N; ++k) {
            if (literal(names[k])) return k;
        }
        return std::nullopt;
    }

  private:
    std::string_view s_;
    std::size_t i_ = 0;
};

struct Fields {
    int year = 0;
    unsigned month = 0;  // 1..12
    int day = 0;
    int hour = 0, minute = 0, second = 0;
    unsigned weekday = 0;  // 0 = Sunday
};

bool time_of_day(Cursor& c, Fields& f) noexcept {
    const auto h = c.digits(2);
    if (!h || !c.literal(":")) return false;
    const auto m = c.digits(2);
    if (!m || !c.literal(":")) return false;
    const auto s = c.digits(2);
    if (!s) return false;
    f.hour = *h;
    f.minute = *m;
    f.second = *s;
    return true;
}

// IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
std::optional<Fields> imf_fixdate(std::string_view s) noexcept {
    Cursor c(s);
    Fields f;
    const auto wd = c.name(kDays);
    if (!wd || !c.literal(", ")) return std::nullopt;
    const auto day = c.digits(2);
    if (!day || !c.literal(" ")) return std::nullopt;
    const auto mon = c.name(kMonths);
    if (!mon || !c.literal(" ")) return std::nullopt;
    const auto year = c.digits(4);
    if (!year || !c.literal(" ") || !time_of_day(c, f)) return std::nullopt;
    if (!c.literal(" GMT") || !c.done()) return std::nullopt;
    f.weekday = *wd;
    f.day = *day;
    f.month = *mon + 1;
    f.year = *year;
    return f;
}

// RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT". The two-digit year is resolved against `now_year`
// as RFC 9110 §5.6.7 says: a year more than 50 years in the future is the most recent past year
// with those last two digits.
std::optional<Fields> rfc850_date(std::string_view s, int now_year) noexcept {
    Cursor c(s);
    Fields f;
    const auto wd = c.name(kLongDays);
    if (!wd || !c.literal(", ")) return std::nullopt;
    const auto day = c.digits(2);
    if (!day || !c.literal("-")) return std::nullopt;
    const auto mon = c.name(kMonths);
    if (!mon || !c.literal("-")) return std::nullopt;
    const auto yy = c.digits(2);
    if (!yy || !c.literal(" ") || !time_of_day(c, f)) return std::nullopt;
    if (!c.literal(" GMT") || !c.done()) return std::nullopt;
    int year = now_year / 100 * 100 + *yy;
    if (year > now_year + 50) year -= 100;
    f.weekday = *wd;
    f.day = *day;
    f.month = *mon + 1;
    f.year = year;
    return f;
}

// asctime: "Sun Nov  6 08:49:37 1994" (the day is two digits, or a space and one digit).
std::optional<Fields> asctime_date(std::string_view s) noexcept {
    Cursor c(s);
    Fields f;
    const auto wd = c.name(kDays);
    if (!wd || !c.literal(" ")) return std::nullopt;
    const auto mon = c.name(kMonths);
    if (!mon || !c.literal(" ")) return std::nullopt;
    std::optional<int> day;
    if (c.literal(" ")) {
        day = c.digits(1);
    } else {
        day = c.digits(2);
    }
    if (!day || !c.literal(" ") || !time_of_day(c, f) || !c.literal(" ")) return std::nullopt;
    const auto year = c.digits(4);
    if (!year || !c.done()) return std::nullopt;
    f.weekday = *wd;
    f.day = *day;
    f.month = *mon + 1;
    f.year = *year;
    return f;
}

// The instant the fields name, if they name a real one (a real date, a time of day within range
// — second 60 is a leap second — and the day name that date has). In seconds: a four-digit year
// (0000..9999) is ~3e11 s from the epoch, well inside int64 seconds, while system_clock's
// nanoseconds only reach 1677..2262.
std::optional<std::chrono::sys_seconds> to_time(const Fields& f) noexcept {
    using namespace std::chrono;
    const year_month_day ymd{year{f.year}, month{f.month}, day{static_cast<unsigned>(f.day)}};
    if (!ymd.ok() || f.hour > 23 || f.minute > 59 || f.second > 60) return std::nullopt;
    const sys_days date{ymd};
    if (weekday{date}.c_encoding() != f.weekday) return std::nullopt;
    return sys_seconds{date} + hours{f.hour} + minutes{f.minute} + seconds{f.second};
}

// How long from `now` until `when`, rounded up to a millisecond: zero for a past date, and
// saturating at 2^31 s as delta-seconds do. Computed in seconds first, so that no date a header
// can name overflows.
milliseconds until(std::chrono::sys_seconds when,
                   std::chrono::system_clock::time_point now) noexcept {
    using namespace std::chrono;
    // `now` split into whole seconds and a fraction in [0, 1 s), without converting seconds
    // back to nanoseconds (which overflows near the ends of system_clock's range).
    const std::int64_t ns = duration_cast<nanoseconds>(now.time_since_epoch()).count();
    std::int64_t whole = ns / 1'000'000'000;
    std::int64_t fraction_ns = ns % 1'000'000'000;
    if (fraction_ns < 0) {
        fraction_ns += 1'000'000'000;
        --whole;
    }
    const std::int64_t then = when.time_since_epoch().count();
    if (then <= whole) return milliseconds{0};
    const std::int64_t ahead = then - whole;  // >= 1, no overflow: |then| < 4e11
    if (ahead >= kMaxDeltaSeconds) return milliseconds{kMaxDeltaSeconds * 1000};
    // ceil(ahead s - fraction) = ahead s - floor(fraction), in milliseconds.
    const milliseconds fraction{fraction_ns / 1'000'000};
    return milliseconds{ahead * 1000} - fraction;
}

std::optional<milliseconds> parse_delta_seconds(std::string_view v) noexcept {
    if (v.empty()) return std::nullopt;
    std::int64_t secs = 0;
    for (char c : v) {
        if (!is_digit(c)) return std::nullopt;
        secs = std::min(secs * 10 + (c - '0'), kMaxDeltaSeconds);
    }
    return milliseconds{secs * 1000};
}

}  // namespace

std::optional<milliseconds> parse_retry_after(std::string_view value,
                                              std::chrono::system_clock::time_point now) noexcept {
    using namespace std::chrono;
    const std::string_view v = trim(value);
    if (v.empty()) return std::nullopt;
    if (is_digit(v.front())) return parse_delta_seconds(v);
    const int now_year = static_cast<int>(year_month_day{floor<days>(now)}.year());
    std::optional<Fields> f = imf_fixdate(v);
    if (!f) f = rfc850_date(v, now_year);
    if (!f) f = asctime_date(v);
    if (!f) return std::nullopt;
    const auto when = to_time(*f);
    if (!when) return std::nullopt;
    return until(*when, now);
}

std::optional<milliseconds> parse_retry_after_ms(std::string_view value) noexcept {
    const std::string_view v = trim(value);
    std::size_t i = 0;
    std::int64_t ms = 0;
    constexpr std::int64_t kMax = kMaxDeltaSeconds * 1000;
    while (i < v.size() && is_digit(v[i]))
        ms = std::min(ms * 10 + (v[i++] - '0'), kMax);
    if (i == 0) return std::nullopt;  // empty, negative, or not a number
    if (i < v.size()) {
        if (v[i] != '.' || i + 1 == v.size()) return std::nullopt;
        bool fraction = false;
        for (++i; i < v.size(); ++i) {
            if (!is_digit(v[i])) return std::nullopt;
            fraction = fraction || v[i] != '0';
        }
        if (fraction) ms = std::min(ms + 1, kMax);  // rounded up
    }
    return milliseconds{ms};
}

namespace detail {

bool header_name_is(std::string_view name, std::string_view lower_name) noexcept {
    return iequals(trim(name), lower_name);
}

std::optional<milliseconds> parse_retry_after_fields(
    std::optional<std::string_view> ms_value, std::optional<std::string_view> value,
    std::chrono::system_clock::time_point now) noexcept {
    if (ms_value) {
        if (auto ms = parse_retry_after_ms(*ms_value)) return ms;
    }
    if (value) return parse_retry_after(*value, now);
    return std::nullopt;
}

}  // namespace detail
}  // namespace lim
