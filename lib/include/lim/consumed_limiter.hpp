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

// The tokens of takes the consumed record behind `limiter` refused since the last call (or since
// its creation), and resets that count to 0: demand its spent tokens do not show (a worker that
// polls with try_take(n) while the record holds fewer than n is never served, so spends nothing).
// Counted: every take (try_take, take, take_until, by any handle in any process, TokenBucket's
// too) that finds too few tokens or is at or past the lease deadline, its `n`, once per call (a
// blocking take's re-checks while it sleeps are not counted again). Not counted: admitted takes;
// a take of more than the bucket size (`asked_for_more_than_bucket_size`); a take refused after
// its compare-and-swap for landing at or past the deadline (its tokens stay in flight, already
// counted as spent). The count saturates near 10^14 tokens (it never wraps). 0 for a record that
// is not consumed (its takes are never counted), and on a read-only segment (nothing reset). Never
// blocks, never throws. Memory ordering: relaxed (the count is a statistic, ordered with nothing
// else; every refusal is counted by exactly one call: the exchange is atomic). lim-feeder calls it
// once per refresh (its only caller: another caller would take the counts from it).
double take_refused_demand(const Limiter& limiter) noexcept;

// What lim::rebase_consumed did, in tokens.
struct ConsumedRebase {
    double target_lowered = 0;     // Δ: the token target was lowered by this much
    double in_flight_lowered = 0;  // in_flight was lowered by this much (Δ, unless in_flight
                                   // fell below Δ meanwhile: then what it held, and the rest of Δ
                                   // is under-use, never over-use)
};

// Lowers both the token target and in_flight of the consumed record behind `limiter` by the same
// amount Δ = min(target, in_flight) (both read first), so that a record whose takes stay in flight
// forever never reaches the target's limit (10^9 tokens): what may still be taken,
// target - in_flight, is the same after the call, and is never more than before it at any instant
// in between, whatever takes, returns, reapers or a kill of the caller do meanwhile. Two steps:
// first the target is lowered by Δ (a configuration switch, under the segment's config lock; every
// take validates the configuration's generation, so none uses the old target after it), then Δ is
// subtracted from in_flight by a compare-and-swap loop that steps aside while a reaper has the word
// frozen. Between the two, takes find Δ less (under-use for microseconds); a caller killed there
// leaves the record so, which is safe (lim-feeder, restarted, raises a target below in_flight to
// in_flight before it reports or feeds: docs/global.md). Call it only from the record's one target
// writer (lim-feeder), never concurrently with another rebase or target change. A later
// Limiter::return_to_hopper of more than in_flight then holds is `over_release` (consumed tokens
// are spent: nothing should return them).
// Wakes sleepers when done. Never blocks except on the config lock (3 s at most) and while a
// reaper recounts. Throws Error(invalid_argument) if the record is not consumed or its target is
// infinite, Error(permission_denied) if the segment is open read-only, Error(table_full) if the
// calling thread has no process-table slot (before changing anything), Error(system_error) if
// the config lock cannot be taken, Error(busy) if it stayed held for 3 s (a writer stopped
// holding it; both before changing anything). Memory ordering: the switch and the CAS are
// sequentially consistent, the switch before the CAS.
ConsumedRebase rebase_consumed(const Limiter& limiter);

// What lim::convert_to_consumed did, in tokens.
struct ConsumedConversion {
    bool converted = false;   // false: the record was consumed already; nothing was changed
    double bucket_taken = 0;  // a TokenBucket's own takes (try_take), as recorded in the ledgers
                              // of the processes attached at the conversion: since each of them
                              // attached (what processes that exited took is not known)
    double in_flight = 0;     // in_flight when it was cleared: the blocking takes (take,
                              // take_until) and Limiter takes, of the processes attached since
                              // the last reap
    bool settled = true;      // false: some take that read the token bucket's configuration had
                              // not ended within 100 ms of the switch (a stopped taker); grant
                              // nothing until settle_conversion says true
};

// Converts in place the record behind `limiter`, which a TokenBucket created (a worker that opened
// a global rate with TokenBucket::open before lim-feeder made it), into the record that
// open_consumed_limiter(segment, key, {.hopper_to_bucket_rate_per_sec = infinite, .bucket_size =
// bucket_size, .initial_bucket_level = 0, .initial_hopper_level = 0}) creates, holding nothing:
// consumed, an infinite drip, the bucket `bucket_size`, a token target of 0, in_flight cleared
// to 0 (what was taken before is forgotten: it was never part of a lease; takes landing between
// the clear and the switch are in flight again, taken before the conversion: with a target of 0
// nothing is left to take, whatever in_flight holds), and a past lease deadline. From the
// configuration switch that makes it consumed on, no take by any handle (a TokenBucket opened
// before the call included: its own take declines on the new configuration and runs the general
// one) is admitted unless the record's one target writer grants it, exactly as on a record
// open_consumed_limiter created; blocking takes are woken and re-check. The creation configuration
// and the flavor are rewritten too (`limctl` shows the record as the feeder's, a reset restores the
// consumed configuration, crash recovery treats it as consumed). Idempotent: on a record that is
// consumed already, changes nothing and returns `converted = false`; a conversion interrupted by
// the caller's death (any step) is finished by calling it again, and every state it leaves
// meanwhile admits no more than a token bucket or the consumed record would (docs/design.md,
// "Converting a token bucket into a consumed record"). Call it only from the record's one target
// writer (lim-feeder), never concurrently with another conversion, rebase or target change. Blocks
// on the segment's config lock (3 s at most each time), while a reaper recounts the record, and up
// to 100 ms after the switch for the takes in progress on the record to end (`settled`; see
// settle_conversion). Throws Error(invalid_argument) if `bucket_size` is not above 0 and at most
// 1e9 tokens, or if the record is neither consumed nor created by a TokenBucket: a general Limiter,
// a Throttle or a ThrottledRateLimiter lends its tokens (return_to_hopper, finish_job), and a token
// given back after the conversion would be spendable without a lease (nothing is changed);
// Error(permission_denied) if the segment is open read-only, Error(table_full) if the calling
// thread has no process-table slot, Error(system_error) if the config lock cannot be taken,
// Error(busy) if it stayed held for 3 s (a configuration writer stopped holding it) (each before
// anything is changed; the last two may also come from the final switch, leaving a state a second
// call finishes, which admits no more than the token bucket did). Memory ordering: the creation
// configuration is stored (sequentially consistent) before in_flight is cleared by a
// compare-and-swap, which comes before the configuration switch; all sequentially consistent.
ConsumedConversion convert_to_consumed(const Limiter& limiter, double bucket_size);

// Whether every take and return that was in the middle of its operation on the record behind
// `limiter` when this call began has ended, waiting up to `wait` for them. convert_to_consumed
// calls it for 100 ms after its switch: a take that read the token bucket's configuration before
// the switch may still, when it ends, take its tentative tokens back out of in_flight (it decided
// so before the switch), and a grant made before then would count them as spent and leave them
// spendable again with no lease. So the target writer grants nothing on a converted record
// until a conversion or a later call of this function has said true (lim-feeder asks at each
// refresh). An operation counts as in progress while its thread's process slot announces it
// (the ledger's Hold); slots whose process is dead are skipped (they never end theirs), so only
// a stopped live process keeps the answer false. Never throws; blocks up to `wait` (yielding,
// then sleeping 50 us between looks). Memory ordering: an ended operation's announcement is
// withdrawn with a release store that this call reads with acquire, so everything the operation
// did happens before a true answer.
bool settle_conversion(const Limiter& limiter, Duration wait);

}  // namespace lim
