// What multi-process tests observe of a limiter from outside it, in MAP_SHARED memory: how many
// hold it at once (PeakCounter), and when it admitted what (AdmissionLog), checked against a
// token bucket's promise: over any interval, what was admitted is at most the burst plus the
// rate times the interval (plus a token of rounding).
//
// Each admission is known only to have happened somewhere between `before` (a clock reading
// taken before the call) and `after` (one taken after it returned). For a set of admissions, all
// happened within [earliest before, latest after], so their total must fit the bound for that
// interval. The check takes every set of consecutive admissions (by `after`) of up to
// `max_window` of them, every prefix and every suffix.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "lim/clock.hpp"
#include "lim/token_bucket.hpp"
#include "support/process.hpp"

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
    // The interval of the worst set: [earliest before, latest after] (for a failure's report).
    std::int64_t worst_lo_ns = 0;
    std::int64_t worst_hi_ns = 0;
};

// How much is held at once, counted by the holders themselves. Lives in shared memory:
// create with `new (shared_array<PeakCounter>(1)) PeakCounter{}`.
struct PeakCounter {
    std::atomic<long> inside{0};
    std::atomic<long> peak{0};

    void enter(long n) {
        const long now = inside.fetch_add(n) + n;
        long p = peak.load();
        while (now > p && !peak.compare_exchange_weak(p, now)) {
        }
    }
    void leave(long n) { inside.fetch_sub(n); }
};

// One log of admissions per forked process, in shared memory made before the fork.
class AdmissionLog {
  public:
    AdmissionLog(int processes, std::size_t per_process)
        : per_process_(per_process),
          entries_(shared_array<Admission>(static_cast<std::size_t>(processes) * per_process)),
          counts_(shared_array<std::int64_t>(static_cast<std::size_t>(processes))),
          processes_(processes) {}

    // Process p's log, and how many entries it wrote (set before it exits).
    Admission* part(int p) const { return entries_ + static_cast<std::size_t>(p) * per_process_; }
    void set_count(int p, std::int64_t n) const { counts_[p] = n; }

    std::vector<Admission> all() const {
        std::vector<Admission> out;
        for (int p = 0; p < processes_; ++p)
            out.insert(out.end(), part(p), part(p) + counts_[p]);
        return out;
    }

  private:
    std::size_t per_process_;
    Admission* entries_;
    std::int64_t* counts_;
    int processes_;
};

// An explicit clock in shared memory at `start`, for forked takers to advance (take_on_clock).
inline std::atomic<std::int64_t>* shared_clock(TimePoint start) {
    return new (shared_array<std::atomic<std::int64_t>>(1))
        std::atomic<std::int64_t>(to_nanos(start));
}

// Forked taker p's loop: `attempts` times, advances `clock` 2 us and tries to take n tokens from
// `tb` at the time it read (n = 40 for an even p, 25 for an odd one: more than 20 tokens of drip
// at 10^7/s), logging each admission in log.part(p); then sets its count.
inline void take_on_clock(TokenBucket& tb, std::atomic<std::int64_t>* clock,
                          const AdmissionLog& log, int p, int attempts) {
    const double n = p % 2 == 0 ? 40.0 : 25.0;
    Admission* mine = log.part(p);
    std::int64_t k = 0;
    for (int i = 0; i < attempts; ++i) {
        const std::int64_t now = clock->fetch_add(2'000) + 2'000;
        if (tb.try_take(from_nanos(now), n) != TryTake::taken) continue;
        mine[k++] = {now, clock->load(), static_cast<std::int64_t>(n * 10'000)};
    }
    log.set_count(p, k);
}

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
        const double excess = static_cast<double>(sum) - allowed(lo, hi);
        if (excess > out.worst_excess_units) {
            out.worst_excess_units = excess;
            out.worst_lo_ns = lo;
            out.worst_hi_ns = hi;
        }
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
