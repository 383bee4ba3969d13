#include "lim/backoff_window.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <limits>

#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "primitives/backoff_window_state.hpp"
#include "shm/record_handle.hpp"
#include "sync/saturating.hpp"

namespace lim {
namespace {

using detail::BackoffWindowBody;

BackoffWindowBody& body(const detail::RecordRef& ref) noexcept {
    return detail::body_of<BackoffWindowBody>(ref);
}

// Waiters re-check at least this often, so that a clear() whose waker died before waking, or a
// deadline lowered by clear() and set() again, never strands them for long.
constexpr Duration kRecheck = std::chrono::milliseconds{100};

}  // namespace

BackoffWindow BackoffWindow::for_key(const Segment& segment, std::string_view key) {
    const detail::BackoffWindowConfig config{1};
    return BackoffWindow(detail::open_record<detail::BackoffWindowConfig>(
        segment, detail::RecordKind::backoff_window, 0, "backoff window", key, config, true,
        nullptr, [](const detail::BackoffWindowConfig&, std::uint16_t) {
            return std::string("a backoff window");
        }));
}

void BackoffWindow::set(Duration d, TimePoint now) {
    if (d < Duration::zero()) {
        throw Error(Errc::invalid_argument,
                    fmt::format("backoff window '{}': set({} ns): the duration must not be "
                                "negative",
                                key(), d.count()));
    }
    const std::int64_t base = std::max<std::int64_t>(to_nanos(now), 1);
    const std::int64_t target =
        d.count() >= detail::kMaxBackoffUntil - base ? detail::kMaxBackoffUntil : base + d.count();
    auto& b = body(ref_);
    detail::raise_until(b.until, target);
    b.sets.fetch_add(1, std::memory_order_relaxed);
}

bool BackoffWindow::should_backoff(TimePoint now) const noexcept {
    const std::int64_t u = body(ref_).until.load(std::memory_order_acquire);
    return u != 0 && to_nanos(now) < u;
}

Duration BackoffWindow::remaining(TimePoint now) const noexcept {
    const std::int64_t u = body(ref_).until.load(std::memory_order_acquire);
    if (u == 0 || to_nanos(now) >= u) return Duration::zero();
    return Duration{detail::saturating_sub(u, to_nanos(now))};  // a caller's `now` may be far back
}

std::optional<TimePoint> BackoffWindow::until() const noexcept {
    const std::int64_t u = body(ref_).until.load(std::memory_order_acquire);
    if (u == 0) return std::nullopt;
    return from_nanos(u);
}

std::uint64_t BackoffWindow::sets() const noexcept {
    return body(ref_).sets.load(std::memory_order_relaxed);
}

void BackoffWindow::wait() const {
    wait_until(from_nanos(std::numeric_limits<std::int64_t>::max()));
}

bool BackoffWindow::wait_until(TimePoint deadline) const {
    auto& b = body(ref_);
    detail::WaitRegistration reg(b.channel);
    for (;;) {
        const TimePoint now = Clock::now();
        const std::int64_t u = b.until.load(std::memory_order_seq_cst);
        if (u == 0 || to_nanos(now) >= u) return true;
        if (now >= deadline) return false;
        // Sleep until the deadline as it stands (or ours, or the re-check), then look again:
        // an extension made meanwhile moves the target.
        const TimePoint wake = std::min({from_nanos(u), deadline, now + kRecheck});
        reg.wait(wake);
    }
}

void BackoffWindow::clear() noexcept {
    auto& b = body(ref_);
    b.until.exchange(0, std::memory_order_seq_cst);
    detail::wake_all(b.channel);
}

}  // namespace lim

namespace lim::detail {

void inspect_backoff_window(const SegmentState& state, std::uint32_t record, TimePoint now,
                            RecordSnapshot& out) {
    const Record& r = state.record(record);
    const auto& b = *reinterpret_cast<const BackoffWindowBody*>(r.body);
    const std::int64_t until = b.until.load(std::memory_order_acquire);
    const std::int64_t now_ns = to_nanos(now);
    out.values = {
        Quantity::state("backoff_active", until > now_ns ? 1.0 : 0.0, "bool"),
        Quantity::state("backoff_remaining", seconds_between(now_ns, until), "seconds"),
        Quantity::state("backoff_sets_total",
                        static_cast<double>(b.sets.load(std::memory_order_relaxed))),
    };
    out.waiters = b.channel.waiters.load(std::memory_order_relaxed);
}

}  // namespace lim::detail

namespace lim::detail {
namespace {

// A window holds nothing and has no sleepers to recount: recovery only resets it (clears the
// deadline and wakes whoever waits for it).
void window_nothing(SegmentState&, std::uint32_t) noexcept {}
LiveHoldings window_recount(SegmentState&, std::uint32_t, const LiveHoldings&,
                            std::span<const std::uint32_t>, TimePoint) noexcept {
    return {};
}
std::uint8_t window_reset(SegmentState& state, std::uint32_t record, TimePoint) noexcept {
    auto& b = *reinterpret_cast<BackoffWindowBody*>(state.record(record).body);
    b.until.exchange(0, std::memory_order_seq_cst);
    wake_all(b.channel);
    return 0;  // nothing frozen
}

}  // namespace

const KindOps kBackoffWindowOps{
    .freeze = window_nothing,
    .recount = window_recount,
    .thaw = window_nothing,
    .reset = window_reset,
    .layers = 0,
    .layer_names = {nullptr, nullptr, nullptr},
};

}  // namespace lim::detail
