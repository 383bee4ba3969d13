// lim/consumed_limiter.hpp: a Limiter whose takes are consumed, for tokens that stand for
// something spent elsewhere (lim-feeder's global rates: docs/global.md).
#pragma once

#include <string_view>

#include "lim/limiter.hpp"

namespace lim {

// Opens the Limiter record `key`, creating it with `config` at `now` if absent, as
// `Limiter::open(segment, key, config, adopt_existing, now)` does, except that a record it
// creates is marked *consumed*: takes from it (by any handle: Limiter, or TokenBucket with
// adopt_existing) are never entered in the taker's ledger, so crash recovery gives nothing back
// when a taker dies: what it took stays in flight, spent. Everything else (the bucket, the
// target, returns, blocking) is the Limiter's. An existing record is adopted as it is: check
// `is_consumed`. Throws what Limiter::open throws. Memory ordering: as Limiter::open.
Limiter open_consumed_limiter(const Segment& segment, std::string_view key,
                              const LimiterConfig& config, TimePoint now = Clock::now());

// Whether the record behind `limiter` is consumed (see above). Never blocks, never throws.
bool is_consumed(const Limiter& limiter) noexcept;

}  // namespace lim
