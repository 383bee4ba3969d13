#include "recovery/kind_ops.hpp"

#include "dispatch/dispatch_state.hpp"
#include "primitives/semaphore_state.hpp"
#include "primitives/weighted_semaphore_state.hpp"

namespace lim::detail {

const KindOps* kind_ops(RecordKind kind) noexcept {
    switch (kind) {
        case RecordKind::semaphore:
            return &kSemaphoreOps;
        case RecordKind::limiter:
        case RecordKind::weighted_semaphore:
        case RecordKind::dispatch:
        case RecordKind::backoff_window:
        case RecordKind::none:
            break;
    }
    return nullptr;
}

}  // namespace lim::detail
