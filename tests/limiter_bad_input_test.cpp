// Bad parameters for the Jane Street family are refused with a clear lim::Error naming the
// field and the key, and leave the segment exactly as it was.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "lim/limiter.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "lim/token_bucket.hpp"
#include "support/process.hpp"

using namespace lim;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

std::string expect_error(Errc code, const std::function<void()>& call) {
    try {
        call();
    } catch (const Error& e) {
        CHECK_MESSAGE(e.code() == code, "got " << to_string(e.code()) << ": " << e.what());
        return e.what();
    }
    FAIL("expected lim::Error(" << to_string(code) << ")");
    return {};
}

struct Case {
    const char* field;  // must appear in the message
    std::function<void(const Segment&)> open;
};

}  // namespace

TEST_CASE("bad parameters are refused with invalid_argument, and nothing is created") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-bad"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    const auto limiter = [](LimiterConfig c) {
        return [c](const Segment& s) { Limiter::open(s, "k", c); };
    };
    const LimiterConfig ok{.hopper_to_bucket_rate_per_sec = 1.0,
                           .bucket_size = 10,
                           .initial_bucket_level = 0,
                           .initial_hopper_level = infinite};
    auto with = [&](auto change) {
        LimiterConfig c = ok;
        change(c);
        return limiter(c);
    };
    const auto tb = [](TokenBucketOptions o) {
        return [o](const Segment& s) { TokenBucket::open(s, "k", o); };
    };
    const auto th = [](ThrottleOptions o) {
        return [o](const Segment& s) { Throttle::open(s, "k", o); };
    };
    const auto trl = [](ThrottledRateLimiterOptions o) {
        return [o](const Segment& s) { ThrottledRateLimiter::open(s, "k", o); };
    };
    std::vector<Case> cases;
    for (double bad : {0.0, -1.0, kNaN, kInf, 2e9}) {
        cases.push_back({"bucket_size", with([&](LimiterConfig& c) { c.bucket_size = bad; })});
        cases.push_back({"burst_size", tb({.burst_size = bad, .sustained_rate_per_sec = 1})});
    }
    for (double bad : {-1.0, -1e-300, kNaN, kInf, 2e9}) {
        cases.push_back({"hopper_to_bucket_rate_per_sec",
                         with([&](LimiterConfig& c) { c.hopper_to_bucket_rate_per_sec = bad; })});
        cases.push_back(
            {"sustained_rate_per_sec", tb({.burst_size = 1, .sustained_rate_per_sec = bad})});
        cases.push_back(
            {"sustained_rate_per_sec", trl({.burst_size = 1, .sustained_rate_per_sec = bad})});
    }
    for (double bad : {-1.0, kNaN, kInf, 10.5}) {
        cases.push_back({"initial_bucket_level",
                         with([&](LimiterConfig& c) { c.initial_bucket_level = bad; })});
        cases.push_back(
            {"initial_bucket_level",
             tb({.burst_size = 10, .sustained_rate_per_sec = 1, .initial_bucket_level = bad})});
    }
    for (double bad : {-1.0, kNaN, kInf, 1e9}) {
        cases.push_back({"initial_hopper_level", with([&](LimiterConfig& c) {
                             c.initial_bucket_level = 5;
                             c.initial_hopper_level = bad;
                         })});
    }
    for (std::int64_t bad : {std::int64_t{0}, std::int64_t{-1}, std::int64_t{2'000'000'000}}) {
        cases.push_back({"max_concurrent_jobs", th({.max_concurrent_jobs = bad})});
        cases.push_back(
            {"max_concurrent_jobs", trl({.burst_size = 1, .max_concurrent_jobs = bad})});
    }
    for (double bad : {0.0, 0.5, -2.0, kNaN, kInf}) {
        cases.push_back({"burst_size", trl({.burst_size = bad, .max_concurrent_jobs = 2})});
    }

    const auto before = lim::test::segment_file_bytes(guard.name());
    for (const Case& c : cases) {
        const std::string field = c.field;
        CAPTURE(field);
        const std::string what = expect_error(Errc::invalid_argument, [&] { c.open(seg); });
        CHECK(what.find(c.field) != std::string::npos);
        CHECK(what.find("'k'") != std::string::npos);
    }
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
    CHECK(seg.info().limiters == 0);
}

TEST_CASE("a key that exists with another configuration is refused, and nothing changes") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-mismatch"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    TokenBucket::open(seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 2});
    Throttle::open(seg, "th", {.max_concurrent_jobs = 4});
    ThrottledRateLimiter::open(
        seg, "trl", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3});
    Limiter::open(seg, "raw",
                  {.hopper_to_bucket_rate_per_sec = 1.0,
                   .bucket_size = 3,
                   .initial_bucket_level = 1,
                   .initial_hopper_level = 2.0});
    const std::vector<std::function<void()>> mismatches = {
        [&] { TokenBucket::open(seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 2.5}); },
        [&] {
            TokenBucket::open(
                seg, "tb",
                {.burst_size = 10, .sustained_rate_per_sec = 2, .initial_bucket_level = 1});
        },
        [&] { Throttle::open(seg, "th", {.max_concurrent_jobs = 5}); },
        [&] { Throttle::open(seg, "tb", {.max_concurrent_jobs = 10}); },
        [&] {
            ThrottledRateLimiter::open(
                seg, "trl",
                {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 4});
        },
        [&] {
            // The same numbers as the throttle, but as a generic limiter.
            Limiter::open(seg, "th",
                          {.hopper_to_bucket_rate_per_sec = infinite,
                           .bucket_size = 4,
                           .initial_bucket_level = 4,
                           .initial_hopper_level = 0.0});
        },
        [&] {
            Limiter::open(seg, "raw",
                          {.hopper_to_bucket_rate_per_sec = 1.0,
                           .bucket_size = 3,
                           .initial_bucket_level = 1,
                           .initial_hopper_level = infinite});
        },
    };
    const auto before = lim::test::segment_file_bytes(guard.name());
    for (std::size_t i = 0; i < mismatches.size(); ++i) {
        CAPTURE(i);
        const std::string what = expect_error(Errc::config_mismatch, mismatches[i]);
        CHECK(what.find("adopt_existing") != std::string::npos);
    }
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
    CHECK(seg.info().limiters == 4);
}

TEST_CASE("bad keys are invalid_name") {
    lim::test::SegmentGuard guard(lim::test::unique_name("lim-badkey"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    const auto before = lim::test::segment_file_bytes(guard.name());
    expect_error(Errc::invalid_name, [&] { Throttle::open(seg, "a b", {}); });
    expect_error(Errc::invalid_name,
                 [&] { TokenBucket::open(seg, std::string(65, 'k'), {.burst_size = 1}); });
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
}
