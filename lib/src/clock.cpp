#include "lim/clock.hpp"

#include <time.h>

namespace lim {

Clock::time_point Clock::now() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return time_point{duration{std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec}};
}

}  // namespace lim
