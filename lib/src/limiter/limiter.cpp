// lim::Limiter: argument checking, units, and blocking, on top of LimiterCore.
#include "lim/limiter.hpp"

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <limits>
#include <thread>
#include <utility>

#include "lim/error.hpp"
#include "limiter/limiter_open.hpp"
#include "limiter/limiter_state.hpp"
#include "recovery/reaper.hpp"
#include "shm/record_handle.hpp"
#include "sync/pacing.hpp"

namespace lim {

TimePoint Availability::time() const {
    if (kind_ != Kind::at) {
        throw Error(Errc::invalid_argument, "Availability::time() called on a result without one");
    }
    return time_;
}

TimePoint StartJob::time() const {
    if (kind_ != Kind::unable_until_at_least) {
        throw Error(Errc::invalid_argument, "StartJob::time() called on a result without one");
    }
    return time_;
}

namespace detail {
namespace {

// How long a sleeper sleeps before re-checking on its own (a waker may have died), and below
// which a wait for the drip is spent yielding rather than in the kernel.
constexpr Duration kRecheck = std::chrono::milliseconds{100};
constexpr Duration kSpin = std::chrono::microseconds{20};

double to_tokens(std::int64_t units) noexcept {
    return static_cast<double>(units) / static_cast<double>(kTokenResolution);
}

InfiniteOrFinite<double> maybe_infinite(bool infinite, std::int64_t units) noexcept {
    if (infinite) return lim::infinite;
    return to_tokens(units);
}

LimiterCore core_of(const RecordRef& ref) noexcept {
    return LimiterCore(*ref.state, ref.index);
}

std::string where(const RecordRef& ref) {
    return fmt::format("limiter '{}' in segment '{}'", ref.key(), ref.state->name());
}

// A configuration amount (bucket size, target level), in units: finite, > 0 (or >= 0), <= 1e9.
std::int64_t config_units(std::string_view what, std::string_view key, std::string_view field,
                          double value, bool zero_ok) {
    if (!std::isfinite(value) || value < 0 || (!zero_ok && value <= 0) || value > kMaxTokens) {
        throw_bad_parameter(what, key, field, value,
                            zero_ok ? "a number of tokens from 0 to 1e9"
                                    : "a number of tokens above 0, at most 1e9");
    }
    const std::int64_t units = Tokens::round_up(value).units();
    if (!zero_ok && units == 0) {
        throw_bad_parameter(what, key, field, value, "at least 1/10,000 of a token");
    }
    return units;
}

void check_rate(std::string_view what, std::string_view key, std::string_view field,
                InfiniteOrFinite<double> rate) {
    if (rate.is_infinite()) return;
    const double r = rate.value();
    if (!(r >= 0) || r > kMaxRatePerSec) {  // also NaN and +inf given as a finite value
        throw_bad_parameter(what, key, field, r,
                            "a number of tokens per second from 0 to 1e9, or lim::infinite");
    }
}

LimiterRecordConfig make_record_config(std::string_view what, std::string_view key,
                                       const LimiterConfig& c) {
    check_rate(what, key, "hopper_to_bucket_rate_per_sec", c.hopper_to_bucket_rate_per_sec);
    LimiterRecordConfig rc{};
    rc.bucket_size = config_units(what, key, "bucket_size", c.bucket_size, false);
    rc.initial_bucket_level =
        config_units(what, key, "initial_bucket_level", c.initial_bucket_level, true);
    if (rc.initial_bucket_level > rc.bucket_size) {
        throw_bad_parameter(what, key, "initial_bucket_level", c.initial_bucket_level,
                            fmt::format("at most bucket_size ({:g})", c.bucket_size));
    }
    if (c.hopper_to_bucket_rate_per_sec.is_infinite()) {
        rc.flags |= kRateInfinite;
    } else {
        // +0.0 for -0.0, so that equal configurations are equal bytes.
        rc.rate_bits = std::bit_cast<std::uint64_t>(c.hopper_to_bucket_rate_per_sec.value() + 0.0);
    }
    if (c.initial_hopper_level.is_infinite()) {
        rc.flags |= kTargetInfinite;
    } else {
        rc.initial_hopper_level =
            config_units(what, key, "initial_hopper_level", c.initial_hopper_level.value(), true);
        if (rc.initial_hopper_level + rc.initial_bucket_level > kMaxTokenUnits) {
            throw_bad_parameter(what, key, "initial_hopper_level", c.initial_hopper_level.value(),
                                "such that hopper and bucket together hold at most 1e9 tokens");
        }
    }
    return rc;
}

std::string describe(const LimiterRecordConfig& c, std::uint16_t flavor) {
    const double rate = std::bit_cast<double>(c.rate_bits);
    const std::string rate_text =
        (c.flags & kRateInfinite) ? std::string("infinite") : fmt::format("{:g}", rate);
    const double bucket = to_tokens(c.bucket_size);
    const double initial = to_tokens(c.initial_bucket_level);
    const double jobs = to_tokens(c.initial_bucket_level + c.initial_hopper_level);
    switch (static_cast<LimiterFlavor>(flavor)) {
        case LimiterFlavor::token_bucket:
            return fmt::format(
                "a token bucket (burst_size {:g}, sustained_rate_per_sec {}, "
                "initial_bucket_level {:g})",
                bucket, rate_text, initial);
        case LimiterFlavor::throttle:
            return fmt::format("a throttle (max_concurrent_jobs {:g})", bucket);
        case LimiterFlavor::throttled_rate_limiter:
            return fmt::format(
                "a throttled rate limiter (burst_size {:g}, sustained_rate_per_sec {}, "
                "max_concurrent_jobs {:g})",
                bucket, rate_text, jobs);
        case LimiterFlavor::limiter:
            break;
    }
    const std::string hopper = (c.flags & kTargetInfinite)
                                   ? std::string("infinite")
                                   : fmt::format("{:g}", to_tokens(c.initial_hopper_level));
    return fmt::format(
        "a limiter (hopper_to_bucket_rate_per_sec {}, bucket_size {:g}, initial_bucket_level "
        "{:g}, initial_hopper_level {})",
        rate_text, bucket, initial, hopper);
}

}  // namespace

// A token amount that is not a whole number of units, or is out of range: checked and rounded
// up, or refused.
std::int64_t amount_units_slow(const RecordRef& ref, std::string_view op, double n) {
    if (!std::isfinite(n) || n < 0 || n > kMaxTokens * 1e3) {
        throw Error(Errc::invalid_argument,
                    fmt::format("{}: {}({}): the amount must be a number of tokens from 0 to 1e12",
                                where(ref), op, n));
    }
    return Tokens::round_up(n).units();
}

// Out of line and cold, so that return_to_hopper's hot path carries no formatting frame.
[[noreturn, gnu::noinline, gnu::cold]] void throw_over_release(const RecordRef& ref, double n,
                                                               std::int64_t seen) {
    throw Error(Errc::over_release,
                fmt::format("{}: return_to_hopper({}) but only {} tokens are in flight", where(ref),
                            n, to_tokens(seen)));
}

// A return of tokens this process did not take (docs/design.md, "Hand-off between processes").
[[noreturn, gnu::noinline, gnu::cold]] void throw_not_held(const RecordRef& ref, double n,
                                                           std::int64_t mine) {
    throw Error(Errc::over_release,
                fmt::format("{}: return_to_hopper({}) but this process took {} of the tokens in "
                            "flight; tokens taken by another process can only be returned by that "
                            "process (or handed over: hand_off_jobs, receive)",
                            where(ref), n, to_tokens(std::max<std::int64_t>(mine, 0))));
}

void throw_bad_parameter(std::string_view what, std::string_view key, std::string_view field,
                         double value, std::string_view rule) {
    throw Error(Errc::invalid_argument,
                fmt::format("{} '{}': {} is {}; it must be {}", what, key, field, value, rule));
}

Limiter open_limiter(const Segment& segment, std::string_view what, std::string_view key,
                     const LimiterConfig& config, LimiterFlavor flavor, bool adopt, TimePoint now,
                     std::uint32_t extra_flags) {
    LimiterRecordConfig rc = make_record_config(what, key, config);
    rc.flags |= extra_flags;
    const std::int64_t now_ns = detail::bounded_now_ns(now);
    RecordRef ref = open_record<LimiterRecordConfig>(
        segment, RecordKind::limiter, static_cast<std::uint16_t>(flavor), what, key, rc, adopt,
        [&](Record& r) { init_limiter_body(*reinterpret_cast<LimiterBody*>(r.body), rc, now_ns); },
        describe);
    return LimiterAccess::make(std::move(ref));
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Limiter
// ---------------------------------------------------------------------------------------------

using detail::LimiterCore;

Limiter Limiter::open(const Segment& segment, std::string_view key, const LimiterConfig& config,
                      TimePoint now) {
    return detail::open_limiter(segment, "limiter", key, config, detail::LimiterFlavor::limiter,
                                false, now);
}

Limiter Limiter::open(const Segment& segment, std::string_view key, const LimiterConfig& config,
                      AdoptExisting, TimePoint now) {
    return detail::open_limiter(segment, "limiter", key, config, detail::LimiterFlavor::limiter,
                                true, now);
}

double Limiter::bucket_size() const noexcept {
    return detail::to_tokens(detail::core_of(ref_).params().bucket_size);
}

InfiniteOrFinite<double> Limiter::hopper_to_bucket_rate_per_sec() const noexcept {
    const detail::LimiterParams p = detail::core_of(ref_).params();
    if (p.rate_infinite) return infinite;
    return p.rate_per_sec;
}

InfiniteOrFinite<double> Limiter::token_target_level() const noexcept {
    const detail::LimiterParams p = detail::core_of(ref_).params();
    return detail::maybe_infinite(p.target_infinite, p.target);
}

std::uint32_t Limiter::waiters() const noexcept {
    return detail::core_of(ref_).wake().waiters.load(std::memory_order_acquire);
}

double Limiter::in_bucket(TimePoint now) const noexcept {
    return detail::to_tokens(detail::core_of(ref_).read(detail::bounded_now_ns(now)).in_bucket);
}

InfiniteOrFinite<double> Limiter::in_hopper(TimePoint now) const noexcept {
    const detail::LimiterReading r = detail::core_of(ref_).read(detail::bounded_now_ns(now));
    return detail::maybe_infinite(r.params.target_infinite, r.in_hopper);
}

double Limiter::in_flight(TimePoint now) const noexcept {
    return detail::to_tokens(detail::core_of(ref_).read(detail::bounded_now_ns(now)).in_flight);
}

InfiniteOrFinite<double> Limiter::in_limiter(TimePoint now) const noexcept {
    const detail::LimiterReading r = detail::core_of(ref_).read(detail::bounded_now_ns(now));
    return detail::maybe_infinite(r.params.target_infinite, r.in_hopper + r.in_bucket);
}

InfiniteOrFinite<double> Limiter::in_system(TimePoint now) const noexcept {
    const detail::LimiterReading r = detail::core_of(ref_).read(detail::bounded_now_ns(now));
    // Saturating: a damaged record's words may hold anything (in_hopper + in_bucket is at most
    // the target; in_flight is F, up to 2^63 - 1 there).
    std::int64_t units = 0;
    if (__builtin_add_overflow(r.in_hopper + r.in_bucket, r.in_flight, &units))
        units = std::numeric_limits<std::int64_t>::max();
    return detail::maybe_infinite(r.params.target_infinite, units);
}

Availability Limiter::tokens_may_be_available_when(TimePoint now, double n) const {
    const std::int64_t units = detail::amount_units(ref_, "tokens_may_be_available_when", n);
    const detail::LimiterReading r = detail::core_of(ref_).read(detail::bounded_now_ns(now));
    const detail::LimiterParams& p = r.params;
    if (units > p.bucket_size) return Availability::never_because_greater_than_bucket_size();
    if (p.consumed) {
        // Past a consumed record's lease deadline nothing is admitted until a new deadline is
        // set (which wakes sleepers), whatever the bucket holds: no time to wait for.
        const std::int64_t deadline =
            detail::core_of(ref_).body().lease_deadline_ns.load(std::memory_order_seq_cst);
        if (deadline != detail::kNoLeaseDeadline && r.t_ns >= deadline) {
            return Availability::when_return_to_hopper_is_called();
        }
    }
    const std::int64_t missing = units - r.in_bucket;
    if (missing <= 0) return Availability::at(from_nanos(r.t_ns));
    if (p.rate_infinite) return Availability::when_return_to_hopper_is_called();
    if (!p.target_infinite && missing > r.in_hopper) {
        return Availability::when_return_to_hopper_is_called();
    }
    // The hopper holds enough and the cap lets the bucket hold `units`, so the bucket is short
    // of the drip alone: the answer is the first t with D(t) >= x + units.
    const std::optional<std::int64_t> elapsed = p.drip.elapsed_for(r.x + units);
    std::int64_t at = 0;
    if (!elapsed || __builtin_add_overflow(p.anchor_ns, *elapsed, &at)) {
        return Availability::at(TimePoint::max());  // a zero rate: the drip never brings them
    }
    return Availability::at(from_nanos(std::max(at, r.t_ns)));
}

namespace detail {
namespace {

// Rebases the drip after a take or return asked for it (rebase_needed: a finite rate; a caller
// that gave no time has the clock read here, on this rare path, and keeps that reading for its
// retries: the retry then runs at the rebase's time, where the new drip is below one re-anchor
// step, so it cannot ask again; re-reading the clock let a block whose rate no configuration can
// make (a damaged segment: 2^45 units in microseconds) ask again on every retry, forever). The
// first time, try without waiting for the config lock; if a configuration change holds it, go on
// (the marker has room up to kRebaseHard) and wait for the lock only if asked again, as `how`
// says (LimiterCore::rebase_hard: a try_* never waits, Error(busy)). False if the caller's
// deadline passed while it waited.
bool rebase_after(LimiterCore& core, std::int64_t& now_ns, std::int64_t& rebase_at,
                  const RebaseWait& how) {
    if (now_ns == kClockUnread) now_ns = to_nanos(Clock::now());
    if (rebase_at == kRebaseAt) {
        if (!core.rebase(now_ns, std::nullopt)) rebase_at = kRebaseHard;
        return true;
    }
    if (!core.rebase_hard(now_ns, how)) return false;
    rebase_at = kRebaseAt;
    return true;
}

// Whether the configuration S selects now looks like the infinite-rate fast path's (infinite
// rate, not consumed): a hint, read without a Hold or a generation check, that only picks which
// path runs first; the fast path re-reads and validates everything under its Hold. Finite-rate
// records so go straight to the general operation, paying neither a second Hold nor the fast
// path's loads.
std::uint32_t hint_flags(const LimiterBody& body) noexcept {
    const std::uint64_t s = body.bucket.load(std::memory_order_relaxed);
    return body.config[BucketWord::gen(s) & 1].flags.load(std::memory_order_relaxed);
}
bool looks_infinite(std::uint32_t flags) noexcept {
    return (flags & (kRateInfinite | kConsumed)) == kRateInfinite;
}
// The same hint for the consumed fast take (lim-feeder's records: consumed, infinite rate,
// finite target).
bool looks_consumed(std::uint32_t flags) noexcept {
    return (flags & (kRateInfinite | kTargetInfinite | kConsumed)) == (kRateInfinite | kConsumed);
}

// The general take (LimiterCore::try_take) until it is not waiting for a rebase of the drip.
// Out of line, so that the fast path before it keeps its values in registers.
[[gnu::noinline]] TryTake take_general(const RecordRef& ref, std::int64_t now_ns,
                                       std::int64_t units, bool count_refused,
                                       const RebaseWait& how) {
    LimiterCore core(*ref.state, ref.index, *ref.record);
    std::int64_t rebase_at = kRebaseAt;
    for (;;) {
        TakeOutcome outcome;
        {
            // The Hold must not stay pending across the rebase below (it may wait for a lock).
            Hold hold(*ref.state, ref.index);
            outcome = core.try_take(hold, now_ns, units, rebase_at, count_refused);
        }
        switch (outcome) {
            case TakeOutcome::taken:
                return TryTake::taken;
            case TakeOutcome::asked_for_more:
                return TryTake::asked_for_more_than_bucket_size;
            case TakeOutcome::rebase_needed:
                // A blocking take whose deadline passed waiting for the lock: not taken.
                if (!rebase_after(core, now_ns, rebase_at, how)) return TryTake::unable;
                break;
            default:
                return TryTake::unable;
        }
    }
}

// The general return (LimiterCore::return_to_hopper), as take_general.
[[gnu::noinline]] void return_general(const RecordRef& ref, std::int64_t now_ns, double n,
                                      std::int64_t units) {
    LimiterCore core(*ref.state, ref.index, *ref.record);
    std::int64_t rebase_at = kRebaseAt;
    std::int64_t seen = 0;
    for (;;) {
        ReturnOutcome o;
        {
            Hold hold(*ref.state, ref.index);
            o = core.return_to_hopper(hold, now_ns, units, rebase_at, &seen);
            while (o == ReturnOutcome::not_held)
                [[unlikely]] {
                    // The calling thread took fewer: did another thread of this process take them?
                    // (Again if the return stepped aside from a frozen word since: a forced reset
                    // may have forgotten them. Hold::still_holds also waits out a reset in
                    // progress, which may give back what it cleared; it notes may_owe.)
                    if (!hold.still_holds(0, static_cast<std::uint64_t>(units))) {
                        throw_not_held(ref, n, process_holding(*ref.state, ref.index, /*layer=*/0));
                    }
                    o = core.return_to_hopper(hold, now_ns, units, rebase_at, &seen, true);
                }
        }
        if (o == ReturnOutcome::over_release) throw_over_release(ref, n, seen);
        if (o != ReturnOutcome::rebase_needed) return;
        // Nothing returned yet: Error(busy) after kLockWaitTimeout leaves the tokens in flight.
        rebase_after(core, now_ns, rebase_at, RebaseWait{.wait = true});
    }
}

}  // namespace

namespace {

// The infinite-rate fast path, under its own Hold; if it declines (nothing changed), the general
// operation from scratch. Out of line from take_units/return_units, so that a finite-rate
// record's operation does not pay for the registers this one uses.
[[gnu::noinline]] TryTake take_fast(const RecordRef& ref, std::int64_t now_ns, std::int64_t units,
                                    const RebaseWait& how) {
    {
        LimiterCore core(*ref.state, ref.index, *ref.record);
        Hold hold(*ref.state, ref.index);
        if (core.try_take_infinite(hold, units) == FastOutcome::done) [[likely]]
            return TryTake::taken;
    }
    return take_general(ref, now_ns, units, true, how);
}

[[gnu::noinline]] void return_fast(const RecordRef& ref, std::int64_t now_ns, double n,
                                   std::int64_t units) {
    {
        LimiterCore core(*ref.state, ref.index, *ref.record);
        Hold hold(*ref.state, ref.index);
        if (core.return_infinite(hold, units) == FastOutcome::done) [[likely]]
            return;
    }
    return_general(ref, now_ns, n, units);
}

const LimiterBody& body_of(const RecordRef& ref) noexcept {
    return *reinterpret_cast<const LimiterBody*>(ref.record->body);
}

// A consumed record's take: the consumed fast take, and the general take if it declines. Out of
// line, as take_fast.
[[gnu::noinline]] TryTake take_consumed(const RecordRef& ref, std::int64_t now_ns,
                                        std::int64_t units, const RebaseWait& how) {
    // The thread's slot first: claiming it is what may throw (table_full), before anything is
    // taken.
    const Holder h = holder(*ref.state);
    LimiterCore core(*ref.state, ref.index, *ref.record);
    announce_attempt(*h.slot, ref.index + 1);
    const ConsumedOutcome outcome = core.try_take_consumed(h.entry(ref.index), now_ns, units);
    withdraw_attempt(*h.slot);
    // A slot claimed for this one take, by a thread past its slot registry's destruction (a
    // take from a thread_local destructor): given back now, as ~Hold does for the general take
    // (it holds nothing: its admitted count is folded into the record). Kept, every such take
    // would occupy one slot of the table for the life of the mapping.
    if (h.ephemeral) [[unlikely]]
        release_ephemeral(*ref.state, h);
    switch (outcome) {
        case ConsumedOutcome::taken:
            return TryTake::taken;
        case ConsumedOutcome::late:
            return TryTake::unable;
        case ConsumedOutcome::general:
            break;
    }
    return take_general(ref, now_ns, units, true, how);
}

}  // namespace

// Both try_take overloads: `now_ns` is kClockUnread for the one without a time (the lazy clock:
// LimiterCore::begin reads it only for a finite rate, and the fast paths never before their CAS).
TryTake take_units(const RecordRef& ref, std::int64_t now_ns, std::int64_t units,
                   const RebaseWait& how) {
    const std::uint32_t flags = hint_flags(body_of(ref));
    if (looks_infinite(flags)) return take_fast(ref, now_ns, units, how);
    if (looks_consumed(flags)) return take_consumed(ref, now_ns, units, how);
    return take_general(ref, now_ns, units, true, how);
}

// A blocking take's re-check: the general take (the fast path declined its first attempt, and a
// consumed record never uses it), not counting a consumed record's refusal again (its first
// attempt counted the units once; the sleeper itself is visible in the wake channel).
TryTake retake_units(const RecordRef& ref, std::int64_t now_ns, std::int64_t units,
                     const RebaseWait& how) {
    if (looks_infinite(hint_flags(body_of(ref)))) return take_fast(ref, now_ns, units, how);
    return take_general(ref, now_ns, units, false, how);
}

// Both return_to_hopper overloads (`now_ns` as for take_units).
void return_units(const RecordRef& ref, std::int64_t now_ns, double n, std::int64_t units) {
    if (looks_infinite(hint_flags(body_of(ref)))) return return_fast(ref, now_ns, n, units);
    return_general(ref, now_ns, n, units);
}

}  // namespace detail

TryTake Limiter::try_take(TimePoint now, double n) {
    const std::int64_t units = detail::amount_units(ref_, "try_take", n);
    if (units == 0) return TryTake::taken;
    return detail::take_units(ref_, detail::bounded_now_ns(now), units);
}

TryTake Limiter::try_take(double n) {
    const std::int64_t units = detail::amount_units(ref_, "try_take", n);
    if (units == 0) return TryTake::taken;
    return detail::take_units(ref_, detail::kClockUnread, units);
}

void Limiter::return_to_hopper(TimePoint now, double n) {
    const std::int64_t units = detail::amount_units(ref_, "return_to_hopper", n);
    if (units == 0) return;
    detail::return_units(ref_, detail::bounded_now_ns(now), n, units);
}

void Limiter::return_to_hopper(double n) {
    const std::int64_t units = detail::amount_units(ref_, "return_to_hopper", n);
    if (units == 0) return;
    detail::return_units(ref_, detail::kClockUnread, n, units);
}

void Limiter::take(double n) {
    take_until_impl(n, nullptr);
}

bool Limiter::take_until(double n, TimePoint deadline) {
    return take_until_impl(n, &deadline);
}

bool Limiter::take_until_impl(double n, const TimePoint* deadline) {
    const auto never = [&] {
        throw Error(Errc::invalid_argument,
                    fmt::format("{}: take({}) could never succeed: the bucket holds at most {}",
                                detail::where(ref_), n, bucket_size()));
    };
    const std::int64_t units = detail::amount_units(ref_, "take", n);
    // As try_take, but a re-anchor of the drip that must wait for the config lock waits until
    // the deadline (false then) or kLockWaitTimeout (Error(busy)), where try_take refuses at once.
    const detail::RebaseWait how{.wait = true, .deadline = deadline};
    const TryTake first =
        units == 0 ? TryTake::taken
                   : detail::take_units(ref_, detail::bounded_now_ns(Clock::now()), units, how);
    switch (first) {
        case TryTake::taken:
            return true;
        case TryTake::asked_for_more_than_bucket_size:
            never();
            break;
        case TryTake::unable:
            break;
    }
    // Inside a WaitCheck's callback this thread is already registered for the wait that called
    // it: a second registration would take over its slot's waiting fields (sync/pacing.hpp).
    if (detail::inside_wait_check()) detail::refuse_wait_inside_check("Limiter take");
    LimiterCore core = detail::core_of(ref_);
    // Registered before each re-check, so a return that lands after the check wakes us.
    detail::LimiterWaiter waiter(core, units);
    // A take that waits on tokens a dead process held in flight reaps it (a throttle's slots).
    detail::AutoReap auto_reap(*ref_.state, Clock::now());
    for (;;) {
        const TimePoint now = Clock::now();
        auto_reap.poll(now);
        const TryTake r = detail::retake_units(ref_, detail::bounded_now_ns(now), units, how);
        if (r == TryTake::taken) return true;
        if (r == TryTake::asked_for_more_than_bucket_size) never();
        if (deadline && now >= *deadline) return false;
        TimePoint wake = now + detail::kRecheck;
        const Availability when = tokens_may_be_available_when(now, n);
        if (when.kind() == Availability::Kind::at) wake = std::min(wake, when.time());
        if (deadline) wake = std::min(wake, *deadline);
        if (wake - now <= detail::kSpin) {
            std::this_thread::yield();  // the drip is due within microseconds
            continue;
        }
        waiter.wait(wake);
    }
}

void Limiter::set_token_target_level(TimePoint now, InfiniteOrFinite<double> level) {
    std::int64_t units = 0;
    auto core = detail::core_of(ref_);
    if (level.is_finite() && load_flavor(core.state().record(core.record()).header) ==
                                 static_cast<std::uint16_t>(detail::LimiterFlavor::token_bucket)) {
        // A TokenBucket's own takes are consumed outside F (recorded in the takers' ledgers), so
        // a finite target could not count them and would admit more than it says. The flavor
        // changes only once, token_bucket -> limiter (lim::convert_to_consumed's step 1); a
        // target set after it, on a live configuration still the token bucket's (a converter
        // killed before its switch), bounds takes not yet bound by any lease (its count
        // misses the token bucket's own takes, as before the conversion), and the
        // conversion's switch replaces it with 0.
        throw Error(Errc::invalid_argument,
                    fmt::format("limiter '{}': set_token_target_level: a finite target is for "
                                "records created as a Limiter, not as a TokenBucket (whose taken "
                                "tokens are consumed outside any target)",
                                key()));
    }
    if (level.is_finite()) {
        units = detail::config_units("limiter", key(), "token_target_level", level.value(), true);
    }
    core.reconfigure(detail::bounded_now_ns(now), false, [&](detail::LimiterParams& p) {
        p.target_infinite = level.is_infinite();
        p.target = units;
    });
}

void Limiter::set_bucket_size(TimePoint now, double size) {
    const std::int64_t units = detail::config_units("limiter", key(), "bucket_size", size, false);
    detail::core_of(ref_).reconfigure(detail::bounded_now_ns(now), false,
                                      [&](detail::LimiterParams& p) { p.bucket_size = units; });
}

void Limiter::set_hopper_to_bucket_rate_per_sec(TimePoint now, InfiniteOrFinite<double> rate) {
    detail::check_rate("limiter", key(), "hopper_to_bucket_rate_per_sec", rate);
    detail::core_of(ref_).reconfigure(
        detail::bounded_now_ns(now), true, [&](detail::LimiterParams& p) {
            p.rate_infinite = rate.is_infinite();
            p.rate_per_sec = rate.is_infinite() ? 0.0 : rate.value() + 0.0;
            p.drip =
                rate.is_infinite() ? detail::DripRate{} : detail::DripRate::from_rate(rate.value());
        });
}

// ---------------------------------------------------------------------------------------------
// Facades' job operations: Jane Street's Throttled_rate_limiter.try_start_job
// ---------------------------------------------------------------------------------------------

namespace {

// What try_start_job answers after a take that did not start the job: `now` is read (if the
// caller gave none) only here, off the hot path.
StartJob not_started(const Limiter& limiter, TryTake taken, TimePoint now) {
    if (taken == TryTake::asked_for_more_than_bucket_size) {
        // Not for a facade's own configuration (burst >= 1); a Limiter handle may have shrunk
        // the bucket below one token since.
        return StartJob::max_concurrent_jobs_running();
    }
    const Availability when = limiter.tokens_may_be_available_when(now, 1.0);
    if (when.kind() == Availability::Kind::at) return StartJob::unable_until_at_least(when.time());
    return StartJob::max_concurrent_jobs_running();
}

}  // namespace

StartJob JobLimiterFacade::try_start_job(TimePoint now) {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    const TryTake taken = detail::take_units(ref, detail::bounded_now_ns(now), kTokenResolution);
    if (taken == TryTake::taken) [[likely]]
        return StartJob::start();
    return not_started(limiter_, taken, now);
}

StartJob JobLimiterFacade::try_start_job() {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    const TryTake taken = detail::take_units(ref, detail::kClockUnread, kTokenResolution);
    if (taken == TryTake::taken) [[likely]]
        return StartJob::start();
    return not_started(limiter_, taken, Clock::now());
}

void JobLimiterFacade::finish_job(TimePoint now) {
    detail::return_units(detail::LimiterAccess::ref(limiter_), detail::bounded_now_ns(now), 1.0,
                         kTokenResolution);
}

void JobLimiterFacade::finish_job() {
    detail::return_units(detail::LimiterAccess::ref(limiter_), detail::kClockUnread, 1.0,
                         kTokenResolution);
}

HandOff JobLimiterFacade::hand_off_jobs(std::int64_t n) {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    if (n < 1 || n > 1'000'000'000) {
        throw Error(
            Errc::invalid_argument,
            fmt::format("{}: hand_off_jobs({}): the count must be 1..1e9", detail::where(ref), n));
    }
    return detail::hand_off_units(*ref.state, ref.index, /*layer=*/0,
                                  static_cast<std::uint64_t>(n * kTokenResolution), "limiter",
                                  ref.key());
}

bool JobLimiterFacade::receive(const HandOff& h) {
    const detail::RecordRef& ref = detail::LimiterAccess::ref(limiter_);
    return detail::receive_units(*ref.state, ref.index, /*layer=*/0, h, "limiter", ref.key());
}

std::int64_t JobLimiterFacade::max_concurrent_jobs() const noexcept {
    return std::llround(limiter_.token_target_level().value_or(0.0));
}

void Limiter::invariant() const {
    const detail::LimiterReading r =
        detail::core_of(ref_).read(std::numeric_limits<std::int64_t>::min());
    const detail::LimiterParams& p = r.params;
    const auto fail = [&](const std::string& what) {
        throw Error(Errc::corrupt_segment, fmt::format("{}: {}", detail::where(ref_), what));
    };
    if (p.bucket_size <= 0 || p.bucket_size > detail::kMaxTokenUnits) {
        fail(fmt::format("bucket_size ({} units) must be > 0 and at most 1e9 tokens",
                         p.bucket_size));
    }
    if (!p.target_infinite && (p.target < 0 || p.target > detail::kMaxTokenUnits)) {
        fail(fmt::format("token_target_level ({} units) must be 0..1e9 tokens", p.target));
    }
    if (!p.rate_infinite) {
        if (!(p.rate_per_sec >= 0) || p.rate_per_sec > detail::kMaxRatePerSec) {
            fail(fmt::format("hopper_to_bucket_rate_per_sec ({}) must be 0..1e9", p.rate_per_sec));
        }
        const detail::DripRate expected = detail::DripRate::from_rate(p.rate_per_sec);
        if (expected.m != p.drip.m || expected.shift != p.drip.shift ||
            expected.per_sec_whole != p.drip.per_sec_whole ||
            expected.per_sec_rest != p.drip.per_sec_rest) {
            fail("the drip rate does not match hopper_to_bucket_rate_per_sec");
        }
    }
    if (r.in_flight < 0 || r.in_flight > detail::kMaxInFlight) {
        fail(fmt::format("in_flight ({} units) is out of range", r.in_flight));
    }
    if (r.in_bucket < 0 || r.in_bucket > p.bucket_size) {
        fail(fmt::format("in_bucket ({} units) must be within 0..bucket_size ({} units)",
                         r.in_bucket, p.bucket_size));
    }
    if (!p.target_infinite) {
        if (r.in_hopper < 0) fail(fmt::format("in_hopper ({} units) must be >= 0", r.in_hopper));
        const std::int64_t in_system = r.in_hopper + r.in_bucket + r.in_flight;
        if (in_system > p.target && (r.in_hopper != 0 || r.in_bucket != 0)) {
            fail(fmt::format(
                "in_system ({} units) exceeds token_target_level ({} units) while the hopper "
                "({}) or the bucket ({}) is not empty",
                in_system, p.target, r.in_hopper, r.in_bucket));
        }
        if (in_system < p.target) {
            fail(fmt::format("in_system ({} units) is below token_target_level ({} units)",
                             in_system, p.target));
        }
    }
}

}  // namespace lim
