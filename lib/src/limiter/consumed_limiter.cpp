// lim::open_consumed_limiter: a Limiter record created with kConsumed (limiter_state.hpp).
#include "lim/consumed_limiter.hpp"

#include "limiter/limiter_open.hpp"

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

}  // namespace lim
