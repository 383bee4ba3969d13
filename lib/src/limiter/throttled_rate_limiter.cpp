// lim::ThrottledRateLimiter: Jane Street's Throttled_rate_limiter.create_exn, on a Limiter
// record.
#include "lim/throttled_rate_limiter.hpp"

#include <algorithm>
#include <cmath>

#include "limiter/limiter_open.hpp"

namespace lim {
namespace {

constexpr std::string_view kWhat = "throttled rate limiter";

Limiter open_throttled_rate_limiter(const Segment& segment, std::string_view key,
                                    const ThrottledRateLimiterOptions& o, bool adopt,
                                    TimePoint now) {
    // Each job takes one token, so a bucket below one token could never start one.
    if (!std::isfinite(o.burst_size) || o.burst_size < 1 || o.burst_size > detail::kMaxTokens) {
        detail::throw_bad_parameter(kWhat, key, "burst_size", o.burst_size,
                                    "a number of jobs from 1 to 1e9");
    }
    if (!(o.sustained_rate_per_sec >= 0) || o.sustained_rate_per_sec > detail::kMaxRatePerSec) {
        detail::throw_bad_parameter(kWhat, key, "sustained_rate_per_sec", o.sustained_rate_per_sec,
                                    "a number of jobs per second from 0 to 1e9");
    }
    if (o.max_concurrent_jobs < 1 || o.max_concurrent_jobs > 1'000'000'000) {
        detail::throw_bad_parameter(kWhat, key, "max_concurrent_jobs",
                                    static_cast<double>(o.max_concurrent_jobs),
                                    "a number of jobs from 1 to 1e9");
    }
    // Jane Street: the bucket is a burst, refilled at the rate; the system holds
    // max_concurrent_jobs tokens, min(burst, jobs) of them in the bucket, the rest in the hopper.
    const auto jobs = static_cast<double>(o.max_concurrent_jobs);
    const double in_bucket = std::min(o.burst_size, jobs);
    const LimiterConfig config{.hopper_to_bucket_rate_per_sec = o.sustained_rate_per_sec,
                               .bucket_size = o.burst_size,
                               .initial_bucket_level = in_bucket,
                               .initial_hopper_level = std::max(0.0, jobs - in_bucket)};
    return detail::open_limiter(segment, kWhat, key, config,
                                detail::LimiterFlavor::throttled_rate_limiter, adopt, now);
}

}  // namespace

ThrottledRateLimiter ThrottledRateLimiter::open(const Segment& segment, std::string_view key,
                                                const ThrottledRateLimiterOptions& options,
                                                TimePoint now) {
    return ThrottledRateLimiter(open_throttled_rate_limiter(segment, key, options, false, now));
}

ThrottledRateLimiter ThrottledRateLimiter::open(const Segment& segment, std::string_view key,
                                                const ThrottledRateLimiterOptions& options,
                                                AdoptExisting, TimePoint now) {
    return ThrottledRateLimiter(open_throttled_rate_limiter(segment, key, options, true, now));
}

}  // namespace lim
