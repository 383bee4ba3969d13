// lim/hand_off.hpp: a holding on its way from one process to another.
//
// Units a process acquires are that process's to release: its ledger records them, so that a
// reap gives back exactly what a dead process held. For "a dispatcher acquires, a worker process
// finishes", the acquirer hands the units off (Semaphore::hand_off, WeightedSemaphore::hand_off,
// Throttle/ThrottledRateLimiter::hand_off_jobs), sends the HandOff it gets to the worker by any
// means, and the worker receives it (the same type's receive) and later releases the units as
// its own. Until received, the units sit in a *parcel* that belongs to the giver's process: if
// the giver dies first, the next reap gives them back and receive returns false; once received,
// they are the receiver's, and its death returns them. A parcel is received at most once.
// See docs/guide.md ("Handing a holding to another process") and docs/design.md.
#pragma once

#include <cstdint>
#include <type_traits>

namespace lim {

// A ticket for one parcel. Trivially copyable and free of pointers: write its bytes to a pipe or
// a socket, or put it in shared memory, and read them back in the receiving process (which must
// have opened the same segment). It names its limiter, so receiving it through a handle of
// another limiter is refused. Copying it does not copy the units: the first receive wins.
struct HandOff {
    std::uint32_t slot = 0;    // the parcel's slot in the segment's process table
    std::uint32_t record = 0;  // the limiter's record in the segment
    std::uint64_t owner = 0;   // the parcel slot's owner word when offered (pid and generation)
    std::int64_t amount = 0;   // as recorded in the ledger (a limiter's in fixed-point units)
    std::int32_t layer = 0;    // the ledger layer the units belong to
    std::uint32_t reserved = 0;
};
static_assert(std::is_trivially_copyable_v<HandOff>);
static_assert(std::is_standard_layout_v<HandOff>);
static_assert(sizeof(HandOff) == 32);

}  // namespace lim
