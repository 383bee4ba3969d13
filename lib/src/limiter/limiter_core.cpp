// The lock-free limiter operations on a record's words, the drip arithmetic, configuration
// switches and sleepers. Crash recovery is in limiter_recovery.cpp.
// docs/design.md ("The Limiter family") gives each operation's linearisation point and the argument
// that no interleaving admits more than the seed would.
#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>

#include "lim/error.hpp"
#include "lim/tokens.hpp"
#include "limiter/generation_checkpoint.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/records.hpp"
#include "sync/futex.hpp"
#include "sync/spin.hpp"

namespace lim::detail {
namespace {

__extension__ using u128 = unsigned __int128;

constexpr std::uint64_t kNsPerSec = 1'000'000'000;

std::int64_t value_of(std::uint64_t in_flight_word) noexcept {
    return static_cast<std::int64_t>(in_flight_word & ~kFrozen);
}

std::int64_t clamp_units(u128 v) noexcept {
    return v > static_cast<u128>(kMaxInFlight) ? kMaxInFlight : static_cast<std::int64_t>(v);
}

// A consumed record's take that landed (its CAS succeeded) is admitted only if CLOCK_MONOTONIC,
// read after that CAS, is still before the lease deadline `deadline` read before it. Otherwise
// its tokens stay in flight, consumed and not admitted: the state a taker killed between the CAS
// and this check leaves (docs/design.md ("The Limiter family"), "Lease deadlines").
bool landed_before(std::int64_t deadline) noexcept {
    return to_nanos(Clock::now()) < deadline;
}

// A bounded spin after a lost CAS on the record's hot line (F and S), per call: the first lost
// CAS waits kFirstSpins relaxations (x86 `pause`, about 15-20 ns each on the benchmark VM), each
// further one twice as many, never more than kMaxSpins (a few microseconds). Losing means another
// core wrote the line between our load and our CAS; retrying at once takes the line back while
// that core is between its own steps, so both keep losing it (a take + return is 3-4 CASes on
// the line). Waiting lets the winner finish its operation, and usually its next ones, with the
// line to itself. Only relaxations: no syscall, no sleep, no store, nothing shared is read, so
// it changes no state and no ordering; the call is as lock-free as before (docs/design.md ("The
// Limiter family"), "Backoff after a lost CAS").
class CasBackoff {
  public:
    void pause() noexcept {
        for (std::uint32_t i = 0; i < spins_; ++i)
            cpu_relax();
        spins_ = std::min(spins_ * 2, kMaxSpins);
    }

  private:
    static constexpr std::uint32_t kFirstSpins = 4;
    static constexpr std::uint32_t kMaxSpins = 256;
    std::uint32_t spins_ = kFirstSpins;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

std::atomic<std::int64_t> clock_seen_ns{std::numeric_limits<std::int64_t>::min() / 2};

std::int64_t bounded_now_ns_slow(std::int64_t now_ns) noexcept {
    const std::int64_t real = to_nanos(Clock::now());
    if (real > clock_seen_ns.load(std::memory_order_relaxed)) {
        clock_seen_ns.store(real, std::memory_order_relaxed);
    }
    // Saturating: a `now` near INT64_MAX is beyond any trust.
    if (now_ns - real <= kNowTrustNs) return now_ns;
    return real + kNowSlackNs;
}

// ---------------------------------------------------------------------------------------------
// Drip arithmetic
// ---------------------------------------------------------------------------------------------

DripRate DripRate::from_rate(double rate_per_sec) noexcept {
    DripRate r;
    const double units = rate_per_sec * static_cast<double>(kTokenResolution);
    if (!(units > 0)) return r;
    if (units == std::floor(units) && units < 0x1p62) {
        r.m = static_cast<std::uint64_t>(units);
        r.per_sec_whole = r.m / kNsPerSec;
        r.per_sec_rest = r.m % kNsPerSec;
        return r;
    }
    // Not a whole number of units per second: units = m / 2^shift exactly, with m the 53-bit
    // significand. The shift is positive because a double of 2^53 or more is an integer.
    int exponent = 0;
    const double fraction = std::frexp(units, &exponent);  // units = fraction * 2^exponent
    r.m = static_cast<std::uint64_t>(std::ldexp(fraction, 53));
    int shift = 53 - exponent;
    while (shift > 0 && (r.m & 1) == 0) {
        r.m >>= 1;
        --shift;
    }
    r.shift = static_cast<std::uint32_t>(shift);
    return r;
}

std::int64_t DripRate::fractional_units_after(std::uint64_t e, std::uint64_t m,
                                              std::uint32_t shift) noexcept {
    if (shift >= 128) return 0;
    return clamp_units((static_cast<u128>(e) * m >> shift) / kNsPerSec);
}

std::optional<std::int64_t> DripRate::elapsed_for(std::int64_t units) const noexcept {
    if (units <= 0) return 0;
    // No drip (as units_after says for a shift of 128 or more: only a damaged block has one, and
    // -shift below must not overflow an int).
    if (m == 0 || shift >= 128) return std::nullopt;
    // An estimate in extended precision, then the exact answer by bisection on units_after,
    // which is monotone: floor(e * R / 10^9) >= units.
    const long double rate = std::ldexp(static_cast<long double>(m), -static_cast<int>(shift));
    const long double estimate = static_cast<long double>(units) * 1e9L / rate;
    if (!(estimate < 4e18L)) return std::nullopt;
    std::int64_t hi = static_cast<std::int64_t>(std::ceil(estimate)) + 1;
    std::int64_t step = 1 + hi / (1 << 20);
    while (units_after(hi) < units) {
        if (hi > LLONG_MAX / 2) return std::nullopt;
        hi += step;
        step *= 2;
    }
    std::int64_t lo = hi;  // find lo with units_after(lo) < units
    step = 1 + hi / (1 << 20);
    do {
        lo = lo > step ? lo - step : 0;
        step *= 2;
    } while (lo > 0 && units_after(lo) >= units);
    while (hi - lo > 1) {
        const std::int64_t mid = lo + (hi - lo) / 2;
        (units_after(mid) >= units ? hi : lo) = mid;
    }
    return hi;
}

// ---------------------------------------------------------------------------------------------
// Configuration blocks
// ---------------------------------------------------------------------------------------------

void store_params(ConfigBlock& block, const LimiterParams& p) noexcept {
    const std::uint32_t flags = (p.rate_infinite ? kRateInfinite : 0) |
                                (p.target_infinite ? kTargetInfinite : 0) |
                                (p.consumed ? kConsumed : 0);
    block.flags.store(flags, std::memory_order_release);
    block.rate_bits.store(std::bit_cast<std::uint64_t>(p.rate_per_sec), std::memory_order_release);
    block.drip_m.store(p.drip.m, std::memory_order_release);
    block.drip_shift.store(p.drip.shift, std::memory_order_release);
    block.drip_whole.store(p.drip.per_sec_whole, std::memory_order_release);
    block.drip_rest.store(p.drip.per_sec_rest, std::memory_order_release);
    block.bucket_size.store(p.bucket_size, std::memory_order_release);
    block.target.store(p.target, std::memory_order_release);
    block.anchor_ns.store(p.anchor_ns, std::memory_order_release);
}

LimiterParams params_from_config(const LimiterRecordConfig& c, std::int64_t now_ns) noexcept {
    LimiterParams p;
    p.rate_infinite = (c.flags & kRateInfinite) != 0;
    p.target_infinite = (c.flags & kTargetInfinite) != 0;
    p.consumed = (c.flags & kConsumed) != 0;
    p.rate_per_sec = p.rate_infinite ? 0.0 : std::bit_cast<double>(c.rate_bits);
    // Bounded as open() validated them (a damaged record may say anything, and a reset rebuilds
    // from it): a rate outside [0, 1e9] drips nothing (an infinite one made from_rate convert
    // infinity to an integer), sizes and levels within [0, kMaxTokenUnits] (their sum below).
    if (!(p.rate_per_sec >= 0 && p.rate_per_sec <= kMaxRatePerSec)) p.rate_per_sec = 0;
    p.drip = p.rate_infinite ? DripRate{} : DripRate::from_rate(p.rate_per_sec);
    p.bucket_size = std::clamp<std::int64_t>(c.bucket_size, 0, kMaxTokenUnits);
    p.target = p.target_infinite
                   ? 0
                   : initial_level(c.initial_bucket_level) + initial_level(c.initial_hopper_level);
    p.anchor_ns = now_ns;
    return p;
}

void init_limiter_body(LimiterBody& body, const LimiterRecordConfig& config,
                       std::int64_t now_ns) noexcept {
    const LimiterParams p = params_from_config(config, now_ns);
    store_params(body.config[0], p);
    // D(now) = 0, so X = -initial level puts the initial level in the bucket. With an infinite
    // rate the bucket is the cap and X is unused.
    const std::int64_t x = p.rate_infinite ? 0 : -initial_level(config.initial_bucket_level);
    body.bucket.store(BucketWord::make(0, x), std::memory_order_relaxed);
    body.time_ns.store(now_ns, std::memory_order_relaxed);
    body.lease_deadline_ns.store(kNoLeaseDeadline, std::memory_order_relaxed);
    body.refused.store(0, std::memory_order_relaxed);
    body.checkpoint_refused_ns.store(0, std::memory_order_relaxed);
    body.in_flight.store(0, std::memory_order_release);
}

// ---------------------------------------------------------------------------------------------
// Hot path
// ---------------------------------------------------------------------------------------------

void LimiterCore::rollback_tentative(LimiterBody& body, std::int64_t n) noexcept {
    // Undoing our own tentative increment may proceed on a frozen word (the reaper waits for
    // this operation to finish). Clamped at zero so that a concurrent over-release by a caller
    // cannot wrap the word into the frozen bit.
    std::uint64_t w = body.in_flight.load(std::memory_order_relaxed);
    for (;;) {
        LIM_RACE_POINT();
        const std::uint64_t frozen = w & kFrozen;
        const auto next = static_cast<std::uint64_t>(std::max<std::int64_t>(0, value_of(w) - n));
        if (body.in_flight.compare_exchange_weak(w, frozen | next, std::memory_order_seq_cst,
                                                 std::memory_order_relaxed)) {
            break;
        }
    }
    // A sleeper may have found too little because of our tentative tokens.
    wake_all(body.wake);
}

void LimiterCore::rollback_unless_consumed(LimiterBody& body, std::int64_t n) noexcept {
    // The configuration S selects now (its flags alone: a later switch rewriting this block can
    // only leave it consumed too). Read after the CAS that found the switch, or the shortage.
    const std::uint64_t s = body.bucket.load(std::memory_order_seq_cst);
    const std::uint32_t flags =
        body.config[BucketWord::gen(s) & 1].flags.load(std::memory_order_seq_cst);
    if ((flags & kConsumed) != 0) return;  // n stays in F: consumed, not admitted
    LIM_RACE_POINT();
    // A switch to consumed between this read and the roll-back's CAS (a taker stopped exactly
    // here) is why the conversion waits for every operation in progress on the record to end
    // before the feeder grants (its step 5; docs/design.md, "Converting a token bucket into a
    // consumed record").
    rollback_tentative(body, n);
}

[[gnu::always_inline]] inline LimiterCore::Attempt LimiterCore::begin(
    Hold& hold, std::uint64_t& fw, std::int64_t& now_ns) noexcept {
    while (is_frozen(fw)) {
        hold.wait_while_frozen(body_.in_flight, state_);
        fw = body_.in_flight.load(std::memory_order_seq_cst);
    }
    Attempt a;
    a.s = body_.bucket.load(std::memory_order_seq_cst);
    a.gen = BucketWord::gen(a.s);
    a.p = load_params(body_.config[a.gen & 1]);
    // The lazy clock: a caller that gave no time gets the clock read here, once, and only if the
    // rate is finite (the drip needs it). With an infinite rate the operation's time is L, which
    // only a refusal raises L to (a no-op) and a consumed record's pre-CAS deadline check
    // compares (its post-CAS check reads the clock itself: landed_before).
    if (now_ns == kClockUnread && !a.p.rate_infinite) [[unlikely]]
        now_ns = to_nanos(Clock::now());
    a.t = std::max(now_ns, body_.time_ns.load(std::memory_order_relaxed));
    return a;
}

TakeOutcome LimiterCore::try_take(Hold& hold, std::int64_t now_ns, std::int64_t n,
                                  std::int64_t rebase_at, bool count_refused) noexcept {
    std::atomic<std::uint64_t>& in_flight = body_.in_flight;
    std::atomic<std::uint64_t>& bucket = body_.bucket;
    CasBackoff backoff;
    std::uint64_t fw = in_flight.load(std::memory_order_seq_cst);
    for (;;) {
        // Plain variables, not a structured binding: the lambda below captures them (clang 14
        // rejects capturing structured bindings).
        const Attempt a = begin(hold, fw, now_ns);
        std::uint64_t s = a.s;
        const std::uint32_t gen = a.gen;
        const LimiterParams& p = a.p;
        const std::int64_t t = a.t;
        const auto f = static_cast<std::int64_t>(fw);
        // A decision that changes nothing is only as good as the configuration it read: check
        // that the generation did not move meanwhile (as a seqlock reader does).
        // (Copies of the bindings: C++20 lambdas cannot capture structured bindings in clang 14.)
        const auto refuse = [&, read_gen = gen, read_t = t] {
            if (BucketWord::gen(bucket.load(std::memory_order_seq_cst)) != read_gen) return false;
            raise_time(read_t);
            return true;
        };
        // A refusal for lack of tokens or past the lease deadline: on a consumed record, its
        // units are counted as demand the feeder cannot see in what was spent (LimiterBody::
        // refused). Only here, never on the admit path, and only on consumed records.
        const auto refuse_unable = [&, consumed = p.consumed] {
            if (!refuse()) return false;
            if (consumed && count_refused) note_refused(body_, n);
            return true;
        };
        if (n > p.bucket_size) {
            // Never satisfiable: not demand a lease could serve, so not counted.
            if (refuse()) return TakeOutcome::asked_for_more;
            fw = in_flight.load(std::memory_order_seq_cst);
            continue;
        }
        // What the bucket may hold, given what was in flight just before our own increment.
        // Checking against it is what bounds what is in flight by the target (see the design).
        const std::int64_t cap = p.cap(f);
        const bool room = f <= kMaxInFlight - n;
        // A consumed record's lease deadline, read before the CAS that takes (the deadline the
        // landed take is checked against must be one stored before it: see the design). A
        // take whose time is already at or past it is refused without taking. A caller that
        // gave no time on an infinite-rate record has t = L here (the clock unread): the check
        // then refuses less, and the post-CAS check (landed_before, which reads the clock)
        // refuses a late take all the same (docs/design.md, "Lease deadlines").
        std::int64_t deadline = kNoLeaseDeadline;
        if (p.consumed) [[unlikely]] {
            deadline = body_.lease_deadline_ns.load(std::memory_order_seq_cst);
            if (deadline != kNoLeaseDeadline && t >= deadline) {
                if (refuse_unable()) return TakeOutcome::unable;
                fw = in_flight.load(std::memory_order_seq_cst);
                continue;
            }
        }
        if (p.rate_infinite) {
            // The bucket is the cap; a take is one CAS on F, validated against a switch.
            if (cap < n || !room) {
                if (refuse_unable()) return TakeOutcome::unable;
                fw = in_flight.load(std::memory_order_seq_cst);
                continue;
            }
            LIM_RACE_POINT();
            if (!in_flight.compare_exchange_weak(fw, fw + static_cast<std::uint64_t>(n),
                                                 std::memory_order_seq_cst,
                                                 std::memory_order_seq_cst)) {
                continue;
            }
            LIM_RACE_POINT();
            if (BucketWord::gen(bucket.load(std::memory_order_seq_cst)) != gen) {
                // Reconfigured under us: retry with the new configuration. A consumed record's
                // take keeps its n in F, consumed and not admitted (as a late take does): the
                // switch may be the feeder's "target <- F + a" with F read after our CAS, which
                // counted our n as spent; taking it back out would leave n more to spend than
                // Redis counts ("Lease deadlines").
                if (!p.consumed) rollback_unless_consumed(body_, n);
                fw = in_flight.load(std::memory_order_seq_cst);
                continue;
            }
            if (deadline != kNoLeaseDeadline && !landed_before(deadline)) {
                // Late: consumed (stays in flight), not admitted. Not counted as refused: its
                // units are in F, which the feeder already counts as spent.
                return TakeOutcome::unable;
            }
            if (!p.consumed) hold.add(0, n);  // consumed: nothing for recovery to give back
            hold.admitted();
            // No raise of L: with an infinite rate nothing depends on time (a switch to a
            // finite rate anchors at max(now, L) and keeps the marker's debt regardless).
            return TakeOutcome::taken;
        }
        const std::int64_t d = p.drip_at(t);
        std::int64_t x = BucketWord::x(s);
        if (std::max<std::int64_t>(0, std::min(d - x, cap)) < n || !room) {
            if (refuse_unable()) return TakeOutcome::unable;
            fw = in_flight.load(std::memory_order_seq_cst);
            continue;
        }
        if (d > rebase_at) return TakeOutcome::rebase_needed;
        // Tentatively in flight first, so that a concurrent reader sees fewer tokens, never more.
        LIM_RACE_POINT();
        if (!in_flight.compare_exchange_weak(fw, fw + static_cast<std::uint64_t>(n),
                                             std::memory_order_seq_cst,
                                             std::memory_order_seq_cst)) {
            backoff.pause();
            continue;
        }
        // L before the CAS on S: a switch that reads S after our take then reads L >= t, so
        // it never re-anchors a new (faster) rate behind our take (switch_locked; docs/
        // design.md, "Time"). A raise for a take that then fails is a refusal's raise.
        LIM_RACE_POINT();
        raise_time(t);
        // Take from the bucket: fold at t (the allowance beyond the cap is lost, as the seed
        // loses it) and move the marker past our n. The CAS expects the generation we read, so
        // it fails if the configuration switched.
        for (;;) {
            LIM_RACE_POINT();
            const std::uint64_t next = BucketWord::make(gen, std::max(x, d - cap) + n);
            if (bucket.compare_exchange_weak(s, next, std::memory_order_seq_cst,
                                             std::memory_order_seq_cst)) {
                LIM_RACE_POINT();
                if (deadline != kNoLeaseDeadline && !landed_before(deadline)) {
                    return TakeOutcome::unable;  // late: consumed (in flight), not admitted
                }
                if (!p.consumed) hold.add(0, n);
                hold.admitted();
                return TakeOutcome::taken;
            }
            if (BucketWord::gen(s) != gen) break;
            x = BucketWord::x(s);
            if (std::max<std::int64_t>(0, std::min(d - x, cap)) < n) {
                // Too few now, under the same generation; but the switch to consumed may come
                // before the roll-back lands (as above).
                if (p.consumed) {
                    rollback_tentative(n);
                } else {
                    rollback_unless_consumed(body_, n);
                }
                raise_time(t);
                if (p.consumed && count_refused) note_refused(body_, n);
                return TakeOutcome::unable;
            }
            // Lost to another take or return under the same generation: let it finish before
            // retrying. Our n is tentatively in F meanwhile (readers and other takers see fewer
            // tokens, never more; docs/design.md, "Backoff after a lost CAS").
            backoff.pause();
        }
        // Reconfigured under us: start over with the new configuration. A consumed record's n
        // stays in F, as in the infinite-rate branch above.
        if (!p.consumed) rollback_unless_consumed(body_, n);
        fw = in_flight.load(std::memory_order_seq_cst);
    }
}

ReturnOutcome LimiterCore::return_to_hopper(Hold& hold, std::int64_t now_ns, std::int64_t n,
                                            std::int64_t rebase_at, std::int64_t* in_flight_seen,
                                            bool holding_checked) noexcept {
    std::atomic<std::uint64_t>& in_flight = body_.in_flight;
    std::atomic<std::uint64_t>& bucket = body_.bucket;
    CasBackoff backoff;
    std::uint64_t fw = in_flight.load(std::memory_order_seq_cst);
    for (;;) {
        // begin() steps aside from a frozen F, withdrawing the announcement: a forced reset may
        // then forget the tokens, so the caller's process-wide check no longer stands.
        if (is_frozen(fw)) holding_checked = false;
        auto [s, gen, p, t] = begin(hold, fw, now_ns);
        // Tokens taken by one process are returned by that process (Hold::require_held); a
        // consumed take is in no ledger, so anyone may return it.
        if (!holding_checked && !p.consumed && !hold.covers(0, static_cast<std::uint64_t>(n)))
            return ReturnOutcome::not_held;
        const auto f = static_cast<std::int64_t>(fw);
        if (f < n) {
            *in_flight_seen = f;
            return ReturnOutcome::over_release;
        }
        if (!p.rate_infinite && !p.target_infinite) {
            // As the seed advances time before the tokens come back: fold at t the drip that
            // found the hopper empty (beyond what the system leaves outside flight), so that the
            // returned tokens drip from t on, never retroactively. Drip beyond the bucket size
            // needs no fold here: the bucket size does not change with a return.
            const std::int64_t x = BucketWord::x(s);
            const std::int64_t d = p.drip_at(t);
            const std::int64_t folded = std::max(x, d - p.outside_flight(f));
            if (folded != x) {
                if (d > rebase_at) return ReturnOutcome::rebase_needed;
                LIM_RACE_POINT();
                if (!bucket.compare_exchange_strong(s, BucketWord::make(gen, folded),
                                                    std::memory_order_seq_cst,
                                                    std::memory_order_seq_cst)) {
                    backoff.pause();
                    fw = in_flight.load(std::memory_order_seq_cst);
                    continue;
                }
            } else if (BucketWord::gen(bucket.load(std::memory_order_seq_cst)) != gen) {
                fw = in_flight.load(std::memory_order_seq_cst);
                continue;
            }
        } else if (BucketWord::gen(bucket.load(std::memory_order_seq_cst)) != gen) {
            // With an infinite rate or target nothing needs folding, if that is still the
            // configuration.
            fw = in_flight.load(std::memory_order_seq_cst);
            continue;
        }
        LIM_RACE_POINT();
        if (!in_flight.compare_exchange_weak(fw, fw - static_cast<std::uint64_t>(n),
                                             std::memory_order_seq_cst,
                                             std::memory_order_seq_cst)) {
            backoff.pause();
            continue;
        }
        if (!p.consumed) hold.add(0, -n);  // consumed: nothing for recovery to give back
        if (!p.rate_infinite) raise_time(t);
        wake_all(body_.wake);
        return ReturnOutcome::returned;
    }
}

LimiterReading LimiterCore::read(std::int64_t now_ns) const noexcept {
    LimiterReading r;
    // A snapshot of (S, F): S unchanged around the read of F means both held at that instant.
    // Under heavy traffic settle for a configuration that did not change.
    for (int attempt = 0;; ++attempt) {
        const std::uint64_t s1 = body_.bucket.load(std::memory_order_seq_cst);
        r.params = load_params(body_.config[BucketWord::gen(s1) & 1]);
        r.in_flight = value_of(body_.in_flight.load(std::memory_order_seq_cst));
        const std::uint64_t s2 = body_.bucket.load(std::memory_order_seq_cst);
        if (s1 == s2 || (attempt >= 64 && BucketWord::gen(s1) == BucketWord::gen(s2))) {
            r.bucket_word = s2;
            break;
        }
    }
    r.x = BucketWord::x(r.bucket_word);
    r.t_ns = std::max(now_ns, body_.time_ns.load(std::memory_order_relaxed));
    raise_time(r.t_ns);
    r.in_bucket = r.params.bucket_at(r.x, r.in_flight, r.t_ns);
    r.in_hopper = r.params.target_infinite
                      ? 0
                      : r.params.outside_flight(r.in_flight) - r.in_bucket;  // no overflow
    // A token bucket's own takes are in flight too, recorded in the ledgers rather than in F
    // (try_take_bucket). Added after the bucket is computed: its cap depends on F alone.
    if (load_flavor(state_.record(record_).header) ==
        static_cast<std::uint16_t>(LimiterFlavor::token_bucket)) {
        const std::int64_t taken = bucket_taken();
        r.in_flight = taken > kMaxInFlight - r.in_flight ? kMaxInFlight : r.in_flight + taken;
    }
    return r;
}

LimiterParams LimiterCore::params() const noexcept {
    for (;;) {
        const std::uint32_t gen = BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst));
        const LimiterParams p = load_params(body_.config[gen & 1]);
        if (BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst)) == gen) return p;
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration switches (rare)
// ---------------------------------------------------------------------------------------------

// Where a re-anchor at `t` (>= p.anchor_ns, a finite rate) may move the drip's anchor without
// losing a fraction of a unit to rounding: the latest time `a` in [anchor, t] at which
// (a - anchor) x R / 10^9 is a whole number. For a whole R (units per second) such times are
// the anchor plus multiples of step = 10^9 / gcd(R, 10^9) ns (at most 1 s), and D(a + e) =
// D(a) + floor(e R / 10^9) exactly. `t` itself when R is not whole, or when step x R exceeds
// 2^62 (so that a short drip after the re-anchor, (t - a) x R < step x R, stays far from
// 2^64: TokenBucket's take uses that short form). Only for an infinite target, where the fold
// at `a` rather than `t` changes no future bucket (the cap is the constant bucket size, and a
// return folds nothing); with a finite target a fold at `t` keeps returned tokens from
// dripping retroactively (docs/design.md ("The Limiter family"), "The drip, exactly").
namespace {
std::int64_t exact_anchor(const LimiterParams& p, std::int64_t t) noexcept {
    const std::uint64_t r = p.drip.m;
    if (p.drip.shift != 0 || r == 0 || t <= p.anchor_ns) return t;
    const std::uint64_t step = kNsPerSec / std::gcd(r, kNsPerSec);
    std::uint64_t span = 0;
    if (__builtin_mul_overflow(step, r, &span) || span > (std::uint64_t{1} << 62)) return t;
    // t - anchor may exceed INT64_MAX (an anchor from a far-past creation `now`, or a corrupt
    // word): taken in 64 unsigned bits, and the result as t minus the remainder (< step <= 10^9,
    // and t - remainder >= anchor), so that nothing overflows a signed type.
    const auto elapsed = static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(p.anchor_ns);
    return t - static_cast<std::int64_t>(elapsed % step);
}
}  // namespace

// The switch itself, with the config lock held by the caller (so no other writer touches the
// inactive block). Folds the bucket at max(now, L) under the old configuration, writes the new
// configuration into the inactive block, and publishes both with one CAS on S.
void switch_locked(LimiterBody& body, std::int64_t now_ns, bool reanchor,
                   void (*change)(LimiterParams&, void*), void* ctx) noexcept {
    for (;;) {
        std::uint64_t s = body.bucket.load(std::memory_order_seq_cst);
        const std::uint32_t gen = BucketWord::gen(s);
        const LimiterParams old = load_params(body.config[gen & 1]);
        // Never before the current anchor either: D is 0 before it, so a re-anchor there would
        // count the drip since then again.
        const std::int64_t l = body.time_ns.load(std::memory_order_relaxed);
        const std::int64_t t = std::max(
            {now_ns, l,
             old.rate_infinite ? std::numeric_limits<std::int64_t>::min() : old.anchor_ns});
        const std::int64_t f = value_of(body.in_flight.load(std::memory_order_seq_cst));
        const std::int64_t x = BucketWord::x(s);
        LimiterParams next = old;
        if (change) change(next, ctx);
        // The old cap, bounded as every configuration bounds it (a damaged block's bucket size
        // may be anything, and -cap must not overflow).
        const std::int64_t cap = std::clamp<std::int64_t>(old.cap(f), 0, kMaxTokenUnits);
        std::int64_t next_x = 0;
        if (!next.rate_infinite) {
            const bool large = !old.rate_infinite && old.drip_at(t) > kRebaseAt;
            if (old.rate_infinite) {
                // The bucket was the cap; it starts the new drip full.
                next.anchor_ns = t;
                next_x = -cap;
            } else if (reanchor || large) {
                // D(t) = 0 from here. The marker becomes X - D(t), folded at t: minus the bucket
                // at t, or, when takes at times after t have moved X beyond D(t) (t is behind
                // them: a stale `now` and L not yet raised by their operation), the positive
                // debt X - D(t), which the new drip must pay before the bucket holds anything.
                // Dropping that debt would let tokens already taken drip again (issue 9: a
                // bucket of 10 at 1/s gave 11 at one instant).
                // A pure re-anchor of a token bucket's drip moves the anchor to a time whose
                // drip has no fraction (exact_anchor), so that it loses nothing to rounding.
                const std::int64_t at =
                    change == nullptr && old.target_infinite ? exact_anchor(old, t) : t;
                next.anchor_ns = at;
                next_x = std::max(x - old.drip_at(at), -cap);
                // A faster rate re-anchored at t counts its drip from t on, but a take that
                // landed before this switch may have run at a time after t: the token bucket's
                // take publishes its time in L only when it is more than kLazyTimeGrain ahead
                // (and every take before its CAS on S), so such a take ran at most at
                // l + kLazyTimeGrain. Its debt X - D(t) is counted at the old rate; the new
                // rate would drip the same interval again, (R' - R) x (its time - t) more than
                // burst + rate x T allows. So the old state is folded at the latest time such a
                // take may have had, `late`, and the new drip counts from t minus what it
                // drips up to `late`: the switch as if made at `late` (fewer tokens, never
                // more, for every time a take may still have; docs/design.md, "Time").
                if (change != nullptr && next.rate_per_sec > old.rate_per_sec) {
                    const auto gap = static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(l);
                    if (gap < static_cast<std::uint64_t>(kLazyTimeGrainNs)) {
                        const std::int64_t ahead =
                            kLazyTimeGrainNs - static_cast<std::int64_t>(gap);
                        std::int64_t late = 0;
                        if (__builtin_add_overflow(t, ahead, &late))
                            late = std::numeric_limits<std::int64_t>::max();
                        const std::int64_t d_late = old.drip_at(late);
                        next_x = std::max(next_x,
                                          next.drip_at(late) + std::max(x, d_late - cap) - d_late);
                    }
                }
            } else {
                next_x = std::max(x, old.drip_at(t) - cap);
            }
        }
        store_params(body.config[(gen + 1) & 1], next);
        // L first, then S: an operation that reads the new generation then reads L at or above
        // the switch time, so none of them uses the new anchor at a time before it.
        raise_time_ns(body.time_ns, t);
        LIM_RACE_POINT();
        if (body.bucket.compare_exchange_strong(s, BucketWord::make(gen + 1, next_x),
                                                std::memory_order_seq_cst,
                                                std::memory_order_seq_cst)) {
            return;
        }
    }
}

bool checkpoint_refused_recently(const LimiterBody& body) noexcept {
    // Only a time in the last kCheckpointMemo counts (the word is read from the segment: a
    // corrupt or far-future one is ignored; unsigned, so nothing overflows).
    const auto now = static_cast<std::uint64_t>(to_nanos(Clock::now()));
    const auto refused =
        static_cast<std::uint64_t>(body.checkpoint_refused_ns.load(std::memory_order_relaxed));
    const auto memo = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(kCheckpointMemo).count());
    return refused != 0 && refused <= now && now - refused < memo;
}

bool next_is_checkpoint(const LimiterBody& body) noexcept {
    return is_generation_checkpoint(
        (BucketWord::gen(body.bucket.load(std::memory_order_seq_cst)) + 1) & 0xFFFF);
}

bool switch_checked(const SegmentState& state, std::uint32_t record, LimiterBody& body,
                    std::int64_t now_ns, bool reanchor, void (*change)(LimiterParams&, void*),
                    void* ctx, std::chrono::milliseconds checkpoint_wait) noexcept {
    // Under the config lock every writer of the generation is excluded (switches and resets
    // hold it), so the generation read here is the one switch_locked's CAS moves on from.
    if (next_is_checkpoint(body)) {
        // A refusal in the last kCheckpointMemo: refused again at once, so that writers retrying
        // while a thread stays stopped (a feeder's grants, a hard rebase on every take) do not
        // each hold the segment's config lock, which every record's switches share, for a
        // checkpoint's fence and wait.
        if (checkpoint_refused_recently(body)) return false;
        const std::uint32_t next_gen =
            (BucketWord::gen(body.bucket.load(std::memory_order_seq_cst)) + 1) & 0xFFFF;
        if (!generation_may_advance(state, record, next_gen, checkpoint_wait)) {
            body.checkpoint_refused_ns.store(to_nanos(Clock::now()), std::memory_order_relaxed);
            return false;
        }
    }
    switch_locked(body, now_ns, reanchor, change, ctx);
    return true;
}

void LimiterCore::switch_config(std::int64_t now_ns, bool reanchor,
                                void (*change)(LimiterParams&, void*), void* ctx) {
    if (state_.read_only()) {
        throw Error(Errc::permission_denied,
                    "segment '" + state_.name() + "' is open read-only; cannot reconfigure");
    }
    // Configuration writers share the inactive block, so they exclude each other with the
    // segment's config lock: an OFD lock, which the kernel drops if its holder dies, so a writer
    // killed mid-switch blocks nobody (the block it half wrote is inactive and rewritten by the
    // next writer). Takes and returns never take it; they validate against the switch, which is
    // a CAS on S.
    // A writer stopped holding the lock (SIGSTOP, a debugger) keeps it: we wait kLockWaitTimeout
    // at most, then Error(busy), nothing changed.
    FileLock lock = FileLock::lock_or_busy(
        state_.fd(), LockByte::config, state_.name(),
        "reconfigure limiter '" + std::string(record_key(state_.record(record_))) + "'");
    if (!switch_checked(state_, record_, body_, now_ns, reanchor, change, ctx, kCheckpointWait)) {
        throw Error(Errc::busy,
                    "reconfigure limiter '" + std::string(record_key(state_.record(record_))) +
                        "' of segment '" + state_.name() +
                        "': a generation checkpoint found a live thread in the middle of an "
                        "operation on it for " +
                        std::to_string(kCheckpointWait.count()) +
                        " ms, within the last second (stopped: SIGSTOP, a debugger); the "
                        "configuration generation must not move further until it continues or "
                        "exits (docs/design.md, \"Generation checkpoints\"); nothing changed");
    }
    wake_all(body_.wake);
}

bool LimiterCore::rebase(std::int64_t now_ns, std::optional<TimePoint> until,
                         bool* checkpoint_refused) {
    // A soft rebase (no `until`) at a checkpoint refused in the last second leaves it at once,
    // before the lock: one load or two, where a lock attempt costs a take three syscalls, while
    // a thread stays stopped. (A hint: under the lock switch_checked decides again.)
    if (!until && next_is_checkpoint(body_) && checkpoint_refused_recently(body_)) {
        if (checkpoint_refused != nullptr) *checkpoint_refused = true;
        return false;
    }
    std::optional<FileLock> lock = until
                                       ? FileLock::lock_until(state_.fd(), LockByte::config, *until)
                                       : FileLock::try_lock_fresh(state_.fd(), LockByte::config);
    if (!lock) return false;
    // A checkpoint refused (a live thread in the middle of an operation on the record) counts as
    // the lock not had: a soft rebase goes on without (the marker has room up to kRebaseHard),
    // a hard one answers as at its deadline or busy. A soft rebase makes the checkpoint with a
    // try's wait: with nobody stopped, the threads announced on the record are running and are
    // seen out within it; one preempted mid-operation refuses it, and a later rebase retries.
    std::chrono::milliseconds wait = kTryLockGrace;
    if (until) {
        // As long as the caller's deadline allows, between a try's wait and a blocking one's.
        wait =
            std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(*until - Clock::now()),
                       kCheckpointTryWait, kCheckpointWait);
    }
    if (switch_checked(state_, record_, body_, now_ns, true, nullptr, nullptr, wait)) {
        return true;
    }
    if (checkpoint_refused != nullptr) *checkpoint_refused = true;
    return false;
}

bool LimiterCore::rebase(std::int64_t now_ns, bool wait) {
    return rebase(now_ns,
                  wait ? std::optional<TimePoint>(Clock::now() + kLockWaitTimeout) : std::nullopt);
}

namespace {

// rebase_hard's Error(busy): the config lock stayed held, or a generation checkpoint refused.
[[noreturn]] void throw_rebase_busy(const std::string& segment, const std::string& what,
                                    bool stopped_operation, std::chrono::milliseconds waited) {
    if (!stopped_operation) throw_lock_busy(segment, LockByte::config, what, waited);
    throw Error(Errc::busy,
                "segment '" + segment + "': cannot " + what +
                    ": a generation checkpoint found a live thread in the middle of an operation "
                    "on it, within the last second (stopped: SIGSTOP, a debugger), and the "
                    "configuration generation must not move further until it continues or "
                    "exits (docs/design.md, \"Generation checkpoints\"); nothing changed");
}

}  // namespace

bool LimiterCore::rebase_hard(std::int64_t now_ns, const RebaseWait& how) {
    const std::string what =
        "re-anchor the drip of limiter '" + std::string(record_key(state_.record(record_))) + "'";
    bool stopped_operation = false;
    const std::uint32_t gen = BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst));
    // Another thread re-anchored while this one waited for the lock: the caller decides again on
    // the new drip (which may need no rebase), rather than failing for a lock it no longer needs.
    const auto rebased_meanwhile = [&] {
        return !stopped_operation &&
               BucketWord::gen(body_.bucket.load(std::memory_order_seq_cst)) != gen;
    };
    if (!how.wait) {
        // A try_* does not wait for a lock, beyond what a switch holds it for: microseconds, or
        // at a generation checkpoint its fence and wait (kCheckpointWait), which another thread's
        // hard rebase may be making now.
        const std::chrono::milliseconds grace =
            next_is_checkpoint(body_) ? kCheckpointWait + std::chrono::milliseconds{100}
                                      : kTryLockGrace;
        if (rebase(now_ns, Clock::now() + grace, &stopped_operation)) return true;
        if (rebased_meanwhile()) return true;
        throw_rebase_busy(state_.name(), what, stopped_operation, grace);
    }
    const TimePoint limit = Clock::now() + kLockWaitTimeout;
    const bool caller_first = how.deadline != nullptr && *how.deadline <= limit;
    if (rebase(now_ns, caller_first ? *how.deadline : limit, &stopped_operation)) return true;
    if (rebased_meanwhile()) return true;
    if (caller_first) return false;
    throw_rebase_busy(state_.name(), what, stopped_operation, kLockWaitTimeout);
}

bool LimiterCore::reanchor_drip(std::int64_t now_ns) {
    // A re-anchor only saves time: at a checkpoint refused in the last second it gives up before
    // the lock (the long form of the drip serves meanwhile), and otherwise makes the checkpoint
    // with a try's wait (as a soft rebase does: LimiterCore::rebase).
    if (next_is_checkpoint(body_) && checkpoint_refused_recently(body_)) return false;
    std::optional<FileLock> lock = FileLock::try_lock_fresh(state_.fd(), LockByte::config);
    if (!lock) return false;
    // Under the lock no other switch can run, so what is checked here still holds at
    // switch_locked's CAS (takes move X, never the block). The lock's last holder may have been
    // the re-anchor this thread saw was due.
    const std::uint64_t s = body_.bucket.load(std::memory_order_seq_cst);
    const LimiterParams p = load_params(body_.config[BucketWord::gen(s) & 1]);
    if (p.rate_infinite || !p.target_infinite || p.drip.shift != 0 || p.drip.m == 0) return false;
    // A block no configuration can produce (a corrupt segment) is not re-anchored here: the
    // take's own checks refuse it, and switch_locked negates the bucket size.
    if (p.bucket_size <= 0 || p.bucket_size > kMaxTokenUnits) return false;
    const std::int64_t t =
        std::max({now_ns, body_.time_ns.load(std::memory_order_relaxed), p.anchor_ns});
    std::uint64_t product = 0;
    if (!__builtin_mul_overflow(
            static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(p.anchor_ns), p.drip.m,
            &product)) {
        return false;
    }
    return switch_checked(state_, record_, body_, now_ns, true, nullptr, nullptr, kTryLockGrace);
}

// ---------------------------------------------------------------------------------------------
// Sleepers
// ---------------------------------------------------------------------------------------------

namespace {

// Waits aside while a reaper recounts the record (its in-flight word frozen), then proves with a
// CAS (an RMW, so it is ordered against the reaper's freeze) that no recount has begun since.
// A recount that freezes after this CAS then finds our Hold pending and waits for it, so every
// change to the waiter count made under a Hold lies wholly before or wholly after a recount.
void wait_for_no_recount(Hold& hold, LimiterBody& body, const SegmentState& state) noexcept {
    std::uint64_t fw = body.in_flight.load(std::memory_order_seq_cst);
    for (;;) {
        if (hold.stepped_aside(fw, body.in_flight, state)) continue;
        LIM_RACE_POINT();
        if (body.in_flight.compare_exchange_weak(fw, fw, std::memory_order_seq_cst,
                                                 std::memory_order_seq_cst)) {
            return;
        }
    }
}

}  // namespace

LimiterWaiter::LimiterWaiter(LimiterCore& core, std::int64_t amount) : core_(core) {
    Hold hold(core.state(), core.record());
    SlotHeader& slot = hold.slot();
    slot_ = &slot;
    wait_for_no_recount(hold, core.body(), core.state());
    slot.waiting_layer.store(0, std::memory_order_relaxed);
    slot.waiting_amount.store(static_cast<std::uint64_t>(amount), std::memory_order_relaxed);
    slot.waiting_record.store(core.record() + 1, std::memory_order_relaxed);
    LIM_RACE_POINT();
    core.wake().waiters.fetch_add(1, std::memory_order_seq_cst);
    snapshot_ = core.wake().seq.load(std::memory_order_seq_cst);
}

LimiterWaiter::~LimiterWaiter() {
    try {
        Hold hold(core_.state(), core_.record());
        wait_for_no_recount(hold, core_.body(), core_.state());
        core_.wake().waiters.fetch_sub(1, std::memory_order_seq_cst);
        LIM_RACE_POINT();
        slot_->waiting_record.store(0, std::memory_order_relaxed);
    } catch (...) {
        // No slot to announce the change in (cannot happen once the constructor had one: the
        // thread's slot is claimed for its life). Deregister anyway, so that neither the count
        // nor the slot keeps the registration.
        core_.wake().waiters.fetch_sub(1, std::memory_order_seq_cst);
        slot_->waiting_record.store(0, std::memory_order_relaxed);
    }
}

void LimiterWaiter::wait(TimePoint deadline) noexcept {
    futex_wait(core_.wake().seq, snapshot_, deadline);
    snapshot_ = core_.wake().seq.load(std::memory_order_seq_cst);
}

}  // namespace lim::detail
