#include "shm/process_table.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "lim/error.hpp"

namespace lim::detail {
namespace {

// Every slot this thread claimed, so that thread exit can give them back and a cache miss can
// find a slot again instead of claiming a second one. Not on the hot path.
struct ThreadSlots {
    struct Entry {
        std::weak_ptr<SegmentState> state;
        std::uint64_t uid;
        std::uint32_t fork_gen;
        std::uint64_t owner;  // the slot's owner word when we claimed it
        Holder holder;
    };
    std::vector<Entry> entries;
    int next_victim = 0;

    ~ThreadSlots();
};

thread_local ThreadSlots tl_slots;

std::int64_t wall_now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

Holder make_holder(const SegmentState& state, std::uint32_t index) {
    Holder h;
    h.slot_index = index;
    h.slot = &state.slot(index);
    h.row = &state.ledger(index, 0);
    return h;
}

void cache_insert(const SegmentState& state, const Holder& h) {
    HolderCacheEntry& e = tl_holder_cache[tl_slots.next_victim];
    tl_slots.next_victim = (tl_slots.next_victim + 1) % kHolderCacheSize;
    e.uid = state.uid();
    e.fork_gen = fork_generation();
    e.holder = h;
}

// Gives a slot back: free if its ledger is empty, else retired (its holdings stay the process's,
// and a later thread of the process may adopt it). `owner` is the owner word we expect; if the
// slot changed hands meanwhile (a reset reclaimed it), it is left alone.
void release_slot(const SegmentState& state, std::uint32_t index, std::uint64_t owner) noexcept {
    SlotHeader& slot = state.slot(index);
    const std::uint32_t pid = SlotOwner::pid(owner);
    const std::uint32_t gen = SlotOwner::generation(owner);
    if (slot_is_empty(state, index)) {
        // Fold this slot's admission counts into the records, so totals outlive the slot.
        const std::uint32_t used = state.records_used();
        for (std::uint32_t r = 0; r < used; ++r) {
            LedgerEntry& e = state.ledger(index, r);
            const std::uint64_t n = e.admitted.load(std::memory_order_relaxed);
            if (n == 0) continue;
            state.record(r).header.admitted_retired.fetch_add(n, std::memory_order_relaxed);
            e.admitted.store(0, std::memory_order_relaxed);
        }
        slot.tid.store(0, std::memory_order_relaxed);
        slot.attach_uid.store(0, std::memory_order_relaxed);
        slot.owner.compare_exchange_strong(owner, SlotOwner::make(0, gen, SlotState::free),
                                           std::memory_order_release, std::memory_order_relaxed);
    } else {
        slot.tid.store(0, std::memory_order_relaxed);
        slot.owner.compare_exchange_strong(owner, SlotOwner::make(pid, gen, SlotState::retired),
                                           std::memory_order_release, std::memory_order_relaxed);
    }
}

ThreadSlots::~ThreadSlots() {
    const std::uint32_t gen = fork_generation();
    for (Entry& e : entries) {
        if (e.fork_gen != gen) continue;  // the parent's slots, inherited across fork
        if (auto state = e.state.lock()) release_slot(*state, e.holder.slot_index, e.owner);
    }
}

// Claims a slot for the calling thread: first a retired slot of this same process (its ledger is
// the process's anyway), else a free one. The search starts at a place derived from the thread
// id so that threads attaching together do not all fight over slot 0.
std::pair<Holder, std::uint64_t> claim_slot(SegmentState& state) {
    const ProcessIdentity& self = this_process();
    const auto pid = static_cast<std::uint32_t>(self.pid);
    const pid_t tid = this_thread_id();
    const std::uint32_t n = state.geometry().max_processes;

    for (std::uint32_t i = 0; i < n; ++i) {
        SlotHeader& slot = state.slot(i);
        std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        if (SlotOwner::state(w) != SlotState::retired || SlotOwner::pid(w) != pid) continue;
        if (slot.start_time.load(std::memory_order_relaxed) != self.start_time) continue;
        const std::uint64_t mine = SlotOwner::make(pid, SlotOwner::generation(w), SlotState::live);
        if (slot.owner.compare_exchange_strong(w, mine, std::memory_order_acq_rel)) {
            slot.tid.store(tid, std::memory_order_relaxed);
            slot.attach_uid.store(state.uid(), std::memory_order_relaxed);
            return {make_holder(state, i), mine};
        }
    }

    const std::uint32_t start = static_cast<std::uint32_t>(tid) * 2654435761u % n;
    for (std::uint32_t k = 0; k < n; ++k) {
        const std::uint32_t i = (start + k) % n;
        SlotHeader& slot = state.slot(i);
        std::uint64_t w = slot.owner.load(std::memory_order_relaxed);
        if (SlotOwner::state(w) != SlotState::free) continue;
        const std::uint32_t gen = SlotOwner::generation(w) + 1;
        if (!slot.owner.compare_exchange_strong(w, SlotOwner::make(pid, gen, SlotState::claiming),
                                                std::memory_order_acq_rel)) {
            continue;
        }
        slot.tid.store(tid, std::memory_order_relaxed);
        slot.start_time.store(self.start_time, std::memory_order_relaxed);
        slot.pidns_inode.store(self.pidns_inode, std::memory_order_relaxed);
        slot.attached_wall_ns.store(wall_now_ns(), std::memory_order_relaxed);
        slot.attach_uid.store(state.uid(), std::memory_order_relaxed);
        slot.pending.store(0, std::memory_order_relaxed);
        const std::uint64_t mine = SlotOwner::make(pid, gen, SlotState::live);
        slot.owner.store(mine, std::memory_order_release);
        return {make_holder(state, i), mine};
    }
    throw Error(Errc::table_full,
                fmt::format("the process table of segment '{}' is full ({} slots, one per thread "
                            "that holds permits): create the segment with a larger "
                            "max_processes, or reap dead processes (limctl reap {})",
                            state.name(), n, state.name()));
}

}  // namespace

Holder register_holder(SegmentState& state) {
    const std::uint32_t gen = fork_generation();
    auto& entries = tl_slots.entries;
    std::erase_if(entries, [&](const ThreadSlots::Entry& e) {
        return e.fork_gen != gen || e.state.expired();
    });
    for (const ThreadSlots::Entry& e : entries) {
        if (e.uid != state.uid()) continue;
        if (state.slot(e.holder.slot_index).owner.load(std::memory_order_acquire) == e.owner) {
            cache_insert(state, e.holder);
            return e.holder;
        }
    }
    const auto [h, owner] = claim_slot(state);
    entries.push_back({state.weak_from_this(), state.uid(), gen, owner, h});
    cache_insert(state, h);
    return h;
}

void release_slots_of_mapping(SegmentState& state) noexcept {
    std::uint32_t pid = 0;
    try {
        pid = static_cast<std::uint32_t>(this_process().pid);
    } catch (...) {
        return;  // cannot tell which slots are ours; a reaper will find them once we exit
    }
    const std::uint32_t n = state.geometry().max_processes;
    for (std::uint32_t i = 0; i < n; ++i) {
        SlotHeader& slot = state.slot(i);
        const std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        if (SlotOwner::state(w) != SlotState::live || SlotOwner::pid(w) != pid) continue;
        if (slot.attach_uid.load(std::memory_order_relaxed) != state.uid()) continue;
        release_slot(state, i, w);
    }
}

bool slot_is_empty(const SegmentState& state, std::uint32_t slot_index) noexcept {
    if (state.slot(slot_index).pending.load(std::memory_order_acquire) != 0) return false;
    const std::uint32_t used = state.records_used();
    for (std::uint32_t r = 0; r < used; ++r) {
        const LedgerEntry& e = state.ledger(slot_index, r);
        for (const auto& held : e.held) {
            if (held.load(std::memory_order_relaxed) != 0) return false;
        }
    }
    return true;
}

std::uint32_t count_live_processes(const SegmentState& state) {
    std::vector<std::uint32_t> seen;
    const std::uint32_t n = state.geometry().max_processes;
    std::uint32_t live = 0;
    for (std::uint32_t i = 0; i < n; ++i) {
        const SlotHeader& slot = state.slot(i);
        const std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        const SlotState st = SlotOwner::state(w);
        if (st != SlotState::live && st != SlotState::retired) continue;
        const std::uint32_t pid = SlotOwner::pid(w);
        if (std::find(seen.begin(), seen.end(), pid) != seen.end()) continue;
        seen.push_back(pid);
        if (check_alive(static_cast<pid_t>(pid), slot.start_time.load(std::memory_order_relaxed),
                        slot.pidns_inode.load(std::memory_order_relaxed)) != Liveness::dead) {
            ++live;
        }
    }
    return live;
}

}  // namespace lim::detail
