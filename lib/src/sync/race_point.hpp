// Scheduling points that widen race windows in a test build.
//
// Crash recovery and the lock-free families are correct only if every interleaving of their steps
// is: a reaper freezing a word between a holder's CAS and its ledger store, two raises of a
// limiter's time crossing, a sleeper registering while a recount runs. On a quiet machine such
// windows are a few nanoseconds wide and a test hits them by luck. Built with
// -DLIM_RACE_WIDEN=ON, every LIM_RACE_POINT() between two steps of the ledger protocol or of a CAS
// loop yields the processor or spins for a short random time, so the multi-process and chaos
// tests reach those interleavings in seconds.
//
// In a normal build the macro expands to nothing: the hot path pays nothing for it.
#pragma once

#ifdef LIM_RACE_WIDEN

namespace lim::detail {
// Yields (about one call in four) or busy-waits for a random 0..~2 µs. Thread-local state only:
// no syscall but sched_yield, no allocation, safe in a forked child and in a signal-free path.
void race_point() noexcept;
}  // namespace lim::detail

#define LIM_RACE_POINT() ::lim::detail::race_point()

#else

#define LIM_RACE_POINT() static_cast<void>(0)

#endif
