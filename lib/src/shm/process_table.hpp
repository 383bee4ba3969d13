// The process table: which threads of which processes hold something from the segment's
// limiters, and (in each slot's ledger) exactly what.
//
// A *holder* is one thread of one process attached through one mapping. It owns one slot; only
// its own thread writes the slot's `pending` word and ledger row, so those writes are plain
// stores rather than read-modify-writes. A thread finds its slot through a small thread-local
// cache, keyed by the mapping's uid and the process's fork generation: the first use after a
// fork() misses the cache and registers the child's own slot, with no getpid() on the hot path.
#pragma once

#include <atomic>
#include <cstdint>
#include <string_view>

#include "lim/hand_off.hpp"
#include "shm/layout.hpp"
#include "shm/process_identity.hpp"
#include "shm/segment_state.hpp"

namespace lim::detail {

struct Holder {
    std::uint32_t slot_index = 0;
    // Claimed for one holding operation only, by a thread whose thread-local slot registry is
    // already destroyed (a Permit released by a thread_local or static destructor): ~Hold gives
    // the slot back (release_ephemeral). Fits in the padding after slot_index.
    bool ephemeral = false;
    SlotHeader* slot = nullptr;
    LedgerEntry* row = nullptr;  // row[record_index] is what this holder holds in that record

    LedgerEntry& entry(std::uint32_t record_index) const noexcept { return row[record_index]; }
};

// Keyed by the mapping's uid alone: the fork hook's child handler empties the cache of the one
// thread a forked child has (forget_cached_holders), so no entry survives into a child, and the
// hot path needs no fork-generation load and compare.
struct HolderCacheEntry {
    std::uint64_t uid;
    Holder holder;
};

// Trivially constructible, so access needs no thread-local initialisation guard; initial-exec, so
// that in the shared library the access is an offset from the thread pointer rather than a call
// to __tls_get_addr on every holding operation (160 bytes of static TLS, well within what glibc
// sets aside for libraries loaded with dlopen).
inline constexpr int kHolderCacheSize = 4;
inline constinit thread_local HolderCacheEntry tl_holder_cache[kHolderCacheSize]
    __attribute__((tls_model("initial-exec"))) = {};

// Slow path of holder(): finds this thread's slot in `state` again (after a cache eviction) or
// claims a new one. Throws Error(table_full) when every slot is taken.
Holder register_holder(SegmentState& state);

// The calling thread's slot in `state`, claiming one on first use (and on first use in a forked
// child, whose cache the fork hook emptied). Hot path: a compare of the mapping's uid over at
// most four cache entries (uids start at 1, so an empty entry never matches).
// The reference is to the thread's cache (or, for an ephemeral holder, a thread-local copy):
// valid until the thread's next holder lookup; copy what you need at once.
const Holder& register_cached_holder(SegmentState& state);
inline const Holder& cached_holder(SegmentState& state) {
    const std::uint64_t uid = state.uid();
    for (const HolderCacheEntry& e : tl_holder_cache) {
        if (e.uid == uid) [[likely]]
            return e.holder;
    }
    return register_cached_holder(state);
}
inline Holder holder(SegmentState& state) {
    return cached_holder(state);
}

// The calling thread's slot in the mapping whose uid is `uid` (SegmentState::uid) if its cache
// holds it (never an ephemeral one: those are not cached), else nullptr. Claims nothing, calls
// nothing. The first entry is tested on its own: a thread that uses one segment finds it there
// without the loop's setup.
inline const Holder* find_cached_holder(std::uint64_t uid) noexcept {
    if (tl_holder_cache[0].uid == uid) [[likely]]
        return &tl_holder_cache[0].holder;
    for (int i = 1; i < kHolderCacheSize; ++i) {
        if (tl_holder_cache[i].uid == uid) return &tl_holder_cache[i].holder;
    }
    return nullptr;
}
inline const Holder* find_cached_holder(const SegmentState& state) noexcept {
    return find_cached_holder(state.uid());
}

// Empties the calling thread's holder cache. Called by the fork hook's child handler (async-
// signal-safe: plain stores), in the child's only thread, before the child runs anything else.
void forget_cached_holders() noexcept;

// Frees (or, if its ledger still records holdings, retires) every slot that this process claimed
// through the mapping `state`, then closes the mapping's slot-lock description, which drops the
// locks of the retired ones (nothing can release what they hold any more: a reap gives it back).
// Called when the mapping goes away.
void release_slots_of_mapping(SegmentState& state) noexcept;

// Gives back an ephemeral holder's slot after its one operation (free if empty, else retired).
void release_ephemeral(SegmentState& state, const Holder& h) noexcept;
void release_ephemeral(SegmentState& state, SlotHeader& slot) noexcept;

// What this process holds in `record`'s `layer`, summed over every slot it holds locked in this
// mapping (all its threads, retired slots included). Takes the private-registry mutex: a rare
// path, for Hold::require_held when the calling thread's own entry is short.
std::int64_t process_holding(SegmentState& state, std::uint32_t record, int layer);

// Hand-off of a holding between processes (docs/design.md, "Hand-off between processes").
// hand_off_holding moves `n` units of `layer` in `record` from this process's holdings into a new
// *parcel* slot, locked by this process, and returns its ticket: send it to the receiver by any
// means. receive_holding moves a parcel's units into the calling thread's ledger; false if there
// is no such parcel any more (taken already, or its giver died: then a reap returns the units).
// Both take the recovery lock (a rare path; blocks while a reap or reset runs), so no recount
// sees a half-moved holding. The record's shared words never change. hand_off_holding throws
// Error(over_release) if this process holds fewer than `n`, Error(table_full) if no slot is free.
using HandOff = lim::HandOff;
HandOff hand_off_holding(SegmentState& state, std::uint32_t record, int layer, std::int64_t n);
bool receive_holding(SegmentState& state, const HandOff& h);

// The public hand_off/receive of a record whose units a process owns, with their checks:
// hand_off_units refuses n == 0 or n >= 2^62 (invalid_argument), and a process holding fewer
// than `n` (over_release, naming the record as `what` and `key`); receive_units refuses a
// HandOff of another record or layer (invalid_argument).
HandOff hand_off_units(SegmentState& state, std::uint32_t record, int layer, std::uint64_t n,
                       std::string_view what, std::string_view key);
bool receive_units(SegmentState& state, std::uint32_t record, int layer, const HandOff& h,
                   std::string_view what, std::string_view key);

// Every state but `free` (including state bytes no version of lim writes) is occupied.
constexpr bool slot_is_occupied(std::uint64_t owner) noexcept {
    return SlotOwner::state(owner) != SlotState::free;
}

// One slot as judged now: its owner word, and whether that owner is dead. `dead` is true only
// when the slot is occupied, its lock byte is held by no description, and the owner word was the
// same before and after the lock was tested. Any failure to test (an fcntl error of any kind)
// counts as alive: no failed check reclaims anything.
struct SlotJudgement {
    std::uint64_t owner;
    bool dead;
};
std::vector<SlotJudgement> judge_slots(const SegmentState& state);

// The same for one slot (limctl's views).
bool slot_owner_alive(const SegmentState& state, std::uint32_t index, std::uint64_t owner);

// Distinct processes (by recorded pid) with an occupied slot whose owner is not dead.
std::uint32_t count_live_processes(const SegmentState& state);

// True when slot `slot_index` records no holdings in any record and no operation in progress.
bool slot_is_empty(const SegmentState& state, std::uint32_t slot_index) noexcept;

}  // namespace lim::detail
