// lim::open_consumed_limiter: a Limiter record created with kConsumed (limiter_state.hpp).
#include "lim/consumed_limiter.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "lim/error.hpp"
#include "lim/tokens.hpp"
#include "limiter/consumed_rebase.hpp"
#include "limiter/limiter_open.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "sync/poll_pause.hpp"

namespace lim {

Limiter open_consumed_limiter(const Segment& segment, std::string_view key,
                              const LimiterConfig& config, TimePoint now) {
    return detail::open_limiter(segment, "limiter", key, config, detail::LimiterFlavor::limiter,
                                true, now, detail::kConsumed);
}

bool is_consumed(const Limiter& limiter) noexcept {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter);
    return detail::LimiterCore(*ref.state, ref.index).params().consumed;
}

void set_lease_deadline(const Limiter& limiter, std::optional<TimePoint> deadline) {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter);
    detail::LimiterCore core(*ref.state, ref.index);
    if (!core.params().consumed) {
        throw Error(Errc::invalid_argument, "limiter '" + std::string(limiter.key()) +
                                                "': set_lease_deadline needs a consumed record "
                                                "(lim::open_consumed_limiter)");
    }
    if (ref.state->read_only()) {
        throw Error(
            Errc::permission_denied,
            "segment '" + ref.state->name() + "' is open read-only; cannot set a lease deadline");
    }
    // kNoLeaseDeadline (0) means none, so a deadline at or before 0 is stored as 1: still past.
    const std::int64_t ns =
        deadline ? std::max<std::int64_t>(1, to_nanos(*deadline)) : detail::kNoLeaseDeadline;
    core.body().lease_deadline_ns.store(ns, std::memory_order_seq_cst);
    // Sleepers past the old deadline may take now (only a syscall if any sleep).
    detail::wake_all(core.wake());
}

std::optional<TimePoint> lease_deadline(const Limiter& limiter) noexcept {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter);
    detail::LimiterCore core(*ref.state, ref.index);
    if (!core.params().consumed) return std::nullopt;
    const std::int64_t ns = core.body().lease_deadline_ns.load(std::memory_order_seq_cst);
    if (ns == detail::kNoLeaseDeadline) return std::nullopt;
    return from_nanos(ns);
}

double take_refused_demand(const Limiter& limiter) noexcept {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter);
    detail::LimiterCore core(*ref.state, ref.index);
    if (!core.params().consumed || ref.state->read_only()) return 0;
    const std::uint64_t units = core.body().refused.exchange(0, std::memory_order_relaxed);
    return static_cast<double>(units) / static_cast<double>(kTokenResolution);
}

}  // namespace lim

// ---------------------------------------------------------------------------------------------
// Rebasing (docs/design.md, "Rebasing a consumed record")
// ---------------------------------------------------------------------------------------------

namespace lim::detail {

RebaseUnits rebase_consumed_units(const Limiter& limiter, void (*between)(void*), void* ctx) {
    const RecordRef& ref = LimiterAccess::ref(limiter);
    LimiterCore core(*ref.state, ref.index);
    const LimiterParams p = core.params();
    if (!p.consumed || p.target_infinite) {
        throw Error(Errc::invalid_argument,
                    "limiter '" + std::string(limiter.key()) +
                        "': rebase_consumed needs a consumed record with a finite token target "
                        "(lim::open_consumed_limiter)");
    }
    if (ref.state->read_only()) {
        throw Error(Errc::permission_denied,
                    "segment '" + ref.state->name() + "' is open read-only; cannot rebase");
    }
    std::atomic<std::uint64_t>& in_flight = core.body().in_flight;
    // Claim the thread's slot now (Error(table_full) before anything changes); step 2's Hold
    // then cannot throw.
    { Hold claim(*ref.state, ref.index); }
    const auto f0 = static_cast<std::int64_t>(in_flight.load(std::memory_order_seq_cst) & ~kFrozen);
    // Δ ≤ the target (only the caller writes it, so it is the target the switch will find) and
    // ≤ what was in flight.
    const std::int64_t delta = std::min(f0, p.target);
    RebaseUnits done;
    if (delta <= 0) return done;

    // Step 1: lower the target by Δ (a switch: every take validates the generation after its CAS
    // on F, so from here no take lands against the old target). What may be taken falls by Δ.
    std::int64_t lowered = 0;
    core.reconfigure(bounded_now_ns(Clock::now()), false, [&](LimiterParams& next) {
        // Called again if the switch's CAS on S retries: the last call is what is published.
        lowered = std::min(delta, std::max<std::int64_t>(0, next.target));
        next.target -= lowered;
    });
    done.target_lowered = lowered;
    LIM_RACE_POINT();
    if (between) between(ctx);  // a test's kill point: the record is under-used here, never over

    // Step 2: subtract Δ from F (at most what F holds: if returns or roll-backs lowered it below
    // Δ meanwhile, the rest of Δ stays under-use). A CAS honouring the ledger protocol: it steps
    // aside while a reaper has the word frozen (a recount of a consumed record changes only the
    // frozen bit, but waiting keeps this write wholly before or after any recount).
    Hold hold(*ref.state, ref.index);
    std::uint64_t w = in_flight.load(std::memory_order_seq_cst);
    for (;;) {
        if (hold.stepped_aside(w, in_flight, *ref.state)) continue;
        const auto f = static_cast<std::int64_t>(w);
        const std::int64_t d = std::min(lowered, f);
        LIM_RACE_POINT();
        if (in_flight.compare_exchange_weak(w, w - static_cast<std::uint64_t>(d),
                                            std::memory_order_seq_cst, std::memory_order_seq_cst)) {
            done.in_flight_lowered = d;
            break;
        }
    }
    // Sleepers that found too little between the steps may take now.
    wake_all(core.wake());
    return done;
}

}  // namespace lim::detail

namespace lim {

ConsumedRebase rebase_consumed(const Limiter& limiter) {
    const detail::RebaseUnits u = detail::rebase_consumed_units(limiter, nullptr, nullptr);
    constexpr double kUnits = static_cast<double>(kTokenResolution);
    return ConsumedRebase{.target_lowered = static_cast<double>(u.target_lowered) / kUnits,
                          .in_flight_lowered = static_cast<double>(u.in_flight_lowered) / kUnits};
}

}  // namespace lim

// ---------------------------------------------------------------------------------------------
// Converting a token bucket (docs/design.md, "Converting a token bucket into a consumed record")
// ---------------------------------------------------------------------------------------------

namespace lim::detail {
namespace {

const char* flavor_name(std::uint16_t flavor) noexcept {
    switch (static_cast<LimiterFlavor>(flavor)) {
        case LimiterFlavor::limiter:
            return "a general Limiter";
        case LimiterFlavor::token_bucket:
            return "a TokenBucket";
        case LimiterFlavor::throttle:
            return "a Throttle";
        case LimiterFlavor::throttled_rate_limiter:
            return "a ThrottledRateLimiter";
    }
    return "an unknown facade";
}

}  // namespace

ConversionUnits convert_to_consumed_units(const Limiter& limiter, double bucket_size,
                                          void (*after_step)(int, void*), void* ctx) {
    const RecordRef& ref = LimiterAccess::ref(limiter);
    SegmentState& state = *ref.state;
    LimiterCore core(state, ref.index);
    const auto step_done = [&](int step) {
        if (after_step) after_step(step, ctx);
    };
    if (!std::isfinite(bucket_size) || bucket_size <= 0 || bucket_size > kMaxTokens) {
        throw Error(Errc::invalid_argument, "limiter '" + std::string(limiter.key()) +
                                                "': convert_to_consumed: bucket_size " +
                                                std::to_string(bucket_size) +
                                                " must be above 0 and at most 1e9 tokens");
    }
    const std::int64_t bucket_units =
        std::max<std::int64_t>(1, Tokens::round_up(bucket_size).units());
    ConversionUnits done;
    // Consumed already (created so, or converted before): nothing to do. The configuration is
    // the one a switch published last; only this caller switches a record to consumed, and
    // nothing switches one back.
    if (core.params().consumed) return done;
    if (state.read_only()) {
        throw Error(Errc::permission_denied, "segment '" + state.name() +
                                                 "' is open read-only; cannot convert '" +
                                                 std::string(limiter.key()) + "'");
    }
    Record& record = state.record(ref.index);
    std::atomic_ref<std::uint16_t> flavor(record.header.flavor);
    auto& created = *reinterpret_cast<LimiterRecordConfig*>(record.config);
    std::atomic_ref<std::uint32_t> created_flags(created.flags);
    // Which records: one a TokenBucket created (its takes are consumed by contract: never given
    // back), or one whose conversion was interrupted after its creation configuration was
    // rewritten (flavor limiter, created consumed, yet not consumed: nothing else leaves that).
    const std::uint16_t f0 = flavor.load(std::memory_order_seq_cst);
    const bool interrupted = f0 == static_cast<std::uint16_t>(LimiterFlavor::limiter) &&
                             (created_flags.load(std::memory_order_seq_cst) & kConsumed) != 0;
    if (f0 != static_cast<std::uint16_t>(LimiterFlavor::token_bucket) && !interrupted) {
        throw Error(Errc::invalid_argument,
                    "limiter '" + std::string(limiter.key()) + "' in segment '" + state.name() +
                        "' was created as " + flavor_name(f0) +
                        ", whose takers may give tokens back (return_to_hopper, finish_job): it "
                        "cannot be converted into a consumed record exactly (a token given back "
                        "after the conversion would be spendable with no lease); only a record a "
                        "TokenBucket created can");
    }
    // Claim the thread's slot now (Error(table_full) before anything changes).
    { Hold claim(state, ref.index); }

    // Step 1: the creation configuration becomes the consumed one open_consumed_limiter would
    // have written, and the flavor `limiter`: crash recovery reads kConsumed there (a recount
    // that froze in_flight after step 2's CAS sees it), a reset restores it, limctl shows it.
    // Under the config lock, which a reset holds while it reads them (and so that a second
    // converter finds the first's work). The flags go last but one, the flavor last: a caller
    // killed midway leaves a token bucket flavor (converted again from the start) or the
    // `interrupted` state above; a reset meanwhile restores a token bucket whose rate is 0 (the
    // rate went first), or the consumed configuration.
    {
        // A writer stopped holding the lock: Error(busy) after kLockWaitTimeout, nothing changed.
        FileLock lock = FileLock::lock_or_busy(
            state.fd(), LockByte::config, state.name(),
            "convert '" + std::string(limiter.key()) + "' into a consumed record");
        if (core.params().consumed) return done;  // converted meanwhile
        std::atomic_ref<std::uint64_t>(created.rate_bits).store(0, std::memory_order_seq_cst);
        std::atomic_ref<std::int64_t>(created.bucket_size)
            .store(bucket_units, std::memory_order_seq_cst);
        std::atomic_ref<std::int64_t>(created.initial_bucket_level)
            .store(0, std::memory_order_seq_cst);
        std::atomic_ref<std::int64_t>(created.initial_hopper_level)
            .store(0, std::memory_order_seq_cst);
        std::atomic_ref<std::uint32_t>(created.reserved).store(0, std::memory_order_seq_cst);
        created_flags.store(kRateInfinite | kConsumed, std::memory_order_seq_cst);
        flavor.store(static_cast<std::uint16_t>(LimiterFlavor::limiter), std::memory_order_seq_cst);
    }
    step_done(1);

    // What the takers took before (the feeder's warning): a TokenBucket's own takes, in ledger
    // layer kBucketTakenLayer of the occupied slots (outside in_flight).
    done.bucket_taken = core.bucket_taken();

    // Step 2: clear in_flight (what it holds was taken before any lease; a target-0 record with
    // anything in flight would need a target that large, and that may exceed the target's limit).
    // A CAS honouring the ledger protocol: it steps aside while a reaper has the word frozen, so
    // a recount that read the old creation configuration (and stores the live ledgers' sum) ends
    // before it, and any recount that freezes after it reads step 1's configuration (its freeze
    // reads our CAS's value: step 1 happens before it) and leaves the value alone.
    {
        Hold hold(state, ref.index);
        std::atomic<std::uint64_t>& in_flight = core.body().in_flight;
        std::uint64_t w = in_flight.load(std::memory_order_seq_cst);
        for (;;) {
            if (hold.stepped_aside(w, in_flight, state)) continue;
            LIM_RACE_POINT();
            if (in_flight.compare_exchange_weak(w, 0, std::memory_order_seq_cst,
                                                std::memory_order_seq_cst)) {
                done.in_flight = static_cast<std::int64_t>(w);
                break;
            }
        }
    }
    step_done(2);

    // Step 3: a past lease deadline (read only once the record is consumed, step 4): from the
    // switch on, a take is refused before its CAS, as on a record whose feeder let its lease go.
    core.body().lease_deadline_ns.store(1, std::memory_order_seq_cst);
    step_done(3);
    LIM_RACE_POINT();

    // Step 4: the switch (config lock, generation bump: every take that read the token bucket's
    // configuration fails its CAS on S or its generation check and re-reads), then a wake of the
    // sleepers, which re-check against it. Takes between steps 2 and 4 are back in in_flight:
    // taken before the conversion, and under a target of 0 they leave nothing to take.
    core.reconfigure(bounded_now_ns(Clock::now()), false, [&](LimiterParams& next) {
        next.rate_infinite = true;
        next.rate_per_sec = 0;
        next.drip = DripRate{};
        next.bucket_size = bucket_units;
        next.target_infinite = false;
        next.target = 0;
        next.consumed = true;
    });
    step_done(4);
    done.converted = true;
    // Step 5: let the takes that read the token bucket's configuration end (see
    // settle_conversion): until they have, the caller must grant nothing.
    done.settled = settle_operations(state, ref.index, std::chrono::milliseconds{100});
    return done;
}

bool settle_operations(SegmentState& state, std::uint32_t record, Duration wait) {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    const std::uint32_t announced = record + 1;  // what Hold stores in a slot's `pending`
    // The slots in the middle of an operation on the record now. Each does one operation at a
    // time, so once a slot is seen out of it (not announcing the record, or freed) the operation
    // it was in has ended, whatever it does next.
    std::vector<std::uint32_t> busy;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        if (slot_is_occupied(slot.owner.load(std::memory_order_acquire)) &&
            slot.pending.load(std::memory_order_acquire) == announced) {
            busy.push_back(i);
        }
    }
    for (int pass = 0; !busy.empty(); ++pass) {
        std::erase_if(busy, [&](std::uint32_t i) {
            const SlotHeader& slot = state.slot(i);
            return !slot_is_occupied(slot.owner.load(std::memory_order_acquire)) ||
                   slot.pending.load(std::memory_order_acquire) != announced;
        });
        if (busy.empty()) break;
        // A dead process never ends its operation: judged by its slot's lock (a syscall per
        // slot, so only now and then), and skipped. (Doubt means alive: judge_slots.)
        if (pass % 64 == 63) {
            const std::vector<SlotJudgement> judged = judge_slots(state);
            std::erase_if(busy,
                          [&](std::uint32_t i) { return i < judged.size() && judged[i].dead; });
            if (busy.empty()) break;
        }
        if (std::chrono::steady_clock::now() >= deadline) return false;
        poll_pause(pass);
    }
    return true;
}

}  // namespace lim::detail

namespace lim {

ConsumedConversion convert_to_consumed(const Limiter& limiter, double bucket_size) {
    const detail::ConversionUnits u =
        detail::convert_to_consumed_units(limiter, bucket_size, nullptr, nullptr);
    constexpr double kUnits = static_cast<double>(kTokenResolution);
    return ConsumedConversion{.converted = u.converted,
                              .bucket_taken = static_cast<double>(u.bucket_taken) / kUnits,
                              .in_flight = static_cast<double>(u.in_flight) / kUnits,
                              .settled = u.settled};
}

bool settle_conversion(const Limiter& limiter, Duration wait) {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter);
    return detail::settle_operations(*ref.state, ref.index, std::max(Duration::zero(), wait));
}

}  // namespace lim
