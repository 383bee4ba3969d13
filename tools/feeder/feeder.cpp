#include "feeder.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>

#include "lim/consumed_limiter.hpp"
#include "scripts.hpp"
#include "status.hpp"

namespace lim::feeder {
namespace {

constexpr double kUnitsPerToken = 10'000.0;

long long to_units(double tokens) {
    return std::llround(std::max(0.0, tokens) * kUnitsPerToken);
}
double to_tokens(long long units) {
    return static_cast<double>(units) / kUnitsPerToken;
}

double seconds(std::chrono::microseconds d) {
    return static_cast<double>(d.count()) / 1e6;
}

// The local record of a global rate: tokens come only from the target the feeder sets (an
// infinite drip from hopper to bucket, a bucket as big as the burst, nothing at creation).
LimiterConfig local_config(const GlobalRate& g) {
    return LimiterConfig{.hopper_to_bucket_rate_per_sec = infinite,
                         .bucket_size = g.burst_size,
                         .initial_bucket_level = 0,
                         .initial_hopper_level = 0.0};
}

// Sets a BackoffWindow's deadline to exactly `at` (the feeder is its only writer).
void set_status(BackoffWindow& w, TimePoint at, TimePoint now) {
    w.clear();
    w.set(std::max(Duration::zero(), at - now), now);
}

// The record's lease deadline, which its takers enforce (lim/consumed_limiter.hpp). Every record
// the feeder feeds is consumed (it converts a token bucket a worker made, refuses others, at
// start).
void set_deadline(const Limiter& local, std::optional<TimePoint> deadline) {
    if (is_consumed(local)) set_lease_deadline(local, deadline);
}

// in_flight (tokens) at which a tick rebases the record: at most 10^8 tokens, and low enough that
// in_flight plus a lease (at most the burst) stays well within the target's limit of 10^9 tokens.
// (Every tick, for a burst near that limit.)
// Sleeping workers counted in a host's weight, at most (a bound on what is sent to Redis).
constexpr double kMaxSleepers = 1000;

double rebase_threshold(double burst) {
    return std::clamp((1e9 - 2 * burst) / 2, 1.0, 1e8);
}

// Whether a rate starves, in the one sense tick_rate (which doubles its ask) and look (which calls
// early) share: workers sleep on its record (they want more than it holds, however much that is:
// a lease of 1 token never satisfies a take of 10; with `available < 1` alone a take(n > 1) on a
// host holding its 1-token minimum slept forever: global_review R10), takes were refused, or it
// ran dry (under a token left) while being spent.
bool starves(std::uint32_t waiting, double refused, double available, double spent) {
    return waiting > 0 || refused > 0 || (available < 1 && spent > 0);
}

}  // namespace

Feeder::Feeder(Config config)
    : config_(std::move(config)),
      segment_(Segment::open_or_create(config_.segment, SegmentOptions{})),
      // A call waits at most a refresh (500 ms at most) while Redis answers in time, so that one
      // slow call does not delay the next tick; after calls that Redis did not answer in time,
      // up to half a lease's life (a grant that arrives later is of little use).
      redis_(config_.redis, std::min(config_.refresh, std::chrono::microseconds{500'000}),
             config_.lease_ttl / 2) {
    started_ = Clock::now();
    if (const char* stall = std::getenv("LIM_FEEDER_TEST_STALL")) test_stall_ = stall;
    lease_script_ = redis_.add_script(kLeaseScript);
    backoff_script_ = redis_.add_script(kBackoffScript);
    const TimePoint now = Clock::now();
    for (const GlobalRate& g : config_.rates) {
        Rate r{g,
               open_consumed_limiter(segment_, g.key, local_config(g), now),
               BackoffWindow::for_key(segment_, lease_status_key(g.key)),
               BackoffWindow::for_key(segment_, contact_status_key(g.key)),
               std::nullopt,
               0,
               now,
               0,
               1,
               0,
               {"lim:global2:{" + g.key + "}", "lim:global2:{" + g.key + "}:leases",
                "lim:global:{" + g.key + "}:leases"},
               std::nullopt};
        // A record a worker made first (SPEC's TokenBucket::open(..., adopt_existing) creates
        // the key when the feeder has not: boot order) is converted in place into the feeder's,
        // holding nothing: from the conversion on its takers are bound by the lease (what they
        // took before is not; docs/global.md, "The local record"). A general Limiter's (or a
        // Throttle's) takers may give tokens back, so it cannot be converted exactly: refused.
        bool converted = false;
        if (!is_consumed(r.local)) {
            ConsumedConversion c;
            try {
                c = convert_to_consumed(r.local, g.burst_size);
            } catch (const Error& e) {
                if (e.code() != Errc::invalid_argument) throw;
                throw Error(Errc::config_mismatch,
                            fmt::format("'{}' existed before this feeder made it, and cannot carry "
                                        "a global lease ({}): stop the workers, `limctl rm {}`, "
                                        "start the feeder first",
                                        g.key, e.what(), config_.segment));
            }
            converted = c.converted;
            r.settling = !c.settled;
            if (r.settling) {
                fmt::print(stderr,
                           "lim-feeder: '{}': a worker stopped in the middle of a take on it "
                           "(SIGSTOP, a debugger?); nothing is granted to this key until that take "
                           "ends or its process dies\n",
                           g.key);
                std::fflush(stderr);
            }
            if (converted) {
                fmt::print(stderr,
                           "lim-feeder: warning: '{}' was created by a worker as a plain token "
                           "bucket before this feeder made it; converted in place: from now on "
                           "its takers are bound by the global lease. Its live workers had taken "
                           "{:g} tokens locally with no global bound (takes by workers that have "
                           "exited are not known). Start the feeder before the workers (docs/"
                           "global.md, \"Known limits\")\n",
                           g.key, c.bucket_taken + c.in_flight);
                std::fflush(stderr);
            }
        }
        // A record in another shape (a token bucket some worker created first, another burst)
        // is brought into the feeder's: infinite drip, the burst as bucket, a finite target.
        const double in_flight = r.local.in_flight(now);
        if (!r.local.hopper_to_bucket_rate_per_sec().is_infinite()) {
            r.local.set_hopper_to_bucket_rate_per_sec(now, infinite);
        }
        if (r.local.bucket_size() != g.burst_size) r.local.set_bucket_size(now, g.burst_size);
        const InfiniteOrFinite<double> target = r.local.token_target_level();
        const std::optional<TimePoint> until = r.lease_status.until();
        if (!converted && target.is_finite() && until && *until > now) {
            // Reconcile: a previous feeder's lease is still live; keep it until its deadline,
            // which the takers already enforce (the record's own word, if set, is the earlier).
            const std::optional<TimePoint> word = lease_deadline(r.local);
            r.deadline = word ? std::min(*word, *until) : *until;
            if (!word) set_deadline(r.local, r.deadline);
        } else {
            // No live lease: nothing unspent is ours. Lower the target first, then end the
            // lease in the record (its takers refuse from now on).
            r.local.set_token_target_level(now, in_flight);
            set_deadline(r.local, now);
            r.lease_status.clear();
        }
        r.last_in_flight = in_flight;
        // Refusals counted before this feeder started (while none ran, or by a previous one) are
        // not demand over the first tick's interval: dropped.
        (void)take_refused_demand(r.local);
        rates_.push_back(std::move(r));
    }
    for (const GlobalBackoff& g : config_.backoffs) {
        backoffs_.push_back(
            {g, BackoffWindow::for_key(segment_, g.key), {"lim:backoff:{" + g.key + "}"}});
    }
}

// The lease script's `elapsed_us`: this feeder's CLOCK_MONOTONIC time since its previous lease
// call for the key (sent, whether or not Redis ran it: if it did not, the real time since this
// feeder's last call Redis ran is longer, so this is never more than it). Before this process's
// first call, the time since it started: its previous life's last call came before that, so this
// is a lower bound too (0 would be as safe, but a feeder restarting in a loop as the only caller
// would then stop the protocol clock). Records `at` as the last call.
std::string Feeder::elapsed_since_last_call(Rate& r, TimePoint at) const {
    const TimePoint from = r.last_call.value_or(started_);
    r.last_call = at;
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(at - from).count();
    return std::to_string(std::max<long long>(0, us));
}

// The lease script's `seq`: CLOCK_MONOTONIC microseconds when this call was asked. It increases
// from call to call of one instance, across its restarts too (the instance id lives in the lock
// file, in /dev/shm, which a reboot empties along with the clock), so Redis can refuse a call it
// runs after a newer one of the same host (docs/global.md, "A call Redis runs late").
std::string Feeder::call_seq(TimePoint at) {
    return std::to_string(
        std::chrono::duration_cast<std::chrono::microseconds>(at.time_since_epoch()).count());
}

void Feeder::log_redis(bool ok) {
    if (redis_up_ == ok) return;
    redis_up_ = ok;
    if (ok) {
        fmt::print(stderr, "lim-feeder: redis {}:{} answers\n", config_.redis.host,
                   config_.redis.port);
    } else {
        fmt::print(stderr, "lim-feeder: redis {}:{} does not answer ({}); {}\n", config_.redis.host,
                   config_.redis.port, redis_.last_error(),
                   config_.fail_open ? "leases run out, then admitting at the local rate (open)"
                                     : "leases run out, then admitting nothing (closed)");
    }
    std::fflush(stderr);
}

void Feeder::note_failure(const std::string& key, bool& redis_ok) {
    if (!redis_.connected()) {
        // Redis did not answer: skip it for the rest of this tick.
        redis_ok = false;
        log_redis(false);
        return;
    }
    // Redis answered with an error for this key alone (a key of another type, a value a script
    // cannot read): this key's lease runs out as if Redis were down, but the other keys go on
    // (skipping them too would let one broken key starve every global limit of the host).
    std::string line = fmt::format("lim-feeder: '{}': {}\n", key, redis_.last_error());
    if (line == last_key_error_) return;  // said already (once per refresh would flood the log)
    fmt::print(stderr, "{}", line);
    std::fflush(stderr);
    last_key_error_ = std::move(line);
}

void Feeder::set_available(Rate& r, double in_flight, double available) {
    // Only the feeder writes the target. Lowering it below what is in flight by now is harmless:
    // the seed empties hopper and bucket; takes racing it are either already in flight (and
    // counted as spent from the lease) or find nothing.
    r.local.set_token_target_level(Clock::now(), in_flight + std::max(0.0, available));
}

void Feeder::feed_open(Rate& r, double in_flight, double& available, double dt) {
    // on_redis_down = "open": admit at the global rate on this host alone (the bound over all
    // hosts does not hold meanwhile; docs/global.md). No lease, so no deadline: removed before
    // the target rises.
    set_deadline(r.local, std::nullopt);
    available = std::min(r.g.burst_size, available + r.g.sustained_rate_per_sec * dt);
    set_available(r, in_flight, available);
}

void Feeder::note_contact(Rate& r, TimePoint now) {
    set_status(r.contact_status, now + kContactHorizon, now);
}

void Feeder::note_lease(Rate& r) {
    if (r.deadline) {
        set_status(r.lease_status, *r.deadline, Clock::now());
    } else {
        r.lease_status.clear();
    }
}

void Feeder::tick_rate(Rate& r, TimePoint now, bool& redis_ok) {
    // A conversion at start some of whose takers had not left the token bucket's take: a grant
    // now could count a take's tentative tokens as spent that it then takes back out of
    // in_flight (lim::settle_conversion). The record holds nothing meanwhile (target = in_flight,
    // a past deadline): fail-closed.
    if (r.settling) {
        // (Up to 5 ms of looking: busy workers announce a take most of the time, and each slot
        // only has to be seen out of its take once.)
        if (!settle_conversion(r.local, std::chrono::milliseconds{5})) return;
        r.settling = false;
        fmt::print(stderr, "lim-feeder: '{}': the stopped take has ended; feeding it\n", r.g.key);
        std::fflush(stderr);
    }
    double in_flight = r.local.in_flight(now);
    double target = r.local.token_target_level().value_or(in_flight);
    // lim's crash recovery gives a dead worker's tokens back to the hopper; for a global rate
    // they were spent, so take them out again (see docs/global.md, "A worker dies").
    if (in_flight < r.last_in_flight) {
        target = std::max(in_flight, target - (r.last_in_flight - in_flight));
        r.local.set_token_target_level(now, target);
    }
    // A target below in_flight leaves nothing to spend; raised to in_flight (still nothing), so
    // that a grant added to it below is spendable. It is left so by a rebase whose writer was
    // killed between its two steps (the target lowered, in_flight not yet), or by takes that
    // raced a lowering of the target.
    if (target < in_flight) {
        target = in_flight;
        r.local.set_token_target_level(now, target);
    }
    // Takes stay in flight forever; before in_flight nears the target's limit (10^9 tokens),
    // lower both by the same amount: what may be spent, target - in_flight, stays as it is.
    if (in_flight >= rebase_threshold(r.g.burst_size)) {
        const ConsumedRebase rebased = rebase_consumed(r.local);
        r.last_in_flight -= rebased.in_flight_lowered;
        in_flight = r.local.in_flight(now);
        target = r.local.token_target_level().value_or(in_flight);
    }
    double available = std::max(0.0, target - in_flight);
    // The lease ran out (no answer from Redis for lease_ttl): what is unspent is removed.
    // The takers have refused since the deadline (the record carries it); this only tidies up.
    if (r.deadline && now >= *r.deadline) {
        set_available(r, in_flight, 0);
        available = 0;
        r.deadline.reset();
        note_lease(r);
    }
    // Demand: what was spent since the last tick, plus what takes asked for and were refused
    // (too few tokens, or past the lease deadline): a worker polling with try_take(n) on a host
    // holding fewer than n spends nothing and never sleeps, so only its refusals show it
    // (global_review R9). Starving doubles what the lease asks for.
    const double dt = std::max(1e-6, std::chrono::duration<double>(now - r.last_tick).count());
    const double spent = std::max(0.0, in_flight - r.last_in_flight);
    const double refused = take_refused_demand(r.local) + std::exchange(r.refused_seen, 0.0);
    r.demand = 0.5 * r.demand + 0.5 * ((spent + refused) / dt);
    const std::uint32_t waiting = r.local.waiters();
    const bool starved = starves(waiting, refused, available, spent);
    // Workers asleep on the record, smoothed: how many want more than this host holds. It
    // weighs this host's share of the global bucket while every host wants more than there is.
    r.sleepers = 0.5 * r.sleepers + 0.5 * std::min<double>(waiting, kMaxSleepers);
    const double horizon = 4 * seconds(config_.refresh);
    r.desired = std::max({1.0, r.demand * horizon, starved ? 2 * r.desired : 0.0});
    r.desired = std::min(r.desired, r.g.burst_size);
    r.last_tick = now;
    r.last_in_flight = in_flight;

    // What this host holds beyond twice what it needs goes back to the global bucket, removed
    // locally first (so it is never both here and there).
    double returned = 0;
    if (available > 2 * r.desired + 1) {
        returned = available - r.desired;
        available = r.desired;
        set_available(r, in_flight, available);
        // Takes between the read of F and the switch may have eaten beyond `desired` into what
        // is returned: those were spent, so they are not returned (F read again after the switch
        // bounds them from above: under-returning is under-use, never over-use).
        returned -= std::max(0.0, r.local.in_flight(Clock::now()) - in_flight - available);
        returned = std::max(0.0, returned);
    }
    if (!redis_ok) {
        if (config_.fail_open && !r.deadline) feed_open(r, in_flight, available, dt);
        return;
    }
    // The local deadline is taken BEFORE asking: Redis's expiry is later than it in real time.
    const TimePoint asked = Clock::now();
    // A lease whose local deadline has passed by `asked` is over, whatever the tick's `now` said
    // (a stop after it, or slow answers for the rates before this one): Redis may have expired
    // it and given its tokens to another host, and would adopt what we report as held ("no
    // lease known"), which the fresh deadline below would make spendable again. So report
    // nothing held: lowered to F first, as at the deadline above. (If `asked` is before the old
    // deadline, Redis's entry outlives the new deadline `asked + ttl`: see docs/global.md.)
    if (r.deadline && asked >= *r.deadline) {
        set_available(r, in_flight, 0);
        available = 0;
        r.deadline.reset();
        note_lease(r);
    }
    const double want = std::max(0.0, r.desired - available);
    // The deadline of the lease reported as held: an answer that comes at or after it may keep
    // nothing of it (below).
    const std::optional<TimePoint> held_until = r.deadline;
    // Test only (never set in a deployment): stall here, after `asked` and before the call is
    // sent, while the file exists, as a feeder descheduled at this point would.
    if (!test_stall_.empty() && ::access(test_stall_.c_str(), F_OK) == 0) {
        fmt::print(stderr, "lim-feeder: test stall after asking\n");
        std::fflush(stderr);
        while (::access(test_stall_.c_str(), F_OK) == 0)
            std::this_thread::sleep_for(std::chrono::milliseconds{1});
    }
    const auto reply = redis_.eval(
        lease_script_, r.keys,
        {config_.host, std::to_string(to_units(available)), std::to_string(to_units(returned)),
         std::to_string(to_units(want)), std::to_string(config_.lease_ttl.count()),
         std::to_string(to_units(r.g.burst_size)),
         std::to_string(to_units(r.g.sustained_rate_per_sec)),
         std::to_string(config_.lease_ttl.count()),
         std::to_string(std::llround(static_cast<double>(to_units(want)) * (1 + r.sleepers))),
         config_.instance, elapsed_since_last_call(r, asked), call_seq(asked)});
    if (!reply || reply->size() != 3) {
        note_failure(r.g.key, redis_ok);
        if (config_.fail_open && !r.deadline) feed_open(r, in_flight, available, dt);
        return;
    }
    log_redis(true);
    const double keep = to_tokens(std::max(0LL, (*reply)[0]));
    const double granted = to_tokens(std::max(0LL, (*reply)[1]));
    const TimePoint answered = Clock::now();
    // Tokens spent since `in_flight` was read were counted in `available`: they are gone from
    // the target as they are from the lease. Keep what Redis lets us keep, add the grant.
    // A record with no deadline (fed while Redis was down with on_redis_down = "open", or reset)
    // gets a past one first, so that nothing raised below is spendable without one.
    if (is_consumed(r.local) && !lease_deadline(r.local)) set_deadline(r.local, asked);
    // An answer at or after the deadline of the lease reported as held comes after its unspent
    // tokens died (the takers refuse them from that deadline on), and Redis may have run the call
    // after that lease's expiry: it then adopted what was reported ("no lease known"), tokens it
    // no longer counted and may have granted to another host meanwhile. Without a step of
    // Redis's clock the new deadline below has passed by then anyway (that expiry comes ttl +
    // grace after the previous call, and grace = lease_ttl), but a forward step brings the expiry
    // up to `grace` earlier; so only the grant is spendable (what Redis kept is counted as spent
    // at the next call: under-use, once). The reply comes that late only when this feeder was
    // stopped or starved between `asked` and its send (the call itself times out sooner).
    if (held_until && answered >= *held_until) {
        set_available(r, r.local.in_flight(Clock::now()), granted);
    } else if (const double now_available = std::min(available, keep) + granted;
               now_available != available) {
        if (keep < available) {
            set_available(r, in_flight, now_available);
        } else {
            r.local.set_token_target_level(answered,
                                           r.local.token_target_level().value_or(0) + granted);
        }
    }
    // Only now, with the target what Redis counts, the new deadline: the takers enforce it
    // themselves, so no token Redis does not count is ever spendable under it (docs/global.md).
    r.deadline = asked + std::chrono::duration_cast<Duration>(config_.lease_ttl);
    set_deadline(r.local, r.deadline);
    note_lease(r);
    note_contact(r, answered);
}

void Feeder::tick_backoff(Backoff& b, bool& redis_ok) {
    if (!redis_ok) return;
    const TimePoint now = Clock::now();
    const auto local_us =
        std::chrono::duration_cast<std::chrono::microseconds>(b.local.remaining(now));
    const long long tolerance_us = std::max<long long>(5'000, config_.refresh.count() / 10);
    const auto reply = redis_.eval(
        backoff_script_, b.keys,
        {std::to_string(std::max<long long>(0, local_us.count())), std::to_string(tolerance_us)});
    if (!reply || reply->size() != 1) {
        note_failure(b.g.key, redis_ok);
        return;
    }
    log_redis(true);
    const long long shared_us = (*reply)[0];
    const TimePoint after = Clock::now();
    const auto local_now =
        std::chrono::duration_cast<std::chrono::microseconds>(b.local.remaining(after));
    if (shared_us > local_now.count() + tolerance_us) {
        b.local.set(std::chrono::microseconds{shared_us}, after);  // never shortens (a CAS max)
    }
}

void Feeder::tick_rate_or_skip(Rate& r, TimePoint now, bool& redis_ok) {
    try {
        tick_rate(r, now, redis_ok);
    } catch (const Error& e) {
        if (e.code() != Errc::busy) throw;
        // A lock of the segment stayed held by a stopped or slow process (a configuration
        // writer, a reaper): skip this rate for this tick. Safe at any step: a grant Redis made
        // that is not applied here is under-use until the next call reports what the host
        // holds, and the deadline left in the record is the previous lease's (fail-closed).
        std::string line =
            fmt::format("lim-feeder: '{}': {}; skipped this tick\n", r.g.key, e.what());
        if (line == last_key_error_) return;
        fmt::print(stderr, "{}", line);
        std::fflush(stderr);
        last_key_error_ = std::move(line);
    }
}

void Feeder::tick() {
    bool redis_ok = true;
    const TimePoint now = Clock::now();
    for (Rate& r : rates_)
        tick_rate_or_skip(r, now, redis_ok);
    for (Backoff& b : backoffs_)
        tick_backoff(b, redis_ok);
}

// Whether a rate starves now (starves(), as its lease call would judge it), from its record alone
// (no Redis). The refusals read here are kept for that rate's next lease call.
bool Feeder::starving(Rate& r, TimePoint now) {
    r.refused_seen += take_refused_demand(r.local);
    const double in_flight = r.local.in_flight(now);
    const double target = r.local.token_target_level().value_or(in_flight);
    return starves(r.local.waiters(), r.refused_seen, std::max(0.0, target - in_flight),
                   std::max(0.0, in_flight - r.last_in_flight));
}

// A refresh's refill is capped by the leases that stood during it (docs/global.md, protocol step
// 2), so a host that spends each grant as it lands is granted at most about burst / (2 x the time
// between its lease calls) a second. A starving rate therefore calls as soon as the next quarter
// of a refresh: through tick_rate, as a tick does, so its demand (per second over the shorter
// interval), returns, deadline (`asked + lease_ttl`), `seq` and `elapsed` (the time since this
// call's predecessor) are those of any call. At most one lease call per rate per quarter, hence
// at most 4 per rate per refresh; none while Redis is down (a tick retries every refresh).
void Feeder::look() {
    if (redis_up_ != true) return;
    bool redis_ok = true;
    const TimePoint now = Clock::now();
    for (Rate& r : rates_) {
        if (!r.settling && starving(r, now)) tick_rate_or_skip(r, now, redis_ok);
    }
}

void Feeder::give_back() {
    for (Rate& r : rates_) {
        const TimePoint now = Clock::now();
        const double in_flight = r.local.in_flight(now);
        const double available =
            std::max(0.0, r.local.token_target_level().value_or(in_flight) - in_flight);
        set_available(r, in_flight, 0);
        set_deadline(r.local, Clock::now());  // after the target: let the lease go
        // What was taken between the read of F and the switch was spent, not returned.
        const double spent = std::max(0.0, r.local.in_flight(Clock::now()) - in_flight);
        const double returned = std::max(0.0, available - spent);
        r.deadline.reset();
        note_lease(r);
        redis_.eval(
            lease_script_, r.keys,
            {config_.host, "0", std::to_string(to_units(returned)), "0",
             std::to_string(config_.lease_ttl.count()), std::to_string(to_units(r.g.burst_size)),
             std::to_string(to_units(r.g.sustained_rate_per_sec)),
             std::to_string(config_.lease_ttl.count()), "0", config_.instance,
             elapsed_since_last_call(r, now), call_seq(now)});
    }
}

void Feeder::run(const std::atomic<bool>& stop) {
    // Wakes every quarter of a refresh (a late wake is not made up for: at most 4 a refresh):
    // one in four ticks, the others look for starving rates.
    const auto quarter = config_.refresh / 4;
    auto next = std::chrono::steady_clock::now();
    for (unsigned wake = 0; !stop.load(std::memory_order_relaxed); ++wake) {
        if (wake % 4 == 0) {
            tick();
        } else {
            look();
        }
        next += quarter;
        const auto now = std::chrono::steady_clock::now();
        if (next < now) next = now;
        std::this_thread::sleep_until(next);
    }
    give_back();
}

}  // namespace lim::feeder
