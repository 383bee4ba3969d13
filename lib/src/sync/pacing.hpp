// How a blocking acquire paces itself between attempts: which clock it reads, how long it sleeps
// before re-checking on its own when no wake comes, and how it sleeps.
//
// Blocking calls sleep on a shared futex that the releasing process wakes, so they normally
// resume within microseconds of a release. The re-check interval only bounds each sleep, so that
// a waker killed between its release and its wake (or a wake lost to a saturated sleeper count)
// strands nobody. Dispatch takes the interval from its `acquire_backoff` policy (exponential,
// with jitter); Semaphore and WeightedSemaphore use a fixed 100 ms.
//
// Tests inject a clock and a sleep function (DispatchOptions::clock / ::sleep): with a sleep
// function the waiter calls it instead of waiting on the futex, so a test can advance its own
// clock and observe every interval.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>

#include "lim/clock.hpp"

namespace lim::detail {

struct Pacing {
    // Re-check interval for attempt k: min(base * 2^k, max), then scaled by a factor drawn
    // uniformly from [1 - jitter, 1] (Foundation's "factor" jitter), never above max.
    Duration base = std::chrono::milliseconds{100};
    Duration max = std::chrono::milliseconds{100};
    double jitter = 0.0;
    // Null: Clock::now() and a futex wait. Not owned.
    const std::function<TimePoint()>* clock = nullptr;
    const std::function<void(Duration)>* sleep = nullptr;

    TimePoint now() const { return clock && *clock ? (*clock)() : Clock::now(); }

    // The interval before re-check number `attempt` (0-based).
    Duration interval(int attempt) const noexcept;

    // Sleeps for at most interval(attempt) and never past `deadline` (in this pacing's clock):
    // with an injected sleep function, by calling it; otherwise on the futex `word` while it
    // equals `expected`, for waiters whose `bitset` a wake names. Returns at once if the
    // deadline has passed.
    void pause(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
               std::optional<TimePoint> deadline, int attempt,
               std::uint32_t bitset = 0xFFFF'FFFFu) const;
};

// Whether the calling thread is inside a lim::WaitCheck's callback (lim/wait_check.hpp). A
// blocking acquire made there must not register as a waiter: the thread's slot names one wait at
// a time (the outer one, still registered), and the nested wait would overwrite that and clear it
// on leaving, so that a recount would count the outer wait dead. A process-wide count of running
// callbacks is read first, so a process that never runs one pays a relaxed load of a global, no
// thread-local lookup; called only where an acquire is about to register, never on a fast path.
inline std::atomic<std::uint32_t> g_wait_check_callbacks{0};
[[gnu::cold]] bool this_thread_in_wait_check() noexcept;
inline bool inside_wait_check() noexcept {
    return g_wait_check_callbacks.load(std::memory_order_relaxed) != 0 &&
           this_thread_in_wait_check();
}

// Throws Error(invalid_argument) naming `what`: the refusal of a nested blocking acquire.
[[noreturn]] void refuse_wait_inside_check(const char* what);

}  // namespace lim::detail
