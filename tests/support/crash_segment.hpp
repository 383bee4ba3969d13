// What the crash tests that stage a reap or a reset by hand share: a segment in which nothing
// reaps but the test, and the sum the live ledgers show for a record.
#pragma once

#include <chrono>
#include <cstdint>

#include "lim/segment.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "support/process.hpp"

namespace lim::test {

// A segment of 8 records and 32 process slots in which no reap runs but the test's own: none
// after a blocked wait (`reap_after` 0) and none on attach.
inline Segment own_reaps_segment(const SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 8,
                                                  .max_processes = 32,
                                                  .reap_after = std::chrono::seconds{0},
                                                  .reap_on_attach = false});
}

// What the occupied slots' ledgers show for `record`'s `layer`: what the live processes hold once
// the dead have been reaped.
inline std::int64_t ledger_sum(const detail::SegmentState& state, std::uint32_t record,
                               int layer = 0) {
    std::int64_t sum = 0;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        if (!detail::slot_is_occupied(state.slot(i).owner.load())) continue;
        sum += detail::holding(state.ledger(i, record), layer);
    }
    return sum;
}

}  // namespace lim::test
