// Jane Street's Limiter in a segment record: the words every process shares, and the lock-free
// operations on them. docs/design.md ("The Limiter family") is the argument for every choice made
// here.
//
// The seed's state is (in_bucket, in_hopper, in_flight) plus the configuration (bucket size,
// hopper-to-bucket rate, token target level). Two observations make it fit 64-bit words:
//
//   * The hopper is derived. In Jane Street's Limiter the system total is always
//     max(target, in_flight), and a system above its target has an empty bucket and hopper. So
//     in_bucket + in_hopper = max(0, target - in_flight), and only in_flight and in_bucket need
//     storing. An infinite target means an infinite hopper.
//   * The bucket is a function of time. With D(t) = floor((t - anchor) x rate) the drip allowance
//     since the anchor (a pure function of time: no step-by-step accumulation, so no drift),
//     the bucket holds
//
//         b(t) = clamp(min(D(t) - X, bucket_size, max(0, target - in_flight)), 0, ...)
//
//     where X is a marker that every take and every "fold" moves forward. Folding at t sets
//     X = max(X, D(t) - cap), making permanent the allowance the seed loses to a full bucket or
//     an empty hopper. In infinite-rate mode the bucket is just the cap.
//
// Words (one cache line, because every operation touches them together):
//   in_flight  F: token units in flight; bit 63 is kFrozen (crash recovery recounts this word)
//   bucket     S: config generation (16 bits) | X (48 bits, signed)
//   time       L: the limiter's time (CLOCK_MONOTONIC ns), raised after each operation
//   lease      the lease deadline (CLOCK_MONOTONIC ns) of a kConsumed record, 0 = none; takes
//              at or after it are not admitted (lim::set_lease_deadline; docs/global.md)
//   refused    (line 4) units of refused takes on a kConsumed record, read and reset by
//              lim::take_refused_demand (lim-feeder's demand estimate)
// The configuration lives in two blocks; S's generation selects the current one. Changing it
// (rare) writes the other block under the segment's config lock, then switches with a CAS on S
// that also folds the bucket at the switch time: every hot-path CAS on S expects a generation,
// so it fails and retries if the configuration changed under it.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <type_traits>

#include "lim/clock.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/layout.hpp"
#include "shm/ledger.hpp"
#include "shm/segment_state.hpp"
#include "sync/race_point.hpp"
#include "sync/wake_channel.hpp"

namespace lim::detail {

// Which facade created a record (RecordHeader::flavor). A Limiter may adopt any of them.
enum class LimiterFlavor : std::uint16_t {
    limiter = 0,
    token_bucket = 1,
    throttle = 2,
    throttled_rate_limiter = 3,
};

// ---------------------------------------------------------------------------------------------
// Limits. Token amounts are in units (1/10,000 token).
// ---------------------------------------------------------------------------------------------

// Bucket sizes, target levels and amounts: at most 10^9 tokens (10^13 units, below 2^44).
inline constexpr std::int64_t kMaxTokenUnits = 10'000'000'000'000;
inline constexpr double kMaxTokens = 1e9;
// Finite rates: at most 10^9 tokens per second (one token per nanosecond).
inline constexpr double kMaxRatePerSec = 1e9;
// The in-flight word's values stay below 2^62 (bit 63 is kFrozen).
inline constexpr std::int64_t kMaxInFlight = (std::int64_t{1} << 62) - 1;

// X is stored in 48 bits. An operation that would fold at a drip allowance above kRebaseAt
// first re-anchors the drip (a configuration switch, under the config lock) so that X returns
// near zero; kRebaseHard is where it must, even if it has to wait for the lock. Between them
// lie 2^46 units (7 s at the maximum rate, 8 days at 10,000 tokens/s).
inline constexpr int kGenBits = 16;
inline constexpr int kXBits = 48;
inline constexpr std::int64_t kRebaseAt = std::int64_t{1} << 45;
inline constexpr std::int64_t kRebaseHard = (std::int64_t{1} << 46) + (std::int64_t{1} << 45);
static_assert(kRebaseHard + kMaxTokenUnits < (std::int64_t{1} << (kXBits - 1)));

// ---------------------------------------------------------------------------------------------
// The drip D(t): floor(elapsed_ns x rate_units_per_sec / 10^9), exactly.
// ---------------------------------------------------------------------------------------------

// The rate in units per second, R = rate_per_sec x 10,000 (one double multiplication, so decimal
// rates such as 0.5 or 2.7 become whole numbers of units), held exactly as m / 2^shift.
struct DripRate {
    std::uint64_t m = 0;
    std::uint32_t shift = 0;
    // For a whole R (shift 0): R = per_sec_whole x 10^9 + per_sec_rest, so that the drip needs
    // no division by anything but a constant.
    std::uint64_t per_sec_whole = 0;
    std::uint64_t per_sec_rest = 0;

    // `rate_per_sec` finite, >= 0, <= kMaxRatePerSec.
    static DripRate from_rate(double rate_per_sec) noexcept;

    // Drip allowance after `elapsed_ns` (<= 0 gives 0), saturating at kMaxInFlight.
    std::int64_t units_after(std::int64_t elapsed_ns) const noexcept {
        if (elapsed_ns <= 0 || m == 0) return 0;
        if (shift == 0) return whole_units_after(static_cast<std::uint64_t>(elapsed_ns));
        return fractional_units_after(static_cast<std::uint64_t>(elapsed_ns));
    }

    // The smallest elapsed_ns with units_after(elapsed_ns) >= `units` (> 0), or nullopt if the
    // rate is zero or the answer does not fit in 63 bits.
    std::optional<std::int64_t> elapsed_for(std::int64_t units) const noexcept;

    // The same on the fields as loaded from a ConfigBlock, so that a hot path need not gather
    // them into a DripRate in memory (`e` > 0 and m > 0).
    static std::int64_t whole_units_after(std::uint64_t e, std::uint64_t m, std::uint64_t whole,
                                          std::uint64_t rest) noexcept {
        constexpr std::uint64_t kNs = 1'000'000'000;
        // Most drips: e x R fits in 64 bits (R = 10^7 units/s, i.e. 1,000 tokens/s, for 30
        // minutes after the anchor), and floor(e R / 10^9) is one product and one division by
        // a constant. The result is below 2^64 / 10^9, far below kMaxInFlight.
        std::uint64_t p = 0;
        if (!__builtin_mul_overflow(e, m, &p)) return static_cast<std::int64_t>(p / kNs);
        // Otherwise, with e = q s + r ns and R = a 10^9 + b, floor(e R / 10^9) =
        // q R + r a + floor(r b / 10^9), each product below 2^64 (or saturating), each division
        // by a constant (a multiplication).
        const std::uint64_t q = e / kNs, r = e % kNs;
        std::uint64_t x = 0, y = 0, sum = 0;
        if (__builtin_mul_overflow(q, m, &x) || __builtin_mul_overflow(r, whole, &y) ||
            __builtin_add_overflow(x, y, &sum) ||
            __builtin_add_overflow(sum, r * rest / kNs, &sum) ||
            sum > static_cast<std::uint64_t>(kMaxInFlight)) {
            return kMaxInFlight;
        }
        return static_cast<std::int64_t>(sum);
    }
    // R = m / 2^shift, not whole: 128-bit arithmetic. Out of line (rare rates).
    static std::int64_t fractional_units_after(std::uint64_t e, std::uint64_t m,
                                               std::uint32_t shift) noexcept;

  private:
    std::int64_t whole_units_after(std::uint64_t e) const noexcept {
        return whole_units_after(e, m, per_sec_whole, per_sec_rest);
    }
    std::int64_t fractional_units_after(std::uint64_t e) const noexcept {
        return fractional_units_after(e, m, shift);
    }
};

// ---------------------------------------------------------------------------------------------
// Record::config: what the record was created with (immutable; compared on open, restored by
// reset, shown by limctl). No padding, so equal configurations are equal bytes.
// ---------------------------------------------------------------------------------------------

inline constexpr std::uint32_t kRateInfinite = 1;    // hopper_to_bucket_rate_per_sec infinite
inline constexpr std::uint32_t kTargetInfinite = 2;  // infinite hopper, hence infinite target
// Takes are consumed: never in a ledger, so crash recovery gives nothing back (lim-feeder's
// global rates, whose taken tokens were spent from a global lease; lim/consumed_limiter.hpp).
inline constexpr std::uint32_t kConsumed = 4;

struct LimiterRecordConfig {
    std::uint64_t rate_bits;            // hopper_to_bucket_rate_per_sec (a double), 0 if infinite
    std::int64_t bucket_size;           // units
    std::int64_t initial_bucket_level;  // units
    std::int64_t initial_hopper_level;  // units, 0 if infinite
    std::uint32_t flags;                // kRateInfinite | kTargetInfinite | kConsumed
    std::uint32_t reserved;             // 0
};

// ---------------------------------------------------------------------------------------------
// The body
// ---------------------------------------------------------------------------------------------

// One configuration. Written only while inactive (by the config-lock holder), then published by
// the CAS on S that selects it; read with acquire loads, validated by S's generation.
struct alignas(kCacheLine) ConfigBlock {
    std::atomic<std::uint64_t> rate_bits;   // tokens per second, as a double (finite rate)
    std::atomic<std::uint64_t> drip_m;      // DripRate::m
    std::atomic<std::uint32_t> drip_shift;  // DripRate::shift
    std::atomic<std::uint32_t> flags;       // kRateInfinite | kTargetInfinite | kConsumed
    std::atomic<std::int64_t> bucket_size;  // units
    std::atomic<std::int64_t> target;       // token target level, units (finite target)
    std::atomic<std::int64_t> anchor_ns;    // the drip's time origin: D(anchor) = 0
    std::atomic<std::uint64_t> drip_whole;  // DripRate::per_sec_whole
    std::atomic<std::uint64_t> drip_rest;   // DripRate::per_sec_rest
};
static_assert(sizeof(ConfigBlock) == kCacheLine);

struct LimiterBody {
    // Line 0: the hot words. Every take and return touches F and (finite rate) S together, so
    // they share a line: under contention one line moves between cores, not two.
    alignas(kCacheLine) std::atomic<std::uint64_t> in_flight;  // F, kFrozen in bit 63
    std::atomic<std::uint64_t> bucket;                         // S = generation | X
    std::atomic<std::int64_t> time_ns;                         // L
    // kConsumed records only: no take is admitted at or after this CLOCK_MONOTONIC time
    // (kNoLeaseDeadline: none). Written by lim::set_lease_deadline (lim-feeder), read by takes
    // on consumed records before their CAS; ignored on any other record.
    std::atomic<std::int64_t> lease_deadline_ns;
    std::atomic<std::uint64_t> reserved0[4];
    // Line 1: sleepers in take/take_until; written only when a thread starts or stops sleeping.
    WakeChannel wake;
    // Lines 2-3: the two configuration blocks, read-mostly.
    ConfigBlock config[2];
    // Line 4, kConsumed records only: the token units of takes refused since the last read
    // (lim::take_refused_demand, by lim-feeder: the demand its spent tokens do not show). Added
    // to (relaxed) only on a consumed take's refusal path, never past kRefusedCap; its own line,
    // so that pollers refused in a loop do not contend with the hot line's takes.
    alignas(kCacheLine) std::atomic<std::uint64_t> refused;
    // When a generation checkpoint on this record was last refused (CLOCK_MONOTONIC ns; 0 or a
    // time not in the last kCheckpointMemo: none): a switch at a checkpoint within kCheckpointMemo
    // of it refuses at once, so that writers retrying while a thread stays stopped do not hold
    // the segment's config lock for a checkpoint's wait each (generation_checkpoint.hpp).
    std::atomic<std::int64_t> checkpoint_refused_ns;
    std::atomic<std::uint64_t> reserved1[6];
};
static_assert(sizeof(LimiterBody) == 5 * kCacheLine);

// LimiterBody::refused stops growing at this many units (10^14 tokens): an add happens only
// below it, and each add is at most kMaxTokenUnits, so concurrent adders cannot wrap the word.
inline constexpr std::uint64_t kRefusedCap = std::uint64_t{1} << 60;

// Counts `n` units refused on a consumed record (LimiterBody::refused). Relaxed: a statistic,
// ordered with nothing; bounded, not exact, past kRefusedCap.
inline void note_refused(LimiterBody& body, std::int64_t n) noexcept {
    if (n <= 0) return;
    if (body.refused.load(std::memory_order_relaxed) >= kRefusedCap) return;
    body.refused.fetch_add(static_cast<std::uint64_t>(n), std::memory_order_relaxed);
}

// LimiterBody::lease_deadline_ns when a consumed record has no lease deadline: its target alone
// bounds it (a record no feeder has set, or lim-feeder's on_redis_down = "open").
inline constexpr std::int64_t kNoLeaseDeadline = 0;
static_assert(sizeof(LimiterBody) <= kRecordBodySize);
static_assert(std::atomic<std::int64_t>::is_always_lock_free);

struct BucketWord {
    static constexpr std::uint64_t kXMask = (std::uint64_t{1} << kXBits) - 1;
    static constexpr std::uint64_t make(std::uint32_t gen, std::int64_t x) noexcept {
        return (static_cast<std::uint64_t>(gen & 0xFFFF) << kXBits) |
               (static_cast<std::uint64_t>(x) & kXMask);
    }
    static constexpr std::uint32_t gen(std::uint64_t s) noexcept {
        return static_cast<std::uint32_t>(s >> kXBits);
    }
    static constexpr std::int64_t x(std::uint64_t s) noexcept {
        return static_cast<std::int64_t>(s << (64 - kXBits)) >> (64 - kXBits);
    }
};

// A configuration as read from a block.
struct LimiterParams {
    bool rate_infinite = true;
    bool target_infinite = true;
    bool consumed = false;    // kConsumed
    double rate_per_sec = 0;  // finite rate only
    DripRate drip;
    std::int64_t bucket_size = 0;
    std::int64_t target = 0;  // finite target only
    std::int64_t anchor_ns = 0;

    // What the system leaves for bucket + hopper with `f` units in flight.
    std::int64_t outside_flight(std::int64_t f) const noexcept {
        return target > f ? target - f : 0;
    }
    // What the bucket may hold given `f` units in flight: min(bucket size, what the system
    // leaves for bucket + hopper).
    std::int64_t cap(std::int64_t f) const noexcept {
        if (target_infinite) return bucket_size;
        return std::min(bucket_size, outside_flight(f));
    }
    // D(t) (finite rate). The elapsed time saturates: the anchor comes from the segment.
    std::int64_t drip_at(std::int64_t t_ns) const noexcept {
        std::int64_t elapsed = 0;
        if (__builtin_sub_overflow(t_ns, anchor_ns, &elapsed)) {
            elapsed = t_ns > anchor_ns ? std::numeric_limits<std::int64_t>::max() : 0;
        }
        return drip.units_after(elapsed);
    }
    // The bucket at `t_ns` with marker `x` and `f` in flight.
    std::int64_t bucket_at(std::int64_t x, std::int64_t f, std::int64_t t_ns) const noexcept {
        const std::int64_t c = cap(f);
        // Never negative, even for a damaged block's bucket size (reads only).
        if (rate_infinite) return std::max<std::int64_t>(0, c);
        return std::max<std::int64_t>(0, std::min(drip_at(t_ns) - x, c));
    }
};

inline LimiterParams load_params(const ConfigBlock& block) noexcept {
    LimiterParams p;
    const std::uint32_t flags = block.flags.load(std::memory_order_acquire);
    p.rate_infinite = (flags & kRateInfinite) != 0;
    p.target_infinite = (flags & kTargetInfinite) != 0;
    p.consumed = (flags & kConsumed) != 0;
    p.rate_per_sec = std::bit_cast<double>(block.rate_bits.load(std::memory_order_acquire));
    p.drip.m = block.drip_m.load(std::memory_order_acquire);
    p.drip.shift = block.drip_shift.load(std::memory_order_acquire);
    p.drip.per_sec_whole = block.drip_whole.load(std::memory_order_acquire);
    p.drip.per_sec_rest = block.drip_rest.load(std::memory_order_acquire);
    p.bucket_size = block.bucket_size.load(std::memory_order_acquire);
    p.target = block.target.load(std::memory_order_acquire);
    p.anchor_ns = block.anchor_ns.load(std::memory_order_acquire);
    return p;
}
// D(t) of a finite-rate configuration, read straight from its block (only the fields the drip
// uses, each once): LimiterParams::drip_at without gathering the parameters first. The caller
// validates the block against S's generation, as for load_params.
inline std::int64_t drip_from_block(const ConfigBlock& block, std::int64_t t_ns) noexcept {
    const std::int64_t anchor = block.anchor_ns.load(std::memory_order_acquire);
    std::int64_t elapsed = 0;
    if (__builtin_sub_overflow(t_ns, anchor, &elapsed)) {
        elapsed = t_ns > anchor ? std::numeric_limits<std::int64_t>::max() : 0;
    }
    if (elapsed <= 0) return 0;
    const std::uint64_t m = block.drip_m.load(std::memory_order_acquire);
    if (m == 0) return 0;
    const std::uint32_t shift = block.drip_shift.load(std::memory_order_acquire);
    const auto e = static_cast<std::uint64_t>(elapsed);
    if (shift != 0) [[unlikely]]
        return DripRate::fractional_units_after(e, m, shift);
    // The common case of whole_units_after first, so that the fields only its long form uses
    // are loaded only then.
    std::uint64_t p = 0;
    if (!__builtin_mul_overflow(e, m, &p)) [[likely]]
        return static_cast<std::int64_t>(p / 1'000'000'000);
    return DripRate::whole_units_after(e, m, block.drip_whole.load(std::memory_order_acquire),
                                       block.drip_rest.load(std::memory_order_acquire));
}
void store_params(ConfigBlock& block, const LimiterParams& p) noexcept;
// An initial level of a record's creation configuration, bounded as open() validated it (a
// damaged record may say anything): within [0, kMaxTokenUnits].
inline std::int64_t initial_level(std::int64_t units) noexcept {
    return std::clamp<std::int64_t>(units, 0, kMaxTokenUnits);
}
// The configuration a record was created with, anchored at `now_ns` (bounded: initial_level).
LimiterParams params_from_config(const LimiterRecordConfig& c, std::int64_t now_ns) noexcept;

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

// Raises the limiter's time L to `t_ns` if it is behind: a CAS-max, so two racing raises leave
// the larger.
inline void raise_time_ns(std::atomic<std::int64_t>& time_ns, std::int64_t t_ns) noexcept {
    std::int64_t l = time_ns.load(std::memory_order_relaxed);
    while (l < t_ns) {
        LIM_RACE_POINT();
        if (time_ns.compare_exchange_weak(l, t_ns, std::memory_order_seq_cst,
                                          std::memory_order_relaxed)) {
            break;
        }
    }
}

// How far ahead of this host's CLOCK_MONOTONIC an explicit `now` is trusted: a `now` up to a
// minute ahead is the caller's time (a test or simulation stepping its own clock from
// Clock::now(), as SPEC's explicit-time overloads invite), and the limiter runs at it. A `now`
// further ahead is taken for a mistake (a deadline passed as `now`, another host's clock) and
// counts as Clock::now() + kNowSlack, so that one far-future `now` cannot carry a shared
// limiter's time (and its drip) ahead for every process for longer than a minute
// (docs/design.md, "Time").
inline constexpr std::int64_t kNowTrustNs = 60'000'000'000;  // 60 s
inline constexpr std::int64_t kNowSlackNs = 10'000'000;      // 10 ms

// The latest Clock::now() this process has read for bounding (a cache: any value not above the
// clock is correct, so racing stores need no order).
extern std::atomic<std::int64_t> clock_seen_ns;

[[gnu::cold]] std::int64_t bounded_now_ns_slow(std::int64_t now_ns) noexcept;

// `now` in nanoseconds, or Clock::now() + kNowSlack if it is more than kNowTrust ahead of the
// clock. Reads the clock only when `now` is beyond the last reading + kNowTrust (so about once
// a minute for a caller passing the clock).
inline std::int64_t bounded_now_ns(TimePoint now) noexcept {
    const std::int64_t now_ns = to_nanos(now);
    if (now_ns <= clock_seen_ns.load(std::memory_order_relaxed) + kNowTrustNs) return now_ns;
    return bounded_now_ns_slow(now_ns);
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

enum class TakeOutcome { taken, unable, asked_for_more, rebase_needed, not_a_token_bucket };

// The ledger layer in which a TokenBucket's own takes (try_take_bucket) are recorded: tokens that
// are consumed, counted in in_flight but not in F (layer 0 mirrors F).
inline constexpr int kBucketTakenLayer = 1;

// The fastest drip (units per second) a token bucket re-anchors to keep its short form: one whose
// window 2^64 / R ns is at least 6 minutes (token_bucket.cpp). short_drip_max_rate holds it; tests
// raise it to exercise many re-anchors in little time.
inline constexpr std::uint64_t kShortDripMaxRate = 51'240'955;  // floor(2^64 / (3.6 x 10^11 ns))
extern std::atomic<std::uint64_t> short_drip_max_rate;

// The lazy raise of L by a token bucket's take: only once L is this far behind.
inline constexpr std::int64_t kLazyTimeGrainNs = 10'000;  // 10 us
// How an operation that must re-anchor the drip (LimiterCore::rebase_hard) waits for the config
// lock. The default, for try_* calls, is not at all (beyond kTryLockGrace).
struct RebaseWait {
    bool wait = false;                    // false: Error(busy) if the lock is held
    const TimePoint* deadline = nullptr;  // waiting: the caller's own deadline, if it has one
};

// `not_held`: the calling thread's own ledger holds fewer than the return (a check of the whole
// process, Limiter::return_to_hopper, decides; see Hold::require_held).
enum class ReturnOutcome { returned, over_release, rebase_needed, not_held };

// `now_ns` for a take or return whose caller gave no time (the no-`now` overloads): the
// operation reads lim::Clock itself, and only if its outcome depends on time (a finite rate),
// so an infinite-rate take or return never reads the clock (docs/design.md ("The Limiter
// family"), "Time": the lazy clock). A consumed record's post-CAS deadline check reads the
// clock regardless ("Lease deadlines").
inline constexpr std::int64_t kClockUnread = std::numeric_limits<std::int64_t>::min();

// The fast paths' outcomes: done, or nothing changed and the general operation must run (it
// decides everything the fast path does not: refusals, frozen words, reconfigurations,
// consumed records).
enum class FastOutcome { done, general };

// The consumed fast take's outcomes: taken; `late` (its CAS landed, but the clock read after it
// was at or past the lease deadline: the tokens stay in flight, consumed and not admitted, and
// the take reports unable); or the general take must decide (nothing changed, or a switch came
// between the CAS and its check: the tokens stay in flight, consumed and not admitted).
enum class ConsumedOutcome { taken, late, general };

// A consistent reading of the limiter at a time (docs/design.md ("The Limiter family"), "Reads").
struct LimiterReading {
    LimiterParams params;
    std::int64_t t_ns = 0;  // max(now, the limiter's time)
    std::int64_t in_flight = 0;
    std::int64_t in_bucket = 0;
    std::int64_t in_hopper = 0;  // meaningless when params.target_infinite
    std::int64_t x = 0;
    std::uint64_t bucket_word = 0;
};

// The limiter operations on one record. Cheap to construct (two references and an index); the
// public handles make one per call.
class LimiterCore {
  public:
    LimiterCore(SegmentState& state, std::uint32_t record) noexcept
        : state_(state),
          body_(*reinterpret_cast<LimiterBody*>(state.record(record).body)),
          record_(record) {}
    // The same, with the record's address in this mapping already known (RecordRef::record).
    LimiterCore(SegmentState& state, std::uint32_t record, Record& r) noexcept
        : state_(state), body_(*reinterpret_cast<LimiterBody*>(r.body)), record_(record) {}

    // The infinite-rate take (a Throttle's start_job; docs/design.md ("The Limiter family"),
    // "The infinite-rate fast path"), under `hold` (announced): when the configuration S
    // selects has an infinite rate and takes that are not consumed, the take is one CAS of F
    // from f to f + n, if the cap (bucket size, or the room the target leaves with f in flight)
    // has n, validated after it against a switch (S's generation unchanged, else the take is
    // rolled back), then recorded in the ledger. Needs no time. `general` (nothing changed) for
    // anything else: a refusal, a frozen F, another configuration; the caller then runs
    // try_take, which decides those.
    FastOutcome try_take_infinite(Hold& hold, std::int64_t n) noexcept {
        return try_take_infinite_from(hold, body_.in_flight.load(std::memory_order_seq_cst),
                                      body_.bucket.load(std::memory_order_seq_cst), n);
    }
    // The same, deciding from F and S as loaded by the caller (`fw`, `s`): tests load them,
    // interfere (a switch, a freeze), and then call it, to force the interleavings.
    FastOutcome try_take_infinite_from(Hold& hold, std::uint64_t fw, std::uint64_t s,
                                       std::int64_t n) noexcept;
    // The infinite-rate return (a Throttle's finish_job): with an infinite rate nothing needs
    // folding, so a return that the calling thread's own ledger covers is one CAS of F from f to
    // f - n (f >= n), after the generation check the general return makes; then the ledger and
    // the wake. `general` (nothing changed) otherwise: the caller runs return_to_hopper.
    FastOutcome return_infinite(Hold& hold, std::int64_t n) noexcept {
        return return_infinite_from(hold, body_.in_flight.load(std::memory_order_seq_cst),
                                    body_.bucket.load(std::memory_order_seq_cst), n);
    }
    FastOutcome return_infinite_from(Hold& hold, std::uint64_t fw, std::uint64_t s,
                                     std::int64_t n) noexcept;

    // A consumed record's take (lim-feeder's global rate; docs/design.md ("The Limiter
    // family"), "The consumed fast take"): when the configuration S selects is consumed, with an
    // infinite rate and a finite target, the take is the general take's infinite-rate branch
    // without its Hold and its LimiterParams: the lease deadline loaded before the CAS (and a
    // take whose time max(now, L) is at or past it left to the general take, which refuses it),
    // one CAS of F from f to f + n if the cap has n, the generation check after it (a switch
    // since: not admitted, the n left in F, `general`), then the post-CAS clock read against the
    // deadline
    // (`late`), and the admitted count in `entry`, the calling thread's own ledger entry (no
    // holding: consumed takes are in no ledger, and a recount leaves F as it is, so nothing
    // here needs announcing). `now_ns` may be kClockUnread (then the pre-CAS check compares L
    // alone, as the general take does). `general` (nothing changed) for anything else: a
    // refusal (which the general take counts as demand), a frozen F, another configuration.
    [[gnu::always_inline]] ConsumedOutcome try_take_consumed(LedgerEntry& entry,
                                                             std::int64_t now_ns,
                                                             std::int64_t n) noexcept {
        return try_take_consumed_from(entry, body_.in_flight.load(std::memory_order_seq_cst),
                                      body_.bucket.load(std::memory_order_seq_cst), now_ns, n);
    }
    // The same from F and S as loaded by the caller (tests interfere between the loads and the
    // CAS).
    ConsumedOutcome try_take_consumed_from(LedgerEntry& entry, std::uint64_t fw, std::uint64_t s,
                                           std::int64_t now_ns, std::int64_t n) noexcept;

    // One attempt, under `hold`. `rebase_at`: the drip allowance above which the operation
    // asks its caller to re-anchor first (rebase_needed, nothing changed). `now_ns` may be
    // kClockUnread: the take then reads the clock if (and only if) the rate is finite (a caller
    // that rebases reads it for the rebase). `count_refused`: on a consumed record, a refusal
    // for lack of tokens or past the lease deadline adds `n` to LimiterBody::refused (a blocking
    // take's re-checks pass false: its first attempt counted it once).
    TakeOutcome try_take(Hold& hold, std::int64_t now_ns, std::int64_t n, std::int64_t rebase_at,
                         bool count_refused) noexcept;
    // A token bucket's take (docs/design.md ("The Limiter family"), "TokenBucket's take"): with
    // an infinite target and a finite rate nothing depends on F, so the take is one CAS on S,
    // recorded in the thread's ledger (`entry`, the thread's own, layer kBucketTakenLayer) after it
    // lands; no Hold, since a token bucket holds nothing a reap could give back. The caller
    // announces the attempt in its slot (`pending` := record + 1) around the call, as a Hold
    // would, for the generation checkpoints (generation_checkpoint.hpp), and withdraws it before
    // it rebases. `not_a_token_bucket` (nothing changed) when the configuration is not a token
    // bucket's: the caller uses try_take.
    TakeOutcome try_take_bucket(LedgerEntry& entry, std::int64_t now_ns, std::int64_t n,
                                std::int64_t rebase_at) noexcept;
    // What a token bucket's takes have recorded in the ledgers of occupied slots.
    std::int64_t bucket_taken() const noexcept;

    // `over_release` changes nothing; *in_flight_seen says what was in flight. Unless
    // `holding_checked`, a return of tokens that are in a ledger (not consumed) first checks that
    // the calling thread's ledger holds `n` (a plain load and a compare) and returns `not_held`,
    // changing nothing, if it does not: the caller checks the whole process and retries.
    // `now_ns` may be kClockUnread, as for try_take.
    ReturnOutcome return_to_hopper(Hold& hold, std::int64_t now_ns, std::int64_t n,
                                   std::int64_t rebase_at, std::int64_t* in_flight_seen,
                                   bool holding_checked = false) noexcept;

    // The state at max(now, the limiter's time), raising the limiter's time to it.
    LimiterReading read(std::int64_t now_ns) const noexcept;

    // The current configuration (validated against concurrent switches).
    LimiterParams params() const noexcept;

    // Switches to the configuration `change` makes of the current one, folding the bucket at
    // max(now, the limiter's time) first; re-anchors the drip when `reanchor` (or when the drip
    // allowance is large). Takes the config lock, waiting kLockWaitTimeout at most; throws
    // Error(busy) if it stayed held, or if a generation checkpoint found a live thread stopped
    // in the middle of an operation on the record for kCheckpointWait (nothing changed either
    // way), Error(system_error) if it cannot be taken.
    template <class Change>
    void reconfigure(std::int64_t now_ns, bool reanchor, Change&& change);
    // Re-anchors the drip under the config lock, waiting for it until `until` (nullopt: one try,
    // no wait); false if it could not be had by then, or if a generation checkpoint refused the
    // switch (a live thread in the middle of an operation on the record: generation_checkpoint.
    // hpp; waited for kCheckpointWait, or with no `until` kTryLockGrace, and in the second after
    // a refusal not at all), which also sets `*checkpoint_refused` if given.
    bool rebase(std::int64_t now_ns, std::optional<TimePoint> until,
                bool* checkpoint_refused = nullptr);
    // rebase(now_ns, nullopt), or with `wait` rebase(now_ns, Clock::now() + kLockWaitTimeout).
    bool rebase(std::int64_t now_ns, bool wait);
    // The re-anchor an operation cannot do without (its drip allowance is past kRebaseHard),
    // waiting for the config lock as `how` says: a try_* kTryLockGrace at most (a legitimate
    // switch holds it for microseconds, and re-anchors the drip too), a blocking call until its
    // deadline or kLockWaitTimeout. False if the caller's deadline came first (the caller then
    // answers as at its deadline); Error(busy) if the lock stayed held (a configuration writer
    // stopped holding it) or a generation checkpoint refused (a live thread stopped in the middle
    // of an operation on the record), nothing changed.
    bool rebase_hard(std::int64_t now_ns, const RebaseWait& how);
    // Re-anchors a token bucket's drip (infinite target, whole rate R) when (max(now, L) -
    // anchor) x R no longer fits in 64 bits, so that the drip has its short form again
    // (TokenBucket's take; exact, no rounding lost). Gives up (false) if the config lock is held
    // or the re-anchor is not due (another thread made it). Throws Error(system_error) if the
    // lock cannot be tried.
    bool reanchor_drip(std::int64_t now_ns);

    // Sleepers: registration recorded in the thread's slot (so a reaper can recount it) and in
    // the wake channel. See LimiterWaiter.
    WakeChannel& wake() noexcept { return body_.wake; }

    LimiterBody& body() noexcept { return body_; }
    SegmentState& state() noexcept { return state_; }
    std::uint32_t record() const noexcept { return record_; }

  private:
    // What one attempt of a take or return starts from: S, the configuration its generation
    // selects, and the operation's time max(now, L).
    struct Attempt {
        std::uint64_t s;
        std::uint32_t gen;
        LimiterParams p;
        std::int64_t t;
    };
    // Waits aside while F is frozen (updating `fw`), then reads what an attempt starts from.
    // Reads the clock into `now_ns` if it is kClockUnread and the rate is finite.
    Attempt begin(Hold& hold, std::uint64_t& fw, std::int64_t& now_ns) noexcept;

    // Raises L to `t_ns` (a CAS-max: L never moves backwards, whatever raises race). Nothing
    // that admits depends on L being current (docs/design.md ("The Limiter family"), "Time"),
    // but a switch re-anchors at max(now, L), so L stays as high as any operation has used.
    void raise_time(std::int64_t t_ns) const noexcept {
        if (state_.read_only()) return;
        raise_time_ns(body_.time_ns, t_ns);
    }
    void rollback_tentative(std::int64_t n) noexcept { rollback_tentative(body_, n); }
    // The same on `body`: what the fast path calls, so that it never needs `this` in memory.
    static void rollback_tentative(LimiterBody& body, std::int64_t n) noexcept;
    // The roll-back of a take that read a configuration that was not consumed: skipped (its n
    // stays in F, not admitted: under-use) if the record is consumed now. lim::convert_to_consumed
    // switches a token bucket to consumed; a take that CASed F under the old configuration and
    // finds the switch only after it may have had its n counted by the feeder (target <- F + a),
    // so taking it back out of F would leave n spendable with no lease (global.convert_review
    // R1). Nothing makes a consumed record not consumed (a reset restores a creation configuration
    // that the conversion rewrote first), so a record found consumed stays so.
    static void rollback_unless_consumed(LimiterBody& body, std::int64_t n) noexcept;
    void switch_config(std::int64_t now_ns, bool reanchor, void (*change)(LimiterParams&, void*),
                       void* ctx);

    SegmentState& state_;
    LimiterBody& body_;
    std::uint32_t record_;
};

template <class Change>
void LimiterCore::reconfigure(std::int64_t now_ns, bool reanchor, Change&& change) {
    switch_config(
        now_ns, reanchor,
        [](LimiterParams& p, void* ctx) {
            (*static_cast<std::remove_reference_t<Change>*>(ctx))(p);
        },
        &change);
}

inline FastOutcome LimiterCore::try_take_infinite_from(Hold& hold, std::uint64_t fw,
                                                       std::uint64_t s, std::int64_t n) noexcept {
    std::atomic<std::uint64_t>& in_flight = body_.in_flight;
    const std::uint32_t gen = BucketWord::gen(s);
    const ConfigBlock& c = body_.config[gen & 1];
    const std::uint32_t flags = c.flags.load(std::memory_order_acquire);
    if ((flags & (kRateInfinite | kConsumed)) != kRateInfinite) return FastOutcome::general;
    const std::int64_t size = c.bucket_size.load(std::memory_order_acquire);
    const bool target_infinite = (flags & kTargetInfinite) != 0;
    const std::int64_t target = target_infinite ? 0 : c.target.load(std::memory_order_acquire);
    for (;;) {
        // A frozen F (a reaper recounting) is the general path's to wait out.
        if (is_frozen(fw)) return FastOutcome::general;
        const auto f = static_cast<std::int64_t>(fw);
        // The cap with f in flight before our increment (LimiterParams::cap): what bounds what
        // is in flight by the target. n > size falls here too (cap <= size).
        const std::int64_t cap =
            target_infinite ? size : std::min(size, target > f ? target - f : 0);
        if (cap < n || f > kMaxInFlight - n) return FastOutcome::general;
        LIM_RACE_POINT();
        if (in_flight.compare_exchange_weak(fw, fw + static_cast<std::uint64_t>(n),
                                            std::memory_order_seq_cst, std::memory_order_seq_cst)) {
            break;
        }
        // Another take or return landed (or a freeze): decide again on the F it left.
    }
    LIM_RACE_POINT();
    // Every field read above belongs to the generation in `s`; unchanged now, it was current at
    // the CAS (the general take's check, below its CAS).
    if (BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst)) != gen) [[unlikely]] {
        rollback_unless_consumed(body_, n);
        return FastOutcome::general;
    }
    hold.add(0, n);
    hold.admitted();
    return FastOutcome::done;
}

inline FastOutcome LimiterCore::return_infinite_from(Hold& hold, std::uint64_t fw, std::uint64_t s,
                                                     std::int64_t n) noexcept {
    // Tokens taken by one process are returned by that process: the thread's own ledger must
    // cover the return (Hold::require_held's fast path); otherwise the general return checks
    // the whole process.
    if (!hold.covers(0, static_cast<std::uint64_t>(n))) return FastOutcome::general;
    std::atomic<std::uint64_t>& in_flight = body_.in_flight;
    const std::uint32_t gen = BucketWord::gen(s);
    const std::uint32_t flags = body_.config[gen & 1].flags.load(std::memory_order_acquire);
    if ((flags & (kRateInfinite | kConsumed)) != kRateInfinite) return FastOutcome::general;
    for (;;) {
        if (is_frozen(fw) || static_cast<std::int64_t>(fw) < n) return FastOutcome::general;
        // With an infinite rate nothing needs folding, if that is still the configuration (the
        // general return's check before its CAS).
        if (BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst)) != gen) [[unlikely]]
            return FastOutcome::general;
        LIM_RACE_POINT();
        if (in_flight.compare_exchange_weak(fw, fw - static_cast<std::uint64_t>(n),
                                            std::memory_order_seq_cst, std::memory_order_seq_cst)) {
            break;
        }
    }
    hold.add(0, -n);
    wake_all(body_.wake);
    return FastOutcome::done;
}

[[gnu::always_inline]] inline ConsumedOutcome LimiterCore::try_take_consumed_from(
    LedgerEntry& entry, std::uint64_t fw, std::uint64_t s, std::int64_t now_ns,
    std::int64_t n) noexcept {
    std::atomic<std::uint64_t>& in_flight = body_.in_flight;
    const std::uint32_t gen = BucketWord::gen(s);
    const ConfigBlock& c = body_.config[gen & 1];
    const std::uint32_t flags = c.flags.load(std::memory_order_acquire);
    if ((flags & (kRateInfinite | kTargetInfinite | kConsumed)) != (kRateInfinite | kConsumed))
        return ConsumedOutcome::general;
    const std::int64_t size = c.bucket_size.load(std::memory_order_acquire);
    const std::int64_t target = c.target.load(std::memory_order_acquire);
    // The deadline the landed take is checked against must be one stored before its CAS (the
    // general take's step (1), in the same order: after S, before the CAS).
    const std::int64_t deadline = body_.lease_deadline_ns.load(std::memory_order_seq_cst);
    if (deadline != kNoLeaseDeadline &&
        std::max(now_ns, body_.time_ns.load(std::memory_order_relaxed)) >= deadline) {
        return ConsumedOutcome::general;  // refused without taking, and counted, by the general
    }
    for (;;) {
        // A frozen F (a reaper recounting the sleepers) is the general path's to wait out.
        if (is_frozen(fw)) return ConsumedOutcome::general;
        const auto f = static_cast<std::int64_t>(fw);
        // The cap with f in flight before our increment (LimiterParams::cap); n > size falls
        // here too.
        const std::int64_t cap = std::min(size, target > f ? target - f : 0);
        if (cap < n || f > kMaxInFlight - n) return ConsumedOutcome::general;
        LIM_RACE_POINT();
        if (in_flight.compare_exchange_weak(fw, fw + static_cast<std::uint64_t>(n),
                                            std::memory_order_seq_cst, std::memory_order_seq_cst)) {
            break;
        }
    }
    LIM_RACE_POINT();
    // The target and the cap belong to the generation in `s`; unchanged now, they were current
    // at the CAS. If a switch came between (a grant, a lease end, a rebase: the feeder's), the
    // take is not admitted and its n stays in F, consumed, as the general take leaves it (the
    // feeder may have read F with it and counted it as spent: "Lease deadlines").
    if (BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst)) != gen) [[unlikely]]
        return ConsumedOutcome::general;
    // Step (2) of "Lease deadlines": never skipped, it is what holds under SIGSTOP.
    if (deadline != kNoLeaseDeadline && to_nanos(Clock::now()) >= deadline) [[unlikely]]
        return ConsumedOutcome::late;
    entry.admitted.store(entry.admitted.load(std::memory_order_relaxed) + 1,
                         std::memory_order_relaxed);
    return ConsumedOutcome::taken;
}

// A thread registered as sleeping on a limiter, for the lifetime of the object. The registration
// is written into the thread's slot, and the channel's count changed, under a Hold and never
// while a recount runs (both wait aside while the record's in-flight word is frozen), so a
// reaper that recounts the channel's waiter count sees it exactly; the sleep itself happens
// outside any Hold. The constructor throws only what Hold's does (table_full); the destructor
// never throws and always deregisters.
class LimiterWaiter {
  public:
    LimiterWaiter(LimiterCore& core, std::int64_t amount);
    ~LimiterWaiter();
    LimiterWaiter(const LimiterWaiter&) = delete;
    LimiterWaiter& operator=(const LimiterWaiter&) = delete;

    // Sleeps until a wake on the channel since the last call, or until `deadline`.
    void wait(TimePoint deadline) noexcept;

  private:
    LimiterCore& core_;
    SlotHeader* slot_ = nullptr;  // the thread's slot, where the registration is recorded
    std::uint32_t snapshot_ = 0;
};

// A configuration switch, with the segment's config lock held by the caller (so no other writer
// touches the inactive block): folds the bucket at max(now, L, anchor) under the old
// configuration, writes the new one (`change` applied to the old, if not null) into the inactive
// block, raises L, and publishes both with one CAS on S. Re-anchors when `reanchor` or when the
// drip allowance is large.
void switch_locked(LimiterBody& body, std::int64_t now_ns, bool reanchor,
                   void (*change)(LimiterParams&, void*), void* ctx) noexcept;

// switch_locked, provided the generation may move on (generation_checkpoint.hpp): at a
// checkpoint, refuses at once if one was refused on the record in the last kCheckpointMemo;
// otherwise waits `checkpoint_wait` at most for the operations announced on `record` to end
// (generation_may_advance), and if a live one stays in the middle of one, remembers the refusal
// (LimiterBody::checkpoint_refused_ns). False: nothing changed. The caller holds the config lock.
bool switch_checked(const SegmentState& state, std::uint32_t record, LimiterBody& body,
                    std::int64_t now_ns, bool reanchor, void (*change)(LimiterParams&, void*),
                    void* ctx, std::chrono::milliseconds checkpoint_wait) noexcept;
// Whether the next switch of `body` is to a checkpoint generation (a hint unless the config lock
// is held), and whether one was refused on it in the last kCheckpointMemo.
bool next_is_checkpoint(const LimiterBody& body) noexcept;
bool checkpoint_refused_recently(const LimiterBody& body) noexcept;

// The announcement of an attempt that reads S with no Hold (a token bucket's own take, the
// consumed fast take), as a Hold makes it: a generation checkpoint (generation_checkpoint.hpp)
// must see every operation that has loaded S and not yet made its CAS or validated its
// generation. `announced` is record + 1, or for a token bucket's own take (record + 1) |
// kBucketTakeTag, which a reap does not wait for (SlotHeader::pending). A store with no fence
// before the loads of S that follow (the compiler's order only): the checkpoint's heavy fence
// (sync/heavy_fence.hpp) pays for the ordering on its side, once in kGenerationCheckpoint
// switches, instead of every take. Release, so that a checkpoint that reads it has the
// thread's earlier operations (their CASes) before its own. Withdrawn before anything that may
// wait (a rebase, the general take, which announces for itself).
[[gnu::always_inline]] inline void announce_attempt(SlotHeader& slot,
                                                    std::uint32_t announced) noexcept {
    slot.pending.store(announced, std::memory_order_release);
    std::atomic_signal_fence(std::memory_order_seq_cst);
}
// Release: a checkpoint that reads the withdrawal sees the attempt's CAS before its own.
[[gnu::always_inline]] inline void withdraw_attempt(SlotHeader& slot) noexcept {
    slot.pending.store(0, std::memory_order_release);
}

// Called, when set, by try_take_bucket between its decision to take and its CAS on S: a test's
// way to stop a taker exactly there (tests/generation_checkpoint_test.cpp). Null outside tests.
extern std::atomic<void (*)() noexcept> bucket_take_hook;

// Initialises a new record's body from its configuration, at `now_ns`.
void init_limiter_body(LimiterBody& body, const LimiterRecordConfig& config,
                       std::int64_t now_ns) noexcept;

// Crash recovery for limiter records (freeze / recount / thaw / reset; layer 0 = "tokens").
extern const KindOps kLimiterOps;

}  // namespace lim::detail
