// lim::open_consumed_limiter: a Limiter record created with kConsumed (limiter_state.hpp).
#include "lim/consumed_limiter.hpp"

#include <algorithm>

#include "lim/error.hpp"
#include "limiter/limiter_open.hpp"
#include "limiter/limiter_state.hpp"

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

}  // namespace lim
