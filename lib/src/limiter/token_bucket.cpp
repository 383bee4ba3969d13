// lim::TokenBucket: Jane Street's Token_bucket.create_exn, on a Limiter record.
#include "lim/token_bucket.hpp"

#include <cmath>

#include "limiter/limiter_open.hpp"

namespace lim {
namespace {

constexpr std::string_view kWhat = "token bucket";

Limiter open_token_bucket(const Segment& segment, std::string_view key, const TokenBucketOptions& o,
                          bool adopt, TimePoint now) {
    if (!std::isfinite(o.burst_size) || o.burst_size <= 0 || o.burst_size > detail::kMaxTokens) {
        detail::throw_bad_parameter(kWhat, key, "burst_size", o.burst_size,
                                    "a number of tokens above 0, at most 1e9");
    }
    if (!(o.sustained_rate_per_sec >= 0) || o.sustained_rate_per_sec > detail::kMaxRatePerSec) {
        detail::throw_bad_parameter(kWhat, key, "sustained_rate_per_sec", o.sustained_rate_per_sec,
                                    "a number of tokens per second from 0 to 1e9");
    }
    if (!std::isfinite(o.initial_bucket_level) || o.initial_bucket_level < 0 ||
        o.initial_bucket_level > o.burst_size) {
        detail::throw_bad_parameter(kWhat, key, "initial_bucket_level", o.initial_bucket_level,
                                    "a number of tokens from 0 to burst_size");
    }
    // Jane Street: an infinite hopper, a finite rate, the bucket as big as a burst.
    const LimiterConfig config{.hopper_to_bucket_rate_per_sec = o.sustained_rate_per_sec,
                               .bucket_size = o.burst_size,
                               .initial_bucket_level = o.initial_bucket_level,
                               .initial_hopper_level = infinite};
    return detail::open_limiter(segment, kWhat, key, config, detail::LimiterFlavor::token_bucket,
                                adopt, now);
}

}  // namespace

TokenBucket TokenBucket::open(const Segment& segment, std::string_view key,
                              const TokenBucketOptions& options, TimePoint now) {
    return TokenBucket(open_token_bucket(segment, key, options, false, now));
}

TokenBucket TokenBucket::open(const Segment& segment, std::string_view key,
                              const TokenBucketOptions& options, AdoptExisting, TimePoint now) {
    return TokenBucket(open_token_bucket(segment, key, options, true, now));
}

}  // namespace lim
