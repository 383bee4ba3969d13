#include "create_kinds.hpp"

#include <fmt/format.h>

#include "common.hpp"
#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/limiter.hpp"
#include "lim/semaphore.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "lim/token_bucket.hpp"
#include "lim/weighted_semaphore.hpp"

namespace limctl {
namespace {

std::uint64_t require_count(TableReader& r, const std::string& key) {
    const auto v = r.integer(key);
    if (!v) r.fail(key, "missing");
    if (*v < 0) r.fail(key, "must not be negative");
    return static_cast<std::uint64_t>(*v);
}

double require_number(TableReader& r, const std::string& key) {
    const auto v = r.number(key);
    if (!v) r.fail(key, "missing");
    return *v;
}

}  // namespace

LimiterSpec read_limiter(const std::string& key, const std::string& kind, TableReader& r) {
    LimiterSpec spec{key, kind, {}};
    if (kind == "semaphore") {
        const lim::SemaphoreOptions o{.capacity = require_count(r, "capacity")};
        spec.open = [key, o](const lim::Segment& seg) { lim::Semaphore::open(seg, key, o); };
    } else if (kind == "token_bucket") {
        const lim::TokenBucketOptions o{
            .burst_size = require_number(r, "burst_size"),
            .sustained_rate_per_sec = require_number(r, "sustained_rate_per_sec"),
            .initial_bucket_level = r.number("initial_bucket_level").value_or(0)};
        spec.open = [key, o](const lim::Segment& seg) { lim::TokenBucket::open(seg, key, o); };
    } else if (kind == "throttle") {
        const lim::ThrottleOptions o{.max_concurrent_jobs = static_cast<std::int64_t>(
                                         require_count(r, "max_concurrent_jobs"))};
        spec.open = [key, o](const lim::Segment& seg) { lim::Throttle::open(seg, key, o); };
    } else if (kind == "throttled_rate_limiter") {
        const lim::ThrottledRateLimiterOptions o{
            .burst_size = require_number(r, "burst_size"),
            .sustained_rate_per_sec = require_number(r, "sustained_rate_per_sec"),
            .max_concurrent_jobs =
                static_cast<std::int64_t>(require_count(r, "max_concurrent_jobs"))};
        spec.open = [key, o](const lim::Segment& seg) {
            lim::ThrottledRateLimiter::open(seg, key, o);
        };
    } else if (kind == "limiter") {
        const lim::LimiterConfig o{
            .hopper_to_bucket_rate_per_sec =
                r.maybe_infinite("hopper_to_bucket_rate_per_sec").value_or(lim::infinite),
            .bucket_size = require_number(r, "bucket_size"),
            .initial_bucket_level = r.number("initial_bucket_level").value_or(0),
            .initial_hopper_level =
                r.maybe_infinite("initial_hopper_level").value_or(lim::infinite)};
        spec.open = [key, o](const lim::Segment& seg) { lim::Limiter::open(seg, key, o); };
    } else if (kind == "weighted_semaphore") {
        const lim::WeightedSemaphoreOptions o{.capacity = require_count(r, "capacity")};
        spec.open = [key, o](const lim::Segment& seg) {
            lim::WeightedSemaphore::open(seg, key, o);
        };
    } else if (kind == "dispatch") {
        // Options as lim::DispatchOptions names them; `limiter` names the BackoffWindow (by
        // default the Dispatch's own key, as Foundation's examples do).
        const std::string window = r.string("limiter").value_or(key);
        const auto count = [&](const char* name) -> std::optional<std::uint64_t> {
            const auto v = r.integer(name);
            if (v && *v < 0) r.fail(name, "must not be negative");
            return v ? std::optional<std::uint64_t>(static_cast<std::uint64_t>(*v)) : std::nullopt;
        };
        const auto concurrency = count("concurrency");
        const auto throttled = count("throttled_concurrency");
        const auto budget = count("byte_budget");
        const auto penalty = count("byte_penalty_multiplier");
        const auto backoff_window = r.duration("backoff_window");
        spec.open = [=](const lim::Segment& seg) {
            // Start from the API's defaults; the file overrides what it names.
            lim::DispatchOptions o{.limiter = lim::BackoffWindow::for_key(seg, window), .key = key};
            if (concurrency) o.concurrency = *concurrency;
            if (throttled) o.throttled_concurrency = *throttled;
            if (budget) o.byte_budget = *budget;
            if (penalty) o.byte_penalty_multiplier = *penalty;
            if (backoff_window) o.backoff_window = *backoff_window;
            lim::Dispatch::open(seg, o);
        };
    } else {
        r.fail("kind", fmt::format("'{}' is not a kind lim knows", kind));
    }
    r.finish();
    return spec;
}

}  // namespace limctl
