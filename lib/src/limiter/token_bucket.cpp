// lim::TokenBucket: Jane Street's Token_bucket.create_exn, on a Limiter record, and its own
// representation of a take: with an infinite hopper nothing depends on what is in flight, so a
// take is GCRA on the bucket word alone (docs/design.md ("The Limiter family"), "TokenBucket's
// take").
#include "lim/token_bucket.hpp"

#include <atomic>
#include <cmath>

#include "limiter/limiter_open.hpp"
#include "shm/process_table.hpp"
#include "sync/race_point.hpp"

namespace lim {

namespace detail {

std::atomic<void (*)() noexcept> bucket_take_hook{nullptr};

// Each configuration field the take uses is loaded once, straight from the block, with no
// LimiterParams gathered in memory. (TokenBucket::try_take first makes one attempt of its own,
// bucket_take_once, and comes here only when that one did not take.)
TakeOutcome LimiterCore::try_take_bucket(LedgerEntry& entry, std::int64_t now_ns, std::int64_t n,
                                         std::int64_t rebase_at) noexcept {
    std::atomic<std::uint64_t>& bucket = body_.bucket;
    std::uint64_t s = bucket.load(std::memory_order_seq_cst);
    for (;;) {
        const std::uint32_t gen = BucketWord::gen(s);
        const ConfigBlock& c = body_.config[gen & 1];
        const std::uint32_t flags = c.flags.load(std::memory_order_acquire);
        const std::int64_t size = c.bucket_size.load(std::memory_order_acquire);
        TakeOutcome refusal = TakeOutcome::unable;
        if ((flags & (kRateInfinite | kTargetInfinite)) != kTargetInfinite) [[unlikely]] {
            // A Limiter handle reconfigured it into something else: the general take applies.
            refusal = TakeOutcome::not_a_token_bucket;
        } else if (n > size) [[unlikely]] {
            refusal = TakeOutcome::asked_for_more;
        } else {
            const std::int64_t l = body_.time_ns.load(std::memory_order_relaxed);
            const std::int64_t t = std::max(now_ns, l);
            const std::int64_t d = drip_from_block(c, t);
            const std::int64_t x = BucketWord::x(s);
            // The bucket holds clamp(min(d - x, size), 0, ..); with 0 < n <= size that is at
            // least n iff d - x is (d < 2^62 and |x| < 2^47: no overflow).
            if (d - x >= n) [[likely]] {
                if (d > rebase_at) [[unlikely]]
                    return TakeOutcome::rebase_needed;
                // L, lazily, and before the CAS: only when more than kLazyTimeGrain behind t (a
                // take behind L by less is a take at a slightly earlier time: fewer tokens,
                // never more). Before the CAS, so that a switch that reads S after this take
                // reads an L at least t - kLazyTimeGrain: switch_locked counts on that bound to
                // keep a faster rate from dripping retroactively over a take it cannot see
                // (docs/design.md, "Time"). Saves a CAS on the hot line per take otherwise.
                // (t >= l: their difference in unsigned 64 bits, exact even for a corrupt L.)
                if (static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(l) >
                    static_cast<std::uint64_t>(kLazyTimeGrainNs))
                    raise_time(t);
                // Fold at t (the allowance beyond the bucket is lost, as the seed loses it) and
                // move the marker past our n. The CAS expects the generation we read, so it
                // fails if the configuration switched (and with it every field read above); it
                // is the take's linearisation point.
                LIM_RACE_POINT();
                if (auto* hook = bucket_take_hook.load(std::memory_order_relaxed)) [[unlikely]]
                    hook();
                if (!bucket.compare_exchange_weak(
                        s, BucketWord::make(gen, std::max(x, d - size) + n),
                        std::memory_order_seq_cst, std::memory_order_seq_cst)) {
                    continue;
                }
                LIM_RACE_POINT();
                // The thread's own ledger entry (a single writer: plain stores). A process killed
                // before these stores took the tokens all the same: in_flight then undercounts,
                // and nothing is owed back, since a token bucket's tokens are consumed.
                LedgerEntry& e = entry;
                auto& held = e.held[kBucketTakenLayer];
                held.store(held.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
                e.admitted.store(e.admitted.load(std::memory_order_relaxed) + 1,
                                 std::memory_order_relaxed);
                return TakeOutcome::taken;
            }
        }
        // A decision that changes nothing is only as good as the configuration it read: check
        // that the generation did not move meanwhile (a seqlock reader's check).
        const std::uint64_t again = bucket.load(std::memory_order_seq_cst);
        if (BucketWord::gen(again) == gen) return refusal;
        s = again;
    }
}

std::int64_t LimiterCore::bucket_taken() const noexcept {
    std::int64_t sum = 0;
    for (std::uint32_t i = 0; i < state_.geometry().max_processes; ++i) {
        const SlotState st = SlotOwner::state(state_.slot(i).owner.load(std::memory_order_acquire));
        if (st == SlotState::free) continue;
        const std::int64_t h = holding(state_.ledger(i, record_), kBucketTakenLayer);
        if (h > 0) sum = h > kMaxInFlight - sum ? kMaxInFlight : sum + h;
    }
    return sum;
}

}  // namespace detail

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

TokenBucket::TokenBucket(Limiter limiter) : LimiterFacade(std::move(limiter)) {
    // Its own representation of a take only on a record a TokenBucket created: a general
    // Limiter record it adopted (lim-feeder's global rate) keeps the general take, so that the
    // Limiter handles on it see every take in F.
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    bucket_take_ = !ref.state->read_only() &&
                   detail::load_flavor(ref.state->record(ref.index).header) ==
                       static_cast<std::uint16_t>(detail::LimiterFlavor::token_bucket);
}

namespace detail {
namespace {

// D(t) of a token bucket's block in its short form only (drip_from_block's first case): d =
// floor((t - anchor) x R / 10^9) when R is whole and (t - anchor) x R fits in 64 bits; false
// otherwise (the drip's long form, out of line in try_take_bucket, and a re-anchor that brings
// the short form back: reanchor_for_short_drip). Kept apart so that the take's common case
// holds few values in registers and spills none before its CAS.
[[gnu::always_inline]] inline bool short_drip(const ConfigBlock& c, std::int64_t t,
                                              std::int64_t& d) noexcept {
    std::int64_t elapsed = 0;
    if (__builtin_sub_overflow(t, c.anchor_ns.load(std::memory_order_acquire), &elapsed))
        return false;
    if (elapsed <= 0) return true;  // d = 0: no drip before the anchor
    if (c.drip_shift.load(std::memory_order_acquire) != 0) return false;
    std::uint64_t p = 0;
    if (__builtin_mul_overflow(static_cast<std::uint64_t>(elapsed),
                               c.drip_m.load(std::memory_order_acquire), &p)) {
        return false;
    }
    d = static_cast<std::int64_t>(p / 1'000'000'000);
    return true;
}

// The common case of a token bucket's take, inline in TokenBucket::try_take: one attempt,
// exactly one iteration of LimiterCore::try_take_bucket's loop where that iteration takes (a
// token bucket's configuration, the bucket holding `n` at t, no rebase due, the CAS landing).
// Straight-line code with few live values, so that the take spills nothing to the stack before
// its CAS (a locked instruction waits for every earlier store to drain). false: nothing changed,
// and try_take_bucket decides (a refusal, a reconfiguration, a rebase, a lost CAS).
[[gnu::always_inline]] inline bool bucket_take_once(LimiterBody& body, LedgerEntry& entry,
                                                    std::int64_t now_ns, std::int64_t n) noexcept {
    std::uint64_t s = body.bucket.load(std::memory_order_seq_cst);
    const std::uint32_t gen = BucketWord::gen(s);
    const ConfigBlock& c = body.config[gen & 1];
    const std::uint32_t flags = c.flags.load(std::memory_order_acquire);
    if ((flags & (kRateInfinite | kTargetInfinite)) != kTargetInfinite) return false;
    const std::int64_t size = c.bucket_size.load(std::memory_order_acquire);
    if (n > size) return false;
    const std::int64_t l = body.time_ns.load(std::memory_order_relaxed);
    const std::int64_t t = std::max(now_ns, l);
    std::int64_t d = 0;
    if (!short_drip(c, t, d)) return false;
    const std::int64_t x = BucketWord::x(s);
    if (d - x < n || d > kRebaseAt) return false;
    // The lazy raise of L, before the CAS, as in try_take_bucket.
    if (static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(l) >
        static_cast<std::uint64_t>(kLazyTimeGrainNs))
        raise_time_ns(body.time_ns, t);
    // The linearisation point, as in try_take_bucket: the CAS expects the generation whose block
    // was read, so a switch since makes it fail.
    LIM_RACE_POINT();
    if (!body.bucket.compare_exchange_strong(s, BucketWord::make(gen, std::max(x, d - size) + n),
                                             std::memory_order_seq_cst,
                                             std::memory_order_seq_cst)) {
        return false;
    }
    LIM_RACE_POINT();
    // The ledger stores, as in try_take_bucket.
    auto& held = entry.held[kBucketTakenLayer];
    held.store(held.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    entry.admitted.store(entry.admitted.load(std::memory_order_relaxed) + 1,
                         std::memory_order_relaxed);
    return true;
}

}  // namespace

// Token buckets whose rate is at most this many units per second (5,124 tokens/s: every vendor
// API limit we know of) keep their drip in its short form by re-anchoring it: a re-anchor is
// due 2^64 / R ns after the anchor, at least 6 minutes. Each is a configuration switch, and the
// generation has 16 bits: a taker stopped between its load of S and its CAS across 65,536
// switches could land on a recycled word (docs/design.md, "TokenBucket's take", generation
// wrap). Six minutes makes that a stop of 273 days, no nearer than the rebases every record
// already has (266 days at 10^7 tokens/s); a 100 ms window made it 1.8 hours. Faster rates use
// the long form, as every rate did before. A variable only so that tests can exercise many
// re-anchors in little time (token_bucket_reanchor_test); nothing else writes it.
std::atomic<std::uint64_t> short_drip_max_rate{kShortDripMaxRate};

namespace {

// When the drip of the token bucket's current configuration no longer has its short form at
// max(now, L) (and its rate is at most short_drip_max_rate), re-anchors it (LimiterCore::
// reanchor_drip: the config lock, tried without waiting; exact, see exact_anchor) so that the
// takes that follow have it again. A re-anchor only saves time: if the lock is held or cannot
// be had, the take goes on with the long form, which is exact at any elapsed time. A thread
// whose attempt did not re-anchor (the lock held, or an error) skips the next 1,024 chances, so
// that a stopped lock holder, or a process out of descriptors, costs its takes no syscalls
// (three per attempt) but one attempt per 1,024 takes.
void reanchor_for_short_drip(LimiterCore& core, std::int64_t now_ns) noexcept {
    thread_local std::uint32_t skip = 0;
    const LimiterBody& body = core.body();
    const std::uint64_t s = body.bucket.load(std::memory_order_seq_cst);
    const ConfigBlock& c = body.config[BucketWord::gen(s) & 1];
    if ((c.flags.load(std::memory_order_acquire) & (kRateInfinite | kTargetInfinite)) !=
            kTargetInfinite ||
        c.drip_shift.load(std::memory_order_acquire) != 0 ||
        c.drip_m.load(std::memory_order_acquire) >
            short_drip_max_rate.load(std::memory_order_relaxed)) {
        return;
    }
    const std::int64_t t = std::max(now_ns, body.time_ns.load(std::memory_order_relaxed));
    std::int64_t d = 0;
    if (short_drip(c, t, d)) return;
    if (skip != 0) {
        --skip;
        return;
    }
    try {
        if (!core.reanchor_drip(now_ns)) skip = 1024;
    } catch (...) {
        skip = 1024;
    }
}

// TokenBucket::try_take on a record a TokenBucket created, after bucket_take_once declined:
// its own take's loop (try_take_bucket), `units` > 0, recorded in `entry` (the thread's), each
// attempt announced in `slot` (the thread's), and none of its rebases or its fallback to the
// general take (whose Holds announce for themselves).
[[gnu::noinline]] TryTake bucket_take(const RecordRef& ref, SlotHeader& slot, LedgerEntry& entry,
                                      std::int64_t now_ns, std::int64_t units) {
    LimiterCore core(*ref.state, ref.index, *ref.record);
    reanchor_for_short_drip(core, now_ns);
    std::int64_t rebase_at = kRebaseAt;
    for (;;) {
        announce_attempt(slot, (ref.index + 1) | kBucketTakeTag);
        const TakeOutcome outcome = core.try_take_bucket(entry, now_ns, units, rebase_at);
        withdraw_attempt(slot);
        switch (outcome) {
            case TakeOutcome::taken:
                return TryTake::taken;
            case TakeOutcome::unable:
                return TryTake::unable;
            case TakeOutcome::asked_for_more:
                return TryTake::asked_for_more_than_bucket_size;
            case TakeOutcome::not_a_token_bucket:
                return take_units(ref, now_ns, units);
            case TakeOutcome::rebase_needed:
                // As the general take does (Limiter::try_take): rebase without waiting for the
                // config lock first; if asked again, a try_take still does not wait: Error(busy)
                // (LimiterCore::rebase_hard).
                if (rebase_at == kRebaseAt) {
                    if (!core.rebase(now_ns, std::nullopt)) rebase_at = kRebaseHard;
                } else {
                    core.rebase_hard(now_ns, RebaseWait{});
                    rebase_at = kRebaseAt;
                }
                break;
        }
    }
}

}  // namespace
}  // namespace detail

namespace {

// A token bucket's own take of `units` (> 0) at `now_ns` (bounded).
[[gnu::always_inline]] inline TryTake take_bucket(const detail::RecordRef& ref, std::int64_t now_ns,
                                                  std::int64_t units) {
    // The thread's slot first: claiming it is what may throw (table_full), before anything is
    // taken.
    const detail::Holder h = detail::holder(*ref.state);
    detail::LedgerEntry& entry = h.entry(ref.index);
    auto& body = *reinterpret_cast<detail::LimiterBody*>(ref.record->body);
    if (!h.ephemeral) [[likely]] {
        detail::announce_attempt(*h.slot, (ref.index + 1) | detail::kBucketTakeTag);
        const bool took = detail::bucket_take_once(body, entry, now_ns, units);
        detail::withdraw_attempt(*h.slot);
        if (took) [[likely]]
            return TryTake::taken;
        return detail::bucket_take(ref, *h.slot, entry, now_ns, units);
    }
    // A slot claimed for this one take, by a thread past its slot registry's destruction (a take
    // from a thread_local destructor): given back after it, as ~Hold does for the general take
    // (retired if its ledger now records the take, and adopted again by this process's next
    // claim). Kept, every such take would occupy one slot of the table for the life of the
    // mapping.
    struct GiveBack {
        detail::SegmentState& state;
        const detail::Holder& h;
        ~GiveBack() { detail::release_ephemeral(state, h); }
    } give_back{*ref.state, h};
    detail::announce_attempt(*h.slot, (ref.index + 1) | detail::kBucketTakeTag);
    const bool took = detail::bucket_take_once(body, entry, now_ns, units);
    detail::withdraw_attempt(*h.slot);
    if (took) return TryTake::taken;
    return detail::bucket_take(ref, *h.slot, entry, now_ns, units);
}

// Whether the record is still a TokenBucket's. lim::convert_to_consumed (lim-feeder adopting a
// bucket a worker created before it started) rewrites the flavor once; from then on a handle
// opened before takes as one opened after does — the general take, which reads no clock for an
// infinite rate — instead of trying the bucket's own take first and paying a clock read and a
// declined attempt on every call. A hint (relaxed): every take validates the configuration it
// uses against the record's generation either way.
bool still_token_bucket(const detail::RecordRef& ref) noexcept {
    return detail::load_flavor(ref.record->header) ==
           static_cast<std::uint16_t>(detail::LimiterFlavor::token_bucket);
}

}  // namespace

TryTake TokenBucket::try_take(TimePoint now, double n) {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    if (!bucket_take_ || !still_token_bucket(ref)) [[unlikely]]
        return limiter_.try_take(now, n);
    const std::int64_t units = detail::amount_units(ref, "try_take", n);
    if (units == 0) return TryTake::taken;
    return take_bucket(ref, detail::bounded_now_ns(now), units);
}

TryTake TokenBucket::try_take(double n) {
    // A token bucket's own take needs the time (a finite rate); an adopted record's take reads
    // it only if it does.
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    if (!bucket_take_ || !still_token_bucket(ref)) [[unlikely]]
        return limiter_.try_take(n);
    const std::int64_t units = detail::amount_units(ref, "try_take", n);
    if (units == 0) return TryTake::taken;
    return take_bucket(ref, to_nanos(Clock::now()), units);
}

}  // namespace lim
