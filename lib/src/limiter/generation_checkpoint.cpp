#include "limiter/generation_checkpoint.hpp"

#include <chrono>
#include <thread>

#include "shm/process_table.hpp"
#include "shm/segment_state.hpp"
#include "sync/heavy_fence.hpp"
#include "sync/poll_pause.hpp"

namespace lim::detail {

bool generation_may_advance(const SegmentState& state, std::uint32_t record, std::uint32_t next_gen,
                            std::chrono::milliseconds wait) noexcept {
    if (!is_generation_checkpoint(next_gen)) return true;
    // The announcing side stores `pending` and loads S with no fence between. After this fence, a
    // thread whose load of S came before the last switch's CAS (so read an older generation) has
    // its announcement visible to the loads below: either it is still in that operation and the
    // scan sees it, or the scan reads a later value of its `pending` (the operation has ended).
    if (!heavy_fence()) {
        // membarrier(2) refused (an old kernel, a seccomp policy, a kernel booted with nohz_full).
        // Then the announcement is visible once the announcing CPU's store buffer has drained,
        // which hardware does in well under a microsecond; a millisecond is a bound on hardware,
        // not on scheduling (a thread stopped or descheduled has been through a context switch,
        // which drains it).
        std::this_thread::sleep_for(std::chrono::milliseconds{1});
    }
    // From after the fence, and never longer than `wait` whatever the caller's own deadline:
    // the config lock is held meanwhile.
    const TimePoint until = Clock::now() + wait;
    const std::uint32_t announced = record + 1;
    const std::uint32_t announced_take = announced | kBucketTakeTag;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        for (int pass = 0;; ++pass) {
            const std::uint64_t owner = slot.owner.load(std::memory_order_acquire);
            if (!slot_is_occupied(owner)) break;
            // Seen out (acquire: its CAS, if it made one, is then before ours in S's order), or
            // in an operation on another record.
            if (const std::uint32_t p = slot.pending.load(std::memory_order_acquire);
                p != announced && p != announced_take) {
                break;
            }
            if (Clock::now() >= until) {
                // A dead owner never makes its CAS; a live one stopped mid-operation may, once
                // continued. Doubt means alive.
                bool alive = true;
                try {
                    alive = slot_owner_alive(state, i, owner);
                } catch (...) {
                }
                if (alive) return false;
                break;
            }
            poll_pause(pass);
        }
    }
    return true;
}

}  // namespace lim::detail
