// Checking a record of admissions against a token bucket's promise: over any interval, what was
// admitted is at most the burst plus the rate times the interval (plus a token of rounding).
//
// Each admission is known only to have happened somewhere between `before` (a clock reading
// taken before the call) and `after` (one taken after it returned). For a set of admissions, all
// happened within [earliest before, latest after], so their total must fit the bound for that
// interval. The check takes every set of consecutive admissions (by `after`) of up to
// `max_window` of them, every prefix and every suffix.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace lim::test {

struct Admission {
    std::int64_t before_ns;
    std::int64_t after_ns;
    std::int64_t units;  // tokens x 10,000
};

struct BucketCheck {
    double worst_excess_units = -std::numeric_limits<double>::infinity();  // <= 0: conformant
    std::size_t windows = 0;                                               // sets checked
    std::int64_t total_units = 0;
};

inline BucketCheck check_bucket(std::vector<Admission> a, double burst_units,
                                double rate_units_per_sec, double slack_units,
                                std::size_t max_window) {
    BucketCheck out;
    std::sort(a.begin(), a.end(),
              [](const Admission& x, const Admission& y) { return x.after_ns < y.after_ns; });
    const std::size_t n = a.size();
    const auto allowed = [&](std::int64_t lo, std::int64_t hi) {
        return burst_units + rate_units_per_sec * static_cast<double>(hi - lo) / 1e9 + slack_units;
    };
    const auto consider = [&](std::int64_t sum, std::int64_t lo, std::int64_t hi) {
        out.worst_excess_units =
            std::max(out.worst_excess_units, static_cast<double>(sum) - allowed(lo, hi));
        ++out.windows;
    };
    for (std::size_t i = 0; i < n; ++i) {
        std::int64_t sum = 0;
        std::int64_t lo = std::numeric_limits<std::int64_t>::max();
        const std::size_t end = i + max_window < n ? i + max_window : n;
        for (std::size_t j = i; j < end; ++j) {
            sum += a[j].units;
            lo = std::min(lo, a[j].before_ns);
            consider(sum, lo, a[j].after_ns);
        }
    }
    // Prefixes and suffixes: long intervals, where the rate dominates.
    std::int64_t sum = 0;
    std::int64_t lo = std::numeric_limits<std::int64_t>::max();
    for (std::size_t j = 0; j < n; ++j) {
        sum += a[j].units;
        lo = std::min(lo, a[j].before_ns);
        consider(sum, lo, a[j].after_ns);
    }
    out.total_units = sum;
    sum = 0;
    lo = std::numeric_limits<std::int64_t>::max();
    for (std::size_t i = n; i-- > 0;) {
        sum += a[i].units;
        lo = std::min(lo, a[i].before_ns);
        consider(sum, lo, a[n - 1].after_ns);
    }
    return out;
}

}  // namespace lim::test
