// SPEC.md read line by line, as an outside user would: every binding name, option order, default,
// return type and documented failure, written the way SPEC's own snippets write them. Checks that
// other suites already make (name alphabets, corrupt headers, FIFO fairness, crash recovery) are
// not repeated here; this file holds what SPEC states in words and nobody checked yet.
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <lim/lim.hpp>  // SPEC: "the umbrella header is <lim/lim.hpp>"; nothing else included

#include "support/process.hpp"

using namespace std::chrono_literals;
using lim::test::SegmentGuard;
using lim::test::unique_name;

namespace {

template <class F>
lim::Errc error_of(F&& f) {
    try {
        f();
    } catch (const lim::Error& e) {
        return e.code();
    }
    FAIL("no lim::Error thrown");
    return lim::Errc::system_error;
}

// ---- compile-time: names, types, option member order (designated initialisers in SPEC order)

static_assert(std::is_base_of_v<std::runtime_error, lim::Error>);
static_assert(std::is_same_v<decltype(std::declval<const lim::Error&>().code()), lim::Errc>);
[[maybe_unused]] constexpr lim::Errc kAllErrc[] = {
    lim::Errc::invalid_name,    lim::Errc::invalid_argument, lim::Errc::not_found,
    lim::Errc::already_exists,  lim::Errc::corrupt_segment,  lim::Errc::version_mismatch,
    lim::Errc::config_mismatch, lim::Errc::table_full,       lim::Errc::permission_denied,
    lim::Errc::over_release,    lim::Errc::system_error};

static_assert(lim::Clock::is_steady);
static_assert(std::is_same_v<lim::TimePoint, lim::Clock::time_point>);
static_assert(std::is_same_v<lim::TimePoint::duration, std::chrono::nanoseconds>);

static_assert(std::is_same_v<decltype(lim::Segment::remove("x")), bool>);
static_assert(std::is_same_v<decltype(std::declval<lim::Segment&>().info()), lim::SegmentInfo>);
static_assert(std::is_same_v<decltype(std::declval<lim::Segment&>().reap()), lim::ReapReport>);
static_assert(
    std::is_same_v<decltype(lim::SegmentInfo{}.created), std::chrono::system_clock::time_point>);
static_assert(std::is_same_v<decltype(lim::ReapReport{}.reaped[0].pid), int>);

// SegmentOptions: max_limiters, max_processes, mode, reap_after; defaults 256, 1024, 0600, 1 s.
constexpr lim::SegmentOptions kSegOpts{
    .max_limiters = 16, .max_processes = 32, .mode = 0600, .reap_after = 1s};
static_assert(lim::SegmentOptions{}.max_limiters == 256);
static_assert(lim::SegmentOptions{}.max_processes == 1024);
static_assert(lim::SegmentOptions{}.mode == 0600);
static_assert(lim::SegmentOptions{}.reap_after == std::chrono::seconds{1});

// The limiter options, all members, in SPEC's order.
[[maybe_unused]] const lim::LimiterConfig kLimiterConfig{.hopper_to_bucket_rate_per_sec = 2.0,
                                                         .bucket_size = 10,
                                                         .initial_bucket_level = 0,
                                                         .initial_hopper_level = lim::infinite};
[[maybe_unused]] constexpr lim::TokenBucketOptions kTbOpts{
    .burst_size = 10, .sustained_rate_per_sec = 2, .initial_bucket_level = 0};
[[maybe_unused]] constexpr lim::ThrottleOptions kThOpts{.max_concurrent_jobs = 8};
[[maybe_unused]] constexpr lim::ThrottledRateLimiterOptions kTrlOpts{
    .burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3};
[[maybe_unused]] constexpr lim::SemaphoreOptions kSemOpts{.capacity = 8};
[[maybe_unused]] constexpr lim::WeightedSemaphoreOptions kWsOpts{.capacity = 5'000'000};
// ExponentialBackoff{base = 2 ms, max = 50 ms, jitter = 0.25}.
static_assert(lim::ExponentialBackoff{}.base == std::chrono::milliseconds{2});
static_assert(lim::ExponentialBackoff{}.max == std::chrono::milliseconds{50});
static_assert(lim::ExponentialBackoff{}.jitter == 0.25);
[[maybe_unused]] constexpr lim::ExponentialBackoff kBackoff{
    .base = 2ms, .max = 50ms, .jitter = 0.25};

// InfiniteOrFinite<T>: from a T or lim::infinite; is_infinite(), value().
static_assert(lim::InfiniteOrFinite<double>(lim::infinite).is_infinite());
static_assert(!lim::InfiniteOrFinite<double>(2.5).is_infinite());

// Façade reads and the return types SPEC names.
template <class F>
constexpr bool has_reads = std::is_same_v<decltype(std::declval<F&>().bucket_size()), double>&&
    std::is_same_v<decltype(std::declval<F&>().in_bucket(lim::TimePoint{})), double>&&
        std::is_same_v<decltype(std::declval<F&>().in_hopper(lim::TimePoint{})),
                       lim::InfiniteOrFinite<double>>&&
            std::is_same_v<decltype(std::declval<F&>().in_flight(lim::TimePoint{})), double>&&
                std::is_same_v<decltype(std::declval<F&>().in_limiter(lim::TimePoint{})),
                               lim::InfiniteOrFinite<double>>&&
                    std::is_same_v<decltype(std::declval<F&>().in_system(lim::TimePoint{})),
                                   lim::InfiniteOrFinite<double>>&&
                        std::is_same_v<decltype(std::declval<F&>().hopper_to_bucket_rate_per_sec()),
                                       lim::InfiniteOrFinite<double>>&&
                            std::is_same_v<decltype(std::declval<F&>().tokens_may_be_available_when(
                                               lim::TimePoint{}, 1.0)),
                                           lim::Availability>&&
                                std::is_void_v<decltype(std::declval<F&>().invariant())>;
static_assert(has_reads<lim::Limiter>);
static_assert(has_reads<lim::TokenBucket>);
static_assert(has_reads<lim::Throttle>);
static_assert(has_reads<lim::ThrottledRateLimiter>);
static_assert(
    std::is_same_v<decltype(std::declval<lim::Limiter&>().try_take(lim::TimePoint{}, 1.0)),
                   lim::TryTake>);
static_assert(std::is_same_v<decltype(std::declval<lim::Limiter&>().try_take(1.0)), lim::TryTake>);
static_assert(
    std::is_same_v<decltype(std::declval<lim::TokenBucket&>().try_take(1.0)), lim::TryTake>);
static_assert(std::is_same_v<
              decltype(std::declval<lim::TokenBucket&>().take_until(1.0, lim::TimePoint{})), bool>);
static_assert(
    std::is_same_v<decltype(std::declval<lim::Throttle&>().try_start_job(lim::TimePoint{})),
                   lim::StartJob>);
static_assert(std::is_same_v<decltype(std::declval<lim::ThrottledRateLimiter&>().start_job_until(
                                 lim::TimePoint{})),
                             bool>);
static_assert(std::is_same_v<decltype(std::declval<lim::Dispatch&>().try_acquire(1)),
                             std::optional<lim::Permit>>);
static_assert(
    std::is_same_v<decltype(std::declval<lim::Dispatch&>().acquire_until(1, lim::TimePoint{})),
                   std::optional<lim::Permit>>);
static_assert(std::is_same_v<decltype(std::declval<lim::Dispatch&>().acquire(1)), lim::Permit>);
static_assert(
    std::is_same_v<decltype(std::declval<lim::Dispatch&>().snapshot()), lim::DispatchSnapshot>);
static_assert(
    std::is_same_v<decltype(lim::DispatchSnapshot{}.backoff_remaining), std::chrono::nanoseconds>);
static_assert(std::is_same_v<decltype(std::declval<lim::Semaphore&>().try_acquire()), bool>);
static_assert(std::is_same_v<
              decltype(std::declval<lim::Semaphore&>().acquire_until(1, lim::TimePoint{})), bool>);
static_assert(
    std::is_same_v<decltype(std::declval<lim::WeightedSemaphore&>().try_acquire()), bool>);
static_assert(std::is_same_v<decltype(lim::parse_retry_after(std::string_view{})),
                             std::optional<std::chrono::milliseconds>>);
static_assert(!std::is_copy_constructible_v<lim::Permit>);  // RAII: one owner

// A time base for tests that drive time themselves. It is in the past, so that steps of more than a
// minute stay trusted: an explicit `now` more than 60 s ahead of lim::Clock::now() is clamped
// (docs/guide.md; issue 9 item 4).
lim::TimePoint past() {
    return lim::Clock::now() - std::chrono::hours{1};
}

struct Seg {
    SegmentGuard guard;
    lim::Segment seg;
    explicit Seg(const char* stem)
        : guard(unique_name(stem)), seg(lim::Segment::open_or_create(guard.name(), kSegOpts)) {}
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Segment

TEST_CASE("SPEC segment: /dev/shm/lim.<name>, mode 0600 by default, info's fields") {
    SegmentGuard guard(unique_name("spec-seg"));
    const auto before = std::chrono::system_clock::now();
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    struct stat st {};
    REQUIRE(::stat(("/dev/shm/lim." + guard.name()).c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
    const lim::SegmentInfo i = seg.info();
    CHECK(i.name == guard.name());
    CHECK(i.max_limiters == 256);
    CHECK(i.max_processes == 1024);
    CHECK(i.size_bytes == static_cast<std::size_t>(st.st_size));
    CHECK(i.layout_version > 0);
    CHECK(i.limiters == 0);
    CHECK(i.processes == 1);
    CHECK(i.created >= before - 2s);
    CHECK(i.created <= std::chrono::system_clock::now() + 2s);
    (void)lim::Semaphore::open(seg, "db", {.capacity = 8});
    (void)lim::BackoffWindow::for_key(seg, "w");
    CHECK(seg.info().limiters == 2);
    // A second open_or_create attaches: the geometry stays the segment's.
    auto again = lim::Segment::open_or_create(guard.name(), {.max_limiters = 8});
    CHECK_FALSE(again.is_creator());
    CHECK(again.info().max_limiters == 256);
    CHECK(lim::Segment::open(guard.name()).info().created == i.created);
}

TEST_CASE("SPEC segment: mode is applied as given (not masked by the umask)") {
    SegmentGuard guard(unique_name("spec-mode"));
    const mode_t old = ::umask(077);
    auto seg = lim::Segment::open_or_create(guard.name(), {.mode = 0660});
    ::umask(old);
    struct stat st {};
    REQUIRE(::stat(("/dev/shm/lim." + guard.name()).c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0660);
}

// ---------------------------------------------------------------------------------------------
// Records: config_mismatch and adopt_existing, for every kind

TEST_CASE("SPEC records: a different configuration is config_mismatch; adopt_existing adopts") {
    Seg s("spec-adopt");
    auto& seg = s.seg;
    const auto now = lim::Clock::now();
    // Limiter
    auto ex = lim::Limiter::open(seg, "raw", kLimiterConfig, now);
    CHECK(error_of([&] {
              lim::Limiter::open(seg, "raw",
                                 {.hopper_to_bucket_rate_per_sec = 3.0,
                                  .bucket_size = 10,
                                  .initial_bucket_level = 0,
                                  .initial_hopper_level = lim::infinite});
          }) == lim::Errc::config_mismatch);
    auto ex2 = lim::Limiter::open(seg, "raw", {.bucket_size = 99}, lim::adopt_existing);
    CHECK(ex2.bucket_size() == 10);
    CHECK(ex2.hopper_to_bucket_rate_per_sec().value() == 2.0);
    // The same configuration attaches ("Opening an existing key attaches to it").
    auto ex3 = lim::Limiter::open(seg, "raw", kLimiterConfig, now + 5s);
    CHECK(ex3.bucket_size() == 10);
    // TokenBucket
    (void)lim::TokenBucket::open(seg, "emails", kTbOpts);
    CHECK(error_of([&] {
              lim::TokenBucket::open(seg, "emails",
                                     {.burst_size = 11, .sustained_rate_per_sec = 2});
          }) == lim::Errc::config_mismatch);
    CHECK(lim::TokenBucket::open(seg, "emails", {.burst_size = 1}, lim::adopt_existing)
              .burst_size() == 10);
    // Throttle
    (void)lim::Throttle::open(seg, "db", kThOpts);
    CHECK(error_of([&] { lim::Throttle::open(seg, "db", {.max_concurrent_jobs = 9}); }) ==
          lim::Errc::config_mismatch);
    CHECK(lim::Throttle::open(seg, "db", {.max_concurrent_jobs = 1}, lim::adopt_existing)
              .max_concurrent_jobs() == 8);
    // ThrottledRateLimiter
    (void)lim::ThrottledRateLimiter::open(seg, "api", kTrlOpts);
    CHECK(error_of([&] {
              lim::ThrottledRateLimiter::open(
                  seg, "api",
                  {.burst_size = 2, .sustained_rate_per_sec = 2, .max_concurrent_jobs = 3});
          }) == lim::Errc::config_mismatch);
    CHECK(lim::ThrottledRateLimiter::open(seg, "api", {}, lim::adopt_existing)
              .sustained_rate_per_sec() == 1);
    // Semaphore, WeightedSemaphore
    (void)lim::Semaphore::open(seg, "sem", {.capacity = 8});
    CHECK(error_of([&] { lim::Semaphore::open(seg, "sem", {.capacity = 7}); }) ==
          lim::Errc::config_mismatch);
    CHECK(lim::Semaphore::open(seg, "sem", {.capacity = 7}, lim::adopt_existing).capacity() == 8);
    (void)lim::WeightedSemaphore::open(seg, "bytes", kWsOpts);
    CHECK(error_of([&] { lim::WeightedSemaphore::open(seg, "bytes", {.capacity = 1}); }) ==
          lim::Errc::config_mismatch);
    CHECK(lim::WeightedSemaphore::open(seg, "bytes", {.capacity = 1}, lim::adopt_existing)
              .capacity() == 5'000'000);
    // Dispatch
    auto w = lim::BackoffWindow::for_key(seg, "my_api");
    (void)lim::Dispatch::open(seg, {.limiter = w, .key = "my_api", .concurrency = 100});
    CHECK(error_of([&] {
              lim::Dispatch::open(seg, {.limiter = w, .key = "my_api", .concurrency = 101});
          }) == lim::Errc::config_mismatch);
    CHECK(lim::Dispatch::open(seg, {.limiter = w, .key = "my_api"}, lim::adopt_existing)
              .snapshot()
              .concurrency == 100);
    // Within the Jane Street family, another facade under the same key is a mismatch ...
    CHECK(error_of([&] { lim::Throttle::open(seg, "emails", {.max_concurrent_jobs = 10}); }) ==
          lim::Errc::config_mismatch);
    CHECK(error_of([&] { lim::Limiter::open(seg, "emails", kLimiterConfig); }) ==
          lim::Errc::config_mismatch);
    // ... but SPEC's own examples put a Throttle and a Semaphore under "db", and a Dispatch and
    // its BackoffWindow under "my_api": kinds of other families are other records.
    CHECK(lim::Semaphore::open(seg, "db", {.capacity = 8}).capacity() == 8);
    CHECK(lim::Throttle::open(seg, "db", {.max_concurrent_jobs = 8}).max_concurrent_jobs() == 8);
}

// ---------------------------------------------------------------------------------------------
// Time and units

TEST_CASE("SPEC units: InfiniteOrFinite::value() is for finite values only") {
    const lim::InfiniteOrFinite<double> inf = lim::infinite;
    CHECK(inf.is_infinite());
    CHECK_THROWS_AS((void)inf.value(), lim::Error);
    const lim::InfiniteOrFinite<double> two = 2.0;
    CHECK(two.value() == 2.0);
}

TEST_CASE("SPEC units: amounts are rounded up to 1/10,000; the API speaks double tokens") {
    Seg s("spec-round");
    const auto t0 = past();
    auto lim_ = lim::Limiter::open(s.seg, "x",
                                   {.hopper_to_bucket_rate_per_sec = 0.0,
                                    .bucket_size = 1,
                                    .initial_bucket_level = 1,
                                    .initial_hopper_level = 0},
                                   t0);
    CHECK(lim_.try_take(t0, 0.00001) == lim::TryTake::taken);
    CHECK(lim_.in_flight(t0) == doctest::Approx(0.0001).epsilon(1e-12));
    CHECK(lim_.in_bucket(t0) == doctest::Approx(0.9999).epsilon(1e-12));
    lim_.return_to_hopper(t0, 0.0001);
    CHECK(lim_.in_flight(t0) == 0.0);
    lim_.set_hopper_to_bucket_rate_per_sec(t0, lim::infinite);
    CHECK(lim_.in_bucket(t0) == 1.0);
    lim_.set_hopper_to_bucket_rate_per_sec(t0, 0.0);
    CHECK(lim_.try_take(t0, 0.00001) == lim::TryTake::taken);
    // 0.99991 rounds up to 1.0000: more than the 0.9999 left in the bucket.
    CHECK(lim_.try_take(t0, 0.99991) == lim::TryTake::unable);
    CHECK(lim_.try_take(t0, 0.9999) == lim::TryTake::taken);
    lim_.invariant();
}

TEST_CASE("SPEC time: a now earlier than the limiter's last time is moved up, never an error") {
    Seg s("spec-back");
    const auto t0 = past();
    auto tb = lim::TokenBucket::open(
        s.seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 1, .initial_bucket_level = 0},
        t0);
    CHECK(tb.in_bucket(t0 + 5s) == 5.0);
    // Back in time: the reading is at the limiter's time (5 s), not a refill backwards.
    CHECK(tb.in_bucket(t0 + 1s) == 5.0);
    CHECK(tb.try_take(t0, 5.0) == lim::TryTake::taken);
    CHECK(tb.in_bucket(t0) == 0.0);
    CHECK(tb.in_bucket(t0 + 6s) == 1.0);
    CHECK(tb.tokens_may_be_available_when(t0, 1.0).kind() == lim::Availability::Kind::at);
}

TEST_CASE("SPEC time: the drip is floor(elapsed x rate) from creation, never step by step") {
    Seg s("spec-drip");
    const auto t0 = past();
    // 1 token/s: 1 µs drips 0.0001 x 1/100 of a piece; 1,000 reads 1 µs apart lose nothing.
    auto tb = lim::TokenBucket::open(
        s.seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 1, .initial_bucket_level = 0},
        t0);
    for (int i = 1; i <= 1000; ++i)
        (void)tb.in_bucket(t0 + std::chrono::microseconds{i});
    CHECK(tb.in_bucket(t0 + 1ms) == doctest::Approx(0.001).epsilon(1e-12));
    // A rate of 1/3: after 1 s, floor(3333.33) pieces.
    auto third = lim::Limiter::open(s.seg, "third",
                                    {.hopper_to_bucket_rate_per_sec = 1.0 / 3,
                                     .bucket_size = 10,
                                     .initial_bucket_level = 0,
                                     .initial_hopper_level = lim::infinite},
                                    t0);
    for (int i = 1; i <= 100; ++i)
        (void)third.in_bucket(t0 + std::chrono::milliseconds{10 * i});
    CHECK(third.in_bucket(t0 + 1s) == doctest::Approx(0.3333).epsilon(1e-12));
    // A decimal rate means what it says: 0.7/s for 10 s is 7 tokens, though the double 0.7 is
    // a little below 0.7 (the rate in pieces per second, 7,000, is one rounded product).
    auto seven = lim::TokenBucket::open(
        s.seg, "seven",
        {.burst_size = 10, .sustained_rate_per_sec = 0.7, .initial_bucket_level = 0}, t0);
    CHECK(seven.in_bucket(t0 + 10s) == 7.0);
    CHECK(seven.try_take(t0 + 10s, 7) == lim::TryTake::taken);
}

TEST_CASE("SPEC time: drip that finds the bucket full or the hopper empty is lost") {
    Seg s("spec-lost");
    const auto t0 = past();
    // Bucket full for 5 s: nothing banks; after emptying it refills at the rate only.
    auto tb = lim::TokenBucket::open(
        s.seg, "tb", {.burst_size = 4, .sustained_rate_per_sec = 2, .initial_bucket_level = 4}, t0);
    CHECK(tb.try_take(t0 + 5s, 4) == lim::TryTake::taken);
    CHECK(tb.in_bucket(t0 + 5s) == 0.0);
    CHECK(tb.in_bucket(t0 + 6s) == 2.0);
    // Hopper empty for 5 s: a token returned then drips from its return, not at once.
    auto l = lim::Limiter::open(s.seg, "l",
                                {.hopper_to_bucket_rate_per_sec = 1.0,
                                 .bucket_size = 10,
                                 .initial_bucket_level = 1,
                                 .initial_hopper_level = 0},
                                t0);
    CHECK(l.try_take(t0, 1) == lim::TryTake::taken);
    l.return_to_hopper(t0 + 5s, 1);
    CHECK(l.in_bucket(t0 + 5s) == 0.0);
    CHECK(l.in_hopper(t0 + 5s).value() == 1.0);
    CHECK(l.in_bucket(t0 + 5500ms) == 0.5);
    CHECK(l.in_bucket(t0 + 7s) == 1.0);
    CHECK(l.in_hopper(t0 + 7s).value() == 0.0);
}

// ---------------------------------------------------------------------------------------------
// Jane Street family

TEST_CASE("SPEC limiter: try_take outcomes, in flight until returned, over_release") {
    Seg s("spec-take");
    const auto t0 = past();
    auto ex = lim::Limiter::open(s.seg, "raw", kLimiterConfig, t0);  // SPEC's example
    CHECK(ex.bucket_size() == 10);
    CHECK(ex.in_bucket(t0) == 0);
    CHECK(ex.in_hopper(t0).is_infinite());
    CHECK(ex.in_limiter(t0).is_infinite());
    CHECK(ex.in_system(t0).is_infinite());
    CHECK(ex.hopper_to_bucket_rate_per_sec().value() == 2.0);
    CHECK(ex.try_take(t0, 1) == lim::TryTake::unable);
    CHECK(ex.try_take(t0, 10.0001) == lim::TryTake::asked_for_more_than_bucket_size);
    CHECK(ex.try_take(t0 + 1s, 2) == lim::TryTake::taken);
    CHECK(ex.in_flight(t0 + 1s) == 2);
    CHECK(error_of([&] { ex.return_to_hopper(t0 + 1s, 2.0001); }) == lim::Errc::over_release);
    CHECK(ex.in_flight(t0 + 1s) == 2);  // nothing changed
    ex.return_to_hopper(t0 + 1s, 2);
    CHECK(ex.in_flight(t0 + 1s) == 0);
    ex.invariant();
}

TEST_CASE("SPEC limiter: tokens_may_be_available_when's three kinds, time() a lower bound") {
    Seg s("spec-avail");
    const auto t0 = past();
    auto ex = lim::Limiter::open(s.seg, "raw", kLimiterConfig, t0);
    const lim::Availability a = ex.tokens_may_be_available_when(t0, 4);
    REQUIRE(a.kind() == lim::Availability::Kind::at);
    CHECK(a.time() == t0 + 2s);                                            // 4 tokens at 2/s
    CHECK(ex.tokens_may_be_available_when(t0 + 3s, 4).time() == t0 + 3s);  // there now
    CHECK(ex.tokens_may_be_available_when(t0, 11).kind() ==
          lim::Availability::Kind::never_because_greater_than_bucket_size);
    // A finite hopper that holds too few: only a return can help.
    auto th = lim::Throttle::open(s.seg, "th", {.max_concurrent_jobs = 1}, t0);
    REQUIRE(th.try_start_job(t0).kind() == lim::StartJob::Kind::start);
    CHECK(th.tokens_may_be_available_when(t0, 1).kind() ==
          lim::Availability::Kind::when_return_to_hopper_is_called);
    CHECK(th.try_start_job(t0).kind() == lim::StartJob::Kind::max_concurrent_jobs_running);
    th.finish_job(t0);
    CHECK(th.tokens_may_be_available_when(t0, 1).kind() == lim::Availability::Kind::at);
    // time() of another kind is an error, not a value.
    CHECK_THROWS_AS((void)ex.tokens_may_be_available_when(t0, 11).time(), lim::Error);
}

TEST_CASE("SPEC limiter: set_token_target_level lowers hopper, then bucket; drops returns") {
    Seg s("spec-target");
    const auto t0 = past();
    auto l = lim::Limiter::open(s.seg, "l",
                                {.hopper_to_bucket_rate_per_sec = 0.0,
                                 .bucket_size = 10,
                                 .initial_bucket_level = 6,
                                 .initial_hopper_level = 4},
                                t0);
    CHECK(l.in_system(t0).value() == 10);
    REQUIRE(l.try_take(t0, 2) == lim::TryTake::taken);  // bucket 4, hopper 4, flight 2
    l.set_token_target_level(t0, 7.0);                  // -3: from the hopper first
    CHECK(l.in_hopper(t0).value() == 1);
    CHECK(l.in_bucket(t0) == 4);
    l.set_token_target_level(t0, 4.0);  // -3 more: hopper 0, then bucket 2
    CHECK(l.in_hopper(t0).value() == 0);
    CHECK(l.in_bucket(t0) == 2);
    CHECK(l.in_system(t0).value() == 4);
    // In flight alone (2) exceeds the target 1: hopper and bucket empty, returns dropped.
    l.set_token_target_level(t0, 1.0);
    CHECK(l.in_bucket(t0) == 0);
    CHECK(l.in_hopper(t0).value() == 0);
    CHECK(l.in_flight(t0) == 2);
    l.return_to_hopper(t0, 1);  // dropped: the system now holds the target (1)
    CHECK(l.in_hopper(t0).value() == 0);
    CHECK(l.in_system(t0).value() == 1);
    l.return_to_hopper(t0, 1);  // kept
    CHECK(l.in_hopper(t0).value() == 1);
    CHECK(l.in_system(t0).value() == 1);
    // Raising adds to the hopper.
    l.set_token_target_level(t0, 5.0);
    CHECK(l.in_hopper(t0).value() == 5);
    l.set_token_target_level(t0, lim::infinite);
    CHECK(l.in_hopper(t0).is_infinite());
    l.invariant();
}

TEST_CASE("SPEC limiter: a smaller bucket moves its excess to the hopper; rate changes") {
    Seg s("spec-bucket");
    const auto t0 = past();
    auto l = lim::Limiter::open(s.seg, "l",
                                {.hopper_to_bucket_rate_per_sec = 0.0,
                                 .bucket_size = 10,
                                 .initial_bucket_level = 8,
                                 .initial_hopper_level = 1},
                                t0);
    l.set_bucket_size(t0, 5);
    CHECK(l.bucket_size() == 5);
    CHECK(l.in_bucket(t0) == 5);
    CHECK(l.in_hopper(t0).value() == 4);
    CHECK(l.in_system(t0).value() == 9);
    l.set_hopper_to_bucket_rate_per_sec(t0, 1.0);
    CHECK(l.in_bucket(t0 + 10s) == 5);  // full: capped at the bucket size
    CHECK(l.try_take(t0 + 10s, 5) == lim::TryTake::taken);
    l.set_hopper_to_bucket_rate_per_sec(t0 + 10s, lim::infinite);
    CHECK(l.hopper_to_bucket_rate_per_sec().is_infinite());
    CHECK(l.in_bucket(t0 + 10s) == 4);  // at once
    l.invariant();
}

TEST_CASE("SPEC facades: TokenBucket reads and blocking take_until") {
    Seg s("spec-tb");
    const auto t0 = past();
    auto tb = lim::TokenBucket::open(s.seg, "emails",
                                     {.burst_size = 10,
                                      .sustained_rate_per_sec = 2,
                                      .initial_bucket_level = 0});  // SPEC's example
    CHECK(tb.bucket_size() == 10);
    CHECK(tb.in_hopper(t0).is_infinite());
    CHECK(tb.hopper_to_bucket_rate_per_sec().value() == 2);
    CHECK(tb.try_take(11) == lim::TryTake::asked_for_more_than_bucket_size);
    // Not there before the deadline: false, nothing taken.
    CHECK_FALSE(tb.take_until(10, lim::Clock::now() + 1ms));
    CHECK(tb.in_flight() == 0);
    CHECK(tb.take_until(0.01, lim::Clock::now() + 30s));
    CHECK(tb.in_flight() == doctest::Approx(0.01));
    tb.invariant();
}

TEST_CASE("SPEC facades: Throttle and ThrottledRateLimiter start, refuse and finish jobs") {
    Seg s("spec-jobs");
    const auto t0 = past();
    auto th = lim::Throttle::open(s.seg, "db", {.max_concurrent_jobs = 8}, t0);
    CHECK(th.hopper_to_bucket_rate_per_sec().is_infinite());
    CHECK(th.in_system(t0).value() == 8);
    for (int i = 0; i < 8; ++i)
        REQUIRE(th.try_start_job(t0).kind() == lim::StartJob::Kind::start);
    CHECK(th.try_start_job(t0).kind() == lim::StartJob::Kind::max_concurrent_jobs_running);
    CHECK_FALSE(th.start_job_until(lim::Clock::now() + 1ms));
    th.finish_job(t0);
    CHECK(th.in_flight(t0) == 7);
    th.start_job();
    for (int i = 0; i < 8; ++i)
        th.finish_job();
    CHECK(error_of([&] { th.finish_job(t0); }) == lim::Errc::over_release);

    // Bucket min(burst, max_jobs), the rest in the hopper.
    auto trl = lim::ThrottledRateLimiter::open(
        s.seg, "api", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3}, t0);
    CHECK(trl.in_bucket(t0) == 2);
    CHECK(trl.in_hopper(t0).value() == 1);
    CHECK(trl.in_system(t0).value() == 3);
    auto wide = lim::ThrottledRateLimiter::open(
        s.seg, "wide", {.burst_size = 5, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3},
        t0);
    CHECK(wide.in_bucket(t0) == 3);
    CHECK(wide.in_hopper(t0).value() == 0);
    CHECK(wide.bucket_size() == 5);

    REQUIRE(trl.try_start_job(t0).kind() == lim::StartJob::Kind::start);
    REQUIRE(trl.try_start_job(t0).kind() == lim::StartJob::Kind::start);
    const lim::StartJob u = trl.try_start_job(t0);
    REQUIRE(u.kind() == lim::StartJob::Kind::unable_until_at_least);
    CHECK(u.time() == t0 + 1s);  // the hopper's token drips in at 1/s
    REQUIRE(trl.try_start_job(t0 + 1s).kind() == lim::StartJob::Kind::start);
    CHECK(trl.try_start_job(t0 + 10s).kind() == lim::StartJob::Kind::max_concurrent_jobs_running);
    // finish_job returns one token to the hopper, which drips back at the rate.
    trl.finish_job(t0 + 10s);
    CHECK(trl.in_hopper(t0 + 10s).value() == 1);
    CHECK(trl.in_bucket(t0 + 10s) == 0);
    CHECK(trl.in_bucket(t0 + 11s) == 1);
    CHECK_THROWS_AS((void)trl.try_start_job(t0 + 11s).time(), lim::Error);  // start has no time
    trl.invariant();
}

// ---------------------------------------------------------------------------------------------
// Foundation Dispatch family

namespace {
struct FakeTime {
    lim::TimePoint now = lim::Clock::now();
};
}  // namespace

TEST_CASE("SPEC dispatch: DispatchOptions defaults and member order") {
    Seg s("spec-dopts");
    auto window = lim::BackoffWindow::for_key(s.seg, "my_api");
    const lim::DispatchOptions all{
        .limiter = window,
        .key = "all",
        .concurrency = 400,
        .throttled_concurrency = 10,
        .byte_budget = 5'000'000,
        .backoff_window = 10s,
        .byte_penalty_multiplier = 20,
        .acquire_backoff = lim::ExponentialBackoff{.base = 2ms, .max = 50ms, .jitter = 0.25},
        .clock = [] { return lim::Clock::now(); },
        .sleep = [](lim::Duration) {}};
    const lim::DispatchOptions defaults{.limiter = window};
    CHECK(defaults.key == "default");
    CHECK(defaults.concurrency == 400);
    CHECK(defaults.throttled_concurrency == 10);
    CHECK(defaults.byte_budget == 5'000'000);
    CHECK(defaults.backoff_window == 10s);
    CHECK(defaults.byte_penalty_multiplier == 20);
    auto d = lim::Dispatch::open(s.seg, defaults);
    const auto snap = d.snapshot();
    CHECK(snap.concurrency == 400);
    CHECK(snap.throttled_concurrency == 10);
    CHECK(snap.byte_budget == 5'000'000);
    CHECK(snap.in_flight == 0);
    CHECK(snap.throttled_in_flight == 0);
    CHECK(snap.bytes_in_flight == 0);
    CHECK(snap.waiters == 0);
    CHECK_FALSE(snap.backoff_active);
    CHECK(snap.backoff_remaining == 0ns);
    CHECK(d.key() == "default");
    // Same options under the key "all": attaches to nothing else, creates its own.
    CHECK(lim::Dispatch::open(s.seg, all).snapshot().concurrency == 400);
}

TEST_CASE("SPEC dispatch: backoff is active before the deadline and backoff_window after it") {
    Seg s("spec-dback");
    FakeTime t;
    auto window = lim::BackoffWindow::for_key(s.seg, "my_api");
    lim::Dispatch d = lim::Dispatch::open(s.seg, {.limiter = window,
                                                  .key = "my_api",
                                                  .concurrency = 100,
                                                  .throttled_concurrency = 5,
                                                  .byte_budget = 5'000'000,
                                                  .backoff_window = 10s,
                                                  .clock = [&] { return t.now; }});
    const int retry_after_ms = 1500;
    d.set_backoff(std::chrono::milliseconds{retry_after_ms});  // SPEC's call, as written
    const auto set_at = t.now;
    lim::DispatchSnapshot s0 = d.snapshot();
    CHECK(s0.backoff_active);
    CHECK(s0.backoff_remaining == 1500ms);
    // A request decides once, when it starts: under backoff it is throttled and penalised x20.
    std::optional<lim::Permit> p = d.try_acquire(100);
    REQUIRE(p);
    CHECK(p->throttled());
    CHECK(p->bytes() == 2000);
    CHECK(d.snapshot().throttled_in_flight == 1);
    CHECK(d.snapshot().bytes_in_flight == 2000);
    // Deadline passed, within the window: still active, nothing remaining before the deadline.
    t.now = set_at + 1500ms + 9900ms;
    CHECK(d.snapshot().backoff_active);
    CHECK(d.snapshot().backoff_remaining == 0ns);
    CHECK(d.backoff_active());
    // Past the window: inactive; the earlier permit keeps what it was charged.
    t.now = set_at + 1500ms + 10s + 1ms;
    CHECK_FALSE(d.snapshot().backoff_active);
    CHECK_FALSE(d.backoff_active());
    lim::Permit q = d.acquire(100);
    CHECK_FALSE(q.throttled());
    CHECK(q.bytes() == 100);
    CHECK(d.snapshot().bytes_in_flight == 2100);
    p.reset();
    CHECK(d.snapshot().throttled_in_flight == 0);
    CHECK(d.snapshot().bytes_in_flight == 100);
    // BackoffWindow::set never shortens the deadline (a CAS max).
    window.set(60s);
    window.set(1s);
    CHECK(window.should_backoff());
    CHECK(window.remaining() > 50s);
    window.clear();
    CHECK_FALSE(window.should_backoff());
    CHECK(window.remaining() == 0ns);
    window.wait();  // no deadline: returns at once
}

TEST_CASE("SPEC dispatch: with_rate_limit releases on return and on exception") {
    Seg s("spec-dwith");
    auto window = lim::BackoffWindow::for_key(s.seg, "my_api");
    lim::Dispatch d = lim::Dispatch::open(
        s.seg, {.limiter = window, .key = "my_api", .concurrency = 1, .byte_budget = 1000});
    const std::string body(300, 'x');
    const int r = d.with_rate_limit(body.size(), [&] {
        CHECK(d.snapshot().in_flight == 1);
        CHECK(d.snapshot().bytes_in_flight == 300);
        return 7;
    });
    CHECK(r == 7);
    CHECK(d.snapshot().in_flight == 0);
    CHECK_THROWS_AS(d.with_rate_limit(body.size(), [] { throw std::logic_error("boom"); }),
                    std::logic_error);
    const auto snap = d.snapshot();
    CHECK(snap.in_flight == 0);
    CHECK(snap.bytes_in_flight == 0);
    // void-returning bodies work too.
    d.with_rate_limit(1, [] {});
}

TEST_CASE("SPEC dispatch: a cost above the budget is clamped, never a deadlock") {
    Seg s("spec-dclamp");
    auto window = lim::BackoffWindow::for_key(s.seg, "w");
    lim::Dispatch d =
        lim::Dispatch::open(s.seg, {.limiter = window, .key = "d", .byte_budget = 1000});
    {
        lim::Permit p = d.acquire(1'000'000);
        CHECK(p.bytes() == 1000);
        CHECK(d.snapshot().bytes_in_flight == 1000);
        CHECK_FALSE(d.try_acquire(1));  // strict: never above the budget
        CHECK_FALSE(d.acquire_until(1, lim::Clock::now() + 1ms));
    }
    CHECK(d.snapshot().bytes_in_flight == 0);
    std::optional<lim::Permit> p = d.acquire_until(5000, lim::Clock::now() + 30s);
    REQUIRE(p);
    CHECK(p->bytes() == 1000);
    p->release();
    p->release();  // idempotent
    CHECK(d.snapshot().bytes_in_flight == 0);
    CHECK(d.snapshot().in_flight == 0);
}

TEST_CASE("SPEC dispatch: concurrency full -> try_acquire is nullopt, acquire_until times out") {
    Seg s("spec-dfull");
    auto window = lim::BackoffWindow::for_key(s.seg, "w");
    lim::Dispatch d = lim::Dispatch::open(s.seg, {.limiter = window, .key = "d", .concurrency = 2});
    lim::Permit a = d.acquire(0);
    lim::Permit b = d.acquire(0);
    CHECK(d.snapshot().in_flight == 2);
    CHECK_FALSE(d.try_acquire(0).has_value());
    CHECK_FALSE(d.acquire_until(0, lim::Clock::now() + 2ms).has_value());
    CHECK(d.snapshot().in_flight == 2);
    CHECK(d.snapshot().waiters == 0);
}

// ---------------------------------------------------------------------------------------------
// parse_retry_after

TEST_CASE("SPEC retry-after: deltas, the three date forms, past dates, garbage") {
    using std::chrono::milliseconds;
    // Sun, 06 Nov 1994 08:49:37 GMT = 784111777 s since the epoch.
    const std::chrono::system_clock::time_point now{std::chrono::seconds{784111777 - 120}};
    CHECK(lim::parse_retry_after("120") == milliseconds{120'000});
    CHECK(lim::parse_retry_after(" \t120 ") == milliseconds{120'000});
    CHECK(lim::parse_retry_after("0") == milliseconds{0});
    CHECK(lim::parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now) == milliseconds{120'000});
    CHECK(lim::parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now) == milliseconds{120'000});
    CHECK(lim::parse_retry_after("Sun Nov  6 08:49:37 1994", now) == milliseconds{120'000});
    CHECK(lim::parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now + 1h) == milliseconds{0});
    for (const char* bad : {"", "  ", "-1", "-0.5", "abc", "12abc", "1.5"}) {
        CAPTURE(bad);
        CHECK_FALSE(lim::parse_retry_after(bad).has_value());
    }
    // Callers choose their default.
    CHECK(lim::parse_retry_after("soon").value_or(std::chrono::seconds{1}) == 1s);
}

TEST_CASE("SPEC retry-after: header pairs, retry-after-ms first, any case, values trimmed") {
    using std::chrono::milliseconds;
    const std::vector<std::pair<std::string, std::string>> headers{
        {"Content-Type", "text/plain"}, {"RETRY-AFTER", " 7 "}, {"Retry-After-Ms", " 250 "}};
    CHECK(lim::parse_retry_after(headers) == milliseconds{250});
    const std::map<std::string, std::string> only_plain{{"retry-After", "7"}};
    CHECK(lim::parse_retry_after(only_plain) == milliseconds{7000});
    const std::vector<std::pair<std::string_view, std::string_view>> none{{"x", "y"}};
    CHECK_FALSE(lim::parse_retry_after(none).has_value());
    // An invalid retry-after-ms falls back to retry-after.
    const std::vector<std::pair<std::string, std::string>> bad_ms{{"retry-after-ms", "x"},
                                                                  {"retry-after", "3"}};
    CHECK(lim::parse_retry_after(bad_ms) == milliseconds{3000});
}

// ---------------------------------------------------------------------------------------------
// Building blocks

TEST_CASE("SPEC semaphore: members as SPEC writes them") {
    Seg s("spec-sem");
    auto sem = lim::Semaphore::open(s.seg, "db", {.capacity = 8});
    bool ok = sem.try_acquire();
    CHECK(ok);
    sem.acquire();
    ok = sem.acquire_until(6, lim::Clock::now() + 30s);
    CHECK(ok);
    CHECK(sem.in_use() == 8);
    CHECK(sem.capacity() == 8);
    CHECK_FALSE(sem.try_acquire(1));
    CHECK_FALSE(sem.acquire_until(1, lim::Clock::now() + 1ms));
    sem.release(6);
    sem.release();
    CHECK(error_of([&] { sem.release(2); }) == lim::Errc::over_release);
    CHECK(sem.in_use() == 1);
    sem.release();
    CHECK(sem.in_use() == 0);
}

TEST_CASE("SPEC weighted semaphore: amounts above the capacity are clamped on both sides") {
    Seg s("spec-ws");
    auto ws = lim::WeightedSemaphore::open(s.seg, "bytes", {.capacity = 5'000'000});
    CHECK(ws.try_acquire(6'000'000));
    CHECK(ws.in_use() == 5'000'000);
    CHECK_FALSE(ws.try_acquire(1));
    ws.release(6'000'000);
    CHECK(ws.in_use() == 0);
    ws.acquire(9'000'000);
    CHECK(ws.in_use() == 5'000'000);
    ws.release(9'000'000);
    CHECK(ws.acquire_until(7'000'000, lim::Clock::now() + 30s));
    ws.release(7'000'000);
    CHECK(ws.in_use() == 0);
    CHECK(ws.capacity() == 5'000'000);
}

// ---------------------------------------------------------------------------------------------
// Crash recovery

TEST_CASE("SPEC reap: one entry per dead process, with its pid and what was returned") {
    Seg s("spec-reap");
    auto sem = lim::Semaphore::open(s.seg, "db", {.capacity = 8});
    auto tb = lim::Limiter::open(s.seg, "l",
                                 {.hopper_to_bucket_rate_per_sec = 0.0,
                                  .bucket_size = 5,
                                  .initial_bucket_level = 5,
                                  .initial_hopper_level = 0});
    const pid_t child = lim::test::fork_child([&] {
        sem.acquire(3);
        return tb.try_take(2) == lim::TryTake::taken ? 0 : 1;
    });
    REQUIRE(lim::test::wait_child(child) == 0);
    CHECK(sem.in_use() == 3);
    const lim::ReapReport r = s.seg.reap();
    REQUIRE(r.reaped.size() == 1);
    CHECK(r.reaped[0].pid == child);
    double units = 0, tokens = 0;
    for (const auto& h : r.reaped[0].returned) {
        if (h.key == "db") units += h.amount;
        if (h.key == "l") tokens += h.amount;
    }
    CHECK(units == 3);
    CHECK(tokens == 2);
    CHECK(sem.in_use() == 0);
    CHECK(tb.in_flight() == 0);
    CHECK(s.seg.reap().reaped.empty());  // nothing twice
}

// ---------------------------------------------------------------------------------------------
// Where SPEC is silent: what the code chose, pinned so that a change is deliberate

TEST_CASE(
    "SPEC-silent: a key reconfigured since creation still attaches with its creation options") {
    // "a later process that asks for the same key with a different configuration gets
    // config_mismatch": the configuration compared is the one the record was created with, so
    // workers started after a reconfiguration (set_bucket_size, a new target) still attach, and
    // see the configuration in force now.
    Seg s("spec-reconf");
    const lim::LimiterConfig c{.hopper_to_bucket_rate_per_sec = 1.0,
                               .bucket_size = 10,
                               .initial_bucket_level = 0,
                               .initial_hopper_level = lim::infinite};
    auto a = lim::Limiter::open(s.seg, "l", c);
    a.set_bucket_size(5);
    auto b = lim::Limiter::open(s.seg, "l", c);
    CHECK(b.bucket_size() == 5);
    auto th = lim::Throttle::open(s.seg, "t", {.max_concurrent_jobs = 3});
    th.limiter().set_token_target_level(5.0);
    CHECK(lim::Throttle::open(s.seg, "t", {.max_concurrent_jobs = 3}).max_concurrent_jobs() == 5);
    CHECK(error_of([&] { lim::Throttle::open(s.seg, "t", {.max_concurrent_jobs = 5}); }) ==
          lim::Errc::config_mismatch);
}

TEST_CASE("SPEC-silent: open_or_create of an existing segment attaches with its own geometry") {
    SegmentGuard guard(unique_name("spec-geom"));
    auto first =
        lim::Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    auto second =
        lim::Segment::open_or_create(guard.name(), {.max_limiters = 64, .max_processes = 64});
    CHECK(second.info().max_limiters == 4);
    CHECK(second.info().max_processes == 8);
}
