#include "lim/dispatch.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>

#include "dispatch/dispatch_state.hpp"
#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "shm/ledger.hpp"
#include "shm/names.hpp"
#include "shm/process_identity.hpp"
#include "shm/record_handle.hpp"
#include "shm/records.hpp"
#include "sync/futex.hpp"

namespace lim::detail {

namespace {
// DispatchImpl::quick_gate of a Dispatch that does not pack: never zero.
const std::atomic<std::int64_t> kUnpackedGate{1};
}  // namespace

DispatchImpl::DispatchImpl(RecordRef r, BackoffWindow w, const DispatchOptions& o)
    : ref(std::move(r)),
      window(std::move(w)),
      body(&body_of<DispatchBody>(ref)),
      config(&config_of<DispatchConfig>(ref)),
      window_body(&body_of<BackoffWindowBody>(window.record_ref())),
      clock(o.clock),
      sleep(o.sleep),
      pacing{.base = o.acquire_backoff.base,
             .max = o.acquire_backoff.max,
             .jitter = o.acquire_backoff.jitter,
             .clock = &clock,
             .sleep = &sleep},
      concurrency(config->concurrency),
      byte_budget(config->byte_budget),
      mapping_uid(ref.state->uid()),
      quick_gate(is_packed(*config) ? &window_body->until : &kUnpackedGate),
      default_clock(!o.clock),
      packed(is_packed(*config)) {}

inline bool DispatchImpl::take_packed(Hold& hold, const SegmentState& state,
                                      std::uint64_t charge) noexcept {
    using P = DispatchPacked;
    std::atomic<std::uint64_t>& word = body->concurrency;
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        if (P::kSlots.in_use(w) >= config->concurrency) return false;
        if (charge != 0 &&
            (P::kBytes.queued(w) != 0 || P::kBytes.in_use(w) + charge > config->byte_budget)) {
            return false;
        }
        LIM_RACE_POINT();
        // Both fields stay within their widths: slots <= concurrency <= kMaxConcurrency, bytes <=
        // byte_budget <= kMaxBudget.
        if (word.compare_exchange_weak(w, w + 1 + P::kBytes.units(charge),
                                       std::memory_order_seq_cst, std::memory_order_relaxed)) {
            hold.add(kDispatchSlotsLayer, 1);
            if (charge != 0) hold.add(kDispatchBytesLayer, static_cast<std::int64_t>(charge));
            return true;
        }
    }
}

inline bool DispatchImpl::give_packed(Hold& hold, const SegmentState& state,
                                      std::uint64_t charge) noexcept {
    using P = DispatchPacked;
    std::atomic<std::uint64_t>& word = body->concurrency;
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        // Before each CAS: a forced reset while this loop stepped aside forgets the units (the
        // layer releases the caller falls back to check again, and give nothing back).
        if (!hold.still_holds(kDispatchSlotsLayer, 1) ||
            (charge != 0 && !hold.still_holds(kDispatchBytesLayer, charge))) [[unlikely]]
            return false;
        if (P::kSlots.in_use(w) < 1 || P::kBytes.in_use(w) < charge) return false;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w - 1 - P::kBytes.units(charge),
                                       std::memory_order_seq_cst, std::memory_order_relaxed)) {
            break;
        }
    }
    hold.add(kDispatchSlotsLayer, -1);
    if (charge != 0) hold.add(kDispatchBytesLayer, -static_cast<std::int64_t>(charge));
    // `w` is the word the CAS replaced: it tells whether anyone sleeps or queues, at no extra
    // cost (one test of both fields' bits).
    constexpr std::uint64_t kWaitBits = (P::kSlots.single_max << P::kSlots.single_shift) |
                                        (P::kBytes.queued_max << P::kBytes.queued_shift);
    if ((w & kWaitBits) != 0) [[unlikely]]
        wake_after_give(w, charge);
    return true;
}

void DispatchImpl::wake_after_give(std::uint64_t w, std::uint64_t charge) noexcept {
    using P = DispatchPacked;
    if (P::kSlots.single(w) > 0) wake_after_release(body->concurrency, P::kSlots, w, 1);
    if (charge != 0 && P::kBytes.queued(w) > 0) bytes().wake_head();
}

bool DispatchImpl::backoff_at(std::int64_t until) {
    if (default_clock && until == expired_until.load(std::memory_order_relaxed)) return false;
    const std::int64_t now_ns = to_nanos(now());
    if (backoff_active_at(now_ns, until, config->backoff_window_ns)) return true;
    if (default_clock && now_ns > until) expired_until.store(until, std::memory_order_relaxed);
    return false;
}

namespace {

DispatchBody& body_at(SegmentState& state, std::uint32_t record) noexcept {
    return *reinterpret_cast<DispatchBody*>(state.record(record).body);
}

const DispatchConfig& config_at(SegmentState& state, std::uint32_t record) noexcept {
    return *reinterpret_cast<const DispatchConfig*>(state.record(record).config);
}

void dispatch_freeze(SegmentState& state, std::uint32_t record) noexcept {
    DispatchBody& b = body_at(state, record);
    b.concurrency.fetch_or(kFrozen, std::memory_order_seq_cst);
    b.throttled.fetch_or(kFrozen, std::memory_order_seq_cst);
    b.bytes.word.fetch_or(kFrozen, std::memory_order_seq_cst);
}

void dispatch_thaw(SegmentState& state, std::uint32_t record) noexcept {
    DispatchBody& b = body_at(state, record);
    b.concurrency.fetch_and(~kFrozen, std::memory_order_seq_cst);
    b.throttled.fetch_and(~kFrozen, std::memory_order_seq_cst);
    b.bytes.word.fetch_and(~kFrozen, std::memory_order_seq_cst);
}

// Thaws a packed Dispatch's byte word, unused when packed: to 0 as the layout has it (a CAS from
// the frozen value), then wakes the slot sleepers and the byte queue.
void finish_packed(DispatchBody& b) noexcept {
    if (std::uint64_t bw = b.bytes.word.load(std::memory_order_acquire); is_frozen(bw))
        b.bytes.word.compare_exchange_strong(bw, 0, std::memory_order_seq_cst);
    futex_wake(low_half(b.concurrency), INT_MAX);
    wake_queue(b.bytes.queue);
}

// A packed Dispatch's slots and bytes in one step: sleepers from the live registrations, queue
// recounted, units from the live ledgers, kFrozen cleared (one CAS from the frozen value, as in
// recount_semaphore_word), everyone woken. Returns false, storing nothing to the word, if a holder
// had thawed it.
bool recount_packed(SegmentState& state, std::uint32_t record, DispatchBody& b,
                    std::int64_t live_slots, std::int64_t live_bytes,
                    std::span<const std::uint32_t> dead_slots, LiveHoldings& given) noexcept {
    using P = DispatchPacked;
    const SleeperCounts sleepers =
        count_live_sleepers(state, record, kDispatchSlotsLayer, P::kSlots, dead_slots);
    const std::uint64_t queued = recount_weighted_queue(
        state, record, kDispatchBytesLayer, b.bytes.queue, b.concurrency, P::kBytes, dead_slots);
    const auto slots =
        std::min<std::uint64_t>(static_cast<std::uint64_t>(live_slots), P::kSlots.in_use_mask);
    const auto bytes =
        std::min<std::uint64_t>(static_cast<std::uint64_t>(live_bytes), P::kBytes.units_mask);
    const std::uint64_t next = P::kBytes.with(P::kSlots.with(0, slots, sleepers.single, 0), bytes,
                                              std::min(queued, P::kBytes.queued_max));
    std::uint64_t w = b.concurrency.load(std::memory_order_acquire);
    for (;;) {
        if (!is_frozen(w)) {
            futex_wake(low_half(b.concurrency), INT_MAX);
            wake_queue(b.bytes.queue);
            return false;
        }
        LIM_RACE_POINT();
        if (b.concurrency.compare_exchange_strong(w, next, std::memory_order_seq_cst,
                                                  std::memory_order_relaxed)) {
            break;
        }
    }
    given.held[kDispatchSlotsLayer] = static_cast<std::int64_t>(P::kSlots.in_use(w)) - live_slots;
    given.held[kDispatchBytesLayer] = static_cast<std::int64_t>(P::kBytes.in_use(w)) - live_bytes;
    finish_packed(b);
    return true;
}

// A packed Dispatch's reset: nothing held, sleepers from the live registrations, the byte queue
// emptied, kFrozen cleared, everyone woken. As reset_weighted_layer: the units first, with the
// queued count and kFrozen kept (one CAS from the frozen value), and the queue only once that CAS
// has landed (drop_weighted_queue). Returns false, the word and the queue untouched, if a holder
// had thawed the word before that CAS (before, the queue was emptied first: docs/design.md,
// "Reset").
bool reset_packed(SegmentState& state, std::uint32_t record, DispatchBody& b) noexcept {
    using P = DispatchPacked;
    const SleeperCounts sleepers =
        count_live_sleepers(state, record, kDispatchSlotsLayer, P::kSlots, {});
    std::uint64_t w = b.concurrency.load(std::memory_order_acquire);
    if (is_frozen(w)) run_weighted_reset_hook(0);
    std::uint64_t kept = 0;
    for (;;) {
        if (!is_frozen(w)) {
            futex_wake(low_half(b.concurrency), INT_MAX);
            wake_queue(b.bytes.queue);
            return false;
        }
        kept =
            P::kBytes.with(P::kSlots.with(kFrozen, 0, sleepers.single, 0), 0, P::kBytes.queued(w));
        LIM_RACE_POINT();
        if (b.concurrency.compare_exchange_strong(w, kept, std::memory_order_seq_cst,
                                                  std::memory_order_relaxed)) {
            break;
        }
    }
    drop_weighted_queue(b.bytes.queue, b.concurrency, kept, P::kBytes);
    finish_packed(b);
    return true;
}

// Word by word, each one CAS from its frozen value; the first found thawed by a holder stops the
// recount (the reaper then thaws the rest and defers the record). Every prefix is safe: each
// layer is its own limit, set to what its live ledgers hold whenever it is recounted at all, and
// no layer's admission counts on another's value, so a layer recounted while the next is not
// gives back only its own units (docs/design.md, "The recount").
LiveHoldings dispatch_recount(SegmentState& state, std::uint32_t record, const LiveHoldings& live,
                              std::span<const std::uint32_t> dead_slots, TimePoint) noexcept {
    DispatchBody& b = body_at(state, record);
    LiveHoldings given;
    if (is_packed(config_at(state, record))) {
        if (!recount_packed(state, record, b, live.held[kDispatchSlotsLayer],
                            live.held[kDispatchBytesLayer], dead_slots, given)) {
            given.abandoned = true;
            return given;
        }
    } else {
        given.held[kDispatchSlotsLayer] =
            recount_semaphore_word(state, record, kDispatchSlotsLayer, b.concurrency,
                                   live.held[kDispatchSlotsLayer], dead_slots, &given.abandoned);
        if (given.abandoned) return given;
        given.held[kDispatchBytesLayer] =
            recount_weighted_layer(state, record, kDispatchBytesLayer, b.bytes,
                                   live.held[kDispatchBytesLayer], dead_slots, &given.abandoned);
        if (given.abandoned) return given;
    }
    given.held[kDispatchThrottledLayer] =
        recount_semaphore_word(state, record, kDispatchThrottledLayer, b.throttled,
                               live.held[kDispatchThrottledLayer], dead_slots, &given.abandoned);
    return given;
}

// Nothing held, nothing queued, and the Dispatch's backoff window cleared. Live sleepers on the
// slot layers stay counted (they deregister later); queued byte requests queue again. Stops at
// the first word found thawed by a holder (the caller freezes and resets again), and says which
// layers' words it left unreset: the words before it were reset (KindOps::reset).
std::uint8_t dispatch_reset(SegmentState& state, std::uint32_t record, TimePoint) noexcept {
    constexpr std::uint8_t kThrottled = 1u << kDispatchThrottledLayer;
    constexpr std::uint8_t kBytes = 1u << kDispatchBytesLayer;
    DispatchBody& b = body_at(state, record);
    bool abandoned = false;
    if (is_packed(config_at(state, record))) {
        if (!reset_packed(state, record, b)) return kAllLayers;
    } else {
        recount_semaphore_word(state, record, kDispatchSlotsLayer, b.concurrency, 0, {},
                               &abandoned);
        if (abandoned) return kAllLayers;
        if (!reset_weighted_layer(b.bytes)) return kBytes | kThrottled;
    }
    recount_semaphore_word(state, record, kDispatchThrottledLayer, b.throttled, 0, {}, &abandoned);
    if (abandoned) return kThrottled;
    const std::uint32_t window = config_at(state, record).backoff_record;
    if (window < state.records_used() &&
        state.record(window).header.kind ==
            static_cast<std::uint16_t>(RecordKind::backoff_window)) {
        auto& w = *reinterpret_cast<BackoffWindowBody*>(state.record(window).body);
        w.until.exchange(0, std::memory_order_seq_cst);
        wake_all(w.channel);
    }
    return 0;
}

// The layers' fields of a Dispatch, whichever way its words are laid out.
struct LayerView {
    std::uint64_t slots, slot_sleepers, throttled, throttled_sleepers, bytes, queued;
    bool frozen;
};

LayerView view_layers(const DispatchConfig& c, const DispatchBody& b) noexcept {
    const std::uint64_t cw = b.concurrency.load(std::memory_order_acquire);
    const std::uint64_t tw = b.throttled.load(std::memory_order_acquire);
    LayerView v{};
    v.throttled = SemaphoreWord::in_use(tw);
    v.throttled_sleepers = SemaphoreWord::single(tw) + SemaphoreWord::multi(tw);
    if (is_packed(c)) {
        v.slots = DispatchPacked::kSlots.in_use(cw);
        v.slot_sleepers = DispatchPacked::kSlots.sleepers(cw);
        v.bytes = DispatchPacked::kBytes.in_use(cw);
        v.queued = DispatchPacked::kBytes.queued(cw);
        v.frozen = is_frozen(cw) || is_frozen(tw);
    } else {
        const std::uint64_t bw = b.bytes.word.load(std::memory_order_acquire);
        v.slots = SemaphoreWord::in_use(cw);
        v.slot_sleepers = SemaphoreWord::single(cw) + SemaphoreWord::multi(cw);
        v.bytes = WeightedWord::in_use(bw);
        v.queued = WeightedWord::queued(bw);
        v.frozen = is_frozen(cw) || is_frozen(tw) || is_frozen(bw);
    }
    return v;
}

}  // namespace

void inspect_dispatch(const SegmentState& state, std::uint32_t record, TimePoint now,
                      RecordSnapshot& out) {
    const Record& r = state.record(record);
    const auto& c = *reinterpret_cast<const DispatchConfig*>(r.config);
    const auto& b = *reinterpret_cast<const DispatchBody*>(r.body);
    const LayerView v = view_layers(c, b);
    std::int64_t until = 0;
    std::string window_key = "?";
    if (c.backoff_record < state.records_used() &&
        state.record(c.backoff_record).header.kind ==
            static_cast<std::uint16_t>(RecordKind::backoff_window)) {
        const Record& wr = state.record(c.backoff_record);
        until = reinterpret_cast<const BackoffWindowBody*>(wr.body)->until.load(
            std::memory_order_acquire);
        window_key = printable(record_key(wr));
    }
    const std::int64_t now_ns = to_nanos(now);
    const bool active = backoff_active_at(now_ns, until, c.backoff_window_ns);
    out.config = {{"concurrency", std::to_string(c.concurrency)},
                  {"throttled_concurrency", std::to_string(c.throttled_concurrency)},
                  {"byte_budget", std::to_string(c.byte_budget)},
                  {"backoff_window_ms", std::to_string(c.backoff_window_ns / 1'000'000)},
                  {"byte_penalty_multiplier", std::to_string(c.byte_penalty_multiplier)},
                  {"limiter", window_key}};
    out.layer_names = {"slots", "throttled", "bytes"};
    out.layers = {
        Quantity::layer("in_flight", static_cast<double>(v.slots),
                        static_cast<double>(c.concurrency), "concurrency"),
        Quantity::layer("throttled_in_flight", static_cast<double>(v.throttled),
                        static_cast<double>(c.throttled_concurrency), "throttled_concurrency", "",
                        "throttled"),
        Quantity::layer("in_flight", static_cast<double>(v.bytes),
                        static_cast<double>(c.byte_budget), "budget", "bytes", "bytes"),
    };
    out.values = {
        Quantity::state("backoff_active", active ? 1.0 : 0.0, "bool"),
        Quantity::state("backoff_remaining", seconds_between(now_ns, until), "seconds"),
        Quantity::state(
            "throttle_remaining",
            active ? seconds_between(now_ns, saturating_add(until, c.backoff_window_ns)) : 0.0,
            "seconds"),
    };
    out.waiters = static_cast<std::uint32_t>(v.slot_sleepers + v.throttled_sleepers + v.queued);
    out.frozen = v.frozen;
}

const KindOps kDispatchOps{
    .freeze = dispatch_freeze,
    .recount = dispatch_recount,
    .thaw = dispatch_thaw,
    .reset = dispatch_reset,
    .layers = 3,
    .layer_names = {"slots", "throttled", "bytes"},
};

namespace {

void report_release_failure(const DispatchImpl& d, const std::exception& e) noexcept {
    std::fprintf(stderr, "lim: cannot release a permit of dispatch '%.*s': %s\n",
                 static_cast<int>(d.ref.key().size()), d.ref.key().data(), e.what());
}

// Gives back what a Permit holds, layer by layer: bytes, then the throttled slot, then the
// concurrency slot. The general case of release_permit, out of line.
//
// Units acquired by one process are released by that process (Hold::require_held): each layer
// this permit gives back is checked before anything changes (the slot and byte layers are the
// same ledger layers whether the words are packed or not; fast path: a plain load and a compare
// per layer), and a layer the process does not hold is not given back; the others are. A Permit
// never crosses processes (its fork-generation check), so a layer not held means a forced reset
// forgot it: one that ran while this permit's acquire held its slot and waited for bytes (the
// slot forgotten, the bytes taken after the reset and counted by the new word), or while the
// permit was held (everything forgotten). Giving back the layers still held keeps the new word
// exact; refusing the whole permit used to leave those bytes counted while the process lived.
[[gnu::noinline]] void release_permit_layers(DispatchImpl& d, std::uint64_t bytes,
                                             bool throttled) noexcept {
    SegmentState& state = *d.ref.state;
    try {
        Hold hold(state, d.ref.index);
        const bool slot_held = hold.still_holds(kDispatchSlotsLayer, 1);
        const bool bytes_held = bytes == 0 || hold.still_holds(kDispatchBytesLayer, bytes);
        const bool throttled_held = !throttled || hold.still_holds(kDispatchThrottledLayer, 1);
        if (!slot_held || !bytes_held || !throttled_held) [[unlikely]] {
            std::string missing;
            for (const auto& [held, name] :
                 {std::pair{slot_held, "concurrency slot"},
                  std::pair{throttled_held, "throttled slot"}, std::pair{bytes_held, "bytes"}}) {
                if (held) continue;
                missing += missing.empty() ? "" : ", ";
                missing += name;
            }
            std::fprintf(stderr,
                         "lim: dispatch '%.*s': this process no longer holds the permit's %s (a "
                         "forced reset forgot them); %s\n",
                         static_cast<int>(d.ref.key().size()), d.ref.key().data(), missing.c_str(),
                         slot_held || (bytes != 0 && bytes_held) || (throttled && throttled_held)
                             ? "the rest was released"
                             : "nothing was released");
        }
        // The common permit, packed: bytes and slot in one CAS (bytes first in effect, as below).
        if (slot_held && bytes_held && d.packed && !throttled && d.give_packed(hold, state, bytes))
            return;
        // Each layer release checks again before its CAS (a reset while it steps aside).
        if (bytes != 0 && bytes_held) d.bytes().release(hold, state, bytes);
        if (throttled && throttled_held) d.throttled().release(hold, state, 1);
        if (slot_held) d.slots().release(hold, state, 1);
    } catch (const std::exception& e) {
        // Hold throws when this thread has no process slot and none is free. Without a slot
        // the release cannot be recorded in a ledger, and an unrecorded release would be undone
        // by the next crash-recovery recount; the permit stays held until this process exits
        // and is reaped. (A thread that acquired always has a slot; this needs a permit moved
        // to a new thread while the process table is full.)
        report_release_failure(d, e);
    }
}

}  // namespace

// The value this thread's last one-CAS take or give left in a packed Dispatch's word, and which
// word (its address). The next one on the same word uses it as its CAS's first expected value
// instead of loading the word: a load of a word just before a locked CAS on it costs about as
// much as the CAS again on x86 (the load waits for the line the previous locked operation wrote;
// 31 against 21 ns for a load+CAS pair and a CAS pair from a known value, bench measurements in
// docs/design.md, "The uncontended path"). Only ever a guess: a CAS from it succeeds only if the
// word holds exactly that value, which passed every check; a failed CAS returns the word's real
// value and the loop goes on from that; a guess that fails a check (frozen, no room, not held) is
// replaced by a real load before anything is decided from it. Never dereferenced, so a stale
// address (a Dispatch closed, a forked child) is harmless. Per thread, so threads do not share a
// line for it; initial-exec, as tl_holder_cache, so the access is an offset from the thread
// pointer.
namespace {
struct WordHint {
    const void* word;
    std::uint64_t value;
};
constinit thread_local WordHint tl_word_hint
    __attribute__((tls_model("initial-exec"))) = {nullptr, 0};
}  // namespace

// Gives back what a Permit holds: bytes, then the throttled slot, then the concurrency slot.
// The common permit (packed, not throttled) here, inline, in QuickHold's form of the ledger
// protocol (docs/design.md, "The uncontended path"): one CAS, no call and no frame unless someone
// must be woken; everything else (a slot not in the thread's cache, a frozen word, units the
// thread's own entry does not show, a word that does not hold them) in release_permit_layers,
// which checks again (and refuses) in a Hold. Nothing has changed when it is called.
// The common permit's give, in QuickHold's form: true (with `before`, the word its CAS
// replaced) if it gave back the slot and `bytes`; false, with nothing changed and nothing
// announced, for the general path to decide.
[[gnu::always_inline]] inline bool quick_give(DispatchImpl& d, std::uint64_t bytes,
                                              std::uint64_t& before) noexcept {
    using P = DispatchPacked;
    QuickHold hold;
    if (!hold.open(d.mapping_uid, d.ref.index)) [[unlikely]]
        return false;
    // Hold::require_held's fast path for both layers: this thread's own entry covers them. (A
    // zero-byte permit needs no byte check; it is made anyway, one test cheaper on the common
    // path: an entry below zero, left by permits released on other threads than their
    // acquirers', only sends such a release to the general path, which accepts it.)
    const std::int64_t slots = hold.raw(kDispatchSlotsLayer);
    const std::int64_t held_bytes = hold.held(kDispatchBytesLayer);
    if (hold.held_given(kDispatchSlotsLayer, slots) < 1 ||
        held_bytes < static_cast<std::int64_t>(bytes)) [[unlikely]] {
        hold.close();
        return false;
    }
    std::atomic<std::uint64_t>& word = d.body->concurrency;
    const std::uint64_t delta = 1 + P::kBytes.units(bytes);
    // The first expected value: this thread's last value of the word if it has one (tl_word_hint),
    // else a load.
    std::uint64_t w;
    if (tl_word_hint.word == &word) [[likely]]
        w = tl_word_hint.value;
    else
        w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (is_frozen(w) || P::kSlots.in_use(w) < 1 || P::kBytes.in_use(w) < bytes) [[unlikely]] {
            // Decided only from a value the word held: `w` may be the guess.
            if (const std::uint64_t real = word.load(std::memory_order_relaxed); real != w) {
                w = real;
                continue;
            }
            hold.close();
            return false;
        }
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w - delta, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) [[likely]] {
            break;
        }
    }
    tl_word_hint = {&word, w - delta};
    // The slots from the value read before the CAS (this thread is the entry's only writer: "The
    // uncontended path", step 3); the bytes reloaded (one register fewer across the loop, so no
    // callee-saved one to save); unconditional, as in quick_take.
    hold.set_raw(kDispatchSlotsLayer, slots - 1);
    hold.add(kDispatchBytesLayer, -static_cast<std::int64_t>(bytes));
    hold.close();
    before = w;
    return true;
}

inline void release_permit(DispatchImpl& d, std::uint64_t bytes, bool throttled,
                           bool quick) noexcept {
    using P = DispatchPacked;
    if (quick) [[likely]] {
        std::uint64_t w = 0;
        if (quick_give(d, bytes, w)) [[likely]] {
            // `w` is the word the CAS replaced: whether anyone sleeps or queues, in one test. The
            // wake comes after the withdrawal; it changes nothing a reaper counts.
            constexpr std::uint64_t kWaitBits = (P::kSlots.single_max << P::kSlots.single_shift) |
                                                (P::kBytes.queued_max << P::kBytes.queued_shift);
            if ((w & kWaitBits) != 0) [[unlikely]]
                d.wake_after_give(w, bytes);
            return;
        }
        release_permit_layers(d, bytes, false);  // a quick permit is never throttled
        return;
    }
    release_permit_layers(d, bytes, throttled);
}

}  // namespace lim::detail

// ---------------------------------------------------------------------------------------------
// The public handles
// ---------------------------------------------------------------------------------------------

namespace lim {
namespace {

using detail::DispatchConfig;
using detail::DispatchImpl;

[[noreturn]] void bad_option(std::string_view key, const std::string& what) {
    throw Error(Errc::invalid_argument, fmt::format("dispatch '{}': {}", key, what));
}

void validate(const DispatchOptions& o) {
    constexpr std::uint64_t kMaxSlots = detail::SemaphoreWord::kMaxCapacity;
    constexpr std::uint64_t kMaxBytes = detail::WeightedWord::kMaxCapacity;
    if (o.concurrency < 1 || o.concurrency > kMaxSlots) {
        bad_option(o.key,
                   fmt::format("concurrency is {}; it must be 1..{}", o.concurrency, kMaxSlots));
    }
    if (o.throttled_concurrency < 1 || o.throttled_concurrency > kMaxSlots) {
        bad_option(o.key, fmt::format("throttled_concurrency is {}; it must be 1..{}",
                                      o.throttled_concurrency, kMaxSlots));
    }
    if (o.byte_budget < 1 || o.byte_budget > kMaxBytes) {
        bad_option(o.key,
                   fmt::format("byte_budget is {}; it must be 1..{}", o.byte_budget, kMaxBytes));
    }
    if (o.backoff_window < Duration::zero()) {
        bad_option(o.key, fmt::format("backoff_window is {} ns; it must not be negative",
                                      o.backoff_window.count()));
    }
    if (o.byte_penalty_multiplier < 1) {
        bad_option(o.key, "byte_penalty_multiplier is 0; it must be at least 1");
    }
    const ExponentialBackoff& b = o.acquire_backoff;
    if (b.base <= Duration::zero() || b.max < b.base) {
        bad_option(o.key, fmt::format("acquire_backoff needs 0 < base <= max (base {} ns, max {} "
                                      "ns)",
                                      b.base.count(), b.max.count()));
    }
    if (!(b.jitter >= 0.0 && b.jitter <= 1.0)) {
        bad_option(o.key,
                   fmt::format("acquire_backoff.jitter is {}; it must be in [0, 1]", b.jitter));
    }
}

// The options' backoff window as a handle on `segment`'s mapping (the caller may have opened the
// window through another Segment handle of the same segment).
BackoffWindow window_in(const Segment& segment, const DispatchOptions& o) {
    const detail::RecordRef& w = o.limiter.record_ref();
    if (w.state == segment.state()) return o.limiter;
    if (!w.state || w.state->name() != segment.name()) {
        bad_option(o.key,
                   fmt::format("the limiter (backoff window '{}') belongs to segment '{}', not "
                               "'{}'",
                               o.limiter.key(), w.state ? w.state->name() : "?", segment.name()));
    }
    return BackoffWindow::for_key(segment, o.limiter.key());
}

std::string describe(const detail::SegmentState& state, const DispatchConfig& c) {
    std::string window = fmt::format("record {}", c.backoff_record);
    if (c.backoff_record < state.records_used()) {
        window = fmt::format("'{}'", detail::record_key(state.record(c.backoff_record)));
    }
    return fmt::format(
        "a dispatch with concurrency {}, throttled_concurrency {}, byte_budget {}, "
        "backoff_window {} ms, byte_penalty_multiplier {} and backoff window {}",
        c.concurrency, c.throttled_concurrency, c.byte_budget, c.backoff_window_ns / 1'000'000,
        c.byte_penalty_multiplier, window);
}

}  // namespace

Dispatch Dispatch::open_impl(const Segment& segment, const DispatchOptions& options, bool adopt) {
    validate(options);
    BackoffWindow window = window_in(segment, options);
    const DispatchConfig config{
        .concurrency = options.concurrency,
        .throttled_concurrency = options.throttled_concurrency,
        .byte_budget = options.byte_budget,
        .backoff_window_ns = options.backoff_window.count(),
        .byte_penalty_multiplier = options.byte_penalty_multiplier,
        .backoff_record = window.record_ref().index,
        .packed = detail::DispatchPacked::fits(options.concurrency, options.byte_budget) ? 1u : 0u,
    };
    const detail::SegmentState& state = *segment.state();
    detail::RecordRef ref = detail::open_record<DispatchConfig>(
        segment, detail::RecordKind::dispatch, 0, "dispatch", options.key, config, adopt, nullptr,
        [&state](const DispatchConfig& c, std::uint16_t) { return describe(state, c); });
    const DispatchConfig& stored = detail::config_of<DispatchConfig>(ref);
    if (stored.packed > 1 || (stored.packed == 1 && !detail::DispatchPacked::fits(
                                                        stored.concurrency, stored.byte_budget))) {
        throw Error(
            Errc::corrupt_segment,
            fmt::format("dispatch '{}' in segment '{}' is marked packed, but its limits "
                        "(concurrency {}, byte_budget {}) do not fit a packed word",
                        options.key, segment.name(), stored.concurrency, stored.byte_budget));
    }
    if (stored.backoff_record != window.record_ref().index) {
        // Adopted: the stored configuration names another window.
        if (stored.backoff_record >= state.records_used() ||
            state.record(stored.backoff_record).header.kind !=
                static_cast<std::uint16_t>(detail::RecordKind::backoff_window)) {
            throw Error(Errc::corrupt_segment,
                        fmt::format("dispatch '{}' in segment '{}' names record {} as its backoff "
                                    "window, which is not one",
                                    options.key, segment.name(), stored.backoff_record));
        }
        window = BackoffWindow::for_key(segment,
                                        detail::record_key(state.record(stored.backoff_record)));
    }
    return Dispatch(std::make_shared<DispatchImpl>(std::move(ref), std::move(window), options));
}

Dispatch Dispatch::open(const Segment& segment, const DispatchOptions& options) {
    return open_impl(segment, options, false);
}

Dispatch Dispatch::open(const Segment& segment, const DispatchOptions& options, AdoptExisting) {
    return open_impl(segment, options, true);
}

namespace {

// try_acquire's general case (under backoff, or a Dispatch whose limits do not pack): one CAS
// per layer, in one Hold. Out of line, so that the common permit's Hold is its own and stays in
// registers.
[[gnu::noinline]] bool try_acquire_layers(DispatchImpl& d, bool backoff, std::uint64_t charge) {
    detail::SegmentState& state = *d.ref.state;
    detail::Hold hold(state, d.ref.index);
    if (!d.slots().try_acquire(hold, state, 1)) return false;
    if (backoff && !d.throttled().try_acquire(hold, state, 1)) {
        d.slots().release(hold, state, 1);
        return false;
    }
    if (charge != 0 && !d.bytes().try_acquire(hold, state, charge)) {
        if (backoff) d.throttled().release(hold, state, 1);
        d.slots().release(hold, state, 1);
        return false;
    }
    hold.admitted();
    return true;
}

// The packed take in a Hold: the common permit's general path (a slot not in the thread's
// cache, a frozen word to step aside from).
[[gnu::noinline]] bool take_packed_general(DispatchImpl& d, std::uint64_t charge) {
    detail::SegmentState& state = *d.ref.state;
    detail::Hold hold(state, d.ref.index);
    if (!d.take_packed(hold, state, charge)) return false;
    hold.admitted();
    return true;
}

enum class Quick { done, refused, general };

// The common permit's take (packed, no backoff), in QuickHold's form of the ledger protocol
// (docs/design.md, "The uncontended path"): take_packed's checks and CAS with no call; a slot not
// in the thread's cache or a frozen word goes, with nothing changed, to the general path.
[[gnu::always_inline]] inline Quick quick_take(DispatchImpl& d, std::uint64_t charge) noexcept {
    using P = detail::DispatchPacked;
    // The bytes in use and the queued count as one number (bits 15..54 of the word): the queued
    // count sits just above the bytes, and byte_budget < 2^32, so `bytes and queued + charge >
    // byte_budget` is exactly `queued != 0 or bytes + charge > byte_budget` in one compare
    // (no overflow: the sum is below 2^41).
    static_assert(P::kBytes.queued_shift == P::kBytes.units_shift + 32 &&
                  P::kMaxBudget < (1ULL << 32));
    constexpr int kBytesAndQueuedBits = 32 + 8;
    detail::QuickHold hold;
    if (!hold.open(d.mapping_uid, d.ref.index)) [[unlikely]]
        return Quick::general;
    std::atomic<std::uint64_t>& word = d.body->concurrency;
    // The first expected value: this thread's last value of the word if it has one
    // (tl_word_hint), else a load.
    std::uint64_t w;
    if (detail::tl_word_hint.word == &word) [[likely]]
        w = detail::tl_word_hint.value;
    else
        w = word.load(std::memory_order_relaxed);
    for (;;) {
        const std::uint64_t bytes_and_queued =
            (w << (64 - P::kBytes.units_shift - kBytesAndQueuedBits)) >> (64 - kBytesAndQueuedBits);
        // The limits are compared from memory (no register held for them across the loop).
        if (detail::is_frozen(w) || P::kSlots.in_use(w) >= d.concurrency ||
            (charge != 0 && bytes_and_queued + charge > d.byte_budget)) [[unlikely]] {
            // Decided only from a value the word held: `w` may be the guess.
            if (const std::uint64_t real = word.load(std::memory_order_relaxed); real != w) {
                w = real;
                continue;
            }
            hold.close();
            return detail::is_frozen(w) ? Quick::general : Quick::refused;
        }
        LIM_RACE_POINT();
        // Both fields stay within their widths, as in take_packed.
        if (word.compare_exchange_weak(w, w + 1 + P::kBytes.units(charge),
                                       std::memory_order_seq_cst, std::memory_order_relaxed))
            [[likely]] {
            break;
        }
    }
    detail::tl_word_hint = {&word, w + 1 + P::kBytes.units(charge)};
    // Unconditional: a zero charge stores the entry's own value back (this thread is its only
    // writer), one store cheaper than a test on the common path.
    hold.add(detail::kDispatchSlotsLayer, 1);
    hold.add(detail::kDispatchBytesLayer, static_cast<std::int64_t>(charge));
    hold.admitted();
    hold.close();
    return Quick::done;
}

}  // namespace

// The general case (under backoff, a Dispatch whose limits do not pack, a slot not in the
// thread's cache, a frozen word): decides the backoff and the charge afresh and takes every layer
// in a Hold.
std::optional<Permit> Dispatch::try_acquire_general(DispatchImpl& d, std::uint64_t bytes) {
    const bool backoff = d.backoff_now();
    const std::uint64_t charge = detail::charge_for(
        bytes, backoff, d.config->byte_penalty_multiplier, d.config->byte_budget);
    const bool ok = (!d.packed || backoff) ? try_acquire_layers(d, backoff, charge)
                                           : take_packed_general(d, charge);
    if (!ok) return std::nullopt;
    return Permit(&d, charge, backoff, d.packed && !backoff, detail::fork_generation());
}

std::optional<Permit> Dispatch::try_acquire(std::uint64_t bytes) {
    DispatchImpl& d = *impl_;
    // The common permit: packed, and no backoff deadline set (backoff_now's first test, so the
    // charge is the request clamped to the budget, as charge_for computes it without backoff),
    // both in one test (DispatchImpl::quick_gate).
    if (d.quick_gate->load(std::memory_order_acquire) == 0) [[likely]] {
        const std::uint64_t charge = std::min(bytes, d.byte_budget);
        const Quick q = quick_take(d, charge);
        if (q == Quick::done) [[likely]]
            return Permit(&d, charge, false, true, detail::fork_generation());
        if (q == Quick::refused) return std::nullopt;
    }
    // A tail call: the common path above keeps no frame.
    return try_acquire_general(d, bytes);
}

std::optional<Permit> Dispatch::acquire_impl(std::uint64_t bytes,
                                             std::optional<TimePoint> deadline) {
    DispatchImpl& d = *impl_;
    // Decided once, here: whether this request runs under backoff, and so what it is charged.
    const bool backoff = d.backoff_now();
    const std::uint64_t charge = detail::charge_for(
        bytes, backoff, d.config->byte_penalty_multiplier, d.config->byte_budget);
    if (d.packed && !backoff) {
        // The common permit: one CAS for the slot and the bytes. Kept apart from the general path
        // below so that its frame stays small.
        detail::Hold hold(*d.ref.state, d.ref.index);
        if (d.take_packed(hold, *d.ref.state, charge)) {
            hold.admitted();
            return Permit(&d, charge, false, true, detail::fork_generation());
        }
    }
    return acquire_general(d, backoff, charge, deadline);
}

std::optional<Permit> Dispatch::acquire_general(detail::DispatchImpl& d, bool backoff,
                                                std::uint64_t charge,
                                                std::optional<TimePoint> deadline) {
    detail::SegmentState& state = *d.ref.state;
    const std::uint32_t record = d.ref.index;
    bool slot = false;
    bool throttled = !backoff;  // true: nothing (more) to take from this layer
    bool budget = charge == 0;
    {
        // Every layer in one announcement, one CAS each.
        detail::Hold hold(state, record);
        slot = d.slots().try_acquire(hold, state, 1);
        if (slot && !throttled) throttled = d.throttled().try_acquire(hold, state, 1);
        if (slot && throttled && !budget) budget = d.bytes().try_acquire(hold, state, charge);
        if (slot && throttled && budget) {
            hold.admitted();
            return Permit(&d, charge, backoff, d.packed && !backoff, detail::fork_generation());
        }
    }
    // Some layer is full: wait for each remaining one in order. Every way out without a permit
    // (the deadline, or an exception from an injected clock or sleep) gives back the layers
    // taken so far; each layer's own wait withdraws its sleeper registration or queue ticket.
    struct Taken {
        DispatchImpl& d;
        bool slot;
        bool throttled;  // a throttled slot is held (only under backoff)
        bool keep = false;
        std::uint32_t generation = detail::fork_generation();
        ~Taken() {
            if (keep || (!slot && !throttled)) return;
            // A child forked by a WaitCheck's callback on this thread leaves with WaitStopped:
            // the slots are the parent's, which still waits with them.
            if (generation != detail::fork_generation()) return;
            detail::SegmentState& st = *d.ref.state;
            try {
                detail::Hold hold(st, d.ref.index);  // the slot exists: cannot throw here
                if (throttled) d.throttled().release(hold, st, 1);
                if (slot) d.slots().release(hold, st, 1);
            } catch (...) {
                // Unreachable in practice (see above).
            }
        }
    } taken{d, slot, backoff && throttled};
    if (!slot) {
        if (!d.slots().acquire_until(state, record, 1, deadline, d.pacing)) return std::nullopt;
        taken.slot = slot = true;
    }
    if (!throttled) {
        if (!d.throttled().acquire_until(state, record, 1, deadline, d.pacing)) {
            return std::nullopt;
        }
        taken.throttled = throttled = true;
    }
    if (!budget) {
        if (!d.bytes().acquire_until(state, record, charge, deadline, d.pacing)) {
            return std::nullopt;
        }
    }
    taken.keep = true;
    {
        detail::Hold hold(state, record);
        hold.admitted();
    }
    return Permit(&d, charge, backoff, d.packed && !backoff, detail::fork_generation());
}

Permit Dispatch::acquire(std::uint64_t bytes) {
    return std::move(*acquire_impl(bytes, std::nullopt));
}

std::optional<Permit> Dispatch::acquire_until(std::uint64_t bytes, TimePoint deadline) {
    return acquire_impl(bytes, deadline);
}

void Dispatch::set_backoff(Duration d) {
    impl_->window.set(d, impl_->now());
}

bool Dispatch::backoff_active() const {
    const std::int64_t until = impl_->window_body->until.load(std::memory_order_acquire);
    return detail::backoff_active_at(to_nanos(impl_->now()), until,
                                     impl_->config->backoff_window_ns);
}

DispatchSnapshot Dispatch::snapshot() const {
    const DispatchImpl& d = *impl_;
    const DispatchConfig& c = *d.config;
    DispatchSnapshot s;
    const std::int64_t now = to_nanos(d.now());
    const std::int64_t until = d.window_body->until.load(std::memory_order_acquire);
    s.backoff_active = detail::backoff_active_at(now, until, c.backoff_window_ns);
    using detail::saturating_add;
    using detail::saturating_sub;
    if (until != 0 && now < until) {
        s.backoff_remaining = std::chrono::nanoseconds{saturating_sub(until, now)};
    }
    if (s.backoff_active) {
        s.throttle_remaining = std::chrono::nanoseconds{
            saturating_sub(saturating_add(until, c.backoff_window_ns), now)};
    }
    const detail::LayerView v = detail::view_layers(c, *d.body);
    s.in_flight = v.slots;
    s.concurrency = c.concurrency;
    s.throttled_in_flight = v.throttled;
    s.throttled_concurrency = c.throttled_concurrency;
    s.bytes_in_flight = v.bytes;
    s.byte_budget = c.byte_budget;
    s.concurrency_waiters = static_cast<std::uint32_t>(v.slot_sleepers);
    s.throttled_waiters = static_cast<std::uint32_t>(v.throttled_sleepers);
    s.bytes_waiters = static_cast<std::uint32_t>(v.queued);
    s.waiters = s.concurrency_waiters + s.throttled_waiters + s.bytes_waiters;
    return s;
}

const BackoffWindow& Dispatch::limiter() const noexcept {
    return impl_->window;
}

std::string_view Dispatch::key() const noexcept {
    return impl_->ref.key();
}

void Permit::release() noexcept {
    if (!impl_) return;
    release_held();
    impl_ = nullptr;
}

void Permit::release_held() noexcept {
    // A copy inherited across fork() is the parent's permit: the child releases nothing.
    const std::uint64_t tag = tag_;
    if (static_cast<std::uint32_t>(tag) != detail::fork_generation()) return;
    const auto flags = static_cast<std::uint32_t>(tag >> 32);
    detail::release_permit(*impl_, bytes_, (flags & kThrottled) != 0, flags == 0);
}

}  // namespace lim
