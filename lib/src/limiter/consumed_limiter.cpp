// lim::open_consumed_limiter: a Limiter record created with kConsumed (limiter_state.hpp).
#include "lim/consumed_limiter.hpp"

#include <algorithm>

#include "lim/error.hpp"
#include "lim/tokens.hpp"
#include "limiter/consumed_rebase.hpp"
#include "limiter/limiter_open.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/ledger.hpp"

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
