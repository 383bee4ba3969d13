// A wake channel in the segment: how a process that changed a record's state wakes the processes
// sleeping until that state changes, without a system call when nobody sleeps.
//
// Waiter, on any thread of any process:
//
//     WaitRegistration reg(channel);           // waiters += 1 (seq_cst), then snapshot seq
//     while (!condition()) {                   // condition reads the state with seq_cst loads
//         reg.wait(bounded_deadline);          // sleeps while seq == snapshot
//     }                                        // ~WaitRegistration: waiters -= 1
//
// Waker, after changing the state with a seq_cst read-modify-write:
//
//     wake_all(channel);                       // if waiters != 0: seq += 1, FUTEX_WAKE all
//
// Why no wake is lost: the waker's state change precedes its load of `waiters`, and the waiter's
// increment of `waiters` precedes its check of the state, all four in the single seq_cst order.
// So either the waker sees the waiter registered (and bumps `seq`, which the waiter's futex wait
// compares against its snapshot), or the waiter's check sees the new state. On x86 this costs
// nothing extra: a seq_cst RMW is the same `lock cmpxchg` as an acq_rel one, and a seq_cst load
// is a plain load.
//
// Waits should still be bounded (re-check every so often): a waker killed between its state change
// and its wake never wakes anyone.
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <optional>

#include "lim/clock.hpp"
#include "shm/layout.hpp"
#include "sync/futex.hpp"

namespace lim::detail {

struct alignas(kCacheLine) WakeChannel {
    std::atomic<std::uint32_t> seq;      // the futex word; bumped by every wake with waiters
    std::atomic<std::uint32_t> waiters;  // threads registered (between prepare and finish)
    std::uint32_t reserved[14];
};
static_assert(sizeof(WakeChannel) == kCacheLine);

class WaitRegistration {
  public:
    explicit WaitRegistration(WakeChannel& channel) noexcept : channel_(channel) {
        channel_.waiters.fetch_add(1, std::memory_order_seq_cst);
        snapshot_ = channel_.seq.load(std::memory_order_seq_cst);
    }
    ~WaitRegistration() { channel_.waiters.fetch_sub(1, std::memory_order_seq_cst); }
    WaitRegistration(const WaitRegistration&) = delete;
    WaitRegistration& operator=(const WaitRegistration&) = delete;

    // Sleeps until a wake after the last snapshot, or `deadline`. Returns at once if a wake
    // already happened since. Takes a new snapshot before returning, so the caller re-checks its
    // condition and may call wait() again.
    FutexResult wait(std::optional<TimePoint> deadline) noexcept {
        const FutexResult r = futex_wait(channel_.seq, snapshot_, deadline);
        snapshot_ = channel_.seq.load(std::memory_order_seq_cst);
        return r;
    }

  private:
    WakeChannel& channel_;
    std::uint32_t snapshot_ = 0;
};

// Wakes every thread registered on `channel`, in every process. A load and nothing more when
// nobody is registered.
inline void wake_all(WakeChannel& channel) noexcept {
    if (channel.waiters.load(std::memory_order_seq_cst) == 0) return;
    channel.seq.fetch_add(1, std::memory_order_seq_cst);
    futex_wake(channel.seq, INT_MAX);
}

}  // namespace lim::detail
