#include "shm/ledger.hpp"

#include <chrono>
#include <thread>

#include <fmt/format.h>

#include "lim/error.hpp"
#include "shm/file_lock.hpp"
#include "shm/records.hpp"

namespace lim::detail {

void Hold::step_aside(SlotHeader& slot, std::uint32_t record, std::atomic<std::uint64_t>& word,
                      const SegmentState& state) noexcept {
    slot.pending.store(0, std::memory_order_release);
    // A recount takes microseconds: spin briefly, then sleep in growing steps.
    auto pause = std::chrono::microseconds{20};
    auto waited = std::chrono::microseconds{0};
    const auto since = std::chrono::steady_clock::now();
    std::uint64_t w = word.load(std::memory_order_acquire);
    for (int spin = 0; is_frozen(w); ++spin, w = word.load(std::memory_order_acquire)) {
        if (spin < 64) {
            std::this_thread::yield();
            continue;
        }
        std::this_thread::sleep_for(pause);
        waited += pause;
        pause = std::min(pause * 2, std::chrono::microseconds{2000});
        if (waited < std::chrono::milliseconds{20}) continue;
        waited = std::chrono::microseconds{0};
        w = word.load(std::memory_order_acquire);
        if (!is_frozen(w)) break;
        if (std::chrono::steady_clock::now() - since >= kFrozenBreakTimeout) {
            // Frozen for longer than any reaper legitimately keeps a word frozen (its frozen
            // quiescence wait and the recount): the reaper is stopped (SIGSTOP, a debugger) or
            // dead. Thaw the word ourselves, keeping its value: a frozen word holds its
            // pre-recount value, which is valid, and the reaper's own recount store is a CAS from
            // the frozen value, so it finds the word thawed and abandons the record instead of
            // overwriting what live holders do from now on (docs/design.md, "The recount").
            LIM_RACE_POINT();
            word.compare_exchange_strong(w, w & ~kFrozen, std::memory_order_acq_rel,
                                         std::memory_order_acquire);
            continue;  // thawed by us or by someone else; or refrozen value: re-check
        }
        // Frozen for long: the reaper may have died mid-recount. Holding the recovery lock
        // ourselves proves no reaper is at work, and then the frozen value (the word as it was
        // before the recount began) is valid to thaw.
        try {
            if (auto lock = FileLock::try_lock_fresh(state.fd(), LockByte::recovery)) {
                word.fetch_and(~kFrozen, std::memory_order_acq_rel);
            }
        } catch (...) {
            // Cannot check now; keep waiting and try again later.
        }
    }
    slot.pending.store(record + 1, std::memory_order_release);
    std::atomic_signal_fence(std::memory_order_seq_cst);  // as in Hold's constructor
}

namespace {

// Whether this process holds `n` units of `layer` in `record`, once any reset running now has
// ended. A forced reset clears the ledgers before it stores the words; if a holder broke its
// freeze meanwhile (the resetter stopped past kFrozenBreakTimeout), the word is thawed but not
// reset, and a reset then refused gives the cleared entries back (docs/design.md, "Reset"). So a
// sum short of `n` seen while the recovery lock is held may be that window: the answer waits for
// the lock (kLockWaitTimeout at most), with the announcement withdrawn, as when stepping aside (a
// reset's quiescence wait must not see this slot pending: it would refuse the record and leave
// this slot's entry cleared), and is then read again. False also if the sum cannot be read.
bool holds_settled(SegmentState& state, SlotHeader& slot, std::uint32_t record, int layer,
                   std::uint64_t n) noexcept {
    try {
        if (process_holding(state, record, layer) >= static_cast<std::int64_t>(n)) return true;
        if (!FileLock::is_locked(state.fd(), LockByte::recovery)) return false;
        slot.pending.store(0, std::memory_order_release);
        try {
            (void)FileLock::lock_until(state.fd(), LockByte::recovery,
                                       Clock::now() + kLockWaitTimeout);
        } catch (...) {
        }
        slot.pending.store(record + 1, std::memory_order_release);
        std::atomic_signal_fence(std::memory_order_seq_cst);  // as in Hold's constructor
        LIM_RACE_POINT();
        return process_holding(state, record, layer) >= static_cast<std::int64_t>(n);
    } catch (...) {
        return false;
    }
}

}  // namespace

bool Hold::holds_slow(SegmentState& state, SlotHeader& slot, std::uint32_t record, int layer,
                      std::uint64_t n) noexcept {
    if (!holds_settled(state, slot, record, layer, n)) return false;
    state.note_owing(record, layer);  // as require_held_slow
    return true;
}

void Hold::require_held_slow(SegmentState& state, SlotHeader& slot, std::uint32_t record, int layer,
                             std::uint64_t n, const char* what) {
    if (holds_settled(state, slot, record, layer, n)) {
        // The release may leave this thread's own entry negative: from now on another thread's
        // entry no longer proves what the process holds (SegmentState::may_owe).
        state.note_owing(record, layer);
        return;
    }
    const std::int64_t mine = process_holding(state, record, layer);
    throw Error(
        Errc::over_release,
        fmt::format("{} '{}': release({}) but this process holds {} of its units; units "
                    "acquired by another process can only be released by that process "
                    "(hand them over with hand_off and receive, let the acquirer release "
                    "them when the worker reports back, or have the worker acquire its own)",
                    what, record_key(state.record(record)), n, std::max<std::int64_t>(mine, 0)));
}

}  // namespace lim::detail
