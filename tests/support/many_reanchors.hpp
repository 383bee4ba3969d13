// Included by a test that exercises the token bucket's re-anchoring itself: before any test runs
// (in this process, and so in every child it forks), buckets up to 1.8 x 10^7 tokens/s re-anchor.
#pragma once

#include "limiter/limiter_state.hpp"

namespace lim::test {

// Lets buckets up to 1.8 x 10^7 tokens/s re-anchor (a window of 100 ms: many re-anchors in a
// second of explicit time) instead of the library's 5,124 tokens/s (a window of 6 minutes;
// docs/design.md, "TokenBucket's take"). Set at static initialization of the including program.
[[maybe_unused]] inline const bool many_reanchors = [] {
    detail::short_drip_max_rate.store(184'467'440'737);  // floor(2^64 / 10^8 ns)
    return true;
}();

}  // namespace lim::test
