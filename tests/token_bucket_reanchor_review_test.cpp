// Adversarial review of the token bucket's exact re-anchors (issue 11, third pass: exact_anchor,
// LimiterCore::reanchor_drip, reanchor_for_short_drip; docs/design.md ("The Limiter family"),
// "Exact re-anchors" and "The short drip, kept by re-anchoring").
//
// Each decision of the real take is compared with a 128-bit model of the same marker (GCRA) that
// is never re-anchored, over random whole rates (steps of 1 ns to 1 s, lcm(R, 10^9) on both sides
// of 2^62, up to kShortDripMaxRate), explicit `now`s that jump forward across whole windows of the
// short form, land exactly on its overflow boundary, repeat, and go backwards (a stale `now`:
// moved up to the limiter's time L, read from the segment before each take), and take sizes equal
// to what the bucket holds (a re-anchor that lost a unit refuses them; one that gained a unit
// admits the size one above, which the model refuses).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "lim/segment.hpp"
#include "lim/token_bucket.hpp"
#include "limiter/generation_checkpoint.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/segment_state.hpp"
#include "support/admissions.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/many_reanchors.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::body_of;
using lim::test::generation;
using lim::test::t0;

namespace {

__extension__ using i128 = __int128;
__extension__ using u128 = unsigned __int128;

std::int64_t current_anchor(const detail::LimiterBody& body) {
    return body.config[generation(body) & 1].anchor_ns.load();
}

// The token bucket's marker, never re-anchored: D(t) = floor((t - start) R / 10^9) in 128 bits
// (0 before start); the bucket at t holds clamp(min(D(t) - X, C), 0); a take of n at t succeeds
// iff it holds n, and then X <- max(X, D(t) - C) + n (docs/design.md, "TokenBucket's take"). Its
// time is the take's, max(now, L), so it is exact under stale `now`s too.
struct MarkerModel {
    i128 start;
    i128 rate;  // R, whole units per second
    i128 size;  // C
    i128 x;
    i128 drip(i128 t) const { return t <= start ? 0 : (t - start) * rate / 1'000'000'000; }
    i128 level(i128 t) const { return std::max<i128>(0, std::min(drip(t) - x, size)); }
    bool take(i128 t, i128 n) {
        if (level(t) < n) return false;
        x = std::max(x, drip(t) - size) + n;
        return true;
    }
    // The documented re-anchor where it cannot be exact (lcm(R, 10^9) > 2^62): at `a`, dropping
    // the fraction of D(a) (under one unit lost, never gained).
    void reanchor(i128 a) {
        x = std::max(x - drip(a), -size);
        start = a;
    }
};

// Whether exact_anchor applies to R: lcm(R, 10^9) <= 2^62.
bool exact_rate(std::uint64_t r) {
    const std::uint64_t step = 1'000'000'000 / std::gcd(r, std::uint64_t{1'000'000'000});
    return static_cast<i128>(step) * r <= (static_cast<i128>(1) << 62);
}

// Whole rates (units per second, R) chosen to stress exact_anchor: its step 10^9 / gcd(R, 10^9)
// from 1 ns to 1 s, lcm(R, 10^9) = R x step just below and just above 2^62 (where the re-anchor
// falls back to the switch time), and the largest rate that still re-anchors.
std::vector<std::uint64_t> adversarial_rates(std::mt19937_64& rng) {
    std::vector<std::uint64_t> rates = {
        100'000'000'000,  // 10^7 tokens/s: step 1 ns, a window of 184 ms
        184'467'440'737,  // kShortDripMaxRate: step 1 s, lcm > 2^62 (at the switch time)
        184'467'440'640,  // step 390,625 ns, a window of 100 ms
        4'611'686'017,    // step 1 s, lcm = R x 10^9 just below 2^62 (exact)
        4'611'686'019,    // step 1 s, lcm just above 2^62 (at the switch time)
        9'223'372'036,    // step 0.25 s, lcm = 2^61
        1'048'576'000,    // step 15,625 ns
        20'000'000,       // step 50 ns, a window of 922 s
        123'456'789'012,  // step 0.25 s, lcm > 2^62 (at the switch time)
        33'554'432,       // 2^25: step 1,953,125 ns
    };
    for (int i = 0; i < 14; ++i) {
        // Random whole rates from 2 x 10^7 units/s (a window of 922 s) to kShortDripMaxRate, with
        // a random number of factors of 2 and 5 (steps of every size).
        std::uint64_t r = 20'000'000 + rng() % (184'467'440'737 - 20'000'000);
        const int twos = static_cast<int>(rng() % 10), fives = static_cast<int>(rng() % 10);
        r >>= twos;
        for (int k = 0; k < fives; ++k)
            r /= 5;
        for (int k = 0; k < twos; ++k)
            r <<= 1;
        for (int k = 0; k < fives; ++k)
            r *= 5;
        rates.push_back(std::max<std::uint64_t>(r, 20'000'000));
    }
    return rates;
}

}  // namespace

TEST_CASE(
    "review: random whole rates, `now`s forward/backward/on the boundary, takes of the "
    "exact level: every decision as the never-re-anchored 128-bit marker") {
    std::mt19937_64 rng(20261201);
    const std::int64_t start = to_nanos(t0);
    // Explicit times stay below the clock (t0 is 100,000 s before it), so none is clamped.
    const std::int64_t limit = start + 90'000LL * 1'000'000'000;
    for (const std::uint64_t rate_units : adversarial_rates(rng)) {
        const double rate = static_cast<double>(rate_units) / 10'000;
        const detail::DripRate dr = detail::DripRate::from_rate(rate);
        CAPTURE(rate_units);
        if (dr.shift != 0 || dr.m != rate_units) {  // not exactly representable
            MESSAGE("R " << rate_units << " skipped: not a whole number of units as a double");
            continue;
        }
        lim::test::SegmentGuard guard(lim::test::unique_name("tb-rv3"));
        auto seg = lim::test::limiter_segment(guard);
        constexpr double kBurst = 1000;
        const bool full = rng() % 2 == 0;
        auto tb = TokenBucket::open(seg, "tb",
                                    {.burst_size = kBurst,
                                     .sustained_rate_per_sec = rate,
                                     .initial_bucket_level = full ? kBurst : 0},
                                    t0);
        detail::LimiterBody& body = body_of(seg, "tb");
        const std::uint32_t gen0 = generation(body);
        const i128 size = static_cast<i128>(kBurst) * 10'000;
        MarkerModel model{start, rate_units, size, full ? -size : 0};
        // The short form's window: (t - anchor) x R overflows 64 bits from this elapsed time on.
        const std::int64_t window =
            static_cast<std::int64_t>((static_cast<i128>(1) << 64) / rate_units) + 1;
        std::int64_t now = start, max_now = start;
        long takes = 0, taken = 0;
        for (int i = 0; i < 12'000; ++i) {
            switch (rng() % 8) {
                case 0:
                case 1:
                case 2:
                    now = max_now + static_cast<std::int64_t>(rng() % 50'001);
                    break;
                case 3: {  // exactly around the short form's overflow boundary
                    const std::int64_t b =
                        current_anchor(body) + window - 2 + static_cast<std::int64_t>(rng() % 4);
                    now = b > max_now ? b : max_now + 1;
                    break;
                }
                case 4:  // a whole window or more ahead (several re-anchors' worth)
                    now = max_now +
                          static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(3 * window));
                    break;
                case 5:  // a stale `now`: behind the last one by up to 2 ms
                    now = max_now - static_cast<std::int64_t>(rng() % 2'000'001);
                    break;
                case 6:  // the same `now` again
                    now = max_now;
                    break;
                default:  // far behind (before the anchor, even before creation)
                    now = max_now - static_cast<std::int64_t>(rng() % 4'000'000'000);
                    break;
            }
            if (now > limit) now = max_now;
            max_now = std::max(max_now, now);
            // The take runs at max(now, L); L only rises, and the take itself raises it to that
            // time at most, so L read here is the L the take uses.
            const std::int64_t t = std::max(now, body.time_ns.load());
            const i128 level = model.level(t);
            i128 n = 0;
            switch (rng() % 4) {
                case 0:
                    n = level > 0 ? level : 1;
                    break;
                case 1:
                    n = std::min(level + 1, size);
                    break;
                case 2:
                    n = size;
                    break;
                default:
                    n = 1 + static_cast<i128>(rng() % static_cast<std::uint64_t>(size));
                    break;
            }
            const std::uint32_t gen_before = generation(body);
            const std::int64_t anchor_before = current_anchor(body);
            const TryTake got = tb.try_take(from_nanos(now), static_cast<double>(n) / 10'000);
            if (generation(body) != gen_before) {
                // The take re-anchored first (a single process: nothing else switches).
                const std::int64_t a = current_anchor(body);
                REQUIRE(a <= t);
                REQUIRE(a >= anchor_before);
                if (exact_rate(rate_units)) {
                    // exact: (a - anchor) x R / 10^9 whole, so nothing to do in the model
                    REQUIRE(static_cast<i128>(a - anchor_before) * rate_units % 1'000'000'000 == 0);
                } else {
                    REQUIRE(a == t);
                    model.reanchor(a);
                }
            }
            const bool expect = model.take(t, n);
            ++takes;
            if (got == TryTake::taken) ++taken;
            REQUIRE_MESSAGE((got == TryTake::taken) == expect,
                            "take " << takes << " of " << static_cast<std::int64_t>(n)
                                    << " units at +" << t - start << " ns (level "
                                    << static_cast<std::int64_t>(level) << ")");
        }
        const std::uint32_t switches = (generation(body) - gen0) & 0xFFFF;
        MESSAGE("R " << rate_units << ": " << takes << " takes, " << taken << " taken, " << switches
                     << " re-anchors"
                     << std::string(exact_rate(rate_units) ? " (exact)" : " (at the switch time)"));
        CHECK(taken > 0);
        CHECK(switches > 0);
        const std::int64_t t = std::max(max_now, body.time_ns.load());
        CHECK(std::llround(tb.in_bucket(from_nanos(t)) * 10'000) ==
              static_cast<std::int64_t>(model.level(t)));
    }
}

TEST_CASE("review: a bucket created at a far-past `now` re-anchors without signed overflow") {
    // The creation time is bounded only from above (bounded_now_ns), so the anchor may be near
    // INT64_MIN; a take at the clock then has (t - anchor) above INT64_MAX. drip_at saturates such
    // an elapsed time; exact_anchor computed anchor + (int64_t)(t - anchor - rem), a signed
    // overflow (UB: UBSan stops the test here).
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-rv3-far"));
    auto seg = lim::test::limiter_segment(guard);
    const TimePoint long_ago = from_nanos(std::numeric_limits<std::int64_t>::min() + 1);
    auto tb =
        TokenBucket::open(seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 1e7}, long_ago);
    detail::LimiterBody& body = body_of(seg, "tb");
    const std::uint32_t gen0 = generation(body);
    const TimePoint now = Clock::now();
    // Infinitely long ago: the bucket is full, and exactly full.
    CHECK(tb.try_take(now, 10) == TryTake::taken);
    CHECK(generation(body) != gen0);  // re-anchored
    const std::int64_t a = current_anchor(body);
    CHECK(a <= to_nanos(now));
    CHECK(a > to_nanos(now) - 1'000'000'000);
    CHECK(tb.try_take(now, 0.0001) == TryTake::unable);
    CHECK(tb.try_take(now + std::chrono::microseconds(1), 10) == TryTake::taken);
}

namespace {

// One attempt of the token bucket's inline take (bucket_take_once in token_bucket.cpp), split at
// the point where a taker can be stopped: `Stale` is what it loaded and decided before its CAS;
// `land` is its CAS, whenever the taker runs again. (The inline attempt has no `_from` entry
// point for tests, so its steps are written out here, field by field as it reads them.)
struct StaleTake {
    std::uint64_t s = 0;
    std::uint64_t next = 0;
    bool decided = false;
};

StaleTake load_and_decide(const detail::LimiterBody& body, std::int64_t now_ns, std::int64_t n) {
    StaleTake st;
    st.s = body.bucket.load();
    const std::uint32_t gen = detail::BucketWord::gen(st.s);
    const detail::ConfigBlock& c = body.config[gen & 1];
    const std::int64_t size = c.bucket_size.load();
    const std::int64_t t = std::max(now_ns, body.time_ns.load());
    const std::int64_t elapsed = t - c.anchor_ns.load();
    const auto p = static_cast<u128>(elapsed) * c.drip_m.load();
    REQUIRE(c.drip_shift.load() == 0);
    REQUIRE(p < (static_cast<u128>(1) << 64));  // the short form
    const auto d = static_cast<std::int64_t>(p / 1'000'000'000);
    const std::int64_t x = detail::BucketWord::x(st.s);
    st.decided = d - x >= n && d <= detail::kRebaseAt;
    st.next = detail::BucketWord::make(gen, std::max(x, d - size) + n);
    return st;
}

bool land(detail::LimiterBody& body, StaleTake st) {
    return body.bucket.compare_exchange_strong(st.s, st.next);
}

}  // namespace

// The 16-bit generation's limit, with this file's 100 ms windows (many_reanchors.hpp): 65,536
// re-anchors bring S back to the word a stopped taker loaded (docs/design.md, "Generation
// checkpoints"). Until layout 5 this case was marked should_fail: the CAS landed and admitted
// half a bucket beyond burst + rate x T. Now the re-anchor to the checkpoint generation, and
// every switch there in the second after it, is refused while the taker, announced as the
// library's take announces, is stopped.
TEST_CASE(
    "review: 65,536 re-anchors would bring S back; a taker stopped between its load and its "
    "CAS holds the generation at a checkpoint, and nothing beyond burst + rate x T is "
    "admitted") {
    // 10^7 tokens/s (R = 10^11 units/s, exact_anchor's step 1 ns): a re-anchor is due every
    // W = ceil(2^64 / R) ns = 184.5 ms, so 65,536 of them (the 16-bit generation's wrap) take
    // 3.4 hours of time; before the short drip's re-anchors the only re-anchor at this rate was
    // the one at D > 2^45 (every 351 s: 266 days to wrap).
    constexpr std::int64_t kR = 100'000'000'000;
    constexpr std::int64_t kW = 184'467'441;  // ceil(2^64 / R)
    // A bucket of exactly one window's drip (1,844,674.41 tokens), taken whole once per window:
    // every take drains it, and each re-anchor leaves X = -C, the take after it X = 0, so S is
    // (generation, 0) after every cycle.
    constexpr std::int64_t kC = kW * (kR / 1'000'000'000);
    static_assert(kC == 18'446'744'100);
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-rv3-wrap"));
    auto seg = lim::test::limiter_segment(guard);
    const double burst = static_cast<double>(kC) / 10'000;
    auto tb = TokenBucket::open(
        seg, "tb",
        {.burst_size = burst, .sustained_rate_per_sec = 1e7, .initial_bucket_level = burst}, t0);
    detail::LimiterBody& body = body_of(seg, "tb");
    const std::uint32_t record = lim::test::record_of(seg, "tb");
    const std::int64_t start = to_nanos(t0);
    std::int64_t admitted = 0;
    REQUIRE(tb.try_take(t0, burst) == TryTake::taken);
    admitted += kC;
    REQUIRE(detail::BucketWord::x(body.bucket.load()) == 0);

    // A taker (another thread here) announces its attempt in its slot and loads S half a window
    // later: the bucket holds half of C; it decides to take that half and is stopped (SIGSTOP, a
    // debugger, a suspended job) before its CAS.
    const std::int64_t half = kW / 2 * (kR / 1'000'000'000);  // D(start + W/2)
    std::atomic<int> phase{0};
    StaleTake stale;
    bool landed = false;
    std::thread taker([&] {
        detail::SlotHeader& slot = *detail::holder(*seg.state()).slot;
        slot.pending.store((record + 1) | detail::kBucketTakeTag);
        stale = load_and_decide(body, start + kW / 2, half);
        phase = 1;
        while (phase.load() != 2)
            std::this_thread::sleep_for(std::chrono::milliseconds{1});
        landed = land(body, stale);
        slot.pending.store(0);
    });
    while (phase.load() != 1)
        std::this_thread::sleep_for(std::chrono::milliseconds{1});
    REQUIRE(stale.decided);

    // Meanwhile the others drain the bucket once per window: every drip is taken. The re-anchor
    // to the checkpoint generation is refused (the taker is announced), and its retries, 1,024
    // takes later, within the second that refusal is remembered; the takes go on with the drip's
    // long form (past 2^45 units of drip the soft rebases are refused the same way).
    std::int64_t t = start;
    int stuck = 0;
    for (int k = 0; k < 65'536 && stuck < 2'100; ++k) {
        t += kW;
        REQUIRE(tb.try_take(from_nanos(t), burst) == TryTake::taken);
        admitted += kC;
        if (generation(body) == detail::kGenerationCheckpoint - 1) ++stuck;
    }
    CHECK(stuck == 2'100);
    CHECK(generation(body) == detail::kGenerationCheckpoint - 1);
    CHECK(body.bucket.load() != stale.s);
    // A rebase that may wait makes the checkpoint, and is refused: the taker is announced.
    detail::LimiterCore core(*seg.state(), record);
    CHECK_FALSE(core.rebase(t, Clock::now() + std::chrono::milliseconds{300}));
    CHECK(generation(body) == detail::kGenerationCheckpoint - 1);

    // The stopped taker runs again: its CAS fails (the library's take would decide again).
    phase = 2;
    taker.join();
    CHECK_FALSE(landed);
    if (landed) admitted += half;
    const std::int64_t bound =
        kC + static_cast<std::int64_t>(static_cast<i128>(t - start) * kR / 1'000'000'000);
    MESSAGE("admitted " << admitted << " units over " << (t - start) / 1'000'000'000
                        << " s; burst + rate x T = " << bound);
    CHECK(admitted <= bound);
    // With the taker gone, a rebase that may wait moves the generation past the checkpoint (once
    // the refusal's memo, kCheckpointMemo, has passed), and the re-anchors resume.
    CHECK(lim::test::eventually(
        [&] { return core.rebase(t, Clock::now() + std::chrono::seconds{5}); }));
    CHECK(generation(body) == detail::kGenerationCheckpoint);
    // (This thread's re-anchors resume after the 1,024 chances it skips after one that did not
    // re-anchor.)
    for (int k = 0; k < 1'100 && generation(body) == detail::kGenerationCheckpoint; ++k) {
        t += kW;
        REQUIRE(tb.try_take(from_nanos(t), burst) == TryTake::taken);
    }
    CHECK(generation(body) == detail::kGenerationCheckpoint + 1);
}

TEST_CASE(
    "review: forked takers racing re-anchors and a Limiter handle's reconfigurations: "
    "never more than the largest burst + the fastest rate x T") {
    // 3 processes take at a shared explicit clock (each attempt advances it 2 us; times stale by
    // a few attempts), while a 4th, through a Limiter handle adopting the record, switches the
    // bucket size between 50 and 30 tokens and the rate between 10^7 tokens/s (exact re-anchors,
    // step 1 ns) and 12,345,678.9 tokens/s (step 1 ms), at the clock's time: its
    // switches (config lock waited for) race the takers' re-anchors (tried) and their CASes.
    constexpr int kTakers = 3;
    constexpr int kAttempts = 300'000;
    constexpr double kBurstMax = 50;
    constexpr double kRateMax = 12'345'678.9;
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-rv3-mp"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 64});
    auto tb =
        TokenBucket::open(seg, "tb", {.burst_size = kBurstMax, .sustained_rate_per_sec = 1e7}, t0);
    const detail::LimiterBody& body = body_of(seg, "tb");
    const std::uint32_t gen0 = generation(body);
    auto* clock = lim::test::shared_clock(t0);
    auto* done = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>(0);
    const lim::test::AdmissionLog log(kTakers, kAttempts);
    std::vector<pid_t> kids;
    for (int p = 0; p < kTakers; ++p) {
        kids.push_back(lim::test::fork_child([&, p] {
            lim::test::take_on_clock(tb, clock, log, p, kAttempts);
            done->fetch_add(1);
            return 0;
        }));
    }
    const pid_t switcher = lim::test::fork_child([&] {
        auto l = Limiter::open(seg, "tb", {.bucket_size = 1}, lim::adopt_existing, t0);
        std::uint64_t i = 0;
        while (done->load() < kTakers) {
            const TimePoint now = from_nanos(clock->load());
            if (i % 2 == 0) {
                l.set_bucket_size(now, i % 4 == 0 ? 30 : kBurstMax);
            } else {
                l.set_hopper_to_bucket_rate_per_sec(now, i % 4 == 1 ? kRateMax : 1e7);
            }
            ++i;
            // Not too often: the takers' own re-anchors must get the lock too.
            for (int spin = 0; spin < 20'000; ++spin)
                (void)clock->load();
        }
        return 0;
    });
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    CHECK(lim::test::wait_child(switcher) == 0);

    const std::vector<lim::test::Admission> all = log.all();
    REQUIRE(all.size() > 1000);
    // Slack: one unit, the drip's floor over a window (a rate switch re-anchors at its time and
    // only loses; an exact re-anchor neither loses nor gains).
    const auto check = lim::test::check_bucket(all, kBurstMax * 10'000, kRateMax * 10'000, 1, 256);
    const std::uint32_t switches = (generation(body) - gen0) & 0xFFFF;
    MESSAGE(all.size() << " admissions, " << check.windows << " windows, worst excess "
                       << check.worst_excess_units << " units, " << switches << " switches");
    CHECK(check.worst_excess_units <= 0);
    CHECK(switches >= 10);
}

TEST_CASE(
    "review: garbage in the active block, S and L: takes and their re-anchors neither "
    "crash nor overflow") {
    // A corrupt segment (values read from it are bounded before use): the re-anchor path runs
    // before the take's own checks, so it meets whatever the block says. Run under UBSan.
    std::mt19937_64 rng(99);
    const auto pick = [&rng]() -> std::int64_t {
        switch (rng() % 6) {
            case 0:
                return std::numeric_limits<std::int64_t>::min() +
                       static_cast<std::int64_t>(rng() % 4);
            case 1:
                return std::numeric_limits<std::int64_t>::max() -
                       static_cast<std::int64_t>(rng() % 4);
            case 2:
                return static_cast<std::int64_t>(rng() % 2'000'000'000'000) - 1'000'000'000'000;
            case 3:
                return to_nanos(Clock::now()) - static_cast<std::int64_t>(rng() % 4'000'000'000);
            default:
                return static_cast<std::int64_t>(rng());
        }
    };
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-rv3-garbage"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 1e7}, t0);
    detail::LimiterBody& body = body_of(seg, "tb");
    long taken = 0;
    for (int i = 0; i < 20'000; ++i) {
        detail::ConfigBlock& c = body.config[generation(body) & 1];
        c.flags.store(rng() % 8 == 0 ? static_cast<std::uint32_t>(rng() % 8)
                                     : detail::kTargetInfinite);
        c.drip_shift.store(rng() % 8 == 0 ? static_cast<std::uint32_t>(rng() % 200) : 0);
        c.drip_m.store(rng() % 2 == 0 ? rng() % 184'467'440'738 : rng());
        c.drip_whole.store(rng() % 2 == 0 ? c.drip_m.load() / 1'000'000'000 : rng());
        c.drip_rest.store(rng() % 2 == 0 ? c.drip_m.load() % 1'000'000'000 : rng());
        c.anchor_ns.store(pick());
        c.bucket_size.store(rng() % 2 == 0 ? 100'000 : pick());
        c.target.store(pick());
        body.bucket.store(rng() % 2 == 0 ? detail::BucketWord::make(generation(body), pick())
                                         : rng());
        body.time_ns.store(rng() % 2 == 0 ? to_nanos(Clock::now()) : pick());
        const TryTake r = tb.try_take(Clock::now(), 1);
        if (r == TryTake::taken) ++taken;
    }
    MESSAGE(taken << " of 20,000 takes admitted on garbage");
    // A valid state written back (as a reset would): the record works exactly again, whatever
    // the garbage rounds did to this thread's re-anchor state or the config lock.
    // (10 s before the clock: no explicit time below is clamped.)
    const std::int64_t now = to_nanos(Clock::now()) - 10'000'000'000;
    detail::ConfigBlock& c = body.config[generation(body) & 1];
    c.flags.store(detail::kTargetInfinite);
    c.drip_shift.store(0);
    c.drip_m.store(100'000'000'000);
    c.drip_whole.store(100);
    c.drip_rest.store(0);
    c.bucket_size.store(100'000);
    c.anchor_ns.store(now);
    body.time_ns.store(now);
    body.bucket.store(detail::BucketWord::make(generation(body), 0));  // empty at `now`
    CHECK(tb.try_take(from_nanos(now), 0.0001) == TryTake::unable);
    CHECK(tb.try_take(from_nanos(now + 1'000), 10) == TryTake::taken);  // 1 us: 10 tokens
    CHECK(tb.try_take(from_nanos(now + 1'000), 0.0001) == TryTake::unable);
    // Far past its window: a re-anchor, and the bucket full (10 tokens), not more.
    CHECK(tb.try_take(from_nanos(now + 1'000'000'000), 10.0001) ==
          TryTake::asked_for_more_than_bucket_size);
    CHECK(tb.try_take(from_nanos(now + 1'000'000'000), 10) == TryTake::taken);
    CHECK(tb.try_take(from_nanos(now + 1'000'000'000), 0.0001) == TryTake::unable);
}

TEST_CASE(
    "review: a rate raise at a `now` behind a token bucket's take (L raised lazily): no drip "
    "counted twice, burst + fastest rate x T") {
    // The interleaving behind the forked test above, made deterministic in one process: a take
    // at s + 10 us leaves L at s (the token bucket raises L only when it is more than
    // kLazyTimeGrain behind), so a rate switch whose `now` is s re-anchors the new, faster drip
    // at s, behind the take. The take's debt is counted at the old rate (X - D(s)), the new
    // drip pays it at the new one: (R' - R) x 10 us of drip appears twice. The seed moves the
    // switch's `now` up to the limiter's time, s + 10 us.
    lim::test::SegmentGuard guard(lim::test::unique_name("tb-rv3-stale-raise"));
    auto seg = lim::test::limiter_segment(guard);
    constexpr double kRateMax = 12'345'678.9;
    auto tb = TokenBucket::open(seg, "tb", {.burst_size = 50, .sustained_rate_per_sec = 1e7}, t0);
    auto l = Limiter::open(seg, "tb", {.bucket_size = 1}, lim::adopt_existing, t0);
    const std::int64_t s = to_nanos(t0);
    std::int64_t admitted = 0;
    REQUIRE(tb.try_take(from_nanos(s + detail::kLazyTimeGrainNs), 40) == TryTake::taken);
    admitted += 400'000;
    l.set_hopper_to_bucket_rate_per_sec(from_nanos(s), kRateMax);
    // 2 us later: whatever the bucket holds, taken whole.
    const TimePoint u = from_nanos(s + detail::kLazyTimeGrainNs + 2'000);
    const std::int64_t level = std::llround(tb.in_bucket(u) * 10'000);
    if (level > 0 && tb.try_take(u, static_cast<double>(level) / 10'000) == TryTake::taken)
        admitted += level;
    // Over [s + 10 us, s + 12 us]: at most 50 tokens + 12,345,678.9 tokens/s x 2 us (+ 1 unit).
    const double bound = 500'000 + kRateMax * 10'000 * 2e-6 + 1;
    MESSAGE("admitted " << admitted << " units in 2 us; bound " << bound);
    CHECK(static_cast<double>(admitted) <= bound);
}
