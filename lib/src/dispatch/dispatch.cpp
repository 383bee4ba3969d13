#include "lim/dispatch.hpp"

#include <fmt/format.h>

#include <cmath>
#include <cstdio>

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
      default_clock(!o.clock) {}

bool DispatchImpl::backoff_now() {
    const std::int64_t until = window_body->until.load(std::memory_order_acquire);
    if (until == 0) return false;
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

LiveHoldings dispatch_recount(SegmentState& state, std::uint32_t record, const LiveHoldings& live,
                              std::span<const std::uint32_t> dead_slots, TimePoint) noexcept {
    DispatchBody& b = body_at(state, record);
    LiveHoldings given;
    given.held[kDispatchSlotsLayer] =
        recount_semaphore_word(state, record, kDispatchSlotsLayer, b.concurrency,
                               live.held[kDispatchSlotsLayer], dead_slots);
    given.held[kDispatchThrottledLayer] =
        recount_semaphore_word(state, record, kDispatchThrottledLayer, b.throttled,
                               live.held[kDispatchThrottledLayer], dead_slots);
    given.held[kDispatchBytesLayer] = recount_weighted_layer(
        state, record, kDispatchBytesLayer, b.bytes, live.held[kDispatchBytesLayer], dead_slots);
    return given;
}

// Nothing held, nothing queued, and the Dispatch's backoff window cleared. Live sleepers on the
// slot layers stay counted (they deregister later); queued byte requests queue again.
void dispatch_reset(SegmentState& state, std::uint32_t record, TimePoint) noexcept {
    DispatchBody& b = body_at(state, record);
    recount_semaphore_word(state, record, kDispatchSlotsLayer, b.concurrency, 0);
    recount_semaphore_word(state, record, kDispatchThrottledLayer, b.throttled, 0);
    reset_weighted_layer(b.bytes);
    const std::uint32_t window = config_at(state, record).backoff_record;
    if (window < state.records_used() &&
        state.record(window).header.kind ==
            static_cast<std::uint16_t>(RecordKind::backoff_window)) {
        auto& w = *reinterpret_cast<BackoffWindowBody*>(state.record(window).body);
        w.until.exchange(0, std::memory_order_seq_cst);
        wake_all(w.channel);
    }
}

}  // namespace

void inspect_dispatch(const SegmentState& state, std::uint32_t record, TimePoint now,
                      RecordSnapshot& out) {
    const Record& r = state.record(record);
    const auto& c = *reinterpret_cast<const DispatchConfig*>(r.config);
    const auto& b = *reinterpret_cast<const DispatchBody*>(r.body);
    const std::uint64_t slots = b.concurrency.load(std::memory_order_acquire);
    const std::uint64_t throttled = b.throttled.load(std::memory_order_acquire);
    const std::uint64_t bytes = b.bytes.word.load(std::memory_order_acquire);
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
        Quantity::layer("in_flight", static_cast<double>(SemaphoreWord::in_use(slots)),
                        static_cast<double>(c.concurrency), "concurrency"),
        Quantity::layer(
            "throttled_in_flight", static_cast<double>(SemaphoreWord::in_use(throttled)),
            static_cast<double>(c.throttled_concurrency), "throttled_concurrency", "", "throttled"),
        Quantity::layer("in_flight", static_cast<double>(WeightedWord::in_use(bytes)),
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
    out.waiters =
        static_cast<std::uint32_t>(SemaphoreWord::single(slots) + SemaphoreWord::multi(slots) +
                                   SemaphoreWord::single(throttled) +
                                   SemaphoreWord::multi(throttled) + WeightedWord::queued(bytes));
    out.frozen = is_frozen(slots) || is_frozen(throttled) || is_frozen(bytes);
}

const KindOps kDispatchOps{
    .freeze = dispatch_freeze,
    .recount = dispatch_recount,
    .thaw = dispatch_thaw,
    .reset = dispatch_reset,
    .layers = 3,
    .layer_names = {"slots", "throttled", "bytes"},
};

// Gives back what a Permit holds: bytes, then the throttled slot, then the concurrency slot.
void release_permit(DispatchImpl& d, std::uint64_t bytes, bool throttled) noexcept {
    SegmentState& state = *d.ref.state;
    try {
        Hold hold(state, d.ref.index);
        if (bytes != 0) d.bytes().release(hold, state, bytes);
        if (throttled) d.throttled().release(hold, state, 1);
        d.slots().release(hold, state, 1);
    } catch (const std::exception& e) {
        // Only Hold can throw: this thread has no process slot and none is free. Without a slot
        // the release cannot be recorded in a ledger, and an unrecorded release would be undone
        // by the next crash-recovery recount; the permit stays held until this process exits
        // and is reaped. (A thread that acquired always has a slot; this needs a permit moved
        // to a new thread while the process table is full.)
        std::fprintf(stderr, "lim: cannot release a permit of dispatch '%.*s': %s\n",
                     static_cast<int>(d.ref.key().size()), d.ref.key().data(), e.what());
    }
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
        .reserved = 0,
    };
    const detail::SegmentState& state = *segment.state();
    detail::RecordRef ref = detail::open_record<DispatchConfig>(
        segment, detail::RecordKind::dispatch, 0, "dispatch", options.key, config, adopt, nullptr,
        [&state](const DispatchConfig& c, std::uint16_t) { return describe(state, c); });
    const DispatchConfig& stored = detail::config_of<DispatchConfig>(ref);
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

std::optional<Permit> Dispatch::try_acquire(std::uint64_t bytes) {
    DispatchImpl& d = *impl_;
    detail::SegmentState& state = *d.ref.state;
    const bool backoff = d.backoff_now();
    const std::uint64_t charge = detail::charge_for(
        bytes, backoff, d.config->byte_penalty_multiplier, d.config->byte_budget);
    detail::Hold hold(state, d.ref.index);
    if (!d.slots().try_acquire(hold, state, 1)) return std::nullopt;
    if (backoff && !d.throttled().try_acquire(hold, state, 1)) {
        d.slots().release(hold, state, 1);
        return std::nullopt;
    }
    if (charge != 0 && !d.bytes().try_acquire(hold, state, charge)) {
        if (backoff) d.throttled().release(hold, state, 1);
        d.slots().release(hold, state, 1);
        return std::nullopt;
    }
    hold.admitted();
    return Permit(&d, charge, backoff, detail::fork_generation());
}

std::optional<Permit> Dispatch::acquire_impl(std::uint64_t bytes,
                                             std::optional<TimePoint> deadline) {
    DispatchImpl& d = *impl_;
    detail::SegmentState& state = *d.ref.state;
    const std::uint32_t record = d.ref.index;
    // Decided once, here: whether this request runs under backoff, and so what it is charged.
    const bool backoff = d.backoff_now();
    const std::uint64_t charge = detail::charge_for(
        bytes, backoff, d.config->byte_penalty_multiplier, d.config->byte_budget);
    bool slot = false;
    bool throttled = !backoff;  // true: nothing (more) to take from this layer
    bool budget = charge == 0;
    {
        // The fast path: every layer in one announcement, one CAS each.
        detail::Hold hold(state, record);
        slot = d.slots().try_acquire(hold, state, 1);
        if (slot && !throttled) throttled = d.throttled().try_acquire(hold, state, 1);
        if (slot && throttled && !budget) budget = d.bytes().try_acquire(hold, state, charge);
        if (slot && throttled && budget) {
            hold.admitted();
            return Permit(&d, charge, backoff, detail::fork_generation());
        }
    }
    // Some layer is full: wait for each remaining one in order, giving back what was taken if
    // the deadline passes.
    const auto give_back = [&] {
        detail::Hold hold(state, record);
        if (backoff && throttled) d.throttled().release(hold, state, 1);
        if (slot) d.slots().release(hold, state, 1);
        return std::optional<Permit>{};
    };
    if (!slot) {
        slot = d.slots().acquire_until(state, record, 1, deadline, d.pacing);
        if (!slot) return std::nullopt;
    }
    if (!throttled) {
        throttled = d.throttled().acquire_until(state, record, 1, deadline, d.pacing);
        if (!throttled) return give_back();
    }
    if (!budget) {
        budget = d.bytes().acquire_until(state, record, charge, deadline, d.pacing);
        if (!budget) return give_back();
    }
    {
        detail::Hold hold(state, record);
        hold.admitted();
    }
    return Permit(&d, charge, backoff, detail::fork_generation());
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
    using detail::SemaphoreWord;
    using detail::WeightedWord;
    const DispatchImpl& d = *impl_;
    const DispatchConfig& c = *d.config;
    DispatchSnapshot s;
    const std::int64_t now = to_nanos(d.now());
    const std::int64_t until = d.window_body->until.load(std::memory_order_acquire);
    s.backoff_active = detail::backoff_active_at(now, until, c.backoff_window_ns);
    if (until != 0 && now < until) s.backoff_remaining = std::chrono::nanoseconds{until - now};
    if (s.backoff_active) {
        s.throttle_remaining = std::chrono::nanoseconds{until + c.backoff_window_ns - now};
    }
    const std::uint64_t cw = d.body->concurrency.load(std::memory_order_acquire);
    const std::uint64_t tw = d.body->throttled.load(std::memory_order_acquire);
    const std::uint64_t bw = d.body->bytes.word.load(std::memory_order_acquire);
    s.in_flight = SemaphoreWord::in_use(cw);
    s.concurrency = c.concurrency;
    s.throttled_in_flight = SemaphoreWord::in_use(tw);
    s.throttled_concurrency = c.throttled_concurrency;
    s.bytes_in_flight = WeightedWord::in_use(bw);
    s.byte_budget = c.byte_budget;
    s.concurrency_waiters =
        static_cast<std::uint32_t>(SemaphoreWord::single(cw) + SemaphoreWord::multi(cw));
    s.throttled_waiters =
        static_cast<std::uint32_t>(SemaphoreWord::single(tw) + SemaphoreWord::multi(tw));
    s.bytes_waiters = static_cast<std::uint32_t>(WeightedWord::queued(bw));
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
    detail::DispatchImpl* d = std::exchange(impl_, nullptr);
    // A copy inherited across fork() is the parent's permit: the child releases nothing.
    if (fork_gen_ != detail::fork_generation()) return;
    detail::release_permit(*d, bytes_, throttled_);
}

}  // namespace lim
