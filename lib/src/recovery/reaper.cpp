#include "recovery/reaper.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "lim/error.hpp"
#include "lim/tokens.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/file_lock.hpp"
#include "shm/process_identity.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "sync/poll_pause.hpp"
#include "sync/race_point.hpp"

namespace lim::detail {
namespace {

// How long a recount waits for live slots to finish the operation they are in the middle of. An
// operation takes nanoseconds; a slot still pending after this is stopped (SIGSTOP, a debugger),
// and the record is left for the next reap.
constexpr auto kQuiesceTimeout = std::chrono::seconds{1};
// How long a reap keeps a record frozen waiting for quiescence. Every holder on the record waits
// aside while it is frozen, so the long wait for a stopped process happens before the freeze
// (wait_seen_out); once frozen, only operations that began since are waited for.
constexpr auto kFrozenQuiesceTimeout = std::chrono::milliseconds{50};

struct DeadSlot {
    std::uint32_t index;
    std::uint64_t owner;  // the owner word we judged dead; the slot is freed only if unchanged
};

bool is_occupied(std::uint64_t owner) noexcept {
    return slot_is_occupied(owner);
}

// The slots whose owner is dead (process_table.hpp, judge_slots): occupied, in any state byte
// (claiming, live, retired, or one no lim writes), with a lock byte nobody holds. A slot whose
// check failed counts as alive and is left alone.
std::vector<DeadSlot> find_dead_slots(const SegmentState& state) {
    std::vector<DeadSlot> dead;
    const std::vector<SlotJudgement> judged = judge_slots(state);
    for (std::uint32_t i = 0; i < judged.size(); ++i) {
        if (judged[i].dead) dead.push_back({i, judged[i].owner});
    }
    return dead;
}

bool contains(const std::vector<DeadSlot>& dead, std::uint32_t slot) {
    return std::any_of(dead.begin(), dead.end(),
                       [&](const DeadSlot& d) { return d.index == slot; });
}

// Waits until no slot outside `excluded` is in the middle of an operation on `record`.
bool wait_quiescent(const SegmentState& state, std::uint32_t record,
                    const std::vector<DeadSlot>& excluded,
                    std::chrono::steady_clock::duration timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (int pass = 0;; ++pass) {
        bool busy = false;
        for (std::uint32_t i = 0; i < state.geometry().max_processes && !busy; ++i) {
            const SlotHeader& slot = state.slot(i);
            if (!is_occupied(slot.owner.load(std::memory_order_acquire))) continue;
            if (contains(excluded, i)) continue;
            busy = slot.pending.load(std::memory_order_acquire) == record + 1;
        }
        if (!busy) return true;
        if (std::chrono::steady_clock::now() > deadline) return false;
        poll_pause(pass);
    }
}

// Before a record is frozen: waits (until `deadline`) until every slot outside `excluded`
// that is now in the middle of an operation on `record` has been seen out of it once (one
// operation at a time per slot, so the one in progress has then ended), without freezing
// anything. A process stopped mid-operation costs this wait, not a frozen record: before, the
// whole second was spent frozen, and every operation on the record, in every process, waited
// aside for it (at each reap: blocked callers reap every reap_after). Only an optimisation: the
// frozen wait that follows is what makes the recount exact. Scratch: `busy` (reserved).
void wait_seen_out(const SegmentState& state, std::uint32_t record,
                   const std::vector<DeadSlot>& excluded, std::vector<std::uint32_t>& busy,
                   std::chrono::steady_clock::time_point deadline) {
    busy.clear();
    const std::uint32_t announced = record + 1;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        if (!is_occupied(slot.owner.load(std::memory_order_acquire))) continue;
        if (contains(excluded, i)) continue;
        if (slot.pending.load(std::memory_order_acquire) == announced) busy.push_back(i);
    }
    for (int pass = 0; !busy.empty(); ++pass) {
        std::erase_if(busy, [&](std::uint32_t i) {
            const SlotHeader& slot = state.slot(i);
            return !is_occupied(slot.owner.load(std::memory_order_acquire)) ||
                   slot.pending.load(std::memory_order_acquire) != announced;
        });
        if (busy.empty() || std::chrono::steady_clock::now() > deadline) return;
        poll_pause(pass);
    }
}

// a + b, saturating: ledger entries are read from the segment, where a damaged one may hold
// anything (docs/design.md, "The recount").
std::int64_t saturating_add(std::int64_t a, std::int64_t b) noexcept {
    std::int64_t sum = 0;
    if (!__builtin_add_overflow(a, b, &sum)) return sum;
    return b > 0 ? std::numeric_limits<std::int64_t>::max()
                 : std::numeric_limits<std::int64_t>::min();
}

std::int64_t saturating_sub(std::int64_t a, std::int64_t b) noexcept {
    std::int64_t difference = 0;
    if (!__builtin_sub_overflow(a, b, &difference)) return difference;
    return b < 0 ? std::numeric_limits<std::int64_t>::max()
                 : std::numeric_limits<std::int64_t>::min();
}

// One occupied slot's ledger entry for a record, with its owner's pid (live_holdings' scratch).
struct SlotHolding {
    std::uint32_t pid;
    LiveHoldings held;
};

// Sum over occupied slots outside `excluded` of their ledger entries for `record`: per process
// first (saturating, then at least 0), then over processes (saturating). `scratch` has room for
// max_processes entries, reserved before any record is frozen, so nothing here allocates.
LiveHoldings live_holdings(const SegmentState& state, std::uint32_t record,
                           const std::vector<DeadSlot>& excluded,
                           std::vector<SlotHolding>& scratch) {
    scratch.clear();
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const std::uint64_t owner = state.slot(i).owner.load(std::memory_order_acquire);
        if (!is_occupied(owner)) continue;
        if (contains(excluded, i)) continue;
        const LedgerEntry& e = state.ledger(i, record);
        SlotHolding& s = scratch.emplace_back(SlotHolding{SlotOwner::pid(owner), {}});
        for (int l = 0; l < 3; ++l)
            s.held.held[l] = holding(e, l);
    }
    std::sort(scratch.begin(), scratch.end(),
              [](const SlotHolding& a, const SlotHolding& b) { return a.pid < b.pid; });
    // A holder may have released what another thread of its process acquired, so one ledger can
    // be negative; the sum over a process cannot be, except after a forced reset forgot what it
    // held, or when its ledger was damaged. Never count a process below zero: one process's
    // negative sum must not cancel what another holds (a recount too low admits past the limit).
    // A damaged huge entry saturates, and counts as held (doubt means held).
    LiveHoldings live;
    for (std::size_t i = 0; i < scratch.size();) {
        LiveHoldings process;
        const std::uint32_t pid = scratch[i].pid;
        for (; i < scratch.size() && scratch[i].pid == pid; ++i) {
            for (int l = 0; l < 3; ++l)
                process.held[l] = saturating_add(process.held[l], scratch[i].held.held[l]);
        }
        for (int l = 0; l < 3; ++l)
            live.held[l] = saturating_add(live.held[l], std::max<std::int64_t>(process.held[l], 0));
    }
    return live;
}

// Frees a slot whose owner is gone: folds its admission counts into the records, clears its
// ledger row and its operation words, and hands it back -- only if its owner word is still the
// one judged dead.
void free_slot(SegmentState& state, const DeadSlot& dead) {
    SlotHeader& slot = state.slot(dead.index);
    const std::uint32_t used = state.records_used();
    for (std::uint32_t r = 0; r < used; ++r) {
        LedgerEntry& e = state.ledger(dead.index, r);
        if (const std::uint64_t n = e.admitted.load(std::memory_order_relaxed); n != 0) {
            state.record(r).header.admitted_retired.fetch_add(n, std::memory_order_relaxed);
        }
        clear_holding(e);
        e.admitted.store(0, std::memory_order_relaxed);
    }
    slot.pending.store(0, std::memory_order_relaxed);
    slot.waiting_record.store(0, std::memory_order_relaxed);
    slot.tid.store(0, std::memory_order_relaxed);
    slot.attach_uid.store(0, std::memory_order_relaxed);
    std::uint64_t expected = dead.owner;
    LIM_RACE_POINT();  // a claimer must not take the slot before this CAS frees it
    slot.owner.compare_exchange_strong(
        expected, SlotOwner::make(0, SlotOwner::generation(dead.owner), SlotState::free),
        std::memory_order_release, std::memory_order_relaxed);
}

double to_report_units(RecordKind kind, std::int64_t amount) {
    return kind == RecordKind::limiter
               ? static_cast<double>(amount) / static_cast<double>(kTokenResolution)
               : static_cast<double>(amount);
}

// ReapLock::wait waits kLockWaitTimeout at most: a reaper or resetter stopped holding the lock
// (Ctrl-Z on limctl reap) keeps it for as long as it stays stopped; then Error(busy) naming the
// lock, before anything was read or changed. `what` names the caller's operation for it.
std::optional<FileLock> take_recovery_lock(const SegmentState& state, ReapLock mode,
                                           std::string_view what) {
    if (mode == ReapLock::wait)
        return FileLock::lock_or_busy(state.fd(), LockByte::recovery, state.name(), what);
    return FileLock::try_lock_fresh(state.fd(), LockByte::recovery);
}

}  // namespace

namespace {

// The reap proper; the caller holds the recovery lock.
ReapReport reap_locked(SegmentState& state) {
    ReapReport report;
    std::vector<DeadSlot> dead = find_dead_slots(state);
    if (dead.empty()) return report;

    // Which records the dead touched: anything they hold, were changing, or were queued on.
    const std::uint32_t used = state.records_used();
    std::vector<bool> affected(used, false);
    for (const DeadSlot& d : dead) {
        const SlotHeader& slot = state.slot(d.index);
        for (const std::uint32_t r1 : {slot.pending.load(), slot.waiting_record.load()}) {
            if (r1 != 0 && r1 - 1 < used) affected[r1 - 1] = true;
        }
        for (std::uint32_t r = 0; r < used; ++r) {
            const LedgerEntry& e = state.ledger(d.index, r);
            for (int l = 0; l < 3; ++l)
                affected[r] = affected[r] || holding(e, l) != 0;
        }
    }

    // Per dead pid, what its ledgers said it held, by record and layer.
    std::map<std::uint32_t, ReapedProcess> by_pid;
    for (const DeadSlot& d : dead) {
        ReapedProcess& p = by_pid[SlotOwner::pid(d.owner)];
        p.pid = static_cast<int>(SlotOwner::pid(d.owner));
        ++p.slots;
    }

    std::vector<std::uint32_t> dead_indexes;
    for (const DeadSlot& d : dead)
        dead_indexes.push_back(d.index);
    std::vector<bool> deferred(used, false);
    std::vector<SlotHolding> scratch;  // live_holdings': reserved here, not while frozen
    scratch.reserve(state.geometry().max_processes);
    std::vector<std::uint32_t> busy;  // wait_seen_out's
    busy.reserve(state.geometry().max_processes);
    // One quiescence budget for the whole reap, not one per record: processes stopped in the
    // middle of operations on many records (a neighbour's threads, each stopped in a Hold) cost
    // a reap (`limctl reap`, an attach) one kQuiesceTimeout plus kFrozenQuiesceTimeout per
    // record, not a second per record.
    const auto budget = std::chrono::steady_clock::now() + kQuiesceTimeout;
    for (std::uint32_t r = 0; r < used; ++r) {
        if (!affected[r]) continue;
        Record& record = state.record(r);
        if (record.header.state.load(std::memory_order_acquire) != kRecordReady) continue;
        const auto kind = static_cast<RecordKind>(record.header.kind);
        const KindOps* ops = kind_ops(kind);
        if (ops == nullptr) continue;

        // Quiescence: wait unfrozen for the operations in progress, then freeze and wait at most
        // kFrozenQuiesceTimeout for those begun since; if one is still in progress, thaw and try
        // again, all within the reap's budget (kQuiesceTimeout). A live process stopped
        // mid-operation so costs the reaper the budget, and the record at most
        // kFrozenQuiesceTimeout frozen at a time.
        const auto deadline = budget;
        bool quiescent = false;
        for (;;) {
            wait_seen_out(state, r, dead, busy, deadline);
            ops->freeze(state, r);
            LIM_RACE_POINT();  // a holder between its CAS and its ledger store sees the freeze late
            quiescent = wait_quiescent(state, r, dead, kFrozenQuiesceTimeout);
            if (quiescent || std::chrono::steady_clock::now() >= deadline) break;
            ops->thaw(state, r);
        }
        if (!quiescent) {
            ops->thaw(state, r);
            deferred[r] = true;
            report.deferred.emplace_back(record_key(record));
            continue;
        }
        const LiveHoldings live = live_holdings(state, r, dead, scratch);
        LIM_RACE_POINT();  // between the sum of the live ledgers and the store of the recount
        const LiveHoldings given = ops->recount(state, r, live, dead_indexes, Clock::now());
        if (given.abandoned) {
            // A holder thawed a word of the record while this reaper was stopped past
            // kFrozenBreakTimeout (docs/design.md, "The recount"): live operations have moved on
            // from the counts read, so the rest is not stored. Thaw what is still frozen and keep
            // the dead slots, as for a quiescence timeout: the next reap recounts the record
            // (each word to its live ledgers' sum, so words already recounted give back nothing
            // twice).
            ops->thaw(state, r);
            deferred[r] = true;
            report.deferred.emplace_back(record_key(record));
            continue;
        }

        // Attribute what was given back: each dead process its ledger; any remainder (an
        // operation a process died in the middle of) to the process that had it pending.
        for (int l = 0; l < ops->layers; ++l) {
            // Nothing given back, nothing to report: the dead's ledger entries were not in the
            // word (a consumed record's recount gives nothing back, and one converted from a
            // token bucket keeps its takers' old entries: lim::convert_to_consumed).
            if (given.held[l] == 0) continue;
            std::int64_t attributed = 0;
            std::uint32_t pending_pid = 0;
            std::map<std::uint32_t, std::int64_t> per_pid;
            for (const DeadSlot& d : dead) {
                const std::int64_t h = holding(state.ledger(d.index, r), l);
                std::int64_t& mine = per_pid[SlotOwner::pid(d.owner)];
                mine = saturating_add(mine, h);  // a damaged ledger may hold anything
                attributed = saturating_add(attributed, h);
                if (state.slot(d.index).pending.load() == r + 1)
                    pending_pid = SlotOwner::pid(d.owner);
            }
            if (const std::int64_t rest = saturating_sub(given.held[l], attributed); rest != 0) {
                std::int64_t& whose =
                    per_pid[pending_pid ? pending_pid : SlotOwner::pid(dead.front().owner)];
                whose = saturating_add(whose, rest);
            }
            for (const auto& [pid, amount] : per_pid) {
                if (amount == 0) continue;
                by_pid[pid].returned.push_back(
                    {std::string(kind_name(kind)), std::string(record_key(record)),
                     ops->layer_names[l], to_report_units(kind, amount)});
            }
        }
    }

    // Free the dead slots, except those whose records could not be recounted now: the next
    // reap must still find them to know which records to recount.
    std::uint32_t freed_pids = 0;
    for (auto& [pid, process] : by_pid) {
        bool keep = false;
        for (const DeadSlot& d : dead) {
            if (SlotOwner::pid(d.owner) != pid) continue;
            for (std::uint32_t r = 0; r < used; ++r) {
                if (!deferred[r]) continue;
                const SlotHeader& slot = state.slot(d.index);
                keep = keep || slot.pending.load() == r + 1 || slot.waiting_record.load() == r + 1;
                for (int l = 0; l < 3; ++l)
                    keep = keep || holding(state.ledger(d.index, r), l) != 0;
            }
        }
        if (keep) continue;
        for (const DeadSlot& d : dead) {
            if (SlotOwner::pid(d.owner) == pid) free_slot(state, d);
        }
        ++freed_pids;
        report.reaped.push_back(std::move(process));
    }
    SegmentHeader& h = state.header();
    h.reaps_total.fetch_add(freed_pids, std::memory_order_relaxed);
    h.recovery_epoch.fetch_add(1, std::memory_order_release);
    return report;
}

}  // namespace

ReapReport reap(SegmentState& state, ReapLock mode) {
    if (state.read_only()) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}' is open read-only; cannot reap", state.name()));
    }
    // Reaps and resets exclude each other: two recounts of one record at once would each wait
    // for the other's frozen word. A lock is fine here: this is the rare path, and the kernel
    // drops it if the reaper dies (waiters then thaw what it froze, see Hold).
    const auto lock = take_recovery_lock(state, mode, "reap");
    if (!lock) return {};
    return reap_locked(state);
}

void reap_quietly(SegmentState& state) noexcept {
    try {
        reap(state, ReapLock::skip);
    } catch (...) {
        // Automatic reaping is a courtesy to whoever waits; a failure here (no descriptor left for
        // the recovery lock) must not fail their call. An explicit reap reports it.
    }
}

void reset(SegmentState& state, const ResetOptions& options) {
    if (state.read_only()) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}' is open read-only; cannot reset", state.name()));
    }
    const auto lock = take_recovery_lock(state, ReapLock::wait, "reset");
    const std::uint32_t used = state.records_used();

    std::vector<std::uint32_t> targets;
    for (std::uint32_t r = 0; r < used; ++r) {
        const Record& record = state.record(r);
        if (record.header.state.load(std::memory_order_acquire) != kRecordReady) continue;
        if (options.key.empty() || record_key(record) == options.key) targets.push_back(r);
    }
    if (!options.key.empty() && targets.empty()) {
        throw Error(Errc::not_found,
                    fmt::format("segment '{}' has no limiter '{}'", state.name(), options.key));
    }

    // First give back what dead processes held everywhere (a reset of one record must not
    // forget what they held in others), so that only live slots remain.
    reap_locked(state);
    const std::vector<DeadSlot> dead = find_dead_slots(state);  // only deferred ones are left
    const auto self = static_cast<std::uint32_t>(this_process().pid);
    // The distinct pids of the live slots other than this process's.
    const auto other_live = [&] {
        std::vector<std::uint32_t> others;
        for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
            const std::uint64_t w = state.slot(i).owner.load(std::memory_order_acquire);
            if (!is_occupied(w) || contains(dead, i)) continue;
            const std::uint32_t pid = SlotOwner::pid(w);
            if (pid != self && std::find(others.begin(), others.end(), pid) == others.end()) {
                others.push_back(pid);
            }
        }
        return others;
    };
    // Whether any live slot is another process's: other_live's test, allocating nothing (it runs
    // with a record frozen).
    const auto any_other_live = [&]() noexcept {
        for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
            const std::uint64_t w = state.slot(i).owner.load(std::memory_order_acquire);
            if (is_occupied(w) && !contains(dead, i) && SlotOwner::pid(w) != self) return true;
        }
        return false;
    };
    const auto refuse_others = [&](const std::vector<std::uint32_t>& others) {
        throw Error(Errc::busy,
                    fmt::format("segment '{}': {} other live process(es) attached (pid {}{}); stop "
                                "them first, or force the reset",
                                state.name(), others.size(), others.front(),
                                others.size() > 1 ? ", ..." : ""));
    };
    if (!options.force) {
        if (const auto others = other_live(); !others.empty()) refuse_others(others);
    }

    // Configuration writers are excluded for the whole reset: a limiter's reset rewrites both
    // blocks of its double buffer, and a writer stopped in the middle of its switch would, once
    // continued, finish writing into the block the reset activated. Taken before anything is
    // frozen or zeroed: a writer stopped holding it makes the reset Error(busy) after
    // kLockWaitTimeout, nothing reset (docs/design.md, "Stopped lock holders").
    const FileLock config_lock =
        FileLock::lock_or_busy(state.fd(), LockByte::config, state.name(), "reset");

    // The resetter's own slot (this thread's, claimed if it has none, as by any holding
    // operation). It announces each record while the record's ledgers are cleared and its words
    // reset: if this process dies in between, its dead slot names the record, and the next reap
    // recounts it (each word to its live ledgers' sum), instead of the word keeping for good
    // units no ledger shows any more (docs/design.md, "Reset"). Taken before anything is frozen.
    // None when the thread cannot have one (a table full of live slots: the claim's reap cannot
    // run while this reset holds the recovery lock, so it gives up after kLockWaitTimeout; or a
    // thread past its slot registry's destruction): the reset goes on without the announcement.
    // An ephemeral slot (a thread past its slot registry's destruction: a reset run from a
    // thread_local's or a static's destructor) is kept and announced like a cached one, and given
    // back when the reset returns or throws.
    SlotHeader* own = nullptr;
    struct EphemeralBack {
        SegmentState& state;
        SlotHeader* slot = nullptr;
        ~EphemeralBack() {
            if (slot != nullptr) release_ephemeral(state, *slot);
        }
    } ephemeral{state};
    try {
        const Holder& h = cached_holder(state);
        own = h.slot;
        if (h.ephemeral) ephemeral.slot = h.slot;
    } catch (const Error&) {
    }

    // Each slot's entry for the record being reset as the first try found it (both words), and
    // the slot's owner (pid and generation) then: a try whose word store fails (a holder broke
    // the freeze) has cleared ledgers under a word it did not reset, and if the record is then
    // refused, the entries get these back (restore_cleared), so that the word again counts what
    // they show. Reserved here, not while frozen.
    const std::uint32_t slots = state.geometry().max_processes;
    std::vector<std::int64_t> saved_held(std::size_t{slots} * 3);
    std::vector<std::int64_t> saved_forgotten(std::size_t{slots} * 3);
    std::vector<std::uint64_t> saved_owner(slots);
    std::vector<std::uint8_t> dead_cleared(dead.size());  // per dead slot: 1 waiting, 2 pending
    bool any_cleared = false;
    // A slot's identity across the reset: its owner word less the state byte (a live slot may
    // retire meanwhile and stay the same holder; a new claim bumps the generation).
    const auto identity = [](std::uint64_t owner) { return owner & ~std::uint64_t{0xFF}; };
    constexpr std::uint64_t kUnknownIdentity = 0xFF;  // no identity has state bits set
    const auto is_dead = [&](std::uint32_t i) { return contains(dead, i); };
    // Called with the record frozen, before it is thawed and refused. A live slot's clearing
    // wrote only its `forgotten` words, which its holder never writes (layout.hpp, LedgerEntry),
    // so putting them back is exact whatever the holder did meanwhile, even in the middle of an
    // operation; a dead slot gets both words back. A slot claimed anew since (its old owner's row
    // looked empty once cleared, and it was freed) is left alone: the new owner's entry is its own.
    const auto restore_cleared = [&](std::uint32_t r) noexcept {
        if (!any_cleared) return;
        for (std::uint32_t i = 0; i < slots; ++i) {
            const SlotHeader& slot = state.slot(i);
            if (identity(slot.owner.load(std::memory_order_acquire)) != saved_owner[i]) continue;
            LedgerEntry& e = state.ledger(i, r);
            for (int l = 0; l < 3; ++l) {
                const std::size_t k = std::size_t{i} * 3 + l;
                if (is_dead(i)) e.held[l].store(saved_held[k], std::memory_order_relaxed);
                e.forgotten[l].store(saved_forgotten[k], std::memory_order_relaxed);
            }
        }
        // A dead slot's registration or unfinished operation the tries cleared: back too, so
        // that a later reap still finds the record among the dead slot's.
        for (std::size_t d = 0; d < dead.size(); ++d) {
            SlotHeader& slot = state.slot(dead[d].index);
            if (dead_cleared[d] & 1) slot.waiting_record.store(r + 1, std::memory_order_relaxed);
            if (dead_cleared[d] & 2) slot.pending.store(r + 1, std::memory_order_relaxed);
        }
        std::fill(dead_cleared.begin(), dead_cleared.end(), 0);
        any_cleared = false;
    };

    // One quiescence budget for the whole reset, as for a reap (not a second per record).
    const auto budget = std::chrono::steady_clock::now() + kQuiesceTimeout;
    std::vector<std::string> refused;  // keys of records a live slot stayed pending on
    for (const std::uint32_t r : targets) {
        const KindOps* ops = kind_ops(static_cast<RecordKind>(state.record(r).header.kind));
        if (ops == nullptr) continue;
        std::fill(dead_cleared.begin(), dead_cleared.end(), 0);
        any_cleared = false;
        // A limiter's reset moves its generation, and may have a generation checkpoint to make
        // first (KindOps::may_reset; a wait of up to kCheckpointWait): before the freeze, so that
        // the record is not kept frozen for it (holders would break a freeze that long, and the
        // reset would start over). Sound before the freeze: the config lock is held from here to
        // the reset's store, so no switch comes between. Refused like a record that does not
        // quiesce.
        if (ops->may_reset != nullptr && !ops->may_reset(state, r)) {
            refused.emplace_back(record_key(state.record(r)));
            continue;
        }
        // Again from the freeze if a holder thawed a word meanwhile (this process was stopped
        // past kFrozenBreakTimeout): what it did since is forgotten by the reset like the rest.
        bool done = false;
        for (;;) {
            ops->freeze(state, r);
            LIM_RACE_POINT();
            // Forced or not, the record is reset only once no live slot is in the middle of an
            // operation on it. A live holder stopped between its CAS and its ledger store would,
            // once continued, record units the reset word does not count, and their release
            // would then give back units of later holders: over the limit (docs/design.md,
            // "Reset"; before, a forced reset gave up waiting and reset regardless). Such a
            // record is thawed unchanged and refused (busy, below), as a reap defers it.
            if (!wait_quiescent(
                    state, r, dead,
                    std::max(budget - std::chrono::steady_clock::now(),
                             std::chrono::steady_clock::duration{kFrozenQuiesceTimeout}))) {
                restore_cleared(r);
                ops->thaw(state, r);
                break;
            }
            // Unforced: the check above again, now that the record is frozen and quiescent. A
            // process attached since (attaching takes no lock a reset holds) may have acquired
            // on the record before the freeze; forgetting that would admit past the limit while
            // it still holds. Frozen, nothing new lands on the record until the reset's store.
            if (!options.force && any_other_live()) {
                restore_cleared(r);
                ops->thaw(state, r);
                if (const auto others = other_live(); !others.empty()) refuse_others(others);
                continue;  // it has left since: freeze and try again
            }
            // Announced (own slot) from before the first ledger is cleared until after the words'
            // store, and withdrawn before the next try's quiescence wait, which would see it.
            if (own != nullptr) own->pending.store(r + 1, std::memory_order_seq_cst);
            LIM_RACE_POINT();
            // The reset forgets what anyone held in the record, the dead (whose reap was deferred)
            // included; a dead slot's registration or unfinished operation on it goes too, so that
            // the reset's sleeper count (live registrations) does not count a dead sleeper.
            for (std::uint32_t i = 0; i < slots; ++i) {
                LedgerEntry& e = state.ledger(i, r);
                // Saved by the first try, and again by a later try for a slot claimed anew since
                // (a holder that broke the freeze may have claimed one and acquired on the record:
                // that is what a refusal must give back to it).
                if (const std::uint64_t id = identity(state.slot(i).owner.load());
                    !any_cleared || id != saved_owner[i]) {
                    saved_owner[i] = id;
                    for (int l = 0; l < 3; ++l) {
                        saved_held[std::size_t{i} * 3 + l] = e.held[l].load();
                        saved_forgotten[std::size_t{i} * 3 + l] = e.forgotten[l].load();
                    }
                }
                // A live slot's holding is forgotten through the word only resets write
                // (forgotten := held: holding() then shows 0, and the holder's later adds count
                // from there); a dead slot, which nobody writes, is zeroed.
                if (is_dead(i)) {
                    clear_holding(e);
                    continue;
                }
                // Until `held` reads the same after the store as before it: a holder that broke
                // the freeze may change it meanwhile, and a thread that then finds its row empty
                // frees the slot. The store is an RMW, as is slot_is_empty's read of `forgotten`,
                // so the two are ordered in that word's one modification order: either the
                // exiting thread's read comes first, and this exchange acquires what it released
                // (its last store to `held`, which the load below then sees and the loop stores
                // too), or this exchange comes first, and the thread sees it and keeps the slot
                // (retired: a later try or the refusal's restore sets it right). A free slot
                // never keeps a `forgotten` (docs/design.md, "Reset").
                for (int l = 0; l < 3; ++l) {
                    std::int64_t h = e.held[l].load(std::memory_order_relaxed);
                    for (;;) {
                        e.forgotten[l].exchange(h, std::memory_order_acq_rel);
                        const std::int64_t again = e.held[l].load(std::memory_order_relaxed);
                        if (again == h) break;
                        h = again;
                    }
                }
                // The slot changed hands between the owner read above and these stores (its old
                // owner freed it, which needs its row all zero, and a new one claimed it): the
                // stores may have forgotten what the new owner took after a holder broke the
                // freeze. A new owner's `forgotten` starts at zero and only resets write it, so
                // zero is its value; its saved state is unknown, so a refusal leaves it alone,
                // and a later try saves it afresh.
                if (identity(state.slot(i).owner.load()) != saved_owner[i]) {
                    for (int l = 0; l < 3; ++l)
                        e.forgotten[l].store(0, std::memory_order_relaxed);
                    saved_owner[i] = kUnknownIdentity;
                }
            }
            any_cleared = true;
            for (std::size_t d = 0; d < dead.size(); ++d) {
                SlotHeader& slot = state.slot(dead[d].index);
                if (slot.waiting_record.load(std::memory_order_relaxed) == r + 1) {
                    slot.waiting_record.store(0, std::memory_order_relaxed);
                    dead_cleared[d] |= 1;
                }
                if (slot.pending.load(std::memory_order_relaxed) == r + 1) {
                    slot.pending.store(0, std::memory_order_relaxed);
                    dead_cleared[d] |= 2;
                }
            }
            const std::uint8_t not_reset = ops->reset(state, r, Clock::now());
            LIM_RACE_POINT();
            if (own != nullptr) own->pending.store(0, std::memory_order_release);
            if (not_reset == 0) {
                done = true;
                break;
            }
            // A multi-word record reset in part (a Dispatch: its concurrency word reset, its byte
            // word thawed by a holder): what this try cleared from the layers of the words reset
            // is forgotten by those words, so a refusal must not give it back to the ledgers
            // (they would show units the word no longer counts, and their holder's release would
            // take units of later holders: docs/design.md, "Reset"). For those layers the state
            // to restore becomes the one this try left: each known slot's `forgotten` as the
            // clearing set it (its `held` has not moved since, the word having stayed frozen
            // until its reset), a dead slot's entry zero.
            for (int l = 0; l < 3; ++l) {
                if ((not_reset & (1u << l)) != 0) continue;
                for (std::uint32_t i = 0; i < slots; ++i) {
                    if (saved_owner[i] == kUnknownIdentity) continue;
                    const std::size_t k = std::size_t{i} * 3 + l;
                    const LedgerEntry& e = state.ledger(i, r);
                    saved_forgotten[k] = e.forgotten[l].load(std::memory_order_relaxed);
                    if (is_dead(i)) saved_held[k] = e.held[l].load(std::memory_order_relaxed);
                }
            }
        }
        if (!done) refused.emplace_back(record_key(state.record(r)));
    }
    // A deferred dead slot that still holds something in a record this reset did not touch (or
    // is registered or mid-operation there) stays for a later reap to give it back; freeing it
    // here would lose those units for good.
    for (const DeadSlot& d : dead) {
        if (slot_is_empty(state, d.index) &&
            state.slot(d.index).waiting_record.load(std::memory_order_relaxed) == 0) {
            free_slot(state, d);
        }
    }
    state.header().recovery_epoch.fetch_add(1, std::memory_order_release);
    if (!refused.empty()) {
        // A refused record's words and ledgers are as they were (what a try cleared is put
        // back: docs/design.md, "Reset"); the other targets were reset.
        throw Error(
            Errc::busy,
            fmt::format("segment '{}': limiter '{}'{} not reset: a live process stayed in "
                        "the middle of an operation on it (stopped, or starved) while the reset "
                        "waited for it; continue or kill it, then reset again{}",
                        state.name(), refused.front(), refused.size() > 1 ? " and others" : "",
                        targets.size() > refused.size() ? " (the others were reset)" : ""));
    }
}

}  // namespace lim::detail
