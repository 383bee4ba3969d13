#include "sync/race_point.hpp"

#ifdef LIM_RACE_WIDEN

#include <sched.h>

#include <cstdint>

namespace lim::detail {

void race_point() noexcept {
    // xorshift64*, seeded per thread from its own address so forked children and threads differ.
    thread_local std::uint64_t state = 0;
    if (state == 0) state = reinterpret_cast<std::uintptr_t>(&state) | 1;
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    const std::uint64_t r = state * 0x2545F4914F6CDD1DULL;
    if ((r & 3) == 0) {
        sched_yield();
        return;
    }
    const std::uint64_t spins = (r >> 8) & 1023;
    for (std::uint64_t i = 0; i < spins; ++i)
        asm volatile("" ::: "memory");
}

}  // namespace lim::detail

#endif
