// lim/backoff_window.hpp: a shared "do not call before" deadline, set when a server says 429.
//
// A BackoffWindow is one deadline in the segment (CLOCK_MONOTONIC nanoseconds), shared by every
// process attached to it: when one worker learns from a 429 that the API wants a pause, every
// worker of every process sees it at once. Foundation's BackoffWindow keeps the same deadline in
// an :atomics cell of one BEAM node; lim keeps it in shared memory.
//
// `set(d)` moves the deadline to `now + d` but never shortens it (a compare-and-swap maximum), so
// a short Retry-After from one response cannot cut short a longer one from another. `clear()` is
// the only way to lower it. Dispatch reads it to decide whether backoff is active.
//
// Handles are cheap to copy, usable from any thread and, after fork(), from the child. A window
// holds nothing for anyone, so crash recovery has nothing to do for it.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "lim/clock.hpp"
#include "lim/detail/record_ref.hpp"
#include "lim/segment.hpp"

namespace lim {

class BackoffWindow {
  public:
    // The window `key` of `segment`, created (with no deadline) if it does not exist. A window
    // has no configuration, so opening never conflicts. A Dispatch and a BackoffWindow may share
    // a key. Throws Error: invalid_name (bad key), table_full, permission_denied.
    static BackoffWindow for_key(const Segment& segment, std::string_view key);

    // Moves the deadline to `now + d` unless it is already later. d == 0 records "backoff was
    // asked for now" (which a Dispatch counts as a recent backoff). Never blocks.
    // Throws Error(invalid_argument) for a negative `d`. Very long durations saturate.
    // Memory ordering: a reader that sees the new deadline happens-after this call.
    void set(Duration d) { set(d, Clock::now()); }
    void set(Duration d, TimePoint now);

    // True while `now` is before the deadline.
    bool should_backoff() const noexcept { return should_backoff(Clock::now()); }
    bool should_backoff(TimePoint now) const noexcept;

    // Time from `now` to the deadline; zero when there is none or it has passed.
    Duration remaining() const noexcept { return remaining(Clock::now()); }
    Duration remaining(TimePoint now) const noexcept;

    // The deadline, or nullopt when none was set since creation or the last clear().
    std::optional<TimePoint> until() const noexcept;

    // How many set() calls there have been, in all processes (for monitoring).
    std::uint64_t sets() const noexcept;

    // Sleeps until the deadline has passed (at once if there is none). Re-checks when it wakes,
    // so an extension made meanwhile by any process is honoured; clear() wakes it at once.
    // Sleeps on a shared futex; holds nothing while it sleeps.
    void wait() const;
    // As wait(), but gives up at `deadline`: returns true if the backoff is over, false if
    // `deadline` came first.
    bool wait_until(TimePoint deadline) const;

    // Removes the deadline: backoff ends now for everyone, and waiters return.
    void clear() noexcept;

    std::string_view key() const noexcept { return ref_.key(); }

    // For the library's own handles (Dispatch); not part of the stable API.
    const detail::RecordRef& record_ref() const noexcept { return ref_; }

  private:
    explicit BackoffWindow(detail::RecordRef ref) : ref_(std::move(ref)) {}
    detail::RecordRef ref_;
};

}  // namespace lim
