// lim::Throttle: Jane Street's Throttle.create_exn, on a Limiter record.
#include "lim/throttle.hpp"

#include <cmath>

#include "limiter/limiter_open.hpp"

namespace lim {
namespace {

constexpr std::string_view kWhat = "throttle";

Limiter open_throttle(const Segment& segment, std::string_view key, const ThrottleOptions& o,
                      bool adopt, TimePoint now) {
    if (o.max_concurrent_jobs < 1 || o.max_concurrent_jobs > 1'000'000'000) {
        detail::throw_bad_parameter(kWhat, key, "max_concurrent_jobs",
                                    static_cast<double>(o.max_concurrent_jobs),
                                    "a number of jobs from 1 to 1e9");
    }
    // Jane Street: a throttled rate limiter with burst = max_concurrent_jobs whose rate is then
    // set to infinite, i.e. an infinite-rate limiter holding max_concurrent_jobs tokens, all in
    // the bucket.
    const auto jobs = static_cast<double>(o.max_concurrent_jobs);
    const LimiterConfig config{.hopper_to_bucket_rate_per_sec = infinite,
                               .bucket_size = jobs,
                               .initial_bucket_level = jobs,
                               .initial_hopper_level = 0.0};
    return detail::open_limiter(segment, kWhat, key, config, detail::LimiterFlavor::throttle, adopt,
                                now);
}

}  // namespace

Throttle Throttle::open(const Segment& segment, std::string_view key,
                        const ThrottleOptions& options, TimePoint now) {
    return Throttle(open_throttle(segment, key, options, false, now));
}

Throttle Throttle::open(const Segment& segment, std::string_view key,
                        const ThrottleOptions& options, AdoptExisting, TimePoint now) {
    return Throttle(open_throttle(segment, key, options, true, now));
}

}  // namespace lim
