// Crash recovery: finding dead processes in the process table and giving back exactly what they
// held; resetting records to their configured state.
//
// The argument for exactness (docs/design.md, "Crash recovery"): for each record a dead process
// touched, the reaper freezes the record's words (no acquisition or release lands), waits until
// no live slot is in the middle of an operation on it (so every live ledger is exact), and sets
// each word to the sum of the live ledgers. Whatever the dead process held, and whatever it was
// half-way through changing when it died, is thereby neither lost nor returned twice.
#pragma once

#include <cstdint>
#include <optional>

#include "lim/clock.hpp"
#include "lim/segment.hpp"
#include "shm/segment_state.hpp"

namespace lim::detail {

enum class ReapLock {
    wait,  // wait until no other reap or reset runs (Segment::reap, limctl reap), but at most
           // kLockWaitTimeout: Error(busy) then (a reaper stopped holding the lock)
    skip,  // give up at once if one runs (automatic reaps: someone is already at it)
};

// Reaps dead processes. Serialised with other reaps and resets by the recovery lock.
ReapReport reap(SegmentState& state, ReapLock lock);

// reap(state, ReapLock::skip), swallowing errors: for automatic reaping, which must never make
// the call that triggered it fail.
void reap_quietly(SegmentState& state) noexcept;

// Resets a record or the whole segment (see Segment::reset).
void reset(SegmentState& state, const ResetOptions& options);

// Drives automatic reaping from a blocking call: poll() with the current time on every pass of
// the wait loop (never while holding a Hold) reaps once the call has waited reap_after, and
// again after each further reap_after.
class AutoReap {
  public:
    AutoReap(SegmentState& state, TimePoint started) noexcept
        : state_(state), next_(later(started, state.reap_after())) {}
    void poll(TimePoint now) noexcept {
        if (state_.reap_after() <= Duration::zero() || now < next_) return;
        reap_quietly(state_);
        next_ = later(now, state_.reap_after());
    }

    // t + d, saturating at TimePoint::max(): reap_after = Duration::max() means "never", and a
    // wrapped sum would be in the past and reap on every pass. (`t` may be a caller's injected
    // clock, so it is not assumed small either.)
    static TimePoint later(TimePoint t, Duration d) noexcept {
        if (d > Duration::zero() && t > TimePoint::max() - d) return TimePoint::max();
        if (d < Duration::zero() && t < TimePoint::min() - d) return TimePoint::min();
        return t + d;
    }

  private:
    SegmentState& state_;
    TimePoint next_;
};

}  // namespace lim::detail
