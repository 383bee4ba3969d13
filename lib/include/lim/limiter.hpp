// lim/limiter.hpp: Jane Street's Limiter (its Generic/Expert interface), shared by every process
// attached to a segment.
//
// A limiter moves tokens through three places: the *bucket*, from which jobs take tokens; *in
// flight*, while the job that took them runs; and the *hopper*, to which jobs return them. Tokens
// drip from the hopper into the bucket at `hopper_to_bucket_rate_per_sec` (finite, or infinite:
// at once), the bucket holding at most `bucket_size`. The *token target level* is the number of
// tokens in the whole system; an infinite hopper makes it infinite. One mechanism gives a token
// bucket (infinite hopper), a throttle (infinite rate) and a throttled rate limiter (both), which
// lim/token_bucket.hpp, lim/throttle.hpp and lim/throttled_rate_limiter.hpp package.
//
// Semantics are the seed's, point by point (shared/seeds/janestreet-limiter.txt):
// - Tokens are divisible into 10,000 pieces; amounts passed in are rounded up to a piece.
// - Every call whose outcome depends on time takes `now` (the overload without it reads
//   lim::Clock). A `now` earlier than the limiter's time is moved up to that time. A `now` up
//   to 60 s ahead of lim::Clock::now() is the caller's time (tests step from Clock::now()); one
//   further ahead is clamped to Clock::now() + 10 ms (never an error): the limiter's time is
//   shared by every process, and one far-future `now` must not stop the drip for all of them. The
//   limiter's time only moves forward (a compare-and-swap maximum). Segment::reset re-anchors the
//   drip at the current time.
// - The tokens that have dripped are counted from the limiter's creation time (or its last rate
//   change) as floor(elapsed x rate), never step by step, so rounding cannot drift. Drip that
//   finds the hopper empty or the bucket full is lost.
//
// All state is in the segment and every operation is a compare-and-swap loop on 64-bit words:
// no lock on try_take, return_to_hopper or the reads. Configuration changes (rare) exclude each
// other with a lock on the segment file, never excluding takes and returns.
// docs/design.md ("The Limiter family") has each operation's linearisation point and the argument
// that no interleaving of processes admits more than the seed would.
//
// Handles are cheap to copy and usable from any thread and, after fork(), from the child.
// Tokens each thread has in flight are recorded in its process slot's ledger, so a dead
// process's tokens are returned to the hopper by the next reap.
//
// Caveats
// - Concurrent takes are linearised in the order their compare-and-swaps land; between
//   processes the clock readings that go with them need not be in that order. A take or return
//   whose `now` is behind another process's is treated as happening at the limiter's time, and
//   decides with the bucket as it stood at its own `now` (never with more tokens than that).
// - With a finite rate and a finite target, operations that race may leave in the hopper, to
//   drip back at the rate, tokens the seed would have left in the bucket: contention can admit
//   less than the seed would, never more.
// - A return of more than is in flight that races a take may go undetected (the take's tokens
//   are counted in flight from before it succeeds); in flight is then clamped at zero.
// - A token bucket's tokens are never returned (as in the seed), so in_flight only grows. On a
//   record a TokenBucket created, TokenBucket::try_take records its tokens in the taking
//   thread's ledger rather than in the shared in-flight word (lim/token_bucket.hpp): they count
//   in in_flight(), but a Limiter handle on that record cannot return_to_hopper them
//   (over_release), nor do they count against a finite token target set later.
#pragma once

#include <cstdint>
#include <string_view>

#include "lim/clock.hpp"
#include "lim/detail/record_ref.hpp"
#include "lim/error.hpp"
#include "lim/hand_off.hpp"
#include "lim/segment.hpp"
#include "lim/tokens.hpp"

namespace lim {

namespace detail {
struct LimiterAccess;
}

// What try_take did. Jane Street's `Taken | Unable | Asked_for_more_than_bucket_size`.
enum class TryTake {
    taken,                            // the tokens are in flight until return_to_hopper
    unable,                           // not enough in the bucket now; nothing changed
    asked_for_more_than_bucket_size,  // no amount of waiting could succeed; nothing changed
};

// When tokens may be in the bucket: Jane Street's `At of time |
// Never_because_greater_than_bucket_size | When_return_to_hopper_is_called`.
class Availability {
  public:
    enum class Kind {
        at,                                      // time(): the earliest time (a lower bound)
        never_because_greater_than_bucket_size,  // more than the bucket can hold
        when_return_to_hopper_is_called,         // only a return (or a reconfiguration) helps
    };

    static constexpr Availability at(TimePoint time) noexcept {
        return Availability(Kind::at, time);
    }
    static constexpr Availability never_because_greater_than_bucket_size() noexcept {
        return Availability(Kind::never_because_greater_than_bucket_size, {});
    }
    static constexpr Availability when_return_to_hopper_is_called() noexcept {
        return Availability(Kind::when_return_to_hopper_is_called, {});
    }

    constexpr Kind kind() const noexcept { return kind_; }
    // The time, for Kind::at. Throws Error(invalid_argument) for the other kinds.
    TimePoint time() const;

    friend constexpr bool operator==(const Availability&, const Availability&) noexcept = default;

  private:
    constexpr Availability(Kind kind, TimePoint time) noexcept : kind_(kind), time_(time) {}
    Kind kind_;
    TimePoint time_;
};

// What try_start_job did (lim::Throttle, lim::ThrottledRateLimiter). Jane Street's `Start |
// Max_concurrent_jobs_running | Unable_until_at_least of time`.
class StartJob {
  public:
    enum class Kind {
        start,                        // the job may run; call finish_job once when it is done
        max_concurrent_jobs_running,  // only a finish_job can make room
        unable_until_at_least,        // time(): not before then (a lower bound)
    };

    static constexpr StartJob start() noexcept { return StartJob(Kind::start, {}); }
    static constexpr StartJob max_concurrent_jobs_running() noexcept {
        return StartJob(Kind::max_concurrent_jobs_running, {});
    }
    static constexpr StartJob unable_until_at_least(TimePoint time) noexcept {
        return StartJob(Kind::unable_until_at_least, time);
    }

    constexpr Kind kind() const noexcept { return kind_; }
    // The time, for Kind::unable_until_at_least. Throws Error(invalid_argument) otherwise.
    TimePoint time() const;

    friend constexpr bool operator==(const StartJob&, const StartJob&) noexcept = default;

  private:
    constexpr StartJob(Kind kind, TimePoint time) noexcept : kind_(kind), time_(time) {}
    Kind kind_;
    TimePoint time_;
};

// Jane Street's `create_exn` arguments. The token target level is
// initial_bucket_level + initial_hopper_level (infinite with an infinite hopper).
struct LimiterConfig {
    // Tokens per second from hopper to bucket: finite (>= 0, <= 1e9) or lim::infinite.
    InfiniteOrFinite<double> hopper_to_bucket_rate_per_sec = infinite;
    // The most the bucket holds: > 0, <= 1e9 tokens.
    double bucket_size = 0;
    // Tokens in the bucket at creation: 0..bucket_size.
    double initial_bucket_level = 0;
    // Tokens in the hopper at creation: finite (>= 0; with the bucket level <= 1e9) or infinite.
    InfiniteOrFinite<double> initial_hopper_level = infinite;
};

class Limiter {
  public:
    // Opens the limiter `key` in `segment`, creating it with `config` at `now` (the time from
    // which the drip is counted) if it does not exist; an existing limiter is attached to as it
    // is (`now` unused). Throws Error: invalid_name (bad key), invalid_argument (a configuration
    // value out of range, NaN or negative; nothing is created), config_mismatch (the key exists
    // with another configuration, or was created by a facade), table_full,
    // permission_denied, busy (creating a new key waited 3 s for the segment's records lock:
    // another creator is stopped or slow; nothing is created).
    static Limiter open(const Segment& segment, std::string_view key, const LimiterConfig& config,
                        TimePoint now = Clock::now());
    // As above, but if the key exists with another configuration (or as a TokenBucket,
    // Throttle or ThrottledRateLimiter), attaches to it as it is.
    static Limiter open(const Segment& segment, std::string_view key, const LimiterConfig& config,
                        AdoptExisting, TimePoint now = Clock::now());

    // ----- Reads. Each reads a consistent snapshot at max(now, the limiter's time), moves the
    // limiter's time up to it, and never blocks or throws. Memory ordering: a read that sees a
    // take's or return's effect happens-after it.

    // The most the bucket holds.
    double bucket_size() const noexcept;
    // Tokens available to take at once.
    double in_bucket(TimePoint now) const noexcept;
    double in_bucket() const noexcept { return in_bucket(Clock::now()); }
    // Tokens waiting to drip into the bucket (infinite with an infinite target).
    InfiniteOrFinite<double> in_hopper(TimePoint now) const noexcept;
    InfiniteOrFinite<double> in_hopper() const noexcept { return in_hopper(Clock::now()); }
    // Tokens taken and not yet returned.
    double in_flight(TimePoint now) const noexcept;
    double in_flight() const noexcept { return in_flight(Clock::now()); }
    // in_hopper + in_bucket.
    InfiniteOrFinite<double> in_limiter(TimePoint now) const noexcept;
    InfiniteOrFinite<double> in_limiter() const noexcept { return in_limiter(Clock::now()); }
    // in_hopper + in_bucket + in_flight: the target level, or more while what is in flight
    // alone exceeds it.
    InfiniteOrFinite<double> in_system(TimePoint now) const noexcept;
    InfiniteOrFinite<double> in_system() const noexcept { return in_system(Clock::now()); }
    InfiniteOrFinite<double> hopper_to_bucket_rate_per_sec() const noexcept;
    InfiniteOrFinite<double> token_target_level() const noexcept;
    // Threads sleeping in take/take_until (start_job/start_job_until) now, in all processes.
    std::uint32_t waiters() const noexcept;

    // The earliest time `n` tokens could be in the bucket: at(now) if they are; at(t), a lower
    // bound and not a promise, if the drip can bring them; when_return_to_hopper_is_called if
    // the hopper holds too few (or the rate is infinite); never_because_greater_than_bucket_size
    // if n > bucket_size(). Never blocks. Throws Error(invalid_argument) for a negative, NaN or
    // infinite `n`.
    Availability tokens_may_be_available_when(TimePoint now, double n) const;
    Availability tokens_may_be_available_when(double n) const {
        return tokens_may_be_available_when(Clock::now(), n);
    }

    // ----- Tokens

    // Takes `n` tokens (rounded up to 1/10,000) from the bucket iff at least `n` are there at
    // `now`; they are then in flight until return_to_hopper. Never blocks and does not throw on
    // shortage: `unable` when the bucket holds fewer, `asked_for_more_than_bucket_size` when
    // n > bucket_size(). n == 0 is taken at once.
    // Throws Error(invalid_argument) for a negative, NaN or infinite `n`. In the rare case that
    // it must re-anchor the drip (every 2^45 units dripped) it tries the segment's config lock,
    // and if a configuration change holds it, goes on without; only when that has gone on for
    // 2^46 units more, with the lock still held (a configuration writer stopped holding it), it
    // throws Error(busy) rather than wait (beyond 1 ms; nothing taken), and Error(system_error)
    // if the lock cannot be tried at all. One such re-anchor in 16,384 is a generation
    // checkpoint (docs/design.md, "Generation checkpoints"): it waits for every operation in
    // progress on the record to end, a few milliseconds and at most about a second, and throws
    // Error(busy) if one stays in progress (a thread stopped in the middle of an operation on
    // this limiter, SIGSTOP or a debugger), and then at once for a second after, nothing taken.
    // Memory ordering: a successful take happens-after the return, refill decision or
    // reconfiguration that made its tokens available, in whichever process it ran.
    // The overload without `now` reads lim::Clock only if the outcome depends on time (a finite
    // rate); an infinite-rate take (a Throttle's) never reads it.
    TryTake try_take(TimePoint now, double n);
    TryTake try_take(double n);

    // Takes `n` tokens, sleeping until tokens_may_be_available_when says they may be there, or
    // on the limiter's shared futex until a return or reconfiguration (re-checking at least
    // every 100 ms, so a waker that died cannot strand it). Throws as try_take, except that where
    // try_take throws Error(busy) at once it waits for the config lock, up to 3 s, before it
    // does;
    // Error(invalid_argument) if n > bucket_size() (it could never succeed), also when the
    // bucket shrinks below n while it sleeps; Error(table_full) if the thread has no process
    // slot to register its sleep in. Whatever it throws, it holds nothing: no tokens taken, its
    // sleeper registration withdrawn (waiters() no longer counts it).
    void take(double n);
    // As take, but gives up at `deadline`: returns false if it passed first (and then holds
    // nothing), also while it waited for the config lock. Throws as take, holding nothing.
    bool take_until(double n, TimePoint deadline);

    // Returns `n` tokens from flight to the hopper, from which they drip into the bucket at the
    // rate, starting at `now` (time advances first, as in the seed). While more tokens are in
    // the system than the target level, returned tokens are dropped until it matches. Wakes
    // sleepers. Any thread of the taking process may return tokens another of its threads took;
    // another process may not (its ledger would go negative, and a reap would undo half of the
    // pair): it gets Error(over_release) unless it took `n` itself, or received them
    // (JobLimiterFacade::hand_off_jobs, receive). Tokens of a consumed record
    // (lim/consumed_limiter.hpp) are in no ledger: any process may return them.
    // Throws Error(over_release) if n > in_flight (nothing changes), Error(invalid_argument)
    // for a negative, NaN or infinite `n`, Error(system_error) as try_take, and Error(busy) where
    // try_take does, after waiting up to 3 s for the config lock (nothing returned: the tokens
    // stay in flight, and may be returned again).
    // Memory ordering: everything before the return happens-before a take that gets its tokens.
    // The overload without `now` reads lim::Clock only if the rate is finite.
    void return_to_hopper(TimePoint now, double n);
    void return_to_hopper(double n);

    // ----- Configuration. Each advances time to `now` under the old configuration first, then
    // switches atomically for every process; wakes sleepers. Takes the segment's config lock
    // (waiting only for another configuration change, and for 3 s at most). Throws
    // Error(invalid_argument) for a value out of range (nothing changes), Error(permission_denied)
    // on a read-only mapping, Error(busy) if the lock stayed held for 3 s (a configuration
    // writer stopped or slow; nothing changes), Error(system_error) if the lock cannot be taken.
    // One configuration change in 16,384 on a limiter is a generation checkpoint (docs/design.md,
    // "Generation checkpoints"): it waits, with the lock held, for every operation in progress on
    // the limiter to end (a few milliseconds; at most a second), and throws Error(busy), nothing
    // changed, if one stays in progress (a thread stopped in the middle of an operation on it,
    // SIGSTOP or a debugger); for a second after such a refusal, changes of that limiter are
    // refused at once, and none succeeds until that thread continues or exits.

    // Sets the number of tokens in the whole system. Lowering it removes tokens from the hopper,
    // then the bucket; if what is in flight alone exceeds it, hopper and bucket empty and later
    // returns are dropped until the system holds the target. Raising it adds tokens to the
    // hopper. Infinite makes the hopper infinite. Finite: 0..1e9. A finite target on a record a
    // TokenBucket created throws Error(invalid_argument): its takes are consumed outside any
    // target (see TokenBucket), so one could not bound them.
    void set_token_target_level(TimePoint now, InfiniteOrFinite<double> level);
    void set_token_target_level(InfiniteOrFinite<double> level) {
        set_token_target_level(Clock::now(), level);
    }
    // Sets the most the bucket holds (> 0, <= 1e9). A smaller size moves the bucket's excess to
    // the hopper.
    void set_bucket_size(TimePoint now, double size);
    void set_bucket_size(double size) { set_bucket_size(Clock::now(), size); }
    // Sets the drip rate (finite >= 0 and <= 1e9, or infinite). The drip is counted from `now`
    // at the new rate.
    void set_hopper_to_bucket_rate_per_sec(TimePoint now, InfiniteOrFinite<double> rate);
    void set_hopper_to_bucket_rate_per_sec(InfiniteOrFinite<double> rate) {
        set_hopper_to_bucket_rate_per_sec(Clock::now(), rate);
    }

    // Checks the shared state: configuration in range, in flight not negative, bucket within
    // 0..bucket_size, hopper not negative, a system above its target holding nothing in bucket
    // or hopper. Throws Error(corrupt_segment) naming what is wrong.
    void invariant() const;

    std::string_view key() const noexcept { return ref_.key(); }

  private:
    friend struct detail::LimiterAccess;
    explicit Limiter(detail::RecordRef ref) : ref_(std::move(ref)) {}
    bool take_until_impl(double n, const TimePoint* deadline);
    detail::RecordRef ref_;
};

// The read operations that lim::TokenBucket, lim::Throttle and lim::ThrottledRateLimiter share,
// forwarded to the Limiter each is built on (as Jane Street's facades are limiters).
class LimiterFacade {
  public:
    double bucket_size() const noexcept { return limiter_.bucket_size(); }
    double in_bucket(TimePoint now) const noexcept { return limiter_.in_bucket(now); }
    double in_bucket() const noexcept { return limiter_.in_bucket(); }
    InfiniteOrFinite<double> in_hopper(TimePoint now) const noexcept {
        return limiter_.in_hopper(now);
    }
    InfiniteOrFinite<double> in_hopper() const noexcept { return limiter_.in_hopper(); }
    double in_flight(TimePoint now) const noexcept { return limiter_.in_flight(now); }
    double in_flight() const noexcept { return limiter_.in_flight(); }
    InfiniteOrFinite<double> in_limiter(TimePoint now) const noexcept {
        return limiter_.in_limiter(now);
    }
    InfiniteOrFinite<double> in_limiter() const noexcept { return limiter_.in_limiter(); }
    InfiniteOrFinite<double> in_system(TimePoint now) const noexcept {
        return limiter_.in_system(now);
    }
    InfiniteOrFinite<double> in_system() const noexcept { return limiter_.in_system(); }
    InfiniteOrFinite<double> hopper_to_bucket_rate_per_sec() const noexcept {
        return limiter_.hopper_to_bucket_rate_per_sec();
    }
    Availability tokens_may_be_available_when(TimePoint now, double n) const {
        return limiter_.tokens_may_be_available_when(now, n);
    }
    Availability tokens_may_be_available_when(double n) const {
        return limiter_.tokens_may_be_available_when(n);
    }
    void invariant() const { limiter_.invariant(); }
    std::uint32_t waiters() const noexcept { return limiter_.waiters(); }
    std::string_view key() const noexcept { return limiter_.key(); }

    // The Limiter underneath, for its Expert operations (Jane Street's facades are limiters).
    Limiter& limiter() noexcept { return limiter_; }
    const Limiter& limiter() const noexcept { return limiter_; }

  protected:
    explicit LimiterFacade(Limiter limiter) : limiter_(std::move(limiter)) {}
    Limiter limiter_;
};

// The job operations lim::Throttle and lim::ThrottledRateLimiter share (Jane Street's Throttle
// includes its Throttled_rate_limiter): a job takes one token before it starts and gives it back
// when it finishes. Each started job must be finished exactly once.
class JobLimiterFacade : public LimiterFacade {
  public:
    // `start` (the job holds a token until finish_job); `unable_until_at_least(t)` when only
    // the rate stops it (t: the earliest the bucket may have a token, a lower bound; never for
    // a Throttle, whose rate is infinite); `max_concurrent_jobs_running` when only a finish_job
    // can help. Never blocks, never throws.
    // Memory ordering: a start happens-after the finish_job or refill that made room for it.
    // The overload without `now` reads lim::Clock only if the outcome depends on time: not
    // for a Throttle's start (an infinite rate), nor for a start that succeeds on an
    // infinite-rate record; when the job cannot start, to say until when.
    StartJob try_start_job(TimePoint now);
    StartJob try_start_job();

    // Starts a job, sleeping on the limiter's shared futex until one may (see Limiter::take).
    void start_job() { limiter_.take(1.0); }
    // As start_job, but gives up at `deadline` and returns false (holding nothing).
    bool start_job_until(TimePoint deadline) { return limiter_.take_until(1.0, deadline); }

    // Ends a job: its token goes back to the hopper, and sleepers in start_job wake. Throws
    // Error(over_release) if no job is running, or if this process did not start one (a job
    // started by another process is finished by that process, or handed over: hand_off_jobs).
    // The overload without `now` reads lim::Clock only if the rate is finite.
    void finish_job(TimePoint now);
    void finish_job();

    // Hands `n` running jobs of this process to another process (lim/hand_off.hpp): this process
    // stops holding their tokens, which sit in a parcel owned by this process until a receive
    // takes them; then the receiver finishes the jobs (finish_job, once per job). The jobs stay
    // running throughout; if this process dies before they are received, the next reap returns
    // their tokens to the hopper. Blocks only briefly, on the segment's recovery lock. Throws
    // Error(invalid_argument) unless 1 <= n <= 1e9, Error(over_release) if this process runs
    // fewer than `n` jobs, Error(table_full) if no slot is free for the parcel; either way
    // nothing changes.
    // Memory ordering: everything before the hand-off happens-before a receive that takes it.
    HandOff hand_off_jobs(std::int64_t n = 1);

    // Receives jobs this limiter's hand_off_jobs handed off, in any process: the calling process
    // now runs them. Returns false, changing nothing, if the parcel is gone (received already,
    // or its giver died). Throws Error(invalid_argument) if `h` was made by another limiter,
    // Error(table_full) if this thread has no process slot and none is free.
    // Memory ordering: a successful receive happens-after the hand-off.
    bool receive(const HandOff& h);

    // The token target level: jobs that may run at once.
    std::int64_t max_concurrent_jobs() const noexcept;

  protected:
    using LimiterFacade::LimiterFacade;
};

}  // namespace lim
