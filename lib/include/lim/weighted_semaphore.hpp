// lim/weighted_semaphore.hpp: a byte budget shared by every process attached to a segment.
//
// `capacity` units (bytes, typically); acquire(n) takes n of them, release(n) gives them back.
// Unlike Semaphore, admission is first come, first served: a request that cannot be served at
// once joins a queue that lives in the segment, and only the request at the head of the queue may
// take units. A newcomer never takes units while anyone is queued, even when its own amount
// would fit, so a large request is not starved by a stream of small ones (Go's
// semaphore.Weighted argues the same). A release wakes only the head of the queue.
//
// The budget is strict: units in use never exceed the capacity. (Foundation's weighted semaphore
// admits while any budget is left and may overshoot; lim's does not.)
//
// An amount larger than the whole capacity could never be served; instead of deadlocking, it is
// clamped to the capacity, on acquire and on release alike, so that acquire(n) followed by
// release(n) always balances.
//
// Handles are cheap to copy, usable from any thread and, after fork(), from the child. What each
// thread holds is recorded in its process slot's ledger, and a queued request names its slot, so
// crash recovery can give back what a dead process held and drop its place in the queue.
//
// Caveats
// - The queue holds 128 requests at once. Further blocked requests poll (every millisecond, or
//   faster when woken) until there is room; they still never take units ahead of the queue, but
//   among themselves they are not ordered.
// - A process that dies while it is at the head of the queue stalls the queue until its death is
//   noticed and recovered (reap).
#pragma once

#include <cstdint>
#include <exception>
#include <string_view>

#include "lim/clock.hpp"
#include "lim/detail/record_ref.hpp"
#include "lim/error.hpp"
#include "lim/hand_off.hpp"
#include "lim/segment.hpp"

namespace lim {

struct WeightedSemaphoreOptions {
    // Units available in all. 1..2^46.
    std::uint64_t capacity = 1;
};

class WeightedSemaphore {
  public:
    // Opens the weighted semaphore `key` in `segment`, creating it with `options` if it does not
    // exist. Throws Error: invalid_name (bad key), invalid_argument (capacity out of range),
    // config_mismatch (the key exists with another capacity), table_full.
    static WeightedSemaphore open(const Segment& segment, std::string_view key,
                                  const WeightedSemaphoreOptions& options);
    // As above, but if the key exists with another capacity, attaches with the stored one.
    static WeightedSemaphore open(const Segment& segment, std::string_view key,
                                  const WeightedSemaphoreOptions& options, AdoptExisting);

    // Takes `n` units (clamped to the capacity) if nobody is queued and they are free now.
    // Never blocks. n == 0 succeeds at once and takes nothing. Throws only Error(table_full)
    // when this thread has no process slot and none is free (then it holds nothing).
    // Memory ordering: a successful acquire happens-after the release that freed the units, in
    // whichever process it ran.
    bool try_acquire(std::uint64_t n = 1);

    // Takes `n` units (clamped to the capacity), queueing behind every earlier blocked request
    // and sleeping on a shared futex until it is this request's turn and the units are free.
    // Throws only Error(table_full), as try_acquire, and WaitStopped when a lim::WaitCheck
    // installed on this thread says stop (lim/wait_check.hpp; it keeps its queue place until
    // then), and Error(invalid_argument) where it would have to queue when called inside a
    // WaitCheck's callback. Whatever exception leaves it, it holds nothing and has left the queue.
    void acquire(std::uint64_t n = 1);

    // As acquire, but gives up when `deadline` passes: then leaves the queue (passing its turn
    // on if it had it), holds nothing, and returns false. Throws as acquire.
    bool acquire_until(std::uint64_t n, TimePoint deadline);

    // Gives back `n` units (clamped to the capacity) and wakes the head of the queue. Any thread
    // of the acquiring process may release units another of its threads acquired; another
    // process gets Error(over_release) when it holds fewer than `n` units itself (hand them off
    // instead: hand_off, receive). Throws
    // Error(over_release) also if fewer than `n` units are in use (and then releases nothing).
    // Memory ordering: everything before the release happens-before the acquire that takes the
    // units.
    void release(std::uint64_t n = 1);

    // Hands `n` of the units this process holds to another process, exactly as
    // Semaphore::hand_off (lim/hand_off.hpp): they stay in use, in a parcel owned by this
    // process until received; a reap gives them back if this process dies first. Blocks only
    // briefly, on the segment's recovery lock; if it stays held for over 3 s (a reaper stopped
    // holding it), throws Error(busy). Throws Error(invalid_argument) if n == 0,
    // Error(over_release) if this process holds fewer than `n` units, Error(table_full) if no
    // slot is free for the parcel; either way nothing changes.
    // Memory ordering: everything before the hand-off happens-before a receive that takes it.
    HandOff hand_off(std::uint64_t n);

    // Receives a parcel this semaphore's hand_off made, in any process: the calling process now
    // holds its units. Returns false, changing nothing, if the parcel is gone (received
    // already, or its giver died). Throws Error(invalid_argument) if `h` was made by another
    // limiter, Error(table_full) if this thread has no process slot and none is free,
    // Error(busy) as hand_off (nothing received; the parcel stays for a later receive).
    // Memory ordering: a successful receive happens-after the hand-off.
    bool receive(const HandOff& h);

    // Units in use now, and the fixed capacity.
    std::uint64_t in_use() const noexcept;
    std::uint64_t capacity() const noexcept;
    // Requests queued now, in all processes (including timed-out ones the turn has not yet
    // passed over).
    std::uint32_t waiters() const noexcept;

    std::string_view key() const noexcept { return ref_.key(); }

  private:
    explicit WeightedSemaphore(detail::RecordRef ref) : ref_(std::move(ref)) {}
    detail::RecordRef ref_;
};

// Holds `n` units of a WeightedSemaphore for its lifetime, like std::lock_guard.
class WeightedSemaphoreGuard {
  public:
    // Blocks until the units are acquired.
    explicit WeightedSemaphoreGuard(WeightedSemaphore& semaphore, std::uint64_t n)
        : sem_(&semaphore), n_(n) {
        sem_->acquire(n_);
    }
    // Releases the units. Never throws: Error(over_release), which says this process no longer
    // holds them (a forced Segment::reset forgot them, or this is a copy inherited across fork()),
    // is swallowed, since there is nothing to give back; any other error terminates, as
    // a throwing destructor did before (std::terminate, the exception printed).
    ~WeightedSemaphoreGuard() {
        if (!sem_) return;
        try {
            sem_->release(n_);
        } catch (const Error& e) {
            if (e.code() != Errc::over_release) std::terminate();
        }
    }
    WeightedSemaphoreGuard(WeightedSemaphoreGuard&& other) noexcept
        : sem_(other.sem_), n_(other.n_) {
        other.sem_ = nullptr;
    }
    WeightedSemaphoreGuard(const WeightedSemaphoreGuard&) = delete;
    WeightedSemaphoreGuard& operator=(const WeightedSemaphoreGuard&) = delete;
    WeightedSemaphoreGuard& operator=(WeightedSemaphoreGuard&&) = delete;

  private:
    WeightedSemaphore* sem_;
    std::uint64_t n_;
};

}  // namespace lim
