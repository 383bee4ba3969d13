// lim/dispatch.hpp: Foundation's layered Dispatch, shared by every process attached to a segment.
//
// A Dispatch guards calls to one API with three layers:
//
//   1. concurrency            at most `concurrency` requests in flight (default 400);
//   2. throttled_concurrency  while backoff is active, at most this many (default 10) of the
//                             requests that started under backoff;
//   3. byte_budget            at most `byte_budget` bytes in flight (default 5,000,000), FIFO,
//                             each request's bytes multiplied by `byte_penalty_multiplier`
//                             (default 20) when it starts under backoff.
//
// A request takes the layers in that order (the throttled one only under backoff) and gives
// them back in reverse. Backoff is the shared BackoffWindow's deadline: `set_backoff(d)` moves it
// to now + d (never shortening it), and backoff counts as active while now is before the deadline
// *or* less than `backoff_window` (default 10 s) after it, a "recent" backoff, as Foundation
// defines it. Whether a request is throttled and penalised is decided once, when it starts
// acquiring. set_backoff sleeps no one: requests only wait when a layer is full.
//
// Everything lives in the segment: the three layers are one record (kind dispatch), the window
// another (kind backoff_window), so forked workers, and unrelated processes that open the same
// key, share one concurrency limit, one byte budget and one backoff state.
//
//     auto window = lim::BackoffWindow::for_key(seg, "my_api");
//     auto d = lim::Dispatch::open(seg, {.limiter = window, .key = "my_api",
//                                        .concurrency = 100, .throttled_concurrency = 5});
//     auto r = d.with_rate_limit(body.size(), [&] { return http_post(url, body); });
//     if (r.status == 429) d.set_backoff(lim::parse_retry_after(r.headers).value_or(1s));
//
// Blocking: a request that finds a layer full sleeps on a shared futex that the releasing
// process wakes (the byte layer wakes only the request whose turn it is). `acquire_backoff`
// bounds each sleep, so it re-checks on its own even if no wake comes (a waker that died).
//
// Caveats
// - A byte cost larger than the whole budget (after the penalty) is clamped to the budget: such
//   a request waits until the budget is entirely free and then runs alone, instead of never.
//   Permit::bytes() tells what was charged.
// - `acquire_backoff`, `clock` and `sleep` belong to the handle, not to the shared record: two
//   processes may pace their re-checks differently. Every other option is part of the record and
//   must match (or be adopted).
// - Handles are usable from any thread and, after fork(), from the child; a Permit is not: it
//   stays with the process that acquired it (a child's copy releases nothing).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "lim/backoff_window.hpp"
#include "lim/clock.hpp"
#include "lim/segment.hpp"

namespace lim {

namespace detail {
struct DispatchImpl;
}

// The re-check interval of a blocked acquire when no wake comes: attempt k sleeps at most
// min(base * 2^k, max), scaled by a random factor in [1 - jitter, 1].
struct ExponentialBackoff {
    Duration base = std::chrono::milliseconds{2};
    Duration max = std::chrono::milliseconds{50};
    double jitter = 0.25;  // 0..1
};

struct DispatchOptions {
    // The shared backoff state (required). Must live in the same segment.
    BackoffWindow limiter;
    // The Dispatch's name in the segment ([A-Za-z0-9._:-], 1..64 chars).
    std::string key = "default";
    // Requests in flight at once. 1..2^31.
    std::uint64_t concurrency = 400;
    // Requests in flight at once among those that started while backoff was active. 1..2^31.
    std::uint64_t throttled_concurrency = 10;
    // Bytes in flight at once, as charged (penalty included). 1..2^46.
    std::uint64_t byte_budget = 5'000'000;
    // How long after the backoff deadline backoff still counts as active. >= 0.
    Duration backoff_window = std::chrono::seconds{10};
    // What a request's bytes are multiplied by when it starts under backoff. >= 1.
    std::uint64_t byte_penalty_multiplier = 20;
    // Re-check pacing of blocked acquires (base > 0, max >= base, jitter in [0, 1]).
    ExponentialBackoff acquire_backoff{};
    // For tests: the clock every decision reads (default Clock::now), and the sleep a blocked
    // acquire calls instead of waiting on the futex (default: futex wait). A test that injects
    // both owns time completely: sleep can advance the clock.
    std::function<TimePoint()> clock{};
    std::function<void(Duration)> sleep{};
};

struct DispatchSnapshot {
    // Whether a request starting now would be throttled and penalised.
    bool backoff_active = false;
    // Time until the backoff deadline (zero if none or passed), and until backoff stops counting
    // as active (the deadline plus backoff_window; zero if not active).
    std::chrono::nanoseconds backoff_remaining{0};
    std::chrono::nanoseconds throttle_remaining{0};
    std::uint64_t in_flight = 0;
    std::uint64_t concurrency = 0;
    std::uint64_t throttled_in_flight = 0;
    std::uint64_t throttled_concurrency = 0;
    std::uint64_t bytes_in_flight = 0;  // as charged, penalty included
    std::uint64_t byte_budget = 0;
    // Requests blocked now, in all processes, and where.
    std::uint32_t waiters = 0;
    std::uint32_t concurrency_waiters = 0;
    std::uint32_t throttled_waiters = 0;
    std::uint32_t bytes_waiters = 0;
};

// What one request holds from a Dispatch: a concurrency slot, a throttled slot if it started under
// backoff, and its bytes as charged. Move-only; releases exactly that on destruction (or
// release()). Never allocates.
// A Permit must not outlive every handle of the Dispatch it came from. Across fork() it stays the
// parent's: destroying or releasing the child's copy does nothing.
class Permit {
  public:
    Permit() noexcept = default;  // holds nothing
    Permit(Permit&& other) noexcept
        : impl_(std::exchange(other.impl_, nullptr)), bytes_(other.bytes_), tag_(other.tag_) {}
    Permit& operator=(Permit&& other) noexcept {
        if (this != &other) {
            release();
            impl_ = std::exchange(other.impl_, nullptr);
            bytes_ = other.bytes_;
            tag_ = other.tag_;
        }
        return *this;
    }
    Permit(const Permit&) = delete;
    Permit& operator=(const Permit&) = delete;
    ~Permit() {
        if (impl_) release_held();
    }

    // Gives back the bytes, the throttled slot and the concurrency slot, in that order, and wakes
    // whoever waits for them. Idempotent. Never throws, never blocks (except briefly aside a
    // crash-recovery recount). A part this process no longer holds (forgotten by a forced
    // Segment::reset) is not given back, and is reported on stderr; the rest is.
    // Memory ordering: everything before the release happens-before the acquire that reuses
    // what it gave back.
    void release() noexcept;

    bool held() const noexcept { return impl_ != nullptr; }
    explicit operator bool() const noexcept { return held(); }
    // Bytes charged against the budget (penalised and clamped as it was).
    std::uint64_t bytes() const noexcept { return bytes_; }
    // Whether it started under backoff (and so holds a throttled slot).
    bool throttled() const noexcept { return ((tag_ >> 32) & kThrottled) != 0; }

  private:
    friend class Dispatch;
    Permit(detail::DispatchImpl* impl, std::uint64_t bytes, bool throttled, bool quick,
           std::uint32_t fork_gen) noexcept
        : impl_(impl),
          bytes_(bytes),
          tag_(fork_gen |
               (std::uint64_t{(throttled ? kThrottled : 0u) | (quick ? 0u : kLayered)} << 32)) {}
    // release() once impl_ is known to be set (the destructor's test): gives back what the
    // permit holds, leaving impl_ as it is.
    void release_held() noexcept;

    detail::DispatchImpl* impl_ = nullptr;
    std::uint64_t bytes_ = 0;
    // Low 32 bits: the fork generation it was taken in (detail::fork_generation). High 32
    // bits: kThrottled, it started under backoff (and holds a throttled slot); kLayered, it was
    // not taken by the one-CAS form (a packed Dispatch, no backoff), so it is not released by
    // it. One word, stored once and loaded whole (so the load is forwarded from the store); the
    // common permit's high half is zero.
    static constexpr std::uint32_t kThrottled = 1;
    static constexpr std::uint32_t kLayered = 2;
    std::uint64_t tag_ = 0;
};

class Dispatch {
  public:
    // Opens the Dispatch `options.key` in `segment`, creating it with `options` if it does not
    // exist. Throws Error: invalid_argument (an option out of range, or a limiter from another
    // segment), invalid_name (bad key), config_mismatch (the key exists with other options or
    // another backoff window), table_full. A refused call leaves the segment unchanged.
    static Dispatch open(const Segment& segment, const DispatchOptions& options);
    // As above, but if the key exists with other options, attaches with the stored ones
    // (including the stored backoff window).
    static Dispatch open(const Segment& segment, const DispatchOptions& options, AdoptExisting);

    // Takes a concurrency slot, then (if backoff is active now) a throttled slot, then `bytes`
    // (x byte_penalty_multiplier under backoff, clamped to byte_budget) from the byte budget,
    // sleeping as long as it takes. Waits for the byte budget in FIFO order. Throws
    // Error(table_full) when this thread cannot get a process slot, and whatever an injected
    // `clock` or `sleep` throws, and WaitStopped when a lim::WaitCheck installed on this thread
    // says stop (lim/wait_check.hpp; Error(invalid_argument) where it would have to wait when
    // called inside such a check's callback). On any exception it holds nothing: the layers taken
    // so far are given back, its sleeper registration and its place in the byte queue are
    // withdrawn. Memory ordering: happens-after the releases that freed what it takes.
    Permit acquire(std::uint64_t bytes);

    // As acquire, but never sleeps: nullopt (holding nothing) if any layer is full now, or if
    // anyone is queued for the byte budget. Throws as acquire (before taking anything).
    std::optional<Permit> try_acquire(std::uint64_t bytes);

    // As acquire, but gives up at `deadline` (in the options' clock): nullopt, holding nothing.
    // Throws as acquire, and then holds nothing either.
    std::optional<Permit> acquire_until(std::uint64_t bytes, TimePoint deadline);

    // Runs `fn` holding a permit for `bytes` and returns what it returns; the permit is released
    // when `fn` returns and when it throws (the exception propagates).
    template <class F>
    std::invoke_result_t<F&&> with_rate_limit(std::uint64_t bytes, F&& fn) {
        Permit permit = acquire(bytes);
        return std::invoke(std::forward<F>(fn));
    }

    // Sets the shared backoff deadline to now + d unless it is already later. Requests that start
    // from now on (in every process) are throttled and penalised until backoff_window after the
    // deadline. Sleeps no one. Throws Error(invalid_argument) for a negative d.
    void set_backoff(Duration d);

    // Whether a request starting now would run under backoff.
    bool backoff_active() const;

    // The state of every layer and of the backoff, read without stopping anyone (each field is
    // exact at some instant; together they are a close view).
    DispatchSnapshot snapshot() const;

    // The shared backoff window.
    const BackoffWindow& limiter() const noexcept;
    std::string_view key() const noexcept;

  private:
    explicit Dispatch(std::shared_ptr<detail::DispatchImpl> impl) : impl_(std::move(impl)) {}
    static Dispatch open_impl(const Segment& segment, const DispatchOptions& options, bool adopt);
    std::optional<Permit> acquire_impl(std::uint64_t bytes, std::optional<TimePoint> deadline);
    // try_acquire's general case (under backoff, a Dispatch whose limits do not pack, a slot not
    // in the thread's cache, a frozen word). Out of line: try_acquire tail-calls it, so that the
    // common permit needs no stack frame.
    [[gnu::noinline]] static std::optional<Permit> try_acquire_general(detail::DispatchImpl& d,
                                                                       std::uint64_t bytes);
    // Everything but the packed one-CAS permit: one CAS per layer, then blocking per layer.
    [[gnu::noinline]] static std::optional<Permit> acquire_general(
        detail::DispatchImpl& d, bool backoff, std::uint64_t charge,
        std::optional<TimePoint> deadline);

    std::shared_ptr<detail::DispatchImpl> impl_;
};

}  // namespace lim
