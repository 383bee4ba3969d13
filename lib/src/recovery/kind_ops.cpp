#include "recovery/kind_ops.hpp"

#include "dispatch/dispatch_state.hpp"
#include "limiter/limiter_state.hpp"
#include "primitives/backoff_window_state.hpp"
#include "primitives/semaphore_state.hpp"
#include "primitives/weighted_semaphore_state.hpp"

namespace lim::detail {

const KindOps* kind_ops(RecordKind kind) noexcept {
    switch (kind) {
        case RecordKind::semaphore:
            return &kSemaphoreOps;
        case RecordKind::weighted_semaphore:
            return &kWeightedSemaphoreOps;
        case RecordKind::dispatch:
            return &kDispatchOps;
        case RecordKind::backoff_window:
            return &kBackoffWindowOps;
        case RecordKind::limiter:
            return &kLimiterOps;
        case RecordKind::none:
            break;
    }
    return nullptr;
}

}  // namespace lim::detail
