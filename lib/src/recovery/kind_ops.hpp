// What crash recovery needs from each record family. The reaper (recovery/reaper.cpp) knows
// slots, ledgers and liveness; it knows a record's words only through these operations, which
// each family implements next to its hot path (they must agree with it about every bit).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "lim/clock.hpp"
#include "shm/layout.hpp"
#include "shm/segment_state.hpp"

namespace lim::detail {

// Sums over live slots of one record's ledger entries: live[i] = sum of held[i].
struct LiveHoldings {
    std::int64_t held[3] = {0, 0, 0};
    // Set by a recount that found a word it froze thawed by a holder (the reaper was stopped past
    // kFrozenBreakTimeout, docs/design.md "The recount"), or by a limiter recount whose fold
    // needed the config lock that a stopped writer holds ("Stopped lock holders"): it stopped
    // there, storing nothing more; the reaper defers the record. held[] then counts only the
    // words recounted before.
    bool abandoned = false;
};

// KindOps::reset's answer when it reset no word (a single-word record's, or its first word found
// thawed): every layer's cleared units are given back if the reset is then refused.
inline constexpr std::uint8_t kAllLayers = 0b111;

struct KindOps {
    // Sets kFrozen on every word of the record that a holding operation changes. After this no
    // acquisition or release can land on the record until recount or thaw.
    void (*freeze)(SegmentState& state, std::uint32_t record) noexcept;

    // Called with the record frozen and no live slot pending on it: makes every frozen word
    // equal what the live slots hold (`live`), gives back the rest as the family does on
    // release (a limiter returns tokens to the hopper at `now`), cancels any queued waits of
    // the slots in `dead_slots`, clears kFrozen, and wakes waiters. Returns, per held[] layer,
    // how much was given back. Each word's store is one CAS from the frozen value; a word found
    // thawed by a holder stops the recount there (`abandoned`), its later words left frozen for
    // the reaper's thaw. Words are recounted in an order whose every prefix is safe.
    LiveHoldings (*recount)(SegmentState& state, std::uint32_t record, const LiveHoldings& live,
                            std::span<const std::uint32_t> dead_slots, TimePoint now) noexcept;

    // Clears kFrozen without changing anything else (a recount that cannot proceed).
    void (*thaw)(SegmentState& state, std::uint32_t record) noexcept;

    // Re-initialises the record's body to its configured state (from Record::config) at `now`:
    // nothing held, nothing queued, backoff cleared, bucket and hopper as at creation. Called
    // with the record frozen and no live holders (reset), and wakes waiters. Returns 0 if every
    // word was reset; otherwise a word was found thawed by a holder (the resetter was stopped past
    // kFrozenBreakTimeout) and the words from it on were left as they were: the result has bit l
    // set for each held[] layer l whose word was not reset (the layers of the words reset before
    // it are clear: their ledgers' cleared units are forgotten by those words). The caller
    // freezes and resets again.
    std::uint8_t (*reset)(SegmentState& state, std::uint32_t record, TimePoint now) noexcept;

    // Which held[] layers the family uses, and their names for reports ("units", "tokens",
    // "slots", "throttled", "bytes").
    int layers;
    const char* layer_names[3];

    // Optional (null: always). Called by a reset before it freezes the record, with the config
    // lock held (until the reset's store) and the resetter not announced on it: whether the
    // reset may go on. A limiter's reset moves its generation by one, and when that crosses a
    // generation checkpoint it must first make the checkpoint (limiter/generation_checkpoint.hpp:
    // a token bucket's takes, which the quiescence wait ignores, included). False: the record is
    // refused, unchanged, as when it does not quiesce.
    bool (*may_reset)(SegmentState& state, std::uint32_t record) noexcept = nullptr;
};

// The operations for `kind`, or nullptr for a kind with nothing to recover (backoff windows).
const KindOps* kind_ops(RecordKind kind) noexcept;

}  // namespace lim::detail
