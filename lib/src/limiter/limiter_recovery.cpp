// Crash recovery for limiter records: kLimiterOps (freeze, recount, thaw, reset), which the
// reaper calls through its kind table. docs/design.md ("The Limiter family", "Crash recovery").
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <utility>

#include "limiter/generation_checkpoint.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "sync/futex.hpp"
#include "sync/race_point.hpp"

namespace lim::detail {
namespace {

std::int64_t value_of(std::uint64_t in_flight_word) noexcept {
    return static_cast<std::int64_t>(in_flight_word & ~kFrozen);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Crash recovery
// ---------------------------------------------------------------------------------------------

namespace {

LimiterBody& body_at(SegmentState& state, std::uint32_t record) noexcept {
    return *reinterpret_cast<LimiterBody*>(state.record(record).body);
}

// How far the channel's waiter count is from the live sleepers registered on `record`: the delta
// the caller adds once its recount's CAS on F has landed (apply_waiters). Exact: the caller has
// frozen the record's in-flight word and seen no live slot pending on it, and a sleeper changes
// its registration only under a Hold after proving the word not frozen (wait_for_no_recount), so
// no live registration changes while F stays frozen; the CAS on F that thaws it proves F was
// frozen from this read to that CAS. Applied as a delta (an RMW), not a store, so registrations
// made after the thaw are kept; and not applied at all if the CAS on F fails (a holder thawed F
// while the reaper was stopped: registrations may have changed under the count).
std::int64_t waiters_delta(SegmentState& state, std::uint32_t record, const WakeChannel& wake,
                           std::span<const std::uint32_t> dead_slots) noexcept {
    std::uint32_t waiting = 0;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        if (SlotOwner::state(slot.owner.load(std::memory_order_acquire)) != SlotState::live)
            continue;
        if (std::find(dead_slots.begin(), dead_slots.end(), i) != dead_slots.end()) continue;
        if (slot.waiting_record.load(std::memory_order_acquire) == record + 1) ++waiting;
    }
    return static_cast<std::int64_t>(waiting) -
           static_cast<std::int64_t>(wake.waiters.load(std::memory_order_seq_cst));
}

void apply_waiters(WakeChannel& wake, std::int64_t delta) noexcept {
    wake.waiters.fetch_add(static_cast<std::uint32_t>(delta), std::memory_order_seq_cst);
    wake.seq.fetch_add(1, std::memory_order_seq_cst);
    futex_wake(wake.seq, INT_MAX);
}

// Replaces F, frozen, by `next` with one CAS from the frozen value (see recount_semaphore_word).
// Returns the value replaced, or nullopt if a holder had thawed F.
std::optional<std::uint64_t> cas_from_frozen(std::atomic<std::uint64_t>& f,
                                             std::uint64_t next) noexcept {
    std::uint64_t w = f.load(std::memory_order_seq_cst);
    for (;;) {
        if (!is_frozen(w)) return std::nullopt;
        LIM_RACE_POINT();
        if (f.compare_exchange_strong(w, next, std::memory_order_seq_cst)) return w;
    }
}

// Folds the bucket at `now` with `f` in flight, as a return does before its tokens come back.
// A fold that changes S is made under the config lock, waited for at most kTryLockGrace (a
// legitimate switch holds it for microseconds; never longer: the record is frozen here, and a
// writer stopped holding the lock would keep the reaper, and its recovery lock, waiting), and
// the lock is held from the load of S to the CAS, so that no switch moves the generation in
// between: a reaper stopped there (SIGSTOP) while another program reconfigures the record in a
// loop would otherwise CAS a word whose generation had come round again (docs/design.md,
// "Generation checkpoints"; takes and returns are covered by their announcement instead, which a
// reaper has none of). Without the lock the fold cannot be made, and returning the dead's tokens
// unfolded would put the allowance since the last fold in the bucket at once (up to a bucket
// over the bound): so false, nothing changed, and the recount defers the record to a later reap,
// as when a holder thawed it. The same when the fold must re-anchor the drip and a generation
// checkpoint refuses (a live thread stopped mid-operation). A fold with nothing to change (an
// infinite rate or target, or the allowance already folded) takes no lock.
bool fold_for_return(SegmentState& state, std::uint32_t record, std::int64_t f,
                     std::int64_t now_ns) noexcept {
    LimiterBody& body = body_at(state, record);
    std::optional<FileLock> lock;
    for (;;) {
        std::uint64_t s = body.bucket.load(std::memory_order_seq_cst);
        const std::uint32_t gen = BucketWord::gen(s);
        const LimiterParams p = load_params(body.config[gen & 1]);
        const std::int64_t t = std::max(now_ns, body.time_ns.load(std::memory_order_relaxed));
        const std::int64_t x = BucketWord::x(s);
        const std::int64_t d = p.drip_at(t);
        const std::int64_t folded = std::max(x, d - p.outside_flight(f));
        if (p.rate_infinite || p.target_infinite || folded == x) {
            // Nothing to fold, decided on the block the generation selected. Without the lock
            // that is only as good as the generation staying put while the block was read (two
            // switches rewrite it: a seqlock reader's check), as for a take's refusal.
            if (lock || BucketWord::gen(body.bucket.load(std::memory_order_seq_cst)) == gen) {
                return true;
            }
            continue;
        }
        if (!lock) {
            // Then decide again from a load under the lock.
            try {
                std::optional<FileLock> got = FileLock::lock_until(state.fd(), LockByte::config,
                                                                   Clock::now() + kTryLockGrace);
                if (!got) return false;
                lock.emplace(std::move(*got));
            } catch (...) {
                return false;  // cannot be tried
            }
            continue;
        }
        if (d > kRebaseAt) {
            // Re-anchoring folds too.
            // At a generation checkpoint, with a try's wait: the record is frozen meanwhile,
            // and must stay so for less than kFrozenBreakTimeout.
            return switch_checked(state, record, body, now_ns, true, nullptr, nullptr,
                                  kTryLockGrace);
        }
        LIM_RACE_POINT();
        if (body.bucket.compare_exchange_strong(s, BucketWord::make(gen, folded),
                                                std::memory_order_seq_cst)) {
            return true;
        }
    }
}

void limiter_freeze(SegmentState& state, std::uint32_t record) noexcept {
    body_at(state, record).in_flight.fetch_or(kFrozen, std::memory_order_seq_cst);
}

void limiter_thaw(SegmentState& state, std::uint32_t record) noexcept {
    LimiterBody& body = body_at(state, record);
    body.in_flight.fetch_and(~kFrozen, std::memory_order_seq_cst);
    wake_all(body.wake);
}

LiveHoldings limiter_recount(SegmentState& state, std::uint32_t record, const LiveHoldings& live,
                             std::span<const std::uint32_t> dead_slots, TimePoint now) noexcept {
    LimiterBody& body = body_at(state, record);
    LimiterRecordConfig config{};
    std::memcpy(&config, state.record(record).config, sizeof config);
    if ((config.flags & kConsumed) != 0) {
        // Consumed takes are in no ledger: what the dead took was spent, and in-flight keeps it
        // (a take that died between its increment and its rollback leaves its n in, on the safe
        // side). Only the sleepers are recounted; the word is thawed unchanged, by a CAS from the
        // frozen value (F's value kept) that also proves the count below exact.
        const std::int64_t delta = waiters_delta(state, record, body.wake, dead_slots);
        LIM_RACE_POINT();
        // F's value may still change while frozen (a feeder's Δ, "Rebasing"): each retry keeps
        // the value it finds and clears only kFrozen, as the fetch_and this replaces did.
        std::uint64_t fw = body.in_flight.load(std::memory_order_seq_cst);
        LiveHoldings given;
        while (is_frozen(fw) && !body.in_flight.compare_exchange_strong(
                                    fw, fw & ~kFrozen, std::memory_order_seq_cst)) {
            LIM_RACE_POINT();
        }
        if (!is_frozen(fw)) {
            given.abandoned = true;
        } else {
            apply_waiters(body.wake, delta);
        }
        wake_all(body.wake);
        return given;
    }
    const std::int64_t before = value_of(body.in_flight.load(std::memory_order_seq_cst));
    const std::int64_t now_ns =
        std::max(to_nanos(now), body.time_ns.load(std::memory_order_relaxed));
    // What the dead held comes back as return_to_hopper brings tokens back: time advances (the
    // fold) with them still in flight, then in flight drops to what the living hold. The fold
    // alone (a recount abandoned after it) is what any take's fold at `now` does with F as read.
    if (!fold_for_return(state, record, before, now_ns)) {
        // The fold needs the config lock, held by a writer stopped (or starved) past the grace:
        // nothing stored; the reaper thaws F unchanged and keeps the dead slots for a later reap.
        LiveHoldings given;
        given.abandoned = true;
        return given;
    }
    const std::int64_t kept = std::clamp<std::int64_t>(live.held[0], 0, kMaxInFlight);
    raise_time_ns(body.time_ns, now_ns);
    // The waiter count's correction while the word is still frozen (see waiters_delta); the CAS
    // of F then thaws it, and the correction is applied only if that CAS lands.
    const std::int64_t delta = waiters_delta(state, record, body.wake, dead_slots);
    LIM_RACE_POINT();
    const std::optional<std::uint64_t> replaced =
        cas_from_frozen(body.in_flight, static_cast<std::uint64_t>(kept));
    LiveHoldings given;
    if (!replaced) {
        given.abandoned = true;
        wake_all(body.wake);
        return given;
    }
    apply_waiters(body.wake, delta);
    wake_all(body.wake);
    given.held[0] = value_of(*replaced) - kept;
    // A token bucket's own takes (layer kBucketTakenLayer) are consumed tokens, not in F: the
    // dead's are dropped from in_flight with their slots, and reported as given back.
    // Saturating: a damaged ledger may hold anything (a report only).
    for (const std::uint32_t d : dead_slots) {
        const std::int64_t h = holding(state.ledger(d, record), kBucketTakenLayer);
        std::int64_t& sum = given.held[kBucketTakenLayer];
        if (__builtin_add_overflow(sum, h, &sum))
            sum = h > 0 ? std::numeric_limits<std::int64_t>::max()
                        : std::numeric_limits<std::int64_t>::min();
    }
    return given;
}

std::uint8_t limiter_reset(SegmentState& state, std::uint32_t record, TimePoint now) noexcept {
    LimiterBody& body = body_at(state, record);
    // A holder thawed F (this resetter was stopped): the caller freezes and resets again.
    if (!is_frozen(body.in_flight.load(std::memory_order_seq_cst))) return kAllLayers;
    // Configuration writers are excluded by the caller (reset holds the config lock throughout:
    // both blocks may be rewritten here).
    LimiterRecordConfig config{};
    std::memcpy(&config, state.record(record).config, sizeof config);
    // Re-anchored at the current time, not at max(now, L): a limiter whose time was carried far
    // ahead (by a `now` from before the clamp, or a corrupt word) drips again from now on.
    const std::int64_t t = to_nanos(now);
    const LimiterParams p = params_from_config(config, t);
    const std::int64_t delta = waiters_delta(state, record, body.wake, {});
    // F first, still frozen (nothing in flight, kFrozen kept), and the bucket only once that CAS
    // has landed: a CAS that finds F thawed by a holder (this resetter stopped past
    // kFrozenBreakTimeout) then leaves the record exactly as it was. Before, the bucket, its time
    // and its configuration block were written first, and a failed CAS (then a refused retry)
    // left the bucket refilled under the old F: a burst no reset had granted (docs/design.md,
    // "Reset"). Once F's CAS has landed the reset has: a holder that thaws F while this resetter
    // is stopped before the bucket's stores takes from the old bucket, a valid state, and the
    // refill that follows is the reset's own.
    if (!cas_from_frozen(body.in_flight, kFrozen)) {
        wake_all(body.wake);
        return kAllLayers;
    }
    const std::uint32_t gen = BucketWord::gen(body.bucket.load(std::memory_order_seq_cst)) + 1;
    store_params(body.config[gen & 1], p);
    const std::int64_t x = p.rate_infinite ? 0 : -initial_level(config.initial_bucket_level);
    body.bucket.store(BucketWord::make(gen, x), std::memory_order_seq_cst);
    body.time_ns.store(t, std::memory_order_seq_cst);
    body.in_flight.fetch_and(~kFrozen, std::memory_order_seq_cst);  // clears kFrozen last
    apply_waiters(body.wake, delta);
    wake_all(body.wake);
    return 0;
}

}  // namespace

// The generation checkpoint a reset's move of the generation may cross (KindOps::may_reset).
bool limiter_may_reset(SegmentState& state, std::uint32_t record) noexcept {
    const std::uint32_t next_gen =
        (BucketWord::gen(body_at(state, record).bucket.load(std::memory_order_seq_cst)) + 1) &
        0xFFFF;
    return generation_may_advance(state, record, next_gen, kCheckpointWait);
}

const KindOps kLimiterOps{
    .freeze = limiter_freeze,
    .recount = limiter_recount,
    .thaw = limiter_thaw,
    .reset = limiter_reset,
    .layers = 2,
    .layer_names = {"tokens", "tokens", nullptr},
    .may_reset = limiter_may_reset,
};

}  // namespace lim::detail
