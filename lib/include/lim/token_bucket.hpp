// lim/token_bucket.hpp: a token bucket shared by every process attached to a segment.
//
// Jane Street's Token_bucket: a Limiter with an infinite hopper and a finite rate. The bucket
// holds at most `burst_size` tokens and refills at `sustained_rate_per_sec`; try_take takes
// tokens if the bucket has them. Taken tokens are consumed (they count as in flight, as in the
// seed, and are never returned). Over any interval, the tokens taken never exceed
// burst_size + sustained_rate_per_sec x the interval, whatever processes take them.
//
// A take is one compare-and-swap on the segment's bucket word; no lock, no system call.
// Handles are cheap to copy and usable from any thread and, after fork(), from the child.
#pragma once

#include <string_view>

#include "lim/limiter.hpp"

namespace lim {

struct TokenBucketOptions {
    // The most the bucket holds: > 0, <= 1e9 tokens.
    double burst_size = 0;
    // Refill, in tokens per second: 0..1e9 (0: only what the bucket starts with).
    double sustained_rate_per_sec = 0;
    // Tokens in the bucket at creation: 0..burst_size.
    double initial_bucket_level = 0;
};

class TokenBucket : public LimiterFacade {
  public:
    // Opens the token bucket `key` in `segment`, creating it at `now` (from which the refill is
    // counted) if it does not exist. Throws Error: invalid_argument (burst_size <= 0, a negative
    // or NaN rate, an initial level outside 0..burst_size; nothing is created), invalid_name,
    // config_mismatch (the key exists with other options, or is another kind of limiter),
    // table_full, permission_denied.
    static TokenBucket open(const Segment& segment, std::string_view key,
                            const TokenBucketOptions& options, TimePoint now = Clock::now());
    // As above, but attaches to an existing key as it is, whatever its options.
    static TokenBucket open(const Segment& segment, std::string_view key,
                            const TokenBucketOptions& options, AdoptExisting,
                            TimePoint now = Clock::now());

    // Takes `n` tokens iff the bucket holds them at `now`. Never blocks; see Limiter::try_take
    // (the same contract, `now` rules and rounding). On a record a TokenBucket created, a take
    // is one compare-and-swap on the bucket word (GCRA: the tokens are consumed, so nothing
    // depends on what is in flight) plus plain stores to the thread's own ledger entry; on a
    // general Limiter record it adopted, it is Limiter::try_take. Throws Error(invalid_argument)
    // for a negative, NaN or infinite `n`, Error(table_full) if the thread has no process slot,
    // Error(system_error) and Error(busy) as Limiter::try_take (a configuration writer stopped
    // holding the config lock at a re-anchor of the drip; nothing taken).
    // Memory ordering: a successful take happens-after the refill decision or reconfiguration
    // that made its tokens available, in whichever process it ran.
    TryTake try_take(TimePoint now, double n);
    // Reads lim::Clock (a token bucket's rate is finite) unless the record was reconfigured to
    // an infinite rate by a Limiter handle (see Limiter::try_take(n)).
    TryTake try_take(double n);

    // Takes `n` tokens, sleeping until the refill brings them (see Limiter::take). Throws
    // Error(invalid_argument) if n > burst_size.
    void take(double n) { limiter_.take(n); }
    // As take, but gives up at `deadline` and returns false (having taken nothing).
    bool take_until(double n, TimePoint deadline) { return limiter_.take_until(n, deadline); }

    double burst_size() const noexcept { return limiter_.bucket_size(); }
    double sustained_rate_per_sec() const noexcept {
        return limiter_.hopper_to_bucket_rate_per_sec().value_or(0.0);
    }

  private:
    explicit TokenBucket(Limiter limiter);
    bool bucket_take_ = false;  // the record is a TokenBucket's: takes use its own representation
};

}  // namespace lim
