#include "lim/weighted_semaphore.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <climits>

#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "primitives/weighted_semaphore_state.hpp"
#include "recovery/reaper.hpp"
#include "shm/process_identity.hpp"
#include "shm/record_handle.hpp"
#include "sync/futex.hpp"
#include "sync/race_point.hpp"

namespace lim::detail {
namespace {

using W = WeightedWord;

// Queued waiters re-check at least this often even when no wake comes (a waker killed between
// its release and its wake must not strand them). Requests that find the ring full poll faster.
constexpr Pacing kWeightedPacing{};
constexpr Pacing kOverflowPacing{.base = std::chrono::milliseconds{1},
                                 .max = std::chrono::milliseconds{1}};

constexpr std::uint32_t bit_of(std::uint64_t ticket) noexcept {
    return 1u << (ticket % 32);
}

std::atomic<std::uint64_t>& ring_slot(WeightedQueue& q, std::uint64_t ticket) noexcept {
    return q.ring[ticket % kRingSize];
}

// Waits aside while the word is frozen, then performs a compare-and-swap that changes nothing.
// That CAS orders this Hold before any later freeze (a reaper that freezes afterwards sees this
// slot pending and waits for it), so the rest of the operation may proceed on a frozen word.
void enter(Hold& hold, const SegmentState& state, std::atomic<std::uint64_t>& word) noexcept {
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            return;
        }
    }
}

// Wakes the owner of ticket `head` (and any sleeper sharing its bit, who re-checks and sleeps
// again). `seq` changes first, so a waiter between its check and its futex wait cannot miss it.
void wake_turn(WeightedQueue& q, std::uint64_t head) noexcept {
    q.seq.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_bitset(q.seq, INT_MAX, bit_of(head));
}

// Called by whoever dequeued ticket `t` (the head): gives the turn to t + 1, dequeuing on the way
// every cancelled ticket it meets, and wakes the new head. Races with a cancelling owner are
// settled by the compare-and-swap from `cancelled` to empty: exactly one side dequeues.
void pass_turn(const WeightedCore& c, std::uint64_t t) noexcept {
    std::uint64_t next = t + 1;
    for (;;) {
        c.queue.head.store(next, std::memory_order_seq_cst);
        auto& slot = ring_slot(c.queue, next);
        std::uint64_t e = slot.load(std::memory_order_seq_cst);
        if (!RingEntry::is(e, next, RingState::cancelled)) break;
        LIM_RACE_POINT();
        if (!slot.compare_exchange_strong(e, 0, std::memory_order_seq_cst)) break;
        c.word.fetch_sub(c.fmt.queued_unit(), std::memory_order_seq_cst);
        ++next;
    }
    if (c.fmt.queued(c.word.load(std::memory_order_seq_cst)) > 0) wake_turn(c.queue, next);
}

// Dequeues the cancelled ticket `t`, which is at the head, unless someone else already has.
void dequeue_cancelled(const WeightedCore& c, std::uint64_t t) noexcept {
    auto& slot = ring_slot(c.queue, t);
    std::uint64_t e = slot.load(std::memory_order_seq_cst);
    if (!RingEntry::is(e, t, RingState::cancelled)) return;
    LIM_RACE_POINT();
    if (!slot.compare_exchange_strong(e, 0, std::memory_order_seq_cst)) return;
    c.word.fetch_sub(c.fmt.queued_unit(), std::memory_order_seq_cst);
    pass_turn(c, t);
}

void set_waiting(Hold& hold, std::uint32_t layer, std::uint64_t n) noexcept {
    SlotHeader& slot = hold.slot();
    slot.waiting_layer.store(static_cast<std::uint32_t>(layer), std::memory_order_relaxed);
    slot.waiting_amount.store(n, std::memory_order_relaxed);
    slot.waiting_record.store(hold.record() + 1, std::memory_order_relaxed);
}

void clear_waiting(Hold& hold) noexcept {
    hold.slot().waiting_record.store(0, std::memory_order_relaxed);
}

// Leaves the queue holding ticket `t` without taking units: cancels the ticket and, if it is at
// the head, passes the turn on, so no one waits behind a ticket whose owner has gone.
void withdraw_ticket(Hold& hold, const SegmentState& state, const WeightedCore& c,
                     std::uint64_t t) noexcept {
    enter(hold, state, c.word);
    LIM_RACE_POINT();
    auto& slot = ring_slot(c.queue, t);
    std::uint64_t e = slot.load(std::memory_order_seq_cst);
    if (RingEntry::is(e, t, RingState::waiting)) {
        slot.compare_exchange_strong(e,
                                     RingEntry::make(t, RingEntry::slot(e), RingState::cancelled),
                                     std::memory_order_seq_cst);
    }
    LIM_RACE_POINT();
    if (c.queue.head.load(std::memory_order_seq_cst) == t) dequeue_cancelled(c, t);
    clear_waiting(hold);
}

enum class Enqueued { took, ticket, ring_full, refused };
enum class Admit { admitted, no_room, retry };

}  // namespace

bool WeightedCore::try_acquire(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept {
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        if (fmt.queued(w) != 0 || fmt.in_use(w) + n > capacity) return false;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w + fmt.units(n), std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            hold.add(ledger_layer, static_cast<std::int64_t>(n));
            if (counts_admissions) hold.admitted();
            return true;
        }
    }
}

bool WeightedCore::release(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept {
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        // Before each CAS: a forced reset while this loop stepped aside forgets the units.
        if (!hold.still_holds(ledger_layer, n)) [[unlikely]]
            return false;
        if (fmt.in_use(w) < n) return false;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w - fmt.units(n), std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            break;
        }
    }
    hold.add(ledger_layer, -static_cast<std::int64_t>(n));
    if (fmt.queued(w) > 0) wake_head();
    return true;
}

bool WeightedCore::acquire_until(SegmentState& state, std::uint32_t record, std::uint64_t n,
                                 std::optional<TimePoint> deadline, const Pacing& pacing) {
    const bool injected_sleep = pacing.sleep && *pacing.sleep;
    const Pacing& overflow = injected_sleep ? pacing : kOverflowPacing;
    // A waiter stranded behind a dead holder (or a dead head of the queue) reaps it.
    AutoReap auto_reap(state, pacing.now());
    int attempt = 0;
    for (;;) {
        // Take the units at once if nobody is queued and they fit; otherwise take a ticket.
        Enqueued got = Enqueued::ring_full;
        std::uint64_t t = 0;
        {
            Hold hold(state, record);
            std::uint64_t w = word.load(std::memory_order_relaxed);
            for (;;) {
                if (hold.stepped_aside(w, word, state)) continue;
                if (fmt.queued(w) == 0 && fmt.in_use(w) + n <= capacity) {
                    LIM_RACE_POINT();
                    if (word.compare_exchange_weak(w, w + fmt.units(n), std::memory_order_seq_cst,
                                                   std::memory_order_relaxed)) {
                        hold.add(ledger_layer, static_cast<std::int64_t>(n));
                        if (counts_admissions) hold.admitted();
                        got = Enqueued::took;
                        break;
                    }
                    continue;
                }
                if (fmt.queued(w) >= kRingSize) {
                    got = Enqueued::ring_full;
                    break;
                }
                // Inside a WaitCheck's callback this thread is registered for the wait that
                // called it: a ticket would take over its slot's waiting fields
                // (sync/pacing.hpp). Refused below, outside the Hold, before queueing.
                if (inside_wait_check()) [[unlikely]] {
                    got = Enqueued::refused;
                    break;
                }
                LIM_RACE_POINT();
                if (word.compare_exchange_weak(w, w + fmt.queued_unit(), std::memory_order_seq_cst,
                                               std::memory_order_relaxed)) {
                    got = Enqueued::ticket;
                    break;
                }
            }
            if (got == Enqueued::ticket) {
                LIM_RACE_POINT();
                t = queue.tail.fetch_add(1, std::memory_order_seq_cst);
                ring_slot(queue, t).store(RingEntry::make(t, hold.slot_index(), RingState::waiting),
                                          std::memory_order_seq_cst);
                set_waiting(hold, static_cast<std::uint32_t>(ledger_layer), n);
            }
        }
        if (got == Enqueued::took) return true;
        if (got == Enqueued::refused) refuse_wait_inside_check("WeightedSemaphore acquire");
        if (got == Enqueued::ring_full) {
            if (deadline && pacing.now() >= *deadline) return false;
            const std::uint32_t s = queue.seq.load(std::memory_order_seq_cst);
            auto_reap.poll(pacing.now());
            overflow.pause(queue.seq, s, deadline, attempt++);
            continue;
        }

        // Queued with ticket t: wait for our turn, then for room. Every way out but admission
        // and a dropped queue withdraws the ticket, an exception thrown by an injected clock or
        // sleep included: a ticket left behind would stall every process's queue when it
        // reached the head, and no reap helps while its owner lives.
        struct Queued {
            SegmentState& state;
            std::uint32_t record;
            const WeightedCore& c;
            std::uint64_t t;
            bool holds = true;
            std::uint32_t generation = fork_generation();
            ~Queued() {
                // In a child forked by a WaitCheck's callback on this thread (it leaves with
                // WaitStopped), ticket t is the parent's, still waiting: leave it.
                if (!holds || generation != fork_generation()) return;
                try {
                    Hold hold(state, record);  // this thread's slot exists: cannot throw here
                    withdraw_ticket(hold, state, c, t);
                } catch (...) {
                    // Unreachable in practice (see above).
                }
            }
        } queued{state, record, *this, t};
        bool requeue = false;
        while (!requeue) {
            const std::uint32_t s = queue.seq.load(std::memory_order_seq_cst);
            const std::uint64_t h = queue.head.load(std::memory_order_seq_cst);
            if (static_cast<std::int64_t>(h - t) > 0) {
                // The turn passed us without our taking it: a reset dropped the queue. Queue
                // again.
                Hold hold(state, record);
                clear_waiting(hold);
                queued.holds = false;
                requeue = true;
                continue;
            }
            if (h == t) {
                Admit a = Admit::retry;
                {
                    Hold hold(state, record);
                    std::uint64_t w = word.load(std::memory_order_relaxed);
                    for (;;) {
                        if (is_frozen(w)) {
                            hold.wait_while_frozen(word, state);
                            a = Admit::retry;
                            break;
                        }
                        if (queue.head.load(std::memory_order_seq_cst) != t) {
                            a = Admit::retry;
                            break;
                        }
                        if (fmt.in_use(w) + n > capacity) {
                            a = Admit::no_room;
                            break;
                        }
                        LIM_RACE_POINT();
                        if (word.compare_exchange_weak(w, w + fmt.units(n) - fmt.queued_unit(),
                                                       std::memory_order_seq_cst,
                                                       std::memory_order_relaxed)) {
                            a = Admit::admitted;
                            break;
                        }
                    }
                    if (a == Admit::admitted) {
                        hold.add(ledger_layer, static_cast<std::int64_t>(n));
                        if (counts_admissions) hold.admitted();
                        auto& slot = ring_slot(queue, t);
                        std::uint64_t e = slot.load(std::memory_order_seq_cst);
                        if (RingEntry::is(e, t, RingState::waiting)) {
                            slot.compare_exchange_strong(e, 0, std::memory_order_seq_cst);
                        }
                        clear_waiting(hold);
                        pass_turn(*this, t);
                    }
                }
                if (a == Admit::admitted) {
                    queued.holds = false;
                    return true;
                }
                if (a == Admit::retry) continue;
            }
            if (deadline && pacing.now() >= *deadline) return false;  // ~Queued withdraws
            auto_reap.poll(pacing.now());
            pacing.pause(queue.seq, s, deadline, attempt++, bit_of(t));
        }
    }
}

std::uint64_t WeightedCore::in_use() const noexcept {
    return fmt.in_use(word.load(std::memory_order_acquire));
}

std::uint64_t WeightedCore::queued() const noexcept {
    return fmt.queued(word.load(std::memory_order_acquire));
}

void WeightedCore::wake_head() noexcept {
    wake_turn(queue, queue.head.load(std::memory_order_seq_cst));
}

namespace {

bool contains(std::span<const std::uint32_t> v, std::uint32_t x) noexcept {
    return std::find(v.begin(), v.end(), x) != v.end();
}

// Whether ticket entry `e` belongs to a live waiter still registered on (record, layer).
bool owner_waits(const SegmentState& state, std::uint64_t e, std::uint32_t record, int layer,
                 std::span<const std::uint32_t> dead_slots) noexcept {
    const std::uint32_t slot_index = RingEntry::slot(e);
    if (slot_index >= state.geometry().max_processes || contains(dead_slots, slot_index)) {
        return false;
    }
    const SlotHeader& slot = state.slot(slot_index);
    if (SlotOwner::state(slot.owner.load(std::memory_order_acquire)) != SlotState::live) {
        return false;
    }
    return slot.waiting_record.load(std::memory_order_acquire) == record + 1 &&
           slot.waiting_layer.load(std::memory_order_relaxed) == static_cast<std::uint32_t>(layer);
}

}  // namespace

std::uint64_t recount_weighted_queue(const SegmentState& state, std::uint32_t record, int layer,
                                     WeightedQueue& q, std::atomic<std::uint64_t>& word,
                                     const WeightedFormat& fmt,
                                     std::span<const std::uint32_t> dead_slots) noexcept {
    const std::uint64_t tail = q.tail.load(std::memory_order_acquire);
    LIM_RACE_POINT();
    std::uint64_t head = q.head.load(std::memory_order_acquire);
    // A damaged head (beyond the tail, or further behind than the ring holds) is clamped.
    const std::uint64_t read_head = head;
    if (static_cast<std::int64_t>(tail - head) < 0) head = tail;
    if (tail - head > kRingSize) head = tail - kRingSize;
    LIM_RACE_POINT();
    // Repaired only if the word is still frozen after both loads (then no live queue step ran
    // between them). Once a holder has thawed it, a head read beyond the tail read may be a live
    // dequeuer's advance between the two loads, and moving it back would strand the queue behind
    // an admitted ticket: left to the next reap. From the value read (a live dequeuer moving it
    // meanwhile wins).
    if (head != read_head && is_frozen(word.load(std::memory_order_seq_cst))) {
        std::uint64_t expected = read_head;
        q.head.compare_exchange_strong(expected, head, std::memory_order_seq_cst);
    }
    for (std::uint64_t t = head; t != tail; ++t) {
        auto& slot = ring_slot(q, t);
        std::uint64_t e = slot.load(std::memory_order_acquire);
        const bool waiting = RingEntry::is(e, t, RingState::waiting);
        if (!(waiting && owner_waits(state, e, record, layer, dead_slots)) &&
            !RingEntry::is(e, t, RingState::cancelled)) {
            // A dead owner's ticket, or one whose owner died before writing it: cancel it. That
            // reading is exact only while the word stays frozen (no live slot pending, so none is
            // between its tail increment and its registration). Checked after the entry and its
            // owner were read: frozen now means frozen since the freeze. Once a holder has thawed
            // it, a ticket not yet registered may be a live enqueuer's: only a waiting entry of a
            // dead slot (which nothing reuses before this reap ends) is cancelled; the rest is
            // left to the next reap, with the record deferred.
            LIM_RACE_POINT();
            if (!is_frozen(word.load(std::memory_order_seq_cst)) &&
                !(waiting && contains(dead_slots, RingEntry::slot(e)))) {
                continue;
            }
            LIM_RACE_POINT();
            slot.compare_exchange_strong(
                e, RingEntry::make(t, RingEntry::slot(e), RingState::cancelled),
                std::memory_order_seq_cst);
        }
    }
    // Dequeue the cancelled tickets at the head exactly as a live dequeuer does (pass_turn):
    // the CAS to empty decides who dequeues, the winner decrements the queued count (an RMW that
    // keeps kFrozen) and advances the head.
    for (;;) {
        const std::uint64_t h = q.head.load(std::memory_order_seq_cst);
        if (h == tail || static_cast<std::int64_t>(tail - h) < 0) break;
        auto& slot = ring_slot(q, h);
        std::uint64_t e = slot.load(std::memory_order_seq_cst);
        if (!RingEntry::is(e, h, RingState::cancelled)) break;
        LIM_RACE_POINT();
        if (!slot.compare_exchange_strong(e, 0, std::memory_order_seq_cst)) break;
        if (fmt.queued(word.load(std::memory_order_seq_cst)) > 0)
            word.fetch_sub(fmt.queued_unit(), std::memory_order_seq_cst);
        q.head.store(h + 1, std::memory_order_seq_cst);
    }
    const std::uint64_t left =
        q.tail.load(std::memory_order_acquire) - q.head.load(std::memory_order_acquire);
    return std::min<std::uint64_t>(left, kRingSize);
}

void wake_queue(WeightedQueue& q) noexcept {
    q.seq.fetch_add(1, std::memory_order_seq_cst);
    futex_wake(q.seq, INT_MAX);
}

void reset_weighted_queue(WeightedQueue& q) noexcept {
    for (auto& e : q.ring)
        e.store(0, std::memory_order_relaxed);
    q.head.store(q.tail.load(std::memory_order_acquire), std::memory_order_seq_cst);
}

std::int64_t recount_weighted_layer(const SegmentState& state, std::uint32_t record, int layer,
                                    WeightedLayer& l, std::int64_t live_units,
                                    std::span<const std::uint32_t> dead_slots,
                                    bool* abandoned) noexcept {
    const std::uint64_t queued =
        recount_weighted_queue(state, record, layer, l.queue, l.word, kWeightedFormat, dead_slots);
    // Clamped to the units field (a damaged ledger can make the sum anything; doubt means held).
    live_units = std::clamp<std::int64_t>(live_units, 0, W::kInUseMask);
    const std::uint64_t next = W::make(static_cast<std::uint64_t>(live_units),
                                       std::min<std::uint64_t>(queued, W::kQueuedMax));
    // One CAS from the frozen value (see recount_semaphore_word): a word still frozen has been
    // frozen since this reap froze it, so the queue above was stable and `queued` is exact.
    std::uint64_t w = l.word.load(std::memory_order_acquire);
    for (;;) {
        if (!is_frozen(w)) {
            if (abandoned != nullptr) *abandoned = true;
            wake_queue(l.queue);
            return 0;
        }
        LIM_RACE_POINT();
        if (l.word.compare_exchange_strong(w, next, std::memory_order_seq_cst,
                                           std::memory_order_relaxed)) {
            break;
        }
    }
    wake_queue(l.queue);
    return static_cast<std::int64_t>(W::in_use(w)) - live_units;
}

std::atomic<void (*)(int step) noexcept> weighted_reset_hook{nullptr};

void drop_weighted_queue(WeightedQueue& q, std::atomic<std::uint64_t>& word, std::uint64_t kept,
                         const WeightedFormat& fmt) noexcept {
    // The word is as the reset's first CAS left it (`kept`) unless a holder broke the freeze since
    // (this resetter stopped past kFrozenBreakTimeout): then the units' reset has landed, and the
    // queue is live again with the count the word keeps for it, so it is left as it is (its
    // waiters keep their turn). Nothing else changes a frozen word while the reset holds the
    // recovery lock and no live slot is pending on the record.
    run_weighted_reset_hook(1);
    LIM_RACE_POINT();
    if (word.load(std::memory_order_seq_cst) != kept) return;
    reset_weighted_queue(q);
    LIM_RACE_POINT();
    // Fails only if a holder broke the freeze between the load above and here: the tickets then
    // dropped stay counted until the next reap or reset (docs/design.md, "Reset").
    std::uint64_t expected = kept;
    word.compare_exchange_strong(expected, fmt.with(kept, 0, 0) & ~kFrozen,
                                 std::memory_order_seq_cst, std::memory_order_relaxed);
}

bool reset_weighted_layer(WeightedLayer& l) noexcept {
    std::uint64_t w = l.word.load(std::memory_order_acquire);
    if (!is_frozen(w)) return false;
    run_weighted_reset_hook(0);
    // The units first, with the queued count and kFrozen kept (a CAS from the frozen value), and
    // the queue only once that CAS has landed: a CAS that finds the word thawed by a holder (this
    // resetter stopped past kFrozenBreakTimeout) leaves the record exactly as it was, its queue
    // included. Before, the queue was emptied first, and a failed CAS (then a refused retry) left
    // the word counting tickets no longer queued: try_acquire refused behind phantom waiters
    // until the next reap or reset (docs/design.md, "Reset").
    std::uint64_t kept = 0;
    for (;;) {
        kept = kFrozen | W::make(0, W::queued(w));
        LIM_RACE_POINT();
        if (l.word.compare_exchange_strong(w, kept, std::memory_order_seq_cst,
                                           std::memory_order_relaxed)) {
            break;
        }
        if (!is_frozen(w)) {
            wake_queue(l.queue);
            return false;
        }
    }
    drop_weighted_queue(l.queue, l.word, kept, kWeightedFormat);
    wake_queue(l.queue);
    return true;
}

namespace {

WeightedLayer& layer_at(SegmentState& state, std::uint32_t record) noexcept {
    return reinterpret_cast<WeightedSemaphoreBody*>(state.record(record).body)->layer;
}

void weighted_freeze(SegmentState& state, std::uint32_t record) noexcept {
    layer_at(state, record).word.fetch_or(kFrozen, std::memory_order_seq_cst);
}

void weighted_thaw(SegmentState& state, std::uint32_t record) noexcept {
    layer_at(state, record).word.fetch_and(~kFrozen, std::memory_order_seq_cst);
}

LiveHoldings weighted_recount(SegmentState& state, std::uint32_t record, const LiveHoldings& live,
                              std::span<const std::uint32_t> dead_slots, TimePoint) noexcept {
    LiveHoldings given;
    given.held[0] = recount_weighted_layer(state, record, 0, layer_at(state, record), live.held[0],
                                           dead_slots, &given.abandoned);
    return given;
}

std::uint8_t weighted_reset(SegmentState& state, std::uint32_t record, TimePoint) noexcept {
    return reset_weighted_layer(layer_at(state, record)) ? 0 : kAllLayers;
}

}  // namespace

void inspect_weighted_semaphore(const SegmentState& state, std::uint32_t record, TimePoint,
                                RecordSnapshot& out) {
    const Record& r = state.record(record);
    const auto& config = *reinterpret_cast<const WeightedSemaphoreConfig*>(r.config);
    const auto& layer = reinterpret_cast<const WeightedSemaphoreBody*>(r.body)->layer;
    const std::uint64_t w = layer.word.load(std::memory_order_acquire);
    out.config = {{"capacity", std::to_string(config.capacity)}};
    out.layer_names = {"units"};
    out.layers = {Quantity::layer("in_use", static_cast<double>(WeightedWord::in_use(w)),
                                  static_cast<double>(config.capacity), "capacity")};
    out.waiters = static_cast<std::uint32_t>(WeightedWord::queued(w));
    out.frozen = is_frozen(w);
}

const KindOps kWeightedSemaphoreOps{
    .freeze = weighted_freeze,
    .recount = weighted_recount,
    .thaw = weighted_thaw,
    .reset = weighted_reset,
    .layers = 1,
    .layer_names = {"units", nullptr, nullptr},
};

}  // namespace lim::detail

// ---------------------------------------------------------------------------------------------
// The public handle
// ---------------------------------------------------------------------------------------------

namespace lim {
namespace {

using detail::WeightedSemaphoreBody;
using detail::WeightedSemaphoreConfig;

std::uint64_t capacity_of(const detail::RecordRef& ref) noexcept {
    return detail::config_of<WeightedSemaphoreConfig>(ref).capacity;
}

detail::WeightedCore core_of(const detail::RecordRef& ref) noexcept {
    auto& layer = detail::body_of<WeightedSemaphoreBody>(ref).layer;
    return {layer.word, layer.queue, capacity_of(ref), 0};
}

detail::RecordRef open_weighted(const Segment& segment, std::string_view key,
                                const WeightedSemaphoreOptions& options, bool adopt) {
    if (options.capacity < 1 || options.capacity > detail::WeightedWord::kMaxCapacity) {
        throw Error(Errc::invalid_argument,
                    fmt::format("weighted semaphore '{}': capacity is {}; it must be 1..{}", key,
                                options.capacity, detail::WeightedWord::kMaxCapacity));
    }
    const WeightedSemaphoreConfig config{options.capacity};
    return detail::open_record<WeightedSemaphoreConfig>(
        segment, detail::RecordKind::weighted_semaphore, 0, "weighted semaphore", key, config,
        adopt, nullptr, [](const WeightedSemaphoreConfig& c, std::uint16_t) {
            return fmt::format("a weighted semaphore of capacity {}", c.capacity);
        });
}

}  // namespace

WeightedSemaphore WeightedSemaphore::open(const Segment& segment, std::string_view key,
                                          const WeightedSemaphoreOptions& options) {
    return WeightedSemaphore(open_weighted(segment, key, options, false));
}

WeightedSemaphore WeightedSemaphore::open(const Segment& segment, std::string_view key,
                                          const WeightedSemaphoreOptions& options, AdoptExisting) {
    return WeightedSemaphore(open_weighted(segment, key, options, true));
}

bool WeightedSemaphore::try_acquire(std::uint64_t n) {
    n = std::min(n, capacity_of(ref_));
    if (n == 0) return true;
    detail::Hold hold(*ref_.state, ref_.index);
    return core_of(ref_).try_acquire(hold, *ref_.state, n);
}

void WeightedSemaphore::acquire(std::uint64_t n) {
    n = std::min(n, capacity_of(ref_));
    if (n == 0) return;
    core_of(ref_).acquire_until(*ref_.state, ref_.index, n, std::nullopt, detail::kWeightedPacing);
}

bool WeightedSemaphore::acquire_until(std::uint64_t n, TimePoint deadline) {
    n = std::min(n, capacity_of(ref_));
    if (n == 0) return true;
    return core_of(ref_).acquire_until(*ref_.state, ref_.index, n, deadline,
                                       detail::kWeightedPacing);
}

void WeightedSemaphore::release(std::uint64_t n) {
    n = std::min(n, capacity_of(ref_));
    if (n == 0) return;
    detail::Hold hold(*ref_.state, ref_.index);
    hold.require_held(core_of(ref_).ledger_layer, n, "weighted semaphore");
    if (!core_of(ref_).release(hold, *ref_.state, n)) {
        hold.require_held(core_of(ref_).ledger_layer, n, "weighted semaphore");  // reset meanwhile
        throw Error(Errc::over_release,
                    fmt::format("weighted semaphore '{}': release({}) but only {} units are in use",
                                ref_.key(), n, in_use()));
    }
}

HandOff WeightedSemaphore::hand_off(std::uint64_t n) {
    return detail::hand_off_units(*ref_.state, ref_.index, core_of(ref_).ledger_layer, n,
                                  "weighted semaphore", ref_.key());
}

bool WeightedSemaphore::receive(const HandOff& h) {
    return detail::receive_units(*ref_.state, ref_.index, core_of(ref_).ledger_layer, h,
                                 "weighted semaphore", ref_.key());
}

std::uint64_t WeightedSemaphore::in_use() const noexcept {
    return core_of(ref_).in_use();
}

std::uint64_t WeightedSemaphore::capacity() const noexcept {
    return capacity_of(ref_);
}

std::uint32_t WeightedSemaphore::waiters() const noexcept {
    return static_cast<std::uint32_t>(core_of(ref_).queued());
}

}  // namespace lim
