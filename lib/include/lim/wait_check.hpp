// lim/wait_check.hpp: stopping a blocking acquire from the waiting thread itself, without giving
// up its place while it waits.
//
// A blocking acquire of Semaphore, WeightedSemaphore or Dispatch keeps its registration (its
// sleeper count, its ticket in a byte budget's FIFO queue) for the whole wait. A caller that must
// also react to something else while it waits (a language runtime that has to run its signal
// handlers, a closed handle, a cancellation flag) could wait in short slices instead, but each
// slice that times out withdraws the registration: a queued request leaves the FIFO queue and
// joins it again at the back, and a large one can starve behind a stream of small ones. A
// WaitCheck lets the wait call back instead: the registration stays, and the check decides.
//
//     lim::WaitCheck check(&should_stop, &ctx, std::chrono::milliseconds{50});
//     try {
//         bool ok = budget.acquire_until(n, deadline);   // as usual
//     } catch (const lim::WaitStopped&) {
//         // should_stop returned true: nothing is held, nothing is queued
//     }
#pragma once

#include <cstdint>
#include <exception>

#include "lim/clock.hpp"

namespace lim {

// Thrown out of a blocking acquire (Semaphore, WeightedSemaphore, Dispatch: acquire and
// acquire_until) on a thread with a WaitCheck installed, when the check returned true. Before it
// leaves, the acquire has given back everything it took and withdrawn its registration exactly
// once, as for any exception that leaves a wait: it holds nothing and is in no queue.
class WaitStopped : public std::exception {
  public:
    const char* what() const noexcept override;
};

// While alive, installs a check for the blocking acquires that the constructing thread makes
// (Semaphore, WeightedSemaphore and Dispatch; the Limiter family and BackoffWindow::wait do not
// consult it). Each such acquire, while it waits, calls `should_stop(context)` on this thread:
// before its first sleep, then whenever `interval` has passed since the last call (each sleep is
// cut to end by then), and at once when a signal interrupts a sleep (a futex wait that returns
// EINTR). A call that returns true stops the acquire with WaitStopped. The check is never called
// when the acquire succeeds without sleeping, and never inside the library's own critical steps:
// only where the waiter would sleep, with nothing announced, so it may call lim's non-blocking
// functions (try_acquire, release, ...). It must not make a blocking acquire itself: the thread is
// still registered as a waiter, and its process slot records one wait at a time. A Semaphore,
// WeightedSemaphore or Dispatch acquire, or a Limiter-family take or start_job, made there that
// would have to wait throws Error(invalid_argument) before it registers (one whose units are free
// at once takes them). While it runs no check is installed on
// the thread (no wait calls it again from inside itself). It must not
// throw (an exception from it propagates out of the acquire, which then cleans up as above, but
// C callers cannot throw). If it forks, the child's copy of the wait ends with WaitStopped
// whatever the check returned, leaving the parent's registration (still waiting) untouched; the
// child holds nothing and may wait again. A fork() made outside the check (the check installed
// before it) changes nothing: the child's copy of the check serves the child's waits. Installs
// nest: the innermost one is consulted; its destructor reinstates the previous one. Construct and
// destroy on the same thread, innermost first. `interval` below 1 ms is raised to 1 ms;
// Duration::max() means: check before the first sleep and on signals only.
class WaitCheck {
  public:
    using Fn = bool (*)(void* context);
    WaitCheck(Fn should_stop, void* context, Duration interval) noexcept;
    ~WaitCheck();
    WaitCheck(const WaitCheck&) = delete;
    WaitCheck& operator=(const WaitCheck&) = delete;

    // The check installed on the calling thread, or nullptr.
    static WaitCheck* current() noexcept;

    // For the library's waits: the longest the next sleep may last (zero: check first), and the
    // call after a sleep (`interrupted`: a signal cut it short). Both throw WaitStopped when the
    // check says stop.
    Duration before_sleep();
    void after_sleep(bool interrupted);

  private:
    void run(TimePoint now);

    Fn fn_;
    void* context_;
    Duration interval_;
    TimePoint next_;  // when the check is due next
    WaitCheck* previous_;
};

}  // namespace lim
