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

#include "shm/layout.hpp"
#include "shm/process_identity.hpp"
#include "shm/segment_state.hpp"

namespace lim::detail {

struct Holder {
    std::uint32_t slot_index = 0;
    SlotHeader* slot = nullptr;
    LedgerEntry* row = nullptr;  // row[record_index] is what this holder holds in that record

    LedgerEntry& entry(std::uint32_t record_index) const noexcept { return row[record_index]; }
};

struct HolderCacheEntry {
    std::uint64_t uid;
    std::uint32_t fork_gen;
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
// child). Hot path: a fork-generation load and a compare over at most four cache entries.
inline Holder holder(SegmentState& state) {
    const std::uint32_t gen = fork_generation();
    for (const HolderCacheEntry& e : tl_holder_cache) {
        if (e.uid == state.uid() && e.fork_gen == gen) return e.holder;
    }
    return register_holder(state);
}

// Frees (or, if its ledger still records holdings, retires) every slot that this process claimed
// through the mapping `state`. Called when the mapping goes away.
void release_slots_of_mapping(SegmentState& state) noexcept;

// Distinct processes with a live or retired slot that are not known to be dead.
std::uint32_t count_live_processes(const SegmentState& state);

// True when slot `slot_index` records no holdings in any record and no operation in progress.
bool slot_is_empty(const SegmentState& state, std::uint32_t slot_index) noexcept;

}  // namespace lim::detail
