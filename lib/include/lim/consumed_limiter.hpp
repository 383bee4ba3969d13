// lim/consumed_limiter.hpp: a Limiter whose takes are consumed, for tokens that stand for
// something spent elsewhere (lim-feeder's global rates: docs/global.md).
#pragma once

#include <optional>
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

// Sets the lease deadline of the consumed record behind `limiter`: from then on no take from it
// (by any handle, in any process: try_take, take, take_until, TokenBucket's too) is admitted
// unless it lands strictly before `deadline` (CLOCK_MONOTONIC). The takers enforce it
// themselves, so it holds while whoever set it is stopped or dead: a take refuses when its time
// (`now`, or the limiter's time if later) is at or past the deadline, and a take that passes that
// test and takes reads Clock::now() after its compare-and-swap and, if that is at or past the
// deadline it read before the CAS, reports `unable` and leaves what it took in flight (consumed,
// not admitted: what a taker killed at that point leaves; never given back, so a reader of
// in_flight never counts tokens that later come back). A blocking take past the deadline sleeps
// until a call of this function (which wakes every sleeper) or a target change lets it through.
// `std::nullopt` removes the deadline (the target alone bounds takes; a new record has none); a
// time in the past (e.g. Clock::now()) ends the lease at once. lim-feeder sets it on every grant or
// renewal after it has made the target what Redis counts, and lets the lease go by lowering the
// target to what is in flight and then setting a past deadline (docs/global.md).
// Throws Error(invalid_argument) if the record is not consumed, Error(permission_denied) if the
// segment is open read-only. Never blocks. Memory ordering: the store is sequentially consistent
// (so a taker whose load before its CAS comes after it in that order sees it, and any target
// change the caller made before it is visible to such a taker), and it happens before the wake.
void set_lease_deadline(const Limiter& limiter, std::optional<TimePoint> deadline);

// The lease deadline set by set_lease_deadline, or std::nullopt if none (or the record is not
// consumed). Never blocks, never throws. Memory ordering: a sequentially consistent load.
std::optional<TimePoint> lease_deadline(const Limiter& limiter) noexcept;

}  // namespace lim
