// The pause between two looks of a loop that waits for another thread, in any process, to finish
// what it is in the middle of (a slot seen out of its operation on a record: a reap's quiescence
// wait, a conversion's settling, a generation checkpoint).
#pragma once

#include <chrono>
#include <thread>

namespace lim::detail {

// Pass `pass` (0, 1, ...) of such a loop: yields the CPU for the first 64 (an operation takes
// nanoseconds, so a running thread is out of it at once; a preempted one needs the CPU this
// yields), then sleeps 50 µs a pass, so that a thread stopped mid-operation costs the waiter
// little CPU for as long as it waits.
inline void poll_pause(int pass) noexcept {
    if (pass < 64) {
        std::this_thread::yield();
    } else {
        std::this_thread::sleep_for(std::chrono::microseconds{50});
    }
}

}  // namespace lim::detail
