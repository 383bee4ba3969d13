// lim::Dispatch in one process: the seed's behaviours one by one, every option of its table, the
// Permit, the snapshot, configuration checks, and fork.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dispatch/dispatch_state.hpp"
#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/error.hpp"
#include "lim/segment.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::eventually;
using namespace std::chrono_literals;

namespace {

Segment make_segment(lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 16, .max_processes = 64});
}

// A clock the test owns, and a sleep that records each interval and advances the clock by it.
struct FakeTime {
    std::atomic<std::int64_t> now_ns{to_nanos(Clock::now())};
    std::vector<Duration> sleeps;

    TimePoint now() const { return from_nanos(now_ns.load()); }
    void advance(Duration d) { now_ns.fetch_add(d.count()); }
    void install(DispatchOptions& o) {
        o.clock = [this] { return now(); };
        o.sleep = [this](Duration d) {
            sleeps.push_back(d);
            advance(d);
        };
    }
};

void check_idle(const Dispatch& d) {
    const DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 0);
    CHECK(s.throttled_in_flight == 0);
    CHECK(s.bytes_in_flight == 0);
    CHECK(s.waiters == 0);
}

}  // namespace

TEST_CASE("options default to the seed's table") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-defaults"));
    auto seg = make_segment(guard);
    const DispatchOptions o{.limiter = BackoffWindow::for_key(seg, "api")};
    CHECK(o.key == "default");
    CHECK(o.concurrency == 400);
    CHECK(o.throttled_concurrency == 10);
    CHECK(o.byte_budget == 5'000'000);
    CHECK(o.backoff_window == 10s);
    CHECK(o.byte_penalty_multiplier == 20);
    CHECK(o.acquire_backoff.base == 2ms);
    CHECK(o.acquire_backoff.max == 50ms);
    CHECK(o.acquire_backoff.jitter == 0.25);
    auto d = Dispatch::open(seg, o);
    CHECK(d.key() == "default");
    CHECK(d.limiter().key() == "api");
    const DispatchSnapshot s = d.snapshot();
    CHECK(s.concurrency == 400);
    CHECK(s.throttled_concurrency == 10);
    CHECK(s.byte_budget == 5'000'000);
    CHECK_FALSE(s.backoff_active);
    check_idle(d);
}

TEST_CASE("concurrency bounds requests in flight") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-conc"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(
        seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api", .concurrency = 3});
    std::vector<Permit> held;
    for (int i = 0; i < 3; ++i) {
        auto p = d.try_acquire(10);
        REQUIRE(p);
        CHECK_FALSE(p->throttled());
        CHECK(p->bytes() == 10);
        held.push_back(std::move(*p));
    }
    CHECK(d.snapshot().in_flight == 3);
    CHECK(d.snapshot().bytes_in_flight == 30);
    CHECK_FALSE(d.try_acquire(1));
    CHECK_FALSE(d.acquire_until(1, Clock::now() + 10ms));
    held.pop_back();
    CHECK(d.snapshot().in_flight == 2);
    CHECK(d.try_acquire(1));  // taken and released at once (temporary)
    held.clear();
    check_idle(d);
}

TEST_CASE("the byte budget bounds bytes in flight, without backoff at face value") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-bytes"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(
        seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api", .byte_budget = 1000});
    auto a = d.try_acquire(600);
    REQUIRE(a);
    CHECK_FALSE(d.try_acquire(500));  // concurrency has room; the budget has not
    auto b = d.try_acquire(400);
    REQUIRE(b);
    CHECK(d.snapshot().bytes_in_flight == 1000);
    CHECK(d.snapshot().in_flight == 2);
    a->release();
    CHECK(d.snapshot().bytes_in_flight == 400);
    a->release();  // idempotent
    CHECK(d.snapshot().bytes_in_flight == 400);
    b.reset();
    check_idle(d);
    auto zero = d.try_acquire(0);  // a request without a body takes a slot and no bytes
    REQUIRE(zero);
    CHECK(d.snapshot().in_flight == 1);
    CHECK(d.snapshot().bytes_in_flight == 0);
}

TEST_CASE("under backoff: the throttled layer applies and bytes are multiplied by the penalty") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-backoff"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 10,
                                  .throttled_concurrency = 2,
                                  .byte_budget = 10'000,
                                  .byte_penalty_multiplier = 20});
    auto normal = d.try_acquire(100);
    REQUIRE(normal);
    CHECK_FALSE(normal->throttled());
    d.set_backoff(1s);
    CHECK(d.backoff_active());
    CHECK(d.snapshot().backoff_active);
    auto t1 = d.try_acquire(100);
    REQUIRE(t1);
    CHECK(t1->throttled());
    CHECK(t1->bytes() == 2000);  // 100 x 20
    auto t2 = d.try_acquire(50);
    REQUIRE(t2);
    CHECK(t2->bytes() == 1000);
    DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 3);
    CHECK(s.throttled_in_flight == 2);
    CHECK(s.bytes_in_flight == 100 + 2000 + 1000);
    // Concurrency has room (3 of 10) and bytes too, but the throttled layer is full.
    CHECK_FALSE(d.try_acquire(1));
    CHECK(d.snapshot().in_flight == 3);  // the failed attempt gave its slot back
    t1.reset();
    CHECK(d.snapshot().throttled_in_flight == 1);
    auto t3 = d.try_acquire(1);
    REQUIRE(t3);
    CHECK(t3->bytes() == 20);
    // Released in reverse: everything comes back exactly.
    normal.reset();
    t2.reset();
    t3.reset();
    check_idle(d);
}

TEST_CASE("whether a request is throttled is decided once, when it starts acquiring") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-once"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 1,
                                  .throttled_concurrency = 1,
                                  .byte_budget = 1000});
    auto first = d.acquire(10);
    std::atomic<bool> done{false};
    Permit late;
    std::thread t([&] {
        late = d.acquire(10);  // starts before backoff, then waits for the slot
        done = true;
    });
    REQUIRE(eventually([&] { return d.snapshot().concurrency_waiters == 1; }));
    d.set_backoff(1s);  // backoff begins while it waits
    first.release();
    t.join();
    CHECK(done.load());
    CHECK_FALSE(late.throttled());
    CHECK(late.bytes() == 10);  // not penalised
    CHECK(d.snapshot().throttled_in_flight == 0);
    // A permit taken before backoff gives back exactly what it took, after backoff began.
    late.release();
    check_idle(d);
    // And one taken under backoff gives back its throttled slot after backoff ended.
    auto under = d.acquire(10);
    CHECK(under.throttled());
    BackoffWindow::for_key(seg, "api").clear();
    CHECK_FALSE(d.backoff_active());
    under.release();
    check_idle(d);
}

TEST_CASE("set_backoff sleeps no one and blocks nothing by itself") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-nosleep"));
    auto seg = make_segment(guard);
    FakeTime time;
    DispatchOptions o{.limiter = BackoffWindow::for_key(seg, "api"), .key = "api"};
    time.install(o);
    auto d = Dispatch::open(seg, o);
    d.set_backoff(5s);
    std::vector<Permit> held;
    for (int i = 0; i < 10; ++i)
        held.push_back(d.acquire(1));  // up to throttled_concurrency: no waiting at all
    CHECK(time.sleeps.empty());
    CHECK(d.snapshot().throttled_in_flight == 10);
    CHECK_FALSE(d.try_acquire(1));  // the 11th finds the throttled layer full
}

TEST_CASE("backoff counts as active until backoff_window after the deadline (injected clock)") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-window"));
    auto seg = make_segment(guard);
    FakeTime time;
    DispatchOptions o{
        .limiter = BackoffWindow::for_key(seg, "api"), .key = "api", .backoff_window = 10s};
    time.install(o);
    auto d = Dispatch::open(seg, o);
    CHECK_FALSE(d.backoff_active());
    d.set_backoff(2s);
    DispatchSnapshot s = d.snapshot();
    CHECK(s.backoff_active);
    CHECK(s.backoff_remaining == 2s);
    CHECK(s.throttle_remaining == 12s);
    CHECK(d.acquire(1).throttled());

    time.advance(1500ms);  // before the deadline
    CHECK(d.backoff_active());
    CHECK(d.snapshot().backoff_remaining == 500ms);
    CHECK(d.limiter().should_backoff(time.now()));

    time.advance(500ms + 9999ms);  // past the deadline, but within the window: "recent"
    s = d.snapshot();
    CHECK(s.backoff_active);
    CHECK(s.backoff_remaining == 0s);
    CHECK(s.throttle_remaining == 1ms);
    CHECK_FALSE(d.limiter().should_backoff(time.now()));
    auto recent = d.acquire(5);
    CHECK(recent.throttled());
    CHECK(recent.bytes() == 100);
    recent.release();

    time.advance(1ms);  // exactly backoff_window after the deadline: over
    s = d.snapshot();
    CHECK_FALSE(s.backoff_active);
    CHECK(s.throttle_remaining == 0s);
    auto after = d.acquire(5);
    CHECK_FALSE(after.throttled());
    CHECK(after.bytes() == 5);

    // A later 429 extends it again.
    d.set_backoff(1s);
    CHECK(d.backoff_active());
}

TEST_CASE("backoff_window 0: only the deadline itself counts") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-window0"));
    auto seg = make_segment(guard);
    FakeTime time;
    DispatchOptions o{
        .limiter = BackoffWindow::for_key(seg, "api"), .key = "api", .backoff_window = 0s};
    time.install(o);
    auto d = Dispatch::open(seg, o);
    d.set_backoff(1s);
    CHECK(d.backoff_active());
    time.advance(999ms);
    CHECK(d.backoff_active());
    time.advance(1ms);
    CHECK_FALSE(d.backoff_active());
}

TEST_CASE("byte_penalty_multiplier 1 throttles without penalising") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-penalty1"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .byte_penalty_multiplier = 1});
    d.set_backoff(1s);
    auto p = d.acquire(1234);
    CHECK(p.throttled());
    CHECK(p.bytes() == 1234);
}

TEST_CASE("acquire_backoff paces the re-checks: exponential, capped, jittered") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-pacing"));
    auto seg = make_segment(guard);
    FakeTime time;
    DispatchOptions o{.limiter = BackoffWindow::for_key(seg, "api"),
                      .key = "api",
                      .concurrency = 1,
                      .acquire_backoff = {.base = 2ms, .max = 50ms, .jitter = 0.25}};
    time.install(o);
    auto d = Dispatch::open(seg, o);
    auto held = d.acquire(1);
    const TimePoint start = time.now();
    CHECK_FALSE(d.acquire_until(1, start + 300ms));
    CHECK(time.now() == start + 300ms);  // it slept (in fake time) exactly up to its deadline
    REQUIRE(time.sleeps.size() >= 8);
    const double nominal[] = {2, 4, 8, 16, 32, 50, 50};
    for (std::size_t k = 0; k < 7; ++k) {
        CAPTURE(k);
        const double ms = std::chrono::duration<double, std::milli>(time.sleeps[k]).count();
        CHECK(ms <= nominal[k] + 1e-9);
        CHECK(ms >= nominal[k] * 0.75 - 1e-9);
    }
    Duration total{0};
    for (Duration s : time.sleeps)
        total += s;
    CHECK(total == 300ms);
    CHECK(d.snapshot().waiters == 0);
    CHECK(d.snapshot().in_flight == 1);

    // Without jitter the intervals are exact.
    lim::test::SegmentGuard guard2(lim::test::unique_name("d-pacing2"));
    auto seg2 = make_segment(guard2);
    FakeTime time2;
    DispatchOptions o2{.limiter = BackoffWindow::for_key(seg2, "api"),
                       .key = "api",
                       .byte_budget = 10,
                       .acquire_backoff = {.base = 1ms, .max = 4ms, .jitter = 0}};
    time2.install(o2);
    auto d2 = Dispatch::open(seg2, o2);
    auto full = d2.acquire(10);  // the byte layer is the one that waits this time
    CHECK_FALSE(d2.acquire_until(1, time2.now() + 15ms));
    REQUIRE(time2.sleeps.size() == 5);
    CHECK(time2.sleeps[0] == 1ms);
    CHECK(time2.sleeps[1] == 2ms);
    CHECK(time2.sleeps[2] == 4ms);
    CHECK(time2.sleeps[3] == 4ms);
    CHECK(time2.sleeps[4] == 4ms);
    CHECK(d2.snapshot().in_flight == 1);  // the timed-out request gave its slot back
    CHECK(d2.snapshot().waiters == 0);
}

TEST_CASE("a release wakes a blocked acquire without waiting for a re-check") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-wake"));
    auto seg = make_segment(guard);
    // Re-checks every 120 s: only a wake can end the wait within 30 s (the bound below, far
    // enough for a loaded machine).
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 1,
                                  .byte_budget = 100,
                                  .acquire_backoff = {.base = 120s, .max = 120s, .jitter = 0}});
    for (int layer = 0; layer < 2; ++layer) {
        CAPTURE(layer);
        auto held = layer == 0 ? d.acquire(1) : Permit{};
        std::optional<Permit> big;
        if (layer == 1) big = d.acquire(100);  // holds the whole budget and the only slot
        std::atomic<bool> got{false};
        TimePoint released{};
        std::thread t([&] {
            auto p = d.acquire(1);
            got = true;
        });
        REQUIRE(eventually([&] { return d.snapshot().waiters == 1; }));
        released = Clock::now();
        held.release();
        big.reset();
        t.join();
        CHECK(got.load());
        CHECK(Clock::now() - released < 30s);
    }
    check_idle(d);
}

TEST_CASE("a byte cost larger than the budget is clamped to it, so it never deadlocks") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-clamp"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(
        seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api", .byte_budget = 1000});
    auto huge = d.acquire(5000);
    CHECK(huge.bytes() == 1000);
    CHECK(d.snapshot().bytes_in_flight == 1000);
    CHECK_FALSE(d.try_acquire(1));
    huge.release();
    d.set_backoff(1s);
    auto penalised = d.acquire(100);  // 100 x 20 = 2000: clamped
    CHECK(penalised.bytes() == 1000);
    auto overflow = d.try_acquire(std::uint64_t{1} << 62);  // x 20 would overflow 64 bits
    CHECK_FALSE(overflow);
    penalised.release();
    auto max = d.acquire(std::uint64_t{1} << 62);
    CHECK(max.bytes() == 1000);
}

TEST_CASE("the byte budget admits in FIFO order: a queued request blocks newcomers") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-fifo"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(
        seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api", .byte_budget = 1000});
    auto held = d.acquire(800);
    Permit big;
    std::thread t([&] { big = d.acquire(500); });
    REQUIRE(eventually([&] { return d.snapshot().bytes_waiters == 1; }));
    CHECK_FALSE(d.try_acquire(100));     // 200 free, but the 500 is queued first
    CHECK(d.snapshot().in_flight == 2);  // the queued request holds its concurrency slot
    held.release();
    t.join();
    CHECK(big.bytes() == 500);
    CHECK(d.snapshot().bytes_in_flight == 500);
}

TEST_CASE("acquire_until gives up at its deadline, on any layer, holding nothing") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-timeout"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 2,
                                  .throttled_concurrency = 1,
                                  .byte_budget = 1000});
    auto a = d.acquire(1000);
    // Blocked on the byte layer, holding a concurrency slot meanwhile.
    CHECK_FALSE(d.acquire_until(1, Clock::now() + 20ms));
    CHECK(d.snapshot().in_flight == 1);
    auto b = d.acquire(0);
    // Blocked on the concurrency layer.
    CHECK_FALSE(d.acquire_until(1, Clock::now() + 20ms));
    b.release();
    a.release();
    d.set_backoff(1s);
    auto t = d.acquire(1);
    // Blocked on the throttled layer, holding a concurrency slot meanwhile.
    CHECK_FALSE(d.acquire_until(1, Clock::now() + 20ms));
    DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 1);
    CHECK(s.throttled_in_flight == 1);
    CHECK(s.waiters == 0);
    t.release();
    check_idle(d);
}

TEST_CASE("with_rate_limit returns fn's result and releases on return and on exception") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-with"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api"});
    const std::string r = d.with_rate_limit(300, [&] {
        const DispatchSnapshot s = d.snapshot();
        return std::to_string(s.in_flight) + "/" + std::to_string(s.bytes_in_flight);
    });
    CHECK(r == "1/300");  // held while fn ran
    check_idle(d);        // released when it returned

    try {
        d.with_rate_limit(50, [&]() -> int {
            CHECK(d.snapshot().in_flight == 1);
            throw std::runtime_error("boom");
        });
        FAIL("the exception must propagate");
    } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()) == "boom");
    }
    check_idle(d);

    int calls = 0;
    d.with_rate_limit(1, [&] { ++calls; });  // void works too
    CHECK(calls == 1);
    int value = 7;
    int& ref = d.with_rate_limit(1, [&]() -> int& { return value; });
    CHECK(&ref == &value);
    check_idle(d);
}

TEST_CASE("Permit is move-only and releases exactly once") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-permit"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api"});
    static_assert(!std::is_copy_constructible_v<Permit>);
    static_assert(std::is_nothrow_move_constructible_v<Permit>);
    Permit empty;
    CHECK_FALSE(empty.held());
    empty.release();  // nothing to do
    Permit a = d.acquire(10);
    CHECK(a.held());
    Permit b = std::move(a);
    CHECK_FALSE(a.held());
    CHECK(b.held());
    CHECK(d.snapshot().in_flight == 1);
    Permit c = d.acquire(20);
    c = std::move(b);  // releases c's own first
    CHECK(d.snapshot().in_flight == 1);
    CHECK(d.snapshot().bytes_in_flight == 10);
    c = Permit{};
    check_idle(d);
}

TEST_CASE("another process's options are config_mismatch, or adopted on request") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-config"));
    auto seg = make_segment(guard);
    auto window = BackoffWindow::for_key(seg, "api");
    auto d = Dispatch::open(seg, {.limiter = window, .key = "api", .concurrency = 4});
    const auto mismatch = [&](const DispatchOptions& o) {
        try {
            Dispatch::open(seg, o);
            return false;
        } catch (const Error& e) {
            CHECK(std::string(e.what()).find("concurrency 4") != std::string::npos);
            return e.code() == Errc::config_mismatch;
        }
    };
    CHECK(mismatch({.limiter = window, .key = "api", .concurrency = 5}));
    CHECK(
        mismatch({.limiter = window, .key = "api", .concurrency = 4, .throttled_concurrency = 9}));
    CHECK(mismatch({.limiter = window, .key = "api", .concurrency = 4, .byte_budget = 9}));
    CHECK(mismatch({.limiter = window, .key = "api", .concurrency = 4, .backoff_window = 9s}));
    CHECK(mismatch(
        {.limiter = window, .key = "api", .concurrency = 4, .byte_penalty_multiplier = 9}));
    CHECK(mismatch(
        {.limiter = BackoffWindow::for_key(seg, "other"), .key = "api", .concurrency = 4}));
    // Same options (pacing, clock and sleep are the handle's own): attaches.
    auto same = Dispatch::open(seg, {.limiter = window,
                                     .key = "api",
                                     .concurrency = 4,
                                     .acquire_backoff = {.base = 1ms, .max = 1ms}});
    auto p = same.acquire(1);
    CHECK(d.snapshot().in_flight == 1);
    // Adopting takes the stored options, the stored window included.
    auto adopted = Dispatch::open(
        seg, {.limiter = BackoffWindow::for_key(seg, "other"), .key = "api", .concurrency = 99},
        adopt_existing);
    CHECK(adopted.snapshot().concurrency == 4);
    CHECK(adopted.snapshot().in_flight == 1);
    CHECK(adopted.limiter().key() == "api");
}

TEST_CASE("bad options are refused with a clear error and the segment unchanged") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-bad"));
    auto seg = make_segment(guard);
    auto window = BackoffWindow::for_key(seg, "api");
    lim::test::SegmentGuard other_guard(lim::test::unique_name("d-bad-other"));
    auto other_seg = make_segment(other_guard);
    auto foreign = BackoffWindow::for_key(other_seg, "api");
    const auto before = lim::test::segment_file_bytes(guard.name());
    struct Bad {
        const char* what;
        DispatchOptions options;
        Errc code;
    };
    const Bad cases[] = {
        {"concurrency", {.limiter = window, .key = "k", .concurrency = 0}, Errc::invalid_argument},
        {"concurrency",
         {.limiter = window, .key = "k", .concurrency = (std::uint64_t{1} << 31) + 1},
         Errc::invalid_argument},
        {"throttled_concurrency",
         {.limiter = window, .key = "k", .throttled_concurrency = 0},
         Errc::invalid_argument},
        {"byte_budget", {.limiter = window, .key = "k", .byte_budget = 0}, Errc::invalid_argument},
        {"byte_budget",
         {.limiter = window, .key = "k", .byte_budget = (std::uint64_t{1} << 46) + 1},
         Errc::invalid_argument},
        {"backoff_window",
         {.limiter = window, .key = "k", .backoff_window = -1ms},
         Errc::invalid_argument},
        {"byte_penalty_multiplier",
         {.limiter = window, .key = "k", .byte_penalty_multiplier = 0},
         Errc::invalid_argument},
        {"acquire_backoff",
         {.limiter = window, .key = "k", .acquire_backoff = {.base = 0ms}},
         Errc::invalid_argument},
        {"acquire_backoff",
         {.limiter = window, .key = "k", .acquire_backoff = {.base = 5ms, .max = 1ms}},
         Errc::invalid_argument},
        {"jitter",
         {.limiter = window, .key = "k", .acquire_backoff = {.jitter = 1.5}},
         Errc::invalid_argument},
        {"segment", {.limiter = foreign, .key = "k"}, Errc::invalid_argument},
        {"", {.limiter = window, .key = "bad key"}, Errc::invalid_name},
        {"", {.limiter = window, .key = ""}, Errc::invalid_name},
    };
    for (const Bad& b : cases) {
        CAPTURE(b.what);
        try {
            Dispatch::open(seg, b.options);
            FAIL("expected an error");
        } catch (const Error& e) {
            CHECK(e.code() == b.code);
            CHECK(std::string(e.what()).find(b.what) != std::string::npos);
        }
    }
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
}

TEST_CASE("a window opened through another handle of the same segment is the same window") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-handles"));
    auto seg = make_segment(guard);
    auto seg2 = Segment::open(guard.name());
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg2, "api"), .key = "api"});
    BackoffWindow::for_key(seg2, "api").set(1s);
    CHECK(d.backoff_active());
}

TEST_CASE("a Dispatch and its BackoffWindow share a key; several Dispatches share one window") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-shared"));
    auto seg = make_segment(guard);
    auto window = BackoffWindow::for_key(seg, "api");
    auto reads = Dispatch::open(seg, {.limiter = window, .key = "api"});
    auto writes = Dispatch::open(seg, {.limiter = window, .key = "api-writes"});
    window.set(1s);  // e.g. limctl set-backoff, or a client outside any Dispatch
    CHECK(reads.backoff_active());
    CHECK(writes.backoff_active());
    window.clear();
    CHECK_FALSE(reads.backoff_active());
    writes.set_backoff(1s);
    CHECK(reads.backoff_active());
    CHECK(window.should_backoff());
}

TEST_CASE("handles work in a forked child; permits stay with the process that took them") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-fork"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 4,
                                  .byte_budget = 1000});
    Permit parents = d.acquire(100);
    auto* flag = lim::test::shared_array<std::atomic<int>>(2);
    new (flag) std::atomic<int>[2] {};
    const pid_t child = lim::test::fork_child([&] {
        // The inherited permit is the parent's: releasing the child's copy gives back nothing.
        parents.release();
        if (d.snapshot().in_flight != 1) return 1;
        // The inherited handle works, and what the child takes is the child's.
        Permit mine = d.acquire(200);
        if (d.snapshot().in_flight != 2 || d.snapshot().bytes_in_flight != 300) return 2;
        flag[0] = 1;
        while (flag[1].load() == 0)
            std::this_thread::sleep_for(100us);
        return 0;  // mine is released on the way out
    });
    REQUIRE(eventually([&] { return flag[0].load() == 1; }));
    CHECK(d.snapshot().in_flight == 2);  // the parent sees the child's permit
    flag[1] = 1;
    CHECK(lim::test::wait_child(child) == 0);
    CHECK(d.snapshot().in_flight == 1);
    CHECK(d.snapshot().bytes_in_flight == 100);
    parents.release();
    check_idle(d);
}

TEST_CASE("a permit moved to another thread of the acquiring process releases every layer") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-moved"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 4,
                                  .byte_budget = 1000,
                                  .backoff_window = 1s});
    Permit plain = d.acquire(100);  // packed: slot and bytes in one word
    d.set_backoff(1s);
    Permit throttled = d.acquire(10);  // slot, throttled slot and (penalised) bytes
    REQUIRE(throttled.throttled());
    const std::uint64_t bytes = d.snapshot().bytes_in_flight;
    CHECK(bytes > 100);
    // The releasing thread's own ledger holds none of it: the process-wide check lets it go.
    std::thread([&] {
        plain.release();
        throttled.release();
    }).join();
    CHECK(d.snapshot().in_flight == 0);
    CHECK(d.snapshot().throttled_in_flight == 0);
    CHECK(d.snapshot().bytes_in_flight == 0);
    CHECK(seg.reap().reaped.empty());
}

TEST_CASE("threads: no layer is ever exceeded, and everything comes back") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-threads"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 4,
                                  .throttled_concurrency = 2,
                                  .byte_budget = 1000,
                                  .backoff_window = 0s,
                                  .byte_penalty_multiplier = 3});
    std::atomic<long> in_flight{0}, throttled{0}, bytes{0};
    std::atomic<long> peak_in_flight{0}, peak_throttled{0}, peak_bytes{0};
    const auto raise = [](std::atomic<long>& peak, long v) {
        long p = peak.load();
        while (v > p && !peak.compare_exchange_weak(p, v)) {
        }
    };
    std::atomic<bool> stop{false};
    std::thread toggler([&] {
        while (!stop.load()) {
            d.set_backoff(200us);
            std::this_thread::sleep_for(1ms);
        }
    });
    std::vector<std::thread> workers;
    for (int w = 0; w < 6; ++w) {
        workers.emplace_back([&, w] {
            for (int i = 0; i < 2000; ++i) {
                const std::uint64_t n = static_cast<std::uint64_t>((i * 37 + w * 101) % 400);
                std::optional<Permit> p;
                if (i % 3 == 0) {
                    p = d.try_acquire(n);
                    if (!p) continue;
                } else {
                    p = d.acquire(n);
                }
                const auto b = static_cast<long>(p->bytes());
                raise(peak_in_flight, in_flight.fetch_add(1) + 1);
                raise(peak_bytes, bytes.fetch_add(b) + b);
                if (p->throttled()) raise(peak_throttled, throttled.fetch_add(1) + 1);
                if (p->throttled()) throttled.fetch_sub(1);
                bytes.fetch_sub(b);
                in_flight.fetch_sub(1);
            }
        });
    }
    for (auto& t : workers)
        t.join();
    stop = true;
    toggler.join();
    CHECK(peak_in_flight.load() <= 4);
    CHECK(peak_throttled.load() <= 2);
    CHECK(peak_bytes.load() <= 1000);
    check_idle(d);
}

TEST_CASE("a blocked acquire whose sleep or clock throws gives back every layer (issue 9 item 7)") {
    struct Thrown : std::runtime_error {
        Thrown() : std::runtime_error("injected") {}
    };
    for (const bool clock_throws : {false, true}) {
        for (int layer = 0; layer < 3; ++layer) {  // blocked on: slots, throttled, bytes
            CAPTURE(clock_throws);
            CAPTURE(layer);
            lim::test::SegmentGuard guard(lim::test::unique_name("d-throw"));
            auto seg = make_segment(guard);
            std::atomic<bool> armed{false};
            std::atomic<int> sleeps{0};
            DispatchOptions o{.limiter = BackoffWindow::for_key(seg, "api"),
                              .key = "api",
                              .concurrency = layer == 0 ? 1u : 4u,
                              .throttled_concurrency = 1,
                              .byte_budget = 1000,
                              .byte_penalty_multiplier = 1};
            o.clock = [&armed] {
                if (armed.load()) throw Thrown();
                return Clock::now();
            };
            o.sleep = [&](Duration) {
                ++sleeps;
                if (!clock_throws) throw Thrown();
                armed = true;  // the next clock read throws
            };
            auto d = Dispatch::open(seg, o);
            if (layer == 1) d.set_backoff(1h);
            Permit held = d.acquire(layer == 2 ? 800 : 1);
            CHECK_THROWS_AS(d.acquire(500), Thrown);
            CHECK(sleeps.load() == 1);  // it blocked before the throw
            armed = false;
            DispatchSnapshot s = d.snapshot();
            CHECK(s.in_flight == 1);  // only `held`
            CHECK(s.throttled_in_flight == (layer == 1 ? 1u : 0u));
            CHECK(s.bytes_in_flight == (layer == 2 ? 800u : 1u));
            CHECK(s.waiters == 0);  // no sleeper registration and no ticket left behind
            held.release();
            // Nothing stalls: the whole budget is usable at once.
            auto all = d.try_acquire(1000);
            CHECK(all.has_value());
            all.reset();
            check_idle(d);
        }
    }
}

TEST_CASE("a huge backoff_window saturates instead of wrapping (issue 9 item 10)") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-hugewin"));
    auto seg = make_segment(guard);
    FakeTime time;
    DispatchOptions o{.limiter = BackoffWindow::for_key(seg, "api"),
                      .key = "api",
                      .backoff_window = Duration::max()};
    time.install(o);
    auto d = Dispatch::open(seg, o);
    d.set_backoff(1s);
    DispatchSnapshot s = d.snapshot();
    CHECK(s.backoff_active);
    CHECK(s.backoff_remaining == 1s);
    // until + window is beyond int64: the remaining time saturates, never negative.
    CHECK(s.throttle_remaining > std::chrono::hours{24 * 365 * 100});
    time.advance(std::chrono::hours{24 * 365});
    s = d.snapshot();
    CHECK(s.backoff_active);
    CHECK(s.throttle_remaining > std::chrono::hours{24 * 365 * 100});
    CHECK(d.acquire(1).throttled());
}

TEST_CASE("limits too wide to pack in one word: each layer in its own word, same behaviour") {
    // concurrency > 32,767 or byte_budget >= 2^32 cannot share the packed word.
    for (const bool wide_budget : {false, true}) {
        CAPTURE(wide_budget);
        lim::test::SegmentGuard guard(lim::test::unique_name("d-unpacked"));
        auto seg = make_segment(guard);
        const std::uint64_t budget = wide_budget ? (std::uint64_t{1} << 40) : 1000;
        auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                      .key = "api",
                                      .concurrency = wide_budget ? 2u : 40'000u,
                                      .throttled_concurrency = 1,
                                      .byte_budget = budget,
                                      .byte_penalty_multiplier = 2});
        // Fill the limiting layer, then a blocked request is woken by a release.
        std::vector<Permit> held;
        if (wide_budget) {
            held.push_back(d.acquire(budget - 10));
            held.push_back(d.acquire(10));
            CHECK_FALSE(d.try_acquire(0));  // both slots taken
        } else {
            held.push_back(d.acquire(800));
            CHECK_FALSE(d.try_acquire(300));
        }
        Permit later;
        std::thread t([&] { later = d.acquire(wide_budget ? 5 : 300); });
        REQUIRE(eventually([&] { return d.snapshot().waiters == 1; }));
        if (!wide_budget) CHECK_FALSE(d.try_acquire(1));  // FIFO: queued first
        DispatchSnapshot s = d.snapshot();
        CHECK(s.concurrency_waiters == (wide_budget ? 1u : 0u));
        CHECK(s.bytes_waiters == (wide_budget ? 0u : 1u));
        held.back().release();
        t.join();
        CHECK(later.held());
        later.release();
        held.clear();
        check_idle(d);
        // Under backoff: throttled and penalised, given back exactly.
        d.set_backoff(1h);
        auto p = d.acquire(100);
        CHECK(p.throttled());
        CHECK(p.bytes() == 200);
        CHECK_FALSE(d.try_acquire(1));  // the throttled layer is full
        s = d.snapshot();
        CHECK(s.throttled_in_flight == 1);
        CHECK(s.bytes_in_flight == 200);
        p.release();
        BackoffWindow(d.limiter()).clear();
        check_idle(d);
    }
}

TEST_CASE("packed: a permit without backoff is one word; sleepers and the queue share it") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-packed"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 2,
                                  .byte_budget = 1000});
    auto a = d.acquire(600);
    // A byte request queues (holding its slot), then a slot request sleeps: both counted in the
    // packed word, and each is woken by the release that lets it proceed.
    Permit b;
    std::thread tb([&] { b = d.acquire(600); });
    REQUIRE(eventually([&] { return d.snapshot().bytes_waiters == 1; }));
    Permit c;
    std::thread tc([&] { c = d.acquire(0); });
    REQUIRE(eventually([&] { return d.snapshot().concurrency_waiters == 1; }));
    DispatchSnapshot s = d.snapshot();
    CHECK(s.in_flight == 2);
    CHECK(s.bytes_in_flight == 600);
    CHECK(s.waiters == 2);
    CHECK_FALSE(d.try_acquire(1));
    // One CAS frees a slot and 600 bytes: the queued request gets its bytes and the slot
    // sleeper gets the slot, both woken by that one release.
    a.release();
    tb.join();
    tc.join();
    CHECK(b.bytes() == 600);
    CHECK(c.held());
    s = d.snapshot();
    CHECK(s.waiters == 0);
    CHECK(s.in_flight == 2);
    CHECK(s.bytes_in_flight == 600);
    b.release();
    c.release();
    check_idle(d);
}

TEST_CASE("the common permit waits aside while its word is frozen, and changes nothing meanwhile") {
    lim::test::SegmentGuard guard(lim::test::unique_name("d-quick"));
    auto seg = make_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 4,
                                  .byte_budget = 1000});
    std::optional<Permit> held = d.try_acquire(100);  // packed: slot and bytes in one word
    REQUIRE(held.has_value());
    detail::SegmentState& state = *seg.state();
    const std::uint32_t record = *detail::find_record(state, detail::RecordKind::dispatch, "api");

    // As a reaper would: hold the recovery lock (nobody thaws early) and freeze the words.
    auto recovery = detail::FileLock::try_lock_fresh(state.fd(), detail::LockByte::recovery);
    REQUIRE(recovery.has_value());
    detail::kDispatchOps.freeze(state, record);
    const auto frozen_at = std::chrono::steady_clock::now();
    std::atomic<int> done{0};
    std::thread other([&] {
        // This thread's slot in its cache first, so that the try below takes the uncontended
        // path (QuickHold) and meets the frozen word there, not in the general path's Hold.
        static_cast<void>(detail::holder(state));
        std::optional<Permit> p = d.try_acquire(10);
        done = p.has_value() ? 1 : -1;
        held->release();  // the permit of another thread of this process: the general path
        p.reset();
        done = 2;
    });
    std::this_thread::sleep_for(20ms);
    // Read while the freeze is younger than kFrozenBreakTimeout (measured after the reads): past
    // it the other thread thaws the words itself (the reaper is presumed stopped) and goes on,
    // which only a badly loaded machine that descheduled this thread that long lets happen.
    const int done_frozen = done.load();
    auto& word = reinterpret_cast<detail::DispatchBody*>(state.record(record).body)->concurrency;
    const std::uint64_t word_frozen = word.load();
    if (std::chrono::steady_clock::now() - frozen_at < detail::kFrozenBreakTimeout) {
        CHECK(done_frozen == 0);
        CHECK(detail::DispatchPacked::kSlots.in_use(word_frozen) == 1);
        CHECK(detail::DispatchPacked::kBytes.in_use(word_frozen) == 100);
    } else {
        MESSAGE("this thread stalled past the break timeout: the frozen-window checks skipped");
    }
    detail::kDispatchOps.thaw(state, record);
    recovery.reset();
    other.join();
    CHECK(done.load() == 2);
    CHECK(d.snapshot().in_flight == 0);
    CHECK(d.snapshot().bytes_in_flight == 0);
    CHECK(seg.reap().reaped.empty());
}
