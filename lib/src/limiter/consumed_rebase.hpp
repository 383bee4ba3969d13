// The rebase of a consumed record (lim::rebase_consumed), with the test hook that lets a test stop
// or kill the rebaser between its two steps. docs/design.md ("Lease deadlines (consumed records)",
// "Rebasing a consumed record") is the argument.
#pragma once

#include <cstdint>

#include "lim/limiter.hpp"

namespace lim::detail {

class SegmentState;

struct RebaseUnits {
    std::int64_t target_lowered = 0;     // Δ: what the token target was lowered by
    std::int64_t in_flight_lowered = 0;  // d ≤ Δ: what in_flight was lowered by
};

// lim::rebase_consumed, with `between(ctx)` called (when not null) after the target is lowered
// and before in_flight is: the point where a rebaser killed leaves the record under-used.
RebaseUnits rebase_consumed_units(const Limiter& limiter, void (*between)(void*), void* ctx);

// What lim::convert_to_consumed did, in units.
struct ConversionUnits {
    bool converted = false;
    std::int64_t bucket_taken = 0;
    std::int64_t in_flight = 0;
    bool settled = true;
};

// The steps of lim::convert_to_consumed, after each of which `after_step(step, ctx)` is called
// (when not null): a test's kill point. 1: the creation configuration and the flavor rewritten;
// 2: in_flight cleared; 3: the past lease deadline stored; 4: the switch (done).
ConversionUnits convert_to_consumed_units(const Limiter& limiter, double bucket_size,
                                          void (*after_step)(int, void*), void* ctx);

// lim::settle_conversion on `record`: every live slot that announces an operation on it now has
// been seen out of that operation, within `wait`.
bool settle_operations(SegmentState& state, std::uint32_t record, Duration wait);

}  // namespace lim::detail
