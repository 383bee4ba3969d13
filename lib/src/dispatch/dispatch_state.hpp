// The Dispatch's state in its record, and the process-local object its handles share.
//
// Body (docs/design.md ("The Dispatch family") has the table):
//   line 0       concurrency word  (SemaphoreWord; ledger layer 0, "slots"), or, in a packed
//                Dispatch, the word shared by the slots and the bytes (DispatchPacked below)
//   line 1       throttled word    (SemaphoreWord; ledger layer 1, "throttled")
//   lines 2..19  byte layer        (WeightedLayer: word, queue control, 128-entry ring; ledger
//                                   layer 2, "bytes", as charged)
// The backoff deadline is not here: it is the BackoffWindow record named in the config, so that
// limctl set-backoff, other Dispatches and plain BackoffWindow users share it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>

#include "lim/backoff_window.hpp"
#include "lim/detail/record_ref.hpp"
#include "lim/dispatch.hpp"
#include "primitives/backoff_window_state.hpp"
#include "primitives/semaphore_state.hpp"
#include "primitives/weighted_semaphore_state.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/layout.hpp"
#include "shm/record_handle.hpp"
#include "sync/pacing.hpp"
#include "sync/saturating.hpp"

namespace lim::detail {

inline constexpr int kDispatchSlotsLayer = 0;
inline constexpr int kDispatchThrottledLayer = 1;
inline constexpr int kDispatchBytesLayer = 2;

// The shared options, as stored in the record (and compared for config_mismatch).
struct DispatchConfig {
    std::uint64_t concurrency;
    std::uint64_t throttled_concurrency;
    std::uint64_t byte_budget;
    std::int64_t backoff_window_ns;
    std::uint64_t byte_penalty_multiplier;
    std::uint32_t backoff_record;  // record index of the BackoffWindow
    // 1: the slots and the bytes share the concurrency word (DispatchPacked), chosen at creation
    // when the limits fit; 0: each layer has its own word. Derived from the options, so two
    // processes with the same options agree.
    std::uint32_t packed;
};
static_assert(is_record_config_v<DispatchConfig>);

// A packed Dispatch's concurrency word, so that the common permit (no backoff) is one CAS to
// take a slot and its bytes and one CAS to give them back:
//
//   bits  0..14  slots in use            (concurrency <= 32,767)
//   bits 15..46  bytes in use            (byte_budget <= 2^32 - 1)
//   bits 47..54  byte requests queued    (<= kRingSize = 128; the byte queue is bytes.queue)
//   bits 55..62  sleepers waiting for a slot (a 256th polls, as a saturated Semaphore's do)
//   bit  63      kFrozen
//
// The slot count is the lowest field, so every slot release changes the low half, the futex word
// slot sleepers wait on. The FIFO rule holds as in a WeightedSemaphore: the queued count is in
// the word a newcomer's CAS compares, so nobody takes bytes while anyone is queued.
struct DispatchPacked {
    static constexpr std::uint64_t kMaxConcurrency = (1ULL << 15) - 1;
    static constexpr std::uint64_t kMaxBudget = (1ULL << 32) - 1;
    static constexpr SemaphoreFormat kSlots{
        .in_use_mask = kMaxConcurrency,
        .single_shift = 55,
        .single_max = 255,
        .multi_shift = 55,
        .multi_max = 0,  // a Dispatch waits for one slot at a time
    };
    static constexpr WeightedFormat kBytes{
        .units_shift = 15,
        .units_mask = kMaxBudget,
        .queued_shift = 47,
        .queued_max = 255,
    };
    static_assert(kRingSize <= 255);

    static constexpr bool fits(std::uint64_t concurrency, std::uint64_t byte_budget) noexcept {
        return concurrency <= kMaxConcurrency && byte_budget <= kMaxBudget;
    }
};

// Whether a stored config is packed. A packed flag whose limits do not fit is refused when the
// record is opened (corrupt_segment); recovery, which cannot refuse, treats it as unpacked.
constexpr bool is_packed(const DispatchConfig& c) noexcept {
    return c.packed == 1 && DispatchPacked::fits(c.concurrency, c.byte_budget);
}

struct DispatchBody {
    alignas(kCacheLine) std::atomic<std::uint64_t> concurrency;
    alignas(kCacheLine) std::atomic<std::uint64_t> throttled;
    WeightedLayer bytes;
};
static_assert(sizeof(DispatchBody) <= kRecordBodySize);
static_assert(offsetof(DispatchBody, throttled) == kCacheLine);
static_assert(offsetof(DispatchBody, bytes) == 2 * kCacheLine);

// Backoff as Foundation defines it: active while now < until, or now - until < window.
constexpr bool backoff_active_at(std::int64_t now_ns, std::int64_t until_ns,
                                 std::int64_t window_ns) noexcept {
    return until_ns != 0 && (now_ns < until_ns || saturating_sub(now_ns, until_ns) < window_ns);
}

// What a request of `bytes` is charged: x penalty under backoff (saturating), clamped to the
// budget.
constexpr std::uint64_t charge_for(std::uint64_t bytes, bool backoff, std::uint64_t penalty,
                                   std::uint64_t budget) noexcept {
    if (backoff && penalty > 1) {
        if (bytes > budget / penalty) return budget;
        bytes *= penalty;
    }
    return bytes < budget ? bytes : budget;
}

// Shared by every copy of a Dispatch handle (and pointed to by its Permits). Not movable: the
// pacing points at the clock and sleep members.
struct DispatchImpl {
    DispatchImpl(RecordRef r, BackoffWindow w, const DispatchOptions& o);
    DispatchImpl(const DispatchImpl&) = delete;
    DispatchImpl& operator=(const DispatchImpl&) = delete;

    RecordRef ref;
    BackoffWindow window;
    DispatchBody* body;
    const DispatchConfig* config;
    BackoffWindowBody* window_body;
    std::function<TimePoint()> clock;
    std::function<void(Duration)> sleep;
    Pacing pacing;
    // The record's concurrency and byte_budget, copied at open (a record's config never changes
    // once created; bounded: open refuses a packed flag whose limits do not fit the word), so
    // the one-CAS permit reads them from this line instead of through `config`.
    std::uint64_t concurrency;
    std::uint64_t byte_budget;
    // ref.state->uid(), kept here for the thread's slot lookup (QuickHold::open).
    std::uint64_t mapping_uid;
    // The word try_acquire's common path tests for zero: the backoff deadline
    // (window_body->until) when the Dispatch packs, else a constant that is never zero, so that
    // one load and one test rule out both a deadline and an unpacked Dispatch.
    const std::atomic<std::int64_t>* quick_gate;
    bool default_clock;
    bool packed;
    // A backoff deadline already seen to be over for good (now - until >= window): with the
    // monotonic clock it stays over until the deadline changes, so the hot path can skip reading
    // the clock. Only used with the default clock.
    std::atomic<std::int64_t> expired_until{0};

    TimePoint now() const { return default_clock ? Clock::now() : clock(); }
    // Whether a request starting now runs under backoff. Reads the clock only when a deadline
    // exists and has not been seen to be over. The common case (no deadline was ever set, or it
    // was cleared) is one acquire load, inline in the caller.
    bool backoff_now() {
        const std::int64_t until = window_body->until.load(std::memory_order_acquire);
        if (until == 0) [[likely]]
            return false;
        return backoff_at(until);
    }
    // backoff_now's slow path: a deadline `until` exists.
    bool backoff_at(std::int64_t until);

    SemaphoreCore slots() const noexcept {
        return {body->concurrency, config->concurrency, kDispatchSlotsLayer, false,
                packed ? DispatchPacked::kSlots : kSemaphoreFormat};
    }
    SemaphoreCore throttled() const noexcept {
        return {body->throttled, config->throttled_concurrency, kDispatchThrottledLayer, false};
    }
    WeightedCore bytes() const noexcept {
        return {packed ? body->concurrency : body->bytes.word,
                body->bytes.queue,
                config->byte_budget,
                kDispatchBytesLayer,
                false,
                packed ? DispatchPacked::kBytes : kWeightedFormat};
    }

    // Packed only: a slot and `charge` bytes in one CAS, if both are free and (when charge > 0)
    // nobody is queued for bytes; false (taking nothing) otherwise. Never sleeps. Defined in
    // dispatch.cpp, its only user, and inlined into each caller there: the common permit's two
    // CASes then run with the Hold in registers, not behind a call and a spilled frame.
    [[gnu::always_inline]] inline bool take_packed(Hold& hold, const SegmentState& state,
                                                   std::uint64_t charge) noexcept;
    // Packed only: gives back a slot and `charge` bytes in one CAS and wakes a slot sleeper and
    // the head of the byte queue if there are any. False (changing nothing) if the word does not
    // hold that much. Inlined as take_packed is.
    [[gnu::always_inline]] inline bool give_packed(Hold& hold, const SegmentState& state,
                                                   std::uint64_t charge) noexcept;
    // give_packed's wakes, when the word it replaced (`w`) counts a slot sleeper or a queued
    // byte request. Out of line: the common release wakes nobody.
    [[gnu::noinline, gnu::cold]] void wake_after_give(std::uint64_t w,
                                                      std::uint64_t charge) noexcept;
};

// Gives back what a Permit holds (bytes, throttled slot, concurrency slot). `quick`: the permit
// was taken by the one-CAS form (packed, not throttled). Never throws. Defined in dispatch.cpp
// and inlined into Permit::release_held, its only caller.
[[gnu::always_inline]] inline void release_permit(DispatchImpl& d, std::uint64_t bytes,
                                                  bool throttled, bool quick) noexcept;

extern const KindOps kDispatchOps;

}  // namespace lim::detail
