// The Semaphore's state in its record: one 64-bit word.
//
//   bits  0..31  units in use            (the low half is also the futex word sleepers wait on)
//   bits 32..46  sleepers waiting for 1 unit
//   bits 47..61  sleepers waiting for more than 1 unit
//   bit  63      kFrozen (crash recovery is recounting)
//
// Keeping the sleeper counts in the same word as the value (as glibc's sem_t does) lets release
// learn in the same CAS whether anyone sleeps, so an uncontended release makes no system call.
// Two classes of sleepers let a release of n units wake n single-unit sleepers instead of all of
// them; any multi-unit sleeper makes it wake all (each re-checks whether it now fits).
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

struct SemaphoreConfig {
    std::uint64_t capacity;
};

struct SemaphoreBody {
    alignas(kCacheLine) std::atomic<std::uint64_t> word;
};
static_assert(sizeof(SemaphoreBody) <= kRecordBodySize);

struct SemaphoreWord {
    static constexpr std::uint64_t kInUseMask = 0xFFFF'FFFFULL;
    static constexpr int kSingleShift = 32;
    static constexpr int kMultiShift = 47;
    static constexpr std::uint64_t kWaiterMax = (1ULL << 15) - 1;
    static constexpr std::uint64_t kMaxCapacity = 1ULL << 31;

    static constexpr std::uint64_t in_use(std::uint64_t w) noexcept { return w & kInUseMask; }
    static constexpr std::uint64_t single(std::uint64_t w) noexcept {
        return (w >> kSingleShift) & kWaiterMax;
    }
    static constexpr std::uint64_t multi(std::uint64_t w) noexcept {
        return (w >> kMultiShift) & kWaiterMax;
    }
    // The increment that registers one sleeper waiting for `n` units.
    static constexpr std::uint64_t waiter_unit(std::uint64_t n) noexcept {
        return n == 1 ? 1ULL << kSingleShift : 1ULL << kMultiShift;
    }
    static constexpr std::uint64_t make(std::uint64_t in_use, std::uint64_t single,
                                        std::uint64_t multi) noexcept {
        return in_use | (single << kSingleShift) | (multi << kMultiShift);
    }
};

// Where a slot layer's fields sit in its word. A Semaphore (and a Dispatch's throttled layer, and
// an unpacked Dispatch's concurrency layer) uses SemaphoreWord's layout; a packed Dispatch keeps
// its slots and its sleepers in the word it shares with its bytes (dispatch_state.hpp). The units
// field always starts at bit 0, so every change of the units changes the low half, which is the
// futex word sleepers wait on.
struct SemaphoreFormat {
    std::uint64_t in_use_mask;
    int single_shift;
    std::uint64_t single_max;
    int multi_shift;
    std::uint64_t multi_max;  // 0: no multi-unit sleeper field (such sleepers poll)

    constexpr std::uint64_t in_use(std::uint64_t w) const noexcept { return w & in_use_mask; }
    constexpr std::uint64_t single(std::uint64_t w) const noexcept {
        return (w >> single_shift) & single_max;
    }
    constexpr std::uint64_t multi(std::uint64_t w) const noexcept {
        return multi_max ? (w >> multi_shift) & multi_max : 0;
    }
    constexpr std::uint64_t sleepers(std::uint64_t w) const noexcept {
        return single(w) + multi(w);
    }
    // Whether any sleeper is counted in `w`: one test of the sleeper fields' bits (a release's
    // waiter check, on the word its CAS replaced).
    constexpr bool has_sleepers(std::uint64_t w) const noexcept {
        return (w & ((single_max << single_shift) | (multi_max << multi_shift))) != 0;
    }
    constexpr std::uint64_t waiter_unit(std::uint64_t n) const noexcept {
        return n == 1 ? 1ULL << single_shift : 1ULL << multi_shift;
    }
    constexpr std::uint64_t waiter_max(std::uint64_t n) const noexcept {
        return n == 1 ? single_max : multi_max;
    }
    // `w` with its units and sleeper fields replaced (other fields and kFrozen kept).
    constexpr std::uint64_t with(std::uint64_t w, std::uint64_t in_use, std::uint64_t single_count,
                                 std::uint64_t multi_count) const noexcept {
        w &= ~in_use_mask;
        w &= ~(single_max << single_shift);
        if (multi_max) w &= ~(multi_max << multi_shift);
        w |= (in_use & in_use_mask) | ((single_count & single_max) << single_shift);
        if (multi_max) w |= (multi_count & multi_max) << multi_shift;
        return w;
    }
};

inline constexpr SemaphoreFormat kSemaphoreFormat{
    .in_use_mask = SemaphoreWord::kInUseMask,
    .single_shift = SemaphoreWord::kSingleShift,
    .single_max = SemaphoreWord::kWaiterMax,
    .multi_shift = SemaphoreWord::kMultiShift,
    .multi_max = SemaphoreWord::kWaiterMax,
};

// The semaphore algorithm on a bare word, shared by Semaphore and by Dispatch's two slot
// layers. `layer` is the ledger layer the units are recorded in.
struct SemaphoreCore {
    std::atomic<std::uint64_t>& word;
    std::uint64_t capacity;
    int layer;
    // Whether a successful acquire counts as an admission in the ledger (Dispatch counts its
    // permits itself, once each, rather than once per layer).
    bool counts_admissions = true;
    SemaphoreFormat fmt = kSemaphoreFormat;

    // One attempt under `hold`; never sleeps (except aside a frozen word). If `registered_for`
    // is non-zero the caller is registered as a sleeper for that many units, and a successful
    // attempt also deregisters it.
    bool try_acquire(Hold& hold, const SegmentState& state, std::uint64_t n,
                     std::uint64_t registered_for = 0) noexcept;

    // Registers / deregisters the calling thread as a sleeper for `n` units (under `hold`).
    // register_sleeper returns false when the sleeper count is saturated (the caller then polls).
    bool register_sleeper(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept;
    void deregister_sleeper(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept;

    // Gives back `n` units and wakes sleepers. Returns false (changing nothing) if fewer than
    // `n` are in use.
    bool release(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept;

    // Blocks until `n` units are acquired or `deadline` (in `pacing`'s clock) passes. Opens its
    // own Holds and holds none while it sleeps; `pacing` bounds each sleep.
    bool acquire_until(SegmentState& state, std::uint32_t record, std::uint64_t n,
                       std::optional<TimePoint> deadline, const Pacing& pacing);
    // acquire_until after its first attempt failed: registers, sleeps, retries. Out of line, so
    // that the uncontended acquire keeps a small frame.
    [[gnu::noinline]] bool acquire_blocking(SegmentState& state, std::uint32_t record,
                                            std::uint64_t n, std::optional<TimePoint> deadline,
                                            const Pacing& pacing);
};

// The sleepers registered on `record`'s `layer` by live slots (slots in `dead` do not count),
// as (single-unit, multi-unit) counts, each capped at the format's maximum.
struct SleeperCounts {
    std::uint64_t single = 0;
    std::uint64_t multi = 0;
};
SleeperCounts count_live_sleepers(const SegmentState& state, std::uint32_t record, int layer,
                                  const SemaphoreFormat& fmt,
                                  std::span<const std::uint32_t> dead = {}) noexcept;

// Wakes the sleepers a change from `before` (units freed: `n`) lets proceed: min(single, n)
// single-unit sleepers, or all if any multi-unit sleeper waits.
void wake_after_release(std::atomic<std::uint64_t>& word, const SemaphoreFormat& fmt,
                        std::uint64_t before, std::uint64_t n) noexcept;

// Crash recovery for a word in this format: set in_use to `live_units` and the sleeper counts to
// the sleepers registered on `record`'s `layer` by live slots (slots in `dead` do not count),
// clear kFrozen, and wake every sleeper; returns the units given back. The store is one CAS from
// the frozen value: if the word is found thawed (a holder broke a freeze that outlasted
// kFrozenBreakTimeout, docs/design.md "The recount"), nothing is stored, `*abandoned` (if given)
// is set and 0 is returned.
std::int64_t recount_semaphore_word(const SegmentState& state, std::uint32_t record, int layer,
                                    std::atomic<std::uint64_t>& word, std::int64_t live_units,
                                    std::span<const std::uint32_t> dead = {},
                                    bool* abandoned = nullptr) noexcept;

extern const KindOps kSemaphoreOps;

}  // namespace lim::detail
