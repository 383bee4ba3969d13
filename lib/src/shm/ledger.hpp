// The ledger protocol every holding operation follows, so that crash recovery can give back
// exactly what a dead process held (docs/design.md, "Crash recovery").
//
// A holding operation is anything that changes what a holder holds in a record: acquire,
// release, try_take, return_to_hopper. Each one, on the calling thread:
//
//   1. announces itself: `Hold hold(state, record)` stores record + 1 in the slot's `pending`;
//   2. changes the record's shared word(s) with CAS loops. A CAS that acquires or releases must
//      expect kFrozen to be clear; when it finds it set, it calls hold.wait_while_frozen(word)
//      and retries. (Undoing the operation's *own* earlier change, such as a take that found too
//      few tokens giving back its tentative in-flight increment, may proceed on a frozen word:
//      the reaper waits for this operation to finish before it recounts.)
//   3. after each successful CAS, records the change in its own ledger entry with hold.add();
//   4. leaves: ~Hold stores 0 in `pending` (release).
//
// A reaper that recounts a record sets kFrozen on its words (so no new acquisition or release can
// land), waits until no live slot has the record pending (so every live ledger is exact), sets
// each word to the sum of the live ledgers, and clears kFrozen. Whatever a dead process held, or
// was half-way through changing, is thereby given back exactly.
//
// Cost on the hot path: three plain stores to the thread's own cache line and one to its ledger
// entry. QuickHold (below) is the same protocol in the form the uncontended entry points use.
// `pending` must not stay set while a thread sleeps: blocking calls leave the Hold before they wait
// and take a new one after.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "shm/layout.hpp"
#include "shm/process_table.hpp"
#include "shm/segment_state.hpp"
#include "sync/race_point.hpp"

namespace lim::detail {

// The top bit of every word a reaper may recount. Values the words carry stay below 2^62.
inline constexpr std::uint64_t kFrozen = 1ULL << 63;

// How long a holder waits aside on a frozen word before it thaws the word itself: longer than a
// reaper legitimately keeps a word frozen (the reaper's kFrozenQuiesceTimeout, 50 ms, plus the
// recount's microseconds), so only a reaper stopped or dead inside that window is overruled. Its
// recount's stores are CASes from the frozen value, so it then abandons the record
// (docs/design.md, "The recount").
inline constexpr std::chrono::milliseconds kFrozenBreakTimeout{200};

constexpr bool is_frozen(std::uint64_t word) noexcept {
    return (word & kFrozen) != 0;
}

class Hold {
  public:
    // Announces a holding operation on `record` by the calling thread (claiming the thread's
    // slot on first use; throws Error(table_full) if there is none to claim). The thread's ledger
    // entry for the record is located here, once, for every add() and held() of the operation.
    // Nothing of the Hold's own address leaves it (the out-of-line steps below take its fields
    // by value), so an inlined Hold lives in registers.
    Hold(SegmentState& state, std::uint32_t record) : state_(state), record_(record) {
        const Holder& h = cached_holder(state);
        slot_ = h.slot;
        entry_ = &h.entry(record);
        ephemeral_ = h.ephemeral;
        // Release: a generation checkpoint that reads it has this thread's earlier operations
        // (their CASes) before its own. The compiler keeps the store before the operation's
        // loads; the hardware's order is what a reaper's CAS on a frozen word, or a generation
        // checkpoint's heavy fence, pairs with (generation_checkpoint.hpp).
        slot_->pending.store(record + 1, std::memory_order_release);
        std::atomic_signal_fence(std::memory_order_seq_cst);
        LIM_RACE_POINT();
    }
    ~Hold() {
        LIM_RACE_POINT();
        slot_->pending.store(0, std::memory_order_release);
        // A slot claimed for this one operation by a thread already past its slot registry's
        // destruction (process_table.hpp, Holder::ephemeral): give it back now.
        if (ephemeral_) [[unlikely]]
            release_ephemeral(state_, *slot_);
    }
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

    // Adds `delta` to this holder's `held[layer]` for the record. Single writer: a plain store.
    void add(int layer, std::int64_t delta) noexcept {
        LIM_RACE_POINT();
        auto& held = entry_->held[layer];
        held.store(held.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
    }

    // Counts one successful acquisition (for rates and Prometheus totals).
    void admitted() noexcept {
        auto& n = entry_->admitted;
        n.store(n.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    }

    // Refuses a release of `n` units of `layer` that this process does not hold: throws
    // Error(over_release), naming the record as `what` (its kind, e.g. "semaphore") and its key.
    // Every release path of a family whose units a process owns calls it once, inside its Hold and
    // before its CAS, so that units acquired by one process are never released by another: the
    // acquirer's ledger would keep +n and the releaser's get -n, and the first of the two to die
    // would have the next reap undo the wrong half (capacity lost while the acquirer lives, or
    // doubled). Fast path: the calling thread's own ledger entry holds at least `n` (a plain load
    // and a compare). Otherwise (another thread of this process acquired them) it sums the ledger
    // entries of every slot this process holds in this mapping, under a process-local mutex.
    // Two threads of one process racing to release the same units can both pass the check;
    // the shared word's own in-use check still refuses the second when nothing is left.
    void require_held(int layer, std::uint64_t n, const char* what) const {
        if (covers(layer, n)) [[likely]]
            return;
        require_held_slow(state_, *slot_, record_, layer, n, what);
    }

    // require_held's fast check: this thread's own entry shows `n` units and no thread of the
    // process has released units its own entry did not show (SegmentState::may_owe), so the
    // process holds at least `n`. False: the process-wide check decides.
    bool covers(int layer, std::uint64_t n) const noexcept {
        return held(layer) >= static_cast<std::int64_t>(n) && !state_.may_owe(record_, layer);
    }

    // Whether this process still holds `n` units of `layer`: require_held's check, answered
    // instead of thrown. Every release loop makes it again before each CAS: the check made when
    // the operation began holds only while the operation stays announced, and a loop that steps
    // aside from a frozen word withdraws its announcement, so a forced reset may forget the
    // units meanwhile (docs/design.md, "Reset": a release waiting aside across a reset). False
    // also when the process-wide check cannot run (its mutex failing): the release then gives
    // back nothing rather than perhaps someone else's units. A process-wide sum short of `n`
    // while a reset holds the recovery lock is checked again once it has ended (holds_slow).
    bool still_holds(int layer, std::uint64_t n) const noexcept {
        if (covers(layer, n)) [[likely]]
            return true;
        return holds_slow(state_, *slot_, record_, layer, n);
    }

    // What this holder holds in the record now (holding(): what it added less what a reset forgot).
    std::int64_t held(int layer) const noexcept { return holding(*entry_, layer); }

    // Steps aside while a reaper recounts: withdraws the announcement, waits until `word` is no
    // longer frozen, announces again. If the reaper died mid-recount (its recovery lock is free
    // while the word stays frozen), thaws the word itself: a frozen word still holds its
    // pre-recount value, which is valid. If the word stays frozen past kFrozenBreakTimeout (the
    // reaper is stopped), thaws it with a CAS from the frozen value seen, whoever holds the lock.
    void wait_while_frozen(std::atomic<std::uint64_t>& word, const SegmentState& state) noexcept {
        step_aside(*slot_, record_, word, state);
    }

    // The first step of every CAS loop that acquires or releases: if `w` (the word's value as
    // last loaded) is frozen, waits aside as wait_while_frozen does, reloads `w`, and returns
    // true (the caller retries from the top); otherwise returns false at once.
    bool stepped_aside(std::uint64_t& w, std::atomic<std::uint64_t>& word,
                       const SegmentState& state) noexcept {
        if (!is_frozen(w)) [[likely]]
            return false;
        wait_while_frozen(word, state);
        w = word.load(std::memory_order_relaxed);
        return true;
    }

    std::uint32_t record() const noexcept { return record_; }
    // The calling thread's slot, and its index in the process table.
    SlotHeader& slot() const noexcept { return *slot_; }
    std::uint32_t slot_index() const noexcept { return state_.slot_index_of(*slot_); }

  private:
    // wait_while_frozen's and require_held's out-of-line parts, given the fields they need.
    static void step_aside(SlotHeader& slot, std::uint32_t record, std::atomic<std::uint64_t>& word,
                           const SegmentState& state) noexcept;
    static void require_held_slow(SegmentState& state, SlotHeader& slot, std::uint32_t record,
                                  int layer, std::uint64_t n, const char* what);
    static bool holds_slow(SegmentState& state, SlotHeader& slot, std::uint32_t record, int layer,
                           std::uint64_t n) noexcept;

    SegmentState& state_;
    SlotHeader* slot_;
    LedgerEntry* entry_;  // this holder's ledger entry for record_
    std::uint32_t record_;
    bool ephemeral_;
};

// The same protocol in the form the uncontended entry points use (Semaphore, Dispatch), which
// hand every unusual case to their general path (built on Hold):
//
//   1. open() announces exactly as Hold does (`pending` := record + 1, relaxed), but only when the
//      calling thread's slot is in its cache (a cached slot is never ephemeral); otherwise it
//      announces nothing and returns false;
//   2. the caller's CAS loop expects kFrozen clear, as with Hold; on a frozen word, a refusal or
//      anything else unusual it calls close() and takes its general path, having changed
//      nothing (the general path's Hold then steps aside, refuses or claims a slot as usual);
//   3. after its CAS it records the change (add/set/admitted: plain stores to its own entry);
//   4. close() withdraws (`pending` := 0, release), as ~Hold.
//
// Nothing here calls a function or throws, and the object's address is never taken, so an entry
// point built on it needs no stack frame (and no callee-saved register) on its common path.
class QuickHold {
  public:
    bool open(const SegmentState& state, std::uint32_t record) noexcept {
        return open(state.uid(), record);
    }
    // The same with the mapping's uid (SegmentState::uid) given, for a caller that keeps it.
    bool open(std::uint64_t mapping_uid, std::uint32_t record) noexcept {
        // The cache's first entry read field by field (thread-pointer-relative loads, no
        // address computed), the others through find_cached_holder.
        const HolderCacheEntry& first = tl_holder_cache[0];
        if (first.uid == mapping_uid) [[likely]] {
            slot_ = first.holder.slot;
            entry_ = first.holder.row + record;
        } else {
            const Holder* h = find_cached_holder(mapping_uid);
            if (h == nullptr) [[unlikely]]
                return false;
            slot_ = h->slot;
            entry_ = &h->entry(record);
        }
        slot_->pending.store(record + 1, std::memory_order_relaxed);
        std::atomic_signal_fence(std::memory_order_seq_cst);  // as in Hold's constructor
        LIM_RACE_POINT();
        return true;
    }
    void close() noexcept {
        LIM_RACE_POINT();
        slot_->pending.store(0, std::memory_order_release);
    }
    // What this holder holds in the record now (holding()).
    std::int64_t held(int layer) const noexcept { return holding(*entry_, layer); }
    // The entry's own word, `held[layer]`, and what the holder holds given it (holding()): for
    // a caller that checks the holding and then stores the word it read, changed (set_raw), with
    // one load of each word.
    std::int64_t raw(int layer) const noexcept {
        return entry_->held[layer].load(std::memory_order_relaxed);
    }
    std::int64_t held_given(int layer, std::int64_t raw) const noexcept {
        return static_cast<std::int64_t>(
            static_cast<std::uint64_t>(raw) -
            static_cast<std::uint64_t>(entry_->forgotten[layer].load(std::memory_order_relaxed)));
    }
    // Stores `held[layer]`: the caller passes what it read with raw() and the change, since the
    // calling thread is the word's only writer and nothing in between can have changed it.
    void set_raw(int layer, std::int64_t value) noexcept {
        LIM_RACE_POINT();
        entry_->held[layer].store(value, std::memory_order_relaxed);
    }
    // Adds `delta` to `held[layer]`. Single writer: a plain store.
    void add(int layer, std::int64_t delta) noexcept {
        LIM_RACE_POINT();
        auto& held = entry_->held[layer];
        held.store(held.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
    }
    void admitted() noexcept {
        auto& n = entry_->admitted;
        n.store(n.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    }

  private:
    SlotHeader* slot_ = nullptr;
    LedgerEntry* entry_ = nullptr;
};

}  // namespace lim::detail
