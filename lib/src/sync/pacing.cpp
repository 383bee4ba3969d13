#include "sync/pacing.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "lim/error.hpp"
#include "lim/wait_check.hpp"
#include "shm/process_identity.hpp"
#include "sync/futex.hpp"

namespace lim {
namespace {

// The innermost WaitCheck of this thread. A plain pointer set and read by its own thread only.
// After fork() the child runs on a copy of the forking thread, whose checks (objects on its
// stack) were copied with it: still valid there.
thread_local WaitCheck* current_check = nullptr;

// Whether this thread runs a callback now; detail::g_wait_check_callbacks counts them in the
// process (see detail::inside_wait_check). The count only spares other threads' waits the
// thread-local lookup; a stale read of it is harmless (zero is read only where no callback of this
// thread runs, since the thread's own increment precedes its nested wait).
thread_local bool in_callback = false;

}  // namespace

const char* WaitStopped::what() const noexcept {
    return "lim: a WaitCheck stopped the wait";
}

WaitCheck::WaitCheck(Fn should_stop, void* context, Duration interval) noexcept
    : fn_(should_stop),
      context_(context),
      interval_(std::max<Duration>(interval, std::chrono::milliseconds{1})),
      // Due at once: a stop that came before the wait is seen before it sleeps.
      next_(Clock::now()),
      previous_(current_check) {
    current_check = this;
}

WaitCheck::~WaitCheck() {
    current_check = previous_;
}

WaitCheck* WaitCheck::current() noexcept {
    return current_check;
}

namespace {

// now + interval, saturated: an interval of Duration::max() (a C caller's INT64_MAX) must mean
// "never again", not wrap into the past and make every pass of the wait call the check.
TimePoint due_after(TimePoint now, Duration interval) noexcept {
    if (interval > TimePoint::max() - now) return TimePoint::max();
    return now + interval;
}

}  // namespace

void WaitCheck::run(TimePoint now) {
    next_ = due_after(now, interval_);
    if (fn_ == nullptr) return;
    // While the caller's function runs, this thread's waits consult no check: a blocking acquire
    // made inside it (the contract forbids one, but a C caller or a runtime's handler may make
    // it) must not call this check again from within itself (a Python generator re-entered
    // raises, and a check that always blocks would recurse without end). Restored on every
    // way out.
    struct Suspend {
        WaitCheck* saved = current_check;
        bool was_in_callback = in_callback;
        Suspend() noexcept {
            current_check = nullptr;
            in_callback = true;
            detail::g_wait_check_callbacks.fetch_add(1, std::memory_order_relaxed);
        }
        ~Suspend() {
            detail::g_wait_check_callbacks.fetch_sub(1, std::memory_order_relaxed);
            in_callback = was_in_callback;
            current_check = saved;
        }
        Suspend(const Suspend&) = delete;
        Suspend& operator=(const Suspend&) = delete;
    };
    // A check that forked (a Python signal handler may) returns twice: in the child, this
    // thread's copy is inside a wait whose registration is the parent's. It must not go on
    // waiting on it (an admission would dequeue the parent's ticket a second time), so it
    // leaves; the waiters' guards see the fork generation change and leave the parent's
    // registration alone. The child's caller may then wait again on its own slot. Only a fork
    // made during this call counts: a check installed before a fork() (a server that forks its
    // workers under it) is the child's own, and its waits go on as usual.
    const std::uint32_t generation = detail::fork_generation();
    bool stop = false;
    {
        const Suspend suspend;
        stop = fn_(context_);
    }
    if (stop || generation != detail::fork_generation()) throw WaitStopped{};
}

Duration WaitCheck::before_sleep() {
    TimePoint now = Clock::now();
    if (now >= next_) {
        run(now);
        now = Clock::now();  // the check may have taken a while (a runtime's lock, say)
        next_ = due_after(now, interval_);
    }
    return next_ - now;
}

void WaitCheck::after_sleep(bool interrupted) {
    if (interrupted) run(Clock::now());
}

}  // namespace lim

namespace lim::detail {

bool this_thread_in_wait_check() noexcept {
    return in_callback;
}

void refuse_wait_inside_check(const char* what) {
    throw Error(Errc::invalid_argument,
                std::string(what) +
                    ": a blocking acquire that would wait, made inside a WaitCheck's callback "
                    "(lim/wait_check.hpp), is refused: this thread is registered as the waiter of "
                    "the wait that called it");
}

namespace {

// splitmix64: a per-thread generator for jitter. Quality matters little; independence between
// threads and processes does, hence the seed from thread id and time.
std::uint64_t next_random() noexcept {
    thread_local std::uint64_t state = 0;
    if (state == 0) {
        state = static_cast<std::uint64_t>(to_nanos(Clock::now())) ^
                (static_cast<std::uint64_t>(this_thread_id()) << 32) ^ 0x9E3779B97F4A7C15ULL;
    }
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double unit_random() noexcept {
    return static_cast<double>(next_random() >> 11) * 0x1.0p-53;  // [0, 1)
}

}  // namespace

Duration Pacing::interval(int attempt) const noexcept {
    const auto cap = static_cast<double>(max.count());
    double d = static_cast<double>(base.count()) * std::ldexp(1.0, std::min(attempt, 62));
    d = std::min(d, cap);
    if (jitter > 0) d *= 1.0 - jitter + unit_random() * jitter;
    d = std::clamp(d, 0.0, cap);
    return Duration{static_cast<Duration::rep>(d)};
}

void Pacing::pause(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                   std::optional<TimePoint> deadline, int attempt, std::uint32_t bitset) const {
    Duration d = interval(attempt);
    if (deadline) {
        const Duration left = *deadline - now();
        if (left <= Duration::zero()) return;
        d = std::min(d, left);
    }
    // A caller's check (lim/wait_check.hpp) runs here, where the waiter holds no Hold: before
    // the sleep when it is due, and each sleep ends by the next time it is due. It may throw
    // WaitStopped; every caller owns its registration through a scope guard, so that withdraws
    // it exactly once, as for an exception from an injected sleep.
    WaitCheck* const check = WaitCheck::current();
    if (check != nullptr) d = std::min(d, check->before_sleep());
    if (sleep && *sleep) {
        (*sleep)(d);
        return;
    }
    // The futex takes an absolute CLOCK_MONOTONIC deadline; the pacing's own clock may be
    // injected, so only the length of the wait carries over.
    const FutexResult r = futex_wait(word, expected, Clock::now() + d, bitset);
    if (check != nullptr) check->after_sleep(r == FutexResult::interrupted);
}

}  // namespace lim::detail
