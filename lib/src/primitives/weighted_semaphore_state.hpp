// The WeightedSemaphore's state in its record: a 64-bit word and a FIFO queue of tickets.
//
// Word:
//   bits  0..46  units in use (strictly <= capacity)
//   bits 47..61  requests queued: tickets handed out and not yet dequeued (cancelled ones
//                included until the turn passes over them)
//   bit  63      kFrozen (crash recovery is recounting)
//
// Keeping the queue length in the same word as the units lets one compare-and-swap decide "take
// now, nobody is queued" against "join the queue", so that a newcomer can never take units while
// anyone is queued (no jumping the queue, as Go's semaphore.Weighted), and lets release learn in
// the same CAS whether to wake anyone: an uncontended release makes no system call.
//
// Queue (docs/design.md ("The Dispatch family"), "The FIFO queue"):
//   tail  the next ticket to hand out (fetch_add)
//   head  the ticket whose turn it is: only its owner may take units through the queue
//   seq   the futex word every queued waiter sleeps on, each with the bit (ticket % 32) as its
//         FUTEX_WAIT_BITSET mask; bumped before every wake, so no wake is lost
//   ring  kRingSize entries; ticket t's entry is ring[t % kRingSize] and names its owner's slot,
//         so that recovery can cancel the tickets of dead processes
// At most kRingSize tickets exist at once (the queued count is checked when one is taken), so
// entries never collide; a request that finds the ring full polls until there is room.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <span>

#include "recovery/kind_ops.hpp"
#include "shm/layout.hpp"
#include "shm/ledger.hpp"
#include "sync/pacing.hpp"

namespace lim::detail {

struct WeightedWord {
    static constexpr std::uint64_t kInUseMask = (1ULL << 47) - 1;
    static constexpr int kQueuedShift = 47;
    static constexpr std::uint64_t kQueuedMax = (1ULL << 15) - 1;
    static constexpr std::uint64_t kQueuedUnit = 1ULL << kQueuedShift;
    // Largest capacity: leaves headroom below the queued field.
    static constexpr std::uint64_t kMaxCapacity = 1ULL << 46;

    static constexpr std::uint64_t in_use(std::uint64_t w) noexcept { return w & kInUseMask; }
    static constexpr std::uint64_t queued(std::uint64_t w) noexcept {
        return (w >> kQueuedShift) & kQueuedMax;
    }
    static constexpr std::uint64_t make(std::uint64_t in_use, std::uint64_t queued) noexcept {
        return in_use | (queued << kQueuedShift);
    }
};

inline constexpr std::uint32_t kRingSize = 128;  // power of two

// A ring entry: 0 when empty, else
//   bits  0..31  the ticket's low 32 bits (its tag: an entry is only ever acted on by tag)
//   bits 32..47  the owner's slot index
//   bits 48..55  RingState
enum class RingState : std::uint8_t { empty = 0, waiting = 1, cancelled = 2 };

struct RingEntry {
    static constexpr std::uint64_t make(std::uint64_t ticket, std::uint32_t slot,
                                        RingState st) noexcept {
        return (ticket & 0xFFFF'FFFFULL) | (static_cast<std::uint64_t>(slot & 0xFFFF) << 32) |
               (static_cast<std::uint64_t>(st) << 48);
    }
    static constexpr std::uint32_t tag(std::uint64_t e) noexcept {
        return static_cast<std::uint32_t>(e & 0xFFFF'FFFFULL);
    }
    static constexpr std::uint32_t slot(std::uint64_t e) noexcept {
        return static_cast<std::uint32_t>((e >> 32) & 0xFFFF);
    }
    static constexpr RingState state(std::uint64_t e) noexcept {
        return static_cast<RingState>((e >> 48) & 0xFF);
    }
    static constexpr bool is(std::uint64_t e, std::uint64_t ticket, RingState st) noexcept {
        return e != 0 && tag(e) == static_cast<std::uint32_t>(ticket) && state(e) == st;
    }
};

struct alignas(kCacheLine) WeightedQueue {
    // One line for the queue's control words: they are touched only when someone queues.
    std::atomic<std::uint64_t> tail;
    std::atomic<std::uint64_t> head;
    std::atomic<std::uint32_t> seq;
    std::uint32_t reserved0;
    std::uint64_t reserved1[5];
    alignas(kCacheLine) std::atomic<std::uint64_t> ring[kRingSize];
};
static_assert(sizeof(WeightedQueue) == kCacheLine + kRingSize * 8);

// The part of a record body a weighted layer needs: its word on its own line, then its queue.
struct alignas(kCacheLine) WeightedLayer {
    alignas(kCacheLine) std::atomic<std::uint64_t> word;
    WeightedQueue queue;
};

struct WeightedSemaphoreConfig {
    std::uint64_t capacity;
};

struct WeightedSemaphoreBody {
    WeightedLayer layer;
};
static_assert(sizeof(WeightedSemaphoreBody) <= kRecordBodySize);

// Where a weighted layer's fields sit in its word: WeightedWord's layout for a WeightedSemaphore
// and an unpacked Dispatch; a packed Dispatch keeps its bytes and queued count in the word it
// shares with its slots (dispatch_state.hpp).
struct WeightedFormat {
    int units_shift;
    std::uint64_t units_mask;  // after the shift
    int queued_shift;
    std::uint64_t queued_max;  // >= kRingSize

    constexpr std::uint64_t in_use(std::uint64_t w) const noexcept {
        return (w >> units_shift) & units_mask;
    }
    constexpr std::uint64_t queued(std::uint64_t w) const noexcept {
        return (w >> queued_shift) & queued_max;
    }
    constexpr std::uint64_t units(std::uint64_t n) const noexcept { return n << units_shift; }
    constexpr std::uint64_t queued_unit() const noexcept { return 1ULL << queued_shift; }
    // `w` with its units and queued fields replaced (other fields and kFrozen kept).
    constexpr std::uint64_t with(std::uint64_t w, std::uint64_t in_use,
                                 std::uint64_t queued_count) const noexcept {
        w &= ~(units_mask << units_shift);
        w &= ~(queued_max << queued_shift);
        return w | ((in_use & units_mask) << units_shift) |
               ((queued_count & queued_max) << queued_shift);
    }
};

inline constexpr WeightedFormat kWeightedFormat{
    .units_shift = 0,
    .units_mask = WeightedWord::kInUseMask,
    .queued_shift = WeightedWord::kQueuedShift,
    .queued_max = WeightedWord::kQueuedMax,
};

// The FIFO weighted-semaphore algorithm on a word and a queue, shared by WeightedSemaphore and by
// Dispatch's byte layer. `ledger_layer` is the held[] index the units are recorded in. Amounts
// passed in are already clamped to 1..capacity by the caller.
struct WeightedCore {
    std::atomic<std::uint64_t>& word;
    WeightedQueue& queue;
    std::uint64_t capacity;
    int ledger_layer;
    bool counts_admissions = true;  // as SemaphoreCore::counts_admissions
    WeightedFormat fmt = kWeightedFormat;

    // Takes `n` units if nobody is queued and they fit. Never sleeps (except aside a frozen word).
    bool try_acquire(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept;

    // Gives back `n` units; wakes the head of the queue if anyone is queued. Returns false
    // (changing nothing) if fewer than `n` are in use.
    bool release(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept;

    // Takes `n` units, queueing in FIFO order behind earlier requests, until `deadline` (in
    // `pacing`'s clock). On timeout, leaves the queue and holds nothing. Opens its own Holds.
    bool acquire_until(SegmentState& state, std::uint32_t record, std::uint64_t n,
                       std::optional<TimePoint> deadline, const Pacing& pacing);

    std::uint64_t in_use() const noexcept;
    std::uint64_t queued() const noexcept;

    // Wakes the head of the queue (after a release that found tickets queued).
    void wake_head() noexcept;
};

// Crash recovery for a weighted layer (ledger layer `layer` of `record`), with the word frozen
// and no live slot pending on the record: cancels the tickets of dead owners (and tickets nobody
// finished taking), passes the turn over cancelled tickets at the head, then sets in_use to
// `live_units` and the queued count to the tickets left, clearing kFrozen, with one CAS from the
// frozen value, and wakes the queue. Returns the units given back. If the word is found thawed
// by a holder (docs/design.md, "The recount"), stores nothing to it, sets `*abandoned` and
// returns 0; the queue steps already taken are the live protocol's own and stay.
std::int64_t recount_weighted_layer(const SegmentState& state, std::uint32_t record, int layer,
                                    WeightedLayer& l, std::int64_t live_units,
                                    std::span<const std::uint32_t> dead_slots,
                                    bool* abandoned = nullptr) noexcept;

// The queue half of that recount, for any word that carries a weighted layer in format `fmt`
// (a packed Dispatch's word carries its slots too): cancels the tickets of dead owners (CAS from
// the entry read), dequeues cancelled tickets at the head as a live dequeuer does (CAS to empty,
// the word's queued count decremented, the head advanced), and returns the queued count the
// word must then hold (tail - head). Every step is one the live queue protocol itself takes, so
// it is safe even if a holder thawed the word meanwhile. The caller CASes the word, then calls
// wake_queue.
std::uint64_t recount_weighted_queue(const SegmentState& state, std::uint32_t record, int layer,
                                     WeightedQueue& q, std::atomic<std::uint64_t>& word,
                                     const WeightedFormat& fmt,
                                     std::span<const std::uint32_t> dead_slots) noexcept;
// Empties the queue (reset): head = tail, ring cleared. The caller stores the word, then wakes.
void reset_weighted_queue(WeightedQueue& q) noexcept;
// A reset's second step on a word that carries a weighted layer in format `fmt`, after its first
// CAS has landed: that CAS reset the units and kept the queued count and kFrozen (the word is then
// `kept`). If the word still reads `kept`, empties the queue, then zeroes the queued count and
// clears kFrozen with one CAS from `kept`; if a holder has thawed it since, leaves the queue (live
// again, its count consistent with it). The caller wakes.
void drop_weighted_queue(WeightedQueue& q, std::atomic<std::uint64_t>& word, std::uint64_t kept,
                         const WeightedFormat& fmt) noexcept;
// Bumps seq and wakes everyone queued.
void wake_queue(WeightedQueue& q) noexcept;

// Re-initialises a weighted layer: nothing in use, nothing queued (queued waiters notice that
// their ticket was dropped and queue again), kFrozen clear, everyone woken. The units are reset
// by a CAS from the frozen value that keeps the queued count and kFrozen, and the queue is
// emptied only after it (drop_weighted_queue). Returns false, the word and the queue untouched,
// if a holder had thawed the word before that CAS.
bool reset_weighted_layer(WeightedLayer& l) noexcept;

// Test hook, null outside tests: a weighted layer's reset (reset_weighted_layer, and a packed
// Dispatch's) calls it with step 0 once it has found the word frozen, just before its first CAS on
// the word, and with step 1 once that CAS has landed, just before drop_weighted_queue looks at the
// word again. A test stops or kills the resetter there (crash.reset_queue) and thaws the word as a
// holder waiting aside past kFrozenBreakTimeout does: otherwise windows of a few instructions.
extern std::atomic<void (*)(int step) noexcept> weighted_reset_hook;
inline void run_weighted_reset_hook(int step) noexcept {
    if (auto* hook = weighted_reset_hook.load(std::memory_order_relaxed)) hook(step);
}

extern const KindOps kWeightedSemaphoreOps;

}  // namespace lim::detail
