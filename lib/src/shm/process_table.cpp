#include "shm/process_table.hpp"

#include <fcntl.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "lim/error.hpp"
#include "recovery/reaper.hpp"
#include "shm/file_lock.hpp"
#include "sync/race_point.hpp"

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
// Set once tl_slots is destroyed (thread exit, or the main thread's exit() before static
// destructors run). Trivially destructible, so it stays readable for later destructors.
constinit thread_local bool tl_slots_gone = false;

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
    e.holder = h;
}

// Sets or clears this process's lock on slot `index`'s byte through `fd`. Returns 0 or errno.
int set_slot_lock(int fd, std::uint32_t index, short type) {
    struct flock fl {};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(kSlotLockBase + index);
    fl.l_len = 1;
    fl.l_pid = 0;  // required for OFD locks
    for (;;) {
        if (::fcntl(fd, F_OFD_SETLK, &fl) == 0) return 0;
        if (errno != EINTR) return errno;
    }
}

// The mapping's slot locks as this process may use them now: reopened in a forked child (whose
// copy of the parent's description the fork hook closed). Caller holds lock_private_registry().
SegmentState::SlotLocks& own_slot_locks(SegmentState& state) {
    SegmentState::SlotLocks& locks = state.slot_locks();
    if (locks.fd < 0 || locks.fork_gen != fork_generation()) {
        // The parent's descriptor number (if any) is not ours to close: the hook closed it.
        locks.fd = open_private_fd_locked(state.fd());
        locks.fork_gen = fork_generation();
        locks.mine.assign(state.geometry().max_processes, 0);
    }
    return locks;
}

// The slot locks if this process has some in this mapping; nullptr otherwise. Caller holds the
// registry lock.
SegmentState::SlotLocks* current_slot_locks(SegmentState& state) noexcept {
    SegmentState::SlotLocks& locks = state.slot_locks();
    if (locks.fd < 0 || locks.fork_gen != fork_generation()) return nullptr;
    return &locks;
}

// Gives a slot back: free if its ledger is empty, else retired (its holdings stay the process's,
// and a later thread of the process may adopt it). `owner` is the owner word we expect; if the
// slot changed hands meanwhile, it is left alone. A freed slot's lock byte is released after the
// CAS that frees it, so the slot is never occupied without its lock. Caller holds the registry
// lock.
void release_slot_locked(SegmentState& state, std::uint32_t index, std::uint64_t owner) noexcept {
    SlotHeader& slot = state.slot(index);
    const std::uint32_t pid = SlotOwner::pid(owner);
    const std::uint32_t gen = SlotOwner::generation(owner);
    if (SlotOwner::state(owner) == SlotState::taken && !slot_is_empty(state, index)) return;
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
        LIM_RACE_POINT();
        const bool freed = slot.owner.compare_exchange_strong(
            owner, SlotOwner::make(0, gen, SlotState::free), std::memory_order_release,
            std::memory_order_relaxed);
        LIM_RACE_POINT();
        if (SegmentState::SlotLocks* locks = current_slot_locks(state); locks && freed) {
            set_slot_lock(locks->fd, index, F_UNLCK);
            locks->mine[index] = 0;
        }
    } else {
        slot.tid.store(0, std::memory_order_relaxed);
        LIM_RACE_POINT();
        slot.owner.compare_exchange_strong(owner, SlotOwner::make(pid, gen, SlotState::retired),
                                           std::memory_order_release, std::memory_order_relaxed);
    }
}

ThreadSlots::~ThreadSlots() {
    // Later destructors on this thread (a thread_local or static Permit) must not use the slots
    // given back here: empty the hot-path cache so that they miss it, and mark the registry gone
    // so that register_holder hands them an ephemeral slot instead.
    tl_slots_gone = true;
    for (HolderCacheEntry& e : tl_holder_cache)
        e = HolderCacheEntry{};
    const std::uint32_t gen = fork_generation();
    for (Entry& e : entries) {
        if (e.fork_gen != gen) continue;  // the parent's slots, inherited across fork
        if (auto state = e.state.lock()) {
            auto lock = lock_private_registry();
            release_slot_locked(*state, e.holder.slot_index, e.owner);
        }
    }
}

// One pass of claiming: first a retired slot this process holds the lock of (its ledger is the
// process's anyway), else a free one whose lock byte we can take. nullopt when none is left.
// With `as` = parcel: no adoption, and the slot is published as a parcel instead of live.
std::optional<std::pair<Holder, std::uint64_t>> try_claim_slot(SegmentState& state,
                                                               SlotState as = SlotState::live) {
    const auto pid = static_cast<std::uint32_t>(this_process().pid);
    const pid_t tid = this_thread_id();
    const std::uint32_t n = state.geometry().max_processes;
    auto registry = lock_private_registry();
    SegmentState::SlotLocks& locks = own_slot_locks(state);

    // Parcels a receiver has taken (and emptied) go back to the table first.
    for (std::uint32_t i = 0; i < n; ++i) {
        if (locks.mine[i] == 0) continue;
        const std::uint64_t w = state.slot(i).owner.load(std::memory_order_acquire);
        if (SlotOwner::state(w) == SlotState::taken) release_slot_locked(state, i, w);
    }

    // Adoption is decided by the lock, not by the pid: only the process whose description holds
    // the byte may adopt, so a process that reuses a dead one's pid can never adopt its slots.
    for (std::uint32_t i = 0; i < n && as == SlotState::live; ++i) {
        if (locks.mine[i] == 0) continue;
        SlotHeader& slot = state.slot(i);
        std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        if (SlotOwner::state(w) != SlotState::retired) continue;
        const std::uint64_t mine = SlotOwner::make(pid, SlotOwner::generation(w), SlotState::live);
        LIM_RACE_POINT();
        if (slot.owner.compare_exchange_strong(w, mine, std::memory_order_acq_rel)) {
            slot.tid.store(tid, std::memory_order_relaxed);
            slot.attach_uid.store(state.uid(), std::memory_order_relaxed);
            return std::make_pair(make_holder(state, i), mine);
        }
    }

    const std::uint32_t start = static_cast<std::uint32_t>(tid) * 2654435761u % n;
    for (std::uint32_t k = 0; k < n; ++k) {
        const std::uint32_t i = (start + k) % n;
        SlotHeader& slot = state.slot(i);
        std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        if (SlotOwner::state(w) != SlotState::free) continue;
        // Lock first, claim second: the slot is never occupied while its byte is free, so a
        // checker can never see a half-claimed slot as dead. A byte someone else holds (a
        // previous owner between its freeing CAS and its unlock, or another claimer) is skipped.
        if (set_slot_lock(locks.fd, i, F_WRLCK) != 0) continue;
        LIM_RACE_POINT();
        const std::uint32_t gen = SlotOwner::generation(w) + 1;
        if (!slot.owner.compare_exchange_strong(w, SlotOwner::make(pid, gen, SlotState::claiming),
                                                std::memory_order_acq_rel)) {
            if (locks.mine[i] == 0) set_slot_lock(locks.fd, i, F_UNLCK);
            continue;
        }
        locks.mine[i] = 1;
        LIM_RACE_POINT();
        slot.tid.store(tid, std::memory_order_relaxed);
        for (auto& r : slot.reserved_identity)
            r.store(0, std::memory_order_relaxed);
        slot.attached_wall_ns.store(wall_now_ns(), std::memory_order_relaxed);
        slot.attach_uid.store(state.uid(), std::memory_order_relaxed);
        slot.pending.store(0, std::memory_order_relaxed);
        slot.waiting_record.store(0, std::memory_order_relaxed);
        const std::uint64_t mine = SlotOwner::make(pid, gen, as);
        slot.owner.store(mine, std::memory_order_release);
        return std::make_pair(make_holder(state, i), mine);
    }
    return std::nullopt;
}

// Claims a slot; on a full table, reaps once (a table full of the dead must not refuse a live
// process) and tries again. Throws Error(table_full) if the table is still full.
std::pair<Holder, std::uint64_t> claim_slot(SegmentState& state) {
    if (auto claimed = try_claim_slot(state)) return *claimed;
    try {
        reap(state, ReapLock::wait);  // needs no slot of its own
    } catch (...) {
        // Cannot reap now (EMFILE, a read-only file): report the full table below.
    }
    if (auto claimed = try_claim_slot(state)) return *claimed;
    const std::uint32_t n = state.geometry().max_processes;
    throw Error(Errc::table_full,
                fmt::format("the process table of segment '{}' is full ({} slots, one per thread "
                            "that holds permits, all of live processes): create the segment with "
                            "a larger max_processes",
                            state.name(), n));
}

}  // namespace

void forget_cached_holders() noexcept {
    for (HolderCacheEntry& e : tl_holder_cache)
        e = HolderCacheEntry{};
}

Holder register_holder(SegmentState& state) {
    if (tl_slots_gone) {
        Holder h = claim_slot(state).first;
        h.ephemeral = true;
        return h;
    }
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

const Holder& register_cached_holder(SegmentState& state) {
    // An ephemeral holder is not cached (its slot goes back after one operation): it is
    // returned through this thread-local copy instead. Trivially destructible, so it stays
    // usable after the thread's other thread-locals are destroyed.
    static constinit thread_local Holder tl_ephemeral{};
    const Holder h = register_holder(state);
    if (h.ephemeral) {
        tl_ephemeral = h;
        return tl_ephemeral;
    }
    for (const HolderCacheEntry& e : tl_holder_cache) {
        if (e.uid == state.uid()) return e.holder;
    }
    tl_ephemeral = h;  // unreachable: register_holder caches every holder it does not mark
    return tl_ephemeral;
}

void release_ephemeral(SegmentState& state, SlotHeader& slot) noexcept {
    auto lock = lock_private_registry();
    release_slot_locked(state, state.slot_index_of(slot),
                        slot.owner.load(std::memory_order_acquire));
}

void release_ephemeral(SegmentState& state, const Holder& h) noexcept {
    auto lock = lock_private_registry();
    release_slot_locked(state, h.slot_index, h.slot->owner.load(std::memory_order_acquire));
}

void release_slots_of_mapping(SegmentState& state) noexcept {
    auto lock = lock_private_registry();
    SegmentState::SlotLocks* locks = current_slot_locks(state);
    if (locks == nullptr) return;  // nothing claimed here (or only the parent's, before a fork)
    const std::uint32_t n = state.geometry().max_processes;
    for (std::uint32_t i = 0; i < n && i < locks->mine.size(); ++i) {
        if (locks->mine[i] == 0) continue;
        const std::uint64_t w = state.slot(i).owner.load(std::memory_order_acquire);
        const SlotState st = SlotOwner::state(w);
        // Parcels not yet taken are left: closing the description below makes them dead, and
        // the next reap gives their units back (the receiver then finds nothing to take).
        if (st == SlotState::live || st == SlotState::claiming || st == SlotState::taken) {
            release_slot_locked(state, i, w);
        }
    }
    // Drops the locks of the slots left retired: what they hold can no longer be released by
    // anyone (every handle of the mapping is gone), so the next reap gives it back.
    close_private_fd_locked(locks->fd);
    locks->fd = -1;
    locks->mine.clear();
}

HandOff hand_off_holding(SegmentState& state, std::uint32_t record, int layer, std::int64_t n) {
    const Holder me = holder(state);  // before the lock: a claim on a full table reaps
    // Under the recovery lock: no recount sums the ledgers between the two stores below. A
    // reaper stopped holding it makes us give up after kLockWaitTimeout (Error(busy)), before
    // anything moved.
    const FileLock lock =
        FileLock::lock_or_busy(state.fd(), LockByte::recovery, state.name(), "hand off a holding");
    if (process_holding(state, record, layer) < n) {
        throw Error(Errc::over_release,
                    fmt::format("hand_off({}) but this process holds fewer units", n));
    }
    auto parcel = try_claim_slot(state, SlotState::parcel);
    if (!parcel) {
        throw Error(Errc::table_full,
                    fmt::format("no free slot in segment '{}' for a hand-off", state.name()));
    }
    LedgerEntry& entry = me.entry(record);
    auto& mine = entry.held[layer];
    // Units another thread of this process acquired leave this thread's entry negative.
    if (holding(entry, layer) < n) state.note_owing(record, layer);
    mine.store(mine.load(std::memory_order_relaxed) - n, std::memory_order_relaxed);
    LIM_RACE_POINT();
    // A free slot's entries are all zero (layout.hpp, LedgerEntry), so the parcel holds n.
    parcel->first.entry(record).held[layer].store(n, std::memory_order_relaxed);
    return HandOff{.slot = parcel->first.slot_index,
                   .record = record,
                   .owner = parcel->second,
                   .amount = n,
                   .layer = layer};
}

bool receive_holding(SegmentState& state, const HandOff& h) {
    if (h.slot >= state.geometry().max_processes || h.record >= state.records_used() ||
        h.layer < 0 || h.layer > 2) {
        return false;
    }
    const Holder me = holder(state);
    // As hand_off_holding: Error(busy) after kLockWaitTimeout, before anything moved.
    const FileLock lock =
        FileLock::lock_or_busy(state.fd(), LockByte::recovery, state.name(), "receive a hand-off");
    SlotHeader& slot = state.slot(h.slot);
    std::uint64_t w = slot.owner.load(std::memory_order_acquire);
    if (w != h.owner || SlotOwner::state(w) != SlotState::parcel) return false;
    if (!slot_owner_alive(state, h.slot, w)) return false;  // the giver died: a reap returns it
    LIM_RACE_POINT();
    if (!slot.owner.compare_exchange_strong(
            w, SlotOwner::make(SlotOwner::pid(w), SlotOwner::generation(w), SlotState::taken),
            std::memory_order_acq_rel)) {
        return false;
    }
    LedgerEntry& from = state.ledger(h.slot, h.record);
    auto& to = me.entry(h.record).held[h.layer];
    // What the parcel holds (nothing, if a forced reset forgot it meanwhile).
    const std::int64_t amount = holding(from, h.layer);
    to.store(to.load(std::memory_order_relaxed) + amount, std::memory_order_relaxed);
    LIM_RACE_POINT();
    // Under the recovery lock, nobody else writes either word of the parcel's entry.
    from.forgotten[h.layer].store(0, std::memory_order_relaxed);
    from.held[h.layer].store(0, std::memory_order_release);  // now the giver may free the parcel
    return true;
}

HandOff hand_off_units(SegmentState& state, std::uint32_t record, int layer, std::uint64_t n,
                       std::string_view what, std::string_view key) {
    if (n == 0 || n >= (1ULL << 62)) {
        throw Error(
            Errc::invalid_argument,
            fmt::format("{} '{}': hand_off({}): the amount must be 1..2^62-1", what, key, n));
    }
    const auto amount = static_cast<std::int64_t>(n);
    // A first check without the recovery lock, for the message; hand_off_holding checks again
    // under it.
    const std::int64_t mine = process_holding(state, record, layer);
    if (mine < amount) {
        throw Error(Errc::over_release,
                    fmt::format("{} '{}': hand_off({}) but this process holds {} of its units",
                                what, key, n, std::max<std::int64_t>(mine, 0)));
    }
    return hand_off_holding(state, record, layer, amount);
}

bool receive_units(SegmentState& state, std::uint32_t record, int layer, const HandOff& h,
                   std::string_view what, std::string_view key) {
    if (h.record != record || h.layer != layer) {
        throw Error(
            Errc::invalid_argument,
            fmt::format("{} '{}': receive of a hand-off made by another limiter", what, key));
    }
    return receive_holding(state, h);
}

std::int64_t process_holding(SegmentState& state, std::uint32_t record, int layer) {
    auto lock = lock_private_registry();
    SegmentState::SlotLocks* locks = current_slot_locks(state);
    if (locks == nullptr) return 0;
    std::int64_t sum = 0;
    for (std::uint32_t i = 0; i < locks->mine.size(); ++i) {
        if (locks->mine[i] == 0) continue;
        // A parcel's units are offered to another process: no longer ours to release.
        const SlotState st = SlotOwner::state(state.slot(i).owner.load(std::memory_order_acquire));
        if (st == SlotState::parcel || st == SlotState::taken) continue;
        sum += holding(state.ledger(i, record), layer);
    }
    return sum;
}

bool slot_is_empty(const SegmentState& state, std::uint32_t slot_index) noexcept {
    if (state.slot(slot_index).pending.load(std::memory_order_acquire) != 0) return false;

    const std::uint32_t used = state.records_used();
    for (std::uint32_t r = 0; r < used; ++r) {
        // Both words zero, not only their difference: a slot whose holding a forced reset
        // forgot (forgotten = held) is kept (retired) rather than freed, so that a reset refused
        // later can give it back to the same slot (docs/design.md, "Reset"), and a free slot's
        // entries are all zero. A later thread of the process adopts it; a reap frees it.
        // `forgotten` is read with an RMW that changes nothing (adding 0), paired with the RMW a
        // reset's clearing stores it with (recovery/reaper.cpp): either the reset acquires this
        // thread's last store to `held` or this read sees the reset's `forgotten`, so a slot is
        // never freed with a `forgotten` left in its row.
        LedgerEntry& e = state.ledger(slot_index, r);
        for (int l = 0; l < 3; ++l) {
            if (e.held[l].load(std::memory_order_relaxed) != 0 ||
                e.forgotten[l].fetch_add(0, std::memory_order_acq_rel) != 0) {
                return false;
            }
        }
    }
    return true;
}

namespace {

// Marks in `held` which slots in [first, last) have their lock byte held by any description other
// than the one behind `fd`. F_OFD_GETLK reports one conflicting lock in the range (not
// necessarily the lowest), so the range is split around each lock found; the number of calls is
// about twice the number of runs of locked bytes (adjacent bytes locked through one description
// merge into one lock). A failed call marks the whole range held: doubt means alive.
void scan_locks(int fd, std::uint32_t first, std::uint32_t last, std::vector<bool>& held) {
    std::vector<std::pair<std::uint32_t, std::uint32_t>> todo{{first, last}};
    while (!todo.empty()) {
        const auto [lo, hi] = todo.back();
        todo.pop_back();
        if (lo >= hi) continue;
        struct flock fl {};
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = static_cast<off_t>(kSlotLockBase + lo);
        fl.l_len = static_cast<off_t>(hi - lo);
        fl.l_pid = 0;
        int rc;
        do {
            rc = ::fcntl(fd, F_OFD_GETLK, &fl);
        } while (rc != 0 && errno == EINTR);
        if (rc != 0) {
            std::fill(held.begin() + lo, held.begin() + hi, true);
            continue;
        }
        if (fl.l_type == F_UNLCK) continue;
        const auto lock_lo = static_cast<std::uint64_t>(fl.l_start);
        const std::uint64_t lock_hi =
            fl.l_len == 0 ? ~0ULL : lock_lo + static_cast<std::uint64_t>(fl.l_len);
        const std::uint32_t a =
            lock_lo <= kSlotLockBase + lo
                ? lo
                : static_cast<std::uint32_t>(std::min<std::uint64_t>(lock_lo - kSlotLockBase, hi));
        const std::uint32_t b =
            lock_hi >= kSlotLockBase + hi
                ? hi
                : static_cast<std::uint32_t>(std::max<std::uint64_t>(lock_hi - kSlotLockBase, a));
        if (a >= b) {  // a reply outside what we asked: trust nothing in the range
            std::fill(held.begin() + lo, held.begin() + hi, true);
            continue;
        }
        std::fill(held.begin() + a, held.begin() + b, true);
        todo.emplace_back(lo, a);
        todo.emplace_back(b, hi);
    }
}

}  // namespace

std::vector<SlotJudgement> judge_slots(const SegmentState& state) {
    const std::uint32_t n = state.geometry().max_processes;
    std::vector<SlotJudgement> out(n);
    for (std::uint32_t i = 0; i < n; ++i)
        out[i] = {state.slot(i).owner.load(std::memory_order_acquire), false};
    std::vector<bool> held(n, false);
    // The segment's own descriptor holds no slot lock, so every slot lock conflicts with it.
    scan_locks(state.fd(), 0, n, held);
    for (std::uint32_t i = 0; i < n; ++i) {
        if (!slot_is_occupied(out[i].owner) || held[i]) continue;
        // Unlocked now; dead only if the same owner word spans the test. A live owner holds the
        // byte for the whole time its owner word is in the slot (lock before the claiming CAS,
        // unlock after the freeing CAS), so an unchanged word with a free byte is a dead owner.
        // The generation bumps on every claim, so an unchanged word is the same tenure.
        out[i].dead = state.slot(i).owner.load(std::memory_order_acquire) == out[i].owner;
    }
    return out;
}

bool slot_owner_alive(const SegmentState& state, std::uint32_t index, std::uint64_t owner) {
    if (!slot_is_occupied(owner)) return false;
    std::vector<bool> held(state.geometry().max_processes, false);
    scan_locks(state.fd(), index, index + 1, held);
    if (held[index]) return true;
    return state.slot(index).owner.load(std::memory_order_acquire) != owner;
}

std::uint32_t count_live_processes(const SegmentState& state) {
    std::vector<std::uint32_t> seen;
    for (const SlotJudgement& j : judge_slots(state)) {
        if (!slot_is_occupied(j.owner) || j.dead) continue;
        const std::uint32_t pid = SlotOwner::pid(j.owner);
        if (std::find(seen.begin(), seen.end(), pid) == seen.end()) seen.push_back(pid);
    }
    return static_cast<std::uint32_t>(seen.size());
}

}  // namespace lim::detail
