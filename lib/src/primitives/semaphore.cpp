#include "lim/semaphore.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <climits>

#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "primitives/semaphore_state.hpp"
#include "recovery/reaper.hpp"
#include "shm/process_identity.hpp"
#include "shm/record_handle.hpp"
#include "sync/futex.hpp"
#include "sync/race_point.hpp"
#include "sync/spin.hpp"
#include "sync/wake_channel.hpp"

namespace lim::detail {
namespace {

// How long a sleeper sleeps before re-checking on its own: a waker killed between its release and
// its wake must not leave anyone asleep for long. (Sleepers that could not register, because the
// sleeper count saturated, poll every millisecond instead.)
constexpr Pacing kSemaphorePacing{};
constexpr Pacing kPollPacing{.base = std::chrono::milliseconds{1},
                             .max = std::chrono::milliseconds{1}};

}  // namespace

void wake_after_release(std::atomic<std::uint64_t>& word, const SemaphoreFormat& fmt,
                        std::uint64_t before, std::uint64_t n) noexcept {
    if (fmt.multi(before) > 0) {
        futex_wake(low_half(word), INT_MAX);
    } else if (const std::uint64_t single = fmt.single(before); single > 0) {
        futex_wake(low_half(word), static_cast<int>(std::min<std::uint64_t>(single, n)));
    }
}

namespace {

// The bodies of SemaphoreCore::try_acquire and release, inlined into lim::Semaphore's own entry
// points (the member functions, out of line, serve the other families): the uncontended acquire
// and release then run with the Hold and the core in registers and the word's format folded to
// constants, rather than behind a call that copies both into a frame.
[[gnu::always_inline]] inline bool try_acquire_inline(const SemaphoreCore& c, Hold& hold,
                                                      const SegmentState& state, std::uint64_t n,
                                                      std::uint64_t registered_for) noexcept {
    const SemaphoreFormat& fmt = c.fmt;
    std::atomic<std::uint64_t>& word = c.word;
    const std::uint64_t deregister = registered_for ? fmt.waiter_unit(registered_for) : 0;
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        if (fmt.in_use(w) + n > c.capacity) return false;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w + n - deregister, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            hold.add(c.layer, static_cast<std::int64_t>(n));
            if (c.counts_admissions) hold.admitted();
            if (registered_for) hold.slot().waiting_record.store(0, std::memory_order_relaxed);
            return true;
        }
    }
}

[[gnu::always_inline]] inline bool release_inline(const SemaphoreCore& c, Hold& hold,
                                                  const SegmentState& state,
                                                  std::uint64_t n) noexcept {
    const SemaphoreFormat& fmt = c.fmt;
    std::atomic<std::uint64_t>& word = c.word;
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        // Before each CAS: a forced reset while this loop stepped aside forgets the units.
        if (!hold.still_holds(c.layer, n)) [[unlikely]]
            return false;
        if (fmt.in_use(w) < n) return false;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w - n, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            hold.add(c.layer, -static_cast<std::int64_t>(n));
            if (fmt.has_sleepers(w)) [[unlikely]] {
                // Through a copy of the format: the core's own address never leaves this
                // function, so an inlined core stays in registers and its format in constants.
                const SemaphoreFormat f = fmt;
                wake_after_release(word, f, w, n);
            }
            return true;
        }
    }
}

}  // namespace

bool SemaphoreCore::try_acquire(Hold& hold, const SegmentState& state, std::uint64_t n,
                                std::uint64_t registered_for) noexcept {
    return try_acquire_inline(*this, hold, state, n, registered_for);
}

bool SemaphoreCore::register_sleeper(Hold& hold, const SegmentState& state,
                                     std::uint64_t n) noexcept {
    SlotHeader& slot = hold.slot();
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        // The slot names this registration only once the registering CAS has landed (below): a
        // recount that runs while we step aside here must not count us, or the CAS that follows
        // the thaw would count us a second time.
        if (hold.stepped_aside(w, word, state)) continue;
        const std::uint64_t count = n == 1 ? fmt.single(w) : fmt.multi(w);
        if (count >= fmt.waiter_max(n)) return false;
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w + fmt.waiter_unit(n), std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            // Still announced (pending) on the record: a reaper that froze the word after our CAS
            // waits for ~Hold before it counts, and so sees these stores.
            LIM_RACE_POINT();
            slot.waiting_layer.store(static_cast<std::uint32_t>(layer), std::memory_order_relaxed);
            slot.waiting_amount.store(n, std::memory_order_relaxed);
            slot.waiting_record.store(hold.record() + 1, std::memory_order_relaxed);
            return true;
        }
    }
}

void SemaphoreCore::deregister_sleeper(Hold& hold, const SegmentState& state,
                                       std::uint64_t n) noexcept {
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (hold.stepped_aside(w, word, state)) continue;
        const std::uint64_t next = w - fmt.waiter_unit(n);
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, next, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            LIM_RACE_POINT();
            hold.slot().waiting_record.store(0, std::memory_order_relaxed);
            // We may have been woken for units we are not taking: pass the wake on.
            if (fmt.in_use(next) < capacity) wake_after_release(word, fmt, next, 1);
            return;
        }
    }
}

bool SemaphoreCore::release(Hold& hold, const SegmentState& state, std::uint64_t n) noexcept {
    return release_inline(*this, hold, state, n);
}

bool SemaphoreCore::acquire_until(SegmentState& state, std::uint32_t record, std::uint64_t n,
                                  std::optional<TimePoint> deadline, const Pacing& pacing) {
    {
        Hold hold(state, record);
        if (try_acquire(hold, state, n)) return true;
    }
    return acquire_blocking(state, record, n, deadline, pacing);
}

bool SemaphoreCore::acquire_blocking(SegmentState& state, std::uint32_t record, std::uint64_t n,
                                     std::optional<TimePoint> deadline, const Pacing& pacing) {
    // Inside a WaitCheck's callback this thread is already registered for the wait that called
    // it: a second registration would take over its slot's waiting fields (sync/pacing.hpp).
    if (inside_wait_check()) refuse_wait_inside_check("Semaphore acquire");
    bool registered = false;
    {
        Hold hold(state, record);
        registered = register_sleeper(hold, state, n);
    }
    // While registered this call is counted as a sleeper: every way out, an exception thrown by
    // an injected clock or sleep included, takes the count back (a phantom sleeper would make
    // every later release wake all). Nothing else is held while we wait.
    struct Withdraw {
        SemaphoreCore& core;
        SegmentState& state;
        std::uint32_t record;
        std::uint64_t n;
        bool& registered;
        std::uint32_t generation = fork_generation();
        ~Withdraw() {
            // A child forked by a WaitCheck's callback on this very thread leaves here with
            // WaitStopped (lim/wait_check.hpp): the registration is the parent's, which still
            // waits, so the child's copy of this guard leaves it alone.
            if (!registered || generation != fork_generation()) return;
            try {
                Hold hold(state, record);  // this thread's slot exists: cannot throw here
                core.deregister_sleeper(hold, state, n);
            } catch (...) {
                // Unreachable in practice (see above); a reap recounts the sleepers anyway.
            }
        }
    } withdraw{*this, state, record, n, registered};
    AutoReap auto_reap(state, pacing.now());
    for (int attempt = 0;; ++attempt) {
        std::uint64_t seen = 0;
        {
            Hold hold(state, record);
            if (try_acquire(hold, state, n, registered ? n : 0)) {
                registered = false;  // the acquiring CAS deregistered us
                return true;
            }
            seen = word.load(std::memory_order_seq_cst);
        }
        const TimePoint now = pacing.now();
        auto_reap.poll(now);
        if (deadline && now >= *deadline) return false;  // ~Withdraw deregisters
        // Sleep while the units in use stay as we saw them; a release changes them (and wakes
        // us if we are registered). Unregistered (saturated) sleepers just poll.
        const Pacing* p = registered ? &pacing : &kPollPacing;
        if (pacing.sleep && *pacing.sleep) p = &pacing;
        // A release that landed between the failed try and the load of `seen` has already sent
        // its wake; a futex wait on the value it left would sleep a whole interval with units
        // free. So when `seen` shows room, go round at once instead.
        if (!is_frozen(seen) && fmt.in_use(seen) + n <= capacity) continue;
        // Before sleeping, re-read the word for up to kSpinLimit while the units are likely to
        // come back soon: a hold of a few hundred ns by a running process ends well within it,
        // and a futex sleep would cost both sides a context switch. Only a registered sleeper
        // spins (so the release it waits for still sends its wake: the cost that keeps the
        // hand-off fair, where an unregistered spinner would lose every race to the releaser
        // taking the units straight back), only when no other sleeper is registered (with
        // others asleep ahead, the units freed go to them: spinning would only barge), and
        // never with an injected sleep (the tests observe each pause). The spin only loads, and
        // changes nothing a reaper counts. Room seen, or a frozen word (the try steps aside until
        // the recount is done), goes round at once.
        const bool injected_sleep = pacing.sleep && *pacing.sleep;
        if (registered && !injected_sleep && fmt.sleepers(seen) <= 1 && !is_frozen(seen)) {
            const auto room_or_stop = [&](std::uint64_t w) {
                return is_frozen(w) || fmt.in_use(w) + n <= capacity || fmt.sleepers(w) > 1;
            };
            seen = spin_while_not(word, kSpinLimit, room_or_stop);
            if (is_frozen(seen) || fmt.in_use(seen) + n <= capacity) continue;
        }
        // The futex compares the whole low half, which holds the units (and, in a packed word,
        // other fields that may change too: a spurious wake-up, then a re-check).
        p->pause(low_half(word), static_cast<std::uint32_t>(seen & 0xFFFF'FFFFULL), deadline,
                 attempt);
    }
}

SleeperCounts count_live_sleepers(const SegmentState& state, std::uint32_t record, int layer,
                                  const SemaphoreFormat& fmt,
                                  std::span<const std::uint32_t> dead) noexcept {
    // The reaper has made sure no live slot is mid-operation on the record, so the slots' waiting
    // fields are exact: a sleeper's slot names its registration exactly while the word counts it
    // (both change under one Hold, the word first on the way in and last on the way out).
    SleeperCounts c;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        const SlotState st = SlotOwner::state(slot.owner.load(std::memory_order_acquire));
        if (st != SlotState::live) continue;
        if (std::find(dead.begin(), dead.end(), i) != dead.end()) continue;
        if (slot.waiting_record.load(std::memory_order_acquire) != record + 1) continue;
        if (slot.waiting_layer.load(std::memory_order_relaxed) != static_cast<std::uint32_t>(layer))
            continue;
        (slot.waiting_amount.load(std::memory_order_relaxed) == 1 ? c.single : c.multi) += 1;
    }
    c.single = std::min(c.single, fmt.single_max);
    c.multi = std::min(c.multi, fmt.multi_max);
    return c;
}

std::int64_t recount_semaphore_word(const SegmentState& state, std::uint32_t record, int layer,
                                    std::atomic<std::uint64_t>& word, std::int64_t live_units,
                                    std::span<const std::uint32_t> dead, bool* abandoned) noexcept {
    const SleeperCounts c = count_live_sleepers(state, record, layer, kSemaphoreFormat, dead);
    std::uint64_t w = word.load(std::memory_order_acquire);
    // Clamped to the units field: a damaged ledger can make the sum anything, and bits past the
    // field would wrap it (a too-high count admits nothing; doubt means held).
    live_units = std::clamp<std::int64_t>(live_units, 0, SemaphoreWord::kInUseMask);
    const std::uint64_t next =
        SemaphoreWord::make(static_cast<std::uint64_t>(live_units), c.single, c.multi);
    // One CAS from the frozen value. Only the reaper holding the recovery lock sets kFrozen, so a
    // word seen frozen has been frozen since this reap froze it: no live sleeper or holder has
    // changed it (each steps aside before its CAS) and the counts above are exact. A word seen
    // thawed was thawed by a holder that waited past kFrozenBreakTimeout (this reaper was
    // stopped): live operations have moved on from it, so the recount is abandoned.
    for (;;) {
        if (!is_frozen(w)) {
            if (abandoned != nullptr) *abandoned = true;
            futex_wake(low_half(word), INT_MAX);
            return 0;
        }
        LIM_RACE_POINT();
        if (word.compare_exchange_strong(w, next, std::memory_order_seq_cst,
                                         std::memory_order_relaxed)) {
            break;
        }
    }
    futex_wake(low_half(word), INT_MAX);
    return static_cast<std::int64_t>(SemaphoreWord::in_use(w)) - live_units;
}

namespace {

SemaphoreBody& body_at(SegmentState& state, std::uint32_t record) noexcept {
    return *reinterpret_cast<SemaphoreBody*>(state.record(record).body);
}

void semaphore_freeze(SegmentState& state, std::uint32_t record) noexcept {
    body_at(state, record).word.fetch_or(kFrozen, std::memory_order_seq_cst);
}

void semaphore_thaw(SegmentState& state, std::uint32_t record) noexcept {
    body_at(state, record).word.fetch_and(~kFrozen, std::memory_order_seq_cst);
}

LiveHoldings semaphore_recount(SegmentState& state, std::uint32_t record, const LiveHoldings& live,
                               std::span<const std::uint32_t> dead, TimePoint) noexcept {
    LiveHoldings given;
    given.held[0] = recount_semaphore_word(state, record, 0, body_at(state, record).word,
                                           live.held[0], dead, &given.abandoned);
    return given;
}

// Nothing held, but the live sleepers stay counted: they will deregister later, and a count
// reset to zero under them would underflow into the units field.
std::uint8_t semaphore_reset(SegmentState& state, std::uint32_t record, TimePoint) noexcept {
    bool abandoned = false;
    recount_semaphore_word(state, record, 0, body_at(state, record).word, 0, {}, &abandoned);
    return abandoned ? kAllLayers : 0;
}

}  // namespace

void inspect_semaphore(const SegmentState& state, std::uint32_t record, TimePoint,
                       RecordSnapshot& out) {
    const Record& r = state.record(record);
    const auto& config = *reinterpret_cast<const SemaphoreConfig*>(r.config);
    const std::uint64_t w =
        reinterpret_cast<const SemaphoreBody*>(r.body)->word.load(std::memory_order_acquire);
    out.config = {{"capacity", std::to_string(config.capacity)}};
    out.layer_names = {"units"};
    out.layers = {Quantity::layer("in_use", static_cast<double>(SemaphoreWord::in_use(w)),
                                  static_cast<double>(config.capacity), "capacity")};
    out.waiters = static_cast<std::uint32_t>(SemaphoreWord::single(w) + SemaphoreWord::multi(w));
    out.frozen = is_frozen(w);
}

const KindOps kSemaphoreOps{
    .freeze = semaphore_freeze,
    .recount = semaphore_recount,
    .thaw = semaphore_thaw,
    .reset = semaphore_reset,
    .layers = 1,
    .layer_names = {"units", nullptr, nullptr},
};

}  // namespace lim::detail

// ---------------------------------------------------------------------------------------------
// The public handle
// ---------------------------------------------------------------------------------------------

namespace lim {
namespace {

detail::SemaphoreCore core_of(const detail::RecordRef& ref) {
    return {detail::body_of<detail::SemaphoreBody>(ref).word,
            detail::config_of<detail::SemaphoreConfig>(ref).capacity, 0};
}

detail::RecordRef open_semaphore(const Segment& segment, std::string_view key,
                                 const SemaphoreOptions& options, bool adopt) {
    if (options.capacity < 1 || options.capacity > detail::SemaphoreWord::kMaxCapacity) {
        throw Error(Errc::invalid_argument,
                    fmt::format("semaphore '{}': capacity is {}; it must be 1..{}", key,
                                options.capacity, detail::SemaphoreWord::kMaxCapacity));
    }
    const detail::SemaphoreConfig config{options.capacity};
    return detail::open_record<detail::SemaphoreConfig>(
        segment, detail::RecordKind::semaphore, 0, "semaphore", key, config, adopt, nullptr,
        [](const detail::SemaphoreConfig& c, std::uint16_t) {
            return fmt::format("a semaphore of capacity {}", c.capacity);
        });
}

// Refuses n > capacity (the capacity the caller read once for its operation). Out of line and
// cold, so the acquire paths keep one compare.
[[noreturn, gnu::noinline, gnu::cold]] void throw_too_many(const detail::RecordRef& ref,
                                                           std::uint64_t n,
                                                           std::uint64_t capacity) {
    throw Error(Errc::invalid_argument,
                fmt::format("semaphore '{}': cannot acquire {} units of a capacity of {}",
                            ref.key(), n, capacity));
}

}  // namespace

Semaphore Semaphore::open(const Segment& segment, std::string_view key,
                          const SemaphoreOptions& options) {
    return Semaphore(open_semaphore(segment, key, options, false));
}

Semaphore Semaphore::open(const Segment& segment, std::string_view key,
                          const SemaphoreOptions& options, AdoptExisting) {
    return Semaphore(open_semaphore(segment, key, options, true));
}

namespace {

// The uncontended acquire and release (docs/design.md, "The uncontended path"): the ledger
// protocol in QuickHold's form, with no call and no frame. Anything unusual (a thread whose slot
// is not cached, a frozen word, a refusal, a release this thread's entry does not cover) leaves
// with nothing changed and the announcement withdrawn, and the general path (Hold, step aside,
// the process-wide over-release check, the blocking wait) decides.
enum class Quick { done, refused, general };

[[gnu::always_inline]] inline Quick quick_acquire(const detail::RecordRef& ref,
                                                  std::atomic<std::uint64_t>& word,
                                                  std::uint64_t capacity,
                                                  std::uint64_t n) noexcept {
    using detail::SemaphoreWord;
    detail::QuickHold hold;
    if (!hold.open(*ref.state, ref.index)) [[unlikely]]
        return Quick::general;
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (detail::is_frozen(w)) [[unlikely]] {
            hold.close();
            return Quick::general;
        }
        if (SemaphoreWord::in_use(w) + n > capacity) [[unlikely]] {
            hold.close();
            return Quick::refused;
        }
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w + n, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) [[likely]] {
            break;
        }
    }
    hold.add(0, static_cast<std::int64_t>(n));
    hold.admitted();
    hold.close();
    return Quick::done;
}

// Wakes the sleepers a release of `n` lets proceed, after the releaser's Hold is withdrawn (a
// wake changes nothing a reaper counts). Out of line and cold: the common release wakes nobody.
[[gnu::noinline, gnu::cold]] void wake_semaphore(std::atomic<std::uint64_t>& word,
                                                 std::uint64_t before, std::uint64_t n) noexcept {
    detail::wake_after_release(word, detail::kSemaphoreFormat, before, n);
}

[[gnu::always_inline]] inline Quick quick_release(const detail::RecordRef& ref,
                                                  std::atomic<std::uint64_t>& word, std::uint64_t n,
                                                  std::uint64_t& before) noexcept {
    using detail::SemaphoreWord;
    detail::QuickHold hold;
    if (!hold.open(*ref.state, ref.index)) [[unlikely]]
        return Quick::general;
    // Hold::require_held's fast path: this thread's own entry covers the release, and no thread
    // of this process has released units its own entry did not show (SegmentState::may_owe).
    // Otherwise (units another thread of this process acquired, or none) the general path
    // decides.
    const std::int64_t raw = hold.raw(0);
    if (hold.held_given(0, raw) < static_cast<std::int64_t>(n) || ref.state->may_owe(ref.index, 0))
        [[unlikely]] {
        hold.close();
        return Quick::general;
    }
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (detail::is_frozen(w) || SemaphoreWord::in_use(w) < n) [[unlikely]] {
            hold.close();
            return Quick::general;  // steps aside, or refuses (over_release)
        }
        LIM_RACE_POINT();
        if (word.compare_exchange_weak(w, w - n, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) [[likely]] {
            break;
        }
    }
    hold.set_raw(0, raw - static_cast<std::int64_t>(n));
    hold.close();
    before = w;
    return Quick::done;
}

[[gnu::noinline]] bool try_acquire_general(const detail::RecordRef& ref, std::uint64_t n) {
    const detail::SemaphoreCore core = core_of(ref);
    detail::Hold hold(*ref.state, ref.index);
    return detail::try_acquire_inline(core, hold, *ref.state, n, 0);
}

// `deadline` applies only if `has_deadline` (two scalars rather than an optional, so the
// entry points' tail calls pass registers only).
[[gnu::noinline]] bool acquire_general(const detail::RecordRef& ref, std::uint64_t n,
                                       bool has_deadline, TimePoint deadline) {
    const std::optional<TimePoint> until =
        has_deadline ? std::optional<TimePoint>(deadline) : std::nullopt;
    detail::SemaphoreCore core = core_of(ref);
    {
        detail::Hold hold(*ref.state, ref.index);
        if (detail::try_acquire_inline(core, hold, *ref.state, n, 0)) return true;
    }
    return core.acquire_blocking(*ref.state, ref.index, n, until, detail::kSemaphorePacing);
}

[[gnu::noinline]] void release_general(const detail::RecordRef& ref, std::uint64_t n) {
    const detail::SemaphoreCore core = core_of(ref);
    detail::Hold hold(*ref.state, ref.index);
    hold.require_held(core.layer, n, "semaphore");
    if (!detail::release_inline(core, hold, *ref.state, n)) {
        hold.require_held(core.layer, n, "semaphore");  // forgotten by a reset meanwhile
        throw Error(
            Errc::over_release,
            fmt::format("semaphore '{}': release({}) but only {} units are in use", ref.key(), n,
                        detail::SemaphoreWord::in_use(core.word.load(std::memory_order_acquire))));
    }
}

}  // namespace

bool Semaphore::try_acquire(std::uint64_t n) {
    const std::uint64_t capacity = detail::config_of<detail::SemaphoreConfig>(ref_).capacity;
    if (n > capacity) throw_too_many(ref_, n, capacity);
    if (n == 0) return true;
    const Quick q =
        quick_acquire(ref_, detail::body_of<detail::SemaphoreBody>(ref_).word, capacity, n);
    if (q != Quick::general) [[likely]]
        return q == Quick::done;
    return try_acquire_general(ref_, n);
}

// acquire and acquire_until make their first try here, inline, and call the blocking path only
// when it fails: the uncontended acquire costs what try_acquire does.
void Semaphore::acquire(std::uint64_t n) {
    const std::uint64_t capacity = detail::config_of<detail::SemaphoreConfig>(ref_).capacity;
    if (n > capacity) throw_too_many(ref_, n, capacity);
    if (n == 0) return;
    if (quick_acquire(ref_, detail::body_of<detail::SemaphoreBody>(ref_).word, capacity, n) ==
        Quick::done) [[likely]] {
        return;
    }
    acquire_general(ref_, n, false, TimePoint{});
}

bool Semaphore::acquire_until(std::uint64_t n, TimePoint deadline) {
    const std::uint64_t capacity = detail::config_of<detail::SemaphoreConfig>(ref_).capacity;
    if (n > capacity) throw_too_many(ref_, n, capacity);
    if (n == 0) return true;
    if (quick_acquire(ref_, detail::body_of<detail::SemaphoreBody>(ref_).word, capacity, n) ==
        Quick::done) [[likely]] {
        return true;
    }
    return acquire_general(ref_, n, true, deadline);
}

void Semaphore::release(std::uint64_t n) {
    if (n == 0) return;
    std::atomic<std::uint64_t>& word = detail::body_of<detail::SemaphoreBody>(ref_).word;
    std::uint64_t before = 0;
    if (quick_release(ref_, word, n, before) == Quick::done) [[likely]] {
        if (detail::kSemaphoreFormat.has_sleepers(before)) [[unlikely]]
            wake_semaphore(word, before, n);
        return;
    }
    release_general(ref_, n);
}

HandOff Semaphore::hand_off(std::uint64_t n) {
    return detail::hand_off_units(*ref_.state, ref_.index, core_of(ref_).layer, n, "semaphore",
                                  ref_.key());
}

bool Semaphore::receive(const HandOff& h) {
    return detail::receive_units(*ref_.state, ref_.index, core_of(ref_).layer, h, "semaphore",
                                 ref_.key());
}

std::uint64_t Semaphore::in_use() const noexcept {
    return detail::SemaphoreWord::in_use(
        detail::body_of<detail::SemaphoreBody>(ref_).word.load(std::memory_order_acquire));
}

std::uint64_t Semaphore::capacity() const noexcept {
    return detail::config_of<detail::SemaphoreConfig>(ref_).capacity;
}

std::uint32_t Semaphore::waiters() const noexcept {
    const std::uint64_t w =
        detail::body_of<detail::SemaphoreBody>(ref_).word.load(std::memory_order_acquire);
    return static_cast<std::uint32_t>(detail::SemaphoreWord::single(w) +
                                      detail::SemaphoreWord::multi(w));
}

}  // namespace lim
