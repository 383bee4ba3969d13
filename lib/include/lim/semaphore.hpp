// lim/semaphore.hpp: a counting semaphore shared by every process attached to a segment.
//
// `capacity` units; acquire takes units, release gives them back. State is one 64-bit word in
// the segment holding the units in use and the counts of sleeping waiters, so acquire and release
// are a single compare-and-swap, and a release makes a system call (FUTEX_WAKE) only when someone
// sleeps, as glibc's sem_t does.
//
// Not FIFO: a newcomer may take units a sleeper was woken for (the sleeper re-checks and sleeps
// again). For a strict first-come-first-served budget, use WeightedSemaphore.
//
// Handles are cheap to copy and safe to use from any thread and, after fork(), from the child.
// What each thread holds is recorded in its process slot's ledger, so if the process dies its
// units are given back by the next reap.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string_view>

#include "lim/clock.hpp"
#include "lim/detail/record_ref.hpp"
#include "lim/error.hpp"
#include "lim/hand_off.hpp"
#include "lim/segment.hpp"

namespace lim {

struct SemaphoreOptions {
    // Units available in all. 1..2^31.
    std::uint64_t capacity = 1;
};

class Semaphore {
  public:
    // Opens the semaphore `key` in `segment`, creating it with `options` if it does not exist.
    // Throws Error: invalid_name (bad key), invalid_argument (capacity out of range),
    // config_mismatch (the key exists with another capacity), table_full.
    static Semaphore open(const Segment& segment, std::string_view key,
                          const SemaphoreOptions& options);
    // As above, but if the key exists with another capacity, attaches with the stored one.
    static Semaphore open(const Segment& segment, std::string_view key,
                          const SemaphoreOptions& options, AdoptExisting);

    // Takes `n` units if that many are free now. Never blocks. n == 0 succeeds at once.
    // Throws Error(invalid_argument) if n > capacity (it could never succeed), and
    // Error(table_full) when this thread has no process slot and none is free; either way it
    // holds nothing.
    // Memory ordering: a successful acquire happens-after the release that freed the units, in
    // whichever process it ran.
    bool try_acquire(std::uint64_t n = 1);

    // Takes `n` units, sleeping on a shared futex until they are free. Throws as try_acquire.
    // Whatever exception leaves it, it holds nothing and no longer counts as a sleeper. With a
    // lim::WaitCheck installed on this thread it also throws WaitStopped when the check says
    // stop (lim/wait_check.hpp); the same holds for acquire_until. Called inside a WaitCheck's
    // callback, where it would have to wait it throws Error(invalid_argument) instead.
    // Before each sleep, a waiter that is the only one registered re-reads the word for up to
    // 2 µs (a unit held briefly by a running process then passes without a context switch);
    // it counts in waiters() from the moment it registers.
    void acquire(std::uint64_t n = 1);

    // Takes `n` units, sleeping until they are free or until `deadline` passes; returns false
    // if the deadline passed first (and then holds nothing). Throws as try_acquire. Waits as
    // acquire does (the short spin included), so it may return up to about 2 µs past the
    // deadline.
    bool acquire_until(std::uint64_t n, TimePoint deadline);

    // Gives back `n` units and wakes sleepers that may now proceed. Any thread of the acquiring
    // process may release units another of its threads acquired; another process may not: it
    // gets Error(over_release) when it holds fewer than `n` units itself (the acquirer's ledger
    // would keep them, and a reap would later undo half of the pair). To let another process
    // release them, hand them off (hand_off, receive). Throws
    // Error(over_release) also if fewer than `n` units are in use (and then releases nothing).
    // Memory ordering: everything before the release happens-before the acquire that takes the
    // units.
    void release(std::uint64_t n = 1);

    // Hands `n` of the units this process holds to another process (lim/hand_off.hpp): this
    // process stops holding them, and they sit in a parcel owned by this process until a
    // receive takes them; send the returned HandOff to the receiver by any means. If this
    // process dies before they are received, the next reap gives them back. The units stay in
    // use throughout (the shared word does not change; nobody else is admitted in between).
    // Blocks only briefly, on the segment's recovery lock, while a reap or reset runs; if the
    // lock stays held for over 3 s (a reaper stopped holding it), throws Error(busy). Throws
    // Error(invalid_argument) if n == 0, Error(over_release) if this process holds fewer than
    // `n` units, Error(table_full) if the process table has no slot free for the parcel;
    // either way nothing changes.
    // Memory ordering: everything before the hand-off happens-before a receive that takes it.
    HandOff hand_off(std::uint64_t n);

    // Receives a parcel this semaphore's hand_off made, in any process: the calling process
    // now holds its units (and releases them as its own, or hands them on). Returns false,
    // changing nothing, if the parcel is gone: received already, or its giver died (a reap
    // gives the units back). Blocks only briefly, as hand_off. Throws Error(invalid_argument)
    // if `h` was made by another limiter, Error(table_full) if this thread has no process slot
    // and none is free, Error(busy) as hand_off (nothing received; the parcel stays).
    // Memory ordering: a successful receive happens-after the hand-off.
    bool receive(const HandOff& h);

    // Units in use now, and the fixed capacity.
    std::uint64_t in_use() const noexcept;
    std::uint64_t capacity() const noexcept;
    // Threads waiting in acquire/acquire_until now (asleep, or spinning before they sleep), in
    // all processes.
    std::uint32_t waiters() const noexcept;

    std::string_view key() const noexcept { return ref_.key(); }

  private:
    explicit Semaphore(detail::RecordRef ref) : ref_(std::move(ref)) {}
    detail::RecordRef ref_;
};

// Holds `n` units of a Semaphore for its lifetime, like std::lock_guard.
class SemaphoreGuard {
  public:
    // Blocks until the units are acquired.
    explicit SemaphoreGuard(Semaphore& semaphore, std::uint64_t n = 1) : sem_(&semaphore), n_(n) {
        sem_->acquire(n_);
    }
    // Releases the units. Never throws: Error(over_release), which says this process no longer
    // holds them (a forced Segment::reset forgot them, or this is a copy inherited across fork()),
    // is swallowed, since there is nothing to give back; any other error terminates, as
    // a throwing destructor did before (std::terminate, the exception printed).
    ~SemaphoreGuard() {
        if (!sem_) return;
        try {
            sem_->release(n_);
        } catch (const Error& e) {
            if (e.code() != Errc::over_release) std::terminate();
        }
    }
    SemaphoreGuard(SemaphoreGuard&& other) noexcept : sem_(other.sem_), n_(other.n_) {
        other.sem_ = nullptr;
    }
    SemaphoreGuard(const SemaphoreGuard&) = delete;
    SemaphoreGuard& operator=(const SemaphoreGuard&) = delete;
    SemaphoreGuard& operator=(SemaphoreGuard&&) = delete;

  private:
    Semaphore* sem_;
    std::uint64_t n_;
};

}  // namespace lim
