// Generation checkpoints: what keeps the 16-bit configuration generation of a limiter's bucket
// word S from wrapping under an operation that loaded it and has not yet made its CAS.
//
// Every take, return and fold that CASes S expects the generation it read, so a configuration
// switch since makes it fail and decide again. With 16 bits the generation comes back to the same
// value after 65,536 switches; an operation stopped between its load and its CAS for that many
// (a SIGSTOP, a debugger, a descheduled thread while another program reconfigures in a loop)
// could then land on a recycled word and admit against a bucket that is gone (docs/design.md,
// "Generation checkpoints"). So a switch to a generation that is a multiple of
// kGenerationCheckpoint first makes sure that no operation on the record is still in the middle
// of the attempt it started before: every such operation announces itself in its slot's
// `pending` before it loads S, and the checkpoint waits until each slot announced on the record
// has been seen out of it. One that stays (a live process stopped mid-operation) refuses the
// switch, and the generation cannot move past the checkpoint while it is stopped: at most
// kGenerationCheckpoint switches, never 65,536.
#pragma once

#include <chrono>
#include <cstdint>

#include "lim/clock.hpp"

namespace lim::detail {

class SegmentState;

// How long a checkpoint made by a caller that may wait (a reconfiguration, a blocking rebase, a
// reset) waits for the operations announced on the record to be seen out: a thread preempted in
// the middle of one needs time slices (60 ms were seen with 32 busy takers on 2 cores, and over
// 200 ms with 7 under ASan in a loaded test run), so as long as a reap waits for quiescence; one
// still announced after this is stopped, or starved as badly. A try's hard rebase waits
// kCheckpointTryWait; a soft rebase, a re-anchor and the reaper's fold kTryLockGrace.
inline constexpr std::chrono::milliseconds kCheckpointWait{1000};
inline constexpr std::chrono::milliseconds kCheckpointTryWait{200};
// After a refusal, how long further switches at a checkpoint on the record refuse at once
// (LimiterBody::checkpoint_refused_ns).
inline constexpr std::chrono::milliseconds kCheckpointMemo{1000};

// A quarter of the generation's range: any 65,535 consecutive switches cross at least three
// checkpoints, and every one crossed after an operation's load checks it (one would do).
inline constexpr std::uint32_t kGenerationCheckpoint = 1u << 14;

// Whether moving S to generation `next_gen` (its 16 bits) crosses a checkpoint.
constexpr bool is_generation_checkpoint(std::uint32_t next_gen) noexcept {
    return (next_gen & (kGenerationCheckpoint - 1)) == 0;
}

// Whether S of `record` may move to generation `next_gen`: true at once unless `next_gen` is a
// checkpoint. At a checkpoint: makes every thread on the host pass a full barrier (heavy_fence;
// milliseconds), then waits, `wait` at most, until every occupied slot announced on `record`
// (record + 1, or a token bucket's take, (record + 1) | kBucketTakeTag) has been seen out of its
// operation; a slot still announced then whose owner is dead (its lock byte held by nobody) is
// ignored, and one whose owner is alive, or whose liveness cannot be tested, makes it false. The
// caller holds the config lock (no other switch runs; it holds it through the wait, which every
// record's switches share) and must not itself be announced on `record`. `wait` is
// kCheckpointWait for a caller that may wait (a thread preempted mid-operation needs time slices
// to be seen out), kTryLockGrace for one that must not (its refusal is remembered and retried:
// switch_checked). Never throws; allocates only in the liveness test of a slot still announced
// at the end of the wait.
bool generation_may_advance(const SegmentState& state, std::uint32_t record, std::uint32_t next_gen,
                            std::chrono::milliseconds wait) noexcept;

}  // namespace lim::detail
